r"""Chapter 0 — full softmax attention, the oracle.

Every query attends to every key:

.. math::

    S = s\,QK^\top \in \mathbb{R}^{N\times M},\qquad
    P = \operatorname{softmax}_\text{rows}(S + \text{mask}),\qquad
    O = PV,

with ``s = 1/sqrt(D)`` by default (Vaswani et al. 2017, arXiv:1706.03762,
§3.2.1). It costs ``2·N·M·(D + Dv)`` FLOPs and holds the ``N × M`` matrix:
the quadratic cost that every other chapter removes.

Backward (``dO`` the upstream gradient), one chain-rule step a line:

.. math::

    dV = P^\top dO,\quad dP = dO\,V^\top,\quad
    dS = P \odot \big(dP - \operatorname{rowsum}(P \odot dP)\big)
         = P \odot \big(dP - \operatorname{rowsum}(dO \odot O)\big),\quad
    dQ = s\,dS\,K,\quad dK = s\,dS^\top Q.

The cache keeps the per-row log-sum-exp instead of ``P`` (``P`` is recomputed
as ``exp(S - lse)``), which is what the memory-efficient variants do too.

This module is written to be read and trusted; it is the reference the rest
of the library (and outside implementations) are tested against.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .core import AttentionCore, Cost, Grads
from .ops import attend_block, attend_block_backward
from .validate import (check_bool, check_cache, check_dout, check_mask, check_qkv, check_scale,
                       resolve_scale, finite_policy)

__all__ = ["DenseAttention", "causal_mask"]


def causal_mask(n: int, m: int | None = None) -> np.ndarray:
    """Boolean ``(N, M)`` mask allowing key ``j`` for query ``i`` iff ``j <= i``."""
    m = n if m is None else m
    return np.arange(m)[None, :] <= np.arange(n)[:, None]


class _DenseCache(NamedTuple):
    q: np.ndarray       # (..., N, D)
    k: np.ndarray       # (..., M, D)
    v: np.ndarray       # (..., M, Dv)
    mask: np.ndarray | None   # broadcastable to (..., N, M)
    out: np.ndarray     # (..., N, Dv)
    lse: np.ndarray     # (..., N)
    scale: float


def _forward(q, k, v, mask, scale):
    out, lse = attend_block(q, k, v, mask, scale)          # O = softmax(s QKᵀ) V, lse   (..., N, Dv), (..., N)
    return out, _DenseCache(q, k, v, mask, out, lse, scale)


def _backward(cache: _DenseCache, dout):
    q, k, v, mask, out, lse, scale = cache
    # rowsum(P ⊙ dP) = rowsum(dO ⊙ O) because O = PV: N·Dv work instead of a pass over N×M
    delta = np.sum(dout * out, axis=-1)                    # δ                    (..., N)
    return attend_block_backward(q, k, v, mask, scale, lse, delta, dout)   # P from lse, then dV, dS, dQ, dK


class DenseAttention(AttentionCore):
    r"""Full softmax attention ``softmax(scale·QKᵀ + mask)·V`` — the oracle.

    Parameters
    ----------
    causal : bool
        Allow key ``j`` for query ``i`` only when ``j <= i`` (also for ``N != M``).
    scale : float, optional
        Multiplies the scores; ``1/sqrt(D)`` when None.

    Notes
    -----
    ``forward(q, k, v, mask=None, *, check_finite=True)`` with ``q (..., N, D)``,
    ``k (..., M, D)``, ``v (..., M, Dv)``; ``mask`` is a boolean array
    broadcastable to ``(..., N, M)`` or a ``scipy.sparse`` ``(N, M)`` pattern
    (True = may attend; combined with ``causal`` by logical and). A query with
    no allowed key outputs zeros and receives zero gradient. ``check_finite=True``
    rejects NaN and Inf in ``q, k, v`` (and in ``dout`` for ``backward``);
    with ``check_finite=False`` they propagate: a NaN in query ``i`` makes output
    row ``i`` NaN, one in key ``j`` every row that may attend to ``j``, one in value
    ``j`` every row (``P·V`` multiplies it by the zeros of masked entries too).

    Examples
    --------
    >>> import numpy as np, efficient_attention as ea
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    >>> out, cache = ea.DenseAttention(causal=True).forward(q, k, v)
    >>> out.shape
    (2, 5, 4)
    >>> np.allclose(out[:, 0], v[:, 0])      # the first query sees only the first key
    True
    """

    def __init__(self, causal: bool = False, scale: float | None = None):
        self.causal = check_bool(causal, "causal")
        self.scale = check_scale(scale)

    def options(self):
        return {"causal": self.causal, "scale": self.scale}

    @finite_policy
    def forward(self, q, k, v, mask=None, *, check_finite: bool = True):
        """The output and what ``backward`` needs, with a mask.

        Parameters
        ----------
        q, k, v, check_finite
            As for :meth:`~efficient_attention.AttentionCore.forward`: ``(..., N, D)``, ``(..., M, D)``,
            ``(..., M, Dv)``.
        mask : numpy.ndarray or scipy.sparse.csr_array, optional
            Boolean, True where query ``i`` may attend to key ``j``: an array broadcastable
            to ``(..., N, M)`` or a ``scipy.sparse`` ``(N, M)`` pattern; combined with
            ``causal`` by logical and.

        Returns
        -------
        out, cache
            As for :meth:`~efficient_attention.AttentionCore.forward`.
        """
        q, k, v = check_qkv(q, k, v, check_finite=check_finite)
        n, m = q.shape[-2], k.shape[-2]
        mask = check_mask(mask, n, m, q.shape[:-2])
        if mask is not None and not isinstance(mask, np.ndarray):
            mask = mask.toarray()                          # the oracle works on the dense mask
        if self.causal:
            mask = causal_mask(n, m) if mask is None else (mask & causal_mask(n, m))
        scale = resolve_scale(self.scale, q.shape[-1])
        return _forward(q, k, v, mask, scale)

    @finite_policy
    def backward(self, cache: _DenseCache, dout, *, check_finite: bool = True) -> Grads:
        check_cache(cache, _DenseCache, "DenseAttention")
        dout = check_dout(dout, cache.out.shape, cache.out.dtype, check_finite=check_finite)
        dq, dk, dv = _backward(cache, dout)
        return Grads(dq, dk, dv, {})

    def dense_mask(self, n, m=None):
        return causal_mask(n, m) if self.causal else None

    def cost(self, n, d, dv=None, m=None, *, backward=False):
        dv = d if dv is None else dv
        m = n if m is None else m
        if backward:   # S again, dV, dP, dQ, dK
            return Cost(2 * n * m * (3 * d + 2 * dv), 2 * n * m + n * d + m * (d + dv))
        return Cost(2 * n * m * (d + dv), n * m + n * dv + n)


def _register():
    from .core import register
    register("dense", DenseAttention, chapter=0, description="full softmax attention (the oracle)")
    register("dense_causal", DenseAttention, chapter=0, config={"causal": True},
             description="full softmax attention, causal")


_register()
