r"""Row kernels of the banded attention (:mod:`efficient_attention.local`), float32, beside
their NumPy references.

The banded attention computes each block's scores and its products with BLAS; what is left
is elementwise work on a ``(rows, L)`` float32 score block, one row at a time:

* :func:`softmax_rows` — forward: ``S <- exp(S - m)`` with the row maximum ``m``, and the
  row sums ``l = Σ exp(S - m)``;
* :func:`exp_rows` — backward: ``S <- exp(S - ℓ)`` with the saved log-sum-exp ``ℓ``
  (the probabilities ``P``);
* :func:`dsoftmax_rows` — backward: ``dP <- P ⊙ (dP - δ)``, ``δ = rowsum(P ⊙ dP)``.

numpy runs each of these as several full passes over the block and its float32 ``exp`` is
not vectorised on this CPU; here each row is handled while it sits in the L1 cache and the
exponential is :func:`~efficient_attention.kernels.fastexp.exp32_shift_inplace`. The kernels
release the GIL (the banded attention runs them on several Python threads).

Rows whose scores are all ``-inf`` (no allowed key) give ``m = -inf``, ``l = 0`` and a row of
zeros, like :mod:`efficient_attention.softmax`.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..config import JIT
from .fastexp import exp32_shift_inplace

__all__ = ["softmax_rows", "exp_rows", "dsoftmax_rows",
           "softmax_rows_reference", "exp_rows_reference", "dsoftmax_rows_reference"]


@njit(**JIT)
def softmax_rows(s, row_max, row_sum):
    """In place on ``s (R, L)`` float32: ``s[r] <- exp(s[r] - m_r)``; ``row_max[r] = m_r``,
    ``row_sum[r] = Σ_t s[r, t]`` (after the exponential)."""
    R, L = s.shape
    for r in range(R):
        row = s[r]
        m = -np.inf
        for t in range(L):
            m = max(m, row[t])
        row_max[r] = m
        if m == -np.inf:                                      # nothing allowed: a zero row
            for t in range(L):
                row[t] = 0.0
            row_sum[r] = 0.0
            continue
        exp32_shift_inplace(row, m)
        total = np.float32(0.0)
        for t in range(L):
            total += row[t]
        row_sum[r] = total


@njit(**JIT)
def exp_rows(s, shift):
    """In place on ``s (R, L)`` float32: ``s[r] <- exp(s[r] - shift[r])``
    (``shift[r] = -inf``: a zero row)."""
    for r in range(s.shape[0]):
        if shift[r] == -np.inf:
            for t in range(s.shape[1]):
                s[r, t] = 0.0
        else:
            exp32_shift_inplace(s[r], shift[r])


@njit(**JIT)
def dsoftmax_rows(p, dp):
    """In place on ``dp (R, L)`` float32: ``dp[r] <- p[r] ⊙ (dp[r] - δ_r)`` with
    ``δ_r = Σ_t p[r, t] dp[r, t]`` (the softmax's backward on one row)."""
    R, L = p.shape
    for r in range(R):
        delta = np.float32(0.0)
        for t in range(L):
            delta += p[r, t] * dp[r, t]
        for t in range(L):
            dp[r, t] = p[r, t] * (dp[r, t] - delta)


# ---------------------------------------------------------------------------------------------
# NumPy references (same results up to float32 rounding; the tests compare them)

def softmax_rows_reference(s):
    """``(exp(s - m), m, l)`` for ``s (R, L)``; all ``-inf`` rows give zeros, ``-inf``, 0."""
    s = np.asarray(s, dtype=np.float32)
    m = s.max(axis=-1)
    safe = np.where(np.isneginf(m), 0, m)[:, None]
    p = np.exp(s - safe)
    return p, m, p.sum(axis=-1)


def exp_rows_reference(s, shift):
    shift = np.asarray(shift, dtype=np.float32)
    out = np.exp(np.asarray(s, dtype=np.float32) - np.where(np.isneginf(shift), 0, shift)[:, None])
    out[np.isneginf(shift)] = 0
    return out


def dsoftmax_rows_reference(p, dp):
    p, dp = np.asarray(p, dtype=np.float32), np.asarray(dp, dtype=np.float32)
    return p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
