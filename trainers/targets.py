"""The teacher's side of a distillation loss: what a cache says of N positions, and the estimates formed from it.

``SparseTargets`` holds, per position, the head entries (ids, validity, full-vocabulary
logprobs at T = 1), the tail mass ``m`` outside them, the label and its exact logprob, and
what a sampling rule drew: the counts of a sampled cache, or the tail draws of a
``topk_tail`` cache (ids, logprobs, counts), with the proposal's temperature and
log-normaliser. ``support()`` is every id the cache names at a position (head, then tail
draws). ``estimate()`` is the unbiased estimate of the teacher distribution on that support
(FORMAT.md, "Sparse entries"):

- sampled cache (no head): ``p_hat_x = (c_x / D) * w_x``;
- ``topk_tail``: ``p_hat_j = p_j`` on the exact head, ``(c_x / D) * w_x`` on the tail draws;

with the importance weight ``w_x = p_x / q_x = exp(lp_x (1 - 1/T) + log Z)`` of the proposal
``q_x = exp(lp_x / T - log Z)`` (T = 1: ``w = 1`` for a sampled cache, ``w = m`` for the tail).
``E[p_hat_x] = p_x`` for every x (0 outside the support), so a forward-KL or cross-entropy
gradient formed with ``p_hat`` as target weights is unbiased for the full-vocabulary one.
``estimate_exact_label()`` is the same estimator with the label as a control: the label's target is its
exact ``exp(label_logprob)`` (stored for every position) wherever the head does not hold it, and the
draws of the label count 0. Every id's estimate stays unbiased and the label's has no variance: at
proposal temperature T the draw of a rare label has weight ``(c/D) * p/q``, far above ``p`` when drawn
and 0 otherwise, and the label is the token a held-out cross-entropy scores.
``estimate(design="inclusion")`` weighs a drawn id by whether it was drawn, not how often:
``p_hat_x = p_x / pi_x`` with ``pi_x`` the chance of drawing it at all (Horvitz-Thompson; ``1 - (1 - q_x)^D``
for independent draws, ``min(1, D q_x)`` for systematic ones), unbiased and never more variable per id.
``residual()`` is RS-KD's "residual mass to the ground truth" target of a top-k cache: the head
``p_j`` plus the tail mass ``m`` on the label (biased; Anshumann et al. 2025, slide 13).
"""

from __future__ import annotations

import dataclasses

import torch

from logitstore.codec import Codec
from logitstore.errors import InvalidInputError
from trainers.config import ESTIMATORS


