"""The typed records a cache is written from: a backend's ``Scored`` positions and a ``SequenceRecord``.

``Scored`` is what a teacher backend returns for one sequence: the sparse entries of N
requested positions under the cache's rule plus the exact per-position fields (the data
contract of DESIGN.md). ``SequenceRecord`` is one sequence as ``CacheWriter.add`` takes it:
its tokens, which positions are cached, their loss mask, the ``Scored`` values, the
per-sequence fields (id, source record, sample index, verdict) and, for responses sampled
from another model (``build --responses-from``), what that policy said of each position. Arrays may be numpy arrays,
lists or torch tensors (converted by the writer without importing torch).

Shapes, per sequence with T tokens and N cached positions, K entry slots:

- ``input_ids [T]``; ``positions [N]`` (default ``1..T-1``); ``loss_mask [N]`` (default all true)
- ``ids``, ``logprobs`` ``[N, K]`` sorted by logprob descending within ``n_entries [N]`` (default K)
- ``label_logprob``, ``entropy``, ``tail_mass``, ``argmax`` ``[N]``; ``counts [N, K]`` under rule sample
- rule topk_tail: ``tail_ids``, ``tail_logprobs``, ``tail_counts`` ``[N, U]`` within ``n_tail [N]``
- a proposal temperature != 1: ``proposal_log_norm [N]``
- responses from a policy: ``policy_logprob``, ``policy_entropy`` ``[N]`` (on the ``SequenceRecord``: they are
  not the teacher's)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from logitstore.rules import Entries


@dataclasses.dataclass
class Scored:
    """A backend's output for one sequence: N requested positions, K entry slots."""

    ids: Any  # [N, K] int, sorted by logprob descending within n_entries
    logprobs: Any | None  # [N, K] float, full-vocabulary temperature-1 logprobs; None only for codec values "none"
    label_logprob: Any  # [N] float, full-vocabulary logprob of the label
    entropy: Any  # [N] float, exact unless the backend's exactness says otherwise
    tail_mass: Any  # [N] float, 1 - sum(p) over the entries
    n_entries: Any | None = None  # [N] int; None: every position has K
    argmax: Any | None = None  # [N] int, the teacher's most likely token; None: ids[:, 0] (needed under rule sample)
    counts: Any | None = None  # [N, K] int, rule sample only
    tail_ids: Any | None = None  # [N, U] int, rule topk_tail: the unique tail draws, by logprob descending
    tail_logprobs: Any | None = None  # [N, U] float, their full-vocabulary logprobs
    tail_counts: Any | None = None  # [N, U] int, draws per tail id (summing to tail_draws where the tail has mass)
    n_tail: Any | None = None  # [N] int, valid tail entries per position; None: U everywhere
    proposal_log_norm: Any | None = None  # [N] float, rules with proposal_temperature != 1: log Z of the proposal

    @classmethod
    def of(cls, entries: Entries, *, label_logprob, entropy, argmax=None) -> Scored:
        """The entries a rule kept (``rules.sparsify``/``cut``) with the exact per-position fields."""
        return cls(ids=entries.ids, logprobs=entries.logprobs, n_entries=entries.n_entries,
                   tail_mass=entries.tail_mass, counts=entries.counts, label_logprob=label_logprob,
                   entropy=entropy, argmax=argmax, tail_ids=entries.tail_ids, tail_logprobs=entries.tail_logprobs,
                   tail_counts=entries.tail_counts, n_tail=entries.n_tail,
                   proposal_log_norm=entries.proposal_log_norm)


@dataclasses.dataclass
class SequenceRecord:
    """One sequence as ``CacheWriter.add`` takes it (see the module docstring)."""

    input_ids: Any  # [T]
    scored: Scored
    positions: Any | None = None  # [N], default 1..T-1
    loss_mask: Any | None = None  # [N] bool, default all true
    seq_id: str | None = None  # default: logitstore.writer.default_seq_id(input_ids, sample)
    record: int = 0  # index of the source record
    sample: int = 0  # sample index of a generated response
    correct: bool | None = None  # verifier verdict
    policy_logprob: Any | None = None  # [N] float, the policy's full-vocabulary temperature-1 logprob of each label
    policy_entropy: Any | None = None  # [N] float, the policy's full-vocabulary entropy at each position
    aggregates: dict[str, float | None] | None = None
    """mean_entropy / teacher_nll / token_accuracy to store instead of recomputing them (carried over from
    another cache, whose positions may be a subset of what they were computed on)"""
