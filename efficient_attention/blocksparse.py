r"""Chapter 1 — one engine, many masks: block-sparse FlashAttention on the CPU.

Every softmax pattern of this chapter — the full and the causal matrix, Longformer's window and
global tokens, BigBird's blocks, random keys, a different pattern per head, a document mask —
is a boolean matrix :math:`A \in \{0,1\}^{N\times M}` and the same computation,

.. math::

    s_{ij} = \text{scale}\; q_i\cdot k_j,\qquad
    \ell_i = \log \sum_{j: A_{ij}=1} e^{s_{ij}},\qquad
    o_i = \sum_{j: A_{ij}=1} e^{s_{ij}-\ell_i}\, v_j .

This module computes it for any ``A`` at the speed of dense tiles.

**The tile layout** (:class:`BlockMask`). Queries are cut into tiles of :math:`b_q` rows and keys
into tiles of :math:`b_k` columns. For each query tile :math:`I` the layout lists the key tiles
:math:`J` that hold at least one allowed entry, each marked *full* (every entry allowed: no
masking inside) or *partial* (with its boolean :math:`b_q\times b_k` tile; identical tiles are
stored once). Tiles with no allowed entry are never touched. ``density`` is the fraction of tiles
computed: a window of 64 keys on each side at :math:`N = 4096` with tiles of 64 needs 3 of the
64 key tiles of a row (0.046). The tile size is chosen per mask (``config.ENGINE_TILES``).

**Forward** (FlashAttention-2, Dao 2023, arXiv:2307.08691, Algorithm 1). For each query tile,
an online softmax over its key tiles, with a running row maximum :math:`m`, sum :math:`l` and
unnormalised output :math:`\tilde O`:

.. math::

    S = \text{scale}\; Q_I K_J^\top \ (\text{masked entries} = -\infty),\quad
    m' = \max(m, \operatorname{rowmax} S),\quad
    P = e^{S - m'},

    l \leftarrow e^{m - m'} l + \operatorname{rowsum} P,\quad
    \tilde O \leftarrow e^{m - m'} \tilde O + P V_J,\qquad
    \text{at the end: } O_I = \tilde O / l,\quad \ell_I = m + \log l .

Only :math:`O` and the per-row log-sum-exp :math:`\ell` are kept. The products are the engine's
own register-blocked tile products (:mod:`efficient_attention.kernels.tilemm`: vector FMAs on tile
views, no copies; the key tiles are read transposed), the exponentials the library's vectorised
float32 ``exp`` (:mod:`efficient_attention.kernels.fastexp`).

**Backward** (ibid., Algorithm 2). Probabilities are recomputed per tile from :math:`\ell`,
with :math:`\delta_i = dO_i\cdot O_i`:

.. math::

    P = e^{S - \ell},\quad dV_J \mathrel{+}= P^\top dO_I,\quad dP = dO_I V_J^\top,\quad
    dS = P \odot (dP - \delta),\quad dQ_I \mathrel{+}= \text{scale}\; dS\, K_J,\quad
    dK_J \mathrel{+}= \text{scale}\; dS^\top Q_I .

Parallel work never writes the same rows twice at once: with at least as many (batch, head)
slices as threads, each thread takes whole slices and walks their tiles (one pass); with fewer,
:math:`dQ` is a pass over query tiles and :math:`dK, dV` a pass over key tiles through the
transposed layout. Every sum runs in the same order in both schemes (over :math:`J` for
:math:`dQ_I`, over :math:`I` for :math:`dK_J, dV_J`), so the result is the same bits whatever
the number of threads.

**Fully masked rows** (no allowed key) keep :math:`m = -\infty`, :math:`l = 0`: their output is
0, their :math:`\ell = -\infty`, their probabilities and gradients 0 — no NaN, no warning.

**Complexity** per sequence and head, with :math:`T` computed tiles: FLOPs
:math:`2 T b_q b_k (D + D_v)` forward and :math:`2 T b_q b_k (3D + 2D_v)` backward
(the pattern's own :math:`2\,\mathrm{nnz}\,(D+D_v)` plus the masked entries of partial tiles);
memory :math:`O(N(D + D_v))` — the output, :math:`N` log-sum-exps and a few tiles per thread —
at any :math:`N`: no :math:`N\times M` array in the forward or the backward pass.

**Masks from functions.** :meth:`BlockMask.from_mask_mod` takes FlexAttention's
``mask_mod(b, h, q_idx, kv_idx)`` (He et al. 2024, arXiv:2412.05496 §3) and evaluates it with
NumPy broadcasting, a strip of query tiles at a time: ``q_idx`` of shape ``(R, 1)``, ``kv_idx``
``(1, M)``, ``b`` ``(B, 1, 1, 1)`` and ``h`` ``(H, 1, 1)`` (or 0 without batch / head axes). Porting
a FlexAttention mask means replacing ``torch`` operations by NumPy ones (``&`` and ``|`` work on
both; ``torch.where`` is ``np.where``); the strip is never more than ``config.ENGINE_BUILD_SCALARS`` booleans.

Settings (in :mod:`efficient_attention.config`, read at call time; measured on the 2-core
benchmark machine, see ``benchmarks/bench_blocksparse.py``):

``ENGINE_TILES``
    the tiles (``b_q``, ``b_k``) a :class:`BlockMask` chooses from when ``block_size`` is None,
    with their measured relative cost per computed pair: the layout is built with the finest
    tiles and coarsened (exactly) to the candidate that computes the fewest weighted pairs.
    128 × 128 for dense masks and wide windows (a float32 score tile is 64 KB; with the ``Q``
    and ``K`` tiles, 32 KB each at D = 64, it stays in the 1 MB L2 cache of a core), 64 × 64 for
    BigBird's blocks of 64 (no masked entry computed).
``ENGINE_BUILD_SCALARS``
    the largest number of booleans (or pattern entries) handled at once while a layout is built.
``ENGINE_PAIR_COST``
    the cost of an allowed pair on the row-CSR path of
    :class:`~efficient_attention.SparseAttention`, relative to a computed pair of a tile (a
    partial tile is computed on the bounding box of its allowed pairs: a global token's column
    crossing a tile costs one column). Thin partial tiles — a few random keys spread over a
    tile — are cheaper pair by pair: they are split off the layout and computed by the row-CSR kernels,
    and the two parts merged with their log-sum-exps (:math:`\ell = \log(e^{\ell_1} +
    e^{\ell_2})`, :math:`O = e^{\ell_1-\ell} O_1 + e^{\ell_2-\ell} O_2`; the backward of each
    part uses the merged :math:`\ell` and :math:`\delta`, so their gradients simply add).
``ENGINE_FUSED_MIN_SLICES_PER_THREAD``
    when the backward gives each thread whole (batch, head) slices (one pass over their tiles)
    rather than splitting the work into a query-tile pass and a key-tile pass.

References: Dao et al. 2022, FlashAttention, arXiv:2205.14135; Dao 2023, FlashAttention-2,
arXiv:2307.08691; He et al. 2024, FlexAttention, arXiv:2412.05496.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from . import config
from .core import AttentionCore, Cost, Grads
from .kernels import blocksparse as _k
from .kernels import sparse as _ksparse
from .validate import (check_bool, check_cache, check_csr, check_dout, check_int, check_patterns, check_qkv,
                       check_scale, finite_policy, resolve_scale)

__all__ = ["BlockMask", "BlockSparseAttention", "attention", "per_head_mask_mod"]



# ---------------------------------------------------------------------------------------------
# the tile layout

def _finest_tiles() -> tuple[int, int]:
    """The tile that every candidate of ``config.ENGINE_TILES`` is a multiple of (the layout is built with it)."""
    import math
    return (math.gcd(*(int(t[0]) for t in config.ENGINE_TILES)), math.gcd(*(int(t[1]) for t in config.ENGINE_TILES)))


def _block_size(block_size) -> tuple[int, int]:
    """``(b_q, b_k)`` from None (the finest of ``config.ENGINE_TILES``), an int or a pair, each >= 1."""
    if block_size is None:
        return _finest_tiles()
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a (query, key) pair, got {block_size!r}")
        pair = tuple(block_size)
    else:
        pair = (block_size, block_size)
    out = []
    for b in pair:
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, numbers.Integral):
            raise TypeError(f"block_size must be an int or a pair of ints, got {block_size!r}")
        if b <= 0:
            raise ValueError(f"block_size must be >= 1, got {block_size!r}")
        out.append(int(b))
    return out[0], out[1]


def _n_tiles(n: int, b: int) -> int:
    return -(-n // b)


def _valid_counts(n: int, m: int, bq: int, bk: int, rows_i, cols_j) -> np.ndarray:
    """Entries of tile ``(I, J)`` inside the ``(n, m)`` matrix (edge tiles are smaller)."""
    rq = np.minimum(bq, n - np.asarray(rows_i, np.int64) * bq)
    ck = np.minimum(bk, m - np.asarray(cols_j, np.int64) * bk)
    return rq * ck


def _unique_tiles(tiles: np.ndarray):
    """``(unique, inverse)`` of a stack of boolean tiles ``(T, bq, bk)`` (byte-packed first)."""
    if tiles.shape[0] == 0:
        return tiles, np.zeros(0, np.int64)
    packed = np.packbits(tiles.reshape(tiles.shape[0], -1), axis=1)
    _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
    return tiles[first], inverse.reshape(-1).astype(np.int64)


class _Blocks(NamedTuple):
    """Blocks of a layout being built: slice ``g``, query tile ``I``, key tile ``J``, and the
    index of the block's tile in ``tiles`` (``-1``: full)."""
    g: np.ndarray
    i: np.ndarray
    j: np.ndarray
    tile: np.ndarray
    tiles: np.ndarray      # (T, bq, bk) bool


