r"""Chapter 3 — no N×N matrix: fewer keys than queries.

Dense attention scores every query against every key, an ``N × M`` matrix.
This chapter keeps all ``N`` queries (so the output still has one row per
token) but replaces the ``M`` keys and values by ``K`` *representatives*,
``K`` fixed or ``K = M / c``:

.. math::

    \tilde K = \mathcal{R}_k(K) \in \mathbb{R}^{K\times D},\qquad
    \tilde V = \mathcal{R}_v(V) \in \mathbb{R}^{K\times D_v},\qquad
    O = \operatorname{softmax}\big(s\,Q\tilde K^\top\big)\,\tilde V,

which costs ``2·N·K·(D + Dv)`` FLOPs for the attention and holds an
``N × K`` matrix at most (here: one block of query rows at a time, so the
memory is ``O(N·(D + Dv) + K·(D + Dv))``).

*Why not reduce the queries too?* Every token needs its own output row (the
next layer, the residual connection and the loss are per token); fewer
queries would mean fewer outputs, and expanding them back is a different
model (an encoder-decoder bottleneck). Keys and values are only *read*, so
they can be summarised.

There are two ways to choose the representatives, both linear in ``K`` and
``V`` and both learnable:

1. **Linformer** (Wang et al. 2020, arXiv:2006.04768, §4, eq. 7): a learned
   projection along the sequence axis, every representative a linear
   combination of *all* ``M`` positions, ``\tilde K = EK``, ``\tilde V = FV``
   with ``E, F ∈ R^{K×M}``. ``K`` is fixed, so the cost is linear in ``N``;
   the price is a fixed sequence length and no causal form (every projected
   key mixes in the future).
2. **Memory-compressed attention** (Liu et al. 2018, "Generating Wikipedia by
   Summarizing Long Sequences", arXiv:1801.10198, §4.2.3): a strided 1-D
   convolution along the sequence, every representative a combination of
   ``c`` *neighbouring* positions, ``\tilde K_b = Σ_t K_{b·s+t} W_k[t]``;
   ``K = ⌈M/s⌉`` grows with ``M`` (the cost is ``N·M/s``, a constant factor
   below dense), but locality makes a causal form possible.

Backward (``dO`` the upstream gradient): the attention over representatives
is the dense one (:mod:`efficient_attention.dense`), giving ``dQ``, ``d\tilde K``
and ``d\tilde V``; the representatives' maps are linear, so

.. math::

    dK = E^\top d\tilde K,\quad dE = \sum_\text{batch} d\tilde K\,K^\top
    \qquad\text{(Linformer)},

    dK_{b s + t} \mathrel{+}= d\tilde K_b W_k[t]^\top,\quad
    dW_k[t] = \sum_\text{batch}\sum_b K_{b s + t}^\top d\tilde K_b
    \qquad\text{(compressed)}.

Engine: everything is a handful of BLAS matrix products (NumPy ``matmul``);
the attention is evaluated one block of query rows at a time with the
dense oracle's own ``_forward``/``_backward`` (and so its stable softmax),
keeping a log-sum-exp per row and never the ``N × K`` probabilities. There is
no numba here: the work is GEMM-bound and BLAS already runs it at peak.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import config
from .core import AttentionCore, Cost, Grads
from .ops import attend_block, attend_block_backward
from .validate import (as_float_array, check_bool, check_cache, check_dout, check_int, check_qkv,
                       check_scale, resolve_scale, finite_policy)

__all__ = ["LinformerAttention", "CompressedAttention", "compress", "compress_backward", "n_compressed",
           "visible_counts"]



# --------------------------------------------------------------------------------------------
# attention of all N queries over K representatives, one block of query rows at a time
# --------------------------------------------------------------------------------------------

class _AttendCache(NamedTuple):
    q: np.ndarray            # (..., N, D)
    kr: np.ndarray           # (..., K, D)   representatives of the keys
    vr: np.ndarray           # (..., K, Dv)  representatives of the values
    out: np.ndarray          # (..., N, Dv)
    lse: np.ndarray          # (..., N)      log-sum-exp of each query row
    scale: float
    visible: np.ndarray | None   # (N,) int: query i sees representatives b < visible[i] (causal)
    block: int               # query rows per block


def _block_rows(q, kr, block_elements=None) -> int:
    """Query rows per block so that one block of scores holds about ``config.LOWRANK_BLOCK_ELEMENTS``."""
    batch = int(np.prod(q.shape[:-2], dtype=np.int64))
    per_row = max(1, batch * kr.shape[-2])
    return max(1, (config.LOWRANK_BLOCK_ELEMENTS if block_elements is None else block_elements) // per_row)


def _block_mask(visible, rows: slice, n_rep: int):
    """Causal mask of one block: representative b allowed for query i iff b < visible[i]."""
    if visible is None:
        return None
    return np.arange(n_rep)[None, :] < visible[rows, None]                 # (rows, K)


def _attend(q, kr, vr, scale, visible=None, block=None):
    """``O = softmax(s·Q K̃ᵀ [+ causal mask]) Ṽ`` block by block: (out, cache)."""
    n = q.shape[-2]
    block = _block_rows(q, kr) if block is None else block
    out = np.empty(q.shape[:-1] + (vr.shape[-1],), dtype=q.dtype)       # (..., N, Dv)
    lse = np.empty(q.shape[:-1], dtype=q.dtype)                         # (..., N)
    for i0 in range(0, n, block):
        rows = slice(i0, min(n, i0 + block))
        mask = _block_mask(visible, rows, kr.shape[-2])
        o, l = attend_block(q[..., rows, :], kr, vr, mask, scale)      # the oracle's block attention
        out[..., rows, :] = o
        lse[..., rows] = l
    return out, _AttendCache(q, kr, vr, out, lse, scale, visible, block)


def _attend_backward(cache: _AttendCache, dout):
    """``dQ, dK̃, dṼ`` of :func:`_attend`, recomputing each block's probabilities from its lse."""
    q, kr, vr, out, lse, scale, visible, block = cache
    n = q.shape[-2]
    dq = np.empty_like(q)
    dkr = np.zeros_like(kr)
    dvr = np.zeros_like(vr)
    for i0 in range(0, n, block):
        rows = slice(i0, min(n, i0 + block))
        mask = _block_mask(visible, rows, kr.shape[-2])
        delta = np.sum(dout[..., rows, :] * out[..., rows, :], axis=-1)     # rowsum(dO ⊙ O)
        dq_b, dkr_b, dvr_b = attend_block_backward(q[..., rows, :], kr, vr, mask, scale, lse[..., rows],
                                                   delta, dout[..., rows, :])
        dq[..., rows, :] = dq_b
        dkr += dkr_b                                                    # Σ over query blocks
        dvr += dvr_b
    return dq, dkr, dvr


