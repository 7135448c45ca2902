r"""Chapter 1 — local (truncated) and strided (dilated) attention as banded computations.

A hand-designed pattern computes only some entries of the :math:`N\times N`
score matrix. Two of the lecture's patterns are *bands* and need no index
arrays at all:

.. math::

    \text{local:}\quad j \in \mathcal{A}(i) \iff |i-j| \le w
    \quad(\text{causal: } 0 \le i-j \le w),

    \text{strided:}\quad j \in \mathcal{A}(i) \iff (i-j) \bmod r = 0
    \ \text{and}\ |i-j| \le w\,r \ (\text{if } w \text{ is given; causal: also } j \le i),

with window :math:`w` keys on each side and stride (dilation) :math:`r`; then
:math:`O_i = \sum_{j\in\mathcal{A}(i)} \operatorname{softmax}_j(s\,q_i\cdot k_j)\,v_j`
(Beltagy et al. 2020, Longformer, arXiv:2004.05150 §3.1; Child et al. 2019,
Sparse Transformers, arXiv:1904.10509 §4.1).

**Blocked band.** Queries are taken ``b`` at a time. The block
:math:`[s, s+b)` needs only the contiguous key range
:math:`[s-w,\ s+b+w)` (causal: :math:`[s-w,\ s+b)`), so its scores are one
small dense product :math:`Q_{[s,s+b)}K_{[s-w,s+b+w)}^\top` computed by BLAS,
masked to the band (adding a ``(b, L)`` matrix of 0 and ``-inf``), and soft-maxed once over the range (key ranges longer
than ``key_block`` are walked in chunks with the online softmax, the running
maximum and sum rescaled per chunk). The forward keeps only the output and
the per-row log-sum-exp :math:`\ell_i`; the backward recomputes each block's
probabilities :math:`P = e^{S - \ell}` (FlashAttention, arXiv:2205.14135
§3.1) and, one chain-rule step a line,

.. math::

    dV_{\text{range}} \mathrel{+}= P^\top dO_{\text{blk}},\quad
    dP = dO_{\text{blk}} V_{\text{range}}^\top,\quad
    dS = P \odot (dP - \operatorname{rowsum}(P\odot dP)),\quad
    dQ_{\text{blk}} = s\,dS\,K_{\text{range}},\quad
    dK_{\text{range}} \mathrel{+}= s\,dS^\top Q_{\text{blk}}.

**Parallelism.** Independent work items — a group of batch entries, a residue class (strided),
a segment of at least ``max(2w, config.LOCAL_MIN_SEGMENT)`` queries — run on ``config.THREADS`` Python threads
(numpy and BLAS release the GIL) while BLAS is held to one thread (``threadpoolctl``), which
keeps both the products and the elementwise work (mask, exp, sums: numpy runs them on one
core) busy on every core and does not oversubscribe. In the backward the segments run in two
waves, even then odd: segments ``2w`` apart have disjoint key ranges, so no two concurrent
items add into the same ``dK``/``dV`` rows, and the summation order — hence every bit of the
result — does not depend on the number of threads.

**Elementwise work.** For float32 the row maximum, the shifted exponential, the row sums and
the softmax backward of each block run row by row in numba
(:mod:`efficient_attention.kernels.band`, GIL released), with the library's float32 ``exp``:
numpy's float32 ``exp`` is not vectorised on this machine and took as long as a block's
product; the fused rows cut forward+backward by about 15%. float64 (and
``config.LOCAL_ROW_KERNELS = False``) runs the NumPy lines beside them, which the tests compare.

**Strided = local on interleaved subsequences.** :math:`(i-j) \bmod r = 0`
means that :math:`i` and :math:`j` lie in the same residue class
:math:`i \equiv j \equiv c \pmod r`; on the subsequence
:math:`c, c+r, c+2r, \dots` the pattern is local attention with window
:math:`w` (or unbounded when ``window`` is None), so strided attention runs
the same banded code on contiguous copies of the ``r`` residue classes
``q[..., c::r, :]`` (BLAS is about 30% slower on the strided views) and interleaves the
outputs back; the copies are ``O(N·D)``.

**Complexity** (per sequence and head, :math:`w < N`): FLOPs
:math:`2\,\mathrm{nnz}\,(D+D_v)` forward and :math:`2\,\mathrm{nnz}\,(3D+2D_v)`
backward, with :math:`\mathrm{nnz} = N(2w+1) - w(w+1)` allowed pairs
(causal: :math:`N(w+1) - w(w+1)/2`); the blocked computation does
:math:`b + 2w` instead of :math:`2w + 1` products per query, a fraction
:math:`\approx b/(b+2w)` of wasted work. Memory :math:`O(N(D+D_v))`: the
output, ``N`` log-sum-exps and block-sized scratch — no :math:`N\times N`
and no :math:`N\times w` array, in the forward or the backward pass.
Strided attention costs :math:`N(2w+1)` pairs with a window, and about
:math:`N^2/r` without.

**Peers.** Our ``window`` counts keys on *each* side (:math:`2w+1` keys per
query). xformers' odd window ``w`` is ours ``(w-1)//2``; HF Longformer's
even ``attention_window`` is ours ``w/2``; lucidrains' ``local-attention``
attends to whole neighbouring blocks (its real window depends on the
position inside the block), so it is not the same pattern. Dilated
Longformer heads (our strided with a window) are implemented by none of them.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from . import config
from .core import AttentionCore, Cost, Grads
from .kernels import band
from .validate import (check_bool, check_cache, check_dout, check_int, check_qkv, check_scale,
                       resolve_scale, finite_policy)

__all__ = ["LocalAttention", "StridedAttention", "local_mask", "strided_mask", "band_pairs"]


# ---------------------------------------------------------------------------------------------
# the pattern as plain numpy (the tests build theirs independently)

def local_mask(n: int, window: int, causal: bool = False) -> np.ndarray:
    """Dense boolean ``(N, N)`` band: ``|i-j| <= window`` (causal ``0 <= i-j <= window``)."""
    diff = np.arange(n)[:, None] - np.arange(n)[None, :]          # i - j   (N, N)
    return (diff <= window) & (diff >= (0 if causal else -window))


def strided_mask(n: int, stride: int, window: int | None = None, causal: bool = False) -> np.ndarray:
    """Dense boolean ``(N, N)``: ``(i-j) % stride == 0``, ``|i-j| <= window*stride`` if window given,
    causal also ``j <= i``."""
    diff = np.arange(n)[:, None] - np.arange(n)[None, :]          # i - j   (N, N)
    mask = diff % stride == 0
    if window is not None:
        mask &= np.abs(diff) <= window * stride
    if causal:
        mask &= diff >= 0
    return mask


def band_pairs(n: int, window: int | None, causal: bool = False) -> int:
    """Exact number of allowed pairs of the local band on ``n`` tokens (``window=None``: unbounded)."""
    if n <= 0:
        return 0
    w = n - 1 if window is None else min(int(window), n - 1)
    if causal:
        return n * (w + 1) - w * (w + 1) // 2
    return n * (2 * w + 1) - w * (w + 1)


def _strided_pairs(n: int, stride: int, window: int | None, causal: bool) -> int:
    """Allowed pairs of the strided pattern: the local band on each residue class."""
    return sum(band_pairs(len(range(c, n, stride)), window, causal) for c in range(min(stride, n)))


# ---------------------------------------------------------------------------------------------
# the banded computation on (G, N, D) views (contiguous or strided along N)

def _key_range(s: int, e: int, n: int, window: int, causal: bool) -> tuple[int, int]:
    """Keys ``[lo, hi)`` that queries ``[s, e)`` may see."""
    return max(0, s - window), (e if causal else min(n, e + window))


def _chunks(lo: int, hi: int, key_block: int):
    return [(c0, min(hi, c0 + key_block)) for c0 in range(lo, hi, key_block)]


def _band_bias(offset: int, b: int, length: int, window: int, lowest: int, dtype, biases: dict):
    """Additive mask of a ``(b, L)`` block: 0 where ``lowest <= i - j <= window`` with
    ``i - j = offset + a - c``, ``-inf`` elsewhere, as ``((c0, c1, slab), ...)``: only the runs
    of columns ``[c0, c1)`` that cross the band's edges (at most ``b`` wide each; the columns
    in between are inside for every row and are left alone). Empty when the whole block is in
    the band. (Adding a slab is several times faster than a boolean ``copyto``.) Cached per
    call in ``biases``."""
    key = (offset, b, length)
    if key not in biases:
        diff = offset + np.arange(b)[:, None] - np.arange(length)[None, :]   # i - j   (b, L)
        inside = (diff <= window) & (diff >= lowest)
        cut = np.flatnonzero(np.diff(np.concatenate(([0], ~inside.all(axis=0), [0])).astype(np.int8)))
        biases[key] = tuple((int(c0), int(c1), np.where(inside[:, c0:c1], 0, -np.inf).astype(dtype))
                            for c0, c1 in zip(cut[::2], cut[1::2]))        # runs of cut columns
    return biases[key]


def _scores(qs, k, c0, c1, s, window, lowest, biases):
    """``S = (s q_blk) K_[c0,c1)ᵀ`` with ``-inf`` outside the band.   (G, b, L)"""
    scores = np.matmul(qs, np.swapaxes(k[:, c0:c1], -1, -2))   # (G, b, L)
    for a0, a1, slab in _band_bias(s - c0, qs.shape[1], c1 - c0, window, lowest, qs.dtype, biases):
        scores[..., a0:a1] += slab
    return scores


def _rows_kernel(dtype) -> bool:
    """Use the float32 row kernels (:mod:`efficient_attention.kernels.band`) for this dtype;
    float64 (and ``config.LOCAL_ROW_KERNELS = False``) runs the plain NumPy lines beside them."""
    return config.LOCAL_ROW_KERNELS and dtype == np.float32


def _band_forward(q, k, v, out, lse, window, causal, scale, query_block, key_block, s0, s1):
    """Fill rows ``[s0, s1)`` of ``out (G, N, Dv)`` and ``lse (G, N)`` for the local band on
    ``q, k, v (G, N, ·)``."""
    n, lowest, biases = q.shape[1], (0 if causal else -window), {}
    rows_kernel = _rows_kernel(q.dtype)
    for s in range(s0, s1, query_block):
        e = min(n, s + query_block)
        lo, hi = _key_range(s, e, n, window, causal)
        qs = q[:, s:e] * scale                                  # s q_blk          (G, b, D)
        chunks = _chunks(lo, hi, key_block)
        if len(chunks) == 1:                                    # one softmax over the range
            scores = _scores(qs, k, lo, hi, s, window, lowest, biases)       # S   (G, b, L)
            if rows_kernel:                                     # float32: one pass per row
                row_max = np.empty(scores.shape[:2] + (1,), scores.dtype)
                row_sum = np.empty_like(row_max)
                band.softmax_rows(scores.reshape(-1, scores.shape[2]), row_max.reshape(-1),
                                  row_sum.reshape(-1))
            else:
                row_max = scores.max(axis=-1, keepdims=True)    # m, finite: i sees i
                np.subtract(scores, row_max, out=scores)
                np.exp(scores, out=scores)                      # e^(S - m), 0 off the band
                row_sum = scores.sum(axis=-1, keepdims=True)    # l = Σ e^(S - m) >= 1
            np.matmul(scores, v[:, lo:hi], out=out[:, s:e])     # e^(S-m) V        (G, b, Dv)
            with np.errstate(divide="ignore", invalid="ignore"):  # l >= 1 unless a row holds NaN
                out[:, s:e] /= row_sum                          # (check_finite=False): NaN out
                lse[:, s:e] = (row_max + np.log(row_sum))[..., 0]   # ℓ = m + log l
            continue
        # online softmax over key chunks: running max m, sum l and unnormalised output acc
        m_run = np.full(qs.shape[:2] + (1,), -np.inf, q.dtype)
        l_run = np.zeros_like(m_run)
        acc = np.zeros((q.shape[0], e - s, v.shape[2]), q.dtype)
        for c0, c1 in chunks:
            scores = _scores(qs, k, c0, c1, s, window, lowest, biases)
            m_new = np.maximum(m_run, scores.max(axis=-1, keepdims=True))
            m_safe = np.where(np.isneginf(m_new), 0, m_new)     # rows with no key yet
            alpha = np.exp(m_run - m_safe)                      # rescale the old sums
            np.subtract(scores, m_safe, out=scores)
            np.exp(scores, out=scores)
            l_run = alpha * l_run + scores.sum(axis=-1, keepdims=True)
            acc *= alpha
            acc += scores @ v[:, c0:c1]
            m_run = m_new
        np.divide(acc, l_run, out=out[:, s:e])
        lse[:, s:e] = (m_run + np.log(l_run))[..., 0]


def _band_backward(q, k, v, lse, dout, dq, dk, dv, window, causal, scale, query_block, key_block,
                   s0, s1):
    """Fill rows ``[s0, s1)`` of ``dq`` and accumulate their contributions to ``dk``, ``dv``
    (keys ``[s0 - w, s1 + w)``) for the local band (same views as forward)."""
    n, lowest, biases = q.shape[1], (0 if causal else -window), {}
    rows_kernel = _rows_kernel(q.dtype)

    def probs(c0, c1):             # P = e^(S - ℓ) (G, b, L) of the current block (qs, s, ℓ below)
        p = _scores(qs, k, c0, c1, s, window, lowest, biases)   # S again
        if rows_kernel:
            band.exp_rows(p.reshape(-1, p.shape[2]), ell.reshape(-1))
        else:
            np.exp(np.subtract(p, ell, out=p), out=p)
        return p
    for s in range(s0, s1, query_block):
        e = min(n, s + query_block)
        lo, hi = _key_range(s, e, n, window, causal)
        qs = q[:, s:e] * scale                                  # s q_blk          (G, b, D)
        do = dout[:, s:e]                                       # dO_blk           (G, b, Dv)
        ell = np.ascontiguousarray(lse[:, s:e, None])           # ℓ_blk            (G, b, 1)
        chunks = _chunks(lo, hi, key_block)
        delta = None                                            # δ = rowsum(P ⊙ dP)
        if len(chunks) > 1:                                     # δ over all chunks first
            delta = np.zeros_like(ell)
            for c0, c1 in chunks:
                delta += np.einsum("gbl,gbl->gb", probs(c0, c1),
                                   do @ np.swapaxes(v[:, c0:c1], -1, -2))[..., None]
        dq_blk = np.zeros_like(qs)
        for c0, c1 in chunks:
            p = probs(c0, c1)
            dv[:, c0:c1] += np.swapaxes(p, -1, -2) @ do         # dV += Pᵀ dO      (G, L, Dv)
            dp = do @ np.swapaxes(v[:, c0:c1], -1, -2)          # dP = dO Vᵀ       (G, b, L)
            if delta is None and rows_kernel:                   # dS = P ⊙ (dP - δ), row by row
                band.dsoftmax_rows(p.reshape(-1, p.shape[2]), dp.reshape(-1, dp.shape[2]))
            else:
                rowsum = np.einsum("gbl,gbl->gb", p, dp)[..., None] if delta is None else delta
                np.subtract(dp, rowsum, out=dp)
                np.multiply(dp, p, out=dp)                      # dS = P ⊙ (dP - δ)
            dq_blk += dp @ k[:, c0:c1]                          # dQ_blk += dS K   (G, b, D)
            dk[:, c0:c1] += np.swapaxes(dp, -1, -2) @ qs        # dK += s dSᵀ Q    (G, L, D)
        np.multiply(dq_blk, scale, out=dq[:, s:e])              # dQ = s dS K


def _work_waves(batch: int, n: int, stride: int, window: int, query_block: int, key_block: int,
                threads: int):
    """Independent work items ``(c, g0, g1, s0, s1)`` — query rows ``[s0, s1)`` of residue class
    ``c`` of batch entries ``[g0, g1)`` — in two waves.

    Groups keep the score scratch ``G * b * L`` near ``config.LOCAL_SCRATCH`` and are split further so that
    every thread gets work. Query segments are at least ``2·window`` (and ``config.LOCAL_MIN_SEGMENT``)
    long, so the key ranges ``[s0 - w, s1 + w)`` of the even segments do not overlap, nor do those of the odd ones:
    within a wave no two items touch the same ``dk``/``dv`` rows (no races), and the segments
    do not depend on the number of threads, so neither does the result."""
    classes = min(stride, n)
    size = max(1, config.LOCAL_SCRATCH // max(1, query_block * min(key_block, 2 * window + query_block)))
    per_class = -(-threads // max(classes, 1))                  # groups wanted per class
    size = max(1, min(size, -(-batch // per_class)))
    seg = query_block * max(1, -(-max(2 * window, config.LOCAL_MIN_SEGMENT) // query_block))  # multiple of b, >= 2w
    waves = ([], [])
    for c in range(classes):
        n_c = len(range(c, n, stride))
        for t, s0 in enumerate(range(0, n_c, seg)):
            for g in range(0, batch, size):
                waves[t % 2].append((c, g, min(batch, g + size), s0, min(n_c, s0 + seg)))
    return waves


_POOLS: dict = {}
_FORK_HOOK: list = []


def _forget_pools() -> None:
    """A forked child has none of the parent's pool threads: start afresh."""
    _POOLS.clear()


