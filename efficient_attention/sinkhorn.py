r"""Chapter 2 — learned patterns: Sparse Sinkhorn attention.

A small *sort network*, trained with the rest of the model, decides for each
block of queries which other block of keys it should look at. Instead of an
``N × N`` matrix, every query reads ``2·b`` keys: its own block and one
"sorted" block, a soft (learned, input dependent) permutation of the key
blocks. Tay et al., *Sparse Sinkhorn Attention*, ICML 2020,
arXiv:2002.11296 (§3.1 block sorting, §3.2 causal balancing, §3.3 SortCut).

Semantics (``b`` = ``block_size``, ``n_b = N / b`` blocks)
------------------------------------------------------------

1. **Blocks.** ``q``, ``k``, ``v`` are cut into ``n_b`` consecutive blocks
   ``Q_c, K_c, V_c`` of ``b`` tokens (``N`` must be a multiple of ``b``; keys
   and queries are the same sequence, ``M = N``).
2. **Sort network.** Block summaries are the sums of each block's keys,
   ``s_c = Σ_{t ∈ c} k_t``; the sort logits are ``R = S·W`` with the
   learnable ``w_sort`` ``W`` of shape ``(D, n_b)`` (row ``c`` of ``S`` is
   ``s_c``). With ``seed`` an integer, Gumbel noise ``G`` (standard Gumbel,
   drawn from ``numpy.random.default_rng(seed)`` with the shape
   ``(..., n_b, n_b)``) is added; ``seed=None`` adds none.
3. **Sinkhorn.** ``L = (R + G) / τ`` (``τ`` = ``temperature``); ``n_iters``
   rounds, each subtracting the row log-sum-exp and then the column
   log-sum-exp, all in log space; ``P = exp(L)``. As ``n_iters`` grows,
   ``P`` becomes doubly stochastic (rows and columns sum to 1); after any
   number of rounds the columns sum to 1 exactly (the last step), and as
   ``τ → 0`` ``P`` approaches a permutation matrix.
4. **Sorted blocks.** ``K̃_c = Σ_{c'} P[c, c']·K_{c'}`` and
   ``Ṽ_c = Σ_{c'} P[c, c']·V_{c'}`` (``(b, D)`` and ``(b, Dv)`` each).
5. **Attention.** Query block ``c`` attends, with **one** softmax, to the
   ``2·b`` keys ``[K_c; K̃_c]`` with values ``[V_c; Ṽ_c]``:
   ``out_c = softmax(scale·Q_c [K_c; K̃_c]ᵀ + mask)·[V_c; Ṽ_c]``, ``scale``
   ``= 1/sqrt(D)`` by default.

``causal=True`` (decoders)
    The own block is causally masked (query ``i`` sees keys ``j <= i`` of
    its own block) and block ``c`` may only sort in blocks ``c' < c``: the
    logits with ``c' >= c`` are set to ``-inf`` before the normalisation, so
    block 0 gets no sorted block (its sorted keys are masked; every query
    still sees itself, so no row is empty and nothing is NaN). Two further
    rules keep the outputs independent of future tokens — without them the
    property "the output at ``i`` does not change when tokens ``> i``
    change" fails, and the tests check it:

    * row ``c`` of the logits reads the summary of block ``c − 1`` (the
      latest block that every query of block ``c`` has fully seen):
      ``R[c, :] = s_{c−1}·W`` (row 0 is masked anyway);
    * the column normalisation is *causal* (the paper's causal Sinkhorn
      balancing): entry ``(c, c')`` subtracts the log-sum-exp of column
      ``c'`` over rows ``<= c`` only, a cumulative log-sum-exp down the
      column, so that row ``c`` of ``P`` depends on rows ``<= c`` alone.

    Consequences, by construction: the first row that may use block ``c'``
    (row ``c' + 1``) is alone in its column prefix, so every column step sets
    ``P[c, c − 1] = 1`` exactly, whatever the logits — every block reads the
    whole previous block, and the sort net decides how much of the *older*
    blocks ``c' < c − 1`` it adds (each weight in ``[0, 1]``; row sums are
    ``>= 1`` and the rounds pull ``P`` towards the shift matrix). A strictly
    lower-triangular ``P`` cannot be doubly stochastic anyway. The plain
    rule one might write first (mask, then the ordinary column normalisation
    over all rows, summaries of the own block) would read future tokens
    through the column sums and the own block's summary.
``sortcut=k`` (the paper's SortCut, non-causal)
    Every query attends to the first ``k`` sorted blocks only,
    ``out = softmax(scale·Q [K̃_0; …; K̃_{k−1}]ᵀ)·[Ṽ_0; …; Ṽ_{k−1}]``
    (``k·b`` keys for all ``N`` queries, no own block).

Complexity (per sequence and head)
----------------------------------
Attention ``2·N·2b·(D + Dv)`` FLOPs (SortCut: ``2·N·k·b·(D + Dv)``), the
sorted blocks ``2·n_b²·b·(D + Dv) = 2·N²/b·(D + Dv)`` FLOPs, the sort net
``2·n_b²·D`` and Sinkhorn ``O(n_iters·n_b²)`` exponentials. The
``P @ K`` term grows like ``N²/b``: it passes the block attention at
``N ≈ 2b²`` (8192 for ``b = 64``), so the method is linear in ``N`` only
while ``n_b`` stays small (as in the paper, which sorts tens of blocks).
Memory: ``O(N·(D + Dv) + n_b²)`` (plus ``n_iters·n_b²`` saved normalisers in
causal mode); the block attention runs over chunks of blocks, so its
``b × 2b`` score temporaries exist for one chunk (``config.SINKHORN_CHUNK`` entries) at a time.

Backward
--------
Block attention backward is the dense oracle's, applied per block. The
gradient then flows into the sorted blocks, ``dP = dK̃·K_blocksᵀ +
dṼ·V_blocksᵀ`` (blocks flattened to rows of ``b·D``), ``dK_blocks +=
Pᵀ dK̃``, ``dL = dP ⊙ P``, and back through **all** ``n_iters`` rounds,
unrolled: each round is ``L ← L − lse`` over rows or columns, whose
backward is ``dL_pre = dL_post − P_post ⊙ Σ dL_post`` (sum over the same
axis; ``P_post = exp(L_post)``). The forward saves only the final ``log P``
and the log-normalisers of every step (vectors of ``n_b``; in causal mode
the cumulative column normalisers are ``n_b × n_b`` matrices), and the
backward walks the iterates in reverse by adding the normalisers back,
``L_pre = L_post + lse``. The causal column step's backward is a reverse
recurrence down each column,
``A_c = dL_c + exp(C_c − C_{c+1})·A_{c+1}``, ``dL_pre = dL_post − P_post ⊙ A``
(``C`` the cumulative log-sum-exp; every factor ``<= 1``, so it is stable at
low temperature). Finally ``dR = dL_0/τ``, ``dW = Σ_batch Sᵀ dR`` (``w_sort``
is shared by all batch entries and heads, so its gradient is summed over
them) and ``dS = dR Wᵀ`` reaches every key of the summarised block.

Engine: the non-causal Sinkhorn rounds and their backward run in a numba
kernel (``kernels/sinkhorn.py``: one fused sweep per step, ``prange`` over
batch × heads), checked against the NumPy functions ``sinkhorn`` and
``sinkhorn_backward`` here, which remain the reference (and the causal path).
The kernel is about 1.6–2× faster than NumPy at ``n_b = 1024`` (numba's
``exp`` is scalar on machines without SVML) and no faster below a few hundred
blocks, so it is used from ``n_b >= 256`` on; the products with ``P`` go to
BLAS.

Where peers differ (see PEERS.md)
---------------------------------
lucidrains' ``sinkhorn-transformer`` defaults to a differentiable top-k
rather than Sinkhorn, builds sorted *values* from the keys and puts the
sorted block first in the softmax; LRA uses two softmaxes. Ours: one softmax
over ``[own; sorted]``, block sums of K feed the sort net, ``G`` added to the
logits (the paper writes ``(log R + G)/τ`` for non-negative ``R``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import config
from .core import AttentionCore, Cost, Grads
from .ops import attend_block, attend_block_backward
from .softmax import logsumexp
from .validate import (as_float_array, check_bool, check_cache, check_dout, check_finite_array,
                       check_int, check_qkv, check_real, check_scale, resolve_scale, finite_policy)

__all__ = ["SinkhornAttention", "sinkhorn", "sinkhorn_backward", "block_mask"]


# ---------------------------------------------------------------- Sinkhorn in log space

def sinkhorn(log_r: np.ndarray, n_iters: int, causal: bool = False):
    """``n_iters`` rounds of log-space Sinkhorn normalisation of ``(..., n_b, n_b)`` logits.

    Each round subtracts the row log-sum-exp, then the column log-sum-exp
    (causal: the cumulative column log-sum-exp over rows ``<= c``).
    ``-inf`` entries stay ``-inf``; an all ``-inf`` row or column is left
    alone (its normaliser counts as 0).

    Returns
    -------
    log_p : (..., n_b, n_b), ``P = exp(log_p)``
    norms : list of the ``2·n_iters`` subtracted normalisers (what the
        backward needs to walk the iterates in reverse)
    """
    log_p = log_r
    norms = []
    for _ in range(n_iters):
        r = logsumexp(log_p)                                   # row lse          (..., n_b)
        r = np.where(np.isneginf(r), 0, r).astype(log_p.dtype, copy=False)
        log_p = log_p - r[..., :, None]                        # L ← L − lse_row(L)
        norms.append(r)
        if causal:
            with np.errstate(invalid="ignore"):                # NaN logits (check_finite=False) stay NaN
                c = np.logaddexp.accumulate(log_p, axis=-2)    # C[c,c'] = lse_{c''<=c} L[c'',c']
            log_p = log_p - np.where(np.isneginf(c), 0, c)     # L ← L − C        (..., n_b, n_b)
        else:
            c = logsumexp(np.swapaxes(log_p, -1, -2))          # column lse       (..., n_b)
            c = np.where(np.isneginf(c), 0, c).astype(log_p.dtype, copy=False)
            log_p = log_p - c[..., None, :]                    # L ← L − lse_col(L)
        norms.append(c)
    return log_p, norms


def sinkhorn_backward(dlog_p: np.ndarray, log_p: np.ndarray, norms, causal: bool = False):
    """Gradient of the Sinkhorn logits from the gradient of the final ``log_p``.

    Walks the ``2·n_iters`` steps in reverse, rebuilding each earlier
    iterate as ``L_pre = L_post + normaliser``; a step ``L_post = L_pre − lse``
    has backward ``dL_pre = dL_post − exp(L_post) ⊙ Σ dL_post`` over the
    normalised axis.
    """
    g = dlog_p
    post = log_p
    for step in range(len(norms) - 1, -1, -1):
        norm = norms[step]
        p_post = np.exp(post)                                  # exp(-inf) = 0: masked entries
        if step % 2 == 1 and causal:                           # cumulative column step
            c = norm
            safe = np.where(np.isneginf(c), 0, c)
            g = g - p_post * _reverse_recurrence(g, c, safe)
            post = post + safe
        elif step % 2 == 1:                                    # column step
            g = g - p_post * g.sum(axis=-2, keepdims=True)
            post = post + norm[..., None, :]
        else:                                                  # row step
            g = g - p_post * g.sum(axis=-1, keepdims=True)
            post = post + norm[..., :, None]
    return g


def _reverse_recurrence(g, c, safe):
    """``A[i] = Σ_{j >= i} g[j]·exp(C[i] − C[j])`` down axis -2, computed as
    ``A[i] = g[i] + exp(C[i] − C[i+1])·A[i+1]`` (``C`` non-decreasing down the
    axis, so every factor is in [0, 1])."""
    factor = np.exp(c[..., :-1, :] - safe[..., 1:, :])         # exp(C[i] − C[i+1])  (..., n_b−1, n_b)
    a = np.empty_like(g)
    acc = g[..., -1, :]
    a[..., -1, :] = acc
    for i in range(g.shape[-2] - 2, -1, -1):
        acc = g[..., i, :] + factor[..., i, :] * acc
        a[..., i, :] = acc
    return a


def _sinkhorn_fast(log_r, n_iters, causal):
    """``sinkhorn`` through the numba kernel (non-causal, ``n_b >= config.SINKHORN_KERNEL_MIN_BLOCKS``), else NumPy.
    Returns ``(log_p, norms)`` with ``norms`` a ``(B, 2·n_iters, n_b)`` array (kernel) or a list."""
    if causal or log_r.shape[-1] < config.SINKHORN_KERNEL_MIN_BLOCKS:
        return sinkhorn(log_r, n_iters, causal)
    from .kernels.sinkhorn import sinkhorn_kernel
    nb = log_r.shape[-1]
    x = np.ascontiguousarray(log_r.reshape(-1, nb, nb))      # log_r is ours: overwritten in place
    norms = np.empty((x.shape[0], 2 * n_iters, nb), x.dtype)
    sinkhorn_kernel(x, norms)
    return x.reshape(log_r.shape), norms


def _sinkhorn_backward_fast(dlog_p, log_p, norms, causal):
    """``sinkhorn_backward`` through the numba kernel when ``norms`` came from it."""
    if isinstance(norms, list):
        return sinkhorn_backward(dlog_p, log_p, norms, causal)
    from .kernels.sinkhorn import sinkhorn_backward_kernel
    nb = log_p.shape[-1]
    g = np.ascontiguousarray(dlog_p.reshape(-1, nb, nb))     # a temporary of _backward: overwritten
    post = np.array(log_p.reshape(-1, nb, nb), order="C", copy=True)
    sinkhorn_backward_kernel(g, post, norms)
    return g.reshape(dlog_p.shape)


# ---------------------------------------------------------------- masks

def block_mask(block_size: int, n_blocks: int, causal: bool) -> np.ndarray | None:
    """The ``(n_b, b, 2b)`` mask of the block attention (own keys, then sorted keys),
    or None when nothing is masked (non-causal)."""
    if not causal:
        return None
    own = np.tril(np.ones((block_size, block_size), bool))     # j <= i inside the block
    mask = np.ones((n_blocks, block_size, 2 * block_size), bool)
    mask[:, :, :block_size] = own
    mask[0, :, block_size:] = False                            # block 0 has no sorted block
    return mask


def _causal_sort_mask(n_blocks: int) -> np.ndarray:
    """``(n_b, n_b)``: block ``c`` may sort in block ``c'`` iff ``c' < c``."""
    return np.tril(np.ones((n_blocks, n_blocks), bool), k=-1)


# ---------------------------------------------------------------- forward / backward

def _chunked_attention_forward(qx, keys, vals, mask, scale, blockwise):
    """The oracle's block attention (:func:`~efficient_attention.ops.attend_block`) over chunks
    of blocks (``blockwise``: axis -3 of ``qx (..., n_b, b, D)``, ``keys (..., n_b, 2b, D)``) or
    of query rows (SortCut: axis -2 of ``qx (..., N, D)``, all chunks sharing
    ``keys (..., k·b, D)``), so that only one chunk's scores exist at a time. Returns
    ``(out, caches)``, a cache ``(slice, q, keys, values, mask, out, lse, scale)`` per chunk."""
    axis = -3 if blockwise else -2
    batch = int(np.prod(qx.shape[:axis]))
    per_unit = batch * keys.shape[-2] * (qx.shape[-2] if blockwise else 1)
    units = qx.shape[axis]
    step = max(1, config.SINKHORN_CHUNK // max(1, per_unit))
    out = np.empty(qx.shape[:-1] + (vals.shape[-1],), qx.dtype)
    caches = []
    for start in range(0, units, step):
        sl = (Ellipsis, slice(start, start + step)) + (slice(None),) * (-axis - 1)
        if blockwise:
            chunk = (qx[sl], keys[sl], vals[sl], None if mask is None else mask[start:start + step])
        else:
            chunk = (qx[sl], keys, vals, None)
        o, lse = attend_block(*chunk, scale)
        out[sl] = o
        caches.append((sl, *chunk, o, lse, scale))
    return out, caches


def _chunked_attention_backward(caches, dout, q_shape, keys_shape, vals_shape, dtype, blockwise):
    """Backward of :func:`_chunked_attention_forward`: chunk by chunk, the oracle's block backward."""
    dq = np.empty(q_shape, dtype)
    dkeys = np.empty(keys_shape, dtype) if blockwise else np.zeros(keys_shape, dtype)
    dvals = np.empty(vals_shape, dtype) if blockwise else np.zeros(vals_shape, dtype)
    for sl, q_c, keys_c, vals_c, mask_c, out_c, lse_c, scale in caches:
        delta = np.sum(dout[sl] * out_c, axis=-1)                # rowsum(dO ⊙ O)
        dqc, dkc, dvc = attend_block_backward(q_c, keys_c, vals_c, mask_c, scale, lse_c, delta, dout[sl])
        dq[sl] = dqc
        if blockwise:                                          # blocks own their keys
            dkeys[sl] = dkc
            dvals[sl] = dvc
        else:                                                  # SortCut: every query chunk reads the same keys
            dkeys += dkc
            dvals += dvc
    return dq, dkeys, dvals


