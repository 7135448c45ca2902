r"""A vectorisable ``exp`` for float64 buffers, beside its NumPy reference.

numba's ``np.exp`` compiles to one libm call per element (no SVML on these
machines), which LLVM cannot vectorise; softmax kernels spend most of their
time there. :func:`exp_inplace` computes the same function with plain
arithmetic that vectorises:

.. math::

    x = n \ln 2 + r,\quad n = \operatorname{round}(x \log_2 e),\quad
    \lvert r\rvert \le \tfrac{\ln 2}{2},\qquad
    e^x = 2^n \sum_{k=0}^{13} \frac{r^k}{k!},

* ``n`` is rounded with the shifter trick (``t = x·log2(e) + 1.5·2⁵²`` keeps the
  integer ``n`` in the low bits of ``t``);
* ``r = (x - n·ln2_hi) - n·ln2_lo`` (Cody–Waite: ``ln2_hi`` has trailing zero
  bits, so ``n·ln2_hi`` is exact);
* the Taylor polynomial of degree 13 has truncation error
  ``< 0.347¹⁴/14! ≈ 4·10⁻¹⁸`` on ``|r| <= ln2/2``, below float64 rounding;
* ``2ⁿ`` is assembled from its bits, ``(n + 1023) << 52``, through an int64 view
  of the work buffer.

Accuracy: within 2 ulp of ``numpy.exp`` for ``-708 <= x <= 709``
(the tests check 4·eps relative). Outside: ``x < -708`` (incl. ``-inf``)
gives 0 (``exp(x) < 3.3e-308``: subnormal results are flushed), ``x > 709``
gives ``inf``; NaN gives NaN.

The function is compiled with ``fastmath={'contract'}`` only: reassociation
would simplify ``(t + shifter) - shifter`` to ``t`` and break the rounding.
It is an ``@njit`` function that other kernels call on their score buffers.

**float32.** :func:`exp32_shift_inplace` is the single-precision counterpart for float32
buffers (``x <- exp(x - shift)``, the softmax's shifted exponential in one pass): the same
reduction with ``n = floor(x·log2 e + 1/2)`` and a two-part ``ln 2``
(``0.693359375`` has 9 significant bits, so ``n·ln2_hi`` is exact), then the degree-7
polynomial ``1 + r + r²·P(r)`` with Cephes' ``expf`` coefficients: within 1 ulp
(float32) of the exact value on ``[-87, 88]``; below ``-87`` it gives 0 (the float32
subnormals are flushed), above ``88`` ``inf``, NaN stays NaN. numpy's float32 ``exp``
runs 5x slower than it here (numpy dispatches no SIMD exp for this CPU), which is most of
the elementwise time of the banded attention (:mod:`efficient_attention.local`).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..config import JIT_CONTRACT

__all__ = ["exp_inplace", "exp_reference", "EXP_LOWER", "EXP_UPPER", "exp32", "exp32_shift_inplace",
           "exp32_reference", "EXP32_LOWER", "EXP32_UPPER", "exp_"]

#: below: 0 (flushed); above: inf
EXP_LOWER = -708.0
EXP_UPPER = 709.0

_SHIFTER = 6755399441055744.0              # 1.5·2**52: x + shifter rounds x to an integer
_SHIFTER_BITS = 0x4338000000000000         # the bits of the shifter
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01       # ln 2 with 32 trailing zero bits (fdlibm)
_LN2_LO = 1.90821492927058770002e-10       # ln 2 - _LN2_HI
_C = [1.0 / np.prod(np.arange(1, k + 1, dtype=np.float64)) for k in range(14)]   # 1/k!
(_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8, _C9, _C10, _C11, _C12, _C13) = _C


@njit(**JIT_CONTRACT)
def exp_inplace(x, work, n):
    """``x[:n] = exp(x[:n])`` for a float64 buffer ``x``; ``work`` a float64
    buffer of at least ``n`` elements (overwritten)."""
    for e in range(n):
        xe = x[e]
        xc = min(max(xe, EXP_LOWER), EXP_UPPER)
        t = xc * _LOG2E + _SHIFTER                           # n in the low bits of t
        work[e] = t
        kn = t - _SHIFTER                                     # n = round(x·log2 e)
        r = (xc - kn * _LN2_HI) - kn * _LN2_LO                # x - n ln2, |r| <= ln2/2
        p = _C13
        p = p * r + _C12
        p = p * r + _C11
        p = p * r + _C10
        p = p * r + _C9
        p = p * r + _C8
        p = p * r + _C7
        p = p * r + _C6
        p = p * r + _C5
        p = p * r + _C4
        p = p * r + _C3
        p = p * r + _C2
        p = p * r + _C1
        p = p * r + _C0                                       # e^r
        p = p if xe >= EXP_LOWER else 0.0                     # flush (and -inf -> 0)
        p = p if xe <= EXP_UPPER else np.inf
        x[e] = p if xe == xe else xe                          # NaN stays NaN
    bits = work.view(np.int64)
    for e in range(n):
        bits[e] = (bits[e] - _SHIFTER_BITS + 1023) << 52      # the bits of 2**n
    for e in range(n):
        x[e] = x[e] * work[e]                                 # e^x = 2**n e^r


def exp_reference(x):
    """NumPy: the same range reduction and polynomial, vectorised with NumPy (float64)."""
    x = np.asarray(x, dtype=np.float64)
    xc = np.clip(np.where(np.isnan(x), 0.0, x), EXP_LOWER, EXP_UPPER)   # NaN restored at the end
    kn = np.round(xc * _LOG2E)                               # n (ties to even; the shifter does the same)
    r = (xc - kn * _LN2_HI) - kn * _LN2_LO
    p = np.zeros_like(r)
    for c in reversed(_C):                                   # Horner: Σ r^k / k!
        p = p * r + c
    out = np.ldexp(p, kn.astype(np.int64))                   # 2**n e^r
    out = np.where(x < EXP_LOWER, 0.0, out)
    out = np.where(x > EXP_UPPER, np.inf, out)
    return np.where(np.isnan(x), x, out)


# ---------------------------------------------------------------------------------------------
# float32

#: below: 0 (flushed); above: inf
EXP32_LOWER = -87.0
EXP32_UPPER = 88.0

_F = np.float32
_LOG2E_32 = _F(1.44269504088896341)
_LN2_HI_32 = _F(0.693359375)                # 9 significant bits: n·ln2_hi is exact
_LN2_LO_32 = _F(-2.12194440e-4)             # ln 2 - ln2_hi
_P32 = tuple(_F(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                              4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))   # Cephes expf
(_P0, _P1, _P2, _P3, _P4, _P5) = _P32


@njit(**JIT_CONTRACT)
def exp32(d):
    """``exp(d)`` of a float32 scalar (see the module notes): for loops that LLVM vectorises,
    where it is inlined (the elementwise form of :func:`exp32_shift_inplace`)."""
    lo, hi = _F(EXP32_LOWER), _F(EXP32_UPPER)
    dc = min(max(d, lo), hi) if d == d else _F(0.0)         # (NaN: restored below)
    kn = np.floor(dc * _LOG2E_32 + _F(0.5))                  # n = round(d·log2 e)
    r = (dc - kn * _LN2_HI_32) - kn * _LN2_LO_32             # d - n ln2, |r| <= ln2/2
    p = _P0
    p = p * r + _P1
    p = p * r + _P2
    p = p * r + _P3
    p = p * r + _P4
    p = p * r + _P5
    p = (p * r) * r + r + _F(1.0)                             # e^r
    two_n = np.int32((np.int32(kn) + np.int32(127)) << 23).view(np.float32)   # 2**n
    y = p * two_n
    y = y if d >= lo else _F(0.0)                             # flush (and -inf -> 0)
    y = y if d <= hi else _F(np.inf)
    return y if d == d else d                                 # NaN stays NaN


@njit(**JIT_CONTRACT)
def exp32_shift_inplace(x, shift):
    """``x[:] = exp(x[:] - shift)`` for a 1-D float32 array ``x`` (any stride) and a scalar
    ``shift``; one pass, vectorised by LLVM (see the module notes)."""
    sh = _F(shift)
    for e in range(x.shape[0]):
        x[e] = exp32(x[e] - sh)


def exp32_reference(x, shift=0.0):
    """NumPy: the same float32 reduction and polynomial, vectorised with NumPy."""
    d = np.asarray(x, dtype=np.float32) - np.float32(shift)
    with np.errstate(invalid="ignore"):
        dc = np.clip(np.where(np.isnan(d), _F(0), d), _F(EXP32_LOWER), _F(EXP32_UPPER))
    kn = np.floor(dc * _LOG2E_32 + _F(0.5))
    r = (dc - kn * _LN2_HI_32) - kn * _LN2_LO_32
    p = np.full_like(r, _P0)
    for c in _P32[1:]:
        p = p * r + c
    y = (p * r) * r + r + _F(1.0)
    y = np.ldexp(y, kn.astype(np.int32)).astype(np.float32)
    y = np.where(d < _F(EXP32_LOWER), _F(0), y)
    y = np.where(d > _F(EXP32_UPPER), _F(np.inf), y)
    return np.where(np.isnan(d), d, y).astype(np.float32)


def exp_(a: np.ndarray) -> np.ndarray:
    """``a = exp(a)`` in place for a NumPy float array, returned: C-contiguous float32 arrays go
    through :func:`exp32_shift_inplace` (within 1 ulp, 5x faster than numpy's here), anything
    else through ``np.exp``."""
    if a.dtype == np.float32 and a.flags.c_contiguous and a.size:
        exp32_shift_inplace(a.reshape(-1), 0.0)
    else:
        np.exp(a, out=a)
    return a
