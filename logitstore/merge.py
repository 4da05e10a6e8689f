"""``logitstore merge``: one cache from several teachers' caches of the same data and tokenizer.

Sequences line up by ``seq_id`` (a content hash of the tokens), positions by ``pos``. For
each sequence, its *teachers* are the inputs that hold it (``how="correct"``: only those whose
verifier accepted it), with the weights ``w_i`` renormalised over them. Per position cached
by all of them (the intersection of their positions; ``loss_mask`` true where all say so), the
merged entries describe the mixture ``p = sum_i w_i p_i``:

- entries: the union of the teachers' supports, each id's value ``sum_{i: id in S_i} w_i p_i(id)``
  (the *known part* of the mixture: exact where every teacher stored the id, a lower bound where
  one left it in its tail), sorted and re-cut by the target rule (``logitstore.rules.cut``). A
  teacher's decoded entries are first scaled so that they sum to ``1 - m_i`` with its exact tail
  mass ``m_i``, so each side's tail mass is kept exactly, as mass;
- ``tail_mass``: ``1 - sum(kept entries)`` = ``sum_i w_i m_i`` plus what the re-cut dropped (exact);
- ``label_logprob``: ``log sum_i w_i exp(label_logprob_i)`` (exact: every teacher stores it);
- ``entropy``: the mixture's entropy is not a function of sparse entries; stored is the upper bound
  ``min(sum_i w_i H_i + H(w), ln V)`` (entropy of the pair (teacher, token)), exactness ``bound``.

The target rule: ``TopK(K)`` with K the largest input k (``top_k`` overrides it), or
``MassTopK(p, K)`` when every input is mass-adaptive with the same p. A ``topk_tail`` input
contributes its exact head (its draws are dropped; their mass stays in the tail), and so does a
``sample`` input of systematic draws (the build default): its head is the ids its draws hit with
certainty, ``p >= 1/D`` (``logitstore.rules.certain_head``; at least its most likely entry per
position), the other draws' mass joins its tail. A ``sample`` input of independent draws (no id
certain) is refused. Merged logprobs carry the inputs' decoding
error twice (the value and the rescaling) plus the output codec's: at most ``2 e_in + e_out``.

``how``: ``mean`` (the weighted mixture), ``agreement`` (the mixture, with ``loss_mask`` false
where the teachers' top-1 tokens differ), ``correct`` (route each sequence to the teachers whose
answer the verifier accepted; sequences no teacher got right are dropped). Sequences held by
only some inputs are kept with the teachers that have them (``missing="keep"``) or dropped
(``"drop"``); the counts are in ``manifest.build["merge"]``. Inputs of different tokenizers,
vocabularies or temperatures are refused before anything is written; the output is written by
``CacheWriter`` (atomic commits), so it is a normal cache.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence as Seq

import numpy as np

from logitstore.blocks import with_certain_head
from logitstore.codec import Codec
from logitstore.errors import CacheExistsError, InvalidInputError
from logitstore.manifest import MANIFEST_NAME
from logitstore.progress import progress_bar
from logitstore.reader import Cache, Sequence
from logitstore.records import Scored, SequenceRecord
from logitstore.rules import MassTopK, Rule, TopK, cut, has_certain_head
from logitstore.selection import cache_fingerprint
from logitstore.writer import CacheWriter

logger = logging.getLogger(__name__)

HOWS = ("mean", "agreement", "correct")
MISSING = ("keep", "drop")
CHUNK = 512  # sequences decoded at a time per input


def merge(inputs: Seq[str | os.PathLike], out: str | os.PathLike, *, weights: Seq[float] | None = None,
          how: str = "mean", missing: str = "keep", top_k: int | None = None, progress: bool = False) -> dict:
    """Write the merged cache of ``inputs`` to ``out`` (see the module docstring); returns its merge record."""
    caches, w = _check_inputs(inputs, weights, how, missing, out)
    rule = target_rule([c.rule for c in caches], top_k)
    plan, counts = _plan(caches, how, missing)
    if not plan:
        raise InvalidInputError(f"nothing to merge: no sequence of {', '.join(map(str, inputs))} is kept "
                                f"(how={how}, missing={missing}; counts {counts})")
    mixed = any(len(t) > 1 for _, t in plan)
    first = caches[0].manifest
    record = {"inputs": [{"path": str(c.path.resolve()), "fingerprint": cache_fingerprint(c.manifest),
                          "teacher": c.manifest.teacher, "rule": c.manifest.rule} for c in caches],
              "weights": w.tolist(), "how": how, "missing": missing, "rule": rule.to_dict(), **counts,
              "exactness_notes": "entries: the known part of the mixture (lower bounds where a teacher left an id "
                                 "in its tail); tail_mass and label_logprob exact; entropy an upper bound"}
    codec = Codec.from_dict(first.codec)
    scalars = "exact" if codec.scalars == "fp32" else "quantised"
    written = {"topk_logprobs": "exact" if codec.values == "fp32" else "quantised", "label_logprob": scalars,
               "entropy": scalars, "tail_mass": scalars}  # what re-encoding with the output codec allows
    exactness = weakest([c.manifest.exactness for c in caches] + [written], tuple(written))
    if mixed:
        exactness.update(topk_logprobs="bound", entropy="bound")
    teacher = {"id": f"mixture of {len(caches)} teachers ({how})", "teachers": [c.manifest.teacher for c in caches],
               "weights": w.tolist()}
    bar = progress_bar(progress, desc="merge", unit="seq", total=len(plan))
    stats = {"positions_dropped": 0, "positions_disagreeing": 0}
    with CacheWriter(out, vocab_size=first.vocab_size, rule=rule, codec=codec, teacher=teacher,
                     tokenizer=first.tokenizer, build={"merge": record}, exactness=exactness,
                     temperature=first.temperature) as writer:
        for a in range(0, len(plan), CHUNK):
            part = plan[a:a + CHUNK]
            decoded = [_decode(c, [sid for sid, t in part if i in t]) for i, c in enumerate(caches)]
            for sid, teachers in part:
                seqs = [decoded[i][sid] for i in teachers]
                writer.add(merge_sequence(seqs, w[list(teachers)], rule, first.vocab_size, how=how, stats=stats))
                if bar is not None:
                    bar.update(1)
        record.update(stats)
        writer.manifest.build = {"merge": record}
    if bar is not None:
        bar.close()
    logger.info("merged %d sequences from %d caches into %s", len(plan), len(caches), out)
    return record


def target_rule(rules: list[Rule], top_k: int | None = None) -> Rule:
    """The rule the merged entries are re-cut by (module docstring); refuses rules without exact entries."""
    for r in rules:
        if r.name == "sample" and not has_certain_head(r):
            raise InvalidInputError("merge needs caches with exact entries (rules topk, mass, topk_tail, or sample "
                                    "with --systematic draws, whose certain head it takes); this 'sample' cache's "
                                    "draws are independent (or capped), so no id is certain and their estimator "
                                    "weights do not mix: build the inputs with --top-k K or --sample D --systematic")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InvalidInputError(f"--top-k {top_k!r}: must be an integer >= 1")
    k = top_k or max(r.k for r in rules)
    ps = {r.p for r in rules if r.name == "mass"}
    if all(r.name == "mass" for r in rules) and len(ps) == 1:
        return MassTopK(ps.pop(), k)
    return TopK(k)


#: exactness words from the strongest claim to the weakest
_STRENGTH = ("exact", "quantised", "estimate", "bound", "absent")


def weakest(exactness: list[dict[str, str]], fields: tuple[str, ...]) -> dict[str, str]:
    """Per field, the weakest exactness word any input gives it (a merged field is no better than its worst input)."""
    out = {}
    for f in fields:
        words = [e[f] for e in exactness if f in e]
        if words:
            out[f] = max(words, key=lambda x: _STRENGTH.index(x) if x in _STRENGTH else len(_STRENGTH))
    return out


def _check_inputs(inputs, weights, how, missing, out) -> tuple[list[Cache], np.ndarray]:
    if len(inputs) < 2:
        raise InvalidInputError(f"merge needs at least 2 caches, got {len(inputs)}")
    if how not in HOWS:
        raise InvalidInputError(f"--how {how!r}: choose from {', '.join(HOWS)}")
    if missing not in MISSING:
        raise InvalidInputError(f"--missing {missing!r}: choose from {', '.join(MISSING)}")
    w = np.ones(len(inputs)) if weights is None else np.asarray(list(weights), np.float64)
    if w.shape != (len(inputs),) or not np.isfinite(w).all() or (w <= 0).any():
        raise InvalidInputError(f"--weights {list(weights)}: give one positive number per cache ({len(inputs)})")
    o = os.fspath(out)
    if os.path.exists(o) and (os.path.isfile(o) or os.path.exists(os.path.join(o, MANIFEST_NAME))
                              or any(os.scandir(o))):
        raise CacheExistsError(f"-o {o} exists and is not empty; choose a new output path")
    caches = [Cache(p) for p in inputs]
    a = caches[0].manifest
    for p, c in zip(inputs[1:], caches[1:]):
        m = c.manifest
        fa, fb = a.tokenizer.get("fingerprint"), m.tokenizer.get("fingerprint")
        if m.vocab_size != a.vocab_size or fa != fb:
            raise InvalidInputError(f"{p} has vocab {m.vocab_size} and tokenizer fingerprint {fb}, {inputs[0]} has "
                                    f"vocab {a.vocab_size} and {fa}: merge needs caches of one tokenizer")
        if m.temperature != a.temperature:
            raise InvalidInputError(f"{p} is at temperature {m.temperature}, {inputs[0]} at {a.temperature}: "
                                    "merge needs caches at one temperature")
    for p, c in zip(inputs, caches):
        if c.codec.values == "none":
            raise InvalidInputError(f"{p} stores no logprobs (codec values 'none'): nothing to mix")
    target_rule([c.rule for c in caches])
    return caches, w / w.sum()


def _plan(caches: list[Cache], how: str, missing: str) -> tuple[list[tuple[str, tuple[int, ...]]], dict]:
    """The merged sequences in order (first input's order, then new ones), each with its teachers' indices."""
    holders: dict[str, list[int]] = {}
    for i, c in enumerate(caches):
        t = c.scalars(["seq_id", "correct"])
        for sid, ok in zip(t.column("seq_id").to_pylist(), t.column("correct").to_pylist()):
            if how != "correct" or ok is True:
                holders.setdefault(sid, []).append(i)
            elif sid not in holders:
                holders[sid] = []
    n = len(caches)
    plan, counts = [], {"in_all": 0, "partial_kept": 0, "partial_dropped": 0, "not_correct": 0}
    for sid, who in holders.items():
        if not who:
            counts["not_correct"] += 1
            continue
        full = len(who) == n if how != "correct" else all(sid in c for c in caches)
        if not full and missing == "drop":
            counts["partial_dropped"] += 1
            continue
        counts["in_all" if full else "partial_kept"] += 1
        plan.append((sid, tuple(who)))
    if how != "correct" and not any(len(t) > 1 for _, t in plan) and missing == "keep":
        raise InvalidInputError("the caches share no seq_id: they are not caches of the same data (or tokenizer)")
    counts["sequences"] = len(plan)
    return plan, counts


def _decode(cache: Cache, seq_ids: list[str]) -> dict[str, Sequence]:
    """The sequences ``seq_ids`` of ``cache``; a systematic sampled cache's cut to its certain head (at least its most
    likely entry per position), its other draws' mass moved to the tail (module docstring)."""
    seqs = {s.seq_id: s for s in cache.iter_sequences(seq_ids)} if seq_ids else {}
    if cache.rule.name != "sample":
        return seqs
    return {sid: with_certain_head(q, cache.rule, at_least=1) for sid, q in seqs.items()}


