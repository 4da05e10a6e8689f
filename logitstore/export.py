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
train such an export with ``kd_normalize_topk: false`` or export a top-k cache. Caches of independent
draws (``--sample D`` without ``--systematic``) are refused (axolotl would read the draws as a top-k and lose
their weights, and no id is certain), so
are caches without logprobs (``--values none``) and weighted selections; a ``--tail-draws`` cache
exports its exact head with ``drop_tail_draws=True``. A ``--sample D --systematic`` cache (the build
default) exports its certain head: every id that systematic draws hit whatever their offset, ``D q_x >= 1``
(``p_x >= 1/D`` at proposal temperature 1), which is the exact top-m of the position for a varying m
(``logitstore.rules.certain_head``); the other draws, which only their estimator weights make unbiased, are left out.

Files: ``DIR/data/train-NNNNN-of-NNNNN.parquet`` (zstd; ``datasets.load_dataset(DIR)`` and axolotl's
``path: DIR`` read them as the ``train`` split), ``DIR/seq_ids.txt`` (the seq id of each row, in
order) and ``DIR/logitstore_export.json`` (what was exported, from what, with the axolotl config to
train it). The export is written into ``.DIR.export-tmp`` next to DIR (holding a build lock) and
renamed into place, so DIR is either absent, the previous export, or complete. An existing DIR is
refused unless ``force``, and ``force`` replaces only an export of ours, by ``logitstore.ownership``'s
rule: a ``logitstore_export.json`` whose ``format`` is ``"logitstore-export"``, and nothing in DIR that
an export does not write (such a file is named and DIR left alone); an empty DIR is taken as new.
Only an export's own files are ever deleted (here, in the temporary directory and in the
``.DIR.export-old`` that a replacement moves aside).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitstore.blocks import Block, with_certain_head
from logitstore.errors import CacheExistsError, CacheLockedError, InvalidInputError
from logitstore.lock import LOCK_NAME, BuildLock, read_lock
from logitstore.manifest import fsync_dir, now
from logitstore.ownership import describe_entries, refuse_file, rmdir_if_empty
from logitstore.progress import progress_bar
from logitstore.reader import Cache
from logitstore.rules import has_certain_head
from logitstore.selection import cache_fingerprint

logger = logging.getLogger(__name__)

TARGETS = ("axolotl",)
MARKER = "logitstore_export.json"
SEQ_IDS = "seq_ids.txt"
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


def _check_exportable(cache: Cache, logprobs: str, temperature: float, drop_tail_draws: bool,
                      allow_incomplete: bool) -> None:
    rule = cache.rule.name
    where = str(cache.path) if cache.selection is None else f"the selection's cache {cache.path}"
    if not cache.manifest.complete and not allow_incomplete:
        raise InvalidInputError(f"{where} is an unfinished build (complete: false in its manifest: still being "
                                f"built, or interrupted) holding only the {cache.manifest.sequences} sequences "
                                "committed so far; finish it with `logitstore build ... --resume`, or pass "
                                "--allow-incomplete to export what is committed")
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
    if rule == "sample" and not has_certain_head(cache.rule):
        raise InvalidInputError(f"{where} holds sampled entries (rule 'sample') of independent draws (or capped at "
                                "k < D): axolotl reads target_token_ids as a top-k and would drop the weights that "
                                "make the draws unbiased, and no id is drawn with certainty; export a top-k or mass "
                                "cache, or a --sample D --systematic one (train sampled caches with logitstore train)")
    if rule == "topk_tail" and not drop_tail_draws:
        raise InvalidInputError(f"{where} holds tail draws beyond its exact top-{cache.k} (rule 'topk_tail'), which "
                                "axolotl has no field for; pass --drop-tail-draws to export the exact head only")
    if cache.selection is not None and cache.selection.weights is not None:
        raise InvalidInputError("the selection has per-sequence weights, which axolotl rows cannot carry; select "
                                "without --weight")


_DATA_FILE = re.compile(r"^(part-\d{5,}|train-\d{5,}-of-\d{5,})\.parquet$")  # DIR/data/, in progress or final
_OWN_FILES = (MARKER, SEQ_IDS, LOCK_NAME)  # what an export writes at the top of DIR (the lock while it runs)


