r"""Causal linear attention by prefix sums: numba scans beside NumPy references.

With features ``a_t = φ(q_t)``, ``b_t = φ(k_t)`` (width F) and values ``v_t``
(width Dv), one sequence (the arrays here are ``(BH, N, ·)``, batch and
heads flattened; the scans run in parallel over BH):

.. math::

    S_t = \sum_{j \le t} b_j v_j^\top \;(F\times D_v),\quad z_t = \sum_{j\le t} b_j,\quad
    \text{den}_t = a_t^\top z_t + \varepsilon_t,\quad
    o_t = S_t^\top a_t / \text{den}_t .

Backward, with ``g_t = dO_t/den_t`` and ``c_t = −(dO_t·o_t)/den_t``:

.. math::

    da_t = S_t g_t + c_t z_t, \qquad
    R_t = \sum_{i \ge t} a_i g_i^\top,\ r_t = \sum_{i\ge t} c_i a_i,\qquad
    db_t = R_t v_t + r_t,\quad dv_t = R_t^\top b_t,

a forward scan for ``da`` (``S_t`` recomputed) and a reverse-time scan for ``db, dv``,
run chunk by chunk from the last chunk to the first: the forward saves ``(S, z)`` before
every chunk of ``config.LINEAR_CHECKPOINT`` tokens (:class:`ScanStates`), the backward starts each
chunk's forward scan from its saved state and carries ``R`` between chunks, so that the
reverse scan finds its rows still in the cache. Each thread holds one ``F × Dv`` state
(two in the reverse scan: ``R`` and its transpose), so memory is
``O(N·(F + Dv) + (N/chunk)·F·Dv)``: the ``N × F × Dv`` prefix states that a
``cumsum`` materialises never exist. A zero denominator (possible only with
``eps = 0``) gives output 0 and zero gradient.

``*_reference`` are the same computations in NumPy with ``cumsum`` over
blocks of ``block`` tokens and a carried state (``block=None``: one block,
materialising ``N × F × Dv``); the tests assert the kernels agree with them.
"""
from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from .. import config
from ..config import JIT, JIT_PARALLEL
from .prefetch import prefetch_range

__all__ = [
    "causal_forward", "causal_backward", "ScanStates",
    "causal_forward_reference", "causal_backward_reference",
    "chunked_forward", "chunked_backward",
]


def _safe_inv(den):
    """1/den, and 0 where den == 0 (the zero-denominator rule)."""
    nz = den != 0
    return np.where(nz, 1 / np.where(nz, den, 1), 0).astype(den.dtype, copy=False)


# --------------------------------------------------------------------------- numba scans
# The scans advance two tokens per pass over the F × Dv state: each row of the state is
# loaded and stored once for two rank-1 updates and two contractions, which halves the
# loads and stores per multiply-add (the state, 16 KB for F = Dv = 64 in float32, is
# streamed from L1 once per pass). A sequence of odd length runs its last token as a pair
# with a zero token (zero features and values: the state is unchanged, its outputs are
# discarded). Measured at N = 65536, 8 heads, float32, one thread: a pass per token took
# 380-400 ms forward, two tokens per pass 275-282 ms, four 303-337 ms (the four-token
# pass runs out of registers).
#
# Every pass is the same loop, :func:`_rank1_pair_rows`, over the rows of a state held
# as (rows, cols): the forward's S (F, Dv), the backward's S transposed (Dv, F), and the
# reverse scan's R (F, Dv) and its transpose (Dv, F). It takes two rows of the state at a
# time, so that the two accumulators are loaded and stored once per two rows. One thread,
# N = 65536, 8 heads, float32 (A/B in one process): the forward scan went from 0.52 to
# 0.42 µs per token and the backward from 1.76 to 1.44; on two threads the gain was 4-12 %.
# Four rows at a time were no longer vectorised by LLVM (too many arrays to check for
# overlap) and ran 4x slower.


