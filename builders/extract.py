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
from logitstore.rules import MassTopK, Rule, Sampled, TopK


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


@torch.no_grad()
def extract(h: torch.Tensor, head: Head, labels: torch.Tensor, rule: Rule, *, chunk_rows: int,
            generator: torch.Generator | None = None) -> dict[str, np.ndarray]:
    """``h [M, H]``, ``labels [M]`` -> arrays over the M positions (see ``Scored``).

    Two ``[chunk_rows, V]`` float32 buffers are allocated once and every step works in
    them in place, so peak memory does not depend on M or on the allocator.
    """
    outs: dict[str, list] = {k: [] for k in ("ids", "logprobs", "n_entries", "label_logprob", "entropy",
                                              "tail_mass", "argmax", "counts")}
    if h.shape[0]:
        for sl, z, p in logit_chunks(h, head, Buffers(head, min(chunk_rows, h.shape[0]), h.device)):
            _extract_chunk(z, p, labels[sl], rule, generator, outs)
    if not outs["ids"]:
        k = 1 if isinstance(rule, Sampled) else rule.k
        empty = {"ids": np.zeros((0, k), np.int32), "logprobs": np.zeros((0, k), np.float32),
                 "counts": np.zeros((0, k), np.uint16) if isinstance(rule, Sampled) else None}
        return {**{n: np.zeros(0, np.float32) for n in ("label_logprob", "entropy", "tail_mass")},
                "n_entries": np.zeros(0, np.int32), "argmax": np.zeros(0, np.int32), **empty}
    res = {}
    for name, parts in outs.items():
        if name == "counts" and not isinstance(rule, Sampled):
            res[name] = None
        elif name in ("ids", "logprobs", "counts"):
            width = max(p.shape[1] for p in parts)
            fill = {"ids": 0, "logprobs": -np.inf, "counts": 0}[name]
            res[name] = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=fill)
                                        for p in parts])
        else:
            res[name] = np.concatenate(parts)
    return res


def _extract_chunk(z: torch.Tensor, p: torch.Tensor, labels: torch.Tensor, rule: Rule, generator, outs) -> None:
    """``z``: raw logits [C, V] (overwritten), ``p``: a work buffer of the same shape."""
    lse, entropy, label_lp, argmax = normalise(z, p, labels)
    counts = None
    if isinstance(rule, Sampled):
        draws = torch.multinomial(p, rule.draws, replacement=True, generator=generator)
        hits = p.zero_().scatter_add_(1, draws, torch.ones_like(draws, dtype=p.dtype))  # p is free now
        n_ent = (hits > 0).sum(-1).clamp(max=rule.k)
        width = int(n_ent.max()) if n_ent.numel() else 1
        # the sampled ids, most likely first: top-k of the logits restricted to the hits
        top = z.masked_fill_(hits == 0, -torch.inf).topk(width, dim=-1)
        counts = hits.gather(1, top.indices)
        valid = torch.arange(width, device=z.device)[None, :] < n_ent[:, None]
        counts = torch.where(valid, counts, 0)
    else:
        k = min(rule.k, z.shape[1])
        top = z.topk(k, dim=-1)
        if isinstance(rule, MassTopK):
            mass = torch.exp(top.values - lse).cumsum(-1)
            n_ent = ((mass < rule.p).sum(-1) + 1).clamp(max=k)
        else:
            assert isinstance(rule, TopK)
            n_ent = torch.full((z.shape[0],), k, device=z.device)
        valid = torch.arange(k, device=z.device)[None, :] < n_ent[:, None]
    lp = torch.where(valid, top.values - lse, -torch.inf)
    tail = (1.0 - torch.where(valid, torch.exp(lp.double()), 0.0).sum(-1)).clamp(0.0, 1.0)
    host = lambda t: t.cpu().numpy()  # noqa: E731 - results leave the device here, once per chunk
    outs["ids"].append(host(torch.where(valid, top.indices, 0).int()))
    outs["logprobs"].append(host(lp).astype(np.float32))
    outs["n_entries"].append(host(n_ent.int()))
    outs["label_logprob"].append(host(label_lp))
    outs["entropy"].append(host(entropy.clamp(min=0)))
    outs["tail_mass"].append(host(tail.float()))
    outs["argmax"].append(host(argmax.int()))
    if counts is not None:
        outs["counts"].append(host(counts.to(torch.int32)).astype(np.uint16))


def split(res: dict[str, np.ndarray], lengths: list[int]) -> list[Scored]:
    """Arrays over all positions of a batch -> one ``Scored`` per sequence."""
    out, a = [], 0
    for n in lengths:
        sl = slice(a, a + n)
        out.append(Scored(**{k: None if v is None else v[sl] for k, v in res.items()}))
        a += n
    return out
