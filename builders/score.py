"""``logitstore score``: run a student over a cache's sequences and store per-position scores.

For every cached position (``pos``: the token ``input_ids[pos]`` predicted from
``input_ids[:pos]``) the student's full-vocabulary log-softmax gives

- ``student_label_logprob``: log q(label), nats;
- ``student_entropy``: the exact entropy of q over the student's whole head, nats;
- ``student_top1``: the student's most likely next token id;
- ``kl_teacher_student``, ``kl_student_teacher``, ``tvd``: divergences between teacher
  and student coarse-grained onto the teacher's stored support S plus one "other"
  bucket (the exact other-bucket form): teacher ``p_i = exp(cached logprob)`` for i in
  S and ``p_other = tail_mass``; student ``q_i`` for i in S and ``q_other = 1 - sum q_S``
  (computed as the sum of q outside S, which avoids the cancellation of ``1 - sum``).
  ``KL(p||q) = sum_b p_b log(p_b / q_b)``, a zero ``p_b`` contributing 0 and ``q_b`` floored
  at 1e-12 (``logitstore.divergence``, the one definition); ``tvd = sum_b |p_b - q_b| / 2``.
  Coarse-graining never increases an f-divergence, so these are lower bounds of the full-vocabulary ones. With quantised
  cache values (qdelta, fp16) the teacher buckets sum to 1 only within the codec's
  error, and the divergences carry that error. A cache without stored logprobs
  (``--values none``) gets NULL divergences.

These feed the token-selection methods of the literature (TIP: tokens by student
entropy and teacher-student divergence; AdaSPEC: drop tokens a reference model cannot
fit) and curricula by student competence (PACED).

The output SCORES is a directory: ``scores.parquet`` (one row per cached position:
``seq_id`` string, ``pos`` int32, ``student_label_logprob`` float32, ``student_entropy``
float32, ``student_top1`` int32, ``kl_teacher_student`` float32, ``kl_student_teacher``
float32, ``tvd`` float32; zstd) and ``scores.json`` (the student, the cache and its
shard checksums as the cache fingerprint, row count, summary means, creation time).
It is written into a hidden temporary directory and renamed into place. It joins the
cache's ``tokens`` view on ``(seq_id, pos)``, e.g. in ``logitstore sql CACHE``::

    SELECT t.seq_id, t.pos, t.label, t.entropy AS teacher_entropy, s.student_entropy,
           s.kl_teacher_student
    FROM tokens t JOIN read_parquet('SCORES/scores.parquet') s USING (seq_id, pos)
    WHERE s.student_entropy > 2 ORDER BY s.kl_teacher_student DESC LIMIT 20

Memory follows ``builders.extract``: the student's body runs once per token-budget
batch; only the hidden states of the cached positions go through the LM head, in
chunks, into two ``[chunk, V]`` float32 buffers allocated once and used in place, so no
``[B, T, V]`` tensor ever exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import logitstore
from builders.plan import batches
from logitstore.divergence import bucket_divergences
from logitstore.errors import CacheExistsError, InvalidInputError
from logitstore.identity import check_tokenizer
from logitstore.manifest import atomic_write_bytes, fsync_dir, now
from logitstore.progress import progress_bar
from logitstore.scores import INFO_FILE, SCHEMA, SCORES_FILE

if TYPE_CHECKING:  # torch and the backend load when a run starts, so building the CLI parser stays fast
    import torch

    from builders.backends.hf import TransformersBackend
    from builders.extract import Buffers

logger = logging.getLogger(__name__)

@dataclasses.dataclass
class _Job:
    """A cached sequence in the shape ``builders.plan.batches`` sorts (it reads ``.ex.input_ids``)."""

    ex: logitstore.reader.Sequence
    index: int  # its row in the block, to write results back in storage order


def divergences(p_s: np.ndarray, p_other: np.ndarray, q_s: np.ndarray, q_other: np.ndarray,
                valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forward KL, reverse KL and TVD of the bucket distributions ``[M, K] + other`` (float64,
    ``logitstore.divergence.bucket_divergences``).

    ``p_s``/``q_s``: teacher/student probabilities of the support entries ``[M, K]`` (ignored
    where not ``valid``); ``p_other``/``q_other``: the rest of each one's mass ``[M]``.
    """
    p = np.concatenate([np.where(valid, p_s, 0.0), p_other[:, None]], axis=1)
    q = np.concatenate([np.where(valid, q_s, 0.0), q_other[:, None]], axis=1)
    d = bucket_divergences(p, q)
    return d["kl_pq"], d["kl_qp"], d["tvd"]