@njit(**JIT)
def _rank1_pair_rows(m, p1, q1, w1, p2, q2, w2, acc1, acc2):
    """Two tokens through a state ``m (rows, cols)``, row by row::

        m_1 = m + p1 q1ᵀ;  acc1 = m_1ᵀ w1;  m_2 = m_1 + p2 q2ᵀ;  acc2 = m_2ᵀ w2;  m = m_2

    (``p, w`` of length ``rows``, ``q`` of length ``cols``, ``acc`` of length at least
    ``cols``: its first ``cols`` entries are overwritten), two rows of ``m`` per pass over
    the columns."""
    rows, cols = m.shape
    for c in range(cols):
        acc1[c] = 0
        acc2[c] = 0
    even = rows - rows % 2
    for r in range(0, even, 2):
        m0 = m[r]
        m1 = m[r + 1]
        p10, p11, p20, p21 = p1[r], p1[r + 1], p2[r], p2[r + 1]
        w10, w11, w20, w21 = w1[r], w1[r + 1], w2[r], w2[r + 1]
        for c in range(cols):
            u1 = q1[c]
            u2 = q2[c]
            x0 = m0[c] + p10 * u1
            x1 = m1[c] + p11 * u1
            acc1[c] += w10 * x0 + w11 * x1
            x0 += p20 * u2
            x1 += p21 * u2
            acc2[c] += w20 * x0 + w21 * x1
            m0[c] = x0
            m1[c] = x1
    if even < rows:                                         # an odd last row
        r = rows - 1
        mr = m[r]
        p1r, p2r, w1r, w2r = p1[r], p2[r], w1[r], w2[r]
        for c in range(cols):
            x = mr[c] + p1r * q1[c]
            acc1[c] += w1r * x
            x += p2r * q2[c]
            acc2[c] += w2r * x
            mr[c] = x


@njit(**JIT)
def _forward_pair(s, z, a1, b1, v1, a2, b2, v2, d1, d2, num1, num2):
    """Tokens 1 then 2: ``S += b vᵀ, z += b`` for each, ``num_k = S_kᵀ a_k``; returns the
    denominators ``a_kᵀ z_k + d_k``."""
    for i in range(z.shape[0]):
        zi = z[i] + b1[i]                                   # z_1 = z + b_1
        d1 += a1[i] * zi
        zi += b2[i]                                         # z_2 = z_1 + b_2
        d2 += a2[i] * zi
        z[i] = zi
    _rank1_pair_rows(s, b1, v1, a1, b2, v2, a2, num1, num2)  # S_k = S + b vᵀ, num_k = S_kᵀ a_k
    return d1, d2


@njit(**JIT)
def _scale_row(dst, num, dd, one):
    """``dst = num / dd`` (0 where ``dd = 0``), the reciprocal taken in the arrays' dtype."""
    one[0] = 1 / dd if dd != 0 else 0
    inv = one[0]
    for c in range(dst.shape[0]):
        dst[c] = num[c] * inv


