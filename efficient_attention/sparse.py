r"""Chapter 1 — attention restricted to a hand-designed pattern, and global tokens.

**Sparse attention.** Given a boolean pattern :math:`A \in \{0,1\}^{N\times M}`
(a ``scipy.sparse`` CSR array, see :mod:`efficient_attention.patterns`), query
``i`` attends only to the keys ``j`` with :math:`A_{ij} = 1`:

.. math::

    s_{ij} = \text{scale}\; q_i\cdot k_j \quad (A_{ij}=1), \qquad
    \ell_i = \log\sum_{j: A_{ij}=1} e^{s_{ij}}, \qquad
    o_i = \sum_{j: A_{ij}=1} e^{s_{ij}-\ell_i}\, v_j,

which equals :class:`~efficient_attention.DenseAttention` with the dense mask
``A`` — but costs ``2·nnz·(D + Dv)`` FLOPs and ``O(N·Dv)`` memory instead of
``2·N·M·(D + Dv)`` and ``O(N·M)``. A row with no allowed key outputs 0 and
passes zero gradient. Backward (``δ_i = dO_i·o_i``):

.. math::

    p_{ij} = e^{s_{ij}-\ell_i},\quad
    dS_{ij} = p_{ij}\,(dO_i\cdot v_j - \delta_i),\quad
    dQ_i = \text{scale}\sum_j dS_{ij} k_j,\quad
    dK_j = \text{scale}\sum_i dS_{ij} q_i,\quad
    dV_j = \sum_i p_{ij}\, dO_i .

``dQ`` is a pass over rows, ``dK, dV`` a pass over the transposed pattern
(keys), so no two threads write the same row (numba kernels in
:mod:`efficient_attention.kernels.sparse`). Only ``ℓ`` is kept from the
forward pass: probabilities are recomputed.

One pattern per head: ``SparseAttention([A_0, ..., A_{H-1}])`` applies
``A_h`` to head ``h`` (axis -3 of ``q, k, v``). That is how the lecture's
multi-head variants are assembled: Longformer's local, dilated and global
heads, BigBird's random, local, strided and global heads.

**Global attention** (Longformer §3.1, arXiv:2004.05150; BigBird's ITC/ETC,
arXiv:2007.14062 §2). Chosen tokens ``G`` attend to all tokens and all tokens
attend to them: ``A_{ij} = [i ∈ G or j ∈ G]``. Added tokens (ETC, a CLS
token): ``E`` extra tokens with learnable ``q^x, k^x, v^x``, prepended to the
sequence and global. See :class:`GlobalAttention`.

References: Child et al. 2019, arXiv:1904.10509; Beltagy et al. 2020,
arXiv:2004.05150; Zaheer et al. 2020, arXiv:2007.14062.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import patterns as _patterns
from . import config
from .core import AttentionCore, Cost, Grads
from .dense import DenseAttention
from .kernels import sparse as _k
from .validate import (check_cache, check_csr, check_dout, check_indices, check_int, check_patterns,
                       check_qkv, check_scale, resolve_scale, finite_policy)

__all__ = ["SparseAttention", "GlobalAttention"]



# --------------------------------------------------------------------------- sparse attention

class _PatternIndex(NamedTuple):
    """The validated pattern(s) as kernel arrays: row-major and key-major (transposed)."""
    indptr: np.ndarray    # (H, N+1) int64, offsets into indices
    indices: np.ndarray   # (Σ nnz,) int64 key of each entry
    tptr: np.ndarray      # (H, M+1) int64, offsets into tind
    tind: np.ndarray      # (Σ nnz,) int64 query of each entry, key-major
    nnz: tuple            # entries per head


def _index(csrs) -> _PatternIndex:
    return _PatternIndex(*_k.pattern_index(csrs), tuple(int(c.nnz) for c in csrs))


class _SparseCache(NamedTuple):
    q: np.ndarray         # (BH, N, D) contiguous
    k: np.ndarray         # (BH, M, D)
    v: np.ndarray         # (BH, M, Dv)
    out: np.ndarray       # (..., N, Dv)
    lse: np.ndarray       # (BH, N)
    shapes: tuple         # original shapes of q, k, v
    scale: float


class _SparseEngineCache(NamedTuple):
    engine: tuple         # the block-sparse engine's cache (patterns whose tiles it computes)


def _forward(q, k, v, index: _PatternIndex, scale: float):
    shapes = (q.shape, k.shape, v.shape)
    q3, k3, v3 = (np.ascontiguousarray(a.reshape((-1,) + a.shape[-2:])) for a in (q, k, v))
    out = np.empty(q3.shape[:2] + (v3.shape[-1],), q.dtype)                # O   (BH, N, Dv)
    lse = np.empty(q3.shape[:2], q.dtype)                                  # ℓ   (BH, N)
    _k.sparse_attention_forward(q3, k3, v3, index.indptr, index.indices, scale, out, lse)
    out = out.reshape(q.shape[:-1] + (v.shape[-1],))
    return out, _SparseCache(q3, k3, v3, out, lse, shapes, scale)


def _backward(cache: _SparseCache, dout, index: _PatternIndex):
    q, k, v, out, lse, shapes, scale = cache
    dout3 = np.ascontiguousarray(dout.reshape(q.shape[:2] + (v.shape[-1],)))
    delta = np.einsum("bnd,bnd->bn", dout3, out.reshape(dout3.shape))      # δ_i = dO_i · O_i  (BH, N)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    _k.sparse_attention_backward_dq(q, k, v, dout3, lse, delta, index.indptr, index.indices, scale, dq)
    _k.sparse_attention_backward_dkdv(q, k, v, dout3, lse, delta, index.tptr, index.tind, scale, dk, dv)
    return dq.reshape(shapes[0]), dk.reshape(shapes[1]), dv.reshape(shapes[2])


class SparseAttention(AttentionCore):
    r"""Softmax attention restricted to a sparse pattern (one for all heads, or one per head).

    Parameters
    ----------
    pattern : scipy.sparse array (N, M), or a list of H of them
        True (stored) entries may attend. Index arrays are validated (shape,
        range, ``indptr`` monotone) and canonicalised (sorted, duplicates
        merged, explicit zeros dropped) at construction: an *unsorted* CSR
        gives the same result as the sorted one; an *out-of-range* one raises
        ``ValueError`` before any kernel runs. A list applies ``pattern[h]``
        to head ``h``, the axis -3 of ``q, k, v`` (which must then have
        ``H`` there).
    scale : float, optional
        Multiplies the scores; ``1/sqrt(D)`` when None.

    Notes
    -----
    Equals ``DenseAttention(scale=scale).forward(q, k, v, mask=pattern.toarray())``
    (per head: the stacked masks). ``forward`` costs ``2·nnz·(D + Dv)`` FLOPs
    per sequence and head, backward ``2·nnz·(4D + 3Dv)`` (scores and ``dO·v``
    are recomputed in the row pass and in the key pass).

    **Two engines.** At construction the pattern's tile layout is built
    (:class:`~efficient_attention.blocksparse.BlockMask`); when at least ``config.ENGINE_MIN_TILED``
    (module setting, 0.5) of its pairs lie in tiles dense enough to be computed as tiles — a
    window, Longformer, BigBird's blocks, dense or causal patterns — the core runs on the
    block-sparse engine :class:`~efficient_attention.blocksparse.BlockSparseAttention` (vector products on
    tiles, thin tiles pair by pair; ``engine`` is True); otherwise — random keys, a few per
    tile — on the row-CSR kernels of :mod:`efficient_attention.kernels.sparse`. Both compute
    the same function (the tests compare each with the dense oracle).

    Examples
    --------
    >>> import numpy as np
    >>> from efficient_attention import patterns
    >>> core = SparseAttention(patterns.longformer(64, window=4, global_indices=[0]))
    >>> q = k = v = np.random.default_rng(0).standard_normal((2, 64, 8))
    >>> core(q, k, v).shape
    (2, 64, 8)
    """

    def __init__(self, pattern, scale: float | None = None):
        self.scale = check_scale(scale)
        pats, (n, m), self.per_head = check_patterns(pattern)
        csrs = [check_csr(p, n, m, f"pattern[{h}]" if self.per_head else "pattern") for h, p in enumerate(pats)]
        self.patterns = csrs
        self.n, self.m = csrs[0].shape
        self._index = _index(csrs)
        self._engine = _engine_for(csrs if self.per_head else csrs[0], self.scale)

    @property
    def pattern(self):
        """The canonical pattern (a list when one per head)."""
        return list(self.patterns) if self.per_head else self.patterns[0]

    def options(self):
        shape = (len(self.patterns),) + (self.n, self.m) if self.per_head else (self.n, self.m)
        return {"pattern": f"<{'per-head ' if self.per_head else ''}pattern {shape}, nnz {sum(self._index.nnz)}>",
                "scale": self.scale}

    @finite_policy
    def forward(self, q, k, v, *, check_finite: bool = True):
        q, k, v = check_qkv(q, k, v, check_finite=check_finite)
        if (q.shape[-2], k.shape[-2]) != (self.n, self.m):
            raise ValueError(f"pattern has shape (N, M) = ({self.n}, {self.m}) but q, k give "
                             f"(N, M) = ({q.shape[-2]}, {k.shape[-2]}) (q {q.shape}, k {k.shape})")
        if self.per_head and (q.ndim < 3 or q.shape[-3] != len(self.patterns)):
            raise ValueError(f"q, k, v must have H = {len(self.patterns)} heads on axis -3 (one pattern per "
                             f"head), got q {q.shape}")
        if self._engine is not None:
            out, cache = self._engine.forward(q, k, v, check_finite=False)
            return out, _SparseEngineCache(cache)
        return _forward(q, k, v, self._index, resolve_scale(self.scale, q.shape[-1]))

    @property
    def engine(self) -> bool:
        """Whether this pattern runs on the block-sparse engine (see the class notes)."""
        return self._engine is not None

    @finite_policy
    def backward(self, cache: _SparseCache, dout, *, check_finite: bool = True) -> Grads:
        if self._engine is not None:
            check_cache(cache, _SparseEngineCache, "SparseAttention")
            return self._engine.backward(cache.engine, dout, check_finite=check_finite)
        check_cache(cache, _SparseCache, "SparseAttention")
        dout = check_dout(dout, cache.out.shape, cache.out.dtype, check_finite=check_finite)
        return Grads(*_backward(cache, dout, self._index), {})

    def dense_mask(self, n, m=None):
        m = n if m is None else m
        if (n, m) != (self.n, self.m):
            raise ValueError(f"n, m must be the pattern's ({self.n}, {self.m}), got ({n}, {m})")
        if self.per_head:
            return np.stack([p.toarray() for p in self.patterns])              # (H, N, M)
        return self.patterns[0].toarray()

    def cost(self, n, d, dv=None, m=None, *, backward=False):
        dv = d if dv is None else dv
        m = n if m is None else m
        if (n, m) != (self.n, self.m):
            raise ValueError(f"n, m must be the pattern's ({self.n}, {self.m}), got ({n}, {m})")
        if self._engine is not None:
            return self._engine.cost(n, d, dv, m, backward=backward)
        nnz = -(-sum(self._index.nnz) // len(self.patterns))                # per head (mean, rounded up)
        if backward:
            return Cost(2 * nnz * (4 * d + 3 * dv), 2 * n * d + 2 * m * (d + dv) + 2 * n)
        return Cost(2 * nnz * (d + dv), n * dv + n + _longest(self._index))


def _engine_for(pattern, scale):
    """A :class:`~efficient_attention.blocksparse.BlockSparseAttention` for ``pattern`` when enough of
    its pairs lie in tiles (``config.ENGINE_MIN_TILED``), else None."""
    from .blocksparse import BlockMask, BlockSparseAttention
    if config.ENGINE_MIN_TILED > 1:
        return None
    core = BlockSparseAttention(BlockMask.from_pattern(pattern), scale=scale)
    n, m = core.mask.shape[-2:]
    mask, tiles, _ = core.plan(n, m)
    return core if tiles.nnz >= config.ENGINE_MIN_TILED * max(1, mask.nnz) else None


def _longest(index: _PatternIndex) -> int:
    return int(np.diff(index.indptr, axis=1).max(initial=0))


# --------------------------------------------------------------------------- global attention

class _GlobalCache(NamedTuple):
    parts: tuple          # ((rows, keys, dense_cache), ...) the dense sub-attentions
    shapes: tuple         # shapes of q, k, v
    out_shape: tuple
    dtype: np.dtype


class GlobalAttention(AttentionCore):
    r"""Global tokens: chosen tokens and/or added tokens that see everything and are seen by all.

    Parameters
    ----------
    indices : sequence of int
        Global positions ``G`` among the ``N`` tokens (unsorted and repeated
        entries allowed; each must be ``< N`` at call time).
    n_extra : int
        ``E`` added tokens (a CLS token is ``n_extra=1``), with learnable
        ``extra_q, extra_k`` ``(E, D)`` and ``extra_v`` ``(E, Dv)`` drawn
        ``N(0, 1)`` from ``seed`` as float64 (``d`` and ``dv`` then required).
    d, dv : int, optional
        Feature widths of the added tokens (``dv`` defaults to ``d``).
    seed : int
    scale : float, optional
        ``1/sqrt(D)`` when None.

    Notes
    -----
    The added tokens are *prepended* to the sequence and are global: the
    extended sequence has ``E + N`` tokens, queries ``[extra_q; q]``, keys
    ``[extra_k; k]``, values ``[extra_v; v]``, and the global set
    ``{0..E-1} ∪ (E + G)``. So

    * an original token ``i ∉ G`` attends to the ``E`` extra keys and the keys of ``G``;
    * an original token ``i ∈ G`` attends to the ``E`` extra keys and all ``N`` keys;
    * an added token attends to all ``E + N`` keys.

    ``forward(q, k, v)`` returns the ``N`` original tokens' outputs (which
    depend on ``extra_k``, ``extra_v`` but not on ``extra_q``), and
    ``forward_extra(q, k, v)`` the ``E`` added tokens' outputs ``(..., E, Dv)``
    (with ``backward_extra``). Both equal ``DenseAttention`` over the extended
    sequence with ``global_tokens(E + N, ...)`` as mask (rows ``E:`` resp.
    ``:E``); with ``n_extra = 0``, ``forward`` is ``DenseAttention`` with
    ``dense_mask(n) = global_tokens(n, indices)``. A token that is not global
    when there are no global tokens at all has no key: output 0.

    Computation: the pattern is two dense blocks, so it runs as two (three
    with ``forward_extra``) dense attentions through BLAS: non-global rows
    against the ``E + g`` global keys (``N × (E+g)`` scores) and global rows
    against all ``E + N`` keys (``g × (E+N)``): ``O(N·(E+g)·D)``.
    """

    def __init__(self, indices=(), n_extra: int = 0, d: int | None = None, dv: int | None = None,
                 seed: int = 0, scale: float | None = None):
        self.scale = check_scale(scale)
        self.indices = check_indices(indices, None, "indices")
        self.n_extra = check_int(n_extra, "n_extra", minimum=0)
        self.seed = check_int(seed, "seed", minimum=0)
        self._params = {}
        if self.n_extra:
            if d is None:
                raise ValueError("d must be given (the feature width of extra_q, extra_k) when n_extra > 0")
            d = check_int(d, "d", minimum=1)
            dv = d if dv is None else check_int(dv, "dv", minimum=1)
            rng = np.random.default_rng(self.seed)
            self._params = {"extra_q": rng.standard_normal((self.n_extra, d)),
                            "extra_k": rng.standard_normal((self.n_extra, d)),
                            "extra_v": rng.standard_normal((self.n_extra, dv))}
        self.d, self.dv = d, dv

    @property
    def params(self):
        return self._params

    def options(self):
        return {"indices": tuple(self.indices.tolist()), "n_extra": self.n_extra, "d": self.d,
                "dv": self.dv, "seed": self.seed, "scale": self.scale}

    # ---- the extended sequence
    def _extra(self, q, k, v):
        """extra_q, extra_k, extra_v broadcast to the batch axes, in the computation dtype."""
        batch = q.shape[:-2]
        e = self.n_extra
        if e and (q.shape[-1] != self.d or v.shape[-1] != self.dv):
            raise ValueError(f"q and v must have the widths (D, Dv) = ({self.d}, {self.dv}) of the extra "
                             f"tokens, got q {q.shape}, v {v.shape}")
        out = []
        for name, width in (("extra_q", q.shape[-1]), ("extra_k", q.shape[-1]), ("extra_v", v.shape[-1])):
            p = self._params[name].astype(q.dtype, copy=False) if e else np.zeros((0, width), q.dtype)
            out.append(np.broadcast_to(p, batch + p.shape))
        return out

    def _check(self, q, k, v, check_finite):
        q, k, v = check_qkv(q, k, v, check_finite=check_finite)
        n = q.shape[-2]
        if k.shape[-2] != n:
            raise ValueError(f"global attention is self-attention: q and k must have the same N, "
                             f"got q {q.shape}, k {k.shape}")
        if self.indices.size and self.indices[-1] >= n:
            raise ValueError(f"indices must lie in [0, N) = [0, {n}), got max {self.indices[-1]}")
        return q, k, v

    def _dense(self, q):
        return DenseAttention(scale=resolve_scale(self.scale, q.shape[-1]))

    @finite_policy
    def forward(self, q, k, v, *, check_finite: bool = True):
        q, k, v = self._check(q, k, v, check_finite)
        n, g = q.shape[-2], self.indices
        xq, xk, xv = self._extra(q, k, v)
        dense = self._dense(q)
        is_global = np.zeros(n, bool)
        is_global[g] = True
        rest = np.flatnonzero(~is_global)
        out = np.zeros(q.shape[:-1] + (v.shape[-1],), q.dtype)               # (..., N, Dv)
        parts = []
        # rows not in G: keys [extra; G]                                      (..., N-g, E+g)
        keys_g = (np.concatenate([xk, k[..., g, :]], -2), np.concatenate([xv, v[..., g, :]], -2))
        if rest.size and keys_g[0].shape[-2]:
            o, c = dense.forward(np.ascontiguousarray(q[..., rest, :]), *keys_g, check_finite=False)
            out[..., rest, :] = o
            parts.append(("rest", rest, c))
        # rows in G: keys [extra; all N]                                      (..., g, E+N)
        if g.size:
            o, c = dense.forward(np.ascontiguousarray(q[..., g, :]), np.concatenate([xk, k], -2),
                                 np.concatenate([xv, v], -2), check_finite=False)
            out[..., g, :] = o
            parts.append(("global", g, c))
        return out, _GlobalCache(tuple(parts), (q.shape, k.shape, v.shape), out.shape, q.dtype)

    @finite_policy
    def forward_extra(self, q, k, v, *, check_finite: bool = True):
        """The added tokens' outputs ``(..., E, Dv)`` (they attend to all ``E + N`` keys) and a cache
        for :meth:`backward_extra`."""
        if not self.n_extra:
            raise ValueError("forward_extra needs added tokens: n_extra must be > 0, got 0")
        q, k, v = self._check(q, k, v, check_finite)
        xq, xk, xv = self._extra(q, k, v)
        o, c = self._dense(q).forward(xq, np.concatenate([xk, k], -2), np.concatenate([xv, v], -2),
                                      check_finite=False)
        return o, _GlobalCache((("extra", None, c),), (q.shape, k.shape, v.shape), o.shape, q.dtype)

    def _backward(self, cache: _GlobalCache, dout, name: str, check_finite: bool) -> Grads:
        check_cache(cache, _GlobalCache, "GlobalAttention")
        dout = check_dout(dout, cache.out_shape, cache.dtype, name, check_finite=check_finite)
        (qs, ks, vs), e = cache.shapes, self.n_extra
        dq, dk, dv = np.zeros(qs, cache.dtype), np.zeros(ks, cache.dtype), np.zeros(vs, cache.dtype)
        dxq = np.zeros(qs[:-2] + (e, qs[-1]), cache.dtype)
        dxk = np.zeros(qs[:-2] + (e, qs[-1]), cache.dtype)
        dxv = np.zeros(vs[:-2] + (e, vs[-1]), cache.dtype)
        dense = DenseAttention()
        for kind, rows, c in cache.parts:
            if kind == "extra":
                g = dense.backward(c, dout, check_finite=False)
                dxq += g.dq
            else:
                g = dense.backward(c, dout[..., rows, :], check_finite=False)
                dq[..., rows, :] = g.dq
            dxk += g.dk[..., :e, :]
            dxv += g.dv[..., :e, :]
            if kind == "rest":                              # keys were [extra; G]
                dk[..., self.indices, :] += g.dk[..., e:, :]
                dv[..., self.indices, :] += g.dv[..., e:, :]
            else:                                           # keys were [extra; all N]
                dk += g.dk[..., e:, :]
                dv += g.dv[..., e:, :]
        params = {}
        if e:
            for name, grad in (("extra_q", dxq), ("extra_k", dxk), ("extra_v", dxv)):
                p = self._params[name]                      # broadcast over the batch: sum its axes
                params[name] = grad.reshape((-1,) + p.shape).sum(0).astype(p.dtype, copy=False)
        return Grads(dq, dk, dv, params)

    @finite_policy
    def backward(self, cache: _GlobalCache, dout, *, check_finite: bool = True) -> Grads:
        return self._backward(cache, dout, "dout", check_finite)

    @finite_policy
    def backward_extra(self, cache: _GlobalCache, dout_extra, *, check_finite: bool = True) -> Grads:
        """Gradients of ``sum(forward_extra(q, k, v)[0] * dout_extra)`` (``extra_q`` included)."""
        return self._backward(cache, dout_extra, "dout_extra", check_finite)

    def extended_mask(self, n: int) -> np.ndarray:
        """The ``(E+N, E+N)`` mask of the extended sequence ``[extra; original]``: the oracle of
        ``forward`` (rows ``E:``) and ``forward_extra`` (rows ``:E``) is ``DenseAttention`` over the
        concatenated queries, keys and values with this mask."""
        n = check_int(n, "n", minimum=0)
        g = check_indices(self.indices, n, "indices")
        return _patterns.global_tokens(n + self.n_extra,
                                       np.concatenate([np.arange(self.n_extra), g + self.n_extra])).toarray()

    def reference(self, q, k, v, dout):
        """``(out, dq, dk, dv)`` by ``DenseAttention`` in float64 over the extended sequence
        ``[extra; original]`` with :meth:`extended_mask`, restricted to the original tokens."""
        if not self.n_extra:
            return None
        q, k, v = self._check(q, k, v, False)
        e = self.n_extra
        xq, xk, xv = (np.asarray(a, np.float64) for a in self._extra(q, k, v))
        qe, ke, ve = (np.concatenate([x, np.asarray(a, np.float64)], -2) for x, a in ((xq, q), (xk, k), (xv, v)))
        dense = self._dense(q)
        out, cache = dense.forward(qe, ke, ve, mask=self.extended_mask(q.shape[-2]), check_finite=False)
        g_ext = np.zeros(out.shape)
        g_ext[..., e:, :] = dout
        g = dense.backward(cache, g_ext, check_finite=False)
        return out[..., e:, :], g.dq[..., e:, :], g.dk[..., e:, :], g.dv[..., e:, :]

    def dense_mask(self, n, m=None):
        m = n if m is None else m
        if m != n:
            raise ValueError(f"global attention is self-attention: m must equal n = {n}, got {m}")
        if self.n_extra:
            return None      # not a masked attention over q, k, v alone: see extended_mask
        return self.extended_mask(n)

    def cost(self, n, d, dv=None, m=None, *, backward=False):
        dv = d if dv is None else dv
        g = int(np.count_nonzero(self.indices < n))
        e = self.n_extra
        pairs = (n - g) * (e + g) + g * (e + n)                  # allowed (query, key) pairs
        if backward:
            return Cost(2 * pairs * (3 * d + 2 * dv), 2 * pairs + n * (2 * d + dv))
        return Cost(2 * pairs * (d + dv), pairs + n * dv + n)


# --------------------------------------------------------------------------- registry

def _bigbird_block(n: int) -> int:
    """The largest of 64, 32, ..., 1 dividing ``n`` that leaves at least 8 blocks."""
    return next((b for b in (64, 32, 16, 8, 4, 2) if n % b == 0 and n // b >= 8), 1)


def _sparse_random(n, d, dv, seed, per_row=64):
    return SparseAttention(_patterns.random(n, max(1, min(per_row, n // 4)), seed))


def _longformer(n, d, dv, seed, window=256, dilation=1):
    return SparseAttention(_patterns.longformer(n, max(1, min(window, n // 8)), [0], dilation))


def _bigbird(n, d, dv, seed, n_random_blocks=3, n_global_blocks=1):
    b = _bigbird_block(n)
    return SparseAttention(_patterns.bigbird(n, b, min(n_random_blocks, n // b), n_global_blocks, seed=seed))


def _global(n, d, dv, seed):
    return GlobalAttention(indices=(0, n // 2))


def _global_cls(n, d, dv, seed):
    return GlobalAttention(indices=(0,), n_extra=1, d=d, dv=dv, seed=seed)


def _register():
    from .core import register
    register("sparse_random", SparseAttention, chapter=1, factory=_sparse_random,
             description="random pattern: min(64, N/4) distinct keys per query")
    register("longformer", SparseAttention, chapter=1, factory=_longformer,
             description="Longformer: window min(256, N/8) each side + global token 0")
    register("longformer_dilated", SparseAttention, chapter=1, config={"dilation": 2}, factory=_longformer,
             description="Longformer with dilation 2: window min(256, N/8) keys each side, 2 apart, + global token 0")
    register("bigbird", SparseAttention, chapter=1, factory=_bigbird,
             description="BigBird: blocks of 64 (fewer for small N), 3 random + 3 window + 1 global block")
    register("global", GlobalAttention, chapter=1, factory=_global,
             description="global tokens 0 and N/2")
    register("global_cls", GlobalAttention, chapter=1, factory=_global_cls, exact=False,
             description="global token 0 plus one added learnable CLS token (output over the N original tokens)")


_register()
