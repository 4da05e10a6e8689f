"""Mixing two caches per batch: the student's own samples and off-policy data at a ratio lambda (GKD's lambda).

GKD (Agarwal et al., ICLR 2024, Algorithm 1) draws each batch from the student's own outputs with
probability lambda and from a fixed dataset otherwise. ``MixedLoader(primary, other, ratio=lambda,
seed=s)`` does exactly that over two ``trainers.data.StreamingLoader`` streams: batch ``i`` comes from
``primary`` when ``u_i < lambda``, where ``u_i`` is a uniform number made from a hash of ``(s, i)``, and
from ``other`` otherwise. Each stream keeps its own order and its own position, so a sequence of either
cache is seen once per epoch of its stream; whole batches are mixed, never sequences within one, so
every batch has one cache's rule, k and columns. Which source a batch comes from depends only on the
seed and the batch's index, never on timing or ranks, so every DDP rank takes the same source at the
same step and a resumed run continues the same sequence of choices (``state_dict`` holds the count and
both streams' states). ``choices(n)`` says where the first ``n`` batches come from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from logitstore.errors import InvalidInputError
from trainers.data import StreamingLoader


def from_primary(seed: int, index: int, ratio: float) -> bool:
    """True when batch ``index`` comes from the primary stream: a hash of (seed, index) as a uniform in [0, 1),
    below ``ratio``."""
    h = hashlib.blake2b(f"mix/{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < ratio * 2**64


class MixedLoader:
    """Batches from ``primary`` with probability ``ratio``, else from ``other`` (see the module docstring)."""

    def __init__(self, primary: StreamingLoader, other: StreamingLoader, *, ratio: float, seed: int):
        if not 0 <= ratio <= 1:
            raise InvalidInputError(f"mix ratio {ratio}: must be in [0, 1]")
        self.primary, self.other, self.ratio, self.seed = primary, other, float(ratio), int(seed)
        self._batches = 0

    @property
    def manifest(self):
        return self.primary.manifest

    def choices(self, n: int) -> list[bool]:
        """For the first ``n`` batches: True where the batch comes from the primary stream."""
        return [from_primary(self.seed, i, self.ratio) for i in range(n)]

    def __iter__(self) -> Iterator[dict]:
        its = {True: None, False: None}
        while True:
            src = from_primary(self.seed, self._batches, self.ratio)
            if its[src] is None:
                its[src] = iter(self.primary if src else self.other)
            try:
                batch = next(its[src])
            except StopIteration:
                return
            self._batches += 1
            yield {**batch, "mixed_from": "primary" if src else "other"}

    def state_dict(self) -> dict:
        return {"batches": self._batches, "ratio": self.ratio, "seed": self.seed,
                "primary": self.primary.state_dict(), "other": self.other.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["batches"]``; each stream continues after its own batches. ``rank`` (which the
        training loop sets on a loader's state) is passed on to both streams."""
        if state.get("ratio") != self.ratio or state.get("seed") != self.seed or "primary" not in state:
            raise InvalidInputError(f"cannot resume: the saved loader mixed at ratio {state.get('ratio')!r} with seed "
                                    f"{state.get('seed')!r} (or did not mix); now ratio {self.ratio}, seed {self.seed}")
        rank = {"rank": state["rank"]} if "rank" in state else {}
        self.primary.load_state_dict({**state["primary"], **rank})
        self.other.load_state_dict({**state["other"], **rank})
        self._batches = int(state["batches"])
