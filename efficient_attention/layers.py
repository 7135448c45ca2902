r"""Multi-head attention with one attention core per head — so heads can differ.

The layer of Vaswani et al. (2017, arXiv:1706.03762, §3.2.2) projects the
sequence ``x`` of shape (..., N, D) into H triples of queries, keys and values,
runs one attention per head and mixes the heads back:

.. math::

    Q_h = X W^Q_h,\quad K_h = X W^K_h,\quad V_h = X W^V_h,\qquad
    Y = \sum_{h=1}^{H} \operatorname{core}_h(Q_h, K_h, V_h)\, W^O_h,

with ``w_q, w_k`` of shape (D, H, Dk), ``w_v`` (D, H, Dv) and ``w_o`` (H, Dv, D)
(``W^Q_h = w_q[:, h]``). The textbook layer uses the same dense core for every
head; here each head has its own core, which is how the lecture's sparse
models are built: Longformer (Beltagy et al. 2020, arXiv:2004.05150, §3.1)
gives heads a sliding window, a dilated window, or global tokens, and BigBird
(Zaheer et al. 2020, arXiv:2007.14062, §2) adds random keys. The ready-made
head sets are :func:`longformer_heads` and :func:`bigbird_heads`.

Backward (``dY`` the upstream gradient, ``O_h`` the head outputs; ``dQ_h, dK_h,
dV_h`` from each core's backward), one chain-rule step a line:

.. math::

    dW^O_h = O_h^\top dY,\quad dO_h = dY\,{W^O_h}^\top,\quad
    dW^Q_h = X^\top dQ_h,\ \ldots,\quad
    dX = \sum_h dQ_h {W^Q_h}^\top + dK_h {W^K_h}^\top + dV_h {W^V_h}^\top.

The three input projections run as one GEMM against the concatenated
(D, H·(2Dk + Dv)) weight, and so does their backward. When every head has the
same core (the same object, or parameter-free cores of one class and equal
configuration) the heads are stacked on axis -3 and the core runs once;
otherwise the heads whose cores are sparse patterns (``SparseAttention``, or
``BlockSparseAttention`` with an ``(N, M)`` mask; two or more, of one scale)
run as one call of the block-sparse engine with their patterns as a per-head
mask (``pattern_group``), and a loop calls each other head's core on its slice.

Cost: ``2·N·D·H·(2Dk + Dv) + 2·N·H·Dv·D`` FLOPs for the projections, plus the
cores'. A core's learnable parameters appear in ``layer.params`` as
``head{h}.{name}``; a core object used by several heads shares its parameters,
which are listed once, under the first head that uses it, with the gradient
summed over all its heads.

Peers: in HF/LRA Longformer every head combines its window and the global
tokens in one softmax, and global tokens get a second set of Q/K/V
projections. The lecture's per-head variant here spreads the kinds over
heads; for the combined pattern in one head give that head
``SparseAttention(patterns.longformer(...))`` (the second projection set is
not modelled). Output projection biases and dropout are left out (a layer
outside adds them).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .core import AttentionCore, Cost, LayerGrads, SequenceLayer
from .dense import DenseAttention
from .validate import (as_float_array, check_bool, check_cache, check_dout, check_int, check_x,
                       finite_policy)

__all__ = ["MultiHeadAttention", "longformer_heads", "bigbird_heads"]


class _MHACache(NamedTuple):
    x: np.ndarray             # (..., N, D) in the computation dtype
    o: np.ndarray             # (..., N, H·Dv)  head outputs, heads side by side
    core_caches: tuple        # one cache (batched path) or one per head (None for grouped heads)
    batched: bool
    y_shape: tuple
    dtype: np.dtype
    group_cache: object = None   # the one engine call of the pattern heads (see _pattern_group)


def _scalar_config(core) -> dict | None:
    """A core's configuration when it only holds plain scalars (safe to compare), else None."""
    try:
        cfg = core.options()
    except Exception:  # pragma: no cover - a core without options()
        return None
    scalar = (bool, int, float, str, np.integer, np.floating)
    for value in cfg.values():
        if isinstance(value, tuple) and all(isinstance(e, scalar) for e in value):
            continue
        if not (value is None or isinstance(value, scalar)):
            return None
    return cfg


def _can_batch(cores) -> bool:
    """True when one call of ``cores[0]`` on heads stacked on axis -3 computes every head."""
    first = cores[0]
    if all(c is first for c in cores):
        return True
    if first.params:
        return False
    cfg = _scalar_config(first)
    return cfg is not None and all(type(c) is type(first) and not c.params and _scalar_config(c) == cfg
                                   for c in cores)