def _pool(threads: int) -> ThreadPoolExecutor:
    """A persistent pool of ``threads`` workers (created on first use; the fork hook that
    forgets pools in a forked child is registered with the first pool, not at import)."""
    if not _POOLS and hasattr(os, "register_at_fork") and not _FORK_HOOK:
        os.register_at_fork(after_in_child=_forget_pools)
        _FORK_HOOK.append(True)
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="ea-band")
    return _POOLS[threads]


def _run(waves, work, threads: int) -> None:
    """``work(*item)`` for every item, wave after wave; the items of a wave on several threads
    (BLAS held to one thread meanwhile, so that the threads do not oversubscribe the cores)."""
    if threads <= 1 or sum(len(w) for w in waves) <= 1:
        for wave in waves:
            for item in wave:
                work(*item)
        return
    errors = np.geterr()                    # the caller's floating-point error state, in every worker

    def in_worker(item):
        with np.errstate(**errors):
            work(*item)
    with config.blas_threads_limited():
        for wave in waves:
            for _ in _pool(threads).map(in_worker, wave):   # re-raises errors
                pass


# ---------------------------------------------------------------------------------------------
# forward / backward over the residue classes (local: one class)

class _BandCache(NamedTuple):
    q: list             # per residue class c: (B, N_c, D), batch axes flattened (local: [q])
    k: list             # (B, N_c, D)
    v: list             # (B, N_c, Dv)
    lse: list           # (B, N_c)    per-row log-sum-exp
    out_shape: tuple    # (..., N, Dv) for checking dout
    window: int
    stride: int
    causal: bool
    scale: float
    query_block: int
    key_block: int
    threads: int