def merge_sequence(seqs: list[Sequence], w: np.ndarray, rule: Rule, vocab: int, *, how: str = "mean",
                   stats: dict | None = None) -> SequenceRecord:
    """One merged sequence from its teachers' decoded copies ``seqs`` with weights ``w`` (renormalised here)."""
    w = np.asarray(w, np.float64) / np.sum(w)
    base = seqs[0]
    for s in seqs[1:]:
        if not np.array_equal(s.input_ids, base.input_ids):
            raise InvalidInputError(f"seq {base.seq_id}: the caches hold different token ids under one seq_id")
    pos = base.pos
    for s in seqs[1:]:
        pos = np.intersect1d(pos, s.pos)
    rows = [np.searchsorted(s.pos, pos) for s in seqs]
    if stats is not None:
        stats["positions_dropped"] += max(s.pos.size for s in seqs) - pos.size
    n = pos.size
    mask = np.ones(n, bool)
    ids, vals, own = [], [], []
    for s, r, wi in zip(seqs, rows, w):
        mask &= s.loss_mask[r]
        valid = (np.arange(s.ids.shape[1])[None, :] < s.n_entries[:, None])[r]
        p = np.where(valid, np.exp(s.logprobs[r].astype(np.float64)), 0.0)
        kept = 1.0 - s.tail_mass[r].astype(np.float64)
        total = p.sum(1)
        # the decoded entries sum to 1 - m_i up to the codec's error: rescale them so the exact tail mass is kept
        # as mass (a lone teacher's entries are copied as they are, so they re-encode exactly)
        scale = np.where((kept > 0) & (total > 0), kept / np.where(total > 0, total, 1.0), 1.0) if len(seqs) > 1 \
            else np.ones(n)
        ids.append(np.where(valid, s.ids[r], -1))
        vals.append(wi * p * scale[:, None])
        own.append(s.ids[r, 0])
    if how == "agreement" and len(seqs) > 1:
        agree = np.all(np.stack(own) == own[0], axis=0)
        if stats is not None:
            stats["positions_disagreeing"] += int((~agree).sum())
        mask &= agree
    mid, mval = mixture_entries(np.concatenate(ids, 1), np.concatenate(vals, 1), vocab)
    with np.errstate(divide="ignore"):
        entries = cut(mid, np.log(mval), rule)
    lab = np.stack([s.label_logprob[r].astype(np.float64) for s, r in zip(seqs, rows)])  # [teachers, N]
    label_lp = _logsumexp(lab + np.log(w)[:, None])
    ent = np.stack([s.entropy[r].astype(np.float64) for s, r in zip(seqs, rows)])
    mix_h = -float(np.sum(w * np.log(w)))
    entropy = np.minimum((w[:, None] * ent).sum(0) + mix_h, math.log(vocab))
    scored = Scored.of(entries, label_logprob=np.minimum(label_lp, 0.0), entropy=entropy)
    verdicts = {s.correct for s in seqs} - {None}
    return SequenceRecord(input_ids=base.input_ids, positions=pos, loss_mask=mask, scored=scored, seq_id=base.seq_id,
                          record=int(base.record), sample=int(base.sample),
                          correct=verdicts.pop() if len(verdicts) == 1 else None)


