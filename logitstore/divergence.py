"""Divergences between two sparse distributions per position, vectorised in numpy.

The same definition as the SQL macros of ``logitstore.query``: both distributions are
coarse-grained onto the ids they share plus one "other" bucket with the rest of each
one's mass, and KL / JS / TVD are computed over those buckets. The results are exact
for the coarse-grained pair and lower bounds of the full-vocabulary divergences.

Inputs are padded ``[N, K]`` arrays as the reader returns them (ids -1 and logprobs
-inf where invalid).
"""

from __future__ import annotations

import numpy as np

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


def _with_other(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.maximum(1.0 - x.sum(-1, keepdims=True), 0.0)], axis=-1)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p / np.maximum(q, FLOOR)), 0.0)
    return t.sum(-1)


def divergences(ids_p, lp_p, ids_q, lp_q) -> dict[str, np.ndarray]:
    """Per position: ``kl_pq``, ``kl_qp``, ``js``, ``tvd`` over shared ids + other, and ``top1_agree``."""
    pp, qq, _ = coarse(ids_p, lp_p, ids_q, lp_q)
    p, q = _with_other(pp), _with_other(qq)
    m = (p + q) / 2
    return {
        "kl_pq": _kl(p, q), "kl_qp": _kl(q, p), "js": 0.5 * _kl(p, m) + 0.5 * _kl(q, m),
        "tvd": 0.5 * np.abs(p - q).sum(-1), "top1_agree": ids_p[:, 0] == ids_q[:, 0],
    }
