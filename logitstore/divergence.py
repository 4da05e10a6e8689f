"""Divergences between distributions over buckets, per position, vectorised in numpy (float64).

``bucket_divergences(p, q)`` is the one definition: ``p`` and ``q`` are ``[N, B]``
probabilities over the same B buckets (each row sums to 1 up to rounding); KL both ways
is ``sum_b p_b log(p_b / q_b)`` with a zero ``p_b`` contributing 0 and a zero ``q_b``
floored at ``FLOOR`` (so KL stays finite), JS is over the midpoint, TVD is
``sum |p - q| / 2``. Its users:

- ``divergences`` (``logitstore diff``, and the SQL macros of ``logitstore.views`` by
  the same definition): two sparse distributions coarse-grained onto the ids they share
  plus one "other" bucket with the rest of each one's mass; exact for the coarse-grained
  pair and lower bounds of the full-vocabulary divergences. Inputs are padded ``[N, K]``
  arrays as the reader returns them (ids -1 and logprobs -inf where invalid).
- ``builders.score``: teacher and student over the teacher's stored support plus "other".
"""

from __future__ import annotations

import numpy as np

#: a zero bucket of the second distribution is floored at this inside the log, so KL stays finite
FLOOR = 1e-12


def coarse(ids_p: np.ndarray, lp_p: np.ndarray, ids_q: np.ndarray, lp_q: np.ndarray, chunk: int = 4096
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared-id probabilities ``[N, Kp]`` of p and of q (0 where an id of p is not in q's support), and the
    mask of shared entries. The other buckets are ``1 - sum`` of each."""
    n, kp = ids_p.shape
    pp = np.zeros((n, kp))
    qq = np.zeros((n, kp))
    shared = np.zeros((n, kp), bool)
    for a in range(0, n, chunk):
        sl = slice(a, a + chunk)
        ip, iq = ids_p[sl], ids_q[sl]
        eq = (ip[:, :, None] == iq[:, None, :]) & (ip[:, :, None] >= 0)  # [C, Kp, Kq]
        hit = eq.any(-1)
        j = eq.argmax(-1)
        shared[sl] = hit
        pp[sl] = np.where(hit, np.exp(lp_p[sl].astype(np.float64)), 0.0)
        qq[sl] = np.where(hit, np.exp(np.take_along_axis(lp_q[sl].astype(np.float64), j, -1)), 0.0)
    return pp, qq, shared


def with_other(x: np.ndarray) -> np.ndarray:
    """``[N, B]`` bucket probabilities plus one last bucket with the rest of the mass (``1 - sum``, >= 0)."""
    return np.concatenate([x, np.maximum(1.0 - x.sum(-1, keepdims=True), 0.0)], axis=-1)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``sum_b p_b log(p_b / q_b)`` per row: 0 where ``p_b = 0``, ``q_b`` floored at ``FLOOR``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p / np.maximum(q, FLOOR)), 0.0)
    return t.sum(-1)


def bucket_divergences(p: np.ndarray, q: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of ``[N, B]`` bucket probabilities: ``kl_pq``, ``kl_qp``, ``js``, ``tvd``."""
    m = (p + q) / 2
    return {"kl_pq": kl(p, q), "kl_qp": kl(q, p), "js": 0.5 * kl(p, m) + 0.5 * kl(q, m),
            "tvd": 0.5 * np.abs(p - q).sum(-1)}


def divergences(ids_p, lp_p, ids_q, lp_q) -> dict[str, np.ndarray]:
    """Per position: ``kl_pq``, ``kl_qp``, ``js``, ``tvd`` over shared ids + other, and ``top1_agree``."""
    pp, qq, _ = coarse(ids_p, lp_p, ids_q, lp_q)
    return {**bucket_divergences(with_other(pp), with_other(qq)), "top1_agree": ids_p[:, 0] == ids_q[:, 0]}
