"""Sparse distributions from hidden states, in chunks of positions.

Given the final hidden states ``h [M, H]`` at M requested positions and the LM head
(``logitstore.head.Head``: weight, bias, and the model's post-head scale/softcap),
``extract`` computes per position: the entries the rule keeps, the exact
full-vocabulary entropy, the label logprob, the tail mass and the argmax, without
ever materialising more than ``[chunk, V]`` logits. Per chunk it takes one
normaliser and derives everything else from the same logits:

    lp = logits - lse,   entropy = lse - sum(softmax(logits) * logits)

Logits are the model's raw head outputs upcast to float32 (temperature 1), shifted by
their row maximum (which changes no logprob and keeps the entropy accurate). Two
``[chunk, V]`` float32 buffers are allocated once per call and everything runs in them
in place, so peak extra memory is those buffers (sized by ``chunk_rows_for`` from a byte
budget) whatever the sequence length.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from logitstore.head import Head
from logitstore.records import Scored
from logitstore.rules import MassTopK, Rule, Sampled, TopK, TopKTail


class Buffers:
    """The ``[rows, V]`` float32 work buffers (plus a model-dtype one for non-fp32 heads), allocated once."""

    def __init__(self, head: Head, rows: int, device: torch.device):
        self.rows = max(1, rows)
        self.z = torch.empty((self.rows, head.vocab_size), dtype=torch.float32, device=device)
        self.p = torch.empty_like(self.z)
        self.tmp = None if head.weight.dtype == torch.float32 else \
            torch.empty((self.rows, head.vocab_size), dtype=head.weight.dtype, device=device)


def logit_chunks(h: torch.Tensor, head: Head, bufs: Buffers) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """For each chunk of the rows of ``h [M, H]``: its slice, its raw float32 logits ``z`` in the first buffer,
    and the second buffer ``p`` of the same shape for the caller to work in."""
    for a in range(0, h.shape[0], bufs.rows):
        c = min(bufs.rows, h.shape[0] - a)
        z, p = bufs.z[:c], bufs.p[:c]
        head.into(h[a:a + c], z, None if bufs.tmp is None else bufs.tmp[:c])
        yield slice(a, a + c), z, p


def normalise(z: torch.Tensor, p: torch.Tensor, labels: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw logits ``z [C, V]`` -> (lse ``[C, 1]``, entropy, label logprob, argmax), leaving the softmax in ``p``.

    ``z`` is shifted by its row max in place: logprobs (``z - lse``) are unchanged, and
    lse - sum(p * z) no longer cancels two large numbers in float32; the clamp turns masked
    -inf logits into a finite floor (p = 0 there).
    """
    z.sub_(z.max(dim=-1, keepdim=True).values).clamp_(min=torch.finfo(torch.float32).min)
    torch.exp(z, out=p)
    total = p.sum(-1, keepdim=True)
    lse = total.log()
    p.div_(total)
    entropy = lse[:, 0] - torch.bmm(p.unsqueeze(1), z.unsqueeze(2))[:, 0, 0]
    label_lp = z.gather(1, labels[:, None].long())[:, 0] - lse[:, 0]
    return lse, entropy, label_lp, z.argmax(-1)


