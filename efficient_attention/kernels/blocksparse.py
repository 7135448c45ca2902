r"""Numba kernels of the block-sparse engine (:mod:`efficient_attention.blocksparse`), each beside
a plain NumPy reference of the same computation (the tests compare them).

**Layout arrays** (built and validated by :class:`~efficient_attention.blocksparse.BlockMask`;
these kernels do not bounds-check). With ``nqb = ceil(N/bq)`` query tiles and ``nkb =
ceil(M/bk)`` key tiles, row ``r = g·nqb + I`` of mask slice ``g`` lists the key tiles
``cols[indptr[r]:indptr[r+1]]`` (sorted) of query tile ``I``; ``tile[e]`` is ``-1`` for a full
tile, else the index of its boolean tile ``tiles[tile[e]]`` ``(bq, bk)``. The transposed layout
(``tindptr`` over ``g·nkb + J``, ``trows`` the query tiles, ``ttile``) lists the same blocks key
tile by key tile, query tiles ascending. ``q (BH, N, D)``, ``k (BH, M, D)``, ``v (BH, M, Dv)``
are contiguous with the leading axes flattened; ``slice_of[bh]`` is the mask slice of ``bh``.

**Products**: :func:`~efficient_attention.kernels.tilemm.tile_matmul` on tile views (no copies;
``accumulate`` adds in place), register-blocked vector FMAs rather than a BLAS call per tile (on
the development machine 1.4-1.5x the speed of OpenBLAS's ``sgemm`` on these tile sizes). Its
right operand needs unit stride along the columns of the result, so ``S = Q Kᵀ`` and
``dP = dO Vᵀ`` read the key tiles transposed, ``kt``/``vt`` ``(BH, nkb, D, bk)``
(:func:`pack_transposed`, once per call, O(M·D)). **Exponentials**: :func:`exp_sum_row` — the
library's vectorised float32 ``exp`` (:func:`~efficient_attention.kernels.fastexp.exp32`,
inlined) or the float64 :func:`~efficient_attention.kernels.fastexp.exp_inplace`. **Row
maxima**: :func:`row_max`, an integer max over the floats' bit patterns (vectorised, where a
float max reduction is not).

Kernels:

* :func:`blocksparse_forward` — per (slice, query tile), in parallel: the online softmax over its
  key tiles; writes ``out`` and the per-row log-sum-exp ``lse`` (``-inf`` for rows with no key).
* :func:`blocksparse_backward` — per slice, in parallel: one pass over its tiles, ``dQ`` per
  query tile, ``dK, dV`` accumulated per key tile (a slice belongs to one thread).
* :func:`blocksparse_backward_dq` and :func:`blocksparse_backward_dkdv` — the same sums split
  into a pass over query tiles and one over key tiles (transposed layout), in parallel over
  (slice, tile): for fewer slices than threads. Every sum runs in the same order as in
  :func:`blocksparse_backward` (over key tiles ascending for ``dQ``, query tiles ascending for
  ``dK, dV``) with the same tile products, so both give the same bits, whatever the thread count.
* :func:`pack_transposed` — the key (or value) tiles, transposed.
* :func:`csr_tile_counts`, :func:`csr_fill_tiles`, :func:`dense_tile_counts` — building a
  layout: allowed entries per tile of a CSR pattern or of a boolean strip, and the bits of the
  partial tiles (one pass over the entries).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ..config import JIT, JIT_PARALLEL
from .fastexp import exp32, exp_inplace
from .tilemm import tile_matmul

__all__ = [
    "pack_transposed", "pack_transposed_reference", "row_max", "exp_sum_row",
    "blocksparse_forward", "blocksparse_forward_reference",
    "blocksparse_backward", "blocksparse_backward_dq", "blocksparse_backward_dkdv",
    "blocksparse_backward_reference",
    "csr_tile_counts", "csr_tile_counts_reference",
    "csr_fill_tiles", "csr_fill_tiles_reference",
    "dense_tile_counts", "dense_tile_counts_reference",
    "csr_is_canonical", "csr_is_canonical_reference",
]


# ---------------------------------------------------------------------------------------------
# key tiles transposed (the right operand of S = Q Kᵀ and dP = dO Vᵀ)

@njit(**JIT_PARALLEL)
def pack_transposed(x, b, out):
    """``out[g, J, :, c] = x[g, J·b + c, :]``: ``x (BH, M, D)`` cut into tiles of ``b`` rows, each
    stored transposed ``(D, b)`` in ``out (BH, ceil(M/b), D, b)``, zero past row ``M``."""
    BH, M, D = x.shape
    nb = out.shape[1]
    for t in prange(BH * nb):
        g, J = t // nb, t % nb
        for c in range(b):
            row = J * b + c
            for d in range(D):
                out[g, J, d, c] = x[g, row, d] if row < M else 0.0


def pack_transposed_reference(x, b):
    """NumPy: the tiles of :func:`pack_transposed`, by padding, reshaping and transposing."""
    BH, M, D = x.shape
    nb = -(-M // b)
    padded = np.zeros((BH, nb * b, D), x.dtype)
    padded[:, :M] = x
    return np.ascontiguousarray(padded.reshape(BH, nb, b, D).transpose(0, 1, 3, 2))


# ---------------------------------------------------------------------------------------------
# elementwise rows of a score tile (row-major, rows of ``ck`` used columns)
#
# Each helper is a plain NumPy function (what the kernels' Python form runs) with an overload
# that numba compiles per dtype: float32 inlines the library's vectorised exp
# (``fastexp.exp32``), float64 runs ``fastexp.exp_inplace`` on the row.

def row_max(s, a, ck):
    """``max(s[a, :ck])`` (``-inf`` when every entry is ``-inf``)."""
    return s[a, :ck].max()


@overload(row_max, jit_options=dict(JIT))
def _row_max_overload(s, a, ck):
    # float max reductions do not vectorise without the 'nnan' fastmath flag (which the library
    # never sets); the bit patterns of IEEE floats, with the magnitude bits flipped for negative
    # numbers, order like the floats, and integer max reductions vectorise
    if s.dtype == types.float32:
        return _row_max_by_bits(np.int32, np.float32, 31, 0x7fffffff, -2 ** 31)
    return _row_max_by_bits(np.int64, np.float64, 63, 0x7fffffffffffffff, -2 ** 63)


def _row_max_by_bits(int_t, float_t, sign_bit, magnitude, lowest):
    """``row_max`` on the integer view of a float row (``int_t`` as wide as ``float_t``)."""
    shift, mag, low = int_t(sign_bit), int_t(magnitude), int_t(lowest)   # int_t constants: no widening

    def impl(s, a, ck):
        bits = s.view(int_t)
        m = low
        for c in range(ck):
            b = bits[a, c]
            m = max(m, int_t(b ^ ((b >> shift) & mag)))
        key = np.empty(1, int_t)
        key[0] = m ^ ((m >> shift) & mag)
        return key.view(float_t)[0]
    return impl


def exp_sum_row(s, a, ck, shift, work):
    """``s[a, :ck] <- exp(s[a, :ck] - shift)`` and return the row sum (``work``: float64
    scratch of at least ``ck`` entries, for the float64 path)."""
    with np.errstate(over="ignore", invalid="ignore"):
        s[a, :ck] = np.exp(s[a, :ck] - shift)
    return s[a, :ck].sum()


@overload(exp_sum_row, jit_options=dict(JIT))
def _exp_sum_row_overload(s, a, ck, shift, work):
    if s.dtype == types.float32:
        def impl32(s, a, ck, shift, work):
            sh = np.float32(shift)
            total = np.float32(0.0)
            for c in range(ck):
                e = exp32(s[a, c] - sh)
                s[a, c] = e
                total += e
            return total
        return impl32

    def impl64(s, a, ck, shift, work):
        row = s[a]
        for c in range(ck):
            row[c] = row[c] - shift
        exp_inplace(row, work, ck)
        total = 0.0
        for c in range(ck):
            total += row[c]
        return total
    return impl64


@njit(**JIT)
def _scaled_rows(x, bh, i0, rq, scale, out):
    """``out[:rq] = scale · x[bh, i0:i0+rq]``."""
    for a in range(rq):
        for c in range(x.shape[2]):
            out[a, c] = scale * x[bh, i0 + a, c]


@njit(**JIT)
def _work_item(t, n_tiles, slice_of, b, length):
    """Work item ``t`` of a pass over (slice, tile): ``(bh, r, start, rows)``, the slice, its row
    in the layout, and the tile's first index and size along an axis of ``length``."""
    bh = t // n_tiles
    ti = t % n_tiles
    start = ti * b
    return bh, slice_of[bh] * n_tiles + ti, start, min(b, length - start)


