r"""Numba kernels of sparse (CSR-pattern) attention, each beside its NumPy reference.

A pattern is given by CSR index arrays: row ``i`` of head ``h`` allows the
keys ``indices[indptr[h, i]:indptr[h, i+1]]`` (sorted, in ``[0, M)``; the
wrappers in :mod:`efficient_attention.sparse` validate and canonicalise them
with :func:`~efficient_attention.validate.check_csr` first — these kernels do
not bounds-check). Arrays are contiguous, ``q (BH, N, D)``, ``k (BH, M, D)``,
``v (BH, M, Dv)``, with the leading batch and head axes flattened into
``BH``; the pattern of ``bh`` is ``bh % H`` (``H = indptr.shape[0]``: one
pattern for all, or one per head, heads being the last leading axis).

Building blocks, one pattern (``indptr (N+1,)``), rows in parallel:

* :func:`sddmm` — sampled dense-dense product, ``s_e = scale · q_i · k_j`` for
  every stored entry ``e = (i, j)``: ``(BH, nnz)``;
* :func:`csr_softmax` — row softmax of those values and the per-row
  log-sum-exp (``-inf`` for an empty row);
* :func:`spmm` — the sparse product ``out_i = Σ_e p_e v_j``.

Fused attention (what :class:`~efficient_attention.sparse.SparseAttention`
runs), keeping only the per-row log-sum-exp ``lse`` between forward and
backward:

* :func:`sparse_attention_forward` — the three blocks in one pass per row:
  scores into a per-block buffer, max, exp, sum, ``Σ p v``;
* :func:`sparse_attention_backward_dq` — row pass: recompute
  ``p = exp(s - lse_i)``, ``dp = dO_i · v_j``, ``ds = p (dp - δ_i)`` with
  ``δ_i = dO_i · O_i``, accumulate ``dQ_i = scale Σ_j ds k_j``;
* :func:`sparse_attention_backward_dkdv` — key-major pass over the
  transposed pattern (CSC): each key ``j`` owns its rows of ``dK`` and
  ``dV``: ``dV_j = Σ_i p v``, ``dK_j = scale Σ_i ds q_i``. No thread ever
  writes a row another thread writes (no racy ``+=``), and the order of
  every sum is fixed, so results do not depend on the thread count.

Sums (dot products, softmax totals) accumulate in float64 also for float32
inputs; results are stored in the input dtype. Exponentials go through the
vectorisable :func:`~efficient_attention.kernels.fastexp.exp_inplace` on
float64 buffers of a row (numba's ``np.exp`` is a scalar libm call here); the
building blocks keep ``np.exp``.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit, prange

from ..config import JIT_PARALLEL, JIT_PLAIN
from .fastexp import exp_inplace

__all__ = [
    "sddmm", "sddmm_reference",
    "csr_softmax", "csr_softmax_reference",
    "spmm", "spmm_reference",
    "sparse_attention_forward", "sparse_attention_forward_reference",
    "sparse_attention_backward_dq", "sparse_attention_backward_dq_reference",
    "sparse_attention_backward_dkdv", "sparse_attention_backward_dkdv_reference",
    "pattern_index",
]

#: query rows (or key columns) per parallel work item of the fused kernels
ROWS = 32


def pattern_index(csrs):
    """The index arrays the fused kernels read for canonical CSR patterns ``csrs`` (one per
    head): ``(indptr (H, N+1), indices, tptr (H, M+1), tind)``, int64, row-major and key-major
    (row ``j`` of the transposed pattern lists the queries of key ``j``, sorted), the entries of
    head ``h`` after those of heads ``< h``."""
    offsets = np.cumsum([0] + [c.nnz for c in csrs])
    indptr = np.stack([c.indptr.astype(np.int64) + o for c, o in zip(csrs, offsets)])
    indices = np.concatenate([c.indices for c in csrs]).astype(np.int64)
    trans = [sp.csr_array(c.T) for c in csrs]
    for t in trans:
        t.sort_indices()
    tptr = np.stack([t.indptr.astype(np.int64) + o for t, o in zip(trans, offsets)])
    tind = np.concatenate([t.indices for t in trans]).astype(np.int64)
    return indptr, indices, tptr, tind


# --------------------------------------------------------------------------- building blocks

@njit(**JIT_PARALLEL)
def sddmm(q, k, indptr, indices, scale, out):
    """``out[b, e] = scale · q[b, i] · k[b, indices[e]]`` for entry ``e`` of row ``i``.

    q (BH, N, D), k (BH, M, D), indptr (N+1,), indices (nnz,), out (BH, nnz).
    """
    BH, N, D = q.shape
    for t in prange(BH * N):
        b = t // N
        i = t % N
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            acc = 0.0
            for c in range(D):
                acc += q[b, i, c] * k[b, j, c]
            out[b, e] = scale * acc


def sddmm_reference(q, k, indptr, indices, scale):
    """NumPy: gather the rows and columns of every stored entry, one einsum."""
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return scale * np.einsum("bed,bed->be", q[:, rows], k[:, indices])          # (BH, nnz)


@njit(**JIT_PARALLEL)
def csr_softmax(scores, indptr, probs, lse):
    """Row softmax of CSR values: ``probs[b, e] = exp(s_e - lse_i)``, ``lse[b, i]``
    the log-sum-exp of row ``i`` (``-inf`` when the row is empty).

    scores, probs (BH, nnz); indptr (N+1,); lse (BH, N).
    """
    BH = scores.shape[0]
    N = indptr.shape[0] - 1
    for t in prange(BH * N):
        b = t // N
        i = t % N
        a = indptr[i]
        z = indptr[i + 1]
        if a == z:
            lse[b, i] = -np.inf
            continue
        mx = -np.inf
        for e in range(a, z):
            mx = max(mx, scores[b, e])
        total = 0.0
        for e in range(a, z):
            total += np.exp(scores[b, e] - mx)
        row_lse = mx + np.log(total)
        lse[b, i] = row_lse
        for e in range(a, z):
            probs[b, e] = np.exp(scores[b, e] - row_lse)


def csr_softmax_reference(scores, indptr):
    """NumPy: segment max and segment sum with ``ufunc.at`` over the row of each entry."""
    n = len(indptr) - 1
    rows = np.repeat(np.arange(n), np.diff(indptr))
    mx = np.full(scores.shape[:-1] + (n,), -np.inf)
    np.maximum.at(mx.T, rows, scores.T)                                           # row max  (BH, N)
    e = np.exp(scores - mx[:, rows])
    total = np.zeros_like(mx)
    np.add.at(total.T, rows, e.T)                                                 # row sum  (BH, N)
    nonempty = np.diff(indptr) > 0
    lse = np.full_like(mx, -np.inf)
    lse[:, nonempty] = mx[:, nonempty] + np.log(total[:, nonempty])
    return e / total[:, rows], lse


@njit(**JIT_PARALLEL)
def spmm(probs, indptr, indices, v, out):
    """``out[b, i] = Σ_e probs[b, e] · v[b, indices[e]]`` over the entries of row ``i``.

    probs (BH, nnz), v (BH, M, Dv), out (BH, N, Dv).
    """
    BH, N, Dv = out.shape
    for t in prange(BH * N):
        b = t // N
        i = t % N
        for c in range(Dv):
            out[b, i, c] = 0.0
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            p = probs[b, e]
            for c in range(Dv):
                out[b, i, c] += p * v[b, j, c]


def spmm_reference(probs, indptr, indices, v):
    """NumPy/scipy: one ``csr_array @ v`` per batch entry."""
    n, m = len(indptr) - 1, v.shape[-2]
    return np.stack([sp.csr_array((probs[b], indices, indptr), shape=(n, m)) @ v[b]
                     for b in range(v.shape[0])]).reshape(v.shape[:1] + (n, v.shape[-1]))


# --------------------------------------------------------------------------- fused forward

@njit(**JIT_PARALLEL)
def sparse_attention_forward(q, k, v, indptr, indices, scale, out, lse):
    """Fused sparse attention forward: ``out (BH, N, Dv)`` and ``lse (BH, N)``.

    indptr (H, N+1) with offsets into the shared ``indices``; pattern of ``bh`` is ``bh % H``.
    """
    BH, N, D = q.shape
    Dv = v.shape[2]
    H = indptr.shape[0]
    longest = 0
    for h in range(H):
        for i in range(N):
            longest = max(longest, indptr[h, i + 1] - indptr[h, i])
    nblk = (N + ROWS - 1) // ROWS
    for t in prange(BH * nblk):
        bh = t // nblk
        h = bh % H
        i0 = (t % nblk) * ROWS
        s = np.empty(longest, np.float64)                 # scores, then weights, of one row
        work = np.empty(longest, np.float64)              # exp_inplace's scratch
        for i in range(i0, min(N, i0 + ROWS)):
            a = indptr[h, i]
            z = indptr[h, i + 1]
            for c in range(Dv):
                out[bh, i, c] = 0.0
            if a == z:                                    # fully masked row: output 0, lse = -inf
                lse[bh, i] = -np.inf
                continue
            mx = -np.inf
            for e in range(a, z):                         # s_j = scale · q_i · k_j
                j = indices[e]
                acc = 0.0
                for c in range(D):
                    acc += q[bh, i, c] * k[bh, j, c]
                s[e - a] = scale * acc
                mx = max(mx, s[e - a])
            for e in range(z - a):
                s[e] -= mx
            exp_inplace(s, work, z - a)                   # w_j = exp(s_j - max), vectorised
            total = 0.0
            for e in range(z - a):
                total += s[e]
            inv = 1.0 / total
            for e in range(a, z):                         # out_i = Σ_j (w_j / Σw) v_j
                j = indices[e]
                p = s[e - a] * inv
                for c in range(Dv):
                    out[bh, i, c] += p * v[bh, j, c]
            lse[bh, i] = mx + np.log(total)


def sparse_attention_forward_reference(q, k, v, indptr, indices, scale):
    """NumPy: ``spmm(csr_softmax(sddmm(...)))`` head by head; returns ``(out, lse)``."""
    H = indptr.shape[0]
    BH, N, _ = q.shape
    out = np.zeros((BH, N, v.shape[-1]))
    lse = np.zeros((BH, N))
    for h in range(H):
        sel = np.arange(h, BH, H)
        ptr = indptr[h] - indptr[h, 0]
        ind = indices[indptr[h, 0]:indptr[h, -1]]
        scores = sddmm_reference(q[sel], k[sel], ptr, ind, scale)
        probs, lse[sel] = csr_softmax_reference(scores, ptr)
        out[sel] = spmm_reference(probs, ptr, ind, v[sel])
    return out, lse


# --------------------------------------------------------------------------- fused backward

def _longest_row(ptr):
    longest = 0
    for h in range(ptr.shape[0]):
        for i in range(ptr.shape[1] - 1):
            longest = max(longest, ptr[h, i + 1] - ptr[h, i])
    return longest


_longest_row_jit = njit(**JIT_PLAIN)(_longest_row)


@njit(**JIT_PARALLEL)
def sparse_attention_backward_dq(q, k, v, dout, lse, delta, indptr, indices, scale, dq):
    """Row pass: ``dq[bh, i] = scale Σ_j p_ij (dO_i·v_j - δ_i) k_j`` with ``p_ij = exp(s_ij - lse_i)``.

    delta (BH, N) is ``rowsum(dO ⊙ O)``; dq (BH, N, D).
    """
    BH, N, D = q.shape
    Dv = v.shape[2]
    H = indptr.shape[0]
    longest = _longest_row_jit(indptr)
    nblk = (N + ROWS - 1) // ROWS
    for t in prange(BH * nblk):
        bh = t // nblk
        h = bh % H
        i0 = (t % nblk) * ROWS
        p = np.empty(longest, np.float64)                  # s_ij - lse_i, then p_ij
        dp = np.empty(longest, np.float64)                 # dO_i · v_j
        work = np.empty(longest, np.float64)
        for i in range(i0, min(N, i0 + ROWS)):
            for c in range(D):
                dq[bh, i, c] = 0.0
            a = indptr[h, i]
            z = indptr[h, i + 1]
            row_lse = lse[bh, i]
            row_delta = delta[bh, i]
            for e in range(a, z):
                j = indices[e]
                acc = 0.0
                for c in range(D):
                    acc += q[bh, i, c] * k[bh, j, c]
                p[e - a] = scale * acc - row_lse
                acc = 0.0
                for c in range(Dv):
                    acc += dout[bh, i, c] * v[bh, j, c]
                dp[e - a] = acc                            # dP_ij = dO_i · v_j
            exp_inplace(p, work, z - a)                    # p_ij recomputed from lse
            for e in range(a, z):
                j = indices[e]
                ds = scale * p[e - a] * (dp[e - a] - row_delta)   # scale · dS_ij
                for c in range(D):
                    dq[bh, i, c] += ds * k[bh, j, c]


@njit(**JIT_PARALLEL)
def sparse_attention_backward_dkdv(q, k, v, dout, lse, delta, tptr, tind, scale, dk, dv):
    """Key-major pass over the transposed pattern (``tptr (H, M+1)``, ``tind`` the
    query rows of every key): ``dv[bh, j] = Σ_i p_ij dO_i``,
    ``dk[bh, j] = scale Σ_i p_ij (dO_i·v_j - δ_i) q_i``. Each key owns its rows."""
    BH, M, D = k.shape
    Dv = v.shape[2]
    H = tptr.shape[0]
    longest = _longest_row_jit(tptr)
    nblk = (M + ROWS - 1) // ROWS
    for t in prange(BH * nblk):
        bh = t // nblk
        h = bh % H
        j0 = (t % nblk) * ROWS
        p = np.empty(longest, np.float64)
        dp = np.empty(longest, np.float64)
        work = np.empty(longest, np.float64)
        for j in range(j0, min(M, j0 + ROWS)):
            for c in range(D):
                dk[bh, j, c] = 0.0
            for c in range(Dv):
                dv[bh, j, c] = 0.0
            a = tptr[h, j]
            z = tptr[h, j + 1]
            for e in range(a, z):
                i = tind[e]
                acc = 0.0
                for c in range(D):
                    acc += q[bh, i, c] * k[bh, j, c]
                p[e - a] = scale * acc - lse[bh, i]
                acc = 0.0
                for c in range(Dv):
                    acc += dout[bh, i, c] * v[bh, j, c]
                dp[e - a] = acc
            exp_inplace(p, work, z - a)                    # p_ij
            for e in range(a, z):
                i = tind[e]
                pe = p[e - a]
                ds = scale * pe * (dp[e - a] - delta[bh, i])
                for c in range(Dv):
                    dv[bh, j, c] += pe * dout[bh, i, c]    # dV_j += p_ij dO_i
                for c in range(D):
                    dk[bh, j, c] += ds * q[bh, i, c]       # dK_j += scale dS_ij q_i


def _backward_reference(q, k, v, dout, lse, indptr, indices, scale):
    """NumPy: the dense oracle's chain rule on CSR values, head by head."""
    H = indptr.shape[0]
    BH, N, _ = q.shape
    M = k.shape[1]
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for h in range(H):
        sel = np.arange(h, BH, H)
        ptr = indptr[h] - indptr[h, 0]
        ind = indices[indptr[h, 0]:indptr[h, -1]]
        rows = np.repeat(np.arange(N), np.diff(ptr))
        scores = sddmm_reference(q[sel], k[sel], ptr, ind, scale)                 # S   (b, nnz)
        probs = np.exp(scores - lse[sel][:, rows])                                 # P = exp(S - lse)
        dprobs = sddmm_reference(dout[sel], v[sel], ptr, ind, 1.0)                 # dP = dO·v_j
        delta = np.stack([np.bincount(rows, weights=pd, minlength=N)
                          for pd in probs * dprobs]).reshape(len(sel), N)        # Σ_j P dP  (b, N)
        dscores = probs * (dprobs - delta[:, rows])                                # dS
        for b_local, b in enumerate(sel):
            ds = sp.csr_array((dscores[b_local], ind, ptr), shape=(N, M))
            p = sp.csr_array((probs[b_local], ind, ptr), shape=(N, M))
            dq[b] = scale * (ds @ k[b])                                            # dQ = s dS K
            dk[b] = scale * (ds.T @ q[b])                                          # dK = s dSᵀ Q
            dv[b] = p.T @ dout[b]                                                  # dV = Pᵀ dO
    return dq, dk, dv


def sparse_attention_backward_dq_reference(q, k, v, dout, lse, delta, indptr, indices, scale):
    """NumPy reference of :func:`sparse_attention_backward_dq` (``delta`` recomputed as ``Σ_j P dP``)."""
    return _backward_reference(q, k, v, dout, lse, indptr, indices, scale)[0]


def sparse_attention_backward_dkdv_reference(q, k, v, dout, lse, delta, indptr, indices, scale):
    """NumPy reference of :func:`sparse_attention_backward_dkdv`, from the *row-major*
    pattern (``indptr``, ``indices``): returns ``(dk, dv)``."""
    return _backward_reference(q, k, v, dout, lse, indptr, indices, scale)[1:]
