"""Streaming batches of cached teacher distributions for training a student.

``StreamingLoader(cache, batch_size=...)`` turns a cache (or a selection of one) into
an endless (or ``epochs``-long) stream of collated torch batches, the same on every run
for the same seed, split across DDP ranks and DataLoader workers, and resumable from a
one-line state.

Plan (metadata only). At construction the ``seq_id`` and ``n_tokens`` columns of every
shard are read once, never the list columns. For epoch ``e`` the global order is a
permutation of the row groups drawn from ``default_rng([seed, e])`` (storage order with
``shuffle=False``), each row group's selected rows in storage order. That flat list is
cut into ``world_size * W`` contiguous parts (``W = max(1, num_workers)``, part index
``rank * W + worker``) whose sizes differ by at most one, so each sequence is read once
per epoch across all ranks and a rank reads mostly its own row groups. Within a part,
consecutive windows of ``buffer_size`` sequences are shuffled (``default_rng([seed, e,
part])``). Batches are then ``batch_size`` consecutive sequences, or with ``pack`` rows
of at most ``max_length`` tokens filled greedily (a sequence that does not fit starts a
new row), ``batch_size`` rows per batch. Every part runs its own epochs back to back, so
ranks never wait for each other at an epoch end. ``epoch_plan`` returns this plan.

Reading. A part decodes one shuffle window at a time: the window's row groups are read,
only the needed rows taken and decoded together by ``Cache.decode``; a batch that
straddles two windows holds both, and a row group that the next window needs again is
kept, so a part reads each row group once per epoch. Sequences longer than
``max_length`` are truncated (cached positions ``>= max_length`` dropped), counted and
logged once.

Resume. The loader is one stream: iterating it again continues after the batches
already handed out. ``state_dict()`` holds their number plus the settings. With
workers, ``torch.utils.data.DataLoader`` hands batches out round-robin over its workers,
skipping a worker once it is exhausted; ``load_state_dict`` replays that rule on the
per-part batch counts (known from metadata) to find how many batches each part already
gave, skips them without decoding, and rotates the workers so the next batch comes from
the part whose turn it was. The remaining stream is exactly the uninterrupted one.

Collation: ``trainers.collate.collate`` lays out each batch (the keys and their layout are listed
there): ``input_ids``, ``attention_mask``, ``position_ids``, ``segment_ids``, ``target_mask``,
``labels``, the teacher entries and scalars, ``weight``, ``correct``, ``pos``, ``score_<name>``,
plus ``seq_ids`` and ``epoch``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from logitstore.errors import InvalidInputError
from logitstore.reader import Block, Cache
from logitstore.scores import load_scores
from trainers.collate import CacheKind, collate, pack_rows, ranges

logger = logging.getLogger(__name__)

# Settings a resumed loader must share with the one whose state it loads.
#: a remote cache: how many of the next window's shards are downloaded while the current window is decoded
PREFETCH_SHARDS = 2
_RESUME_KEYS = ("seed", "world_size", "num_workers", "batch_size", "max_length", "pack", "shuffle", "buffer_size",
                "epochs", "sequences")


@dataclasses.dataclass
class _Plan:
    """One part's epoch: sequence indices in order, batch boundaries into them, and each one's row/offset."""

    order: np.ndarray  # [n] indices into the metadata arrays
    bounds: np.ndarray  # [batches + 1]
    row: np.ndarray  # [n] row within its batch
    offset: np.ndarray  # [n] first token column in its row


class SequenceSource:
    """The metadata of a cache's (selected) sequences, the plan over them, and their decoding (the loader's seam,
    shared with its DataLoader workers and with ``trainers.hf``).

    Per sequence, in storage order (index ``i`` below): ``seq_ids``, ``n_tokens``, ``length`` (tokens kept
    under ``max_length``), ``weight`` (a selection's weight, else 1) and ``group`` (its row group, an index into
    ``groups``, the ``(shard, row_group)`` pairs; row group ``g`` holds the sequences ``gstart[g]`` to
    ``gstart[g] + gcount[g] - 1``). ``plan(epoch, part, parts).order`` is a part's epoch order (the module
    docstring), ``decode(indices)`` decodes sequences, ``collate`` makes a batch of a plan, ``with_settings``
    gives the same metadata under another seed or shuffle.
    """

    def __init__(self, cache: Cache, cfg: dict[str, Any]):
        self.cache, self.cfg, self.scores, self.score_names = cache, cfg, {}, []
        # workers open their own Cache; a loaded selection's cache path may be relative to its file
        self.reopen = cache.source
        self.kind = CacheKind.of(cache)
        keep = None if cache.selection is None else pa.array(sorted(set(cache.selection.seq_ids)), pa.string())
        ids, ntok, rows, self.groups = [], [], [], []
        for s in range(cache.num_shards):  # the seq_id and n_tokens columns only
            t = cache.read(s, None, ["seq_id", "n_tokens"], restrict=False)
            mask = np.ones(len(t), bool) if keep is None else \
                pc.is_in(t.column("seq_id"), value_set=keep).to_numpy(zero_copy_only=False)
            start = 0
            for rg, n in enumerate(cache.row_group_rows(s)):
                rows.append(np.flatnonzero(mask[start:start + n]))
                self.groups.append((s, rg))
                start += n
            ids.append(t.column("seq_id").to_numpy(zero_copy_only=False)[mask])
            ntok.append(t.column("n_tokens").to_numpy()[mask])
        cat = lambda a, d: np.concatenate(a).astype(d) if a else np.zeros(0, d)  # noqa: E731
        self.seq_ids, self.n_tokens, self.row = cat(ids, object), cat(ntok, np.int64), cat(rows, np.int64)
        self.gcount = np.array([r.size for r in rows], np.int64)  # selected rows per row group
        self.gstart = np.cumsum(self.gcount) - self.gcount
        self.group = np.repeat(np.arange(len(self.groups)), self.gcount)  # row group of each sequence
        ml = cfg["max_length"]
        self.length = self.n_tokens if ml is None else np.minimum(self.n_tokens, ml)
        wm = cache.weights
        self.weight = np.ones(len(self), np.float32) if wm is None else \
            np.array([wm[s] for s in self.seq_ids], np.float32)
        self.digest = hashlib.blake2b("\n".join(self.seq_ids).encode(), digest_size=8).hexdigest()
        self._plans: dict[tuple, _Plan] = {}

    def __len__(self) -> int:
        return self.seq_ids.size

    def __getstate__(self):  # a worker started by spawn reopens the cache rather than pickling file handles
        return {**self.__dict__, "cache": None, "_plans": {}}

    def open_again(self) -> None:
        """Fresh file handles (called in each DataLoader worker)."""
        self.cache = Cache(self.reopen)

    def with_settings(self, **changes: Any) -> SequenceSource:
        """This source (the same metadata, nothing re-read) with some plan settings changed (``seed``, ``shuffle``,
        ``buffer_size``, ``batch_size``, ``pack``)."""
        bad = sorted(set(changes) - {"seed", "shuffle", "buffer_size", "batch_size", "pack"})
        if bad:
            raise InvalidInputError(f"with_settings: {bad} cannot change; seed, shuffle, buffer_size, batch_size "
                                    "and pack can")
        other = copy.copy(self)
        other.cfg, other._plans = {**self.cfg, **changes}, {}
        return other

    # ------------------------------------------------------------ plan (metadata only)
    def plan(self, epoch: int, part: int, parts: int) -> _Plan:
        key = (epoch, part, parts)
        if key not in self._plans:
            if len(self._plans) > 8:
                self._plans.clear()
            self._plans[key] = self._make_plan(epoch, part, parts)
        return self._plans[key]

    def _make_plan(self, epoch: int, part: int, parts: int) -> _Plan:
        c = self.cfg
        g = np.random.default_rng([c["seed"], epoch]).permutation(len(self.groups)) if c["shuffle"] \
            else np.arange(len(self.groups))
        order = ranges(self.gstart[g], self.gcount[g])[0]
        cut = np.arange(parts + 1) * order.size // parts
        order = order[cut[part]:cut[part + 1]].copy()
        if c["shuffle"]:
            rng, buf = np.random.default_rng([c["seed"], epoch, part]), c["buffer_size"]
            for a in range(0, order.size, buf):
                order[a:a + buf] = order[a:a + buf][rng.permutation(min(buf, order.size - a))]
        B, n = c["batch_size"], order.size
        if not c["pack"]:
            i = np.arange(n)
            return _Plan(order, np.r_[np.arange(0, n, B), n], i % B, np.zeros(n, np.int64))
        row, off = pack_rows(self.length[order], c["max_length"])
        starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]] & (row % B == 0)) if n else np.zeros(0, np.int64)
        return _Plan(order, np.r_[starts, n], row % B, off)

    # ------------------------------------------------------------ reading
    def decode(self, order: np.ndarray, after: np.ndarray | None = None,
               tables: dict | None = None) -> tuple[Block, np.ndarray]:
        """Decode the sequences ``order`` (indices; the loader's window) at once; returns the block and each one's
        row in it. ``tables`` keeps the raw row groups that the next window (``after``) reads again."""
        after = np.zeros(0, np.int64) if after is None else after
        tables = {} if tables is None else tables
        if after.size:  # a remote cache downloads the next window's first shards meanwhile (no-op when local)
            nxt = dict.fromkeys(self.groups[g][0] for g in np.unique(self.group[after]).tolist())
            self.cache.prefetch(list(nxt)[:PREFETCH_SHARDS])
        srt = np.argsort(order, kind="stable")  # metadata order is storage order: (shard, row group, row)
        idx = order[srt]
        gs, first = np.unique(self.group[idx], return_index=True)
        parts, new = [], {}
        for g, a, b in zip(gs.tolist(), first, np.r_[first[1:], idx.size]):
            t = new[g] = tables[g] if g in tables else self.cache.read(*self.groups[g], restrict=False)
            parts.append(t.take(pa.array(self.row[idx[a:b]])))
        again = set(self.group[after].tolist())
        tables.clear()
        tables.update({g: t for g, t in new.items() if g in again})  # a row group that straddles two windows
        block = self.cache.decode(pa.concat_tables(parts))
        assert (block.scalars["seq_id"] == self.seq_ids[idx]).all()
        where = np.empty(idx.size, np.int64)
        where[srt] = np.arange(idx.size)
        return block, where

    def batches(self, part: int, parts: int, skip: int) -> Iterator[dict]:
        """Part ``part``'s batches, epoch after epoch, after skipping ``skip`` of them (metadata only)."""
        epochs, buf, epoch = self.cfg["epochs"], self.cfg["buffer_size"], 0
        while epochs is None or epoch < epochs:
            p = self.plan(epoch, part, parts)
            nb = p.bounds.size - 1
            if nb == 0:
                return  # an empty part stays empty in every epoch
            if skip >= nb:
                skip, epoch = skip - nb, epoch + 1
                continue
            windows: dict[int, tuple[Block, np.ndarray]] = {}
            tables: dict = {}
            for bi in range(skip, nb):
                a, b = int(p.bounds[bi]), int(p.bounds[bi + 1])
                for w in [w for w in windows if w < a // buf]:
                    del windows[w]
                for w in range(a // buf, (b - 1) // buf + 1):
                    if w not in windows:
                        windows[w] = self.decode(p.order[w * buf:(w + 1) * buf],
                                                  p.order[(w + 1) * buf:(w + 2) * buf], tables)
                yield self.collate(p, a, b, windows, epoch)
            skip, epoch = 0, epoch + 1

    # ------------------------------------------------------------ collation
    def collate(self, p: _Plan, a: int, b: int, windows: dict, epoch: int) -> dict:
        """The batch of plan entries ``[a, b)``, from the decoded windows that hold them."""
        seq, buf, idx = p.order[a:b], self.cfg["buffer_size"], np.arange(a, b)
        pieces = []
        for w in range(a // buf, (b - 1) // buf + 1):
            blk, where = windows[w]
            inw = (idx // buf) == w
            pieces.append((blk, np.flatnonzero(inw), where[idx[inw] - w * buf]))
        return collate(pieces, kind=self.kind, seq_ids=self.seq_ids[seq].tolist(), length=self.length[seq],
                       row=p.row[a:b], offset=p.offset[a:b], weight=self.weight[seq], epoch=epoch,
                       scores=self.scores, score_names=self.score_names)


def _identity(batch):
    return batch


class _Parts(torch.utils.data.IterableDataset):
    """One rank's parts; DataLoader worker slot ``s`` runs part worker ``(s + shift) % W``."""

    def __init__(self, src: SequenceSource, rank: int, world_size: int, W: int, skips: list[int], shift: int):
        super().__init__()
        self.src, self.rank, self.parts, self.W, self.skips, self.shift = src, rank, world_size * W, W, skips, shift

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None:
            self.src.open_again()
        w = ((0 if info is None else info.id) + self.shift) % self.W
        return self.src.batches(self.rank * self.W + w, self.parts, self.skips[w])


class StreamingLoader:
    """Collated training batches from a cache; see the module docstring for the plan and the batch keys."""

    def __init__(self, cache, *, batch_size: int, max_length: int | None = None, seed: int = 0, shuffle: bool = True,
                 buffer_size: int = 1024, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 0, epochs: int | None = None, pack: bool = False, scores=None,
                 score_columns=()):
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size = (torch.distributed.get_world_size() if dist else 1) if world_size is None else world_size
        rank = (torch.distributed.get_rank() if dist else 0) if rank is None else rank
        for name, v, lo in (("batch_size", batch_size, 1), ("buffer_size", buffer_size, 1), ("seed", seed, 0),
                            ("world_size", world_size, 1), ("num_workers", num_workers, 0),
                            ("max_length", max_length, 1), ("epochs", epochs, 0)):
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo):
                raise InvalidInputError(f"{name}={v!r}: must be an integer >= {lo}"
                                        + (" or None" if name in ("max_length", "epochs") else ""))
        if not (isinstance(rank, (int, np.integer)) and 0 <= rank < world_size):
            raise InvalidInputError(f"rank={rank!r}: must be an integer in [0, world_size={world_size})")
        if pack and max_length is None:
            raise InvalidInputError("pack=True needs max_length (the length of a packed row)")
        score_columns = (score_columns,) if isinstance(score_columns, str) else tuple(score_columns)
        if score_columns and scores is None:
            raise InvalidInputError(f"score_columns={list(score_columns)} given without scores=SCORES_DIR")
        cache = cache if isinstance(cache, Cache) else Cache(cache)
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), int(num_workers)
        opt = lambda v: None if v is None else int(v)  # noqa: E731
        self._cfg = dict(batch_size=int(batch_size), max_length=opt(max_length), seed=int(seed), shuffle=bool(shuffle),
                         buffer_size=int(buffer_size), epochs=opt(epochs), pack=bool(pack))
        self._src = SequenceSource(cache, self._cfg)
        if scores is not None:
            self._src.scores, self._src.score_names = load_scores(scores, score_columns, self._src.seq_ids)
        self.num_truncated = 0 if max_length is None else int((self._src.n_tokens > max_length).sum())
        if self.num_truncated:
            logger.info("%d of %d sequences are longer than max_length=%d and are truncated to it",
                        self.num_truncated, len(self._src), max_length)
        self._batches = 0

    # ------------------------------------------------------------ properties
    @property
    def source(self) -> SequenceSource:
        """The sequences' metadata, plan and decoding (``SequenceSource``)."""
        return self._src

    @property
    def num_sequences(self) -> int:
        return len(self._src)

    @property
    def manifest(self):
        return self._src.cache.manifest

    @property
    def vocab_size(self) -> int:
        return int(self.manifest.vocab_size)

    @property
    def k(self) -> int:
        return int(self._src.cache.k)

    # ------------------------------------------------------------ plan
    def epoch_plan(self, epoch: int, *, rank=None, world_size=None, worker: int = 0,
                   num_workers=None) -> list[list[str]]:
        """The batches (lists of seq_ids, in order) of one (rank, worker) part in one epoch."""
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        W = max(1, self.num_workers if num_workers is None else num_workers)
        if not (0 <= rank < world_size and 0 <= worker < W and epoch >= 0):
            raise InvalidInputError(f"epoch={epoch}, rank={rank}, worker={worker}: need epoch >= 0, "
                                    f"0 <= rank < world_size={world_size}, 0 <= worker < {W}")
        p = self._src.plan(epoch, rank * W + worker, world_size * W)
        ids = self._src.seq_ids[p.order]
        return [ids[a:b].tolist() for a, b in zip(p.bounds[:-1], p.bounds[1:])]

    def _part_batches(self, part: int, parts: int, n: int) -> int:
        """How many batches a part yields in all, or ``n + 1`` when that is more than ``n`` (or unbounded)."""
        epochs = self._cfg["epochs"]
        if self._src.plan(0, part, parts).bounds.size == 1:
            return 0  # an empty part
        if epochs is None:
            return n + 1
        total = 0
        for e in range(epochs):
            total += self._src.plan(e, part, parts).bounds.size - 1
            if total > n:
                return n + 1
        return total

    def _worker_skips(self, n: int) -> tuple[list[int], int]:
        """Batches each worker has produced after ``n`` handed out round-robin, and whose turn is next."""
        W = max(1, self.num_workers)
        if W == 1:
            return [n], 0
        cap = [self._part_batches(self.rank * W + w, self.world_size * W, n) for w in range(W)]
        lo, hi = 0, n  # the most full rounds r with sum(min(cap, r)) <= n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if sum(min(c, mid) for c in cap) <= n else (lo, mid - 1)
        skips = [min(c, lo) for c in cap]
        active = [w for w in range(W) if cap[w] > lo]
        m = min(n - sum(skips), len(active))
        for w in active[:m]:
            skips[w] += 1
        return skips, (active[m - 1] + 1) % W if m else 0

    # ------------------------------------------------------------ iteration and state
    def __iter__(self) -> Iterator[dict]:
        """Continues after the batches already handed out (or loaded with ``load_state_dict``)."""
        skips, shift = self._worker_skips(self._batches)
        ds = _Parts(self._src, self.rank, self.world_size, max(1, self.num_workers), skips, shift)
        it = iter(ds) if self.num_workers == 0 else iter(torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=self.num_workers, collate_fn=_identity))
        for batch in it:
            self._batches += 1  # counted when handed out: a checkpoint after the step includes it
            yield batch

    def state_dict(self) -> dict:
        return {"batches": self._batches, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "sequences": self._src.digest, **self._cfg}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["batches"]``; refused when a setting that shapes the stream differs.
        ``rank`` is not compared: DDP ranks consume equally many batches, so rank 0's state fits all."""
        mine = self.state_dict()
        changed = [f"{k}: saved {state.get(k)!r}, now {mine[k]!r}" for k in _RESUME_KEYS if state.get(k) != mine[k]]
        if changed:
            raise InvalidInputError("cannot resume: the loader's settings differ from the saved state ("
                                    + "; ".join(changed) + "); 'sequences' is a digest of the selected seq_ids")
        b = state.get("batches")
        if not isinstance(b, int) or b < 0:
            raise InvalidInputError(f"state['batches']={b!r}: must be an integer >= 0")
        self._batches = b