@njit(**JIT)
def _box(boxes, tid, rq, ck):
    """``(a0, a1, c0, c1)``: the rows ``a0:a1`` and columns ``c0:c1`` of a ``(rq, ck)`` block that
    hold its allowed pairs: the whole block when full (``tid < 0``), else the bounding box of the
    partial tile ``tid`` cut to the block (empty when ``a1 <= a0`` or ``c1 <= c0``)."""
    if tid < 0:
        return 0, rq, 0, ck
    return boxes[tid, 0], min(boxes[tid, 1], rq), boxes[tid, 2], min(boxes[tid, 3], ck)


@njit(**JIT)
def _mask_tile(s, ra, cc, tiles, tid, a0, c0):
    """``s[a, c] = -inf`` where the partial tile ``tiles[tid]`` is False at ``(a0 + a, c0 + c)``."""
    if tid < 0:
        return
    for a in range(ra):
        for c in range(cc):
            s[a, c] = s[a, c] if tiles[tid, a0 + a, c0 + c] else -np.inf


@njit(**JIT)
def _probs(s, rq, ck, lse, bh, i0, work):
    """``s <- exp(s - lse_i)`` row by row (rows with ``lse = -inf`` become 0)."""
    for a in range(rq):
        ell = lse[bh, i0 + a]
        if ell == -np.inf:
            for c in range(ck):
                s[a, c] = 0.0
        else:
            exp_sum_row(s, a, ck, ell, work)


