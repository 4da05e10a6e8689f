"""The build driver: data + teacher backend -> cache. One driver for every backend.

Reads and tokenises records (``builders.data``), or in generation mode samples the
teacher's responses to their prompts (``builders.generate``), takes them in windows, sorts each
window by length and cuts it into batches under a token budget (little padding),
asks the backend for the sparse distributions of the target positions, and writes
them through ``logitstore.CacheWriter``, with a progress bar in positions/s.
Everything needed to reproduce the build goes into the manifest. ``resume=True``
keeps the committed shards, skips the sequences they hold and redoes the rest; a
resume with a different teacher, tokenizer, rule, codec or data is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

import logitstore
from builders.backends import get_backend
from builders.data import Example, Fields, SkipReport, data_fingerprint, load_examples
from builders.generate import GenerationConfig, load_prompts, sampled_examples
from logitstore.codec import Codec
from logitstore.errors import InvalidInputError
from logitstore.lock import check_unlocked
from logitstore.parts import PARTS_DIR
from logitstore.rules import Rule
from logitstore.writer import default_seq_id

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildConfig:
    """Everything a build depends on besides the teacher and the data. Field docs become --help."""

    rule: Rule
    codec: Codec = dataclasses.field(default_factory=Codec)
    backend: str = "transformers"
    backend_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    fields: Fields = dataclasses.field(default_factory=Fields)
    max_length: int | None = None
    on_long: str = "truncate"
    on_bad: str = "error"
    token_budget: int = 8192
    """max padded tokens per teacher batch (batch size x longest sequence)"""
    window: int = 4096
    """records sorted by length together (bigger: less padding, more memory)"""
    cache_prompt: bool = False
    """also cache the non-target positions (prompt tokens), with loss_mask false"""
    generation: GenerationConfig | None = None
    """sample responses from the teacher instead of scoring the given text (generation mode)"""
    shard_mb: float = 256
    """shard size limit in MiB"""
    row_group_positions: int = 65536
    """positions per Parquet row group (the unit of reading, shuffling and shard rotation)"""
    seed: int = 0


@dataclasses.dataclass
class Item:
    """One sequence to score: an example, its sample index and its verdict (generation mode)."""

    ex: Example
    sample: int = 0
    correct: bool | None = None

    @property
    def seq_id(self) -> str:
        return default_seq_id(self.ex.input_ids, self.sample)


def batches(items: list[Item], token_budget: int) -> Iterator[list[Item]]:
    """Length-sorted batches whose padded size (count x longest) stays within ``token_budget``."""
    batch: list[Item] = []
    longest = 0
    for ex in sorted(items, key=lambda it: len(it.ex.input_ids)):
        n = len(ex.ex.input_ids)
        if batch and max(longest, n) * (len(batch) + 1) > token_budget:
            yield batch
            batch, longest = [], 0
        batch.append(ex)
        longest = max(longest, n)
    if batch:
        yield batch


def _windows(it: Iterable[Item], size: int) -> Iterator[list[Item]]:
    buf: list[Item] = []
    for ex in it:
        buf.append(ex)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def positions_of(ex: Example, cache_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """The positions to cache and their loss mask."""
    T = len(ex.input_ids)
    if cache_prompt:
        pos = np.arange(1, T, dtype=np.int32)
    else:
        pos = np.flatnonzero(ex.loss_mask[1:]).astype(np.int32) + 1
    return pos, ex.loss_mask[pos]


class Plan:
    """The item stream cut into windows, without duplicates and without already committed sequences.

    Duplicates (records with the same tokens: the same seq_id) are counted over the whole pass over
    the data, and never scored twice; a resume passes over all of it again, so the count does not
    depend on where a crash happened. (In generation mode a resume does not resample prompts whose
    samples are all committed, so duplicates among those are not recounted; samples carry their index
    in the seq_id, so such duplicates need two records with the same prompt and the same sampled answer.)
    Window ``i`` is the same for every backend and for one process or many (``builders.ray_build``).
    """

    def __init__(self, committed: set[str]):
        self.committed = committed
        self.seen: set[str] = set()
        self.duplicates = 0

    def windows(self, items: Iterable[Item], size: int) -> Iterator[tuple[int, list[Item], list[Item]]]:
        """(window index, the window's items, those still to score), for every window."""
        for index, window in enumerate(_windows(items, size)):
            todo = []
            for it in window:
                sid = it.seq_id
                if sid in self.seen:
                    self.duplicates += 1
                    continue
                self.seen.add(sid)
                if sid not in self.committed:
                    todo.append(it)
            yield index, window, todo


def window_seed(seed: int, index: int) -> int:
    """The seed of window ``index``'s draws (rule sample): one process or many draw the same."""
    return (seed * 1_000_003 + index) % (2**63)


def score_items(backend, writer, todo: list[Item], config: BuildConfig, gen,
                on_batch: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Score ``todo`` in token-budget batches and add each sequence to ``writer``; (sequences, positions).
    ``on_batch(sequences, positions)`` follows each batch (progress)."""
    n_seqs = n_pos = 0
    for batch in batches(todo, config.token_budget):
        pos_mask = [positions_of(it.ex, config.cache_prompt) for it in batch]
        scored = backend.score([it.ex.input_ids for it in batch], [p for p, _ in pos_mask], config.rule, gen)
        for it, (pos, mask), s in zip(batch, pos_mask, scored):
            writer.add(input_ids=it.ex.input_ids, positions=pos, loss_mask=mask, ids=s.ids,
                       logprobs=s.logprobs, n_entries=s.n_entries, counts=s.counts,
                       label_logprob=s.label_logprob, entropy=s.entropy, tail_mass=s.tail_mass,
                       argmax=s.argmax, record=it.ex.record, sample=it.sample, correct=it.correct)
        positions = sum(len(p) for p, _ in pos_mask)
        n_seqs, n_pos = n_seqs + len(batch), n_pos + positions
        if on_batch is not None:
            on_batch(len(batch), positions)
    return n_seqs, n_pos


def make_build_args(teacher: str, data: Path, data_fp: str, config: BuildConfig, backend_options: dict,
                    argv: list[str] | None) -> dict[str, Any]:
    """The manifest's ``build`` record: everything needed to reproduce the build."""
    return {
        "teacher": teacher, "data": str(data), "data_fingerprint": data_fp, "backend": config.backend,
        "backend_options": backend_options,
        "fields": dataclasses.asdict(config.fields), "max_length": config.max_length, "on_long": config.on_long,
        "on_bad": config.on_bad, "token_budget": config.token_budget, "window": config.window,
        "cache_prompt": config.cache_prompt, "seed": config.seed, "argv": argv, "skipped": None,
        "generation": dataclasses.asdict(config.generation) if config.generation else None,
    }


def open_writer(backend, out: Path, config: BuildConfig, build_args: dict, resume: bool,
                **kwargs) -> logitstore.CacheWriter:
    """The cache writer of a build (not yet opened): ``out``, with the backend's identity and exactness."""
    return logitstore.CacheWriter(
        out, vocab_size=backend.vocab_size, rule=config.rule, codec=config.codec, teacher=backend.describe(),
        tokenizer=backend.tokenizer_record(), build=build_args, exactness=backend.exactness,
        shard_bytes=max(1, int(config.shard_mb * 2**20)), row_group_positions=config.row_group_positions,
        resume=resume, resume_build_keys=RESUME_BUILD_KEYS, **kwargs)


#: build arguments a resume must match (the writer also checks teacher, tokenizer, rule and codec)
RESUME_BUILD_KEYS = ("data_fingerprint", "fields", "max_length", "on_long", "cache_prompt", "generation", "seed")


def build(teacher: str, data: str | os.PathLike, out: str | os.PathLike, config: BuildConfig, *,
          resume: bool = False, progress: bool = True, argv: list[str] | None = None) -> logitstore.manifest.Manifest:
    """Build (or, with ``resume``, continue) the cache ``out`` from ``data`` scored by ``teacher``."""
    import torch

    out, data = Path(out), Path(data)
    if config.token_budget < 2:
        raise InvalidInputError(f"token_budget={config.token_budget} must be at least 2")
    data_fp = data_fingerprint(data)  # also: a missing data path fails here, before the teacher loads
    check_unlocked(out)  # a build already writing ``out`` is named now, not after loading the teacher
    if (out / PARTS_DIR).exists():
        raise InvalidInputError(f"{out} holds the parts of a distributed build (--ray); continue it with --ray "
                                "--resume, or choose a new output path")
    backend = get_backend(config.backend)(teacher, **config.backend_options)
    report = SkipReport()
    build_args = make_build_args(teacher, data, data_fp, config, {**config.backend_options, **backend.options()},
                                 argv)
    gen = torch.Generator().manual_seed(config.seed)
    # a failed first build that committed nothing leaves nothing behind: the writer removes the directory it
    # created, under its lock (so never the directory of another build that started meanwhile)
    return _run(backend, data, out, config, build_args, report, gen, resume, progress)


def _run(backend, data: Path, out: Path, config: BuildConfig, build_args: dict, report: SkipReport, gen,
         resume: bool, progress: bool):
    bar = _progress_bar(progress)
    t0, done_positions, done_seqs = time.time(), 0, 0

    def on_batch(seqs: int, positions: int) -> None:
        nonlocal done_seqs, done_positions
        done_seqs, done_positions = done_seqs + seqs, done_positions + positions
        if bar is not None:
            bar.update(positions)
            bar.set_postfix(seqs=done_seqs, refresh=False)

    with open_writer(backend, out, config, build_args, resume) as writer:
        items = _items(backend, data, config, report, writer, out if resume else None, progress)
        plan = Plan(writer.committed_ids)
        for index, _, todo in plan.windows(items, config.window):
            gen.manual_seed(window_seed(config.seed, index))
            score_items(backend, writer, todo, config, gen, on_batch)
        writer.manifest.duplicates_skipped = plan.duplicates
        writer.manifest.build["skipped"] = report.to_dict()
        writer.manifest.build["elapsed_s"] = round(time.time() - t0, 1)
    if bar is not None:
        bar.close()
    logger.info("built %s: %d sequences, %d positions in %.1f s", out, done_seqs, done_positions, time.time() - t0)
    return writer.manifest


def _items(backend, data: Path, config: BuildConfig, report: SkipReport, writer, resumed: Path | None,
           progress: bool = False) -> Iterator[Item]:
    """The sequences to score: the records themselves, or (generation mode) the teacher's samples."""
    if config.generation is None:
        for ex in load_examples(data, backend.tokenizer, fields=config.fields, max_length=config.max_length,
                                on_long=config.on_long, on_bad=config.on_bad, report=report):
            yield Item(ex)
        return
    done: dict[int, int] = {}
    if resumed is not None and writer.manifest.shards:  # prompts whose samples are all committed are not resampled
        for rec in logitstore.open(resumed).scalars(["record"]).column(0).to_pylist():
            done[rec] = done.get(rec, 0) + 1
    prompts = load_prompts(data, backend.tokenizer, fields=config.fields, on_bad=config.on_bad, report=report)
    bar = _progress_bar(progress, unit="prompt", desc="generating")  # sampling comes before any scoring
    last = None
    for ex, j, verdict in sampled_examples(backend, prompts, config.generation, seed=config.seed, skip=done,
                                           max_length=config.max_length, report=report):
        if bar is not None and ex.record != last:
            bar.update(1)
            last = ex.record
        yield Item(ex, j, verdict)
    if bar is not None:
        bar.close()


def _progress_bar(enabled: bool, unit: str = "pos", desc: str = "scoring"):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=unit, unit_scale=unit == "pos", desc=desc, file=sys.stderr, dynamic_ncols=True,
                disable=None)  # None: off when stderr is not a terminal