def _flatten(x):
    return np.ascontiguousarray(x).reshape((-1,) + x.shape[-2:])


def _split(x, stride: int) -> list:
    """The residue classes ``x[:, c::stride]`` as contiguous arrays (BLAS runs faster on them
    than on strided views); ``[x]`` itself when ``stride == 1``."""
    if stride == 1:
        return [x]
    return [np.ascontiguousarray(x[:, c::stride]) for c in range(min(stride, x.shape[1]))]


def _merge(parts: list, stride: int, shape, dtype) -> np.ndarray:
    """Inverse of :func:`_split`: interleave the residue classes back into ``(B, N, ·)``
    (emptying ``parts`` as it goes)."""
    if stride == 1:
        return parts[0]
    full = np.empty(shape, dtype)
    for c in range(len(parts)):
        full[:, c::stride] = parts[c]
        parts[c] = None                                         # free each class once copied
    return full


def _forward(q, k, v, window, stride, causal, scale, query_block, key_block, threads):
    """``window`` is the per-subsequence window (already capped), ``stride`` 1 for local attention."""
    out_shape = q.shape[:-1] + (v.shape[-1],)
    q3, k3, v3 = _flatten(q), _flatten(k), _flatten(v)           # (B, N, ·)
    batch, n = q3.shape[:2]
    qs, ks, vs = _split(q3, stride), _split(k3, stride), _split(v3, stride)   # (B, N_c, ·)
    outs = [np.empty(x.shape[:2] + (v3.shape[2],), q3.dtype) for x in qs]   # (B, N_c, Dv)
    lses = [np.empty(x.shape[:2], q3.dtype) for x in qs]                    # (B, N_c)

    def work(c, g0, g1, s0, s1):                                # residue class i ≡ c (mod stride)
        g = slice(g0, g1)
        _band_forward(qs[c][g], ks[c][g], vs[c][g], outs[c][g], lses[c][g], window, causal, scale,
                      query_block, key_block, s0, s1)
    waves = _work_waves(batch, n, stride, window, query_block, key_block, threads)
    _run([waves[0] + waves[1]], work, threads)                  # no shared rows in the forward
    out = _merge(outs, stride, (batch, n, v3.shape[2]), q3.dtype)
    cache = _BandCache(qs, ks, vs, lses, out_shape, window, stride, causal, scale, query_block,
                       key_block, threads)
    return out.reshape(out_shape), cache