@njit(**JIT)
def _dsoftmax(p, dp, rq, ck, delta, bh, i0):
    """``dp <- p ⊙ (dp - δ_i)``."""
    for a in range(rq):
        d = delta[bh, i0 + a]
        for c in range(ck):
            dp[a, c] = p[a, c] * (dp[a, c] - d)


# ---------------------------------------------------------------------------------------------
# forward

@njit(**JIT_PARALLEL)
def blocksparse_forward(q, k, v, kt, scale, slice_of, indptr, cols, tile, tiles, boxes, bq, bk, out, lse):
    """``out (BH, N, Dv)`` and ``lse (BH, N)`` of softmax attention over the tile layout (a
    partial tile computed on its bounding box ``boxes[tid]`` alone)."""
    BH, N, D = q.shape
    M = k.shape[1]
    Dv = v.shape[2]
    nqb = (N + bq - 1) // bq
    for t in prange(BH * nqb):
        bh, r, i0, rq = _work_item(t, nqb, slice_of, bq, N)
        qs = np.empty((rq, D), q.dtype)
        _scaled_rows(q, bh, i0, rq, scale, qs)                    # s Q_I
        acc = np.zeros((rq, Dv), q.dtype)                          # unnormalised O
        m_run = np.full(rq, -np.inf, q.dtype)
        l_run = np.zeros(rq, q.dtype)
        s = np.empty((rq, bk), q.dtype)
        work = np.empty(bk, np.float64)
        for e in range(indptr[r], indptr[r + 1]):
            j0 = cols[e] * bk
            a0, a1, c0, c1 = _box(boxes, tile[e], rq, min(bk, M - j0))
            if a1 <= a0 or c1 <= c0:
                continue
            ra, cc = a1 - a0, c1 - c0                              # rows, columns of the box
            sv = s[:ra, :cc]
            tile_matmul(qs[a0:a1], kt[bh, cols[e], :, c0:c1], sv, False)       # S = s Q_I K_Jᵀ
            _mask_tile(s, ra, cc, tiles, tile[e], a0, c0)
            for a in range(ra):
                row = a0 + a
                m_old = m_run[row]
                m_new = max(m_old, row_max(s, a, cc))              # m' = max(m, rowmax S)
                if m_new == -np.inf:                               # no allowed key yet
                    for c in range(cc):
                        s[a, c] = 0.0
                    continue
                total = exp_sum_row(s, a, cc, m_new, work)         # P = e^(S - m'), rowsum P
                if m_old != m_new:
                    alpha = np.exp(m_old - m_new)                  # e^(m - m'), 0 on the first key
                    l_run[row] = alpha * l_run[row] + total
                    for c in range(Dv):
                        acc[row, c] *= alpha
                    m_run[row] = m_new
                else:
                    l_run[row] += total
            tile_matmul(sv, v[bh, j0 + c0:j0 + c1], acc[a0:a1], True)          # Õ += P V_J
        for a in range(rq):
            if l_run[a] > 0:
                inv = 1.0 / l_run[a]
                for c in range(Dv):
                    out[bh, i0 + a, c] = acc[a, c] * inv
                lse[bh, i0 + a] = m_run[a] + np.log(l_run[a])
            else:                                                  # fully masked row
                for c in range(Dv):
                    out[bh, i0 + a, c] = 0.0
                lse[bh, i0 + a] = -np.inf


