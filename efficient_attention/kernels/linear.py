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

a forward scan for ``da`` (``S_t`` recomputed, never stored) and a
reverse-time scan for ``db, dv``. Only one ``F × Dv`` state per thread is
held, so memory is ``O(N·(F + Dv))``: the ``N × F × Dv`` prefix states that a
``cumsum`` materialises never exist. A zero denominator (possible only with
``eps = 0``) gives output 0 and zero gradient.

``*_reference`` are the same computations in NumPy with ``cumsum`` over
blocks of ``block`` tokens and a carried state (``block=None``: one block,
materialising ``N × F × Dv``); the tests assert the kernels agree with them.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .config import JIT, JIT_PARALLEL

__all__ = [
    "causal_forward", "causal_backward",
    "causal_forward_reference", "causal_backward_reference",
    "chunked_forward", "chunked_backward",
]


def _safe_inv(den):
    """1/den, and 0 where den == 0 (the zero-denominator rule)."""
    nz = den != 0
    return np.where(nz, 1 / np.where(nz, den, 1), 0).astype(den.dtype, copy=False)


# --------------------------------------------------------------------------- numba scans
@njit(**JIT_PARALLEL)
def _causal_forward_kernel(a, b, v, eps, out, den):
    """out[h, t] = S_tᵀ a_t / den_t, den[h, t] = a_tᵀ z_t + eps[h, t]; parallel over h.

    Equivalent to ``S += outer(b_t, v_t); num = a_t @ S``, fused row by row so
    that each row of S is loaded and stored once per token (the inner loops
    are axpys over Dv, which LLVM vectorises)."""
    nh, n, f = a.shape
    dv = v.shape[2]
    for h in prange(nh):
        s = np.zeros((f, dv), a.dtype)
        z = np.zeros(f, a.dtype)
        num = np.empty(dv, a.dtype)
        one = np.empty(1, a.dtype)
        for t in range(n):
            num[:] = 0
            dd = eps[h, t]
            vt = v[h, t]
            at = a[h, t]
            bt = b[h, t]
            for i in range(f):
                bi = bt[i]
                ai = at[i]
                z[i] += bi                                   # z_t = z_{t-1} + b_t
                dd += ai * z[i]                              # den_t = a_tᵀ z_t + ε_t
                si = s[i]
                for c in range(dv):
                    x = si[c] + bi * vt[c]                   # S_t = S_{t-1} + b_t v_tᵀ
                    si[c] = x
                    num[c] += ai * x                         # S_tᵀ a_t
            den[h, t] = dd
            one[0] = 1 / dd if dd != 0 else 0
            inv = one[0]                                     # 1/den_t in the array dtype
            ot = out[h, t]
            for c in range(dv):
                ot[c] = num[c] * inv


@njit(**JIT)
def _row_coefficients(dd, dt, ot, one):
    """``(1/den_t, c_t)`` with ``c_t = −dO_t·o_t / den_t`` (0 where ``den_t = 0``), in the
    arrays' dtype (``one`` is a 1-element scratch of that dtype)."""
    one[0] = 1 / dd if dd != 0 else 0
    inv = one[0]
    ct = 0 * dd
    for c in range(dt.shape[0]):
        ct -= dt[c] * ot[c]
    return inv, ct * inv


