r"""Row kernels of the FAVOR+ feature map (:class:`~efficient_attention.PerformerFeatureMap`),
float32, beside their NumPy references.

The projection ``ωᵀx′`` of a block of rows is one BLAS product; what is left is elementwise
work on the ``(rows, m)`` block, one row at a time while it sits in the L1 cache:

* :func:`favor_rows` — forward: ``h <- h − ‖x‖²/(2√D)`` (the exponent), its row maximum,
  and ``φ̂ = e^{h − s}/√m`` with ``s`` the row maximum (queries) or a given shift (the causal
  keys' bound), or the exponent only (the shared key maximum needs every row first);
* :func:`favor_scale_rows` — ``φ̂ = e^{h − s}/√m`` for the exponents left by the latter;
* :func:`favor_grad_rows` — backward, before the product with ``ω``: ``dh <- dφ ⊙ φ`` and its
  row sums;
* :func:`favor_dx_rows` — backward, after it: ``dx = c·(dh ω) − c²·(Σ_r dh_r)·x``,
  ``c = D^(-1/4)``.

numpy runs each of these as several passes over the block (and a row maximum or sum over
64 float32 values costs it about as much as the exponential); here each is one pass. The
exponential is :func:`~efficient_attention.kernels.fastexp.exp32_shift_inplace`.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..config import JIT
from .fastexp import exp32_shift_inplace

__all__ = ["favor_rows", "favor_scale_rows", "favor_grad_rows", "favor_dx_rows",
           "favor_rows_reference", "favor_grad_rows_reference", "favor_dx_rows_reference"]

#: what :func:`favor_rows` does after the exponent and its row maximum
ROW_SHIFT, FIXED_SHIFT, EXPONENT_ONLY = 0, 1, 2


@njit(**JIT)
def favor_rows(h, x, half, norm, shift, mode, row_max):
    """In place on ``h (rows, F)`` float32 holding ``x ω′ᵀ``: ``h[r] -= half·‖x[r]‖²``,
    ``row_max[r] = max_j h[r, j]``; then ``h[r] = norm·exp(h[r] − row_max[r])``
    (``mode = ROW_SHIFT``), ``norm·exp(h[r] − shift)`` (``FIXED_SHIFT``) or nothing more
    (``EXPONENT_ONLY``)."""
    rows, F = h.shape
    D = x.shape[1]
    half = np.float32(half)
    norm = np.float32(norm)
    for r in range(rows):
        xr = x[r]
        hr = h[r]
        sq = np.float32(0.0)
        for j in range(D):
            sq += xr[j] * xr[j]
        sq *= half
        m = np.float32(-np.inf)
        for j in range(F):
            y = hr[j] - sq
            hr[j] = y
            m = max(m, y)
        row_max[r] = m
        if mode == EXPONENT_ONLY:
            continue
        exp32_shift_inplace(hr, m if mode == ROW_SHIFT else shift)
        for j in range(F):
            hr[j] *= norm


@njit(**JIT)
def favor_scale_rows(h, shift, norm):
    """In place on ``h (rows, F)`` float32: ``h[r] = norm·exp(h[r] − shift[r])``."""
    norm = np.float32(norm)
    for r in range(h.shape[0]):
        hr = h[r]
        exp32_shift_inplace(hr, shift[r])
        for j in range(h.shape[1]):
            hr[j] *= norm


@njit(**JIT)
def favor_grad_rows(dphi, phi, dh, row_sum):
    """``dh = dφ ⊙ φ`` (``∂φ/∂h = φ``) and ``row_sum[r] = Σ_j dh[r, j]``; float32 ``(rows, F)``."""
    rows, F = phi.shape
    for r in range(rows):
        total = np.float32(0.0)
        for j in range(F):
            y = dphi[r, j] * phi[r, j]
            dh[r, j] = y
            total += y
        row_sum[r] = total


@njit(**JIT)
def favor_dx_rows(dx, x, row_sum, c):
    """In place on ``dx (rows, D)`` float32 holding ``dh ω``: ``dx[r] = c·dx[r] − c²·row_sum[r]·x[r]``
    (``dx = D^(-1/4)·(dh ω − (Σ_r dh_r)·x′)`` with ``x′ = c·x``)."""
    c = np.float32(c)
    for r in range(dx.shape[0]):
        w = c * c * row_sum[r]
        for j in range(dx.shape[1]):
            dx[r, j] = c * dx[r, j] - w * x[r, j]


# ---------------------------------------------------------------------------------------------
# NumPy references (the same results up to float32 rounding; the tests compare them)

def favor_rows_reference(h, x, half, norm, shift, mode):
    """``(h_out, row_max)`` for :func:`favor_rows`, with NumPy."""
    h = np.asarray(h, np.float32) - np.float32(half) * np.einsum("rd,rd->r", x, x)[:, None]
    row_max = h.max(axis=1)
    if mode == EXPONENT_ONLY:
        return h, row_max
    s = row_max[:, None] if mode == ROW_SHIFT else np.float32(shift)
    return (np.float32(norm) * np.exp(h - s)).astype(np.float32), row_max


def favor_grad_rows_reference(dphi, phi):
    dh = np.asarray(dphi, np.float32) * np.asarray(phi, np.float32)
    return dh, dh.sum(axis=1)


def favor_dx_rows_reference(dx, x, row_sum, c):
    c = np.float32(c)
    return (c * np.asarray(dx, np.float32) - (c * c * row_sum)[:, None] * x).astype(np.float32)
