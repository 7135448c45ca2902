r"""Numba kernels for bucketed chunk attention (Reformer LSH, Routing), beside NumPy references.

The computation (shape letters: BH batch and heads flattened into one axis, R rounds,
N queries, M keys, D, Dv, C buckets) is described by a :class:`Layout`: for every
sequence ``b`` (an index along BH) and round ``r`` the queries and the keys are sorted by
(bucket, position) and cut into chunks; query chunk ``c`` attends to key
chunks ``c`` and, with ``lookback``, ``c - 1``. A pair ``(i, j)`` found there
is *allowed in round r* when

* ``j <= i`` if causal, ``j != i`` if shared (the self rule is applied by the caller),
* the buckets agree in round ``r`` unless ``across`` (attend across buckets).

Rounds are combined into one softmax over the union of the allowed pairs:
a pair allowed in ``n_ij`` rounds gets the score ``s_ij - log n_ij`` in each
of them, so that

.. math::

    \sum_r e^{\operatorname{lse}_r} = \sum_{j \in \cup_r S_r(i)} e^{s_{ij}},\qquad
    o_i = \sum_r e^{\operatorname{lse}_r - L_i}\, o_{r,i},\quad L_i = \log\sum_r e^{\operatorname{lse}_r}

equals masked attention over the union (each pair counted once).

Engine
------
* forward: rounds one after the other; within a round ``prange`` over
  (sequence, chunk) work items, each query belongs to exactly one chunk, so
  each item owns its output rows and merges its round into the running
  ``(out, lse)`` with the log-sum-exp update (no per-round buffer: memory
  O(N·Dv) beyond the inputs, plus the O(R·N) integer layout).
* backward: recomputes the probabilities from the combined ``lse``; per
  round, items of even chunks run in parallel, then items of odd chunks:
  item ``c`` writes keys of chunks ``c`` and ``c - 1`` only, so items of one
  parity never touch the same key row (race-free ``+=`` without buffers).
* score blocks go through BLAS (``np.dot`` on gathered contiguous blocks);
  the rows' exponentials use the vectorisable ``exp_inplace`` of
  :mod:`efficient_attention.kernels.fastexp` (numba's ``exp`` is a scalar
  libm call here, no SVML), and float32 blocks its float32 twin
  ``exp32_shift_inplace`` in place (no float64 row copies).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .. import config
from ..config import JIT, JIT_PARALLEL
from .fastexp import exp32_shift_inplace, exp_inplace

__all__ = [
    "Layout",
    "sort_layout",
    "bucket_forward",
    "bucket_backward",
    "bucket_forward_reference",
    "bucket_backward_reference",
    "layout_pairs",
]


class Layout(NamedTuple):
    """Sorted order and chunking of every (sequence, round); all arrays int64, C-contiguous.

    ``qperm[b, r, s]`` is the query at sorted slot ``s``; chunk ``c`` holds the
    query slots ``qptr[b, r, c] : qptr[b, r, c+1]``; ``qchunk[b, r, i]`` is the
    chunk of query ``i``; ``qbuck[b, r, i]`` its bucket (same for keys).
    For shared QK the key arrays are the query arrays.
    """

    qperm: np.ndarray   # (BH, R, N)
    qptr: np.ndarray    # (BH, R, n_chunks + 1)
    qchunk: np.ndarray  # (BH, R, N)
    qbuck: np.ndarray   # (BH, R, N)
    kperm: np.ndarray   # (BH, R, M)
    kptr: np.ndarray    # (BH, R, n_chunks + 1)
    kchunk: np.ndarray  # (BH, R, M)
    kbuck: np.ndarray   # (BH, R, M)
    lookback: bool      # chunk c also sees chunk c - 1


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """Stable argsort along the last axis (radix sort for keys that fit 16 bits)."""
    if keys.size and keys.max() < 2 ** 15:
        keys = keys.astype(np.int16)
    return np.argsort(keys, axis=-1, kind="stable")


def _counts_ptr(bucket_sorted: np.ndarray, n_buckets: int) -> np.ndarray:
    """``ptr[b, r, c]`` = number of sorted items with bucket < c (chunks = buckets)."""
    edges = np.arange(n_buckets + 1)
    flat = bucket_sorted.reshape(-1, bucket_sorted.shape[-1])
    ptr = np.stack([np.searchsorted(row, edges, side="left") for row in flat])
    return ptr.reshape(bucket_sorted.shape[:-1] + (n_buckets + 1,)).astype(np.int64)


def _inverse_chunk(perm: np.ndarray, chunk_sorted: np.ndarray) -> np.ndarray:
    out = np.empty_like(perm)
    np.put_along_axis(out, perm, chunk_sorted, axis=-1)
    return out


def sort_layout(qbuck: np.ndarray, kbuck: np.ndarray | None, n_buckets: int,
                chunk_size: int | None, shared: bool) -> Layout:
    """Sort by (bucket, position) and chunk, for every sequence and round.

    Parameters
    ----------
    qbuck : (BH, R, N) int
        Query buckets.
    kbuck : (BH, R, M) int or None
        Key buckets (None when ``shared``: keys are the queries).
    n_buckets : int
    chunk_size : int or None
        None: *exact* mode, one chunk per bucket and no look-back.
        Shared QK: chunks of ``chunk_size`` sorted tokens (the last one shorter
        when N is not a multiple). Separate QK: the N queries and M keys are
        merged in position order (key before query at equal position), sorted
        stably by bucket and cut into chunks of ``2 * chunk_size`` items.
    """
    qbuck = np.ascontiguousarray(qbuck, dtype=np.int64)
    BH, R, N = qbuck.shape
    if shared:
        perm = _stable_argsort(qbuck)
        if chunk_size is None:
            ptr = _counts_ptr(np.take_along_axis(qbuck, perm, -1), n_buckets)
            chunk = qbuck.copy()
            lookback = False
        else:
            n_chunks = -(-N // chunk_size)
            ptr = np.broadcast_to(np.minimum(np.arange(n_chunks + 1) * chunk_size, N),
                                  (BH, R, n_chunks + 1)).astype(np.int64)
            chunk = _inverse_chunk(perm, np.broadcast_to(np.arange(N) // chunk_size, perm.shape))
            lookback = True
        perm = np.ascontiguousarray(perm, dtype=np.int64)
        ptr, chunk = np.ascontiguousarray(ptr), np.ascontiguousarray(chunk, dtype=np.int64)
        return Layout(perm, ptr, chunk, qbuck, perm, ptr, chunk, qbuck, lookback)

    kbuck = np.ascontiguousarray(kbuck, dtype=np.int64)
    M = kbuck.shape[-1]
    if chunk_size is None:
        qperm, kperm = _stable_argsort(qbuck), _stable_argsort(kbuck)
        qptr = _counts_ptr(np.take_along_axis(qbuck, qperm, -1), n_buckets)
        kptr = _counts_ptr(np.take_along_axis(kbuck, kperm, -1), n_buckets)
        return Layout(np.ascontiguousarray(qperm, dtype=np.int64), qptr, qbuck.copy(), qbuck,
                      np.ascontiguousarray(kperm, dtype=np.int64), kptr, kbuck.copy(), kbuck, False)

    # merged sequence in position order, key before query at equal position
    L = max(N, M)
    pos = np.repeat(np.arange(L), 2)
    is_q = np.tile(np.array([False, True]), L)
    keep = np.where(is_q, pos < N, pos < M)
    pos, is_q = pos[keep], is_q[keep]                          # (N + M,)
    merged = np.empty((BH, R, N + M), np.int64)
    merged[..., is_q] = qbuck
    merged[..., ~is_q] = kbuck
    order = _stable_argsort(merged)                            # (BH, R, N + M)
    items = 2 * chunk_size
    n_chunks = -(-(N + M) // items)
    sorted_is_q = is_q[order]
    sorted_pos = pos[order]
    slot_chunk = np.arange(N + M) // items
    qperm = sorted_pos[sorted_is_q].reshape(BH, R, N)
    kperm = sorted_pos[~sorted_is_q].reshape(BH, R, M)
    qchunk_sorted = np.broadcast_to(slot_chunk, order.shape)[sorted_is_q].reshape(BH, R, N)
    kchunk_sorted = np.broadcast_to(slot_chunk, order.shape)[~sorted_is_q].reshape(BH, R, M)
    bounds = np.minimum(np.arange(n_chunks + 1) * items, N + M)
    q_before = np.concatenate([np.zeros((BH, R, 1), np.int64), np.cumsum(sorted_is_q, -1)], -1)
    qptr = q_before[..., bounds]                               # queries among slots < c * items
    kptr = bounds[None, None, :] - qptr
    as64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)  # noqa: E731
    return Layout(as64(qperm), as64(qptr), as64(_inverse_chunk(qperm, qchunk_sorted)), qbuck,
                  as64(kperm), as64(kptr), as64(_inverse_chunk(kperm, kchunk_sorted)), kbuck, True)


# --------------------------------------------------------------------------- numba


# the rows' exponentials use the library's vectorisable exp (kernels/fastexp.py): numba's
# math.exp is a scalar libm call here (no SVML)

@njit(**JIT)
def _chunk_span(qptr, kptr, b, r, c, lookback):
    """Chunk c of round r: its queries ``[qs, qs + nq)`` and the keys it sees ``[ks, ks + nk)``
    (its own chunk, and the previous one with ``lookback``) in sorted order."""
    qs = qptr[b, r, c]
    nq = qptr[b, r, c + 1] - qs
    c0 = c - 1 if (lookback and c > 0) else c
    ks = kptr[b, r, c0]
    return qs, nq, ks, kptr[b, r, c + 1] - ks


@njit(**JIT)
def _gather_rows(x, b, idx):
    """The rows ``x[b, idx]`` as a contiguous block (for BLAS)."""
    out = np.empty((idx.shape[0], x.shape[2]), x.dtype)
    for a in range(idx.shape[0]):
        out[a] = x[b, idx[a]]
    return out


@njit(**JIT)
def _gather_ids(b, r, qs, nq, ks, nk, qperm, kperm, qchunk, qbuck, kchunk, kbuck, across,
                qptr_len):
    """The block's query / key indices, their buckets in round r, and one code per round,
    gathered once per block so that the pair loop reads small local arrays.

    ``code = bucket * (n_chunks + 2) + chunk`` (``qptr_len = n_chunks + 1``; just the chunk
    when attending across buckets), so that "allowed in round rr" is
    ``0 <= qcode - kcode <= lookback``: same bucket, same or previous chunk.
    """
    R = qperm.shape[1]
    big = np.int64(0) if across else np.int64(qptr_len + 1)     # chunk ids are < n_chunks
    qi = np.empty(nq, np.int64)
    kj = np.empty(nk, np.int64)
    qb = np.empty(nq, np.int64)
    kb = np.empty(nk, np.int64)
    qcode = np.empty((R, nq), np.int64)
    kcode = np.empty((R, nk), np.int64)
    for a in range(nq):
        i = qperm[b, r, qs + a]
        qi[a] = i
        qb[a] = qbuck[b, r, i]
        for rr in range(R):
            qcode[rr, a] = qbuck[b, rr, i] * big + qchunk[b, rr, i]
    for t in range(nk):
        j = kperm[b, r, ks + t]
        kj[t] = j
        kb[t] = kbuck[b, r, j]
        for rr in range(R):
            kcode[rr, t] = kbuck[b, rr, j] * big + kchunk[b, rr, j]
    return qi, kj, qb, kb, qcode, kcode


@njit(**JIT)
def _exp_row(row, shift, f32, xrow, work):
    """``row[:] = exp(row - shift)`` in place: float32 rows with the float32 exp directly,
    float64 rows through the float64 buffers ``xrow``, ``work`` of ``exp_inplace``."""
    n = row.shape[0]
    if f32:
        exp32_shift_inplace(row, shift)
    else:
        for t in range(n):
            xrow[t] = row[t] - shift
        exp_inplace(xrow, work, n)
        for t in range(n):
            row[t] = xrow[t]


@njit(**JIT)
def _mask_scores(S, qi, kj, qb, kb, qcode, kcode, lookback, across, causal, shared, scale):
    """In place: S[a, t] <- scale * S[a, t] - log n_ij for allowed pairs, -inf otherwise.

    n_ij = number of rounds in which the pair is allowed (bucket and chunk rule):
    ``0 <= qcode - kcode <= lookback`` in that round. Written as branch-free passes
    over a row so that LLVM vectorises them.
    """
    R = qcode.shape[0]
    nq, nk = S.shape
    reach = 1 if lookback else 0
    logs = np.zeros(R + 1)
    for c in range(2, R + 1):
        logs[c] = math.log(c)                                  # duplicate correction log n_ij
    cnt = np.zeros(nk, np.int64)
    for a in range(nq):
        i = qi[a]
        qba = qb[a]
        for t in range(nk):
            cnt[t] = 0
        if R > 1:
            for rr in range(R):
                qca = qcode[rr, a]
                for t in range(nk):
                    gap = qca - kcode[rr, t]
                    cnt[t] += 1 if (gap >= 0 and gap <= reach) else 0
        for t in range(nk):
            j = kj[t]
            ok = (not causal or j <= i) and (not shared or j != i) and (across or kb[t] == qba)
            S[a, t] = scale * S[a, t] - logs[cnt[t]] if ok else -np.inf


@njit(**JIT_PARALLEL)
def _forward_round(q, k, v, qperm, qptr, qchunk, qbuck, kperm, kptr, kchunk, kbuck, r,
                   lookback, across, causal, shared, scale, f32, out, lse):
    """Round r of the forward pass, merged into the running (out, lse) of every query."""
    BH, N, D = q.shape
    Dv = v.shape[2]
    n_chunks = qptr.shape[2] - 1
    for item in prange(BH * n_chunks):
        b = item // n_chunks
        c = item % n_chunks
        qs, nq, ks, nk = _chunk_span(qptr, kptr, b, r, c, lookback)
        if nq == 0 or nk == 0:
            continue
        qi, kj, qb, kb, qcode, kcode = _gather_ids(b, r, qs, nq, ks, nk, qperm, kperm, qchunk,
                                                   qbuck, kchunk, kbuck, across, qptr.shape[2])
        Qb = _gather_rows(q, b, qi)
        Kb = _gather_rows(k, b, kj)
        Vb = _gather_rows(v, b, kj)
        S = np.dot(Qb, Kb.T)                                  # q_i . k_j          (nq, nk)
        _mask_scores(S, qi, kj, qb, kb, qcode, kcode, lookback, across, causal, shared, scale)
        row_lse = np.empty(nq, np.float64)
        xrow = np.empty(nk, np.float64)
        work = np.empty(nk, np.float64)
        for a in range(nq):
            m = -np.inf
            for t in range(nk):
                m = max(m, S[a, t])
            if m == -np.inf:                                   # nothing allowed this round
                row_lse[a] = -np.inf
                for t in range(nk):
                    S[a, t] = 0.0
                continue
            _exp_row(S[a], m, f32, xrow, work)                # e^(s - max)
            total = 0.0
            for t in range(nk):
                total += S[a, t]
            inv = 1.0 / total
            for t in range(nk):
                S[a, t] = S[a, t] * inv                        # p = softmax within the round
            row_lse[a] = m + math.log(total)
        O = np.dot(S, Vb)                                      # o_r = P V            (nq, Dv)
        for a in range(nq):
            lr = row_lse[a]
            if lr == -np.inf:
                continue
            i = qi[a]
            lo = lse[b, i]
            if lo == -np.inf:
                lse[b, i] = lr
                for e in range(Dv):
                    out[b, i, e] = O[a, e]
            else:                                              # L = log(e^lo + e^lr)
                mx = max(lo, lr)
                new = mx + math.log(math.exp(lo - mx) + math.exp(lr - mx))
                w_old = math.exp(lo - new)
                w_new = math.exp(lr - new)
                lse[b, i] = new
                for e in range(Dv):
                    out[b, i, e] = w_old * out[b, i, e] + w_new * O[a, e]


@njit(**JIT_PARALLEL)
def _backward_round(q, k, v, dout, lse, delta, qperm, qptr, qchunk, qbuck, kperm, kptr, kchunk,
                    kbuck, r, first, step, lookback, across, causal, shared, scale, f32, dq, dk, dv):
    """Round r of the backward pass for chunks first, first + step, ... (race-free with step 2)."""
    BH, N, D = q.shape
    Dv = v.shape[2]
    n_chunks = qptr.shape[2] - 1
    per_b = (n_chunks - first + step - 1) // step
    for item in prange(BH * per_b):
        b = item // per_b
        c = first + step * (item % per_b)
        qs, nq, ks, nk = _chunk_span(qptr, kptr, b, r, c, lookback)
        if nq == 0 or nk == 0:
            continue
        qi, kj, qb, kb, qcode, kcode = _gather_ids(b, r, qs, nq, ks, nk, qperm, kperm, qchunk,
                                                   qbuck, kchunk, kbuck, across, qptr.shape[2])
        Qb = _gather_rows(q, b, qi)
        dOb = _gather_rows(dout, b, qi)
        Kb = _gather_rows(k, b, kj)
        Vb = _gather_rows(v, b, kj)
        S = np.dot(Qb, Kb.T)
        _mask_scores(S, qi, kj, qb, kb, qcode, kcode, lookback, across, causal, shared, scale)
        dP = np.dot(dOb, Vb.T)                                 # dP = dO V^T         (nq, nk)
        xrow = np.empty(nk, np.float64)
        work = np.empty(nk, np.float64)
        for a in range(nq):
            i = qi[a]
            L = lse[b, i]
            di = delta[b, i]
            if L == -np.inf:
                for t in range(nk):
                    S[a, t] = 0.0
                    dP[a, t] = 0.0
                continue
            for t in range(nk):
                S[a, t] = min(S[a, t] - L, 0.0)                # s - L <= 0 (-inf when masked)
            _exp_row(S[a], 0.0, f32, xrow, work)               # p = exp(s - L), L over all rounds
            for t in range(nk):
                dP[a, t] = S[a, t] * (dP[a, t] - di)           # dS = P (dP - rowsum(P dP))
        dVb = np.dot(S.T, dOb)                                 # dV = P^T dO          (nk, Dv)
        dQb = np.dot(dP, Kb)                                   # dQ = s dS K          (nq, D)
        dKb = np.dot(dP.T, Qb)                                 # dK = s dS^T Q        (nk, D)
        for a in range(nq):
            i = qi[a]
            for e in range(D):
                dq[b, i, e] += scale * dQb[a, e]
        for t in range(nk):
            j = kj[t]
            for e in range(D):
                dk[b, j, e] += scale * dKb[t, e]
            for e in range(Dv):
                dv[b, j, e] += dVb[t, e]


def _flags(lay: Layout, across, causal, shared):
    return bool(lay.lookback), bool(across), bool(causal), bool(shared)


def bucket_forward(q, k, v, lay: Layout, *, causal, shared, across, scale, kernel=None):
    """Union-of-rounds bucket attention: ``out (BH, N, Dv)`` and its log-sum-exp ``(BH, N)``.

    ``q (BH, N, D)``, ``k (BH, M, D)``, ``v (BH, M, Dv)`` contiguous, one dtype.
    Rows with no allowed key output 0 and ``lse = -inf``. ``kernel`` replaces
    the round kernel (tests pass its ``py_func``).
    """
    kernel = _forward_round if kernel is None else kernel
    BH, N = q.shape[:2]
    out = np.zeros((BH, N, v.shape[-1]), q.dtype)
    lse = np.full((BH, N), -np.inf, np.float64)
    lookback, across, causal, shared = _flags(lay, across, causal, shared)
    with config.blas_threads_limited():   # nested BLAS threads in a prange: 20-60x slower
        for r in range(lay.qperm.shape[1]):
            kernel(q, k, v, lay.qperm, lay.qptr, lay.qchunk, lay.qbuck, lay.kperm, lay.kptr,
                   lay.kchunk, lay.kbuck, r, lookback, across, causal, shared, float(scale),
                   q.dtype == np.float32, out, lse)
    return out, lse


def bucket_backward(q, k, v, dout, out, lse, lay: Layout, *, causal, shared, across, scale,
                    kernel=None):
    """Gradients ``(dq, dk, dv)`` of :func:`bucket_forward` (hashes held fixed)."""
    kernel = _backward_round if kernel is None else kernel
    delta = np.einsum("bnd,bnd->bn", dout.astype(np.float64), out.astype(np.float64))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    lookback, across, causal, shared = _flags(lay, across, causal, shared)
    n_chunks = lay.qptr.shape[2] - 1
    starts = (0, 1) if lookback else (0,)
    step = 2 if lookback else 1
    with config.blas_threads_limited():   # nested BLAS threads in a prange: 20-60x slower
        for r in range(lay.qperm.shape[1]):
            for first in starts:
                if first >= n_chunks:
                    continue
                kernel(q, k, v, dout, lse, delta, lay.qperm, lay.qptr, lay.qchunk, lay.qbuck,
                       lay.kperm, lay.kptr, lay.kchunk, lay.kbuck, r, first, step, lookback,
                       across, causal, shared, float(scale), q.dtype == np.float32, dq, dk, dv)
    return dq, dk, dv


# --------------------------------------------------------------------------- NumPy references


def _chunk_blocks(lay: Layout, b: int, r: int, c: int):
    qs, qe = lay.qptr[b, r, c], lay.qptr[b, r, c + 1]
    c0 = c - 1 if (lay.lookback and c > 0) else c
    ks, ke = lay.kptr[b, r, c0], lay.kptr[b, r, c + 1]
    return lay.qperm[b, r, qs:qe], lay.kperm[b, r, ks:ke]


def _allowed_counts(lay: Layout, b, r, qi, kj, causal, shared, across):
    """(allowed in round r, n_ij) for the block of queries qi and keys kj."""
    I, J = qi[:, None], kj[None, :]
    allowed = np.ones((qi.size, kj.size), bool)
    if causal:
        allowed &= J <= I
    if shared:
        allowed &= J != I
    if not across:
        allowed &= lay.qbuck[b, r, I] == lay.kbuck[b, r, J]
    counts = np.zeros(allowed.shape, np.int64)
    for rr in range(lay.qperm.shape[1]):
        same = True if across else (lay.qbuck[b, rr, I] == lay.kbuck[b, rr, J])
        qc, kc = lay.qchunk[b, rr, I], lay.kchunk[b, rr, J]
        counts += same & ((kc == qc) | (lay.lookback & (kc == qc - 1)))
    return allowed, counts


def bucket_forward_reference(q, k, v, lay: Layout, *, causal, shared, across, scale):
    """Plain NumPy twin of :func:`bucket_forward`: every round's ``(o_r, lse_r)`` kept,
    then combined by ``L = logsumexp_r lse_r``, ``out = sum_r exp(lse_r - L) o_r``."""
    BH, N = q.shape[:2]
    R = lay.qperm.shape[1]
    o = np.zeros((BH, R, N, v.shape[-1]))
    lr = np.full((BH, R, N), -np.inf)
    for b in range(BH):
        for r in range(R):
            for c in range(lay.qptr.shape[2] - 1):
                qi, kj = _chunk_blocks(lay, b, r, c)
                if qi.size == 0 or kj.size == 0:
                    continue
                allowed, counts = _allowed_counts(lay, b, r, qi, kj, causal, shared, across)
                s = scale * (q[b, qi].astype(np.float64) @ k[b, kj].T.astype(np.float64))
                s = s - np.log(np.maximum(counts, 1))
                s = np.where(allowed, s, -np.inf)
                top = np.max(s, axis=-1, keepdims=True)
                top = np.where(np.isfinite(top), top, 0.0)
                e = np.exp(s - top)                              # 0 where not allowed
                total = e.sum(axis=-1, keepdims=True)
                p = e / np.where(total > 0, total, 1.0)
                with np.errstate(divide="ignore"):
                    l = np.where(total[:, 0] > 0, top[:, 0] + np.log(total[:, 0]), -np.inf)
                o[b, r, qi] = p @ v[b, kj]
                lr[b, r, qi] = l
    L = np.full((BH, N), -np.inf)
    finite = np.isfinite(lr).any(axis=1)
    mx = np.where(finite, np.max(np.where(np.isfinite(lr), lr, -1e300), axis=1), 0.0)
    w = np.where(np.isfinite(lr), np.exp(lr - mx[:, None]), 0.0)
    total = w.sum(axis=1)
    L[finite] = (mx + np.log(np.where(finite, total, 1.0)))[finite]
    out = np.einsum("brn,brnd->bnd", w / np.where(finite, total, 1.0)[:, None], o)
    return out.astype(q.dtype), L


def bucket_backward_reference(q, k, v, dout, out, lse, lay: Layout, *, causal, shared, across,
                              scale):
    """Plain NumPy twin of :func:`bucket_backward` (loops over sequences, rounds, chunks)."""
    BH, N = q.shape[:2]
    R = lay.qperm.shape[1]
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    q, k, v, dout, out = map(f64, (q, k, v, dout, out))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    delta = np.sum(dout * out, axis=-1)
    for b in range(BH):
        for r in range(R):
            for c in range(lay.qptr.shape[2] - 1):
                qi, kj = _chunk_blocks(lay, b, r, c)
                if qi.size == 0 or kj.size == 0:
                    continue
                allowed, counts = _allowed_counts(lay, b, r, qi, kj, causal, shared, across)
                s = scale * (q[b, qi] @ k[b, kj].T) - np.log(np.maximum(counts, 1))
                live = allowed & np.isfinite(lse[b, qi])[:, None]
                p = np.where(live, np.exp(np.where(live, s - lse[b, qi][:, None], 0.0)), 0.0)  # exp(s - L)
                dv[b, kj] += p.T @ dout[b, qi]
                ds = p * (dout[b, qi] @ v[b, kj].T - delta[b, qi][:, None])
                dq[b, qi] += scale * ds @ k[b, kj]
                dk[b, kj] += scale * ds.T @ q[b, qi]
    return dq, dk, dv


def layout_pairs(lay: Layout, b: int, *, causal, shared, across):
    """All ``(i, j)`` pairs allowed in some round of sequence ``b`` (with repeats), as two arrays."""
    rows, cols = [], []
    for r in range(lay.qperm.shape[1]):
        for c in range(lay.qptr.shape[2] - 1):
            qi, kj = _chunk_blocks(lay, b, r, c)
            if qi.size == 0 or kj.size == 0:
                continue
            allowed, _ = _allowed_counts(lay, b, r, qi, kj, causal, shared, across)
            a, t = np.nonzero(allowed)
            rows.append(qi[a])
            cols.append(kj[t])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows), np.concatenate(cols)