@dataclasses.dataclass
class SparseTargets:
    """The teacher side of N cached positions (K entry columns and U tail-draw columns, padded)."""

    ids: torch.Tensor  # [N, K] long, most likely first; any value where ~valid
    valid: torch.Tensor  # [N, K] bool
    logprobs: torch.Tensor | None  # [N, K] full-vocabulary log-softmax at T = 1, -inf where ~valid
    tail_mass: torch.Tensor  # [N] 1 - sum exp(logprobs) over the valid entries (the head under topk_tail)
    labels: torch.Tensor  # [N] long, the actual next tokens
    vocab_size: int  # V of the teacher
    counts: torch.Tensor | None = None  # [N, K] draws that hit each id (sampled caches), 0 where ~valid
    draws: int | None = None  # D, the draws per position (sampled caches and topk_tail)
    label_logprob: torch.Tensor | None = None  # [N] the teacher's exact logprob of the label
    tail_ids: torch.Tensor | None = None  # [N, U] long, topk_tail: the unique tail draws
    tail_valid: torch.Tensor | None = None  # [N, U] bool
    tail_logprobs: torch.Tensor | None = None  # [N, U] exact logprobs of the tail draws, -inf where ~tail_valid
    tail_counts: torch.Tensor | None = None  # [N, U] draws per tail id, 0 where ~tail_valid
    proposal_temperature: float = 1.0  # T of the proposal q ∝ p^(1/T) the draws came from
    proposal_log_norm: torch.Tensor | None = None  # [N] log Z of the proposal (T != 1)
    systematic: bool = False  # the draws are systematic (rules.draw), not independent
    capped: bool = False  # a sampled cache kept at most k < D unique draws (rules.Sampled): a draw may be left out
    entropy: torch.Tensor | None = None  # [N] the teacher's full-vocabulary entropy (nats, T = 1)
    codec: Codec | None = None  # how the values were stored (their decoding error); None: exact

    def __post_init__(self):
        nk = tuple(self.ids.shape)
        want = {"ids": nk, "valid": nk, "logprobs": nk, "counts": nk, "tail_mass": nk[:1], "labels": nk[:1],
                "label_logprob": nk[:1], "proposal_log_norm": nk[:1], "entropy": nk[:1]}
        if self.tail_ids is not None:
            nu = tuple(self.tail_ids.shape)
            want.update(tail_valid=nu, tail_logprobs=nu, tail_counts=nu)
            if len(nu) != 2 or nu[0] != nk[0] or self.tail_valid is None or self.tail_counts is None \
                    or self.tail_logprobs is None:
                raise InvalidInputError(f"tail_ids has shape {nu}; it must be [N, U] with N = {nk[0]}, with "
                                        "tail_valid, tail_logprobs and tail_counts")
        for name, shape in want.items():
            t = getattr(self, name)
            if len(nk) != 2 or (t is not None and tuple(t.shape) != shape):
                raise InvalidInputError(f"{name} has shape {tuple(t.shape)}; ids must be [N, K] and {name} {shape}")
        sampling = self.counts is not None or self.tail_ids is not None
        if sampling and not (isinstance(self.draws, int) and self.draws >= 1):
            raise InvalidInputError(f"draws={self.draws!r} with counts or tail draws given; it must be an int >= 1")
        if (self.proposal_temperature != 1.0) != (self.proposal_log_norm is not None):
            raise InvalidInputError("proposal_log_norm goes with a proposal_temperature != 1, and only there")

    @property
    def sampled(self) -> bool:
        """Whether these targets carry draws (an unbiased estimator applies)."""
        return self.counts is not None or self.tail_ids is not None

    def support(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ids, valid, logprobs) of every id the cache names per position: the head, then the tail draws."""
        if self.tail_ids is None:
            return self.ids, self.valid, self.logprobs
        return (torch.cat([self.ids, self.tail_ids], 1), torch.cat([self.valid, self.tail_valid], 1),
                None if self.logprobs is None else torch.cat([self.logprobs, self.tail_logprobs], 1))

    def _log_proposal(self, lp: torch.Tensor) -> torch.Tensor:
        """``log q_x`` of draws with logprobs ``lp [N, M]``: ``lp_x / T - log Z``; at T = 1, ``lp_x`` for a sampled
        cache and ``lp_x - log m`` for the tail of a ``topk_tail`` one."""
        if self.proposal_temperature != 1.0:
            return lp / self.proposal_temperature - self.proposal_log_norm.to(lp)[:, None]
        if self.tail_ids is None:
            return lp
        return lp - torch.log(self.tail_mass.to(lp).clamp_min(torch.finfo(lp.dtype).tiny))[:, None]

    def _importance(self, lp: torch.Tensor) -> torch.Tensor:
        """``p_x / q_x`` of draws with logprobs ``lp [N, M]`` under the tempered proposal."""
        return torch.exp(lp - self._log_proposal(lp))

    def _inclusion(self, lp: torch.Tensor) -> torch.Tensor:
        """``pi_x``, the chance that the D draws from the proposal hit ``x`` at least once, for draws with logprobs
        ``lp [N, M]``: ``1 - (1 - q_x)^D`` for independent draws, ``min(1, D q_x)`` for systematic ones (D points
        spaced 1/D apart, at a uniform offset, hit an interval of length q_x)."""
        q = torch.exp(self._log_proposal(lp)).clamp(0.0, 1.0)
        if self.systematic:
            return (self.draws * q).clamp(max=1.0)
        return -torch.expm1(self.draws * torch.log1p(-q))

    def estimate(self, dtype: torch.dtype = torch.float32, design: str = "auto") -> torch.Tensor:
        """The unbiased estimate ``p_hat [N, S]`` of the teacher distribution on ``support()`` (module docstring);
        0 where a column is not valid. ``design``: ``"counts"`` weighs each draw by how often it was drawn
        (``(c_x / D) * p_x / q_x``); ``"inclusion"`` by whether it was drawn at all (``p_x / pi_x``, the
        Horvitz-Thompson estimator: the counts' estimate averaged over the draws with the same drawn set of each
        id, so never more variable per id; needs the stored logprobs and every draw kept); ``"auto"``: inclusion
        where the draws' logprobs are there and no cap left draws out, else counts."""
        if not self.sampled:
            raise InvalidInputError("these targets carry no draws (a top-k or mass cache): the unbiased estimator "
                                    "needs a cache built with --sample D or --top-k K --tail-draws D")
        if design not in ESTIMATORS:
            raise InvalidInputError(f"design={design!r} is not allowed; it must be 'auto', 'counts' or 'inclusion'")
        tempered = self.proposal_temperature != 1.0
        sampled_only = self.tail_ids is None  # a sampled cache: every entry is a draw
        valid = self.valid if sampled_only else self.tail_valid
        lp = self.logprobs if sampled_only else self.tail_logprobs
        if design == "auto":
            design = "counts" if lp is None or self.capped else "inclusion"
        if design == "inclusion":
            if self.capped:
                raise InvalidInputError("the inclusion-probability estimator needs every draw kept; this cache kept "
                                        "at most k < D unique draws per position (build --sample D --top-k k): use "
                                        "counts")
            if lp is None:
                raise InvalidInputError("the inclusion-probability estimator needs the draws' logprobs; this cache "
                                        "stores only ids and counts (built with values none)")
            lp = torch.where(valid, lp.to(dtype), 0.0)
            w = torch.exp(lp) / self._inclusion(lp).clamp_min(torch.finfo(dtype).tiny)
        else:
            w = (self.counts if sampled_only else self.tail_counts).to(dtype) / self.draws
            if tempered:
                w = w * self._importance(torch.where(valid, lp.to(dtype), 0.0))
            elif not sampled_only:
                w = w * self.tail_mass.to(dtype).clamp(0.0, 1.0)[:, None]
        w = torch.where(valid, w, 0.0)
        if sampled_only:
            return w
        head = torch.where(self.valid, torch.exp(self.logprobs.to(dtype)), 0.0)
        return torch.cat([head, w], 1)

    def estimate_exact_label(self, dtype: torch.dtype = torch.float32, design: str = "auto"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(``p_hat [N, S]`` on ``support()`` with the label's draws at 0, ``p_label [N]``): the label's exact target
        where the head does not hold it (0 where it does; the head's own column is exact). Unbiased for every id
        (module docstring)."""
        if self.label_logprob is None:
            raise InvalidInputError("the exact-label estimator needs targets.label_logprob (the teacher's exact "
                                    "label logprob)")
        w = self.estimate(dtype, design)
        ids, valid, _ = self.support()
        is_label = (ids == self.labels[:, None]) & valid
        k = 0 if self.tail_ids is None else self.ids.shape[1]  # the exact head's columns (none in a sampled cache)
        in_head = is_label[:, :k].any(1)
        w = torch.where(is_label & (torch.arange(ids.shape[1], device=ids.device) >= k), 0.0, w)
        p_label = torch.where(in_head, 0.0, torch.exp(self.label_logprob.to(dtype)))
        return w, p_label

    def outside_mass(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The teacher's mass outside ``support()`` [N], in [0, 1]: the tail mass less the tail draws' exact mass."""
        m = self.tail_mass.to(dtype)
        if self.tail_ids is not None:
            m = m - torch.where(self.tail_valid, torch.exp(self.tail_logprobs.to(dtype)), 0.0).sum(-1)
        return m.clamp(0.0, 1.0)

    def tail_entropy(self, dtype: torch.dtype = torch.float64, max_error: float = 0.25) -> torch.Tensor:
        """The entropy of the teacher's distribution over the ids outside ``support()``, renormalised, [N] (nats):
        ``H_out = (H - sum_S -p_x log p_x) / m + log m`` with H the exact full-vocabulary entropy, S the support
        and m the mass outside it (clipped at 0 below). NaN where it is not determined to within ``max_error``
        nats: the stored values' decoding error (``codec``) enters divided by m, first order
        ``(sum_S p_x |1 + log p_x| e_x + e_H + e_m |1 + log m - H_out|) / m`` with ``e`` the codec's bounds (so
        a quantised cache leaves out the positions with a small tail), or no entropy stored."""
        if self.entropy is None:
            raise InvalidInputError("the teacher's tail entropy needs targets.entropy (the cache's exact entropy)")
        _, valid, lp = self.support()
        if lp is None:
            raise InvalidInputError("the teacher's tail entropy needs the entries' logprobs (this cache stores none)")
        lp = torch.where(valid, lp.to(dtype), 0.0)
        p = torch.where(valid, torch.exp(lp), 0.0)
        inside = -(p * lp).sum(-1)
        m = self.outside_mass(dtype)
        big = m.clamp(min=torch.finfo(dtype).tiny)
        h = self.entropy.to(dtype)
        out = ((h - inside) / big + torch.log(big)).clamp(min=0.0)
        codec = self.codec or Codec(values="fp32")
        err = (p * (1 + lp).abs() * torch.where(valid, codec.logprob_errors(lp), 0.0)).sum(-1) \
            + codec.scalar_error(h) + codec.scalar_error(m) * (1 + torch.log(big) - out).abs()
        return torch.where((m > 0) & torch.isfinite(out) & (err <= max_error * big), out, torch.nan)

    def residual(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RS-KD's top-k target with the residual mass on the label: (ids ``[N, K + 1]``, target ``t [N, K + 1]``,
        valid) where column K is the label; when the label is among the head entries its column gets ``m``
        added and column K is empty. ``t`` sums to 1 per position (up to the codec's rounding)."""
        if self.logprobs is None:
            raise InvalidInputError("tail 'residual' needs the head's logprobs (this cache stores none)")
        head = torch.where(self.valid, torch.exp(self.logprobs.to(dtype)), 0.0)
        m = self.tail_mass.to(dtype).clamp(0.0, 1.0)
        in_head = (self.ids == self.labels[:, None]) & self.valid
        head = head + torch.where(in_head, m[:, None], 0.0)
        extra = torch.where(in_head.any(1), 0.0, m)
        ids = torch.cat([self.ids, self.labels[:, None]], 1)
        valid = torch.cat([self.valid, ~in_head.any(1, keepdim=True)], 1)
        return ids, torch.cat([head, extra[:, None]], 1), valid