@njit(**JIT_PARALLEL)
def _causal_backward_kernel(a, b, v, out, den, dout, da, db, dvv):
    """da by a forward scan (S_t recomputed), db and dv by a reverse-time scan.

    The forward scan holds ``S_t`` transposed, ``(Dv, F)``, so that ``S_t dO_t`` is
    accumulated by axpys over F; the reverse scan holds ``R_t`` as ``(F, Dv)``:
    ``dv_t = Σ_i b_t[i] R_t[i]`` is an axpy fused with the update of ``R_t``, and
    ``db_t[i] = R_t[i]·v_t + r_t[i]`` are dot products in a loop of their own (fused
    with the update, the reverse scan took 679 ms against about 450 ms split, N = 65536,
    8 heads, float32). ``g_t = dO_t/den_t`` is never stored: the loops read ``dO_t`` and
    fold ``1/den_t`` into scalars (a local buffer for ``g`` was 1.5-2x slower)."""
    nh, n, f = a.shape
    dv = v.shape[2]
    for h in prange(nh):
        one = np.empty(1, a.dtype)
        # forward scan: da_t = S_t g_t + c_t z_t, with S_t held transposed (Dv, F) so that
        # both inner loops are axpys over F
        st = np.zeros((dv, f), a.dtype)
        z = np.zeros(f, a.dtype)
        acc = np.empty(f, a.dtype)
        for t in range(n):
            dt = dout[h, t]
            inv, ct = _row_coefficients(den[h, t], dt, out[h, t], one)
            bt = b[h, t]
            vt = v[h, t]
            dat = da[h, t]
            for i in range(f):
                z[i] += bt[i]
                acc[i] = 0
            for c in range(dv):
                stc = st[c]
                vc = vt[c]
                dc = dt[c]
                for i in range(f):
                    x = stc[i] + bt[i] * vc                  # S_tᵀ = S_{t-1}ᵀ + v_t b_tᵀ
                    stc[i] = x
                    acc[i] += x * dc                         # (S_t dO_t)_i
            for i in range(f):
                dat[i] = acc[i] * inv + ct * z[i]            # S_t g_t + c_t z_t
        # reverse scan: R_t = Σ_{l≥t} a_l g_lᵀ, r_t = Σ_{l≥t} c_l a_l
        rr = np.zeros((f, dv), a.dtype)
        r = np.zeros(f, a.dtype)
        accv = np.empty(dv, a.dtype)
        for t in range(n - 1, -1, -1):
            dt = dout[h, t]
            inv, ct = _row_coefficients(den[h, t], dt, out[h, t], one)
            for c in range(dv):
                accv[c] = 0
            at = a[h, t]
            bt = b[h, t]
            vt = v[h, t]
            dbt = db[h, t]
            for i in range(f):
                ri = rr[i]
                ai = at[i] * inv                             # a_t[i] / den_t
                bi = bt[i]
                r[i] += ct * at[i]
                for c in range(dv):
                    x = ri[c] + ai * dt[c]                   # R_t = R_{t+1} + a_t g_tᵀ
                    ri[c] = x
                    accv[c] += bi * x                        # dv_t = R_tᵀ b_t
            for i in range(f):                               # dot products in their own loop
                ri = rr[i]                                   # (see the docstring)
                w = r[i]
                for c in range(dv):
                    w += ri[c] * vt[c]                       # db_t = R_t v_t + r_t
                dbt[i] = w
            dvt = dvv[h, t]
            for c in range(dv):
                dvt[c] = accv[c]


def _contig(*arrays):
    return tuple(np.ascontiguousarray(x) for x in arrays)


#: below this many state updates (BH·N·F·Dv) the scans run on one thread: waking the
#: thread pool costs up to ~10 ms on a busy machine, more than the whole small scan
PARALLEL_MIN_WORK = 1 << 24


def _launch(kernel, nh, work, *args):
    """Run a prange kernel, on one thread when the work is small or there is one sequence
    (each (batch, head) is independent, so the result does not depend on the thread count)."""
    if nh < 2 or work < PARALLEL_MIN_WORK:
        saved = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            kernel(*args)
        finally:
            numba.set_num_threads(saved)
    else:
        kernel(*args)


def causal_forward(a, b, v, eps):
    """Causal prefix-sum forward. ``a, b (BH, N, F)``, ``v (BH, N, Dv)``,
    ``eps (BH, N)``, one dtype. Returns ``out (BH, N, Dv)``, ``den (BH, N)``."""
    a, b, v, eps = _contig(a, b, v, eps)
    out = np.empty(v.shape, a.dtype)
    den = np.empty(a.shape[:2], a.dtype)
    _launch(_causal_forward_kernel, a.shape[0], a.size * v.shape[2], a, b, v, eps, out, den)
    return out, den


