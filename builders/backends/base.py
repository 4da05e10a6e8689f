"""The backend protocol: what a teacher backend must do, and what it returns.

``score`` receives token sequences and, for each, the positions whose next-token
distribution is wanted (position t: the teacher sees ``input_ids[:t]`` and predicts
``input_ids[t]``), and returns per sequence the sparse entries under the cache's
rule plus the exact per-position fields. Shapes are per sequence with N positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from logitstore.records import Scored
from logitstore.rules import Rule

__all__ = ["Backend", "Scored"]


class Backend(Protocol):
    vocab_size: int
    tokenizer: Any
    #: the longest sequence (in tokens) the teacher takes, from its config; None when it names none
    max_positions: int | None
    #: exactness of the fields this backend produces (see FORMAT.md); {} means all exact
    exactness: dict[str, str]

    def describe(self) -> dict[str, Any]:
        """Teacher identity for the manifest: id, revision, dtype (what a resume must match)."""

    def options(self) -> dict[str, Any]:
        """Run settings for the manifest's build args (device, chunking): not identity."""

    def tokenizer_record(self) -> dict[str, Any]:
        """The tokenizer's manifest record (``logitstore.identity.tokenizer_record``)."""

    def score(self, input_ids: Sequence[np.ndarray], positions: Sequence[np.ndarray], rule: Rule,
              generator: Any | None = None) -> list[Scored]:
        """Sparse distributions at ``positions[i]`` of each ``input_ids[i]`` (``logitstore.records.Scored``,
        with ``argmax`` set)."""

    def generate(self, prompt: np.ndarray, *, n: int, max_new_tokens: int, temperature: float, top_p: float,
                 seed: int) -> list[np.ndarray]:
        """``n`` sampled responses to one prompt (token ids, through the end-of-sequence token if produced),
        reproducible for a ``seed`` (generation mode)."""
