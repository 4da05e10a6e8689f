"""The backend protocol: what a teacher backend must do, and what it returns.

``score`` receives token sequences and, for each, the positions whose next-token
distribution is wanted (position t: the teacher sees ``input_ids[:t]`` and predicts
``input_ids[t]``), and returns per sequence the sparse entries under the cache's
rule plus the exact per-position fields. Shapes are per sequence with N positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np

from logitstore.rules import Rule


@dataclasses.dataclass
class Scored:
    """A backend's output for one sequence (N requested positions, K entry slots)."""

    ids: np.ndarray  # [N, K] int32, sorted by logprob descending within n_entries
    logprobs: np.ndarray  # [N, K] float32, full-vocabulary temperature-1 logprobs
    n_entries: np.ndarray  # [N] int32
    label_logprob: np.ndarray  # [N] float32
    entropy: np.ndarray  # [N] float32 (exact unless the backend's exactness says otherwise)
    tail_mass: np.ndarray  # [N] float32, 1 - sum(p) over the entries
    argmax: np.ndarray  # [N] int32, the teacher's most likely token
    counts: np.ndarray | None = None  # [N, K] uint16 under rule sample


class Backend(Protocol):
    vocab_size: int
    tokenizer: Any
    #: exactness of the fields this backend produces (see FORMAT.md); {} means all exact
    exactness: dict[str, str]

    def describe(self) -> dict[str, Any]:
        """Teacher identity for the manifest: id, revision, dtype (what a resume must match)."""

    def options(self) -> dict[str, Any]:
        """Run settings for the manifest's build args (device, chunking): not identity."""

    def score(self, input_ids: Sequence[np.ndarray], positions: Sequence[np.ndarray], rule: Rule,
              generator: Any | None = None) -> list[Scored]:
        """Sparse distributions at ``positions[i]`` of each ``input_ids[i]``."""