def causal_backward(a, b, v, out, den, dout):
    """Causal prefix-sum backward; returns ``da, db (BH, N, F)``, ``dv (BH, N, Dv)``."""
    a, b, v, out, den, dout = _contig(a, b, v, out, den, dout)
    da = np.empty(a.shape, a.dtype)
    db = np.empty(b.shape, a.dtype)
    dvv = np.empty(v.shape, a.dtype)
    _launch(_causal_backward_kernel, a.shape[0], a.size * v.shape[2], a, b, v, out, den, dout, da, db, dvv)
    return da, db, dvv


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
        s = s0[:, None] + np.cumsum(b[:, lo:hi, :, None] * v[:, lo:hi, None, :], axis=1)  # (BH, T, F, Dv)
        z = z0[:, None] + np.cumsum(b[:, lo:hi], axis=1)                                   # (BH, T, F)
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
    dvv = np.empty(v.shape, a.dtype)
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
        dvv[:, lo:hi] = np.einsum("htfc,htf->htc", rr, b[:, lo:hi])
        r0, q0 = rr[:, 0], r[:, 0]
    return da, db, dvv


# --------------------------------------------------------------------------- chunked (BLAS) form
def chunked_forward(a, b, v, eps, chunk=64):
    """Causal forward by chunks of C tokens: inside a chunk the masked product
    ``tril(A Bᵀ) V`` (dense, BLAS), between chunks a carried state
    ``S = Σ Bᵀ V``: ``O_c = (tril(A_c B_cᵀ) V_c + A_c S_{c-1}) / den``.
    Memory ``O(N·C + (N/C)·F·Dv)``."""
    nh, n, f = a.shape
    dv = v.shape[-1]
    nc = -(-n // chunk)
    pad = nc * chunk - n
    if pad:
        a, b, v = (np.concatenate([x, np.zeros((nh, pad, x.shape[-1]), x.dtype)], axis=1) for x in (a, b, v))
    ac = a.reshape(nh, nc, chunk, f)
    bc = b.reshape(nh, nc, chunk, f)
    vc = v.reshape(nh, nc, chunk, dv)
    tril = np.tril(np.ones((chunk, chunk), a.dtype))
    kv = np.swapaxes(bc, -1, -2) @ vc                                  # B_cᵀ V_c        (BH, nc, F, Dv)
    s_prev = np.cumsum(kv, axis=1) - kv                                # exclusive prefix (BH, nc, F, Dv)
    del kv
    zc = bc.sum(axis=2)                                                # (BH, nc, F)
    z_prev = np.cumsum(zc, axis=1) - zc
    scores = (ac @ np.swapaxes(bc, -1, -2)) * tril                     # tril(A_c B_cᵀ)  (BH, nc, C, C)
    num = scores @ vc + ac @ s_prev                                    # (BH, nc, C, Dv)
    den = scores.sum(axis=-1) + np.einsum("hkcf,hkf->hkc", ac, z_prev)
    den = den.reshape(nh, nc * chunk)[:, :n] + eps
    out = num.reshape(nh, nc * chunk, dv)[:, :n] * _safe_inv(den)[..., None]
    return out, den


def chunked_backward(a, b, v, out, den, dout, chunk=64):
    """Backward of :func:`chunked_forward` (same chunks, a reverse exclusive
    prefix for ``R``)."""
    nh, n, f = a.shape
    dv = v.shape[-1]
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
    vc = v.reshape(nh, nc, chunk, dv)
    gc = g.reshape(nh, nc, chunk, dv)
    cc = ct.reshape(nh, nc, chunk)
    tril = np.tril(np.ones((chunk, chunk), a.dtype))
    # d scores (within chunk): dP_ij = g_i·v_j + c_i, masked
    dscores = (gc @ np.swapaxes(vc, -1, -2) + cc[..., None]) * tril    # (BH, nc, C, C)
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
    dvv = np.swapaxes(scores, -1, -2) @ gc + bc @ r_next
    da = da.reshape(nh, nc * chunk, f)[:, :n]
    db = db.reshape(nh, nc * chunk, f)[:, :n]
    dvv = dvv.reshape(nh, nc * chunk, dv)[:, :n]
    return np.ascontiguousarray(da), np.ascontiguousarray(db), np.ascontiguousarray(dvv)
