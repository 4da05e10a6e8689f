"""Shared helpers of the test suite: reference teacher distributions and cache writing.

Every reference here is plain float64 numpy, computed independently of the code
under test: full-vocabulary logprobs ``lp = z - logsumexp(z)``, their entropy,
the label logprobs and the per-sequence aggregates. ``RefSeq`` holds one
sequence as a builder would hand it to ``CacheWriter.add`` plus the reference
values a test compares the decoded cache with; ``assert_sequence_matches``
does that comparison with the decoding error bounds of FORMAT.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import logitstore
from logitstore import Codec, MassTopK, Sampled, Scored, SequenceRecord, TopK

# Under pytest-xdist (the default: pyproject's addopts) the workers share the cores: each one, and the processes
# its tests start, gets its share of threads instead of every worker running one thread per core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)
    if "torch" in sys.modules:  # imported before this file: set its pool too
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

#: The codecs every round trip is run under.
CODECS = {
    "qdelta-ranked": Codec(),
    "fp32-raw": Codec(values="fp32", ids="raw"),
    "fp16": Codec(values="fp16"),
    "fp16-scalars": Codec(scalars="fp16"),
}
#: FORMAT.md: the default qdelta step is 5/128 nats.
DEFAULT_STEP = 5 / 128
#: Two float32 computations of one model's outputs (another BLAS kernel, batch shape, padding or CPU) differ by
#: about 1e-5 nats in logprobs on the models of this suite (1.03e-5 seen between a batched build and a lone forward
#: on another machine of this kind). Every comparison of two such computations allows this, 20x that, so a test
#: that passes here passes on a user's machine; near-ties within it may order differently (argmax, top-k sets).
FP32_ATOL = 2e-4
def assert_top1_within_ties(top1, ids, logprobs, tol: float = 2 * FP32_ATOL) -> None:
    """``top1 [N]`` is the most likely of each row's ``ids [N, K]`` (with ``logprobs [N, K]``, most likely first),
    or another id whose logprob is within ``tol`` of it: a near-tie two float32 computations may order either way."""
    top1, ids, logprobs = np.asarray(top1), np.asarray(ids), np.asarray(logprobs, np.float64)
    for i in np.flatnonzero(top1 != ids[:, 0]):
        j = np.flatnonzero(ids[i] == top1[i])
        assert j.size and logprobs[i, j[0]] >= logprobs[i, 0] - tol, (i, top1[i], ids[i, :3], logprobs[i, :3])


#: A full [N, V] reference matrix is built when N * V is at most this; bigger cases are generated directly.
FULL_MATRIX_LIMIT = 400_000


#: the fields of ``SequenceRecord`` (the rest of a keyword set goes to its ``Scored``)
SEQUENCE_FIELDS = {"input_ids", "positions", "loss_mask", "seq_id", "record", "sample", "correct", "aggregates"}


def as_record(**kw) -> SequenceRecord:
    """A ``SequenceRecord`` from one flat keyword set (sequence fields and ``Scored`` fields together)."""
    seq = {k: kw.pop(k) for k in list(kw) if k in SEQUENCE_FIELDS}
    return SequenceRecord(scored=Scored(**kw), **seq)


# ---------------------------------------------------------------- reference distributions


def log_softmax(z: np.ndarray) -> np.ndarray:
    """``z - logsumexp(z)`` along the last axis, in float64."""
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))


def random_logprobs(rng: np.random.Generator, n: int, v: int, scale: float = 3.0) -> np.ndarray:
    """``[n, v]`` full-vocabulary logprobs of random logits ``z = N(0, 1) * scale``."""
    return log_softmax(rng.standard_normal((n, v)) * scale)


def entropy(lp: np.ndarray) -> np.ndarray:
    """Full-vocabulary entropy (nats) of rows of finite logprobs, clipped at 0 (rounding)."""
    return np.maximum(-(np.exp(lp) * lp).sum(axis=-1), 0.0)


def reference_id_map(entry_ids, vocab: int) -> list[int]:
    """Code -> token id table of a ranked-id cache, by the rule of ``codec.build_id_map``: tokens ranked by
    descending frequency among ``entry_ids`` (ties and unseen ids by ascending id); rank r takes the r-th
    code in low-byte-major order (codes sorted by (code & 255, code >> 8))."""
    count = [0] * vocab
    for t in entry_ids:
        count[int(t)] += 1
    ranked = sorted(range(vocab), key=lambda t: (-count[t], t))
    code_order = sorted(range(vocab), key=lambda c: (c & 255, c >> 8))
    id_map = [0] * vocab
    for r, code in enumerate(code_order):
        id_map[code] = ranked[r]
    return id_map


def reference_seq_id(input_ids, sample: int = 0) -> str:
    """FORMAT.md: blake2b-64 of the int32 little-endian ids, plus ``/<sample>`` for samples > 0."""
    data = np.asarray(input_ids, dtype="<i4").tobytes() + (f"/{sample}".encode() if sample else b"")
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclasses.dataclass
class RefSeq:
    """One sequence: what is given to ``CacheWriter.add`` (``to_record()``) and the reference values to compare with."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [N] int64
    ids: np.ndarray  # [N, K] int32, garbage (0) beyond n_entries
    logprobs: np.ndarray  # [N, K] float32 entry logprobs, -inf beyond n_entries
    n_entries: np.ndarray  # [N]
    counts: np.ndarray | None  # [N, K] (rule sample)
    label_logprob: np.ndarray  # [N] float64, full vocabulary
    entropy: np.ndarray  # [N] float64, full vocabulary
    tail_mass: np.ndarray  # [N] float64
    loss_mask: np.ndarray  # [N] bool
    argmax: np.ndarray  # [N] teacher top-1 id
    seq_id: str
    give_positions: bool = True
    give_mask: bool = True
    give_argmax: bool = True
    record: int = 0
    sample: int = 0
    correct: bool | None = None
    explicit_id: bool = True

    @property
    def n(self) -> int:
        return int(self.positions.size)

    @property
    def labels(self) -> np.ndarray:
        return self.input_ids[self.positions]

    def add_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            input_ids=self.input_ids, ids=self.ids, logprobs=self.logprobs, label_logprob=self.label_logprob,
            entropy=self.entropy, tail_mass=self.tail_mass, record=self.record, sample=self.sample,
            correct=self.correct,
        )
        if self.give_positions:
            kw["positions"] = self.positions
        if self.give_mask:
            kw["loss_mask"] = self.loss_mask
        if self.give_argmax:
            kw["argmax"] = self.argmax
        if self.n and (self.n_entries != self.ids.shape[1]).any():
            kw["n_entries"] = self.n_entries
        if self.counts is not None:
            kw["counts"] = self.counts
        if self.explicit_id:
            kw["seq_id"] = self.seq_id
        return kw

    def to_record(self) -> SequenceRecord:
        """What ``CacheWriter.add`` is given for this sequence."""
        return as_record(**self.add_kwargs())

    def aggregates(self, rule) -> tuple[float | None, float | None, float | None]:
        """Reference (mean_entropy, teacher_nll, token_accuracy) over the target positions."""
        m = self.loss_mask
        if not m.any():
            return None, None, None
        acc = None
        if self.give_argmax or not isinstance(rule, Sampled):
            acc = float((self.argmax[m] == self.labels[m]).mean())
        return float(self.entropy[m].mean()), float(-self.label_logprob[m].mean()), acc