@njit(**JIT_PARALLEL)
def _causal_forward_kernel(a, b, v, eps, out, den, chunk, sck, zck):
    """out[h, t] = S_tᵀ a_t / den_t, den[h, t] = a_tᵀ z_t + eps[h, t]; parallel over h,
    two tokens per pass over the state (see above). When ``sck (BH, ⌈N/chunk⌉, F, Dv)`` has
    rows, the state before each chunk of ``chunk`` (even) tokens is saved in ``sck, zck``
    (``zck (BH, ⌈N/chunk⌉, F)``) for the backward; ``sck`` with 0 chunks saves nothing."""
    nh, n, f = a.shape
    Dv = v.shape[2]
    save = sck.shape[1] > 0
    for h in prange(nh):
        s = np.zeros((f, Dv), a.dtype)
        z = np.zeros(f, a.dtype)
        num1 = np.empty(Dv, a.dtype)
        num2 = np.empty(Dv, a.dtype)
        one = np.empty(1, a.dtype)
        for t in range(0, n - 1, 2):
            if save and t % chunk == 0:
                sck[h, t // chunk] = s
                zck[h, t // chunk] = z
            d1, d2 = _forward_pair(s, z, a[h, t], b[h, t], v[h, t], a[h, t + 1], b[h, t + 1], v[h, t + 1],
                                   eps[h, t], eps[h, t + 1], num1, num2)
            den[h, t] = d1
            den[h, t + 1] = d2
            _scale_row(out[h, t], num1, d1, one)
            _scale_row(out[h, t + 1], num2, d2, one)
        if n % 2:                                           # the last token, paired with a zero one
            t = n - 1
            if save and t % chunk == 0:
                sck[h, t // chunk] = s
                zck[h, t // chunk] = z
            zf = np.zeros(f, a.dtype)
            d1, _ = _forward_pair(s, z, a[h, t], b[h, t], v[h, t], zf, zf, np.zeros(Dv, a.dtype),
                                  eps[h, t], eps[h, t], num1, num2)
            den[h, t] = d1
            _scale_row(out[h, t], num1, d1, one)


@njit(**JIT)
def _da_pair(st, z, b1, v1, g1, c1, b2, v2, g2, c2, acc1, acc2, da1, da2):
    """Forward scan of the backward, tokens 1 then 2: ``S`` held transposed ``(Dv, F)``,
    ``da_k = S_k g_k + c_k z_k`` (``g_k = dO_k/den_k`` passed in)."""
    _rank1_pair_rows(st, v1, b1, g1, v2, b2, g2, acc1, acc2)   # S_kᵀ = Sᵀ + v bᵀ, acc_k = S_k g_k
    for i in range(z.shape[0]):
        zi = z[i] + b1[i]
        da1[i] = acc1[i] + c1 * zi
        zi += b2[i]
        da2[i] = acc2[i] + c2 * zi
        z[i] = zi


@njit(**JIT)
def _dbdv_pair(rr, rt, r, a1, b1, v1, g1, c1, a2, b2, v2, g2, c2, acc1, acc2, db1, db2, dv1, dv2):
    """Reverse scan, token 1 (the later) then token 2 (the one before it):
    ``R_k = R + a_k g_kᵀ`` (cumulative), ``dv_k = R_kᵀ b_k``, ``db_k = R_k v_k + r_k``.

    ``R`` is held twice, ``rr (F, Dv)`` and its transpose ``rt (Dv, F)``, both updated:
    then ``dv`` and ``db`` are both axpys (over Dv and over F), and no dot product (a
    horizontal sum per feature) is left. Dot products for ``db`` took 860 ms of a
    single-threaded reverse scan at N = 65536, 8 heads, float32; the second copy about 300."""
    f, Dv = rr.shape
    _rank1_pair_rows(rr, a1, g1, b1, a2, g2, b2, acc1, acc2)   # R_k = R + a gᵀ, dv_k = R_kᵀ b_k
    for c in range(Dv):
        dv1[c] = acc1[c]
        dv2[c] = acc2[c]
    _rank1_pair_rows(rt, g1, a1, v1, g2, a2, v2, acc1, acc2)   # R_kᵀ = Rᵀ + g aᵀ, acc_k = R_k v_k
    for i in range(f):                                       # (scratch accumulators: summing into
        ri = r[i] + c1 * a1[i]                               # the rows of db directly was 1.6x slower)
        db1[i] = acc1[i] + ri                                # db_1 = R_1 v_1 + r_1, r_1 = r + c_1 a_1
        ri += c2 * a2[i]                                     # r_2 = r_1 + c_2 a_2
        db2[i] = acc2[i] + ri
        r[i] = ri


#: how many tokens ahead of itself the reverse scan prefetches its input rows
REVERSE_PREFETCH = 8


@njit(**JIT)
def _gradient_rows(den, dout, out, t, g, one):
    """``g = dO_t/den_t`` (into ``g``) and returns ``c_t = −dO_t·o_t/den_t`` for one head (0
    where ``den_t = 0``); the reciprocal is taken in the arrays' dtype (``one`` is a
    1-element scratch of that dtype)."""
    dd, dt = den[t], dout[t]
    one[0] = 1 / dd if dd != 0 else 0
    inv = one[0]
    ct = 0 * dd
    for c in range(dt.shape[0]):
        ct -= dt[c] * out[t, c]
        g[c] = dt[c] * inv
    return ct * inv


@njit(**JIT_PARALLEL)
def _causal_backward_kernel(a, b, v, out, den, dout, chunk, sck, zck, da, db, dv):
    """One reverse sweep over chunks of ``chunk`` (even) tokens, from the last chunk to the
    first; in each, a forward scan for ``da`` from the saved state before the chunk
    (``sck, zck`` of :func:`_causal_forward_kernel`), then the reverse-time scan for ``db,
    dv`` on the same rows, ``R`` carried from the later chunks. Two tokens per pass over the
    state.

    The forward scan holds ``S_t`` transposed, ``(Dv, F)``, so that ``S_t g_t`` is
    accumulated by axpys over F; the reverse scan holds ``R_t`` both ways (see
    :func:`_dbdv_pair`), so that ``dv_t = R_tᵀ b_t`` and ``db_t = R_t v_t + r_t`` are axpys
    too. The reverse scan reads again the rows of b, v, out and dout that the forward scan
    of its chunk has just read (``chunk`` rows of each: 512 KB at 512 × 64 float32
    columns), from the caches whatever N, so each row comes from memory once (two scans over
    whole sequences read them twice, and only a short sequence found them still in the L3
    cache). The rows of ``a``, which only the reverse scan reads, it hints
    ``REVERSE_PREFETCH`` tokens ahead of itself to the CPU
    (:mod:`~efficient_attention.kernels.prefetch`), within the chunk: ``a`` must be
    C-contiguous (:func:`causal_backward` makes it so)."""
    nh, n, f = a.shape
    Dv = v.shape[2]
    for h in prange(nh):
        one = np.empty(1, a.dtype)
        g1 = np.empty(Dv, a.dtype)
        g2 = np.empty(Dv, a.dtype)
        acc1 = np.empty(max(f, Dv), a.dtype)
        acc2 = np.empty(max(f, Dv), a.dtype)
        zf = np.zeros(f, a.dtype)
        zv = np.zeros(Dv, a.dtype)
        sf = np.empty(f, a.dtype)                            # scratch rows of the zero token
        sv = np.empty(Dv, a.dtype)
        st = np.empty((Dv, f), a.dtype)
        z = np.empty(f, a.dtype)
        rr = np.zeros((f, Dv), a.dtype)                      # R_t = Σ_{l≥t} a_l g_lᵀ
        rt = np.zeros((Dv, f), a.dtype)
        r = np.zeros(f, a.dtype)                             # r_t = Σ_{l≥t} c_l a_l
        ah, bh, vh, oh, dh, eh = a[h], b[h], v[h], out[h], dout[h], den[h]
        af = ah.reshape(-1)
        for ck in range(sck.shape[1] - 1, -1, -1):
            lo = ck * chunk
            hi = min(n, lo + chunk)
            for i in range(f):                               # S before the chunk, transposed
                for c in range(Dv):
                    st[c, i] = sck[h, ck, i, c]
                z[i] = zck[h, ck, i]
            # forward scan: da_t = S_t g_t + c_t z_t
            for t in range(lo, hi, 2):
                c1 = _gradient_rows(eh, dh, oh, t, g1, one)
                if t + 1 < hi:
                    c2 = _gradient_rows(eh, dh, oh, t + 1, g2, one)
                    _da_pair(st, z, bh[t], vh[t], g1, c1, bh[t + 1], vh[t + 1], g2, c2,
                             acc1, acc2, da[h, t], da[h, t + 1])
                else:                                        # odd n: the last token with a zero one
                    _da_pair(st, z, bh[t], vh[t], g1, c1, zf, zv, zv, 0 * c1, acc1, acc2, da[h, t], sf)
            # reverse scan: R_t, r_t, db_t, dv_t
            odd = (hi - lo) % 2
            if odd:                                          # odd n: the last token with a zero one
                t = hi - 1
                c1 = _gradient_rows(eh, dh, oh, t, g1, one)
                _dbdv_pair(rr, rt, r, ah[t], bh[t], vh[t], g1, c1, zf, zf, zv, zv, 0 * c1,
                           acc1, acc2, db[h, t], sf, dv[h, t], sv)
            for t in range(hi - 1 - odd, lo, -2):            # pairs (t, t - 1), t the later
                tp = t - 1 - REVERSE_PREFETCH                # the pair this many tokens ahead
                if tp >= lo:
                    prefetch_range(af, tp * f, (tp + 2) * f)
                c1 = _gradient_rows(eh, dh, oh, t, g1, one)
                c2 = _gradient_rows(eh, dh, oh, t - 1, g2, one)
                _dbdv_pair(rr, rt, r, ah[t], bh[t], vh[t], g1, c1, ah[t - 1], bh[t - 1], vh[t - 1], g2, c2,
                           acc1, acc2, db[h, t], db[h, t - 1], dv[h, t], dv[h, t - 1])


def _contig(*arrays):
    return tuple(np.ascontiguousarray(x) for x in arrays)


def _launch(kernel, nh, work, *args):
    """Run a prange kernel, on one thread when the work is small or there is one sequence
    (each (batch, head) is independent, so the result does not depend on the thread count)."""
    if nh < 2 or work < config.LINEAR_PARALLEL_MIN_WORK:
        saved = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            kernel(*args)
        finally:
            numba.set_num_threads(saved)
    else:
        kernel(*args)


class ScanStates(NamedTuple):
    """The prefix-sum state before each chunk of ``chunk`` tokens of sequences of ``n``
    tokens, saved by :func:`causal_forward` (``states=True``) for :func:`causal_backward`:
    ``s[h, c] = S_{c·chunk − 1}`` ``(BH, ⌈n/chunk⌉, F, Dv)``, ``z[h, c] = z_{c·chunk − 1}``
    ``(BH, ⌈n/chunk⌉, F)`` (zero for the first chunk)."""

    s: np.ndarray
    z: np.ndarray
    chunk: int
    n: int


def _check_chunk(chunk, name="chunk"):
    if isinstance(chunk, (bool, np.bool_)) or not isinstance(chunk, (int, np.integer)) \
            or chunk < 2 or chunk % 2:
        raise ValueError(f"{name} must be an even number of tokens >= 2, got {chunk!r}")
    return int(chunk)


def causal_forward(a, b, v, eps, *, states=False, chunk=None):
    """Causal prefix-sum forward. ``a, b (BH, N, F)``, ``v (BH, N, Dv)``,
    ``eps (BH, N)``, one dtype. Returns ``out (BH, N, Dv)``, ``den (BH, N)``, and with
    ``states=True`` the :class:`ScanStates` before every chunk of ``chunk`` tokens
    (``F·Dv + F`` numbers per chunk and sequence), which :func:`causal_backward` takes."""
    a, b, v, eps = _contig(a, b, v, eps)
    chunk = _check_chunk(config.LINEAR_CHECKPOINT if chunk is None else chunk)
    nh, n, f = a.shape
    nck = -(-n // chunk) if states else 0
    sck = np.empty((nh, nck, f, v.shape[2]), a.dtype)
    zck = np.empty((nh, nck, f), a.dtype)
    out = np.empty(v.shape, a.dtype)
    den = np.empty(a.shape[:2], a.dtype)
    _launch(_causal_forward_kernel, nh, a.size * v.shape[2], a, b, v, eps, out, den, chunk, sck, zck)
    return (out, den, ScanStates(sck, zck, chunk, n)) if states else (out, den)


def causal_backward(a, b, v, out, den, dout, states=None):
    """Causal prefix-sum backward; returns ``da, db (BH, N, F)``, ``dv (BH, N, Dv)``.

    ``states``: the :class:`ScanStates` that ``causal_forward(a, b, v, ..., states=True)``
    returned for these same ``a, b, v`` (their shapes are checked, their contents cannot
    be; they are cast to the dtype of ``a``). None runs the whole forward scan again to get
    them (a third scan, and its ``out``, ``den`` arrays)."""
    a, b, v, out, den, dout = _contig(a, b, v, out, den, dout)
    nh, n, f = a.shape
    if states is None:
        states = causal_forward(a, b, v, np.ones(den.shape, a.dtype), states=True)[2]
    if not isinstance(states, ScanStates):
        raise TypeError(f"states must be None or the ScanStates of causal_forward, got {type(states).__name__}")
    chunk = _check_chunk(states.chunk, "states.chunk")
    nck = -(-n // chunk)
    if states.n != n or states.s.shape != (nh, nck, f, v.shape[2]) or states.z.shape != (nh, nck, f):
        raise ValueError(f"states must be those of {nh} sequences of {n} tokens with F = {f}, "
                         f"Dv = {v.shape[2]} ({nck} chunks of {chunk}): got n = {states.n}, "
                         f"s {states.s.shape}, z {states.z.shape}")
    sck, zck = (np.ascontiguousarray(x, a.dtype) for x in (states.s, states.z))
    da = np.empty(a.shape, a.dtype)
    db = np.empty(b.shape, a.dtype)
    dv = np.empty(v.shape, a.dtype)
    _launch(_causal_backward_kernel, nh, a.size * v.shape[2], a, b, v, out, den, dout, chunk, sck, zck,
            da, db, dv)
    return da, db, dv


# --------------------------------------------------------------------------- NumPy references
def _blocks(n, block):
    block = n if block is None else max(1, int(block))
    return [(s, min(n, s + block)) for s in range(0, n, block)]


def causal_forward_reference(a, b, v, eps, block=None):
    """The prefix sums with ``np.cumsum``: ``S_t`` for every t of a block
    materialised ``(BH, block, F, Dv)``, the last one carried to the next block."""
    nh, n, f = a.shape
    s0 = np.zeros((nh, f, v.shape[-1]), a.dtype)
    z0 = np.zeros((nh, f), a.dtype)
    out = np.empty(v.shape, a.dtype)
    den = np.empty((nh, n), a.dtype)
    for lo, hi in _blocks(n, block):
        s = s0[:, None] + np.cumsum(b[:, lo:hi, :, None] * v[:, lo:hi, None, :], axis=1)  # (BH, block, F, Dv)
        z = z0[:, None] + np.cumsum(b[:, lo:hi], axis=1)                                   # (BH, block, F)
        d = np.einsum("htf,htf->ht", a[:, lo:hi], z) + eps[:, lo:hi]
        num = np.einsum("htf,htfc->htc", a[:, lo:hi], s)
        out[:, lo:hi] = num * _safe_inv(d)[..., None]
        den[:, lo:hi] = d
        s0, z0 = s[:, -1], z[:, -1]
    return out, den


def causal_backward_reference(a, b, v, out, den, dout, block=None):
    """The backward with ``np.cumsum`` (reverse cumsum for ``R_t, r_t``), blockwise."""
    nh, n, f = a.shape
    inv = _safe_inv(den)
    g = dout * inv[..., None]                                    # (BH, N, Dv)
    ct = -np.einsum("htc,htc->ht", dout, out) * inv              # (BH, N)
    da = np.empty(a.shape, a.dtype)
    db = np.empty(b.shape, a.dtype)
    dv = np.empty(v.shape, a.dtype)
    s0 = np.zeros((nh, f, v.shape[-1]), a.dtype)
    z0 = np.zeros((nh, f), a.dtype)
    for lo, hi in _blocks(n, block):
        s = s0[:, None] + np.cumsum(b[:, lo:hi, :, None] * v[:, lo:hi, None, :], axis=1)
        z = z0[:, None] + np.cumsum(b[:, lo:hi], axis=1)
        da[:, lo:hi] = np.einsum("htfc,htc->htf", s, g[:, lo:hi]) + ct[:, lo:hi, None] * z
        s0, z0 = s[:, -1], z[:, -1]
    r0 = np.zeros_like(s0)
    q0 = np.zeros_like(z0)
    for lo, hi in reversed(_blocks(n, block)):
        rr = r0[:, None] + np.cumsum((a[:, lo:hi, :, None] * g[:, lo:hi, None, :])[:, ::-1], axis=1)[:, ::-1]
        r = q0[:, None] + np.cumsum((ct[:, lo:hi, None] * a[:, lo:hi])[:, ::-1], axis=1)[:, ::-1]
        db[:, lo:hi] = np.einsum("htfc,htc->htf", rr, v[:, lo:hi]) + r
        dv[:, lo:hi] = np.einsum("htfc,htf->htc", rr, b[:, lo:hi])
        r0, q0 = rr[:, 0], r[:, 0]
    return da, db, dv


# --------------------------------------------------------------------------- chunked (BLAS) form
def chunked_forward(a, b, v, eps, chunk=64):
    """Causal forward by chunks of ``chunk`` tokens: inside a chunk the masked product
    ``tril(A Bᵀ) V`` (dense, BLAS), between chunks a carried state
    ``S = Σ Bᵀ V``: ``O_c = (tril(A_c B_cᵀ) V_c + A_c S_{c-1}) / den`` (``c`` the chunk's
    index). Memory ``O(N·chunk + (N/chunk)·F·Dv)``."""
    nh, n, f = a.shape
    Dv = v.shape[-1]
    nc = -(-n // chunk)
    pad = nc * chunk - n
    if pad:
        a, b, v = (np.concatenate([x, np.zeros((nh, pad, x.shape[-1]), x.dtype)], axis=1) for x in (a, b, v))
    ac = a.reshape(nh, nc, chunk, f)
    bc = b.reshape(nh, nc, chunk, f)
    vc = v.reshape(nh, nc, chunk, Dv)
    tril = np.tril(np.ones((chunk, chunk), a.dtype))
    kv = np.swapaxes(bc, -1, -2) @ vc                                  # B_cᵀ V_c        (BH, nc, F, Dv)
    s_prev = np.cumsum(kv, axis=1) - kv                                # exclusive prefix (BH, nc, F, Dv)
    del kv
    zc = bc.sum(axis=2)                                                # (BH, nc, F)
    z_prev = np.cumsum(zc, axis=1) - zc
    scores = (ac @ np.swapaxes(bc, -1, -2)) * tril          # tril(A_c B_cᵀ)  (BH, nc, chunk, chunk)
    num = scores @ vc + ac @ s_prev                                    # (BH, nc, chunk, Dv)
    den = scores.sum(axis=-1) + np.einsum("hkcf,hkf->hkc", ac, z_prev)
    den = den.reshape(nh, nc * chunk)[:, :n] + eps
    out = num.reshape(nh, nc * chunk, Dv)[:, :n] * _safe_inv(den)[..., None]
    return out, den


def chunked_backward(a, b, v, out, den, dout, chunk=64):
    """Backward of :func:`chunked_forward` (same chunks, a reverse exclusive
    prefix for ``R``)."""
    nh, n, f = a.shape
    Dv = v.shape[-1]
    inv = _safe_inv(den)
    g = dout * inv[..., None]
    ct = -np.einsum("htc,htc->ht", dout, out) * inv
    nc = -(-n // chunk)
    pad = nc * chunk - n
    if pad:
        a, b, v, g = (np.concatenate([x, np.zeros((nh, pad, x.shape[-1]), x.dtype)], axis=1)
                      for x in (a, b, v, g))
        ct = np.concatenate([ct, np.zeros((nh, pad), ct.dtype)], axis=1)
    ac = a.reshape(nh, nc, chunk, f)
    bc = b.reshape(nh, nc, chunk, f)
    vc = v.reshape(nh, nc, chunk, Dv)
    gc = g.reshape(nh, nc, chunk, Dv)
    cc = ct.reshape(nh, nc, chunk)
    tril = np.tril(np.ones((chunk, chunk), a.dtype))
    # d scores (within chunk): dP_ij = g_i·v_j + c_i, masked
    dscores = (gc @ np.swapaxes(vc, -1, -2) + cc[..., None]) * tril    # (BH, nc, chunk, chunk)
    kv = np.swapaxes(bc, -1, -2) @ vc
    s_prev = np.cumsum(kv, axis=1) - kv
    del kv
    zc = bc.sum(axis=2)
    z_prev = np.cumsum(zc, axis=1) - zc
    da = dscores @ bc + gc @ np.swapaxes(s_prev, -1, -2) + cc[..., None] * z_prev[:, :, None, :]
    del s_prev
    ag = np.swapaxes(ac, -1, -2) @ gc                                  # A_cᵀ G_c        (BH, nc, F, Dv)
    r_next = np.cumsum(ag[:, ::-1], axis=1)[:, ::-1] - ag              # Σ over later chunks
    del ag
    ra = np.einsum("hkcf,hkc->hkf", ac, cc)
    rz_next = np.cumsum(ra[:, ::-1], axis=1)[:, ::-1] - ra
    scores = (ac @ np.swapaxes(bc, -1, -2)) * tril
    db = np.swapaxes(dscores, -1, -2) @ ac + vc @ np.swapaxes(r_next, -1, -2) + rz_next[:, :, None, :]
    dv = np.swapaxes(scores, -1, -2) @ gc + bc @ r_next
    da = da.reshape(nh, nc * chunk, f)[:, :n]
    db = db.reshape(nh, nc * chunk, f)[:, :n]
    dv = dv.reshape(nh, nc * chunk, Dv)[:, :n]
    return np.ascontiguousarray(da), np.ascontiguousarray(db), np.ascontiguousarray(dv)