def _backward(cache: _BandCache, dout):
    qs, ks, vs, lses, out_shape, window, stride, causal, scale, query_block, key_block, threads = cache
    dout = _flatten(dout)
    batch, n = dout.shape[:2]
    douts = _split(dout, stride)
    dqs = [np.empty_like(x) for x in qs]
    dks = [np.zeros_like(x) for x in ks]
    dvs = [np.zeros_like(x) for x in vs]

    def work(c, g0, g1, s0, s1):
        g = slice(g0, g1)
        _band_backward(qs[c][g], ks[c][g], vs[c][g], lses[c][g], douts[c][g], dqs[c][g], dks[c][g],
                       dvs[c][g], window, causal, scale, query_block, key_block, s0, s1)
    _run(_work_waves(batch, n, stride, window, query_block, key_block, threads), work, threads)
    lead, width_k, width_v = out_shape[:-2], qs[0].shape[2], vs[0].shape[2]
    dq = _merge(dqs, stride, (batch, n, width_k), dout.dtype)
    dk = _merge(dks, stride, (batch, n, width_k), dout.dtype)
    dv = _merge(dvs, stride, (batch, n, width_v), dout.dtype)
    return (dq.reshape(lead + (n, width_k)), dk.reshape(lead + (n, width_k)),
            dv.reshape(lead + (n, width_v)))