def is_our_marker(path: Path) -> bool:
    """``path`` is an export's ``logitstore_export.json``: a JSON object whose ``format`` is ``"logitstore-export"``
    (a damaged one with that name in it counts as ours, as ``ownership.is_our_manifest`` does for manifests)."""
    try:
        head = path.read_bytes()[:1 << 20]
    except OSError:
        return False
    if f'"{EXPORT_FORMAT}"'.encode() not in head:
        return False
    try:
        d = json.loads(head)
    except (RecursionError, ValueError):
        return True
    return isinstance(d, dict) and d.get("format") == EXPORT_FORMAT


def foreign_entries(d: Path) -> list[str]:
    """The entries of ``d`` (an export or its temporary directory) that an export does not write."""
    out = []
    for p in d.iterdir():
        if p.name == "data" and p.is_dir():
            out += [f"data/{q.name}" for q in p.iterdir() if not (q.is_file() and _DATA_FILE.match(q.name))]
        elif not (p.is_file() and p.name in _OWN_FILES):
            out.append(p.name)
    return out


def remove_own_files(d: Path, *, keep_lock: bool = False) -> None:
    """Delete what an export writes in ``d`` (its data files, ``seq_ids.txt``, the marker; the lock unless
    ``keep_lock``), then ``data/`` and ``d`` if left empty; anything else stays (``logitstore.ownership``)."""
    data = d / "data"
    if data.is_dir():
        for q in data.iterdir():
            if q.is_file() and _DATA_FILE.match(q.name):
                q.unlink()
        rmdir_if_empty(data)
    for name in _OWN_FILES:
        if not (keep_lock and name == LOCK_NAME) and (d / name).is_file():
            (d / name).unlink()
    if not keep_lock:
        rmdir_if_empty(d)


def _is_export(d: Path) -> bool:
    return d.is_dir() and is_our_marker(d / MARKER) and not foreign_entries(d)