def _score_chunk(z: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """``z``: raw student logits ``[C, V]`` (overwritten), ``p``: a work buffer of the same shape;
    ``ids [C, K]``: the teacher's support, every row's invalid slots filled with a valid id of the row."""
    from builders.extract import normalise

    lse, entropy, label_lp, top1 = normalise(z, p, labels)  # p: q, the student's softmax
    support_lp = z.gather(1, ids) - lse  # [C, K]
    # q_other: the student's mass outside S, summed directly (repeated ids in a row zero the same slot)
    q_other = p.scatter_(1, ids, 0.0).sum(-1)
    return {"student_label_logprob": label_lp.cpu().numpy(), "student_entropy": entropy.clamp(min=0).cpu().numpy(),
            "student_top1": top1.int().cpu().numpy(), "support_lp": support_lp.cpu().numpy(),
            "q_other": q_other.clamp(0.0, 1.0).cpu().numpy()}


def _score_batch(backend: TransformersBackend, bufs: Buffers, seqs: list, stored: bool) -> list[dict[str, np.ndarray]]:
    """Per-position score arrays for each sequence of a batch (called under ``torch.no_grad``)."""
    import torch

    from builders.extract import logit_chunks

    hs, labels = backend.hidden_at([s.input_ids for s in seqs], [s.pos for s in seqs])  # [M, H], [M]
    dev = hs.device
    K = max(s.ids.shape[1] for s in seqs)
    n_ent = np.concatenate([s.n_entries for s in seqs])
    valid = np.arange(K)[None, :] < n_ent[:, None]
    ids = np.concatenate([np.pad(s.ids, ((0, 0), (0, K - s.ids.shape[1])), constant_values=-1) for s in seqs])
    ids_g = np.where(valid, ids, ids[:, :1]).astype(np.int64)  # slot 0 is always valid (n_entries >= 1)
    ids_t = torch.as_tensor(ids_g, device=dev)
    parts = [_score_chunk(z, p, labels[sl], ids_t[sl]) for sl, z, p in logit_chunks(hs, backend.head, bufs)]
    res = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    q_s = np.exp(res.pop("support_lp").astype(np.float64))
    q_other = res.pop("q_other").astype(np.float64)
    if stored:
        lps = np.concatenate([np.pad(s.logprobs, ((0, 0), (0, K - s.logprobs.shape[1])), constant_values=-np.inf)
                              for s in seqs]).astype(np.float64)
        tail = np.concatenate([s.tail_mass for s in seqs]).astype(np.float64)
        kl_ts, kl_st, tvd = divergences(np.exp(lps), tail, q_s, q_other, valid)
        res.update(kl_teacher_student=kl_ts, kl_student_teacher=kl_st, tvd=tvd)
    out, a = [], 0
    for s in seqs:
        n = len(s.pos)
        out.append({k: v[a:a + n] for k, v in res.items()})
        a += n
    return out


def _check_student(backend: TransformersBackend, student: str, cache) -> None:
    m = cache.manifest
    want = (m.tokenizer or {}).get("fingerprint")
    got = backend.tokenizer_record()["fingerprint"]
    if not want:
        raise InvalidInputError(f"cache {cache.path} records no tokenizer fingerprint, so student {student}'s "
                                f"tokenizer (fingerprint {got}) cannot be checked against the cached token ids")
    check_tokenizer(backend.tokenizer, f"student {student}", cache)
    if backend.vocab_size < m.vocab_size:
        raise InvalidInputError(f"student {student} has an LM head of {backend.vocab_size} tokens, smaller than the "
                                f"cache's vocab_size {m.vocab_size}: cached token ids would fall outside it")


def _load_student(student: str, **kwargs) -> TransformersBackend:
    from builders.backends.hf import TeacherLoadError, TransformersBackend

    try:
        return TransformersBackend(student, **kwargs)
    except TeacherLoadError as exc:  # the backend's messages say "teacher"; here the model is the student
        msg = str(exc)
        raise TeacherLoadError("student" + msg[len("teacher"):] if msg.startswith("teacher") else msg) from exc


def score_cache(cache_path: str | os.PathLike, student: str, out: str | os.PathLike, *, dtype: str = "fp32",
                device: str = "cpu", token_budget: int = 8192, extract_mb: int = 96, progress: bool = True,
                trust_remote_code: bool = False) -> Path:
    """Score every cached position of ``cache_path`` with ``student`` into the new directory ``out``."""
    import torch

    out = Path(out)
    if token_budget < 2:
        raise InvalidInputError(f"--token-budget {token_budget}: must be at least 2 (padded tokens per batch)")
    if extract_mb < 1:
        raise InvalidInputError(f"--extract-mb {extract_mb}: must be at least 1 (MiB for the head chunks)")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise CacheExistsError(f"{out} already exists and is not an empty directory; choose another -o SCORES")
    cache = logitstore.open(cache_path)
    m = cache.manifest
    backend = _load_student(student, dtype=dtype, device=device, extract_mb=extract_mb,
                            trust_remote_code=trust_remote_code)
    _check_student(backend, student, cache)
    stored = m.codec.get("values") != "none"
    if not m.complete:
        logger.warning("cache %s is an unfinished build: scoring its %d committed positions", cache.location,
                       m.positions)
    from builders.extract import Buffers

    bufs = Buffers(backend.head, min(backend.chunk_rows, max(1, m.positions)), backend.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an earlier crash of this very process id
    tmp.mkdir()
    sums = {"nll": 0.0, "entropy": 0.0, "kl": 0.0, "hits": 0}
    bar = progress_bar(progress, desc="student scoring", total=m.positions)
    t0 = time.time()
    try:
        writer = pq.ParquetWriter(tmp / SCORES_FILE, SCHEMA, compression="zstd")
        try:
            with torch.no_grad():
                n_rows, n_seqs = _score_blocks(cache, backend, bufs, writer, token_budget, stored, bar, sums)
        finally:
            writer.close()
        with open(tmp / SCORES_FILE, "rb+") as f:
            os.fsync(f.fileno())
        info = {
            "format": "logitstore-scores", "version": 1,
            "student": backend.describe(), "student_tokenizer": backend.tokenizer_record(),
            "cache": {"path": cache.url or str(cache.path.resolve()), "fingerprint": [s.sha256 for s in m.shards],
                      "teacher": m.teacher, "vocab_size": m.vocab_size, "complete": m.complete},
            "rows": n_rows, "sequences": n_seqs,
            "divergences": "exact other bucket over the teacher's stored support" if stored
            else "absent (the cache stores no logprobs)",
            "summary": _summary(sums, n_rows, stored),
            "options": {"token_budget": token_budget, **backend.options()},
            "elapsed_s": round(time.time() - t0, 1), "created_at": now(),
        }
        atomic_write_bytes(tmp / INFO_FILE, json.dumps(info, indent=1).encode("utf-8"))
        fsync_dir(tmp)
        try:
            os.replace(tmp, out)  # onto a missing or empty directory
        except OSError as exc:
            raise CacheExistsError(f"{out}: cannot move the finished scores into place ({exc})") from exc
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    logger.info("scored %s with %s: %d sequences, %d positions in %.1f s", cache.path, student, n_seqs, n_rows,
                time.time() - t0)
    return out


def _score_blocks(cache, backend: TransformersBackend, bufs: Buffers, writer: pq.ParquetWriter, token_budget: int,
                  stored: bool, bar, sums: dict) -> tuple[int, int]:
    """Score the cache row group by row group, writing each one's rows in storage order; (rows, sequences)."""
    n_rows = n_seqs = 0
    for block in cache.iter_blocks():
        jobs = [_Job(block.sequence(i), i) for i in range(len(block))]
        results: dict[int, dict[str, np.ndarray]] = {}
        for batch in batches([j for j in jobs if len(j.ex.pos)], token_budget):
            for job, res in zip(batch, _score_batch(backend, bufs, [j.ex for j in batch], stored)):
                results[job.index] = res
            if bar is not None:
                bar.update(sum(len(j.ex.pos) for j in batch))
        done = [j.ex for j in jobs if j.index in results]
        if done:
            table = _table(done, [results[j.index] for j in jobs if j.index in results], stored)
            writer.write_table(table)
            n_rows, n_seqs = n_rows + table.num_rows, n_seqs + len(done)
            _accumulate(sums, table, done, stored)
    return n_rows, n_seqs

def _table(seqs: list, res: list[dict[str, np.ndarray]], stored: bool) -> pa.Table:
    cat = lambda k: np.concatenate([r[k] for r in res])  # noqa: E731
    n = sum(len(s.pos) for s in seqs)
    cols = {
        "seq_id": pa.array(np.repeat(np.array([s.seq_id for s in seqs], dtype=object), [len(s.pos) for s in seqs]),
                           pa.string()),
        "pos": pa.array(np.concatenate([s.pos for s in seqs]).astype(np.int32)),
        "student_top1": pa.array(cat("student_top1").astype(np.int32)),
    }
    for name in ("student_label_logprob", "student_entropy"):
        cols[name] = pa.array(cat(name).astype(np.float32))
    for name in ("kl_teacher_student", "kl_student_teacher", "tvd"):
        cols[name] = pa.array(cat(name).astype(np.float32)) if stored else pa.nulls(n, pa.float32())
    return pa.Table.from_arrays([cols[f.name] for f in SCHEMA], schema=SCHEMA)


def _accumulate(sums: dict, table: pa.Table, seqs: list, stored: bool) -> None:
    col = lambda name: table.column(name).to_numpy().astype(np.float64)  # noqa: E731
    sums["nll"] -= col("student_label_logprob").sum()
    sums["entropy"] += col("student_entropy").sum()
    labels = np.concatenate([s.labels for s in seqs])
    sums["hits"] += int((table.column("student_top1").to_numpy() == labels).sum())
    if stored:
        sums["kl"] += col("kl_teacher_student").sum()


def _summary(sums: dict, n: int, stored: bool) -> dict:
    if not n:
        return {"student_nll": None, "student_entropy": None, "student_accuracy": None, "kl_teacher_student": None}
    return {"student_nll": sums["nll"] / n, "student_entropy": sums["entropy"] / n,
            "student_accuracy": sums["hits"] / n, "kl_teacher_student": sums["kl"] / n if stored else None}