def _check_same_length(q, k):
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"k must have as many positions as q (banded attention needs N == M), "
                         f"got q {q.shape} and k {k.shape}")


class _BandedAttention(AttentionCore):
    """Shared forward/backward plumbing of the banded cores (each public class gets its own
    ``forward`` and ``backward`` on top from :func:`_public_entries`, so that errors name the
    public class)."""

    #: queries per block (None: ``config.LOCAL_QUERY_BLOCK``)
    query_block = None
    #: longest key range soft-maxed in one piece (None: ``config.LOCAL_KEY_BLOCK``)
    key_block = None
    #: worker threads (None: ``config.THREADS``, i.e. ``os.cpu_count()`` by default)
    threads = None

    def _blocks(self) -> tuple[int, int]:
        """``(query_block, key_block)``: the instance's, else the settings'."""
        return (self.query_block or config.LOCAL_QUERY_BLOCK, self.key_block or config.LOCAL_KEY_BLOCK)

    def _sub_window(self, n: int) -> int:                       # pragma: no cover - abstract
        raise NotImplementedError

    def _stride(self) -> int:
        return 1

    def _banded_forward(self, q, k, v, check_finite):
        q, k, v = check_qkv(q, k, v, check_finite=check_finite)
        _check_same_length(q, k)
        n = q.shape[-2]
        scale = resolve_scale(self.scale, q.shape[-1])
        return _forward(q, k, v, self._sub_window(n), self._stride(), self.causal, scale,
                        *self._blocks(), config.worker_threads(self.threads))

    def _banded_backward(self, cache, dout, check_finite):
        check_cache(cache, _BandCache, type(self).__name__)
        dout = check_dout(dout, cache.out_shape, cache.q[0].dtype, check_finite=check_finite)
        dq, dk, dv = _backward(cache, dout)
        return Grads(dq, dk, dv, {})

    def _pairs(self, n: int) -> int:                            # pragma: no cover - abstract
        raise NotImplementedError

    def cost(self, n, d, dv=None, m=None, *, backward=False):
        """Exact FLOPs of the band (``2·nnz·(D+Dv)`` forward, ``2·nnz·(3D+2Dv)`` backward) and
        the scalars held: outputs, ``N`` log-sum-exps and one block of score scratch."""
        dv = d if dv is None else dv
        m = n if m is None else m
        if m != n:
            raise ValueError(f"m must equal n for banded attention (N == M), got n={n}, m={m}")
        nnz = self._pairs(n)
        w = self._sub_window(n)
        qb, kb = self._blocks()
        scratch = min(qb, n) * min(kb, 2 * w + qb, max(n, 1))
        if backward:   # S again, dV, dP, dQ, dK; holds dq, dk, dv and two score blocks
            return Cost(2 * nnz * (3 * d + 2 * dv), n * (2 * d + dv) + 2 * scratch)
        return Cost(2 * nnz * (d + dv), n * dv + n + scratch)