def _sum_batch_outer(a, b):
    """``Σ_batch aᵀ b`` for ``a (..., P, R)``, ``b (..., P, S)``: a ``(R, S)`` matrix (one GEMM)."""
    axes = list(range(a.ndim - 2)) + [a.ndim - 2]
    return np.tensordot(a, b, axes=(axes, axes))


def _param(x, name: str) -> np.ndarray:
    """A parameter array, float32/float64, never copied (the live array is kept)."""
    arr = as_float_array(x, name)
    if not isinstance(x, np.ndarray):
        arr = np.array(arr)   # an owned, writable array (dlpack views may be read-only)
    return arr


# --------------------------------------------------------------------------------------------
# Linformer
# --------------------------------------------------------------------------------------------

class _LinformerCache(NamedTuple):
    k: np.ndarray            # (..., M, D)
    v: np.ndarray            # (..., M, Dv)
    e: np.ndarray            # (K, M) in the computation dtype
    f: np.ndarray | None     # (K, M) or None (shared with e)
    attend: _AttendCache


def _side_by_side(x):
    """``(..., P, W)`` -> ``(P, B·W)``: the batch's matrices side by side (a contiguous copy)."""
    p, w = x.shape[-2:]
    return np.ascontiguousarray(np.moveaxis(x.reshape(-1, p, w), 0, 1)).reshape(p, -1)




