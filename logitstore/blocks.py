"""What the reader decodes into: a ``Block`` of a row group's positions as flat or padded numpy arrays, and the
``Sequence`` views into it (``logitstore.reader`` makes them; ``Sequence.record_of`` gives one back to a writer).
Shapes: ``[P]`` per position, ``[P, K]`` per entry (ids -1 / logprobs -inf / counts 0 past ``n_entries``)."""

from __future__ import annotations

import dataclasses

import numpy as np

from logitstore.format import POLICY_FIELDS
from logitstore.records import Scored, SequenceRecord
from logitstore.rules import Rule, certain_head

#: the optional per-position fields of rules that draw (Block and Sequence)
TAIL_FIELDS = ("tail_ids", "tail_logprobs", "tail_counts", "n_tail", "proposal_log_norm")
#: every optional per-position field (None where a cache has none): the draws', and the policy's (--responses-from)
OPTIONAL_FIELDS = TAIL_FIELDS + POLICY_FIELDS


@dataclasses.dataclass
class Block:
    """The decoded positions of some sequences (one row group, or a subset of one)."""

    scalars: dict[str, np.ndarray]  # per sequence: seq_id (object), record, n_positions, aggregates...
    token_offsets: np.ndarray  # [S+1] into input_ids
    input_ids: np.ndarray  # [sum T] int32
    pos_offsets: np.ndarray  # [S+1] into the position arrays
    pos: np.ndarray  # [P] int32
    labels: np.ndarray  # [P] int32 = input_ids[pos]
    loss_mask: np.ndarray  # [P] bool
    label_logprob: np.ndarray  # [P] float32
    entropy: np.ndarray  # [P] float32
    tail_mass: np.ndarray  # [P] float32
    ids: np.ndarray  # [P, K] int32, -1 where invalid
    logprobs: np.ndarray | None  # [P, K] float32, -inf where invalid; None when not stored (codec "none")
    n_entries: np.ndarray  # [P] int32
    counts: np.ndarray | None  # [P, K] uint16 (rule sample), 0 where invalid
    tail_ids: np.ndarray | None = None  # [P, U] int32 (rule topk_tail), -1 where invalid
    tail_logprobs: np.ndarray | None = None  # [P, U] float32, -inf where invalid (None: not stored)
    tail_counts: np.ndarray | None = None  # [P, U] uint16, 0 where invalid
    n_tail: np.ndarray | None = None  # [P] int32
    proposal_log_norm: np.ndarray | None = None  # [P] float32 (a proposal temperature != 1)
    policy_logprob: np.ndarray | None = None  # [P] float32 (responses from a policy): its logprob of the label
    policy_entropy: np.ndarray | None = None  # [P] float32, its entropy

    def __len__(self) -> int:
        return self.pos_offsets.size - 1

    @property
    def valid(self) -> np.ndarray:
        return np.arange(self.ids.shape[1])[None, :] < self.n_entries[:, None]

    def sequence(self, i: int) -> Sequence:
        a, b = self.pos_offsets[i], self.pos_offsets[i + 1]
        ta, tb = self.token_offsets[i], self.token_offsets[i + 1]
        return Sequence(
            **{k: v[i] for k, v in self.scalars.items()},
            input_ids=self.input_ids[ta:tb], pos=self.pos[a:b], labels=self.labels[a:b],
            loss_mask=self.loss_mask[a:b], label_logprob=self.label_logprob[a:b], entropy=self.entropy[a:b],
            tail_mass=self.tail_mass[a:b], ids=self.ids[a:b],
            logprobs=None if self.logprobs is None else self.logprobs[a:b],
            n_entries=self.n_entries[a:b], counts=None if self.counts is None else self.counts[a:b],
            **{name: None if getattr(self, name) is None else getattr(self, name)[a:b] for name in OPTIONAL_FIELDS},
        )


@dataclasses.dataclass
class Sequence:
    """One cached sequence, decoded. Array fields are ``[N]`` or ``[N, K]`` over its N cached positions."""

    seq_id: str
    record: int
    sample: int
    n_tokens: int
    n_positions: int
    n_targets: int
    mean_entropy: float | None
    teacher_nll: float | None
    token_accuracy: float | None
    correct: bool | None
    input_ids: np.ndarray
    pos: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    label_logprob: np.ndarray
    entropy: np.ndarray
    tail_mass: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray | None
    n_entries: np.ndarray
    counts: np.ndarray | None
    tail_ids: np.ndarray | None = None
    tail_logprobs: np.ndarray | None = None
    tail_counts: np.ndarray | None = None
    n_tail: np.ndarray | None = None
    proposal_log_norm: np.ndarray | None = None
    policy_logprob: np.ndarray | None = None
    policy_entropy: np.ndarray | None = None

    def record_of(self) -> SequenceRecord:
        """This sequence as ``CacheWriter.add`` takes it (entries trimmed to their widest position; the stored
        aggregates carried over), e.g. to copy it into another cache."""
        k = max(1, int(self.n_entries.max(initial=1)))
        scored = Scored(ids=self.ids[:, :k].clip(min=0),
                        logprobs=None if self.logprobs is None else self.logprobs[:, :k],
                        n_entries=self.n_entries, counts=None if self.counts is None else self.counts[:, :k],
                        label_logprob=self.label_logprob, entropy=self.entropy, tail_mass=self.tail_mass,
                        proposal_log_norm=self.proposal_log_norm)
        if self.tail_ids is not None:
            u = max(1, int(self.n_tail.max(initial=1)))
            scored.tail_ids, scored.tail_counts = self.tail_ids[:, :u].clip(min=0), self.tail_counts[:, :u]
            scored.tail_logprobs, scored.n_tail = self.tail_logprobs[:, :u], self.n_tail
        return SequenceRecord(input_ids=self.input_ids, positions=self.pos, loss_mask=self.loss_mask, scored=scored,
                              seq_id=self.seq_id, record=int(self.record), sample=int(self.sample),
                              correct=self.correct, policy_logprob=self.policy_logprob,
                              policy_entropy=self.policy_entropy,
                              aggregates={"mean_entropy": self.mean_entropy, "teacher_nll": self.teacher_nll,
                                          "token_accuracy": self.token_accuracy})


def with_certain_head(decoded: Block | Sequence, rule: Rule, *, at_least: int = 0) -> Block | Sequence:
    """A ``Block`` or ``Sequence`` of a systematic sampled cache with only the entries its draws hit with certainty
    (``logitstore.rules.certain_head``: every id of ``p >= 1/D``; ``at_least`` entries per position regardless), the
    other draws' mass moved to ``tail_mass`` and their counts dropped: an exact head, as a top-k cache has."""
    ids, lp, n, tail = certain_head(rule, decoded.ids, decoded.logprobs, decoded.n_entries, decoded.tail_mass,
                                    decoded.proposal_log_norm, at_least=at_least)
    return dataclasses.replace(decoded, ids=ids, logprobs=lp, n_entries=n, tail_mass=tail, counts=None)
