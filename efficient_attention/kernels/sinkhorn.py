r"""Numba kernels for log-space Sinkhorn normalisation (non-causal) and its unrolled backward.

``sinkhorn_reference`` / ``sinkhorn_backward_reference`` below are the plain
NumPy twins, in the kernels' array layout, of the same steps that the
chapter's :func:`efficient_attention.sinkhorn.sinkhorn` and
:func:`~efficient_attention.sinkhorn.sinkhorn_backward` derive (written again
here so that the kernels floor imports nothing above it); the tests assert
that kernel, twin and chapter agree.

Why a kernel: NumPy spends most of a Sinkhorn round in separate passes
(max, subtract, exp, sum, log, subtract) and in strided column reductions;
here a round is one fused row sweep and three column sweeps over a matrix
that stays in cache row by row, with one ``exp`` per entry and per step.
``prange`` runs over the independent ``(batch × heads)`` matrices; each
thread owns its matrix, its normalisers and its scratch vectors.

Layout: ``log_p`` ``(BH, n, n)`` (overwritten by the final ``log P``),
``norms`` ``(BH, 2·n_iters, n)`` (step ``2t`` the row log-sum-exps of round
``t``, step ``2t+1`` the column ones; an all ``-inf`` row or column is left
alone and its normaliser stored as 0). Sums accumulate in float64.
"""
import numpy as np
from numba import njit, prange

from ..config import JIT_PARALLEL

__all__ = ["sinkhorn_kernel", "sinkhorn_backward_kernel", "sinkhorn_reference",
           "sinkhorn_backward_reference"]


@njit(**JIT_PARALLEL)
def sinkhorn_kernel(log_p, norms):
    """In place: ``n_iters = norms.shape[1] // 2`` rounds of row then column log-normalisation."""
    n_batch, n, _ = log_p.shape
    n_iters = norms.shape[1] // 2
    for b in prange(n_batch):
        x = log_p[b]
        colmax = np.empty(n, np.float64)
        colsum = np.empty(n, np.float64)
        for it in range(n_iters):
            for i in range(n):                                 # L[i] -= lse(L[i])
                m = -np.inf
                for j in range(n):
                    if x[i, j] > m:
                        m = x[i, j]
                r = 0.0
                if m > -np.inf:
                    s = 0.0
                    for j in range(n):
                        s += np.exp(x[i, j] - m)
                    r = m + np.log(s)
                for j in range(n):
                    x[i, j] -= r
                norms[b, 2 * it, i] = r
            for j in range(n):
                colmax[j] = -np.inf
                colsum[j] = 0.0
            for i in range(n):                                 # column maxima, row-major sweep
                for j in range(n):
                    if x[i, j] > colmax[j]:
                        colmax[j] = x[i, j]
            for i in range(n):
                for j in range(n):
                    if colmax[j] > -np.inf:
                        colsum[j] += np.exp(x[i, j] - colmax[j])
            for j in range(n):                                 # c_j = lse_i L[i, j]
                c = 0.0
                if colmax[j] > -np.inf:
                    c = colmax[j] + np.log(colsum[j])
                norms[b, 2 * it + 1, j] = c
            for i in range(n):
                for j in range(n):
                    x[i, j] -= norms[b, 2 * it + 1, j]


@njit(**JIT_PARALLEL)
def sinkhorn_backward_kernel(g, post, norms):
    """In place: ``g`` from dL(final) to dL(0); ``post`` from the final log P back to L(0).

    Step ``L_post = L_pre − lse`` (over rows or columns) has backward
    ``dL_pre = dL_post − exp(L_post) ⊙ Σ dL_post`` over the same axis, and
    ``L_pre = L_post + lse``.
    """
    n_batch, n, _ = g.shape
    n_steps = norms.shape[1]
    for b in prange(n_batch):
        gb = g[b]
        xb = post[b]
        colsum = np.empty(n, np.float64)
        for step in range(n_steps - 1, -1, -1):
            if step % 2 == 1:                                  # column step
                for j in range(n):
                    colsum[j] = 0.0
                for i in range(n):
                    for j in range(n):
                        colsum[j] += gb[i, j]
                for i in range(n):
                    for j in range(n):
                        gb[i, j] -= np.exp(xb[i, j]) * colsum[j]
                        xb[i, j] += norms[b, step, j]
            else:                                              # row step
                for i in range(n):
                    rs = 0.0
                    for j in range(n):
                        rs += gb[i, j]
                    r = norms[b, step, i]
                    for j in range(n):
                        gb[i, j] -= np.exp(xb[i, j]) * rs
                        xb[i, j] += r


def _lse(x, axis):
    """log-sum-exp along ``axis`` (kept), an all ``-inf`` line counting as 0."""
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    with np.errstate(divide="ignore"):
        out = top + np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True))
    return np.where(np.isneginf(out), 0, out)


def sinkhorn_reference(log_p, norms):
    """NumPy twin of :func:`sinkhorn_kernel` (same layout, same in-place contract): round ``i``
    subtracts the row log-sum-exp (``norms[:, 2i]``), then the column one (``norms[:, 2i+1]``)."""
    for i in range(norms.shape[1] // 2):
        r = _lse(log_p, -1)                                    # L ← L − lse_row(L)
        log_p -= r
        norms[:, 2 * i, :] = r[..., 0]
        c = _lse(log_p, -2)                                    # L ← L − lse_col(L)
        log_p -= c
        norms[:, 2 * i + 1, :] = c[..., 0, :]


def sinkhorn_backward_reference(g, post, norms):
    """NumPy twin of :func:`sinkhorn_backward_kernel` (same layout, same in-place contract):
    the steps in reverse, ``dL_pre = dL_post − exp(L_post) ⊙ Σ dL_post`` over the step's axis,
    ``L_pre = L_post + normaliser`` (``post`` ends as the logits before the first step)."""
    for step in range(norms.shape[1] - 1, -1, -1):
        p_post = np.exp(post)
        if step % 2:                                           # column step
            g -= p_post * g.sum(axis=-2, keepdims=True)
            post += norms[:, step, None, :]
        else:                                                  # row step
            g -= p_post * g.sum(axis=-1, keepdims=True)
            post += norms[:, step, :, None]