def _check_out(out: Path, force: bool) -> None:
    """Refuse an ``out`` that must not be replaced: any existing one without ``force``; with it, one that is not
    an export of ours (an empty directory excepted) or that holds files an export does not write."""
    refuse_file(out, "an export")
    if not out.exists():
        return
    if not force:
        raise CacheExistsError(f"-o {out} exists; pass --force to replace an earlier export, or choose another "
                               "directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not is_our_marker(out / MARKER):
        raise CacheExistsError(f"-o {out} is not a logitstore export (no {MARKER} of ours; it holds "
                               f"{describe_entries(entries)}); --force replaces only an export, so it is left alone")
    foreign = foreign_entries(out)
    if foreign:
        raise CacheExistsError(f"-o {out} is an earlier export but also holds {describe_entries(foreign)}, which "
                               "logitstore did not write; --force deletes only an export's own files: move those "
                               "out and rerun")


def _prepare_dir(out: Path, force: bool) -> tuple[Path, BuildLock]:
    """A locked, empty temporary directory next to ``out``; refuses an ``out`` that must not be replaced."""
    _check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-tmp"
    if tmp.exists() and not tmp.is_dir():
        raise CacheExistsError(f"{tmp} is a file, not an export's temporary directory; move it away and rerun")
    if tmp.exists() and any(tmp.iterdir()) and read_lock(tmp) is None:
        raise CacheExistsError(f"{tmp} exists and is not a temporary directory of an export in progress; "
                               "move it away and rerun")
    created = not tmp.exists()
    tmp.mkdir(exist_ok=True)
    lock = BuildLock(tmp, holder="export")
    try:
        lock.acquire()  # a crashed export's lock is taken over, a live one refused
    except CacheLockedError:
        info = read_lock(tmp)
        raise CacheLockedError(f"-o {out}: another export is writing it ({info.describe() if info else tmp}); "
                               "wait for it to finish or stop it") from None
    try:
        foreign = foreign_entries(tmp)
        if foreign:
            raise CacheExistsError(f"{tmp} holds {describe_entries(foreign)}, which no export writes; move it "
                                   "away and rerun")
        old = _old(out)
        if old.exists() and not _is_export(old):
            raise CacheExistsError(f"{old} exists and is not an earlier export of logitstore's; move it away and "
                                   "rerun")
        remove_own_files(tmp, keep_lock=True)  # what a crashed export left
        if old.exists():
            remove_own_files(old)  # an earlier replacement that crashed half-way
    except BaseException:
        lock.release()
        if created:
            rmdir_if_empty(tmp)
        raise
    return tmp, lock


def _old(out: Path) -> Path:
    return out.parent / f".{out.name}.export-old"


def _commit(tmp: Path, out: Path, lock: BuildLock) -> None:
    """Rename ``tmp`` over ``out`` (an earlier export, if any, is moved aside first and then its files removed)."""
    old = _old(out)
    fsync_dir(tmp)
    replaced = out.exists()
    if replaced:
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if replaced and old.exists() and not out.exists():
            os.rename(old, out)  # put the earlier export back
        raise
    lock.path = out / LOCK_NAME  # the lock file moved with its directory
    lock.release()
    fsync_dir(out.parent)
    if replaced:
        remove_own_files(old)
        if old.exists():
            logger.warning("%s: files that appeared in the earlier export while it was replaced are left there", old)


def axolotl_config(out: Path, info: dict) -> str:
    """The axolotl YAML that trains from the export ``out``."""
    norm = "false" if info["padded_entries"] else "true"
    return (f"plugins:\n  - axolotl.integrations.kd.KDPlugin\nkd_trainer: true\nkd_ce_alpha: 0.1\nkd_alpha: 0.9\n"
            f"kd_temperature: {info['temperature']:g}   # the export's --temperature\n"
            f"kd_normalize_topk: {norm}\nsequence_len: {max(info['max_tokens'], 1)}   # >= the longest row\n"
            f"datasets:\n  - path: {out.resolve()}\n    split: train\n    type:   # empty: pre-tokenized KD rows\n")


def export(source, out, *, to: str = "axolotl", force: bool = False, logprobs: str = "normalized",
           temperature: float = 1.0, drop_tail_draws: bool = False, allow_incomplete: bool = False,
           progress: bool = False) -> dict:
    """Export ``source`` (a cache directory, a selection file or an open ``Cache``) into the directory ``out`` in
    the format of trainer ``to``; returns the export's description (also ``out/logitstore_export.json``)."""
    if to not in TARGETS:
        raise InvalidInputError(f"--to {to!r}: choose from {', '.join(TARGETS)}")
    cache = source if isinstance(source, Cache) else Cache(source)
    _check_exportable(cache, logprobs, float(temperature), drop_tail_draws, allow_incomplete)
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
                if cache.rule.name == "sample":  # a systematic sampled cache: its certain head
                    block = with_certain_head(block, cache.rule)
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
        (tmp / SEQ_IDS).write_text("".join(s + "\n" for s in seq_ids), encoding="utf-8")
        m = cache.manifest
        info = {"format": EXPORT_FORMAT, "version": 1, "to": to, "created_at": now(),
                "source": {"cache": str(cache.path.resolve()), "cache_fingerprint": cache_fingerprint(m),
                           "selection": cache.selection.query if cache.selection else None,
                           "complete": bool(m.complete)},
                "teacher": m.teacher, "tokenizer": m.tokenizer, "vocab_size": m.vocab_size, "rule": m.rule,
                "codec": m.codec, "logprob_error": cache.codec.logprob_error_text(), "k": k, "logprobs": logprobs,
                "temperature": float(temperature), "tail_draws_dropped": cache.rule.name in ("topk_tail", "sample"),
                "head": ("p >= 1/D: the ids the draws hit with certainty" if cache.rule.name == "sample" else
                         f"the exact top {k}"),
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
            remove_own_files(tmp)
        raise
    if stats["padded_entries"]:
        logger.warning("%d target entries are padding (positions with fewer than %d entries): train with "
                       "kd_normalize_topk: false", stats["padded_entries"], k)
    return info