def _project(e, x):
    """``E X`` for ``x (..., M, W)``: ``(..., K, W)``, summed over blocks of ``config.LOWRANK_PROJ_BLOCK`` key
    positions with the batch side by side (``E`` read once, not once per (batch, head))."""
    m, w = x.shape[-2:]
    x3 = x.reshape((-1, m, w))
    acc = np.zeros((e.shape[0], x3.shape[0] * w), np.result_type(e, x))   # (K, B·W)
    for m0 in range(0, m, config.LOWRANK_PROJ_BLOCK):
        cols = slice(m0, min(m, m0 + config.LOWRANK_PROJ_BLOCK))
        acc += e[:, cols] @ _side_by_side(x3[:, cols])
    return np.ascontiguousarray(np.moveaxis(acc.reshape(e.shape[0], -1, w), 1, 0)).reshape(
        x.shape[:-2] + (e.shape[0], w))


def _linformer_forward(q, k, v, e, f, scale, block=None):
    kr = _project(e, k)                                         # K̃ = E K            (..., K, D)
    vr = _project(e if f is None else f, v)                     # Ṽ = F V            (..., K, Dv)
    out, att = _attend(q, kr, vr, scale, None, block)          # softmax(s Q K̃ᵀ) Ṽ  (..., N, Dv)
    return out, _LinformerCache(k, v, e, f, att)


def _linformer_backward(cache: _LinformerCache, dout):
    """The projections' products by blocks of ``config.LOWRANK_PROJ_BLOCK`` key positions, with the batch side
    by side (one GEMM per block and product): each block of ``E``, ``K``, ``V`` is read once
    while it is in cache, and every temporary is block-sized. At M = 65536, 8 heads, alone:
    about 490 ms for dK, dV, dE, dF, against 800 ms for per-head products with a whole-array
    transposed copy of K and V (``tensordot``)."""
    k, v, e, f, att = cache
    dq, dkr, dvr = _attend_backward(att, dout)                  # dQ, dK̃, dṼ
    fv = e if f is None else f
    dkr_s, dvr_s = _side_by_side(dkr), _side_by_side(dvr)      # (K, B·D), (K, B·Dv)
    m, d, dv_ = k.shape[-2], k.shape[-1], v.shape[-1]
    dk, dv = np.empty(k.shape, dkr.dtype), np.empty(v.shape, dvr.dtype)
    de, df = np.empty(e.shape, dkr.dtype), np.empty(fv.shape, dvr.dtype)
    k3, v3, dk3, dv3 = (x.reshape((-1,) + x.shape[-2:]) for x in (k, v, dk, dv))
    for m0 in range(0, m, config.LOWRANK_PROJ_BLOCK):
        cols = slice(m0, min(m, m0 + config.LOWRANK_PROJ_BLOCK))
        mb = cols.stop - cols.start
        dk3[:, cols] = np.moveaxis((e[:, cols].T @ dkr_s).reshape(mb, -1, d), 1, 0)    # dK = Eᵀ dK̃
        dv3[:, cols] = np.moveaxis((fv[:, cols].T @ dvr_s).reshape(mb, -1, dv_), 1, 0)  # dV = Fᵀ dṼ
        de[:, cols] = dkr_s @ _side_by_side(k3[:, cols]).T          # dE = Σ dK̃ Kᵀ   (K, M)
        df[:, cols] = dvr_s @ _side_by_side(v3[:, cols]).T          # dF = Σ dṼ Vᵀ   (K, M)
    return dq, dk, dv, de, df