def mixture_entries(ids: np.ndarray, vals: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the values of equal ids summed and sorted descending: ``ids, vals [N, C]`` (ids -1: padding) ->
    ``[N, U]`` ids (0 past each row's entries) and values (0 there), U the most distinct ids of a row."""
    n = ids.shape[0]
    row = np.repeat(np.arange(n, dtype=np.int64), ids.shape[1])
    flat_ids, flat_vals = ids.ravel().astype(np.int64), vals.ravel()
    keep = flat_ids >= 0
    keys, inv = np.unique(row[keep] * vocab + flat_ids[keep], return_inverse=True)
    summed = np.bincount(inv, weights=flat_vals[keep], minlength=keys.size)
    r, tok = keys // vocab, keys % vocab
    order = np.lexsort((tok, -summed, r))  # by row, then value descending (ties by id)
    r, tok, summed = r[order], tok[order], summed[order]
    counts = np.bincount(r, minlength=n)
    u = max(1, int(counts.max(initial=1)))
    col = np.arange(r.size) - np.repeat(np.cumsum(counts) - counts, counts)
    out_ids, out_vals = np.zeros((n, u), np.int64), np.zeros((n, u))
    out_ids[r, col], out_vals[r, col] = tok, summed
    return out_ids, out_vals


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(0)
    return m + np.log(np.exp(x - m).sum(0))