class _SinkhornCache(NamedTuple):
    attn: list                  # the block attention's caches, one per chunk of blocks
    attn_shapes: tuple          # shapes of its q, keys, values
    k_blocks: np.ndarray        # (..., n_b, b·D)
    v_blocks: np.ndarray        # (..., n_b, b·Dv)
    summaries: np.ndarray       # (..., n_b, D), the sort net's input rows (shifted if causal)
    w: np.ndarray               # (D, n_b) in the computation dtype
    log_p: np.ndarray           # (..., n_b, n_b), final log P
    norms: object               # 2·n_iters log-normalisers (kernel array, or a list when causal)
    q_shape: tuple
    v_shape: tuple
    w_dtype: np.dtype
    block_size: int
    temperature: float
    causal: bool
    sortcut: int | None


def _summaries(k, block_size, causal):
    """Rows of the sort net's input: block key sums ``s_c`` (causal: ``s_{c−1}``, row 0 zero)."""
    *batch, n, d = k.shape
    s = k.reshape(*batch, n // block_size, block_size, d).sum(axis=-2)   # s_c = Σ_t k_t  (..., n_b, D)
    if causal:
        shifted = np.zeros_like(s)
        shifted[..., 1:, :] = s[..., :-1, :]                   # row c reads block c − 1
        s = shifted
    return s


def _log_logits(s, w, temperature, causal, noise):
    """``L_0 = (S W + G) / τ``, with ``-inf`` where causal sorting is not allowed."""
    r = s @ w                                                  # R = S W            (..., n_b, n_b)
    if noise is not None:
        r += noise                                             # Gumbel noise (r is a fresh array)
    log_r = r
    log_r /= temperature                                       # L_0 = (R + G) / τ
    if causal:
        log_r = np.where(_causal_sort_mask(w.shape[1]), log_r, -np.inf).astype(r.dtype, copy=False)
    return log_r


def _forward(q, k, v, w, block_size, n_iters, temperature, causal, sortcut, noise, scale):
    *batch, n, d = q.shape
    dv = v.shape[-1]
    nb = n // block_size
    k_blocks = k.reshape(*batch, nb, block_size * d)           # (..., n_b, b·D)
    v_blocks = v.reshape(*batch, nb, block_size * dv)          # (..., n_b, b·Dv)
    s = _summaries(k, block_size, causal)                      # (..., n_b, D)
    log_p, norms = _sinkhorn_fast(_log_logits(s, w, temperature, causal, noise), n_iters, causal)
    p = np.exp(log_p)                                          # P                  (..., n_b, n_b)
    k_sorted = (p @ k_blocks).reshape(*batch, nb, block_size, d)     # K̃_c = Σ P[c,c'] K_c'
    v_sorted = (p @ v_blocks).reshape(*batch, nb, block_size, dv)    # Ṽ_c
    if sortcut is None:
        qx = q.reshape(*batch, nb, block_size, d)              # (..., n_b, b, D)
        keys = np.concatenate([k.reshape(*batch, nb, block_size, d), k_sorted], axis=-2)  # (..., n_b, 2b, D)
        vals = np.concatenate([v.reshape(*batch, nb, block_size, dv), v_sorted], axis=-2)
        mask = block_mask(block_size, nb, causal)
    else:
        qx = q                                                 # all queries        (..., N, D)
        keys = k_sorted[..., :sortcut, :, :].reshape(*batch, sortcut * block_size, d)
        vals = v_sorted[..., :sortcut, :, :].reshape(*batch, sortcut * block_size, dv)
        mask = None
    out, attn = _chunked_attention_forward(qx, keys, vals, mask, scale, sortcut is None)
    out = out.reshape(*batch, n, dv)
    cache = _SinkhornCache(attn, (qx.shape, keys.shape, vals.shape), k_blocks, v_blocks, s, w, log_p, norms,
                           q.shape, v.shape,
                           None, block_size, temperature, causal, sortcut)
    return out, cache


def _backward(cache: _SinkhornCache, dout):
    (attn, (qx_shape, keys_shape, vals_shape), k_blocks, v_blocks, s, w, log_p, norms, q_shape, v_shape, _,
     bs, tau, causal, sortcut) = cache
    *batch, n, d = q_shape
    dv_w = v_shape[-1]
    nb = n // bs
    dqx, dkeys, dvals = _chunked_attention_backward(attn, dout.reshape(qx_shape[:-1] + (dv_w,)), qx_shape,
                                                    keys_shape, vals_shape, dout.dtype, sortcut is None)
    dq = dqx.reshape(q_shape)
    if sortcut is None:
        dk_own, dk_sorted = dkeys[..., :bs, :], dkeys[..., bs:, :]        # (..., n_b, b, D) each
        dv_own, dv_sorted = dvals[..., :bs, :], dvals[..., bs:, :]
        dk_blocks = dk_own.reshape(*batch, nb, bs * d)
        dv_blocks = dv_own.reshape(*batch, nb, bs * dv_w)
        dk_sorted = dk_sorted.reshape(*batch, nb, bs * d)
        dv_sorted = dv_sorted.reshape(*batch, nb, bs * dv_w)
    else:                                                      # only the first `sortcut` sorted blocks are used
        dk_sorted = np.zeros_like(k_blocks)
        dv_sorted = np.zeros_like(v_blocks)
        dk_sorted[..., :sortcut, :] = dkeys.reshape(*batch, sortcut, bs * d)
        dv_sorted[..., :sortcut, :] = dvals.reshape(*batch, sortcut, bs * dv_w)
        dk_blocks = 0
        dv_blocks = 0
    p = np.exp(log_p)                                          # (..., n_b, n_b)
    pt = np.swapaxes(p, -1, -2)
    dk_blocks = dk_blocks + pt @ dk_sorted                     # dK_c' += Σ_c P[c,c'] dK̃_c
    dv_blocks = dv_blocks + pt @ dv_sorted
    dp = dk_sorted @ np.swapaxes(k_blocks, -1, -2)            # dP = dK̃ K_blkᵀ + dṼ V_blkᵀ (..., n_b, n_b)
    dp += dv_sorted @ np.swapaxes(v_blocks, -1, -2)
    dp *= p                                                    # dL = dP ⊙ P (in place: n_b² arrays are the big ones)
    del p, pt
    dlog_r = _sinkhorn_backward_fast(dp, log_p, norms, causal)   # dL_0 through all rounds
    dr = dlog_r / tau                                          # dR = dL_0 / τ
    dw = np.tensordot(s.reshape(-1, nb, d), dr.reshape(-1, nb, nb), axes=([0, 1], [0, 1]))
    #                                                            dW = Σ_batch Sᵀ dR (shared by batch/heads)
    ds = dr @ w.T                                              # dS = dR Wᵀ          (..., n_b, D)
    if causal:
        ds = np.concatenate([ds[..., 1:, :], np.zeros_like(ds[..., :1, :])], axis=-2)  # row c fed s_{c−1}
    dk = dk_blocks.reshape(*batch, nb, bs, d) + ds[..., :, None, :]   # every key of block c gets dS_c
    return dq, dk.reshape(q_shape[:-2] + (n, d)), dv_blocks.reshape(v_shape), dw


# ---------------------------------------------------------------- the public class

class SinkhornAttention(AttentionCore):
    r"""Sparse Sinkhorn attention: own block plus one learned, softly sorted block.

    Parameters
    ----------
    block_size : int
        Tokens per block ``b``; ``N`` must be a multiple of it.
    w_sort : (D, n_b) float array
        The sort network's weights (learnable, ``params['w_sort']``, kept as the
        live array); ``n_b = w_sort.shape[1]`` fixes the sequence length to
        ``N = n_b·b``.
    n_iters : int >= 1
        Sinkhorn rounds (row then column normalisation each).
    temperature : float > 0
        ``τ``; the logits are divided by it (small ``τ``: ``P`` near a permutation).
    causal : bool
        Causal own block, sorting from earlier blocks only, causal Sinkhorn
        balancing (see the module docstring).
    sortcut : int, optional
        ``k`` in ``1..n_b``: every query attends to the first ``k`` sorted blocks only
        (non-causal).
    seed : int, optional
        None: no noise. An integer: Gumbel noise drawn from ``default_rng(seed)``
        at every forward (the same noise for the same seed; change it per
        training step).
    scale : float, optional
        Score scale, ``1/sqrt(D)`` when None.

    Notes
    -----
    ``forward(q, k, v)`` with ``q, k (..., N, D)``, ``v (..., N, Dv)``;
    ``w_sort`` is shared by all leading (batch, head) axes and its gradient
    is summed over them. ``sort_matrix(k)`` returns ``P``. The output is an
    approximation of full attention (``dense_mask`` is None); the
    block-sparse pattern it reads is input dependent.

    Examples
    --------
    >>> import numpy as np
    >>> from efficient_attention.sinkhorn import SinkhornAttention
    >>> core = SinkhornAttention.init(block_size=4, d=8, n_blocks=4, seed=0)
    >>> q, k, v = np.random.default_rng(1).standard_normal((3, 2, 16, 8))
    >>> out, cache = core.forward(q, k, v)
    >>> out.shape, core.sort_matrix(k).shape
    ((2, 16, 8), (2, 4, 4))
    >>> grads = core.backward(cache, np.ones_like(out))
    >>> grads.params["w_sort"].shape
    (8, 4)
    """

    def __init__(self, block_size, w_sort, n_iters=8, temperature=1.0, causal=False, sortcut=None,
                 seed=None, scale=None):
        self.block_size = check_int(block_size, "block_size", minimum=1)
        w = as_float_array(w_sort, "w_sort")
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError(f"w_sort must have shape (D, n_blocks) with D, n_blocks >= 1, got shape {w.shape}")
        self.w_sort = w
        self.n_iters = check_int(n_iters, "n_iters", minimum=1)
        self.temperature = check_real(temperature, "temperature", minimum=0.0, strict=True)
        self.causal = check_bool(causal, "causal")
        self.sortcut = check_int(sortcut, "sortcut", minimum=1, maximum=w.shape[1], allow_none=True)
        if self.causal and self.sortcut is not None:
            raise ValueError(f"sortcut must be None when causal=True (SortCut is non-causal), got {sortcut}")
        self.seed = check_int(seed, "seed", minimum=0, allow_none=True)
        self.scale = check_scale(scale)

    @classmethod
    def init(cls, block_size, d, n_blocks, seed=0, *, dtype=np.float64, **kwargs):
        """Draw ``w_sort`` ~ N(0, 1/(d·block_size)) (so that sort logits of
        unit-variance keys have unit variance; the paper's SortNet is a plain
        linear layer) and build the core; ``kwargs`` go to the constructor.
        ``seed`` seeds the weights only; pass ``noise_seed=`` for the
        constructor's Gumbel-noise ``seed`` (None by default: no noise)."""
        noise_seed = kwargs.pop("noise_seed", None)
        block_size = check_int(block_size, "block_size", minimum=1)
        d = check_int(d, "d", minimum=1)
        n_blocks = check_int(n_blocks, "n_blocks", minimum=1)
        seed = check_int(seed, "seed", minimum=0)
        w = np.random.default_rng(seed).standard_normal((d, n_blocks)) / np.sqrt(d * block_size)
        return cls(block_size, w.astype(dtype), seed=noise_seed, **kwargs)

    @property
    def n_blocks(self) -> int:
        return self.w_sort.shape[1]

    @property
    def params(self):
        return {"w_sort": self.w_sort}

    def options(self):
        return {"block_size": self.block_size, "n_blocks": self.n_blocks, "n_iters": self.n_iters,
                "temperature": self.temperature, "causal": self.causal, "sortcut": self.sortcut,
                "seed": self.seed, "scale": self.scale}

    # -- checks shared by forward and sort_matrix
    def _check_k(self, k, name="k"):
        n, d = k.shape[-2], k.shape[-1]
        if n % self.block_size:
            raise ValueError(f"the sequence length N must be a multiple of block_size = {self.block_size}, "
                             f"got N = {n} ({name} shape {k.shape})")
        if self.w_sort.shape != (d, n // self.block_size):
            raise ValueError(f"w_sort must have shape (D, n_blocks) = ({d}, {n // self.block_size}) for "
                             f"N = {n}, block_size = {self.block_size}, got {self.w_sort.shape}")

    def _noise(self, batch, dtype):
        if self.seed is None:
            return None
        nb = self.n_blocks
        return np.random.default_rng(self.seed).gumbel(size=tuple(batch) + (nb, nb)).astype(dtype)

    def _log_p(self, k):
        w = self.w_sort.astype(k.dtype, copy=False)
        s = _summaries(k, self.block_size, self.causal)
        log_r = _log_logits(s, w, self.temperature, self.causal, self._noise(k.shape[:-2], k.dtype))
        return _sinkhorn_fast(log_r, self.n_iters, self.causal)[0]

    @finite_policy
    def sort_matrix(self, k, *, check_finite: bool = True) -> np.ndarray:
        """The soft permutation ``P`` for keys ``k``: ``(N, D) -> (n_b, n_b)``,
        ``(..., N, D) -> (..., n_b, n_b)`` (with this core's noise, if any); ``check_finite``
        rejects NaN and Inf in ``k``."""
        k = as_float_array(k, "k")
        if k.ndim < 2:
            raise ValueError(f"k must have shape (..., N, D) with at least 2 axes, got shape {k.shape}")
        if check_finite:
            check_finite_array(k, "k")
        self._check_k(k)
        return np.exp(self._log_p(k))

    @finite_policy
    def forward(self, q, k, v, *, check_finite: bool = True):
        q, k, v = check_qkv(q, k, v, check_finite=check_finite)
        if k.shape[-2] != q.shape[-2]:
            raise ValueError(f"k must have as many positions as q (self-attention over blocks, M = N), "
                             f"got q {q.shape} and k {k.shape}")
        self._check_k(k)
        w = self.w_sort.astype(q.dtype, copy=False)
        scale = resolve_scale(self.scale, q.shape[-1])
        out, cache = _forward(q, k, v, w, self.block_size, self.n_iters, self.temperature, self.causal,
                              self.sortcut, self._noise(q.shape[:-2], q.dtype), scale)
        return out, cache._replace(w_dtype=self.w_sort.dtype)

    @finite_policy
    def backward(self, cache: _SinkhornCache, dout, *, check_finite: bool = True) -> Grads:
        check_cache(cache, _SinkhornCache, "SinkhornAttention")
        out_shape = cache.q_shape[:-1] + (cache.v_shape[-1],)
        dout = check_dout(dout, out_shape, cache.w.dtype, check_finite=check_finite)
        dq, dk, dv, dw = _backward(cache, dout)
        return Grads(dq, dk, dv, {"w_sort": dw.astype(cache.w_dtype, copy=False)})

    def cost(self, n, d, dv=None, m=None, *, backward=False):
        dv = d if dv is None else dv
        bs = self.block_size
        nb = max(1, n // bs)
        keys = bs * (self.sortcut if self.sortcut is not None else 2)
        sort_net = 2 * nb * d * nb                             # R = S W
        sorted_blocks = 2 * nb * nb * bs * (d + dv)            # K̃ = P K, Ṽ = P V
        attention = 2 * n * keys * (d + dv)
        if backward:   # dW and dS; dP and Pᵀ dK̃ / Pᵀ dṼ; attention: S again, dV, dP, dQ, dK
            flops = 2 * sort_net + 2 * sorted_blocks + 2 * n * keys * (3 * d + 2 * dv)
            memory = 2 * (2 * self.n_iters + 2) * nb * nb + 2 * n * keys + 2 * n * (d + dv)
            return Cost(flops, memory)
        flops = sort_net + sorted_blocks + attention
        memory = 3 * nb * nb + n * keys + 2 * n * (d + dv) + n * dv
        return Cost(flops, memory)


def _factory(n, d, dv, seed, **config):
    """Registry build: block_size = min(64, n // 4), so n_b = n / block_size >= 4."""
    block_size = min(64, max(1, n // 4))
    return SinkhornAttention.init(block_size, d, n // block_size, seed, **config)


def _register():
    from .core import register
    register("sinkhorn", SinkhornAttention, chapter=2, factory=_factory, exact=False,
             description="Sparse Sinkhorn: own block + a learned soft-sorted block (Tay et al. 2020)")
    register("sinkhorn_causal", SinkhornAttention, chapter=2, config={"causal": True}, factory=_factory,
             exact=False, description="Sparse Sinkhorn, causal (causal Sinkhorn balancing)")


_register()