class LinformerAttention(AttentionCore):
    r"""Linformer: ``softmax(scale·Q(EK)ᵀ)(FV)`` with learned projections along the sequence.

    Parameters
    ----------
    e : (K, M) float array
        Projection of the keys along the sequence axis (parameter ``e``); ``M``
        must equal the number of keys of every call, ``K >= 1``.
    f : (K, M) float array, optional
        Projection of the values (parameter ``f``). ``None`` shares ``e`` (the
        paper's "key-value sharing"; then only ``e`` is a parameter and its
        gradient is the sum of both uses).
    causal : bool
        Must be False. Linformer has no causal form: every projected key
        ``(EK)_b = Σ_j E_bj K_j`` mixes *all* positions, so any query that sees
        any projected key sees the future; masking the ``N × K`` scores cannot
        undo that. ``causal=True`` raises ``ValueError`` rather than silently
        leaking the future (use ``CompressedAttention(causal=True)`` or the
        linear attention of chapter 4).
    scale : float, optional
        Multiplies the scores; ``1/sqrt(D)`` when None.

    Notes
    -----
    Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity",
    arXiv:2006.04768, §4 eq. (7). Forward: ``2·K·M·(D + Dv)`` FLOPs for the
    projections and ``2·N·K·(D + Dv)`` for the attention: linear in the
    sequence length for a fixed ``K``. The parameters ``e, f`` have ``K·M``
    entries each, so the model is tied to one sequence length ``M`` (pad
    shorter sequences yourself — what padding means is up to you: zero keys
    still receive attention weight through the projection, see PEERS.md).

    With ``K = M`` and ``E = F = I`` this is exactly ``DenseAttention``.
    Peers: lucidrains' ``share_kv`` ties ``E = F`` *and* ``V = K``; here
    ``f=None`` ties only the projections. The parameters are cast to the
    inputs' dtype for the computation; their gradients come back in their own
    dtype.
    """

    def __init__(self, e, f=None, *, causal: bool = False, scale: float | None = None):
        if check_bool(causal, "causal"):
            raise ValueError(
                "causal must be False for LinformerAttention, got True: every projected key "
                "(E K)_b = sum_j E[b, j] K[j] mixes all M positions, so no query can see a projected "
                "key without seeing the future. Use CompressedAttention(..., causal=True) or "
                "causal linear attention instead.")
        self.causal = False
        self.scale = check_scale(scale)
        self.e = self._check_projection(e, "e")
        self.f = None if f is None else self._check_projection(f, "f")
        if self.f is not None and self.f.shape != self.e.shape:
            raise ValueError(f"f must have the shape of e (K, M) = {self.e.shape}, got {self.f.shape}")

    @staticmethod
    def _check_projection(x, name):
        x = _param(x, name)
        if x.ndim != 2:
            raise ValueError(f"{name} must have shape (K, M) (projected length, sequence length), "
                             f"got shape {x.shape}")
        if x.shape[0] < 1:
            raise ValueError(f"{name} must project to K >= 1 representatives, got K = {x.shape[0]} "
                             f"(shape {x.shape})")
        if x.shape[1] < 1:
            raise ValueError(f"{name} must have a sequence length M >= 1, got shape {x.shape}")
        return x

    @classmethod
    def init(cls, n: int, k: int, seed=0, *, shared: bool = False, method: str = "xavier",
             dtype=np.float64, scale: float | None = None) -> "LinformerAttention":
        r"""Draw ``e`` (and ``f`` unless ``shared``) of shape ``(k, n)`` from ``seed``.

        ``method="xavier"`` (default) is the initialisation of the authors'
        released code (fairseq ``examples/linformer``, ``MultiheadLinearAttention``:
        ``xavier_uniform_(compress_k.weight, gain=1/sqrt(2))``), i.e. entries
        uniform on ``±sqrt(3/(n + k))``, variance ``1/(n + k)``, so a projected
        key has about the norm of one key. ``method="jl"`` is the construction
        of the paper's Theorem 2 (§4): ``E = F = R`` up to constants, ``R``
        with i.i.d. ``N(0, 1/k)`` entries — a Johnson–Lindenstrauss projection
        (``RᵀR ≈ I``), under which projected keys grow like ``sqrt(n/k)``.
        """
        n = check_int(n, "n", minimum=1)
        k = check_int(k, "k", minimum=1)
        if method not in ("xavier", "jl"):
            raise ValueError(f"method must be 'xavier' or 'jl', got {method!r}")
        rng = np.random.default_rng(seed)

        def draw():
            if method == "xavier":
                bound = np.sqrt(3.0 / (n + k))
                return rng.uniform(-bound, bound, size=(k, n)).astype(dtype)
            return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(dtype)

        e = draw()
        f = None if shared else draw()
        return cls(e, f, scale=scale)

    @property
    def params(self) -> dict:
        return {"e": self.e} if self.f is None else {"e": self.e, "f": self.f}

    def options(self):
        return {"e": self.e.shape, "f": None if self.f is None else self.f.shape, "scale": self.scale}

    @finite_policy
    def forward(self, q, k, v, *, check_finite: bool = True):
        q, k, v = check_qkv(q, k, v, check_finite=check_finite)
        m = k.shape[-2]
        for name, p in self.params.items():
            if p.shape[1] != m:
                raise ValueError(f"{name} must have shape (K, M) with M = {m} (the number of keys of k "
                                 f"{k.shape}), got {name} {p.shape}; Linformer is tied to one sequence length")
        e = self.e.astype(q.dtype, copy=False)
        f = None if self.f is None else self.f.astype(q.dtype, copy=False)
        return _linformer_forward(q, k, v, e, f, resolve_scale(self.scale, q.shape[-1]))

    @finite_policy
    def backward(self, cache: _LinformerCache, dout, *, check_finite: bool = True) -> Grads:
        check_cache(cache, _LinformerCache, "LinformerAttention")
        dout = check_dout(dout, cache.attend.out.shape, cache.attend.out.dtype, check_finite=check_finite)
        dq, dk, dv, de, df = _linformer_backward(cache, dout)
        if self.f is None:
            return Grads(dq, dk, dv, {"e": (de + df).astype(self.e.dtype, copy=False)})
        return Grads(dq, dk, dv, {"e": de.astype(self.e.dtype, copy=False),
                                  "f": df.astype(self.f.dtype, copy=False)})

    def cost(self, n, d, dv=None, m=None, *, backward=False):
        dv = d if dv is None else dv
        m = n if m is None else m
        kp = self.e.shape[0]
        block = min(n, max(1, config.LOWRANK_BLOCK_ELEMENTS // kp))
        if backward:   # attention backward (as dense, M -> K), then dK, dV, dE, dF
            return Cost(2 * n * kp * (3 * d + 2 * dv) + 4 * kp * m * (d + dv),
                        2 * block * kp + n * d + 2 * kp * (d + dv) + m * (d + dv) + 2 * kp * m)
        return Cost(2 * kp * m * (d + dv) + 2 * n * kp * (d + dv),
                    kp * (d + dv) + n * dv + n + 2 * block * kp)


# --------------------------------------------------------------------------------------------
# memory-compressed attention
# --------------------------------------------------------------------------------------------

def n_compressed(m: int, stride: int) -> int:
    """Number of compressed positions ``⌈M / stride⌉``."""
    return -(-m // stride)


def _padded(x, c: int, stride: int):
    """``x (..., M, D)`` cut or zero-padded to length ``L = (Kc - 1)·stride + c``."""
    m = x.shape[-2]
    length = (n_compressed(m, stride) - 1) * stride + c
    if length == m:
        return x
    if length < m:               # stride > c: the tokens after the last window are never read
        return x[..., :length, :]
    pad = np.zeros(x.shape[:-2] + (length - m, x.shape[-1]), dtype=x.dtype)
    return np.concatenate([x, pad], axis=-2)                             # (..., L, D)


def compress(x, w, stride: int):
    r"""Strided 1-D convolution along the sequence: ``y_b = Σ_t x[b·stride + t] @ w[t]``.

    ``x (..., M, D)``, ``w (c, D, D')`` → ``y (..., ⌈M/stride⌉, D')``; positions
    past the end (``b·stride + t >= M``) read zeros. The plain NumPy reference
    of the compression (one GEMM per tap ``t``; a single GEMM when
    ``stride == c``).
    """
    c = w.shape[0]
    kc = n_compressed(x.shape[-2], stride)
    xp = _padded(x, c, stride)                                           # (..., L, D)
    if stride == c:              # non-overlapping windows: one GEMM over (c·D)
        blocks = xp.reshape(x.shape[:-2] + (kc, c * x.shape[-1]))        # (..., Kc, c·D)
        return blocks @ w.reshape(c * w.shape[1], w.shape[2])            # (..., Kc, D')
    y = np.zeros(x.shape[:-2] + (kc, w.shape[2]), dtype=x.dtype)
    for t in range(c):
        y += xp[..., t:t + (kc - 1) * stride + 1:stride, :] @ w[t]       # Σ_t x[b·s + t] w[t]
    return y


def compress_backward(x, w, stride: int, dy):
    """Gradients ``(dx, dw)`` of :func:`compress` for the upstream gradient ``dy (..., Kc, D')``."""
    m = x.shape[-2]
    c = w.shape[0]
    kc = dy.shape[-2]
    xp = _padded(x, c, stride)
    length = xp.shape[-2]
    if stride == c:
        blocks = xp.reshape(x.shape[:-2] + (kc, c * x.shape[-1]))        # (..., Kc, c·D)
        wf = w.reshape(c * w.shape[1], w.shape[2])
        dxp = (dy @ wf.T).reshape(xp.shape)                              # dX_{bc+t} = dY_b w[t]ᵀ
        dw = _sum_batch_outer(blocks, dy).reshape(w.shape)               # dw[t] = Σ X_{bc+t}ᵀ dY_b
    else:
        dxp = np.zeros(xp.shape, dtype=dy.dtype)
        dw = np.empty(w.shape, dtype=dy.dtype)
        for t in range(c):
            taps = slice(t, t + (kc - 1) * stride + 1, stride)
            dxp[..., taps, :] += dy @ w[t].T                             # dX_{bs+t} += dY_b w[t]ᵀ
            dw[t] = _sum_batch_outer(xp[..., taps, :], dy)               # dw[t] = Σ X_{bs+t}ᵀ dY_b
    if length >= m:
        dx = dxp[..., :m, :]                                             # drop the zero padding
    else:
        dx = np.zeros(x.shape, dtype=dy.dtype)
        dx[..., :length, :] = dxp
    return np.ascontiguousarray(dx), dw


def visible_counts(n: int, m: int, c: int, stride: int) -> np.ndarray:
    """Causal rule: query ``i`` sees compressed position ``b`` iff ``b < visible[i]``.

    Position ``b`` summarises keys ``b·stride … min(b·stride + c, M) - 1``; it
    is visible to query ``i`` exactly when the last real key of its window is
    ``<= i``, i.e. ``min(b·stride + c, M) - 1 <= i``. Ends are non-decreasing
    in ``b``, so the visible positions are a prefix.
    """
    kc = n_compressed(m, stride)
    ends = np.minimum(np.arange(kc) * stride + c, m) - 1                # last key of each window
    return np.searchsorted(ends, np.arange(n), side="right").astype(np.int64)   # (N,)


class _CompressedCache(NamedTuple):
    k: np.ndarray            # (..., M, D)
    v: np.ndarray            # (..., M, Dv)
    w_k: np.ndarray          # (c, D, D) in the computation dtype
    w_v: np.ndarray          # (c, Dv, Dv)
    stride: int
    attend: _AttendCache


def _compressed_forward(q, k, v, w_k, w_v, stride, scale, causal, block=None):
    kr = compress(k, w_k, stride)                               # K̃_b = Σ_t K_{bs+t} W_k[t]   (..., Kc, D)
    vr = compress(v, w_v, stride)                               # Ṽ_b = Σ_t V_{bs+t} W_v[t]   (..., Kc, Dv)
    visible = visible_counts(q.shape[-2], k.shape[-2], w_k.shape[0], stride) if causal else None
    out, att = _attend(q, kr, vr, scale, visible, block)       # softmax(s Q K̃ᵀ + mask) Ṽ  (..., N, Dv)
    return out, _CompressedCache(k, v, w_k, w_v, stride, att)


def _compressed_backward(cache: _CompressedCache, dout):
    k, v, w_k, w_v, stride, att = cache
    dq, dkr, dvr = _attend_backward(att, dout)                  # dQ, dK̃, dṼ
    dk, dw_k = compress_backward(k, w_k, stride, dkr)           # through the convolution
    dv, dw_v = compress_backward(v, w_v, stride, dvr)
    return dq, dk, dv, dw_k, dw_v


class CompressedAttention(AttentionCore):
    r"""Memory-compressed attention: keys and values shortened by a strided convolution.

    Parameters
    ----------
    w_k : (c, D, D) float array
        Convolution of the keys (parameter ``w_k``): compressed key ``b`` is
        ``Σ_t k[b·stride + t] @ w_k[t]``, ``t = 0 … c-1``.
    w_v : (c, Dv, Dv) float array
        Convolution of the values (parameter ``w_v``), same kernel size ``c``.
    stride : int, optional
        Step between windows; the kernel size ``c`` when None (the paper: c = 3, stride 3).
    causal : bool
        Query ``i`` sees compressed position ``b`` only when the whole window
        behind it lies at or before ``i``: ``min(b·stride + c, M) - 1 <= i``
        (the last real key of the window; padding is not a key). Queries
        before the end of the first window see nothing and output 0 (zero
        gradient), as every fully masked row does.
    scale : float, optional
        Multiplies the scores; ``1/sqrt(D)`` when None.

    Notes
    -----
    Liu et al. 2018, "Generating Wikipedia by Summarizing Long Sequences",
    arXiv:1801.10198, §4.2.3. **Length rule**: there are ``Kc = ⌈M/stride⌉``
    compressed positions; windows that run past the last key read zeros
    (the sequence is zero-padded at the end, as lucidrains'
    ``memory-compressed-attention`` does); with ``stride > c`` the keys
    between windows, and after the last window, are never read. The kernel
    must fit the sequence: ``c <= M``.

    Cost: ``2·Kc·c·(D² + Dv²)`` FLOPs for the convolutions (about
    ``2·M·(D² + Dv²)`` when ``stride = c``) plus ``2·N·Kc·(D + Dv)`` for the
    attention — ``c`` times less than dense attention but still quadratic in
    the sequence length; memory ``O((N + M)·(D + Dv))`` (scores one block of
    query rows at a time).

    With ``c = stride = 1`` and identity weights this is exactly
    ``DenseAttention`` (causal: ``DenseAttention(causal=True)``).
    """

    def __init__(self, w_k, w_v, stride: int | None = None, causal: bool = False,
                 scale: float | None = None):
        self.w_k = self._check_weight(w_k, "w_k", "(c, D, D)")
        self.w_v = self._check_weight(w_v, "w_v", "(c, Dv, Dv)")
        if self.w_v.shape[0] != self.w_k.shape[0]:
            raise ValueError(f"w_v must have the kernel size c = {self.w_k.shape[0]} of w_k, got w_v "
                             f"{self.w_v.shape} and w_k {self.w_k.shape}")
        self.stride = check_int(stride, "stride", minimum=1, allow_none=True)
        self.causal = check_bool(causal, "causal")
        self.scale = check_scale(scale)

    @staticmethod
    def _check_weight(x, name, letters):
        x = _param(x, name)
        if x.ndim != 3 or x.shape[1] != x.shape[2]:
            raise ValueError(f"{name} must have shape {letters}, got shape {x.shape}")
        if x.shape[0] < 1:
            raise ValueError(f"{name} must have a kernel size c >= 1, got shape {x.shape}")
        if x.shape[1] < 1:
            raise ValueError(f"{name} must have a feature width >= 1, got shape {x.shape}")
        return x

    @property
    def c(self) -> int:
        """The kernel size."""
        return self.w_k.shape[0]

    @property
    def step(self) -> int:
        """The effective stride (``c`` when ``stride`` is None)."""
        return self.c if self.stride is None else self.stride

    @classmethod
    def init(cls, d: int, dv: int | None = None, c: int = 3, seed=0, *, stride: int | None = None,
             causal: bool = False, dtype=np.float64, scale: float | None = None) -> "CompressedAttention":
        r"""Draw ``w_k (c, d, d)`` and ``w_v (c, dv, dv)`` from ``seed``.

        The paper's models are tensor2tensor Transformers, whose default
        initializer is ``uniform_unit_scaling`` with gain 1 (``hparams.initializer``):
        entries uniform on ``±sqrt(3 / fan_in)`` with ``fan_in = c·d`` for a
        convolution, so a compressed key has about the scale of one key.
        """
        d = check_int(d, "d", minimum=1)
        dv = d if dv is None else check_int(dv, "dv", minimum=1)
        c = check_int(c, "c", minimum=1)
        rng = np.random.default_rng(seed)
        w_k = rng.uniform(-1, 1, size=(c, d, d)) * np.sqrt(3.0 / (c * d))
        w_v = rng.uniform(-1, 1, size=(c, dv, dv)) * np.sqrt(3.0 / (c * dv))
        return cls(w_k.astype(dtype), w_v.astype(dtype), stride=stride, causal=causal, scale=scale)

    @property
    def params(self) -> dict:
        return {"w_k": self.w_k, "w_v": self.w_v}

    def options(self):
        return {"w_k": self.w_k.shape, "w_v": self.w_v.shape, "stride": self.stride,
                "causal": self.causal, "scale": self.scale}

    @finite_policy
    def forward(self, q, k, v, *, check_finite: bool = True):
        q, k, v = check_qkv(q, k, v, check_finite=check_finite)
        d, dv, m = k.shape[-1], v.shape[-1], k.shape[-2]
        if self.w_k.shape[1] != d:
            raise ValueError(f"w_k must have shape (c, D, D) with D = {d} (the width of k {k.shape}), "
                             f"got w_k {self.w_k.shape}")
        if self.w_v.shape[1] != dv:
            raise ValueError(f"w_v must have shape (c, Dv, Dv) with Dv = {dv} (the width of v {v.shape}), "
                             f"got w_v {self.w_v.shape}")
        if self.c > m:
            raise ValueError(f"w_k has kernel size c = {self.c}, larger than the number of keys M = {m} "
                             f"(k {k.shape}); the kernel must fit the sequence")
        w_k = self.w_k.astype(q.dtype, copy=False)
        w_v = self.w_v.astype(q.dtype, copy=False)
        return _compressed_forward(q, k, v, w_k, w_v, self.step,
                                   resolve_scale(self.scale, q.shape[-1]), self.causal)

    @finite_policy
    def backward(self, cache: _CompressedCache, dout, *, check_finite: bool = True) -> Grads:
        check_cache(cache, _CompressedCache, "CompressedAttention")
        dout = check_dout(dout, cache.attend.out.shape, cache.attend.out.dtype, check_finite=check_finite)
        dq, dk, dv, dw_k, dw_v = _compressed_backward(cache, dout)
        return Grads(dq, dk, dv, {"w_k": dw_k.astype(self.w_k.dtype, copy=False),
                                  "w_v": dw_v.astype(self.w_v.dtype, copy=False)})

    def dense_mask(self, n, m=None):
        """The mask over *compressed* positions is not a mask over keys: None (an approximation)."""
        return None

    def cost(self, n, d, dv=None, m=None, *, backward=False):
        dv = d if dv is None else dv
        m = n if m is None else m
        kc = n_compressed(m, self.step)
        conv = 2 * kc * self.c * (d * d + dv * dv)
        block = min(n, max(1, config.LOWRANK_BLOCK_ELEMENTS // kc))
        if backward:   # attention backward (as dense, M -> Kc), then the convolutions' dX and dW
            return Cost(2 * n * kc * (3 * d + 2 * dv) + 2 * conv,
                        2 * block * kc + n * d + 2 * kc * (d + dv) + 2 * m * (d + dv))
        return Cost(conv + 2 * n * kc * (d + dv), kc * (d + dv) + n * dv + n + 2 * block * kc)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

def _linformer_factory(n, d, dv, seed, k=None):
    """Linformer for length ``n``: ``K = min(64, n // 4)`` (compresses at every n >= 4, fixed K
    at long n, so the cost stays linear), the authors' initialisation."""
    k = max(1, min(64, n // 4)) if k is None else k
    return LinformerAttention.init(n, k, seed)


def _compressed_factory(n, d, dv, seed, c=3, stride=None, causal=False):
    return CompressedAttention.init(d, dv, c, seed, stride=stride, causal=causal)


def _register():
    from .core import register
    register("linformer", LinformerAttention, chapter=3, factory=_linformer_factory, exact=False,
             description="Linformer: keys/values projected along the sequence to K = min(64, N/4)")
    register("compressed", CompressedAttention, chapter=3, config={"c": 3},
             factory=_compressed_factory, exact=False,
             description="memory-compressed attention: strided convolution c = stride = 3")
    register("compressed_causal", CompressedAttention, chapter=3, config={"c": 3, "causal": True},
             factory=_compressed_factory, exact=False,
             description="memory-compressed attention, causal (whole window at or before the query)")


_register()