def chunk_rows_for(vocab_size: int, budget_bytes: int = 96 << 20) -> int:
    """Rows per chunk so that the two float32 ``[rows, V]`` work buffers fit ``budget_bytes``."""
    return max(1, budget_bytes // (2 * 4 * vocab_size))


#: the per-position outputs of ``extract``: [M, width] ones first (padded per chunk), then [M] ones
_WIDE = {"ids": 0, "logprobs": -np.inf, "counts": 0, "tail_ids": 0, "tail_logprobs": -np.inf, "tail_counts": 0}
_FLAT = ("n_entries", "label_logprob", "entropy", "tail_mass", "argmax", "n_tail", "proposal_log_norm")


@torch.no_grad()
def extract(h: torch.Tensor, head: Head, labels: torch.Tensor, rule: Rule, *, chunk_rows: int,
            generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """``h [M, H]``, ``labels [M]`` -> arrays over the M positions (the fields of ``Scored``; the fields a rule
    does not produce are None).

    Two ``[chunk_rows, V]`` float32 buffers are allocated once and every step works in
    them in place, so peak memory does not depend on M or on the allocator. Draws (rules
    sample and topk_tail) are inverse-CDF draws over the chunk the extraction already holds:
    the proposal's weights are written into the second buffer, the head zeroed out, and an in-place
    cumulative sum searched with uniforms from ``generator`` (drawn on the CPU, so the same seed gives
    the same draws on any device).
    """
    outs: dict[str, list] = {k: [] for k in (*_WIDE, *_FLAT)}
    if h.shape[0]:
        for sl, z, p in logit_chunks(h, head, Buffers(head, min(chunk_rows, h.shape[0]), h.device)):
            _extract_chunk(z, p, labels[sl], rule, generator, outs)
    res: dict[str, np.ndarray | None] = {}
    for name, parts in outs.items():
        if not parts or parts[0] is None:
            res[name] = None
        elif name in _WIDE:
            width = max(q.shape[1] for q in parts)
            res[name] = np.concatenate([np.pad(q, ((0, 0), (0, width - q.shape[1])), constant_values=_WIDE[name])
                                        for q in parts])
        else:
            res[name] = np.concatenate(parts)
    if not outs["ids"]:  # no position at all: empty arrays of the rule's shapes
        k = 1 if isinstance(rule, Sampled) else rule.k
        res.update({"ids": np.zeros((0, k), np.int32), "logprobs": np.zeros((0, k), np.float32),
                    "n_entries": np.zeros(0, np.int32), "argmax": np.zeros(0, np.int32),
                    **{n: np.zeros(0, np.float32) for n in ("label_logprob", "entropy", "tail_mass")}})
        if isinstance(rule, Sampled):
            res["counts"] = np.zeros((0, k), np.uint16)
        if isinstance(rule, TopKTail):
            res.update(tail_ids=np.zeros((0, 1), np.int32), tail_logprobs=np.zeros((0, 1), np.float32),
                       tail_counts=np.zeros((0, 1), np.uint16), n_tail=np.zeros(0, np.int32))
        if rule.tempered:
            res["proposal_log_norm"] = np.zeros(0, np.float32)
    return res


def _extract_chunk(z: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, rule: Rule, generator, outs) -> None:
    """``z``: raw logits [C, V] (shifted in place by ``normalise``), ``p``: a work buffer of the same shape."""
    lse, entropy, label_lp, argmax = normalise(z, p, labels)
    host = lambda t: t.cpu().numpy()  # noqa: E731 - results leave the device here, once per chunk
    counts = tail = log_norm = None
    if isinstance(rule, Sampled):
        draws, has, log_norm = draw(z, p, lse, None, rule.draws, rule.proposal_temperature, generator,
                                    rule.systematic)
        ids, lp, counts, n_ent = unique_draws(z, lse, draws, has)
        if ids.shape[1] > rule.k:  # the cap: the k most likely of the unique draws
            ids, lp, counts, n_ent = ids[:, :rule.k], lp[:, :rule.k], counts[:, :rule.k], n_ent.clamp(max=rule.k)
        valid = torch.arange(ids.shape[1], device=z.device)[None, :] < n_ent[:, None]
    else:
        k = min(rule.k, z.shape[1])
        top = z.topk(k, dim=-1)
        if isinstance(rule, MassTopK):
            mass = torch.exp(top.values - lse).cumsum(-1)
            n_ent = ((mass < rule.p).sum(-1) + 1).clamp(max=k)
        else:
            assert isinstance(rule, (TopK, TopKTail))
            n_ent = torch.full((z.shape[0],), k, device=z.device)
        valid = torch.arange(k, device=z.device)[None, :] < n_ent[:, None]
        ids, lp = torch.where(valid, top.indices, 0), torch.where(valid, top.values - lse, -torch.inf)
        if isinstance(rule, TopKTail):
            draws, has, log_norm = draw(z, p, lse, top.indices, rule.tail_draws, rule.proposal_temperature,
                                        generator, rule.systematic)
            tail = unique_draws(z, lse, draws, has)
    mass = torch.where(valid, torch.exp(lp.double()), 0.0).sum(-1)
    outs["ids"].append(host(ids.int()))
    outs["logprobs"].append(host(lp).astype(np.float32))
    outs["n_entries"].append(host(n_ent.int()))
    outs["label_logprob"].append(host(label_lp))
    outs["entropy"].append(host(entropy.clamp(min=0)))
    outs["tail_mass"].append(host((1.0 - mass).clamp(0.0, 1.0).float()))
    outs["argmax"].append(host(argmax.int()))
    outs["counts"].append(None if counts is None else host(counts.to(torch.int32)).astype(np.uint16))
    t_ids, t_lp, t_cnt, t_n = tail if tail is not None else (None,) * 4
    outs["tail_ids"].append(None if tail is None else host(t_ids.clamp(min=0).int()))
    outs["tail_logprobs"].append(None if tail is None else host(t_lp).astype(np.float32))
    outs["tail_counts"].append(None if tail is None else host(t_cnt.to(torch.int32)).astype(np.uint16))
    outs["n_tail"].append(None if tail is None else host(t_n.int()))
    outs["proposal_log_norm"].append(None if not rule.tempered else host(log_norm.float()))


def draw(z: torch.Tensor, p: torch.Tensor, lse: torch.Tensor, exclude: torch.Tensor | None, d: int,
         temperature: float, generator: torch.Generator | None, systematic: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``d`` inverse-CDF draws per row from ``q ∝ exp(lp / T)`` over the tokens not in ``exclude [C, K]``:
    independent, or ``systematic`` (the points ``(u + i) / d``, i < d, of one uniform u per row: each token
    is drawn ``floor(d q)`` or ``ceil(d q)`` times, ``d q`` on average).

    ``z``: the row-max-shifted logits ``[C, V]``, ``lse [C, 1]`` their normaliser (``lp = z - lse``);
    ``p``: the work buffer, which holds the softmax on entry (``normalise``) and the proposal's CDF on
    exit. Returns the draws ``[C, d]`` (long), which rows have any proposal mass ``[C]`` (rows without
    draw nothing), and ``log Z = logsumexp(lp / T)`` over the proposal's support ``[C]`` (float64).
    """
    if temperature != 1.0:
        torch.div(z, temperature, out=p).exp_()  # exp(z / T) <= 1: z's row max is 0
    if exclude is not None:
        p.scatter_(1, exclude, 0.0)
    p.cumsum_(1)
    total = p[:, -1].clone()
    c = p.shape[0]
    if systematic:
        u = (torch.rand((c, 1), generator=generator, dtype=torch.float64) + torch.arange(d, dtype=torch.float64)) / d
        u = u.float().to(p.device)
    else:
        u = torch.rand((c, d), generator=generator, dtype=torch.float32).to(p.device)
    u = u * total[:, None]
    idx = torch.searchsorted(p, u, right=True)
    past = (idx >= p.shape[1]).any(1)  # u * total rounded up to the total: rare, fixed for those rows only
    if bool(past.any()):
        rows = past.nonzero()[:, 0]
        last = (p[rows] < total[rows, None]).sum(1, keepdim=True)  # the last token of positive weight
        idx[rows] = torch.minimum(idx[rows], last)
    has = total > 0
    log_total = torch.log(total.double())
    log_norm = log_total if temperature == 1.0 else log_total - lse[:, 0].double() / temperature
    return idx, has, log_norm


def unique_draws(z: torch.Tensor, lse: torch.Tensor, draws: torch.Tensor, has: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draws ``[C, D]`` -> the unique ids ``[C, U]`` with their logprobs and counts, most likely first, and the
    number of unique ids per row (0 for rows that drew nothing); padding: id -1, logprob -inf, count 0."""
    c, d = draws.shape
    s = draws.sort(1).values
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    rank = first.cumsum(1) - 1  # the unique id's slot of each draw
    n = torch.where(has, first.sum(1), 0)
    u = max(1, int(n.max()) if n.numel() else 1)
    ids = torch.full((c, u), -1, dtype=torch.long, device=z.device).scatter_(1, rank, s)
    counts = torch.zeros((c, u), dtype=torch.int32, device=z.device).scatter_add_(
        1, rank, torch.ones_like(rank, dtype=torch.int32))
    valid = torch.arange(u, device=z.device)[None, :] < n[:, None]
    lp = torch.where(valid, z.gather(1, ids.clamp(min=0)) - lse, -torch.inf)
    order = lp.sort(dim=1, descending=True, stable=True).indices
    ids, lp, counts = ids.gather(1, order), lp.gather(1, order), counts.gather(1, order)
    return torch.where(valid, ids, -1), lp, torch.where(valid, counts, 0), n


def split(res: dict[str, np.ndarray], lengths: list[int]) -> list[Scored]:
    """Arrays over all positions of a batch -> one ``Scored`` per sequence."""
    out, a = [], 0
    for n in lengths:
        sl = slice(a, a + n)
        out.append(Scored(**{k: None if v is None else v[sl] for k, v in res.items()}))
        a += n
    return out