def _empty_blocks(bq, bk) -> _Blocks:
    z = np.zeros(0, np.int64)
    return _Blocks(z, z, z, z, np.zeros((0, bq, bk), bool))


def _concat_blocks(parts: list, bq: int, bk: int) -> _Blocks:
    """One ``_Blocks`` from several (tile indices renumbered; identical tiles merged)."""
    if not parts:
        return _empty_blocks(bq, bk)
    offsets = np.cumsum([0] + [p.tiles.shape[0] for p in parts])
    tiles = np.concatenate([p.tiles for p in parts]) if offsets[-1] else np.zeros((0, bq, bk), bool)
    tile = np.concatenate([np.where(p.tile >= 0, p.tile + o, -1) for p, o in zip(parts, offsets)])
    tiles, inverse = _unique_tiles(tiles)
    tile = np.where(tile >= 0, inverse[np.maximum(tile, 0)] if inverse.size else -1, -1)
    return _Blocks(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("g", "i", "j")),
                   tile.astype(np.int64), tiles)


def _dense_strip_blocks(dense: np.ndarray, i0: int, n: int, m: int, bq: int, bk: int) -> _Blocks:
    """The blocks of query tiles ``i0, i0+1, ...`` from the boolean rows ``dense (G, R, M)``
    (``R`` a multiple of ``bq`` or the last rows of the matrix)."""
    g_count, r = dense.shape[:2]
    ti, nkb = _n_tiles(r, bq), _n_tiles(m, bk)
    count = np.zeros((g_count, ti, nkb), np.int64)
    _k.dense_tile_counts(np.ascontiguousarray(dense), bq, bk, count)   # allowed entries (G, ti, nkb)
    g, i, j = np.nonzero(count)
    full = count[g, i, j] == _valid_counts(n, m, bq, bk, i + i0, j)
    part = np.flatnonzero(~full)
    tiles = np.zeros((part.size, bq, bk), bool)
    for t0 in range(0, part.size, 4096):                                  # copy the partial tiles out
        for t in range(t0, min(part.size, t0 + 4096)):
            a0, c0 = i[part[t]] * bq, j[part[t]] * bk
            blk = dense[g[part[t]], a0:a0 + bq, c0:c0 + bk]
            tiles[t, :blk.shape[0], :blk.shape[1]] = blk
    tiles, inverse = _unique_tiles(tiles)
    tile = np.full(g.shape, -1, np.int64)
    tile[part] = inverse
    return _Blocks(g.astype(np.int64), (i + i0).astype(np.int64), j.astype(np.int64), tile, tiles)