def _entry_columns(rule, vocab: int) -> int:
    if isinstance(rule, Sampled):
        return max(1, min(rule.k, rule.draws, vocab))
    return min(rule.k, vocab)


def make_sequence(
    rng: np.random.Generator,
    *,
    vocab: int,
    n_tokens: int,
    rule,
    seq_id: str,
    scale: float = 3.0,
    subset: bool = False,
    mask_prob: float = 0.0,
    top1_label_prob: float = 0.3,
    give_argmax: bool = True,
    full: bool | None = None,
    record: int = 0,
    sample: int = 0,
    correct: bool | None = None,
) -> RefSeq:
    """A random sequence of ``n_tokens`` tokens with a teacher distribution at each cached position.

    With ``full`` (default: when ``N * vocab`` is small) the teacher is a full ``[N, V]``
    logprob matrix and the entries are ``logitstore.sparsify`` of it (the reference
    rule). Otherwise (large vocabularies) the entries are generated directly: distinct
    random ids with sorted logprobs of a random distribution whose remaining mass is
    spread evenly over the other ``V - n`` tokens, so entropy, tail mass and label
    logprobs are still those of a real full-vocabulary distribution.
    """
    T = int(n_tokens)
    tokens = rng.integers(0, vocab, size=T).astype(np.int64)
    if subset and T > 1:
        size = int(rng.integers(0, T))
        positions = np.sort(rng.choice(np.arange(1, T), size=size, replace=False)).astype(np.int64)
    else:
        positions = np.arange(1, T, dtype=np.int64)
    N = positions.size
    if full is None:
        full = N * vocab <= FULL_MATRIX_LIMIT
    K = _entry_columns(rule, vocab)
    counts = None
    if N == 0:
        ids = np.zeros((0, K), np.int32)
        lps = np.zeros((0, K), np.float32)
        n_ent = np.zeros(0, np.int32)
        counts = np.zeros((0, K), np.uint16) if isinstance(rule, Sampled) else None
        label_lp = ent = tail = np.zeros(0)
        argmax = np.zeros(0, np.int64)
    elif full:
        lp = random_logprobs(rng, N, vocab, scale)
        argmax = lp.argmax(axis=1)
        hit = rng.random(N) < top1_label_prob
        tokens[positions[hit]] = argmax[hit]
        label_lp = lp[np.arange(N), tokens[positions]]
        ent = entropy(lp)
        e = logitstore.sparsify(lp, rule, rng=rng)
        ids, lps, n_ent, tail, counts = e.ids, e.logprobs, e.n_entries, e.tail_mass, e.counts
    else:
        ids = np.zeros((N, K), np.int32)
        lps = np.full((N, K), -np.inf, np.float32)
        n_ent = np.zeros(N, np.int32)
        counts = np.zeros((N, K), np.uint16) if isinstance(rule, Sampled) else None
        label_lp, ent, tail = np.zeros(N), np.zeros(N), np.zeros(N)
        argmax = np.zeros(N, np.int64)
        for i in range(N):
            n = K if isinstance(rule, TopK) else int(rng.integers(1, K + 1))
            rest = vocab - n
            z = rng.standard_normal(n + (rest > 0)) * scale
            if rest > 0:
                z[-1] += np.log(rest)  # the other tokens together
            lp_all = log_softmax(z)
            lp_e = np.sort(lp_all[:n])[::-1]
            t_ids = rng.choice(vocab, size=n, replace=False)
            tail_i = float(np.clip(1.0 - np.exp(lp_e).sum(), 0.0, 1.0)) if rest > 0 else 0.0
            ids[i, :n], lps[i, :n], n_ent[i], tail[i], argmax[i] = t_ids, lp_e, n, tail_i, t_ids[0]
            h = -(np.exp(lp_e) * lp_e).sum()
            if rest > 0 and tail_i > 0:
                h -= tail_i * (np.log(tail_i) - np.log(rest))
            ent[i] = max(h, 0.0)
            if rng.random() < top1_label_prob or tail_i <= 0:
                tokens[positions[i]] = t_ids[0]
            label = tokens[positions[i]]
            where = np.flatnonzero(t_ids == label)
            label_lp[i] = lp_e[where[0]] if where.size else np.log(tail_i) - np.log(rest)
            if counts is not None:
                extra = int(rng.integers(0, rule.draws - n + 1))
                counts[i, :n] = 1 + rng.multinomial(extra, np.full(n, 1.0 / n))
    mask = rng.random(N) >= mask_prob
    return RefSeq(
        input_ids=tokens, positions=positions, ids=np.asarray(ids, np.int32), logprobs=np.asarray(lps, np.float32),
        n_entries=np.asarray(n_ent, np.int32), counts=counts, label_logprob=np.asarray(label_lp, np.float64),
        entropy=np.asarray(ent, np.float64), tail_mass=np.asarray(tail, np.float64), loss_mask=mask,
        argmax=np.asarray(argmax, np.int64), seq_id=seq_id, give_positions=subset, give_mask=mask_prob > 0,
        give_argmax=give_argmax, record=record, sample=sample, correct=correct,
    )