def _pattern_group(cores):
    """``(heads, core)``: the heads whose cores are sparse patterns (``SparseAttention`` with one
    pattern, ``BlockSparseAttention`` with one ``(N, M)`` BlockMask), all of one scale and shape,
    and one :class:`~efficient_attention.blocksparse.BlockSparseAttention` with their patterns as a
    per-head mask, which computes them in one call; None when fewer than two heads qualify."""
    from .blocksparse import BlockMask, BlockSparseAttention
    from .sparse import SparseAttention
    heads, pats = [], []
    for h, c in enumerate(cores):
        if c.params:
            continue
        if isinstance(c, SparseAttention) and not c.per_head:
            pat = c.pattern
        elif isinstance(c, BlockSparseAttention) and isinstance(c.mask, BlockMask) and len(c.mask.shape) == 2:
            pat = c.block_mask(*c.mask.shape).to_pattern()
        else:
            continue
        heads.append(h)
        pats.append(pat)
    if len(heads) < 2:
        return None
    scales = {cores[h].scale for h in heads}
    shapes = {p.shape for p in pats}
    if len(scales) != 1 or len(shapes) != 1:
        return None
    return tuple(heads), BlockSparseAttention(BlockMask.from_pattern(pats), scale=scales.pop())


def right_matmul(x, w):
    """``x @ w`` for ``x (..., N, D)`` and ``w (D, E)`` as one 2-D GEMM over all rows
    (numpy's batched matmul calls BLAS once per batch entry)."""
    if x.ndim <= 2:
        return x @ w
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(x.shape[:-1] + (w.shape[-1],))


def left_matmul(p, x):
    """``p @ x`` for a 2-D ``p (I, N)`` shared by every batch entry of ``x (..., N, D)``,
    as one GEMM against the batch laid side by side: ``p @ [x_1 | x_2 | ...]``."""
    if x.ndim <= 2:
        return p @ x
    batch, (n, d) = x.shape[:-2], x.shape[-2:]
    wide = np.moveaxis(x, -2, 0).reshape(n, -1)                    # (N, B·D)
    out = (p @ wide).reshape((p.shape[0],) + batch + (d,))         # (I, ..., D)
    return np.moveaxis(out, 0, -2)