def _public_entries(cls):
    """Class decorator of a banded core: its ``forward`` and ``backward``, defined here once
    for both cores, under the class's own name (Python's ``TypeError`` for a wrong argument
    names the function's ``__qualname__``: ``LocalAttention.forward()``, not the base's)."""
    def forward(self, q, k, v, *, check_finite: bool = True):
        """``out (..., N, Dv)`` and the cache for :meth:`backward`."""
        return self._banded_forward(q, k, v, check_finite)

    def backward(self, cache, dout, *, check_finite: bool = True) -> Grads:
        """``Grads(dq, dk, dv, {})`` for the upstream gradient ``dout (..., N, Dv)``."""
        return self._banded_backward(cache, dout, check_finite)

    for method in (forward, backward):
        method.__qualname__ = f"{cls.__name__}.{method.__name__}"
        setattr(cls, method.__name__, finite_policy(method))
    return cls


@_public_entries
class LocalAttention(_BandedAttention):
    r"""Local (truncated) attention: query ``i`` sees keys ``|i-j| <= window``.

    Parameters
    ----------
    window : int >= 0
        Keys on each side of the query (``2·window + 1`` keys per query away from the edges).
    causal : bool
        Only keys ``0 <= i-j <= window`` (the ``window`` previous tokens and itself).
    scale : float, optional
        Multiplies the scores; ``1/sqrt(D)`` when None.

    Notes
    -----
    ``forward(q, k, v, *, check_finite=True)`` with ``q, k (..., N, D)``, ``v (..., N, Dv)``
    (``M == N``); ``check_finite=True`` rejects NaN and Inf. Equals
    ``DenseAttention(scale=scale)`` with ``local_mask(N, window, causal)``.
    Every query sees at least itself, so no row is ever empty. Time ``O(N·w·(D+Dv))``,
    memory ``O(N·(D+Dv))`` in forward and backward (the module docstring has the details).

    Examples
    --------
    >>> import numpy as np
    >>> from efficient_attention.local import LocalAttention, local_mask
    >>> from efficient_attention.dense import DenseAttention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 10, 4)) for _ in range(3))
    >>> out = LocalAttention(window=2)(q, k, v)
    >>> np.allclose(out, DenseAttention()(q, k, v, mask=local_mask(10, 2)))
    True
    """

    def __init__(self, window: int, causal: bool = False, scale: float | None = None):
        self.window = check_int(window, "window", minimum=0)
        self.causal = check_bool(causal, "causal")
        self.scale = check_scale(scale)

    def options(self):
        return {"window": self.window, "causal": self.causal, "scale": self.scale}

    def _sub_window(self, n):
        return min(self.window, max(n - 1, 0))

    def _pairs(self, n):
        return band_pairs(n, self.window, self.causal)

    def dense_mask(self, n, m=None):
        m = n if m is None else m
        if m != n:
            raise ValueError(f"m must equal n for LocalAttention (N == M), got n={n}, m={m}")
        return local_mask(n, self.window, self.causal)