def _ref_tile(tiles, tid, rq, ck):
    """The boolean tile of a block (all True when full), cut to ``(rq, ck)``."""
    return np.ones((rq, ck), bool) if tid < 0 else tiles[tid, :rq, :ck]


def blocksparse_forward_reference(q, k, v, scale, slice_of, indptr, cols, tile, tiles, bq, bk):
    """NumPy: the same tiled online softmax, one query tile and one whole key tile at a time (the
    kernel computes partial tiles on their boxes only: the reference does not, so that the two
    agree only if the boxes lose no allowed pair)."""
    BH, N, _ = q.shape
    M = k.shape[1]
    nqb = -(-N // bq)
    out = np.zeros((BH, N, v.shape[2]), q.dtype)
    lse = np.full((BH, N), -np.inf, q.dtype)
    for bh in range(BH):
        for ti in range(nqb):
            r = slice_of[bh] * nqb + ti
            rows = slice(ti * bq, min(N, ti * bq + bq))
            qs = scale * q[bh, rows]
            m_run = np.full(qs.shape[0], -np.inf)
            l_run = np.zeros(qs.shape[0])
            acc = np.zeros((qs.shape[0], v.shape[2]))
            for e in range(indptr[r], indptr[r + 1]):
                keys = slice(cols[e] * bk, min(M, cols[e] * bk + bk))
                s = qs @ k[bh, keys].T                                         # S       (bq, bk)
                s = np.where(_ref_tile(tiles, tile[e], *s.shape), s, -np.inf)
                m_new = np.maximum(m_run, s.max(axis=1))                       # m'
                safe = np.where(np.isneginf(m_new), 0.0, m_new)
                p = np.exp(s - safe[:, None])                                  # e^(S - m')
                alpha = np.exp(m_run - safe)                                   # e^(m - m')
                l_run = alpha * l_run + p.sum(axis=1)
                acc = alpha[:, None] * acc + p @ v[bh, keys]
                m_run = m_new
            seen = l_run > 0
            out[bh, rows][seen] = (acc[seen] / l_run[seen, None]).astype(q.dtype)
            lse[bh, rows][seen] = (m_run[seen] + np.log(l_run[seen])).astype(q.dtype)
    return out, lse


# ---------------------------------------------------------------------------------------------
# backward

@njit(**JIT)
def _backward_block(q, k, kt, vt, dout, lse, delta, bh, i0, rq, j0, ck, tiles, boxes, tid, qs, s, dp, work,
                    dq_acc, dk, dv, with_dq, with_dkdv):
    """One (query tile, key tile) block of the backward, on the block's box (rows ``I``, keys
    ``J``): ``dq_acc[I] += dS K_J`` and/or ``dK_J += dSᵀ (s Q_I)``, ``dV_J += Pᵀ dO_I``."""
    a0, a1, c0, c1 = _box(boxes, tid, rq, ck)
    if a1 <= a0 or c1 <= c0:
        return
    ra, cc = a1 - a0, c1 - c0
    sv = s[:ra, :cc]
    dpv = dp[:ra, :cc]
    keys = k[bh, j0 + c0:j0 + c1]
    J = j0 // kt.shape[3]
    tile_matmul(qs[a0:a1], kt[bh, J, :, c0:c1], sv, False)           # S = s Q_I K_Jᵀ
    _mask_tile(s, ra, cc, tiles, tid, a0, c0)
    _probs(s, ra, cc, lse, bh, i0 + a0, work)                      # P = e^(S - ℓ)
    do = dout[bh, i0 + a0:i0 + a1]
    if with_dkdv:
        tile_matmul(sv.T, do, dv[bh, j0 + c0:j0 + c1], True)         # dV_J += Pᵀ dO_I
    tile_matmul(do, vt[bh, J, :, c0:c1], dpv, False)                 # dP = dO_I V_Jᵀ
    _dsoftmax(s, dp, ra, cc, delta, bh, i0 + a0)                   # dS = P ⊙ (dP - δ)
    if with_dq:
        tile_matmul(dpv, keys, dq_acc[a0:a1], True)                  # dQ_I += dS K_J
    if with_dkdv:
        tile_matmul(dpv.T, qs[a0:a1], dk[bh, j0 + c0:j0 + c1], True)  # dK_J += dSᵀ (s Q_I)


@njit(**JIT)
def _scratch(q, bq, bk):
    """A backward work item's buffers: ``qs``, ``dq_acc`` (a tile's rows of q), the score and
    probability-gradient tiles ``s``, ``dp``, and ``work`` (float64, a tile's columns)."""
    D = q.shape[2]
    return (np.empty((bq, D), q.dtype), np.empty((bq, D), q.dtype), np.empty((bq, bk), q.dtype),
            np.empty((bq, bk), q.dtype), np.empty(bk, np.float64))


@njit(**JIT)
def _query_tile_backward(q, k, kt, vt, dout, lse, delta, scale, bh, r, i0, rq, indptr, cols, tile, tiles, boxes, bk,
                         qs, s, dp, work, dq_acc, dq, dk, dv, with_dkdv):
    """Query tile ``i0:i0+rq`` of slice ``bh`` (layout row ``r``) over its key tiles: ``dq`` of its
    rows, and with ``with_dkdv`` its terms of ``dk``, ``dv`` added (buffers ``qs``, ``dq_acc``:
    ``rq`` rows at least; ``s``, ``dp``: a tile)."""
    M = k.shape[1]
    D = q.shape[2]
    _scaled_rows(q, bh, i0, rq, scale, qs)
    dq_acc[:rq, :] = 0.0
    for e in range(indptr[r], indptr[r + 1]):
        j0 = cols[e] * bk
        _backward_block(q, k, kt, vt, dout, lse, delta, bh, i0, rq, j0, min(bk, M - j0), tiles, boxes, tile[e],
                        qs[:rq], s, dp, work, dq_acc[:rq], dk, dv, True, with_dkdv)
    for a in range(rq):
        for c in range(D):
            dq[bh, i0 + a, c] = scale * dq_acc[a, c]                # dQ = s dS K


@njit(**JIT_PARALLEL)
def blocksparse_backward(q, k, kt, vt, dout, lse, delta, scale, slice_of, indptr, cols, tile, tiles, boxes, bq, bk,
                         dq, dk, dv):
    """``dq``, and ``dk``, ``dv`` (zeroed by the caller) of the block-sparse attention; each slice
    ``bh`` is one work item (one thread walks all its tiles)."""
    BH, N, D = q.shape
    nqb = (N + bq - 1) // bq
    for bh in prange(BH):
        qs, dq_acc, s, dp, work = _scratch(q, bq, bk)
        for ti in range(nqb):
            i0 = ti * bq
            _query_tile_backward(q, k, kt, vt, dout, lse, delta, scale, bh, slice_of[bh] * nqb + ti, i0,
                                 min(bq, N - i0), indptr, cols, tile, tiles, boxes, bk, qs, s, dp, work, dq_acc,
                                 dq, dk, dv, True)


@njit(**JIT_PARALLEL)
def blocksparse_backward_dq(q, k, kt, vt, dout, lse, delta, scale, slice_of, indptr, cols, tile, tiles, boxes,
                            bq, bk, dq):
    """``dq`` alone, in parallel over (slice, query tile)."""
    BH, N, D = q.shape
    nqb = (N + bq - 1) // bq
    for t in prange(BH * nqb):
        bh, r, i0, rq = _work_item(t, nqb, slice_of, bq, N)
        qs, dq_acc, s, dp, work = _scratch(q, bq, bk)
        _query_tile_backward(q, k, kt, vt, dout, lse, delta, scale, bh, r, i0, rq, indptr, cols, tile, tiles,
                             boxes, bk, qs, s, dp, work, dq_acc, dq, dq, dq, False)


@njit(**JIT_PARALLEL)
def blocksparse_backward_dkdv(q, k, kt, vt, dout, lse, delta, scale, slice_of, tindptr, trows, ttile, tiles,
                              boxes, bq, bk, dk, dv):
    """``dk``, ``dv`` (zeroed by the caller), in parallel over (slice, key tile) through the
    transposed layout: each key tile's rows belong to one work item."""
    BH, N, D = q.shape
    M = k.shape[1]
    nkb = (M + bk - 1) // bk
    for t in prange(BH * nkb):
        bh, r, j0, ck = _work_item(t, nkb, slice_of, bk, M)
        qs, _, s, dp, work = _scratch(q, bq, bk)
        for e in range(tindptr[r], tindptr[r + 1]):
            i0 = trows[e] * bq
            rq = min(bq, N - i0)
            _scaled_rows(q, bh, i0, rq, scale, qs)
            _backward_block(q, k, kt, vt, dout, lse, delta, bh, i0, rq, j0, ck, tiles, boxes, ttile[e],
                            qs[:rq], s, dp, work, qs[:rq], dk, dv, False, True)


def blocksparse_backward_reference(q, k, v, dout, lse, delta, scale, slice_of, indptr, cols, tile, tiles,
                                   bq, bk):
    """NumPy: ``(dq, dk, dv)`` by the same tiles, whole, query tile by query tile."""
    BH, N, _ = q.shape
    M = k.shape[1]
    nqb = -(-N // bq)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for bh in range(BH):
        for ti in range(nqb):
            r = slice_of[bh] * nqb + ti
            rows = slice(ti * bq, min(N, ti * bq + bq))
            qs = scale * q[bh, rows]
            ell = lse[bh, rows]
            empty = np.isneginf(ell)
            do = dout[bh, rows]
            for e in range(indptr[r], indptr[r + 1]):
                keys = slice(cols[e] * bk, min(M, cols[e] * bk + bk))
                s = qs @ k[bh, keys].T                                            # S
                allowed = _ref_tile(tiles, tile[e], *s.shape) & ~empty[:, None]
                p = np.where(allowed, np.exp(np.where(allowed, s - np.where(empty, 0, ell)[:, None], 0)), 0)
                dv[bh, keys] += p.T @ do                                          # dV += Pᵀ dO
                ds = p * (do @ v[bh, keys].T - delta[bh, rows][:, None])          # dS = P ⊙ (dP - δ)
                dq[bh, rows] += scale * (ds @ k[bh, keys])                        # dQ += s dS K
                dk[bh, keys] += ds.T @ qs                                         # dK += dSᵀ (s Q)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# building a layout

@njit(**JIT)
def csr_tile_counts(indptr, indices, r0, r1, bq, bk, counts):
    """``counts[I - r0 // bq, J]`` += 1 for every entry ``(i, j)`` of rows ``[r0, r1)`` (``r0`` a
    multiple of ``bq``), ``I = i // bq``, ``J = j // bk``."""
    for i in range(r0, r1):
        ti = (i - r0) // bq
        for e in range(indptr[i], indptr[i + 1]):
            counts[ti, indices[e] // bk] += 1


def csr_tile_counts_reference(indptr, indices, r0, r1, bq, bk, shape):
    rows = np.repeat(np.arange(r0, r1), np.diff(indptr[r0:r1 + 1]))
    counts = np.zeros(shape, np.int64)
    np.add.at(counts, ((rows - r0) // bq, indices[indptr[r0]:indptr[r1]] // bk), 1)
    return counts


@njit(**JIT)
def csr_fill_tiles(indptr, indices, r0, r1, bq, bk, pid, tiles):
    """``tiles[pid[I', J], i % bq, j % bk] = True`` for the entries of rows ``[r0, r1)`` whose block
    has a partial-tile index ``pid >= 0`` (``I' = (i - r0) // bq``)."""
    for i in range(r0, r1):
        ti = (i - r0) // bq
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            p = pid[ti, j // bk]
            if p >= 0:
                tiles[p, i % bq, j % bk] = True


def csr_fill_tiles_reference(indptr, indices, r0, r1, bq, bk, pid, n_tiles):
    rows = np.repeat(np.arange(r0, r1), np.diff(indptr[r0:r1 + 1]))
    cols = indices[indptr[r0]:indptr[r1]]
    p = pid[(rows - r0) // bq, cols // bk]
    tiles = np.zeros((n_tiles, bq, bk), bool)
    sel = p >= 0
    tiles[p[sel], rows[sel] % bq, cols[sel] % bk] = True
    return tiles


@njit(**JIT)
def dense_tile_counts(strip, bq, bk, counts):
    """``counts[g, I, J]`` = allowed entries of tile ``(I, J)`` of the boolean rows ``strip (G, R, M)``."""
    G, R, M = strip.shape
    for g in range(G):
        for i in range(R):
            ti = i // bq
            for j0 in range(0, M, bk):
                c = 0
                for j in range(j0, min(M, j0 + bk)):
                    c += strip[g, i, j]
                counts[g, ti, j0 // bk] += c


def dense_tile_counts_reference(strip, bq, bk):
    G, R, M = strip.shape
    ti, tk = -(-R // bq), -(-M // bk)
    padded = np.zeros((G, ti * bq, tk * bk), bool)
    padded[:, :R, :M] = strip
    return padded.reshape(G, ti, bq, tk, bk).sum(axis=(2, 4), dtype=np.int64)


@njit(**JIT)
def csr_is_canonical(indptr, indices, m):
    """True when ``indptr`` is non-decreasing and every row's indices are strictly increasing and
    in ``[0, m)`` (sorted, no duplicates: a canonical CSR whose entries the kernels may count)."""
    for i in range(indptr.shape[0] - 1):
        a, b = indptr[i], indptr[i + 1]
        if b < a:
            return False
        prev = -1
        for e in range(a, b):
            j = indices[e]
            if j <= prev or j >= m:
                return False
            prev = j
    return True


def csr_is_canonical_reference(indptr, indices, m):
    if np.any(np.diff(indptr) < 0):
        return False
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    idx = indices[:indptr[-1]]
    new_row = np.ones(idx.size, bool)
    new_row[1:] = rows[1:] != rows[:-1]
    increasing = np.ones(idx.size, bool)
    increasing[1:] = idx[1:] > idx[:-1]
    return bool(np.all((idx >= 0) & (idx < m) & (new_row | increasing)))