def _csr_blocks(csr: sp.csr_array, g: int, bq: int, bk: int) -> _Blocks:
    """The blocks of one canonical ``(N, M)`` pattern (slice ``g``), built in chunks of at most
    ``config.ENGINE_BUILD_SCALARS`` tiles (one pass of a kernel over the entries)."""
    n, m = csr.shape
    nqb, nkb = _n_tiles(n, bq), _n_tiles(m, bk)
    indptr = csr.indptr.astype(np.int64, copy=False)
    indices = csr.indices
    rows_per_chunk = max(1, int(config.ENGINE_BUILD_SCALARS) // max(nkb, 1))         # tile rows per chunk
    parts = []
    for t0 in range(0, nqb, rows_per_chunk):
        t1 = min(nqb, t0 + rows_per_chunk)
        r0, r1 = t0 * bq, min(t1 * bq, n)
        count = np.zeros((t1 - t0, nkb), np.int64)
        _k.csr_tile_counts(indptr, indices, r0, r1, bq, bk, count)
        bi, bj = np.nonzero(count)
        full = count[bi, bj] == _valid_counts(n, m, bq, bk, bi + t0, bj)
        pid = np.full(count.shape, -1, np.int64)
        pid[bi[~full], bj[~full]] = np.arange(int((~full).sum()))
        tiles = np.zeros((int((~full).sum()), bq, bk), bool)
        _k.csr_fill_tiles(indptr, indices, r0, r1, bq, bk, pid, tiles)
        tiles, inverse = _unique_tiles(tiles)
        tile = np.full(bi.shape, -1, np.int64)
        tile[~full] = inverse
        parts.append(_Blocks(np.full(bi.shape, g, np.int64), (bi + t0).astype(np.int64), bj.astype(np.int64),
                             tile, tiles))
    return _concat_blocks(parts, bq, bk)


def _all_blocks(n, m, block_size):
    """``(n, m, b_q, b_k, i, j)``: validated sizes and the tile coordinates of every block of an
    ``(N, M)`` grid, query tile by query tile."""
    n = check_int(n, "n", minimum=1)
    m = n if m is None else check_int(m, "m", minimum=1)
    bq, bk = _block_size(block_size)
    nqb, nkb = _n_tiles(n, bq), _n_tiles(m, bk)
    return (n, m, bq, bk, np.repeat(np.arange(nqb, dtype=np.int64), nkb),
            np.tile(np.arange(nkb, dtype=np.int64), nqb))


def _chosen(block_size, bm: "BlockMask") -> "BlockMask":
    """``bm`` itself when ``block_size`` was given; else coarsened to the best of ``config.ENGINE_TILES``."""
    if block_size is not None:
        return bm
    best, best_cost = None, None
    for bq, bk, cost in config.ENGINE_TILES:
        fq, fk = bq // bm._bq, bk // bm._bk
        area, nnz = bm._coarse_pairs(fq, fk, per_block=True)
        # a tile costs cost·area, or nnz·config.ENGINE_PAIR_COST when it is cheaper pair by pair (thin)
        weighted = float(np.minimum(area * float(cost), nnz * float(config.ENGINE_PAIR_COST)).sum())
        if best is None or weighted < best_cost:
            best, best_cost = (fq, fk), weighted
    return bm._coarsen(*best)


def _lookup(sorted_keys: np.ndarray, values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """``values`` at the position of each of ``keys`` in ``sorted_keys`` (unique), -2 where absent."""
    out = np.full(keys.shape, -2, np.int64)
    if sorted_keys.size:
        pos = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
        hit = sorted_keys[pos] == keys
        out[hit] = values[pos[hit]]
    return out


def _canonical_csr(pattern, n: int, m: int, name: str):
    """``pattern`` as a canonical boolean CSR: used as it is (no copy) when it already is one
    (the builders of :mod:`~efficient_attention.patterns` return such; copying a 2**20-token
    window pattern takes longer than building its layout) and its index arrays are in range;
    otherwise through :func:`~efficient_attention.validate.check_csr` (validated, copied, sorted)."""
    if (sp.issparse(pattern) and pattern.format == "csr" and pattern.ndim == 2
            and tuple(pattern.shape) == (n, m) and pattern.dtype == np.bool_):
        indptr, indices = np.asarray(pattern.indptr), np.asarray(pattern.indices)
        nnz = int(indptr[-1]) if indptr.size else -1
        if (indptr.ndim == 1 and indptr.size == n + 1 and indptr[0] == 0 and indices.ndim == 1
                and indices.size == nnz and np.asarray(pattern.data).size == nnz
                and indptr.dtype.kind in "iu" and indices.dtype.kind in "iu"
                and _k.csr_is_canonical(indptr.astype(np.int64, copy=False), indices, m)
                and np.asarray(pattern.data).all()):
            return pattern
    return check_csr(pattern, n, m, name)


class BlockMask:
    r"""The tile layout of a boolean attention mask: for each query tile, the key tiles it needs,
    each full (no masking inside) or partial (with its boolean tile).

    Build it with :meth:`from_pattern` (a ``scipy.sparse`` pattern or one per head),
    :meth:`from_mask_mod` (FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``), :meth:`from_dense`
    (a boolean array) or :meth:`causal`; combine with ``&`` and ``|``.

    Notes
    -----
    ``shape`` is ``(N, M)``, ``(H, N, M)`` (one mask per head, axis -3 of ``q, k, v``) or
    ``(B, H, N, M)`` (per batch entry and head, axes -4 and -3); ``block_size`` is ``(b_q, b_k)``,
    the query rows and key columns of a tile; ``density`` the fraction of tiles computed.
    Identical partial tiles are stored once (a sliding window has two distinct ones), so the
    layout of a ``2**20``-token window pattern takes a few MB. A mask is used with
    :class:`BlockSparseAttention` (whose tiles are the mask's tiles) or :func:`attention`.

    Examples
    --------
    >>> import efficient_attention as ea
    >>> bm = ea.BlockMask.from_mask_mod(lambda b, h, q, kv: abs(q - kv) <= 64, 4096)
    >>> bm.shape, bm.block_size, round(bm.density, 3)
    ((4096, 4096), (64, 64), 0.046)
    """

    def __init__(self, shape, block_size, indptr, cols, tile, tiles):
        """Low level: use the ``from_*`` constructors. ``indptr`` (G·nqb + 1,), ``cols`` and
        ``tile`` (one per block, rows sorted by key tile; ``tile = -1`` full) and ``tiles``
        ``(T, b_q, b_k)`` bool, canonical (no empty or all-allowed partial tile)."""
        self._shape = tuple(int(s) for s in shape)
        self._bq, self._bk = block_size
        self._indptr = indptr
        self._cols = cols
        self._tile = tile
        self._tiles = np.ascontiguousarray(tiles, dtype=bool)
        self._transposed = None
        self._box_cache = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def _from_blocks(cls, lead: tuple, n: int, m: int, bq: int, bk: int, blocks: _Blocks) -> "BlockMask":
        nqb = _n_tiles(n, bq)
        g_count = int(np.prod(lead, dtype=np.int64)) if lead else 1
        row = blocks.g * nqb + blocks.i
        order = np.lexsort((blocks.j, row))
        row, cols, tile = row[order], blocks.j[order], blocks.tile[order]
        indptr = np.zeros(g_count * nqb + 1, np.int64)
        np.cumsum(np.bincount(row, minlength=g_count * nqb), out=indptr[1:])
        # drop tiles no block uses any more, renumber
        used = np.unique(tile[tile >= 0])
        renum = np.full(blocks.tiles.shape[0], -1, np.int64)
        renum[used] = np.arange(used.size)
        tile = np.where(tile >= 0, renum[np.maximum(tile, 0)] if renum.size else -1, -1).astype(np.int64)
        return cls(lead + (n, m), (bq, bk), indptr, cols.astype(np.int64), tile, blocks.tiles[used])

    @classmethod
    def from_pattern(cls, pattern, block_size=None) -> "BlockMask":
        """The layout of a ``scipy.sparse`` ``(N, M)`` pattern (True / stored = may attend), or of
        a list of them, one per head (shape ``(H, N, M)``).

        Vectorised over entries, in chunks of ``config.ENGINE_BUILD_SCALARS``: ``patterns.local(2**20, 256)``
        (5.4·10⁸ entries) takes seconds. Index arrays are validated first
        (:func:`~efficient_attention.validate.check_csr`).
        """
        bq, bk = _block_size(block_size)
        pats, (n, m), per_head = check_patterns(pattern)
        csrs = [_canonical_csr(p, n, m, f"pattern[{h}]" if per_head else "pattern") for h, p in enumerate(pats)]
        lead = (len(csrs),) if per_head else ()
        blocks = _concat_blocks([_csr_blocks(c, g, bq, bk) for g, c in enumerate(csrs)], bq, bk)
        return _chosen(block_size, cls._from_blocks(lead, n, m, bq, bk, blocks))

    @classmethod
    def from_dense(cls, mask, block_size=None) -> "BlockMask":
        """The layout of a boolean array of shape ``(N, M)``, ``(H, N, M)`` or ``(B, H, N, M)``."""
        bq, bk = _block_size(block_size)
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be a boolean array (True = may attend), got dtype {mask.dtype}")
        if not 2 <= mask.ndim <= 4:
            raise ValueError(f"mask must have shape (N, M), (H, N, M) or (B, H, N, M), got {mask.shape}")
        lead, (n, m) = mask.shape[:-2], mask.shape[-2:]
        flat = mask.reshape((-1, n, m))
        step = max(1, int(config.ENGINE_BUILD_SCALARS) // max(1, flat.shape[0] * m * bq)) * bq
        parts = [_dense_strip_blocks(flat[:, r0:r0 + step], r0 // bq, n, m, bq, bk)
                 for r0 in range(0, n, step)]
        return _chosen(block_size, cls._from_blocks(tuple(lead), n, m, bq, bk, _concat_blocks(parts, bq, bk)))

    @classmethod
    def from_mask_mod(cls, mask_mod, n: int, m: int | None = None, *, batch: int | None = None,
                      heads: int | None = None, block_size=None) -> "BlockMask":
        """The layout of FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

        ``mask_mod`` is called with NumPy int64 arrays that broadcast: ``b`` of shape
        ``(B, 1, 1, 1)`` (``batch`` given) or the integer 0, ``h`` ``(H, 1, 1)`` (``heads`` given)
        or 0, ``q_idx`` ``(R, 1)`` for a strip of ``R`` queries, ``kv_idx`` ``(1, M)``; it must
        return a boolean array that broadcasts to ``(B, H, R, M)`` (fewer axes without batch /
        heads). The strip height ``R`` is a multiple of the query tile chosen so that a strip
        holds at most ``config.ENGINE_BUILD_SCALARS`` booleans: an ``N × M`` array is never formed.
        The shape is ``(N, M)``, ``(H, N, M)`` or ``(B, H, N, M)``.
        """
        if not callable(mask_mod):
            raise TypeError(f"mask_mod must be a callable mask_mod(b, h, q_idx, kv_idx), got "
                            f"{type(mask_mod).__name__}")
        n = check_int(n, "n", minimum=1)
        m = n if m is None else check_int(m, "m", minimum=1)
        batch = check_int(batch, "batch", minimum=1, allow_none=True)
        heads = check_int(heads, "heads", minimum=1, allow_none=True)
        if batch is not None and heads is None:
            heads = 1
        bq, bk = _block_size(block_size)
        lead = ((batch,) if batch is not None else ()) + ((heads,) if heads is not None else ())
        g_count = int(np.prod(lead, dtype=np.int64)) if lead else 1
        b = np.arange(batch, dtype=np.int64).reshape(-1, 1, 1, 1) if batch is not None else 0
        h = np.arange(heads, dtype=np.int64).reshape(-1, 1, 1) if heads is not None else 0
        kv_idx = np.arange(m, dtype=np.int64)[None, :]
        step = max(1, int(config.ENGINE_BUILD_SCALARS) // max(1, g_count * m * bq)) * bq
        parts = []
        for r0 in range(0, n, step):
            q_idx = np.arange(r0, min(n, r0 + step), dtype=np.int64)[:, None]
            target = lead + (q_idx.shape[0], m)
            res = mask_mod(b, h, q_idx, kv_idx)
            res = np.asarray(res)
            if res.dtype != np.bool_:
                raise TypeError(f"mask_mod must return a boolean array (True = may attend), got dtype "
                                f"{res.dtype} (compare, e.g. 'q_idx >= kv_idx', rather than returning numbers)")
            try:
                shape = np.broadcast_shapes(res.shape, target)
            except ValueError:
                shape = None
            if shape != target:
                raise ValueError(f"mask_mod must return an array that broadcasts to {target} "
                                 f"((B, H,) q_idx rows, kv_idx columns) for b {np.shape(b)}, h {np.shape(h)}, "
                                 f"q_idx {q_idx.shape}, kv_idx {kv_idx.shape}; got shape {res.shape}")
            strip = np.broadcast_to(res, target).reshape((g_count,) + target[-2:])
            parts.append(_dense_strip_blocks(strip, r0 // bq, n, m, bq, bk))
        return _chosen(block_size, cls._from_blocks(lead, n, m, bq, bk, _concat_blocks(parts, bq, bk)))

    @classmethod
    def causal(cls, n: int, m: int | None = None, block_size=None) -> "BlockMask":
        """The causal mask ``j <= i`` of shape ``(N, M)`` (only the diagonal tiles are evaluated)."""
        n, m, bq, bk, i, j = _all_blocks(n, m, block_size)
        first_i = i * bq
        last_i = np.minimum(first_i + bq, n) - 1
        first_j, last_j = j * bk, np.minimum(j * bk + bk, m) - 1
        keep = first_j <= last_i                                            # some j <= i in the tile
        full = keep & (last_j <= first_i)
        part = keep & ~full
        a = np.arange(bq)[None, :, None]
        c = np.arange(bk)[None, None, :]
        tiles = (first_j[part, None, None] + c <= first_i[part, None, None] + a) \
            & (first_i[part, None, None] + a < n) & (first_j[part, None, None] + c < m)
        tiles, inverse = _unique_tiles(tiles)
        tile = np.full(i.shape, -1, np.int64)
        tile[part] = inverse
        blocks = _Blocks(np.zeros(int(keep.sum()), np.int64), i[keep], j[keep], tile[keep], tiles)
        return _chosen(block_size, cls._from_blocks((), n, m, bq, bk, blocks))

    # -- description --------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        """``(N, M)``, ``(H, N, M)`` or ``(B, H, N, M)``."""
        return self._shape

    @property
    def block_size(self) -> tuple:
        """``(b_q, b_k)``: query rows and key columns of a tile."""
        return (self._bq, self._bk)

    @property
    def _lead(self) -> tuple:
        return self._shape[:-2]

    @property
    def _grid(self) -> tuple:
        """``(G, nqb, nkb)``: mask slices, query tiles, key tiles."""
        n, m = self._shape[-2:]
        g = int(np.prod(self._lead, dtype=np.int64)) if self._lead else 1
        return g, _n_tiles(n, self._bq), _n_tiles(m, self._bk)

    @property
    def n_blocks(self) -> int:
        """Tiles computed (full and partial, over every slice)."""
        return int(self._cols.size)

    @property
    def n_partial(self) -> int:
        """Partial tiles among them (those that need their boolean tile)."""
        return int(np.count_nonzero(self._tile >= 0))

    @property
    def density(self) -> float:
        """Fraction of tiles computed: ``n_blocks / (G · ceil(N/b_q) · ceil(M/b_k))``."""
        g, nqb, nkb = self._grid
        return self.n_blocks / max(1, g * nqb * nkb)

    def computed_pairs(self) -> int:
        """Scalar (query, key) pairs in the computed tiles, per mask slice on average (edge tiles
        counted at their real size, partial tiles at their bounding box's): the work of the
        engine, ``>= nnz`` of the mask."""
        return int(self._box_area().sum()) // max(1, self._grid[0])

    def __repr__(self) -> str:
        return (f"BlockMask(shape={self._shape}, block_size={self.block_size}, density={self.density:.3g}, "
                f"tiles: {self.n_blocks - self.n_partial} full, {self.n_partial} partial, "
                f"{self._tiles.shape[0]} distinct)")

    # -- the blocks as arrays -----------------------------------------------------------------
    def _blocks(self) -> _Blocks:
        g_count, nqb, _ = self._grid
        row = np.repeat(np.arange(g_count * nqb, dtype=np.int64), np.diff(self._indptr))
        return _Blocks(row // nqb, row % nqb, self._cols, self._tile, self._tiles)

    def _block_tiles(self, sel=slice(None)) -> np.ndarray:
        """The boolean tile of each selected block (full blocks: the in-range part)."""
        blk = self._blocks()
        i, j, tile = blk.i[sel], blk.j[sel], blk.tile[sel]
        n, m = self._shape[-2:]
        a = np.arange(self._bq)[None, :, None]
        c = np.arange(self._bk)[None, None, :]
        out = (i[:, None, None] * self._bq + a < n) & (j[:, None, None] * self._bk + c < m)
        part = tile >= 0
        out[part] = self._tiles[tile[part]]
        return out

    def _transposed_layout(self):
        """Key-major layout: ``(tindptr (G·nkb + 1,), query tile of each entry, tile index)``,
        entries of a key tile sorted by query tile (the order of the row-major pass)."""
        if self._transposed is None:
            g_count, nqb, nkb = self._grid
            blk = self._blocks()
            trow = blk.g * nkb + blk.j
            order = np.lexsort((blk.i, trow))
            tindptr = np.zeros(g_count * nkb + 1, np.int64)
            np.cumsum(np.bincount(trow, minlength=g_count * nkb), out=tindptr[1:])
            self._transposed = (tindptr, blk.i[order].astype(np.int64), blk.tile[order].astype(np.int64))
        return self._transposed

    # -- tile size --------------------------------------------------------------------------------
    def _coarse_keys(self, fq: int, fk: int):
        """Blocks of the coarser layout with tiles ``(fq·b_q, fk·b_k)``: ``(keys, inverse)``."""
        g_count, nqb, nkb = self._grid
        n, m = self._shape[-2:]
        nqb2, nkb2 = _n_tiles(n, self._bq * fq), _n_tiles(m, self._bk * fk)
        blk = self._blocks()
        key = (blk.g * nqb2 + blk.i // fq) * nkb2 + blk.j // fk
        keys, inverse = np.unique(key, return_inverse=True)
        return keys, inverse.reshape(-1), nqb2, nkb2

    def _coarse_pairs(self, fq: int, fk: int, per_block: bool = False):
        """(query, key) pairs in the tiles of the coarser layout ``(fq·b_q, fk·b_k)`` (whole tiles:
        what :func:`_chosen` weighs); with ``per_block`` those and the allowed pairs of each of
        its blocks."""
        keys, inverse, nqb2, nkb2 = self._coarse_keys(fq, fk)
        n, m = self._shape[-2:]
        # whole tiles, not their boxes: the tile sizes' costs (config.ENGINE_TILES) were measured so
        area = _valid_counts(n, m, self._bq * fq, self._bk * fk, keys // nkb2 % nqb2, keys % nkb2)
        if not per_block:
            return int(area.sum())
        return area, np.bincount(inverse, weights=self._block_nnz(), minlength=keys.size)

    def _block_nnz(self) -> np.ndarray:
        """Allowed pairs of each block."""
        blk = self._blocks()
        n, m = self._shape[-2:]
        out = _valid_counts(n, m, self._bq, self._bk, blk.i, blk.j)
        part = blk.tile >= 0
        if part.any():
            per_tile = self._tiles.reshape(self._tiles.shape[0], -1).sum(axis=1)
            out[part] = per_tile[blk.tile[part]]
        return out

    def _boxes(self) -> np.ndarray:
        """``(T, 4)`` int64: rows ``a0:a1`` and columns ``c0:c1`` of each partial tile's bounding
        box (the kernels compute a partial tile on its box alone: a tile holding a global token's
        column costs one column, not the tile)."""
        if self._box_cache is None:
            rows, cols = self._tiles.any(axis=2), self._tiles.any(axis=1)          # (T, b_q), (T, b_k)
            boxes = np.zeros((self._tiles.shape[0], 4), np.int64)
            for at, used in ((0, rows), (2, cols)):
                some = used.any(axis=1)
                boxes[:, at] = np.where(some, np.argmax(used, axis=1), 0)
                boxes[:, at + 1] = np.where(some, used.shape[1] - np.argmax(used[:, ::-1], axis=1), 0)
            self._box_cache = boxes
        return self._box_cache

    def _box_area(self) -> np.ndarray:
        """Pairs each block computes: its area inside the matrix when full, its tile's bounding
        box (cut to the matrix) when partial."""
        blk = self._blocks()
        n, m = self._shape[-2:]
        area = _valid_counts(n, m, self._bq, self._bk, blk.i, blk.j)
        part = blk.tile >= 0
        if part.any():
            b = self._boxes()[blk.tile[part]]
            rows = np.minimum(b[:, 1], n - blk.i[part] * self._bq) - b[:, 0]
            cols = np.minimum(b[:, 3], m - blk.j[part] * self._bk) - b[:, 2]
            area[part] = np.maximum(rows, 0) * np.maximum(cols, 0)
        return area

    def _select(self, keep: np.ndarray) -> "BlockMask":
        """The mask made of the blocks where ``keep`` (one bool per block) holds."""
        blk = self._blocks()
        n, m = self._shape[-2:]
        return BlockMask._from_blocks(self._lead, n, m, self._bq, self._bk,
                                      _Blocks(blk.g[keep], blk.i[keep], blk.j[keep], blk.tile[keep], blk.tiles))

    def _split_thin(self, tile_cost: float = 1.0):
        """``(tiles, thin)``: the blocks worth a tile, and the thin partial ones (``nnz ·
        config.ENGINE_PAIR_COST < tile_cost · area`` of their box) to be computed pair by pair."""
        blk = self._blocks()
        thin = (blk.tile >= 0) & (self._block_nnz() * float(config.ENGINE_PAIR_COST)
                                  < self._box_area() * float(tile_cost))
        return self._select(~thin), self._select(thin)

    def _coarsen(self, fq: int, fk: int) -> "BlockMask":
        """The same mask with tiles ``(fq·b_q, fk·b_k)`` (exact: a coarse tile is computed iff one of
        its sub-tiles is, full iff all its sub-tiles inside the matrix are full)."""
        if (fq, fk) == (1, 1):
            return self
        g_count, nqb, nkb = self._grid
        n, m = self._shape[-2:]
        bq, bk = self._bq, self._bk
        keys, inverse, nqb2, nkb2 = self._coarse_keys(fq, fk)
        blk = self._blocks()
        g2, i2, j2 = keys // (nqb2 * nkb2), keys // nkb2 % nqb2, keys % nkb2
        # the tile of every sub-position: -2 absent, -1 full (or outside the matrix), else its index
        sig = np.full((keys.size, fq * fk), -2, np.int64)
        sig[inverse, (blk.i % fq) * fk + blk.j % fk] = blk.tile
        sub_i = i2[:, None] * fq + np.arange(fq * fk)[None, :] // fk
        sub_j = j2[:, None] * fk + np.arange(fq * fk)[None, :] % fk
        sig[(sub_i >= nqb) | (sub_j >= nkb)] = -1
        full = np.all(sig == -1, axis=1)
        tile = np.full(keys.size, -1, np.int64)
        part = np.flatnonzero(~full)
        edge = np.stack([i2[part] == nqb2 - 1, j2[part] == nkb2 - 1], 1).astype(np.int64)
        combos, which = np.unique(np.concatenate([sig[part], edge], 1), axis=0, return_inverse=True)
        which = which.reshape(-1)
        tiles = np.zeros((combos.shape[0], bq * fq, bk * fk), bool)
        first = np.zeros(combos.shape[0], np.int64)
        first[which] = part                                              # a coarse block of each combo
        for c in range(combos.shape[0]):
            e = first[c]
            for s_ in range(fq * fk):
                a, b = s_ // fk, s_ % fk
                t = combos[c, s_]
                rows = slice(a * bq, (a + 1) * bq)
                cols = slice(b * bk, (b + 1) * bk)
                if t >= 0:
                    tiles[c, rows, cols] = self._tiles[t]
                elif t == -1:
                    r_in = min(bq, n - (i2[e] * fq + a) * bq)
                    c_in = min(bk, m - (j2[e] * fk + b) * bk)
                    if r_in > 0 and c_in > 0:
                        tiles[c, a * bq:a * bq + r_in, b * bk:b * bk + c_in] = True
        tiles, inv = _unique_tiles(tiles)
        tile[part] = inv[which]
        blocks = _Blocks(g2, i2, j2, tile, tiles)
        return BlockMask._from_blocks(self._lead, n, m, bq * fq, bk * fk, blocks)

    # -- conversions ----------------------------------------------------------------------------
    def tile_map(self, head: int = 0) -> np.ndarray:
        """The ``(N/b_q, M/b_k)`` tile grid of slice ``head`` (a head, or batch × head flattened) as
        the engine computes it: 0 skipped, 1 full, 2 partial, 3 thin (a partial tile computed pair
        by pair, see ``config.ENGINE_PAIR_COST``). What :func:`efficient_attention.plot.plot_tiles`
        draws."""
        n, m = self.shape[-2:]
        g_count, nqb, nkb = self._grid
        if not 0 <= head < g_count:
            raise ValueError(f"head must lie in [0, {g_count}), got {head}")
        _, tiles, _ = BlockSparseAttention(self).plan(n, m, self.shape[:-2])
        kinds = np.zeros((nqb, nkb), np.int64)
        blk = self._blocks()
        sel = blk.g == head
        kinds[blk.i[sel], blk.j[sel]] = 3                               # thin unless tiled below
        blk = tiles._blocks()
        sel = blk.g == head
        kinds[blk.i[sel], blk.j[sel]] = np.where(blk.tile[sel] < 0, 1, 2)
        return kinds

    def to_dense(self) -> np.ndarray:
        """The boolean mask of shape :attr:`shape` (an ``N × M`` array per slice: small masks only)."""
        g_count, nqb, nkb = self._grid
        n, m = self._shape[-2:]
        full = np.zeros((g_count, nqb, self._bq, nkb, self._bk), bool)
        blk = self._blocks()
        full.transpose(0, 1, 3, 2, 4)[blk.g, blk.i, blk.j] = self._block_tiles()
        return full.reshape(g_count, nqb * self._bq, nkb * self._bk)[:, :n, :m].reshape(self._shape)

    def to_pattern(self):
        """The mask as ``scipy.sparse.csr_array`` ``(N, M)``; a list of them for ``(H, N, M)``
        (one per head), a list of lists for ``(B, H, N, M)``."""
        g_count, nqb, _ = self._grid
        n, m = self._shape[-2:]
        blk = self._blocks()
        per_block = max(1, int(config.ENGINE_BUILD_SCALARS) // (self._bq * self._bk))
        rows, cols, gs = [], [], []
        for s in range(0, blk.g.size, per_block):
            sel = slice(s, s + per_block)
            e, a, c = np.nonzero(self._block_tiles(sel))
            rows.append(blk.i[sel][e] * self._bq + a)
            cols.append(blk.j[sel][e] * self._bk + c)
            gs.append(blk.g[sel][e])
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        gs = np.concatenate(gs) if gs else np.zeros(0, np.int64)
        cuts = np.searchsorted(gs, np.arange(g_count + 1))               # blocks are sorted by g
        pats = []
        for g in range(g_count):
            r, c = rows[cuts[g]:cuts[g + 1]], cols[cuts[g]:cuts[g + 1]]
            p = sp.csr_array((np.ones(r.size, bool), (r, c)), shape=(n, m))
            p.sum_duplicates()
            p.sort_indices()
            pats.append(p)
        if not self._lead:
            return pats[0]
        if len(self._lead) == 1:
            return pats
        h = self._lead[1]
        return [pats[b * h:(b + 1) * h] for b in range(self._lead[0])]

    # -- algebra -----------------------------------------------------------------------------------
    def _expanded(self, lead: tuple) -> _Blocks:
        """Blocks with slices numbered over the broadcast leading shape ``lead``."""
        blk = self._blocks()
        g_new = np.arange(int(np.prod(lead, dtype=np.int64)) if lead else 1).reshape(lead or ())
        own = np.broadcast_to(np.arange(self._grid[0]).reshape(self._lead or ()), lead or ()).reshape(-1)
        g_new = g_new.reshape(-1)
        order = np.argsort(own, kind="stable")                          # new slices of each own slice
        counts = np.bincount(own, minlength=self._grid[0])
        starts = np.concatenate([[0], np.cumsum(counts)])
        parts_g, idx = [], []
        for g_own in range(self._grid[0]):
            mine = np.flatnonzero(blk.g == g_own)
            for g in g_new[order[starts[g_own]:starts[g_own + 1]]]:
                parts_g.append(np.full(mine.size, g, np.int64))
                idx.append(mine)
        idx = np.concatenate(idx) if idx else np.zeros(0, np.int64)
        gg = np.concatenate(parts_g) if parts_g else np.zeros(0, np.int64)
        return _Blocks(gg, blk.i[idx], blk.j[idx], blk.tile[idx], blk.tiles)

    def _combine(self, other, op: str) -> "BlockMask":
        if not isinstance(other, BlockMask):
            return NotImplemented
        if self._shape[-2:] != other._shape[-2:] or self.block_size != other.block_size:
            raise ValueError(f"masks must have the same (N, M) and block_size to be combined, got "
                             f"{self._shape} {self.block_size} and {other._shape} {other.block_size}")
        try:
            lead = np.broadcast_shapes(self._lead, other._lead)
        except ValueError:
            raise ValueError(f"masks must have leading (batch, head) axes that broadcast, got "
                             f"{self._shape} and {other._shape}") from None
        if len(lead) > 2:
            raise ValueError(f"a mask has at most batch and head axes, got {lead}")
        n, m = self._shape[-2:]
        bq, bk = self.block_size
        _, nqb, nkb = self._grid
        a, b = self._expanded(lead), other._expanded(lead)
        ka = (a.g * nqb + a.i) * nkb + a.j
        kb = (b.g * nqb + b.i) * nkb + b.j
        keys = np.union1d(ka, kb) if op == "|" else np.intersect1d(ka, kb)
        # tile of each side: -1 full, -2 absent, else the side's tile index
        ta = _lookup(ka, a.tile, keys)
        tb = _lookup(kb, b.tile, keys)
        n_a = a.tiles.shape[0]
        tiles = np.concatenate([a.tiles, b.tiles])                        # b's tiles shifted by n_a
        tile = np.full(keys.shape, -1, np.int64)
        if op == "|":
            # full if either is full; one side absent: the other's tile
            tile = np.where(tb == -2, ta, np.where(ta == -2, np.where(tb >= 0, tb + n_a, -1), -1))
            tile = np.where((ta == -1) | (tb == -1), -1, tile)
            both = (ta >= 0) & (tb >= 0)
        else:
            tile = np.where(ta == -1, np.where(tb >= 0, tb + n_a, -1), ta)
            both = (ta >= 0) & (tb >= 0)
        g_all = keys // (nqb * nkb)
        i_all = keys // nkb % nqb
        j_all = keys % nkb
        keep = np.ones(keys.shape, bool)
        if both.any():
            pairs, inverse = np.unique(np.stack([ta[both], tb[both]], 1), axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            ta_t, tb_t = a.tiles[pairs[:, 0]], b.tiles[pairs[:, 1]]
            combos = (ta_t | tb_t) if op == "|" else (ta_t & tb_t)
            count = combos.sum(axis=(1, 2))[inverse]
            valid = _valid_counts(n, m, bq, bk, i_all[both], j_all[both])
            new = np.where(count == valid, -1, tiles.shape[0] + inverse)
            keep[np.flatnonzero(both)[count == 0]] = False
            tile[both] = new
            tiles = np.concatenate([tiles, combos])
        blocks = _Blocks(g_all[keep], i_all[keep], j_all[keep], tile[keep], tiles)
        tiles_u, inv = _unique_tiles(blocks.tiles)
        t = np.where(blocks.tile >= 0, inv[np.maximum(blocks.tile, 0)] if inv.size else -1, -1)
        return BlockMask._from_blocks(tuple(lead), n, m, bq, bk, blocks._replace(tile=t, tiles=tiles_u))

    def __and__(self, other):
        return self._combine(other, "&")

    def __or__(self, other):
        return self._combine(other, "|")

    @classmethod
    def full(cls, n: int, m: int | None = None, block_size=None) -> "BlockMask":
        """Every key for every query (dense attention): all tiles full."""
        n, m, bq, bk, i, j = _all_blocks(n, m, block_size)
        blocks = _Blocks(np.zeros(i.size, np.int64), i, j, np.full(i.size, -1, np.int64),
                         np.zeros((0, bq, bk), bool))
        return _chosen(block_size, cls._from_blocks((), n, m, bq, bk, blocks))

    @property
    def nnz(self) -> int:
        """Allowed (query, key) pairs, summed over the mask slices."""
        blk = self._blocks()
        full = blk.tile < 0
        n, m = self._shape[-2:]
        count = int(_valid_counts(n, m, self._bq, self._bk, blk.i[full], blk.j[full]).sum())
        per_tile = self._tiles.reshape(self._tiles.shape[0], self._bq * self._bk).sum(axis=1)
        return count + int(per_tile[blk.tile[~full]].sum())


# ---------------------------------------------------------------------------------------------
# the engine

def _causal_like(bm: BlockMask) -> BlockMask:
    return BlockMask.causal(bm.shape[-2], bm.shape[-1], bm.block_size)


def _slice_map(mask_lead: tuple, lead: tuple) -> np.ndarray:
    """Mask slice of each flattened (batch, head) slice of ``q``: the mask's leading axes
    (``(H,)`` or ``(B, H)``) broadcast against the trailing leading axes of ``q``."""
    try:
        ok = np.broadcast_shapes(mask_lead, lead) == tuple(lead)
    except ValueError:
        ok = False
    if not ok:
        letters = {1: "(H, N, M): H heads on axis -3", 2: "(B, H, N, M): B on axis -4, H on axis -3"}
        raise ValueError(f"the mask has shape {mask_lead} + (N, M), {letters.get(len(mask_lead), '')}; "
                         f"it must broadcast to the leading axes of q, k, v {tuple(lead)}")
    g = int(np.prod(mask_lead, dtype=np.int64)) if mask_lead else 1
    return np.ascontiguousarray(np.broadcast_to(np.arange(g).reshape(mask_lead), lead).reshape(-1),
                                dtype=np.int64)


def _threads() -> int:
    import numba
    return int(numba.get_num_threads())


def _fused(bh: int, threads: int) -> bool:
    return bh >= threads and (bh % threads == 0 or bh >= config.ENGINE_FUSED_MIN_SLICES_PER_THREAD * threads)


class _Plan(NamedTuple):
    """How a mask is computed: its tile blocks, and the thin blocks' pairs (or None)."""
    mask: BlockMask                  # the whole mask
    tiles: BlockMask                 # the blocks computed as tiles
    pairs: tuple | None              # (indptr (G, N+1), indices, tptr (G, M+1), tind) of the thin pairs


def _tile_cost(bm: BlockMask) -> float:
    return next((float(c) for q_, k_, c in config.ENGINE_TILES if (q_, k_) == bm.block_size), 1.0)


def _plan(bm: BlockMask) -> _Plan:
    """Split the thin blocks off ``bm`` (see ``config.ENGINE_PAIR_COST``) and index their pairs as CSR."""
    tiles, thin = bm._split_thin(_tile_cost(bm))
    if thin.n_blocks == 0:
        return _Plan(bm, bm, None)
    pats = thin.to_pattern()
    if len(bm.shape) == 3:
        csrs = pats
    elif len(bm.shape) == 4:
        csrs = [p for row in pats for p in row]
    else:
        csrs = [pats]
    return _Plan(bm, tiles, _ksparse.pattern_index(csrs))


def _pairs_for(pairs, slice_of: np.ndarray):
    """The pair index with one row per slice of ``q`` when the mask's slices are not ``bh % G``
    (the row-CSR kernels take the pattern of slice ``bh`` as ``bh % G``)."""
    indptr, indices, tptr, tind = pairs
    g = indptr.shape[0]
    if np.array_equal(slice_of, np.arange(slice_of.size) % g):
        return pairs
    return indptr[slice_of], indices, tptr[slice_of], tind


class _BlockSparseCache(NamedTuple):
    q: np.ndarray          # (BH, N, D) contiguous
    k: np.ndarray          # (BH, M, D)
    kt: np.ndarray         # (BH, ceil(M/b_k), D, b_k) the key tiles transposed
    v: np.ndarray          # (BH, M, Dv)
    out: np.ndarray        # (BH, N, Dv)
    lse: np.ndarray        # (BH, N)   per-row log-sum-exp, -inf for rows with no key
    plan: _Plan
    slice_of: np.ndarray   # (BH,) mask slice of each slice
    shapes: tuple          # shapes of q, k, v
    scale: float


def _transposed_tiles(x: np.ndarray, b: int) -> np.ndarray:
    """``x (BH, M, D)`` cut into tiles of ``b`` rows, each transposed: ``(BH, ceil(M/b), D, b)``, the
    right operand of ``S = Q Kᵀ`` and ``dP = dO Vᵀ`` with unit stride along the keys."""
    out = np.empty((x.shape[0], -(-x.shape[1] // b), x.shape[2], b), x.dtype)
    _k.pack_transposed(x, b, out)
    return out


def _forward(q, k, v, plan: _Plan, scale: float):
    shapes = (q.shape, k.shape, v.shape)
    bm = plan.tiles
    slice_of = _slice_map(bm.shape[:-2], q.shape[:-2])
    q3, k3, v3 = (np.ascontiguousarray(a.reshape((-1,) + a.shape[-2:])) for a in (q, k, v))
    out = np.empty(q3.shape[:2] + (v3.shape[2],), q3.dtype)                  # O   (BH, N, Dv)
    lse = np.empty(q3.shape[:2], q3.dtype)                                  # ℓ   (BH, N)
    bq, bk = bm.block_size
    kt = _transposed_tiles(k3, bk)
    _k.blocksparse_forward(q3, k3, v3, kt, scale, slice_of, bm._indptr, bm._cols, bm._tile, bm._tiles,
                           bm._boxes(), bq, bk, out, lse)
    if plan.pairs is not None:                                              # thin blocks, pair by pair
        indptr, indices, _, _ = _pairs_for(plan.pairs, slice_of)
        out_p, lse_p = np.empty_like(out), np.empty_like(lse)
        _ksparse.sparse_attention_forward(q3, k3, v3, indptr, indices, scale, out_p, lse_p)
        with np.errstate(invalid="ignore", over="ignore"):
            merged = np.logaddexp(lse, lse_p)                               # ℓ = log(e^ℓ1 + e^ℓ2)
            seen = np.isfinite(merged)
            w_t = np.where(seen, np.exp(np.where(seen, lse - merged, 0)), 0).astype(out.dtype)
            w_p = np.where(seen, np.exp(np.where(seen, lse_p - merged, 0)), 0).astype(out.dtype)
        out = w_t[..., None] * out + w_p[..., None] * out_p                 # O = e^(ℓ1-ℓ) O1 + e^(ℓ2-ℓ) O2
        lse = merged.astype(lse.dtype, copy=False)
    return (out.reshape(q.shape[:-1] + (v.shape[-1],)),
            _BlockSparseCache(q3, k3, kt, v3, out, lse, plan, slice_of, shapes, scale))


def _backward(cache: _BlockSparseCache, dout, fused: bool | None = None):
    q, k, kt, v, out, lse, plan, slice_of, shapes, scale = cache
    bm = plan.tiles
    dout3 = np.ascontiguousarray(dout.reshape(out.shape))
    delta = np.einsum("bnd,bnd->bn", dout3, out)                            # δ_i = dO_i · O_i  (BH, N)
    dq, dk, dv = np.empty_like(q), np.zeros_like(k), np.zeros_like(v)
    bq, bk = bm.block_size
    fused = _fused(q.shape[0], _threads()) if fused is None else fused
    vt = _transposed_tiles(v, bk)
    if fused:
        _k.blocksparse_backward(q, k, kt, vt, dout3, lse, delta, scale, slice_of, bm._indptr, bm._cols,
                                bm._tile, bm._tiles, bm._boxes(), bq, bk, dq, dk, dv)
    else:
        tindptr, trows, ttile = bm._transposed_layout()
        _k.blocksparse_backward_dq(q, k, kt, vt, dout3, lse, delta, scale, slice_of, bm._indptr, bm._cols,
                                   bm._tile, bm._tiles, bm._boxes(), bq, bk, dq)
        _k.blocksparse_backward_dkdv(q, k, kt, vt, dout3, lse, delta, scale, slice_of, tindptr, trows, ttile,
                                     bm._tiles, bm._boxes(), bq, bk, dk, dv)
    if plan.pairs is not None:                     # the thin pairs: same ℓ and δ, gradients add up
        indptr, indices, tptr, tind = _pairs_for(plan.pairs, slice_of)
        dq_p, dk_p, dv_p = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        _ksparse.sparse_attention_backward_dq(q, k, v, dout3, lse, delta, indptr, indices, scale, dq_p)
        _ksparse.sparse_attention_backward_dkdv(q, k, v, dout3, lse, delta, tptr, tind, scale, dk_p, dv_p)
        dq += dq_p
        dk += dk_p
        dv += dv_p
    return dq.reshape(shapes[0]), dk.reshape(shapes[1]), dv.reshape(shapes[2])


def _as_mask(mask):
    """A BlockMask, None (dense) or a callable (evaluated per input shape)."""
    if mask is None or isinstance(mask, BlockMask):
        return mask
    if sp.issparse(mask) or (isinstance(mask, (list, tuple)) and mask and sp.issparse(mask[0])):
        return BlockMask.from_pattern(list(mask) if isinstance(mask, tuple) else mask)
    if callable(mask):
        return mask
    raise TypeError(f"mask must be a BlockMask, a scipy.sparse pattern (or a list of them, one per head), "
                    f"a mask_mod(b, h, q_idx, kv_idx) callable or None, got {type(mask).__name__}")


class BlockSparseAttention(AttentionCore):
    r"""Softmax attention over any mask at the speed of dense tiles (FlashAttention-2 on the CPU).

    Parameters
    ----------
    mask : BlockMask, scipy.sparse array or list of them, callable, or None
        Where query ``i`` may attend to key ``j``: a :class:`BlockMask` (its tiles are the
        engine's tiles), a ``scipy.sparse`` ``(N, M)`` pattern or one per head (converted with
        :meth:`BlockMask.from_pattern`), a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``
        (evaluated for the inputs' shape — heads on axis -3, batch on axis -4 — by
        :meth:`BlockMask.from_mask_mod`, and kept per shape), or None: every key (dense).
    causal : bool
        Also require ``j <= i`` (intersected with the mask).
    scale : float, optional
        Multiplies the scores; ``1/sqrt(D)`` when None.

    Notes
    -----
    Equals ``DenseAttention(causal, scale)`` with the dense mask, forward and backward; a row with
    no allowed key outputs 0 and passes zero gradient. Time ``O(T·b_q·b_k·(D + Dv))`` for ``T``
    computed tiles, memory ``O(N·(D + Dv))`` (the module docstring has the algorithm).
    A mask with per-head slices ``(H, N, M)`` (or ``(B, H, N, M)``) applies slice ``h`` to head
    ``h``: the leading axes of the mask broadcast against those of ``q, k, v``.

    Examples
    --------
    >>> import numpy as np, efficient_attention as ea
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 300, 16)) for _ in range(3))
    >>> window = lambda b, h, q_idx, kv_idx: abs(q_idx - kv_idx) <= 32
    >>> out = ea.BlockSparseAttention(window, causal=True)(q, k, v)
    >>> mask = (np.abs(np.arange(300)[:, None] - np.arange(300)) <= 32) & ea.causal_mask(300)
    >>> np.allclose(out, ea.DenseAttention()(q, k, v, mask=mask))
    True
    """

    def __init__(self, mask=None, causal: bool = False, scale: float | None = None):
        self.causal = check_bool(causal, "causal")
        self.scale = check_scale(scale)
        self.mask = _as_mask(mask)
        self._layouts: dict = {}

    def options(self):
        if self.mask is None or isinstance(self.mask, BlockMask):
            mask = None if self.mask is None else f"<BlockMask {self.mask.shape}, density {self.mask.density:.3g}>"
        else:
            mask = f"<mask_mod {getattr(self.mask, '__name__', type(self.mask).__name__)}>"
        return {"mask": mask, "causal": self.causal, "scale": self.scale}

    def block_mask(self, n: int, m: int | None = None, lead: tuple = ()) -> BlockMask:
        """The layout this core runs on for ``N`` queries, ``M`` keys and the leading axes ``lead``
        of ``q`` (the mask, intersected with the causal mask when ``causal``)."""
        m = n if m is None else m
        key = (n, m, tuple(lead) if callable(self.mask) else ())
        if key not in self._layouts:
            if self.mask is None:
                bm = BlockMask.causal(n, m) if self.causal else BlockMask.full(n, m)
            else:
                if callable(self.mask) and not isinstance(self.mask, BlockMask):
                    heads = lead[-1] if len(lead) >= 1 else None
                    batch = lead[-2] if len(lead) >= 2 else None
                    bm = BlockMask.from_mask_mod(self.mask, n, m, batch=batch, heads=heads)
                else:
                    bm = self.mask
                    if bm.shape[-2:] != (n, m):
                        raise ValueError(f"the mask has (N, M) = {bm.shape[-2:]} but q, k give (N, M) = ({n}, {m})")
                if self.causal:
                    bm = bm & _causal_like(bm)
            if len(self._layouts) > 16:
                self._layouts.clear()
            self._layouts[key] = bm
        return self._layouts[key]

    def plan(self, n: int, m: int | None = None, lead: tuple = ()):
        """``(mask, tiles, pairs)``: the layout of :meth:`block_mask`, the part of it computed as
        tiles, and the CSR index of the thin blocks computed pair by pair (None when there are
        none; see ``config.ENGINE_PAIR_COST``)."""
        m = n if m is None else m
        bm = self.block_mask(n, m, lead)
        key = ("plan", id(bm))
        if key not in self._layouts:
            self._layouts[key] = _plan(bm)
        return self._layouts[key]

    @finite_policy
    def forward(self, q, k, v, *, check_finite: bool = True):
        q, k, v = check_qkv(q, k, v, check_finite=check_finite)
        plan = self.plan(q.shape[-2], k.shape[-2], q.shape[:-2])
        return _forward(q, k, v, plan, resolve_scale(self.scale, q.shape[-1]))

    @finite_policy
    def backward(self, cache: _BlockSparseCache, dout, *, check_finite: bool = True) -> Grads:
        check_cache(cache, _BlockSparseCache, type(self).__name__)
        dout = check_dout(dout, cache.shapes[0][:-1] + (cache.shapes[2][-1],), cache.q.dtype,
                          check_finite=check_finite)
        return Grads(*_backward(cache, dout), {})

    def dense_mask(self, n, m=None):
        """The boolean mask (``(N, M)``, or with the mask's head / batch axes); for a ``mask_mod``
        callable the one of batch entry 0 and head 0 (``reference`` has the per-head oracle)."""
        m = n if m is None else m
        if callable(self.mask) and not isinstance(self.mask, BlockMask):
            mask = BlockMask.from_mask_mod(self.mask, n, m).to_dense()
            return mask & (np.arange(m)[None, :] <= np.arange(n)[:, None]) if self.causal else mask
        return self.block_mask(n, m).to_dense()

    def reference(self, q, k, v, dout):
        """For a ``mask_mod`` callable: ``(out, dq, dk, dv)`` of the float64 ``DenseAttention`` with
        the mask evaluated for the inputs' heads and batch; None otherwise (``dense_mask`` is the
        oracle's mask)."""
        if not callable(self.mask) or isinstance(self.mask, BlockMask):
            return None
        from .dense import DenseAttention
        q, k, v = (np.asarray(a, np.float64) for a in check_qkv(q, k, v, check_finite=False))
        mask = self.block_mask(q.shape[-2], k.shape[-2], q.shape[:-2]).to_dense()
        dense = DenseAttention(scale=self.scale)
        out, cache = dense.forward(q, k, v, mask=mask)
        g = dense.backward(cache, np.asarray(dout, np.float64))
        return out, g.dq, g.dk, g.dv

    def cost(self, n, d, dv=None, m=None, *, backward=False):
        """FLOPs of the products on the allowed pairs (``2·nnz·(D+Dv)`` forward,
        ``2·nnz·(3D+2Dv)`` backward, per slice: the useful work; the tiles add the masked
        entries of partial tiles) and the scalars held: output, log-sum-exps and tile scratch."""
        dv = d if dv is None else dv
        m = n if m is None else m
        bm = self.block_mask(n, m) if not callable(self.mask) or isinstance(self.mask, BlockMask) \
            else BlockMask.from_mask_mod(self.mask, n, m)
        nnz = -(-bm.nnz // max(1, bm._grid[0]))
        bq, bk = bm.block_size
        scratch = _threads() * (3 * bq * bk + bq * (d + dv))
        if backward:
            return Cost(2 * nnz * (3 * d + 2 * dv), n * (2 * d + dv) + m * (d + dv) + scratch)
        return Cost(2 * nnz * (d + dv), n * dv + n + scratch)


def attention(q, k, v, mask=None, causal: bool = False, scale: float | None = None, *,
              check_finite: bool = True) -> np.ndarray:
    """``softmax(scale·QKᵀ + mask)·V`` in one call, forward only, by the block-sparse engine.

    ``mask`` as in :class:`BlockSparseAttention` (a BlockMask, a sparse pattern or a list of them,
    a ``mask_mod`` callable, or None); ``q (..., N, D)``, ``k (..., M, D)``, ``v (..., M, Dv)``.
    For repeated calls with one mask build the :class:`BlockMask` once and pass it.
    """
    core = BlockSparseAttention(mask, causal=causal, scale=scale)
    return core.forward(q, k, v, check_finite=check_finite)[0]


# ---------------------------------------------------------------------------------------------
# registry: the engine beside the chapter's other cores, on the same masks

def _engine_bigbird_block(n: int) -> int:
    """The largest of 64, 32, ..., 1 dividing ``n`` that leaves at least 8 blocks."""
    return next((b for b in (64, 32, 16, 8, 4, 2) if n % b == 0 and n // b >= 8), 1)


def _engine_longformer(n, d, dv, seed):
    from . import patterns
    return BlockSparseAttention(patterns.longformer(n, max(1, min(256, n // 8)), [0]))


def _engine_bigbird(n, d, dv, seed):
    from . import patterns
    b = _engine_bigbird_block(n)
    return BlockSparseAttention(patterns.bigbird(n, b, min(3, n // b), 1, seed=seed))


def _engine_global(n, d, dv, seed):
    from . import patterns
    return BlockSparseAttention(patterns.global_tokens(n, (0, n // 2)))


def _engine_random(n, d, dv, seed):
    from . import patterns
    return BlockSparseAttention(patterns.random(n, max(1, min(64, n // 4)), seed))


def per_head_mask_mod(window: int, dilation: int = 2, block: int = 64):
    """A FlexAttention-style ``mask_mod`` whose pattern depends on the head, cycling the chapter's
    kinds by ``h % 4``: 0 local (``|i-j| <= window``), 1 dilated (``(i-j) % dilation == 0`` and
    ``|i-j| <= window·dilation``), 2 global token 0 (``i == 0`` or ``j == 0``), 3 blocks
    (``i // block == j // block``)."""
    def mask_mod(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        kind = np.asarray(h) % 4
        local = np.abs(diff) <= window
        dilated = (diff % dilation == 0) & (np.abs(diff) <= window * dilation)
        glob = (q_idx == 0) | (kv_idx == 0)
        blocks = (q_idx // block) == (kv_idx // block)
        return np.where(kind == 0, local, np.where(kind == 1, dilated, np.where(kind == 2, glob, blocks)))
    mask_mod.__name__ = f"per_head_mask_mod(window={window}, dilation={dilation}, block={block})"
    return mask_mod


def _engine_per_head(n, d, dv, seed):
    return BlockSparseAttention(per_head_mask_mod(max(1, min(128, n // 8)), 2, max(1, min(64, n // 4))))


def _register():
    from .core import register
    engine = [   # name, config, factory, exact, description
        ("engine_dense", None, None, True,
         "block-sparse engine, every key (FlashAttention-2 tiles; compare with 'dense')"),
        ("engine_causal", {"causal": True}, None, True,
         "block-sparse engine, causal (compare with 'dense_causal')"),
        ("engine_longformer", None, _engine_longformer, True,
         "block-sparse engine on the 'longformer' pattern (window min(256, N/8) + token 0)"),
        ("engine_bigbird", None, _engine_bigbird, True,
         "block-sparse engine on the 'bigbird' pattern (blocks of 64, 3 random, 1 global)"),
        ("engine_global", None, _engine_global, True,
         "block-sparse engine on the 'global' pattern (tokens 0 and N/2)"),
        ("engine_random", None, _engine_random, True,
         "block-sparse engine on the 'sparse_random' pattern (min(64, N/4) keys per query)"),
        ("engine_per_head", None, _engine_per_head, False,
         "block-sparse engine, one call for per-head masks (local / dilated / global / blocks by head) "
         "from a mask_mod; its own per-head oracle"),
    ]
    for name, options, factory, exact, description in engine:
        register(name, BlockSparseAttention, chapter=1, config=options, factory=factory, exact=exact,
                 description=description)


_register()