def make_sequences(rng: np.random.Generator, count: int, *, vocab: int, rule, max_tokens: int = 40,
                   min_tokens: int = 1, **kw) -> list[RefSeq]:
    """``count`` sequences with random lengths in [min_tokens, max_tokens], ids ``seq-0000``..."""
    return [
        make_sequence(rng, vocab=vocab, n_tokens=int(rng.integers(min_tokens, max_tokens + 1)), rule=rule,
                      seq_id=f"seq-{i:04d}", record=i, **kw)
        for i in range(count)
    ]


def write_cache(path, seqs: list[RefSeq], *, vocab: int, rule, codec: Codec = Codec(), **writer_kwargs):
    """Write ``seqs`` into a new cache at ``path`` with ``logitstore.CacheWriter``; returns the manifest."""
    with logitstore.CacheWriter(path, vocab_size=vocab, rule=rule, codec=codec, **writer_kwargs) as w:
        for s in seqs:
            assert w.add(s.to_record()) is True
    return w.manifest


# ---------------------------------------------------------------- comparing with the reference


def padded_reference(ref: RefSeq, k: int):
    """The reference entries padded to ``[N, k]`` the way the reader documents: ids -1, logprobs -inf, counts 0."""
    N, K = ref.ids.shape
    valid_in = np.arange(K)[None, :] < ref.n_entries[:, None]
    valid = np.arange(k)[None, :] < ref.n_entries[:, None]
    ids = np.full((N, k), -1, np.int64)
    lps = np.full((N, k), -np.inf, np.float64)
    ids[valid] = ref.ids[valid_in]
    lps[valid] = ref.logprobs[valid_in]
    counts = None
    if ref.counts is not None:
        counts = np.zeros((N, k), np.int64)
        counts[valid] = ref.counts[valid_in]
    return ids, lps, counts, valid