def _split_heads(a, h):
    """(..., N, H·E) -> (..., H, N, E), contiguous."""
    a = a.reshape(a.shape[:-1] + (h, a.shape[-1] // h))
    return np.ascontiguousarray(np.moveaxis(a, -2, -3))


def _merge_heads(a):
    """(..., H, N, E) -> (..., N, H·E)."""
    a = np.moveaxis(a, -3, -2)
    return a.reshape(a.shape[:-2] + (a.shape[-2] * a.shape[-1],))


class MultiHeadAttention(SequenceLayer):
    r"""``y = Σ_h core_h(x·w_q[:, h], x·w_k[:, h], x·w_v[:, h]) · w_o[h]``.

    Parameters
    ----------
    cores : AttentionCore or sequence of H AttentionCores
        One core per head (a single core is used for every head).
    w_q, w_k : (D, H, Dk) float arrays
    w_v : (D, H, Dv) float array
    w_o : (H, Dv, D) float array

    Notes
    -----
    ``forward(x, *, check_finite=True)`` takes ``x (..., N, D)`` and returns
    ``y (..., N, D)`` and a cache; ``backward(cache, dy, *, check_finite=True)`` returns
    ``LayerGrads(dx, params)`` with gradients for ``w_q, w_k, w_v, w_o`` and
    every core parameter (``head{h}.{name}``). The computation runs in
    float32 only when ``x`` is float32; weights are cast to it and their
    gradients come back in their own dtype. Cores that derive keys from
    queries (shared-QK LSH, which needs ``k=None``) are not supported.

    Examples
    --------
    >>> import numpy as np
    >>> from efficient_attention.layers import MultiHeadAttention
    >>> layer = MultiHeadAttention.init(n=6, d=8, seed=0, heads=2)
    >>> x = np.random.default_rng(0).standard_normal((3, 6, 8))
    >>> y, cache = layer.forward(x)
    >>> y.shape, layer.backward(cache, np.ones_like(y)).dx.shape
    ((3, 6, 8), (3, 6, 8))
    """

    def __init__(self, cores, w_q, w_k, w_v, w_o):
        w_q = as_float_array(w_q, "w_q")
        w_k = as_float_array(w_k, "w_k")
        w_v = as_float_array(w_v, "w_v")
        w_o = as_float_array(w_o, "w_o")
        for w, name, letters in ((w_q, "w_q", "(D, H, Dk)"), (w_k, "w_k", "(D, H, Dk)"),
                                 (w_v, "w_v", "(D, H, Dv)"), (w_o, "w_o", "(H, Dv, D)")):
            if w.ndim != 3 or 0 in w.shape:
                raise ValueError(f"{name} must have shape {letters} with 3 non-empty axes, got shape {w.shape}")
        d, h, dk = w_q.shape
        if w_k.shape != w_q.shape:
            raise ValueError(f"w_k must have the shape of w_q (D, H, Dk) = {w_q.shape}, got {w_k.shape}")
        if w_v.shape[:2] != (d, h):
            raise ValueError(f"w_v must have shape (D, H, Dv) with (D, H) = {(d, h)} from w_q, got {w_v.shape}")
        dv = w_v.shape[2]
        if w_o.shape != (h, dv, d):
            raise ValueError(f"w_o must have shape (H, Dv, D) = {(h, dv, d)} from w_q and w_v, got {w_o.shape}")
        if isinstance(cores, AttentionCore):
            cores = [cores] * h
        if isinstance(cores, (str, bytes)) or not hasattr(cores, "__len__"):
            raise TypeError(f"cores must be an AttentionCore or a sequence of them, got {type(cores).__name__}")
        cores = list(cores)
        for i, c in enumerate(cores):
            if not isinstance(c, AttentionCore):
                raise TypeError(f"cores[{i}] must be an AttentionCore, got {type(c).__name__}")
        if len(cores) != h:
            raise ValueError(f"cores must hold one core per head: H = {h} heads in w_q (D, H, Dk) = "
                             f"{w_q.shape}, got {len(cores)} cores")
        self.cores = cores
        self.w_q, self.w_k, self.w_v, self.w_o = w_q, w_k, w_v, w_o
        self.batched = _can_batch(cores)
        #: ``(heads, core)``: heads with sparse patterns computed by one block-sparse engine call
        #: (a per-head mask), or None
        self.pattern_group = None if self.batched else _pattern_group(cores)

    # -- shapes -------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.w_q.shape[0]

    @property
    def heads(self) -> int:
        return self.w_q.shape[1]

    @property
    def dk(self) -> int:
        return self.w_q.shape[2]

    @property
    def dv(self) -> int:
        return self.w_v.shape[2]

    def _core_params(self):
        """[(name, head, core, param_name)] — each core object's params once, under its first head."""
        seen, out = set(), []
        for h, c in enumerate(self.cores):
            if id(c) in seen:
                continue
            seen.add(id(c))
            out += [(f"head{h}.{p}", h, c, p) for p in c.params]
        return out

    @property
    def params(self) -> dict:
        p = {"w_q": self.w_q, "w_k": self.w_k, "w_v": self.w_v, "w_o": self.w_o}
        for name, _, core, pname in self._core_params():
            p[name] = core.params[pname]
        return p

    def __repr__(self):
        return (f"MultiHeadAttention(heads={self.heads}, d={self.d}, dk={self.dk}, dv={self.dv}, "
                f"cores={self.cores!r})")

    # -- construction ---------------------------------------------------------
    @classmethod
    def init(cls, n: int | None = None, d: int = 64, seed: int = 0, *, heads: int | None = None,
             dk: int | None = None, dv: int | None = None, cores=None, dtype=np.float64):
        """Random projections for ``heads`` heads (Glorot-style normal, variance 1/fan-in).

        ``heads`` defaults to the largest of 8, 4, 2, 1 that divides ``d`` with
        ``d // heads >= 4`` (8 heads of 32 at d = 256, 2 heads of 4 at d = 8);
        ``dk`` and ``dv`` default to ``d // heads``; ``cores`` (one core, or one
        per head) defaults to one shared ``DenseAttention()``. ``n`` is not
        needed by dense heads (it is accepted so every layer builds alike).
        """
        d = check_int(d, "d", minimum=1)
        if heads is None:
            heads = next(h for h in (8, 4, 2, 1) if d % h == 0 and d // h >= min(4, d))
        heads = check_int(heads, "heads", minimum=1)
        dk = check_int(max(1, d // heads) if dk is None else dk, "dk", minimum=1)
        dv = check_int(dk if dv is None else dv, "dv", minimum=1)
        if cores is None:
            cores = DenseAttention()
        rng = np.random.default_rng(seed)
        w_q = rng.standard_normal((d, heads, dk)) / np.sqrt(d)
        w_k = rng.standard_normal((d, heads, dk)) / np.sqrt(d)
        w_v = rng.standard_normal((d, heads, dv)) / np.sqrt(d)
        w_o = rng.standard_normal((heads, dv, d)) / np.sqrt(heads * dv)
        dtype = np.dtype(dtype)
        return cls(cores, *(w.astype(dtype) for w in (w_q, w_k, w_v, w_o)))

    # -- forward / backward -----------------------------------------------------
    def _w_in(self, dtype):
        """The concatenated input projection (D, H·Dk | H·Dk | H·Dv) in ``dtype``."""
        d = self.d
        return np.concatenate([self.w_q.reshape(d, -1), self.w_k.reshape(d, -1),
                               self.w_v.reshape(d, -1)], axis=1).astype(dtype, copy=False)

    @finite_policy
    def forward(self, x, *, check_finite: bool = True):
        x = check_x(x, d=self.d, check_finite=check_finite)            # the cores do not check again
        dtype = x.dtype
        h, hk = self.heads, self.heads * self.dk
        qkv = right_matmul(x, self._w_in(dtype))                   # [Q|K|V] = X [Wq|Wk|Wv]   (..., N, H(2Dk+Dv))
        q = _split_heads(qkv[..., :hk], h)                         # (..., H, N, Dk)
        k = _split_heads(qkv[..., hk:2 * hk], h)                   # (..., H, N, Dk)
        v = _split_heads(qkv[..., 2 * hk:], h)                     # (..., H, N, Dv)
        if self.batched:
            o, cache = self.cores[0].forward(q, k, v, check_finite=False)   # all heads (..., H, N, Dv)
            caches = (cache,)
        else:
            outs, caches = [None] * self.heads, [None] * self.heads
            group, group_cache = self.pattern_group, None
            if group is not None:                                  # pattern heads: one engine call
                idx = list(group[0])
                o_g, group_cache = group[1].forward(q[..., idx, :, :], k[..., idx, :, :], v[..., idx, :, :],
                                                    check_finite=False)
                for pos, i in enumerate(idx):
                    outs[i] = o_g[..., pos, :, :]                  # (..., N, Dv)
            for i, core in enumerate(self.cores):
                if outs[i] is None:
                    o_i, caches[i] = core.forward(q[..., i, :, :], k[..., i, :, :], v[..., i, :, :],
                                                  check_finite=False)       # (..., N, Dv)
                    outs[i] = o_i
            o = np.stack(outs, axis=-3)                            # (..., H, N, Dv)
            caches = tuple(caches)
        o = _merge_heads(o.astype(dtype, copy=False))              # (..., N, H·Dv)
        y = right_matmul(o, self.w_o.reshape(-1, self.d).astype(dtype, copy=False))   # Y = Σ_h O_h Wo_h  (..., N, D)
        return y, _MHACache(x, o, caches, self.batched, y.shape, dtype,
                            None if self.batched else group_cache)

    @finite_policy
    def backward(self, cache: _MHACache, dy, *, check_finite: bool = True) -> LayerGrads:
        check_cache(cache, _MHACache, "MultiHeadAttention")
        dy = check_dout(dy, cache.y_shape, cache.dtype, name="dy", check_finite=check_finite)
        x, o, caches, batched, _, dtype, group_cache = cache
        d, h = self.d, self.heads
        w_o = self.w_o.reshape(-1, d).astype(dtype, copy=False)   # (H·Dv, D)
        x2, o2, dy2 = x.reshape(-1, d), o.reshape(-1, o.shape[-1]), dy.reshape(-1, d)
        dw_o = (o2.T @ dy2).reshape(self.w_o.shape)                # dWo = Oᵀ dY          (H, Dv, D)
        do = _split_heads(right_matmul(dy, w_o.T), h)              # dO = dY Woᵀ          (..., H, N, Dv)
        core_grads = {}
        if batched:
            g = self.cores[0].backward(caches[0], do, check_finite=False)
            dq, dk, dv = g.dq, g.dk, g.dv                          # (..., H, N, Dk|Dv)
            core_grads[id(self.cores[0])] = g.params
        else:
            dqs, dks, dvs = [None] * h, [None] * h, [None] * h
            if group_cache is not None:                            # the pattern heads' one call
                idx = list(self.pattern_group[0])
                g = self.pattern_group[1].backward(group_cache, do[..., idx, :, :], check_finite=False)
                for pos, i in enumerate(idx):
                    dqs[i], dks[i], dvs[i] = g.dq[..., pos, :, :], g.dk[..., pos, :, :], g.dv[..., pos, :, :]
            for i, (core, c_i) in enumerate(zip(self.cores, caches)):
                if dqs[i] is not None:
                    continue
                g = core.backward(c_i, do[..., i, :, :], check_finite=False)
                dqs[i] = g.dq
                dks[i] = g.dk
                dvs[i] = g.dv
                acc = core_grads.setdefault(id(core), {})
                for name, grad in g.params.items():          # a shared core sums over its heads
                    acc[name] = grad if name not in acc else acc[name] + grad
            dq, dk, dv = (np.stack(a, axis=-3) for a in (dqs, dks, dvs))
        if dk is None:
            raise ValueError("cores must take keys from the layer's w_k projection; "
                             "a core returned dk=None (shared-QK cores are not supported)")
        dqkv = np.concatenate([_merge_heads(a.astype(dtype, copy=False)) for a in (dq, dk, dv)],
                              axis=-1)                             # [dQ|dK|dV]           (..., N, H(2Dk+Dv))
        dx = right_matmul(dqkv, self._w_in(dtype).T)               # dX = [dQ|dK|dV] Winᵀ  (..., N, D)
        dw_in = x2.T @ dqkv.reshape(-1, dqkv.shape[-1])            # dWin = Xᵀ [dQ|dK|dV]  (D, H(2Dk+Dv))
        hk = h * self.dk
        params = {
            "w_q": dw_in[:, :hk].reshape(self.w_q.shape).astype(self.w_q.dtype, copy=False),
            "w_k": dw_in[:, hk:2 * hk].reshape(self.w_k.shape).astype(self.w_k.dtype, copy=False),
            "w_v": dw_in[:, 2 * hk:].reshape(self.w_v.shape).astype(self.w_v.dtype, copy=False),
            "w_o": dw_o.astype(self.w_o.dtype, copy=False),
        }
        for name, _, core, pname in self._core_params():
            params[name] = core_grads[id(core)][pname]
        return LayerGrads(dx, params)

    def cost(self, n: int, d: int | None = None, *, backward: bool = False) -> Cost:
        """Projections plus every head's core (per sequence)."""
        d = self.d if d is None else d
        proj = 2 * n * d * self.heads * (2 * self.dk + 2 * self.dv)
        total = Cost(proj * (2 if backward else 1), n * self.heads * (2 * self.dk + 2 * self.dv))
        for core in self.cores:
            total = total + core.cost(n, self.dk, self.dv, backward=backward)
        return total


# -- ready-made head sets ------------------------------------------------------------

def _check_head_args(n, heads, window, dilation, global_indices):
    n = check_int(n, "n", minimum=1)
    heads = check_int(heads, "heads", minimum=1)
    window = check_int(window, "window", minimum=0)
    dilation = check_int(dilation, "dilation", minimum=1)
    idx = tuple(check_int(i, "global_indices[]", minimum=0, maximum=n - 1) for i in global_indices)
    return n, heads, window, dilation, idx


def longformer_heads(n: int, heads: int = 3, window: int = 4, dilation: int = 2,
                     global_indices=(0,), *, causal: bool = False, scale=None) -> list:
    """Longformer's heads, cycling local, dilated (strided) and global patterns.

    Head ``h`` gets ``LocalAttention(window)`` when ``h % 3 == 0``
    (``|i - j| <= window``), ``StridedAttention(dilation, window)`` when
    ``h % 3 == 1`` (the dilated sliding window: ``(i - j) % dilation == 0``
    and ``|i - j| <= window·dilation``), and ``GlobalAttention(global_indices)``
    when ``h % 3 == 2`` (``i`` or ``j`` global). With ``causal`` the local and
    strided heads are causal (a global head is not: it is left out of causal
    sets, the third kind becomes a second local head). Beltagy et al. 2020,
    arXiv:2004.05150, §3.1.
    """
    n, heads, window, dilation, idx = _check_head_args(n, heads, window, dilation, global_indices)
    from .local import LocalAttention, StridedAttention
    from .sparse import GlobalAttention
    out = []
    for h in range(heads):
        kind = h % 3
        if kind == 0 or (kind == 2 and causal):
            out.append(LocalAttention(window, causal=causal, scale=scale))
        elif kind == 1:
            out.append(StridedAttention(dilation, window=window, causal=causal, scale=scale))
        else:
            out.append(GlobalAttention(indices=idx, scale=scale))
    return out


def bigbird_heads(n: int, heads: int = 4, window: int = 4, dilation: int = 2, global_indices=(0,),
                  per_row: int = 3, seed: int = 0, *, causal: bool = False, scale=None) -> list:
    """BigBird's ingredients as heads, cycling random, local, strided and global patterns.

    Head ``h`` gets, by ``h % 4``: 0 a random head, 1 ``LocalAttention(window)``,
    2 ``StridedAttention(dilation, window)``, 3 ``GlobalAttention(global_indices)``.
    As in BigBird, the random keys are *extra* keys: a random head is
    ``SparseAttention(patterns.random(n, per_row, seed + h, exclude=seen))``
    (a new draw per head) with ``seen`` the keys the window and global kinds
    give (``|i - j| <= window``, ``i`` or ``j`` global), so each query gets
    ``per_row`` random keys outside them, or all that remain when fewer do (a
    global query already sees every key and gets none). With ``causal`` the
    local and strided heads are causal, the global kind becomes a second local
    head (as in :func:`longformer_heads`), and a random head draws among
    ``j <= i`` outside the causal window (``patterns.random(..., causal=True)``).
    The random heads fix the sequence length to ``n``. (The BigBird paper puts
    all four in one pattern per head — that is ``patterns.bigbird`` with
    ``SparseAttention``; this set spreads them over heads, as the lecture's
    per-head picture does.) Zaheer et al. 2020, arXiv:2007.14062, §2.
    """
    n, heads, window, dilation, idx = _check_head_args(n, heads, window, dilation, global_indices)
    per_row = check_int(per_row, "per_row", minimum=1, maximum=n)
    seed = check_int(seed, "seed", minimum=0)
    causal = check_bool(causal, "causal")
    from . import patterns
    from .local import LocalAttention, StridedAttention
    from .sparse import GlobalAttention, SparseAttention
    if causal:
        seen = patterns.local(n, window, causal=True)
    else:
        seen = patterns.union(patterns.local(n, window), patterns.global_tokens(n, idx))
    out = []
    for h in range(heads):
        kind = h % 4
        if kind == 0:
            rand = patterns.random(n, per_row, seed + h, causal=causal, exclude=seen)
            out.append(SparseAttention(rand, scale=scale))
        elif kind == 1 or (kind == 3 and causal):
            out.append(LocalAttention(window, causal=causal, scale=scale))
        elif kind == 2:
            out.append(StridedAttention(dilation, window=window, causal=causal, scale=scale))
        else:
            out.append(GlobalAttention(indices=idx, scale=scale))
    return out


# -- registry --------------------------------------------------------------------------

def _mha_heads(d):
    """Heads for the registry's sparse layers: 4 below d = 64, 8 from there."""
    return 4 if d < 64 else 8


def _build_longformer(n, d, dv=None, seed=0, **_):
    heads = _mha_heads(d)
    window = max(1, min(32, n // 8))
    cores = longformer_heads(n, heads, window=window, dilation=2, global_indices=(0,))
    return MultiHeadAttention.init(n=n, d=d, seed=seed, heads=heads, dk=max(1, d // heads), cores=cores)


def _build_bigbird(n, d, dv=None, seed=0, **_):
    heads = _mha_heads(d)
    window = max(1, min(32, n // 8))
    cores = bigbird_heads(n, heads, window=window, dilation=2, global_indices=(0,),
                          per_row=max(1, min(32, n // 8)), seed=seed)
    return MultiHeadAttention.init(n=n, d=d, seed=seed, heads=heads, dk=max(1, d // heads), cores=cores)


def _register():
    from .core import register
    register("mha_dense", MultiHeadAttention, chapter=0,
             description="multi-head attention, dense heads (one batched core call)")
    register("mha_longformer", MultiHeadAttention, chapter=1, factory=_build_longformer,
             description="multi-head attention, heads cycling local / dilated / global patterns")
    register("mha_bigbird", MultiHeadAttention, chapter=1, factory=_build_bigbird,
             description="multi-head attention, heads cycling random / local / dilated / global patterns")


_register()