@_public_entries
class StridedAttention(_BandedAttention):
    r"""Strided (dilated) attention: query ``i`` sees keys with ``(i-j) % stride == 0``
    and, when ``window`` is given, ``|i-j| <= window·stride``.

    Parameters
    ----------
    stride : int >= 1
        The dilation ``r``; ``stride=1`` with a window is :class:`LocalAttention`.
    window : int >= 0, optional
        Keys on each side counted in strides (``2·window + 1`` keys per query); None: all
        keys of the query's residue class.
    causal : bool
        Also ``j <= i``.
    scale : float, optional
        Multiplies the scores; ``1/sqrt(D)`` when None.

    Notes
    -----
    Runs :class:`LocalAttention`'s banded code on each residue class
    ``q[..., c::stride, :]``, ``c = 0 … stride-1``. Time ``O(N·w·(D+Dv))`` with a window and
    ``O(N²(D+Dv)/stride)`` without; memory ``O(N·(D+Dv))`` either way.
    """

    def __init__(self, stride: int, window: int | None = None, causal: bool = False,
                 scale: float | None = None):
        self.stride = check_int(stride, "stride", minimum=1)
        self.window = check_int(window, "window", minimum=0, allow_none=True)
        self.causal = check_bool(causal, "causal")
        self.scale = check_scale(scale)

    def options(self):
        return {"stride": self.stride, "window": self.window, "causal": self.causal, "scale": self.scale}

    def _stride(self):
        return self.stride

    def _sub_window(self, n):
        longest = -(-n // self.stride)                          # length of residue class 0
        cap = max(longest - 1, 0)
        return cap if self.window is None else min(self.window, cap)

    def _pairs(self, n):
        return _strided_pairs(n, self.stride, self.window, self.causal)

    def dense_mask(self, n, m=None):
        m = n if m is None else m
        if m != n:
            raise ValueError(f"m must equal n for StridedAttention (N == M), got n={n}, m={m}")
        return strided_mask(n, self.stride, self.window, self.causal)


def _register():
    from .core import register

    def local_factory(n, d, dv, seed, causal=False):
        return LocalAttention(window=min(64, max(n // 2, 1)), causal=causal)

    def strided_factory(n, d, dv, seed):
        return StridedAttention(stride=4, window=min(16, max(n // 8, 1)))

    register("local", LocalAttention, chapter=1, factory=local_factory,
             description="local band |i-j| <= window (window = min(64, n/2)), blocked BLAS")
    register("local_causal", LocalAttention, chapter=1, config={"causal": True}, factory=local_factory,
             description="causal local band 0 <= i-j <= window (window = min(64, n/2))")
    register("strided", StridedAttention, chapter=1, factory=strided_factory,
             description="dilated band: (i-j) % 4 == 0, |i-j| <= 4·min(16, n/8)")


_register()
