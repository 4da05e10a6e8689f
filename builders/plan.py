"""What a build scores, in which groups: the sequences of the input, their windows and token-budget batches.

``sequences_to_score`` reads and tokenises the records (``builders.data``) or, in generation
mode, samples responses to their prompts (``builders.generate``; from the teacher, or from a
``sampler`` such as the policy of ``--responses-from``), as ``Item``s in input order. ``Plan``
cuts that stream into windows of ``window`` items, drops duplicates (the same seq id twice) and
what a resumed cache already holds; window ``i`` is the same for every
backend and for one process or many (``builders.ray_build``), and its rule-sample draws use
``window_seed(seed, i)``. ``batches`` sorts a window by length and cuts it into batches under
the token budget (little padding). ``positions_of`` says which positions of a sequence are cached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from builders.config import BuildConfig
from builders.data import Example, SkipReport, load_examples
from builders.generate import load_prompts, sampled_examples
from logitstore.progress import progress_bar
from logitstore.writer import default_seq_id


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


def windows(it: Iterable[Item], size: int) -> Iterator[list[Item]]:
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
        for index, window in enumerate(windows(items, size)):
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


def sequences_to_score(backend, data: Path, config: BuildConfig, report: SkipReport, *,
                       committed_records: dict[int, int] | None = None, progress: bool = False, sampler=None,
                       timings: dict[str, float] | None = None) -> Iterator[Item]:
    """The sequences to score, in input order: the records themselves, or (generation mode) samples of their
    prompts, from ``sampler`` (default: the teacher ``backend``). ``backend`` needs a ``tokenizer`` (and the sampler
    ``generate``); ``committed_records`` (record -> samples already in the cache) spares resampling finished
    prompts; ``timings["generate"]`` (when given) accumulates the seconds spent sampling."""
    if config.generation is None:
        for ex in load_examples(data, backend.tokenizer, fields=config.fields, max_length=config.max_length,
                                on_long=config.on_long, on_bad=config.on_bad, report=report):
            yield Item(ex)
        return
    prompts = load_prompts(data, backend.tokenizer, fields=config.fields, on_bad=config.on_bad, report=report)
    bar = progress_bar(progress, unit="prompt", desc="generating")  # sampling comes before any scoring
    last = None
    for ex, j, verdict in sampled_examples(backend if sampler is None else sampler, prompts, config.generation,
                                           seed=config.seed, skip=committed_records or {},
                                           max_length=config.max_length, report=report, timings=timings):
        if bar is not None and ex.record != last:
            bar.update(1)
            last = ex.record
        yield Item(ex, j, verdict)
    if bar is not None:
        bar.close()
