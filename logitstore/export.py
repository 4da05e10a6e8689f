"""Exporting a cache (or a selection) as a dataset another trainer reads: ``logitstore export CACHE --to axolotl``.

axolotl. What its KD plugin consumes was read in axolotl-ai-cloud/axolotl at commit
``067b021c8b87a9e5e380b9173c704cf7340e30f5`` (2026-07-24; ``src/axolotl/integrations/kd/`` last
changed in ``e27f9b2d``):

- ``kd/trainer.py`` (``AxolotlKDTrainer.compute_loss``) takes the batch keys ``labels``,
  ``target_token_ids``, ``target_logprobs``, ``target_mask``, runs the model with
  ``output_hidden_states=True`` and hands ``hidden_states[-1]`` ``[B, T, H]`` with the targets to
- ``kd/kernels/liger.py`` (``LigerFusedLinearKLTopKLogprobFunction``), which flattens hidden states and
  targets *without a shift* (target row ``t`` is compared with the student's output at ``t``, the
  prediction of token ``t + 1``), shifts only ``labels`` for the cross-entropy (``labels[:, 1:]``),
  keeps the entries where ``target_mask`` is 1, takes ``target_logprobs`` as the teacher's logprobs
  ("already temp-scaled and normalized"), divides the student logits by ``kd_temperature``,
  optionally renormalises the student over the K columns (``kd_normalize_topk``), and scales the KD
  sum by ``kd_temperature**2``; the trainer divides the total by the step's label count;
- ``kd/collator.py`` (``DataCollatorForKD``) pads rows of ``[T][K]`` python lists per batch (logprobs
  with -1e9, ids with 0, mask 0) and needs as many target rows as ``input_ids``;
- ``kd/chat_template.py`` (``ChatTemplateStrategyWithKDv2``, the ``load`` of ``type:
  axolotl.integrations.kd.chat_template``) builds those fields from raw teacher logprobs: rows padded
  at the front to the length of ``input_ids``, probabilities renormalised over the K entries and
  re-tempered as ``p^(1/T) / Z``. It re-tokenises chat messages, which would not reproduce the cached
  token ids exactly, so the export writes the *prepared* rows instead: axolotl's
  ``utils/data/wrappers.py`` (``_is_dataset_already_tokenized``) passes a dataset with ``input_ids``,
  ``attention_mask`` and ``labels`` through untouched (``docs/dataset-formats/tokenized.qmd``: an
  empty ``type:``), as its own KD end-to-end test does with a prepared top-k dataset.

Rows (one per sequence, storage order; ``T`` its tokens, ``K`` the cache's entries per position;
the value at row index ``t``):

- ``input_ids`` (``list<int32>``, [T]): the cached token ids;
- ``attention_mask`` (``list<int8>``, [T]): 1;
- ``labels`` (``list<int32>``, [T]): ``input_ids[t]`` where position ``t`` is cached with ``loss_mask``,
  else -100;
- ``target_token_ids`` (``list<list<int32>>``, [T][K]): the entry ids of position ``pos = t + 1``, most
  likely first; 0 where there is none;
- ``target_logprobs`` (``list<list<float32>>``, [T][K]): their logprobs, ``log_softmax(lp / T)`` over the
  position's entries (``logprobs="normalized"``, the default) or the cache's full-vocabulary ``lp``
  (``"raw"``); -1e9 where there is no entry;
- ``target_mask`` (``list<list<int8>>``, [T][K]): 1 where the entry exists and ``pos = t + 1`` is a target
  (``loss_mask``), else 0.

Row ``T - 1`` (nothing after the last token) and rows of positions not cached are all padding. A
mass-adaptive cache has rows with fewer than K entries: their padded columns have mask 0, yet
axolotl's ``kd_normalize_topk`` renormalises the student over all K columns (token 0 included), so
train such an export with ``kd_normalize_topk: false`` or export a top-k cache. Caches with sampled
entries (``--sample``) are refused (axolotl would read the draws as a top-k and lose their counts), so
are caches without logprobs (``--values none``) and weighted selections; a ``--tail-draws`` cache
exports its exact head with ``drop_tail_draws=True``.

Files: ``DIR/data/train-NNNNN-of-NNNNN.parquet`` (zstd; ``datasets.load_dataset(DIR)`` and axolotl's
``path: DIR`` read them as the ``train`` split), ``DIR/seq_ids.txt`` (the seq id of each row, in
order) and ``DIR/logitstore_export.json`` (what was exported, from what, with the axolotl config to
train it). The export is written into ``.DIR.export-tmp`` next to DIR (holding a build lock) and
renamed into place, so DIR is either absent, the previous export, or complete; ``force`` replaces only
a directory holding ``logitstore_export.json``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitstore.errors import CacheExistsError, CacheLockedError, InvalidInputError
from logitstore.lock import LOCK_NAME, BuildLock, read_lock
from logitstore.manifest import fsync_dir, now
from logitstore.progress import progress_bar
from logitstore.reader import Block, Cache
from logitstore.selection import cache_fingerprint

logger = logging.getLogger(__name__)

TARGETS = ("axolotl",)
MARKER = "logitstore_export.json"
EXPORT_FORMAT = "logitstore-export"
PAD_LOGPROB = -1e9  # axolotl's own padding value (kd/collator.py): exp() is 0, and 0 * -1e9 is no NaN
LOGPROBS = ("normalized", "raw")


def axolotl_rows(block: Block, *, k: int, logprobs: str = "normalized", temperature: float = 1.0) -> pa.Table:
    """The axolotl rows (module docstring) of the sequences of a decoded ``block``, with ``k`` entry columns."""
    tok = block.token_offsets.astype(np.int64)
    n_tok = int(tok[-1])
    owner = np.repeat(np.arange(len(block)), np.diff(block.pos_offsets))
    pos = block.pos.astype(np.int64)
    row = tok[owner] + pos - 1  # the target row of each cached position: the output at pos - 1 predicts it
    kb = min(block.ids.shape[1], k)
    valid = block.valid[:, :kb]
    lp = block.logprobs[:, :kb].astype(np.float64)
    if logprobs == "normalized":  # log_softmax over each position's valid entries, in float64
        x = np.where(valid, lp / temperature, -np.inf)
        top = np.max(x, axis=1, keepdims=True, initial=-np.inf)
        top = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):  # rows without entries are padding below
            lp = x - (top + np.log(np.sum(np.exp(x - top), axis=1, keepdims=True)))
    ids = np.zeros((n_tok, k), np.int32)
    lps = np.full((n_tok, k), PAD_LOGPROB, np.float32)
    mask = np.zeros((n_tok, k), np.int8)
    ids[row, :kb] = np.where(valid, block.ids[:, :kb], 0)
    lps[row, :kb] = np.where(valid, lp, PAD_LOGPROB)
    mask[row, :kb] = valid & block.loss_mask[:, None]
    labels = np.full(n_tok, -100, np.int32)
    labels[tok[owner] + pos] = np.where(block.loss_mask, block.labels, -100)

    def lists(flat: np.ndarray, per_token: int | None = None) -> pa.Array:
        values = pa.array(flat.reshape(-1))
        if per_token is not None:  # [n_tok, K] -> list<list<.>>
            values = pa.ListArray.from_arrays(pa.array(np.arange(0, n_tok * per_token + 1, per_token, np.int32)),
                                              values)
        return pa.ListArray.from_arrays(pa.array(tok.astype(np.int32)), values)

    return pa.table({"input_ids": lists(block.input_ids.astype(np.int32)),
                     "attention_mask": lists(np.ones(n_tok, np.int8)), "labels": lists(labels),
                     "target_token_ids": lists(ids, k), "target_logprobs": lists(lps, k),
                     "target_mask": lists(mask, k)})


def _check_exportable(cache: Cache, logprobs: str, temperature: float, drop_tail_draws: bool) -> None:
    rule = cache.rule.name
    where = str(cache.path) if cache.selection is None else f"the selection's cache {cache.path}"
    if logprobs not in LOGPROBS:
        raise InvalidInputError(f"--logprobs {logprobs!r}: choose from {', '.join(LOGPROBS)}")
    if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
        raise InvalidInputError(f"--temperature {temperature!r}: must be a number > 0")
    if logprobs == "raw" and temperature != 1:
        raise InvalidInputError(f"--temperature {temperature} re-tempers the normalized logprobs; with --logprobs "
                                "raw (the cache's temperature-1 values) it must be 1")
    if cache.codec.values == "none":
        raise InvalidInputError(f"{where} stores no logprobs (built with --values none): axolotl's KD loss needs "
                                "target_logprobs; export a cache built with logprobs")
    if rule == "sample":
        raise InvalidInputError(f"{where} holds sampled entries (rule 'sample'): axolotl reads target_token_ids as "
                                "a top-k and would drop the draw counts that make them unbiased; export a top-k or "
                                "mass cache (train sampled caches with logitstore train)")
    if rule == "topk_tail" and not drop_tail_draws:
        raise InvalidInputError(f"{where} holds tail draws beyond its exact top-{cache.k} (rule 'topk_tail'), which "
                                "axolotl has no field for; pass --drop-tail-draws to export the exact head only")
    if cache.selection is not None and cache.selection.weights is not None:
        raise InvalidInputError("the selection has per-sequence weights, which axolotl rows cannot carry; select "
                                "without --weight")


def _prepare_dir(out: Path, force: bool) -> tuple[Path, BuildLock]:
    """A locked, empty temporary directory next to ``out``; refuses an ``out`` that must not be replaced."""
    if out.exists():
        if not force:
            raise CacheExistsError(f"-o {out} exists; pass --force to replace an earlier export, or choose another "
                                   "directory")
        if not (out.is_dir() and (out / MARKER).is_file()):
            raise CacheExistsError(f"-o {out} is not a logitstore export (no {MARKER}); --force replaces only "
                                   "an export, so it is left alone")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-tmp"
    if tmp.exists() and not (tmp / LOCK_NAME).exists() and any(tmp.iterdir()):
        raise CacheExistsError(f"{tmp} exists and is not a temporary directory of an export in progress; "
                               "move it away and rerun")
    tmp.mkdir(exist_ok=True)
    lock = BuildLock(tmp)
    try:
        lock.acquire()  # a crashed export's lock is taken over, a live one refused
    except CacheLockedError:
        info = read_lock(tmp)
        raise CacheLockedError(f"-o {out}: another export is writing it ({info.describe() if info else tmp}); "
                               "wait for it to finish or stop it") from None
    for p in tmp.iterdir():  # what a crashed export left
        if p.name != LOCK_NAME:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return tmp, lock


def _commit(tmp: Path, out: Path, lock: BuildLock) -> None:
    """Rename ``tmp`` over ``out`` (an earlier export, if any, is moved aside first and then removed)."""
    old = out.parent / f".{out.name}.export-old"
    if old.exists() and (old / MARKER).is_file():
        shutil.rmtree(old)  # an earlier replacement that crashed half-way
    fsync_dir(tmp)
    if out.exists():
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old.exists() and not out.exists():
            os.rename(old, out)  # put the earlier export back
        raise
    lock.path = out / LOCK_NAME  # the lock file moved with its directory
    lock.release()
    fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old)


def axolotl_config(out: Path, info: dict) -> str:
    """The axolotl YAML that trains from the export ``out``."""
    norm = "false" if info["padded_entries"] else "true"
    return (f"plugins:\n  - axolotl.integrations.kd.KDPlugin\nkd_trainer: true\nkd_ce_alpha: 0.1\nkd_alpha: 0.9\n"
            f"kd_temperature: {info['temperature']:g}   # the export's --temperature\n"
            f"kd_normalize_topk: {norm}\nsequence_len: {max(info['max_tokens'], 1)}   # >= the longest row\n"
            f"datasets:\n  - path: {out.resolve()}\n    split: train\n    type:   # empty: pre-tokenized KD rows\n")


def export(source, out, *, to: str = "axolotl", force: bool = False, logprobs: str = "normalized",
           temperature: float = 1.0, drop_tail_draws: bool = False, progress: bool = False) -> dict:
    """Export ``source`` (a cache directory, a selection file or an open ``Cache``) into the directory ``out`` in
    the format of trainer ``to``; returns the export's description (also ``out/logitstore_export.json``)."""
    if to not in TARGETS:
        raise InvalidInputError(f"--to {to!r}: choose from {', '.join(TARGETS)}")
    cache = source if isinstance(source, Cache) else Cache(source)
    _check_exportable(cache, logprobs, float(temperature), drop_tail_draws)
    out = Path(out)
    k = min(int(cache.k), int(cache.manifest.vocab_size))
    tmp, lock = _prepare_dir(out, force)
    try:
        (tmp / "data").mkdir()
        bar = progress_bar(progress, desc="export", unit="seq", total=len(cache))
        parts, seq_ids, stats = [], [], {"tokens": 0, "targets": 0, "padded_entries": 0, "max_tokens": 0}
        for shard in range(cache.num_shards):
            writer = None
            for block in cache.iter_blocks([shard]):
                table = axolotl_rows(block, k=k, logprobs=logprobs, temperature=float(temperature))
                if writer is None:
                    parts.append(tmp / "data" / f"part-{len(parts):05d}.parquet")
                    writer = pq.ParquetWriter(parts[-1], table.schema, compression="zstd")
                writer.write_table(table)
                seq_ids.extend(block.scalars["seq_id"].tolist())
                n_tok = np.diff(block.token_offsets)
                target = block.loss_mask
                stats["tokens"] += int(n_tok.sum())
                stats["targets"] += int(target.sum())
                stats["padded_entries"] += int((k - np.minimum(block.n_entries, k))[target].sum())
                stats["max_tokens"] = max(stats["max_tokens"], int(n_tok.max(initial=0)))
                if bar is not None:
                    bar.update(len(block))
            if writer is not None:
                writer.close()
        if bar is not None:
            bar.close()
        files = []
        for i, p in enumerate(parts):
            files.append(f"data/train-{i:05d}-of-{len(parts):05d}.parquet")
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
            os.rename(p, tmp / files[-1])
        fsync_dir(tmp / "data")
        (tmp / "seq_ids.txt").write_text("".join(s + "\n" for s in seq_ids), encoding="utf-8")
        m = cache.manifest
        info = {"format": EXPORT_FORMAT, "version": 1, "to": to, "created_at": now(),
                "source": {"cache": str(cache.path.resolve()), "cache_fingerprint": cache_fingerprint(m),
                           "selection": cache.selection.query if cache.selection else None},
                "teacher": m.teacher, "tokenizer": m.tokenizer, "vocab_size": m.vocab_size, "rule": m.rule,
                "codec": m.codec, "logprob_error": cache.codec.logprob_error_text(), "k": k, "logprobs": logprobs,
                "temperature": float(temperature), "tail_draws_dropped": cache.rule.name == "topk_tail",
                "rows": len(seq_ids), **stats, "files": files}
        info["axolotl_config"] = axolotl_config(out, info)
        with open(tmp / MARKER, "w", encoding="utf-8") as f:  # written last: a directory with it is complete
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _commit(tmp, out, lock)
    except BaseException:
        lock.release()
        if tmp.exists():  # ours, half-written (a hard crash instead leaves its stale lock, taken over next time)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if stats["padded_entries"]:
        logger.warning("%d target entries are padding (positions with fewer than %d entries): train with "
                       "kd_normalize_topk: false", stats["padded_entries"], k)
    return info