def assert_logprobs_within_bound(got: np.ndarray, ref: np.ndarray, codec: Codec) -> None:
    """Decoded entry logprobs against the float32 reference, with FORMAT.md's bound for the codec."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    err = np.abs(got - ref)
    if codec.values == "qdelta":
        bound = codec.logprob_step / 2 + 1e-6 * np.maximum(1.0, np.abs(ref))
    elif codec.values == "fp16":
        bound = 2.0**-11 * np.abs(ref) + 1e-7
    else:
        bound = np.zeros_like(ref)
    assert (err <= bound).all(), f"max error {err.max()} beyond the {codec.values} bound"


def assert_scalars_within_bound(got: np.ndarray, ref: np.ndarray, codec: Codec) -> None:
    """Per-position label_logprob / entropy / tail_mass: exact float32, or fp16 within 2^-11 relative."""
    ref32 = np.asarray(ref, np.float32)
    if codec.scalars == "fp32":
        np.testing.assert_array_equal(np.asarray(got, np.float32), ref32)
    else:
        err = np.abs(np.asarray(got, np.float64) - np.asarray(ref, np.float64))
        assert (err <= 2.0**-11 * np.abs(ref) + 6e-8).all(), f"fp16 scalar error {err.max()}"


def _close(got, want, rtol=1e-5, atol=1e-6) -> bool:
    if want is None:
        return got is None
    return got is not None and abs(float(got) - want) <= atol + rtol * abs(want)


def assert_sequence_matches(got, ref: RefSeq, codec: Codec, rule, k: int) -> None:
    """A decoded ``logitstore.Sequence`` against the reference it was written from."""
    assert got.seq_id == ref.seq_id
    assert int(got.record) == ref.record and int(got.sample) == ref.sample
    assert got.correct == ref.correct
    np.testing.assert_array_equal(got.input_ids, ref.input_ids)
    np.testing.assert_array_equal(got.pos, ref.positions)
    np.testing.assert_array_equal(got.labels, ref.input_ids[ref.positions])
    np.testing.assert_array_equal(got.loss_mask, ref.loss_mask)
    N = ref.n
    assert int(got.n_tokens) == ref.input_ids.size and int(got.n_positions) == N
    assert int(got.n_targets) == int(ref.loss_mask.sum())
    assert got.ids.shape == (N, k) and got.logprobs.shape == (N, k)
    np.testing.assert_array_equal(got.n_entries, ref.n_entries)
    ids, lps, counts, valid = padded_reference(ref, k)
    np.testing.assert_array_equal(got.ids, ids)
    assert np.isneginf(got.logprobs[~valid]).all()
    assert_logprobs_within_bound(got.logprobs[valid], lps[valid], codec)
    if counts is None:
        assert got.counts is None
    else:
        np.testing.assert_array_equal(got.counts, counts)
    assert_scalars_within_bound(got.label_logprob, ref.label_logprob, codec)
    assert_scalars_within_bound(got.entropy, ref.entropy, codec)
    assert_scalars_within_bound(got.tail_mass, ref.tail_mass, codec)
    me, nll, acc = ref.aggregates(rule)
    assert _close(got.mean_entropy, me), (got.mean_entropy, me)
    assert _close(got.teacher_nll, nll), (got.teacher_nll, nll)
    assert _close(got.token_accuracy, acc), (got.token_accuracy, acc)


# ---------------------------------------------------------------- cache files


def kill_when(proc, ready: Callable[[], bool], *, timeout: float = 300, every: float = 0.01) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (a ``LogitstoreError``, ``OSError`` or ``ValueError`` from it
    counts as not yet); fail the test if the process ends first."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if ready():
                break
        except (logitstore.LogitstoreError, OSError, ValueError):
            pass
        time.sleep(every)
    if proc.poll() is not None:
        pytest.fail("the process finished before it could be killed; make its work longer")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def shard_files(cache: Path) -> list[Path]:
    return sorted((Path(cache) / "shards").glob("shard-*.parquet"))


def read_manifest(cache: Path) -> dict:
    return json.loads((Path(cache) / "manifest.json").read_text())


def write_manifest(cache: Path, d: dict, *, sign: bool = True) -> None:
    """Write the manifest ``d``; ``sign`` (default) gives it the checksum of its new content, as a tool that rewrote
    it consistently would, so the reader's and ``verify``'s deeper checks are what a test reaches; ``sign=False``
    writes a hand edit (its old checksum, or none), which the checksum alone refuses."""
    from logitstore.manifest import CHECKSUM_KEY, manifest_checksum

    d = {k: v for k, v in d.items() if k != CHECKSUM_KEY or not sign}
    if sign:
        d[CHECKSUM_KEY] = manifest_checksum(d)
    (Path(cache) / "manifest.json").write_text(json.dumps(d, indent=1))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def rewrite_shard(cache: Path, index: int, edit: Callable[[pa.Table], pa.Table], fix_manifest: bool = True) -> None:
    """Rewrite shard ``index`` as ``edit(table)`` (schema and key-value metadata kept), then record
    its new size and sha256 in the manifest so that only the edited values are wrong."""
    f = shard_files(cache)[index]
    t = pq.read_table(f)
    new = edit(t)
    new = new.replace_schema_metadata(new.schema.metadata or t.schema.metadata)
    pq.write_table(new, f, compression="zstd", use_dictionary=False)
    if fix_manifest:
        m = read_manifest(cache)
        m["shards"][index]["bytes"] = os.path.getsize(f)
        m["shards"][index]["sha256"] = sha256_file(f)
        write_manifest(cache, m)


def set_column(t: pa.Table, name: str, values: list) -> pa.Table:
    i = t.schema.get_field_index(name)
    return t.set_column(i, t.schema.field(i), pa.array(values, type=t.schema.field(i).type))


# ---------------------------------------------------------------- shared caches (built once, copied to mutate)


@dataclasses.dataclass
class BuiltCache:
    path: Path
    refs: list[RefSeq]
    vocab: int
    rule: Any
    codec: Codec

    @property
    def by_id(self) -> dict[str, RefSeq]:
        return {r.seq_id: r for r in self.refs}

    def copy_to(self, dst: Path) -> BuiltCache:
        shutil.copytree(self.path, dst)
        return dataclasses.replace(self, path=Path(dst))


@pytest.fixture(scope="session")
def ranked_cache(tmp_path_factory) -> BuiltCache:
    """Default codec (qdelta + ranked ids), MassTopK: several shards of several row groups each,
    position subsets, loss masks, zero- and one-position sequences."""
    rng = np.random.default_rng(1234)
    vocab, rule, codec = 700, MassTopK(0.9, 24), Codec()
    refs = make_sequences(rng, 30, vocab=vocab, rule=rule, max_tokens=40, mask_prob=0.3)
    refs[3] = make_sequence(rng, vocab=vocab, n_tokens=1, rule=rule, seq_id="seq-0003", record=3)
    refs[4] = make_sequence(rng, vocab=vocab, n_tokens=2, rule=rule, seq_id="seq-0004", record=4)
    refs[5] = make_sequence(rng, vocab=vocab, n_tokens=30, rule=rule, seq_id="seq-0005", subset=True, record=5)
    refs[6] = make_sequence(rng, vocab=vocab, n_tokens=9, rule=rule, seq_id="seq-0006", mask_prob=1.0, record=6,
                            correct=True)
    refs[7].correct = False
    path = tmp_path_factory.mktemp("ranked") / "cache"
    write_cache(path, refs, vocab=vocab, rule=rule, codec=codec, shard_bytes=12_000, row_group_positions=60)
    return BuiltCache(path, refs, vocab, rule, codec)


@pytest.fixture(scope="session")
def raw_fp32_cache(tmp_path_factory) -> BuiltCache:
    """Lossless codec (fp32 values, raw ids), TopK(8)."""
    rng = np.random.default_rng(99)
    vocab, rule, codec = 300, TopK(8), Codec(values="fp32", ids="raw")
    refs = make_sequences(rng, 12, vocab=vocab, rule=rule, max_tokens=25, mask_prob=0.2)
    path = tmp_path_factory.mktemp("raw") / "cache"
    write_cache(path, refs, vocab=vocab, rule=rule, codec=codec, shard_bytes=6_000, row_group_positions=40)
    return BuiltCache(path, refs, vocab, rule, codec)


@pytest.fixture(scope="session")
def sampled_cache(tmp_path_factory) -> BuiltCache:
    """Rule Sampled(32, k=16) with counts, default codec."""
    rng = np.random.default_rng(7)
    vocab, rule, codec = 200, Sampled(32, 16), Codec()
    refs = make_sequences(rng, 10, vocab=vocab, rule=rule, max_tokens=30, scale=2.0)
    path = tmp_path_factory.mktemp("sampled") / "cache"
    write_cache(path, refs, vocab=vocab, rule=rule, codec=codec, shard_bytes=5_000, row_group_positions=50)
    return BuiltCache(path, refs, vocab, rule, codec)


# ---------------------------------------------------------------- a tiny teacher with the real tokenizer


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from transformers import AutoTokenizer

    from builders.embedded import prepare_embedded_teacher

    return AutoTokenizer.from_pretrained(prepare_embedded_teacher())


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, embedded_tokenizer):
    """A 2-layer random Llama with the embedded teacher's tokenizer (vocab 49152), saved as a model dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a sharper head than the default init, so distributions are not near-uniform
        model.lm_head.weight.mul_(40)
    path = tmp_path_factory.mktemp("tiny") / "teacher"
    model.save_pretrained(path)
    embedded_tokenizer.save_pretrained(path)
    return path
