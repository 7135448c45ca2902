r"""Chapter 1 — hand-designed N×N patterns: which entries of the attention matrix to compute.

Full attention fills all ``N × N`` entries of ``S = QKᵀ``. The first family of
efficient variants fixes in advance a sparse set of allowed (query ``i``, key
``j``) pairs and computes only those. A pattern is a boolean
``scipy.sparse.csr_array`` of shape ``(N, M)`` (True = query ``i`` may attend
to key ``j``); :class:`~efficient_attention.sparse.SparseAttention` runs
softmax attention restricted to it.

==============================================================  =====================================================
builder                                                         (i, j) allowed iff
==============================================================  =====================================================
``local(n, window, causal=False)``                              ``abs(i-j) <= window`` (causal: ``0 <= i-j <= window``)
``strided(n, stride, window=None, causal=False)``               ``(i-j) % stride == 0`` and, with a window,
                                                                ``abs(i-j) <= window*stride`` (causal: also ``j <= i``)
``global_tokens(n, indices)``                                   ``i in indices or j in indices``
``random(n, per_row, seed, m=None, causal=False)``              ``j`` is one of ``per_row`` distinct keys drawn
                                                                uniformly from ``range(m)`` for row ``i`` (seeded;
                                                                causal: from ``range(i+1)``, at most ``i+1`` keys)
``union(*patterns)``                                            allowed in any of them
``longformer(n, window, global_indices, dilation=1,``            ``union(strided(n, dilation, window),``
``causal=False)``                                               ``global_tokens(...))`` (causal: and ``j <= i``)
``bigbird(n, block_size, n_random_blocks, n_global_blocks,``    block ``I`` sees block ``J`` iff
``window_blocks=3, seed=0, causal=False)``                      ``abs(I-J) <= window_blocks//2``, or ``I`` or ``J`` is
                                                                among the first ``n_global_blocks`` blocks, or ``J`` is
                                                                one of ``n_random_blocks`` distinct random blocks drawn
                                                                for row block ``I`` among the blocks not already in its
                                                                window or global blocks (fewer only when fewer remain);
                                                                expanded to tokens (causal: random blocks drawn among
                                                                ``J <= I``, then intersected with ``j <= i``)
==============================================================  =====================================================

Costs: a pattern with ``nnz`` allowed entries costs ``2·nnz·(D + Dv)`` FLOPs
instead of ``2·N·M·(D + Dv)``: ``O(N·w)`` for a window ``w``, ``O(N²/stride)``
for an unwindowed stride, ``O(N·g)`` for ``g`` global tokens, ``O(N·r)`` for
``r`` random keys per row.

Papers: local and strided (fixed) patterns, Child et al. 2019, *Sparse
Transformers*, arXiv:1904.10509 §4.2; Longformer (sliding, dilated and global
attention), Beltagy et al. 2020, arXiv:2004.05150 §3.1; BigBird (random +
window + global blocks), Zaheer et al. 2020, arXiv:2007.14062 §2 and App. D.

Where peers differ (see PEERS.md): our ``window`` counts keys on *each* side
(xformers' odd ``w`` is our ``w // 2``, HF Longformer's even ``w`` is our
``w // 2``); xformers' random pattern draws Bernoulli entries (empty rows
possible), ours exactly ``per_row`` keys per row; BigBird's global blocks are
the *first* ``n_global_blocks`` blocks here (ITC uses the first and the last);
its random blocks are extra blocks, drawn outside the row block's window and
global blocks, as in the paper and in HF (which also turns randomness off in
eval).

Every builder is vectorised (no Python loop over rows): ``local(2**20, 256)``
— 5.4·10⁸ entries — builds in a few seconds, in chunks, with ``int32`` index
arrays whenever they fit.
"""
from __future__ import annotations


import numpy as np
import scipy.sparse as sp

from . import config
from .plot import plot_pattern as plot  # noqa: F401  (public: patterns.plot)
from .plot import to_image
from .validate import check_bool, check_csr, check_indices, check_int, check_patterns

__all__ = [
    "local",
    "strided",
    "global_tokens",
    "random",
    "union",
    "longformer",
    "bigbird",
    "bigbird_parts",
    "to_image",
    "to_ascii",
    "plot",
    "examples",
    "draw_pattern",
    "density",
]


# --------------------------------------------------------------------------- helpers

def _index_dtype(*bounds) -> np.dtype:
    """int32 when every bound fits (scipy's own choice), else int64."""
    return np.dtype(np.int32) if max(bounds) < np.iinfo(np.int32).max else np.dtype(np.int64)


def _arithmetic_rows(n: int, m: int, start: np.ndarray, count: np.ndarray, step: int) -> sp.csr_array:
    """CSR whose row ``i`` holds ``start[i] + step·t`` for ``t in range(count[i])``.

    ``start`` and ``count`` are int64 arrays of length ``n`` (``count >= 0``,
    all columns in ``[0, m)``, ``step >= 1`` so rows come out sorted). Rows are
    written in chunks of about ``config.PATTERN_CHUNK`` entries: no Python loop over rows.
    """
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(count, out=indptr[1:])
    nnz = int(indptr[-1])
    idx = _index_dtype(nnz, m, n)
    indices = np.empty(nnz, idx)
    # chunk boundaries at row granularity
    cuts = np.unique(np.concatenate([[0], np.searchsorted(indptr, np.arange(config.PATTERN_CHUNK, nnz, config.PATTERN_CHUNK)), [n]]))
    for r0, r1 in zip(cuts[:-1], cuts[1:]):
        a, b = indptr[r0], indptr[r1]
        if a == b:
            continue
        # entry e of row i (e in [indptr[i], indptr[i+1])): start[i] + step·(e - indptr[i])
        base = (start[r0:r1] - step * (indptr[r0:r1] - a)).astype(idx)
        chunk = np.repeat(base, count[r0:r1])
        chunk += np.arange(0, step * (b - a), step, dtype=idx)[: b - a]
        indices[a:b] = chunk
    data = np.ones(nnz, bool)
    return sp.csr_array((data, indices, indptr.astype(idx)), shape=(n, m))


def _canonical(p) -> sp.csr_array:
    """``p`` as a boolean csr_array with sorted, unique indices and no stored False."""
    p = sp.csr_array(p).astype(bool)
    p.eliminate_zeros()
    p.sum_duplicates()
    p.sort_indices()
    return p


# --------------------------------------------------------------------------- builders

def local(n: int, window: int, causal: bool = False) -> sp.csr_array:
    """Local (truncated, sliding-window) pattern: ``abs(i-j) <= window``.

    With ``causal``: ``0 <= i-j <= window``. ``window >= n - 1`` gives the full
    (or full causal) pattern; ``window = 0`` the diagonal.

    Examples
    --------
    >>> print(to_ascii(local(5, 1)))
    ##...
    ###..
    .###.
    ..###
    ...##
    """
    n = check_int(n, "n", minimum=0)
    window = check_int(window, "window", minimum=0)
    causal = check_bool(causal, "causal")
    i = np.arange(n, dtype=np.int64)
    start = np.maximum(i - window, 0)                       # first allowed key
    stop = i if causal else np.minimum(i + window, n - 1)   # last allowed key
    return _arithmetic_rows(n, n, start, stop - start + 1, 1)


def strided(n: int, stride: int, window: int | None = None, causal: bool = False) -> sp.csr_array:
    """Strided (dilated) pattern: ``(i-j) % stride == 0``.

    With ``window``: also ``abs(i-j) <= window*stride`` (``window`` keys on each
    side, ``stride`` apart: Longformer's dilated window). With ``causal``: also
    ``j <= i``. ``stride = 1`` with a window is :func:`local`; ``stride = 1``
    without one is the full pattern.

    Examples
    --------
    >>> print(to_ascii(strided(6, 2, causal=True)))
    #.....
    .#....
    #.#...
    .#.#..
    #.#.#.
    .#.#.#
    """
    n = check_int(n, "n", minimum=0)
    stride = check_int(stride, "stride", minimum=1)
    window = check_int(window, "window", minimum=0, allow_none=True)
    causal = check_bool(causal, "causal")
    i = np.arange(n, dtype=np.int64)
    back = i // stride                                      # keys i - s·t, t = 1..back, stay >= 0
    fwd = (n - 1 - i) // stride                             # keys i + s·t, t = 1..fwd, stay < n
    if window is not None:
        back = np.minimum(back, window)
        fwd = np.minimum(fwd, window)
    if causal:
        fwd = np.zeros_like(fwd)
    return _arithmetic_rows(n, n, i - stride * back, back + fwd + 1, stride)


def global_tokens(n: int, indices) -> sp.csr_array:
    """Global pattern: ``i in indices or j in indices``.

    Global tokens attend to every token and every token attends to them.
    ``indices`` (integers in ``[0, n)``) may be unsorted and repeat; an empty
    ``indices`` gives the empty pattern.

    Examples
    --------
    >>> print(to_ascii(global_tokens(4, [1])))
    .#..
    ####
    .#..
    .#..
    """
    n = check_int(n, "n", minimum=0)
    g = check_indices(indices, n, "indices")
    is_global = np.zeros(n, bool)
    is_global[g] = True
    count = np.where(is_global, n, g.size).astype(np.int64)  # global rows: all keys; others: the globals
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(count, out=indptr[1:])
    nnz = int(indptr[-1])
    idx = _index_dtype(nnz, n)
    indices_out = np.empty(nnz, idx)
    in_global_row = np.repeat(is_global, count)              # (nnz,) entry belongs to a global row
    indices_out[in_global_row] = np.tile(np.arange(n, dtype=idx), g.size)
    indices_out[~in_global_row] = np.tile(g.astype(idx), n - g.size)
    return sp.csr_array((np.ones(nnz, bool), indices_out, indptr.astype(idx)), shape=(n, n))


def _row_slots(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Flat positions of the entries of ``rows`` (increasing) in a CSR with ``indptr``."""
    starts = indptr[rows]
    counts = indptr[rows + 1] - starts
    # entry e of the concatenation, in row r whose entries start at e0 there: starts[r] + (e - e0)
    return np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))


def _draw_ranks(rng: np.random.Generator, avail: np.ndarray, per_row: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row ``i``, ``min(per_row, avail[i])`` distinct integers drawn uniformly from
    ``range(avail[i])``, sorted: ``(indptr, ranks)`` of a CSR (int64).

    Rows with ``per_row² <= avail[i]`` draw ``per_row`` integers at once and draw again
    when one repeats (a repeat has probability at most 1/2 there); the other rows keep
    the ``per_row`` smallest of ``avail[i]`` uniform numbers (a uniformly random subset),
    in chunks of rows of about 2²² numbers. No Python loop over rows.
    """
    count = np.minimum(avail, per_row)
    indptr = np.zeros(avail.size + 1, np.int64)
    np.cumsum(count, out=indptr[1:])
    ranks = np.empty(int(indptr[-1]), np.int64)
    if per_row == 0:
        return indptr, ranks
    sparse = avail >= per_row * per_row
    rows = np.flatnonzero(sparse)
    if rows.size:
        high = avail[rows]
        uniform = high.min() == high.max()
        high = int(high[0]) if uniform else high[:, None]
        cols = np.sort(rng.integers(0, high, size=(rows.size, per_row)), axis=1)
        bad = np.flatnonzero((np.diff(cols, axis=1) == 0).any(axis=1)) if per_row > 1 else []
        while len(bad):                                   # redraw rows with a repeated key
            redraw = np.sort(rng.integers(0, high if uniform else high[bad], size=(len(bad), per_row)), axis=1)
            cols[bad] = redraw
            bad = bad[(np.diff(redraw, axis=1) == 0).any(axis=1)]
        ranks[_row_slots(indptr, rows)] = cols.reshape(-1)
    rows = np.flatnonzero(~sparse & (count > 0))
    if rows.size:
        rows_per_chunk = max(1, (1 << 22) // int(avail[rows].max()))
        for r0 in range(0, rows.size, rows_per_chunk):      # chunks of rows, not a loop over rows
            chunk = rows[r0:r0 + rows_per_chunk]
            a = avail[chunk]
            width = int(a.max())
            keys = rng.random((chunk.size, width))
            if a.min() < width:                           # shorter rows: padding is never picked first
                keys[np.arange(width)[None, :] >= a[:, None]] = 2.0
            k = min(per_row, width)
            # the k smallest of the uniform keys: a uniformly random subset of each row's range
            sel = np.sort(np.argpartition(keys, k - 1, axis=1)[:, :k], axis=1)
            ranks[_row_slots(indptr, chunk)] = sel[sel < a[:, None]]
    return indptr, ranks


def random(n: int, per_row: int, seed: int = 0, m: int | None = None, causal: bool = False,
           *, exclude=None) -> sp.csr_array:
    """Random pattern: each row ``i`` gets ``per_row`` distinct keys drawn
    uniformly from ``range(m)`` (``m = n`` unless given), seeded.

    With ``causal``, row ``i`` draws from ``range(i + 1)`` (and ``range(m)``)
    instead: it gets ``per_row`` keys, or all of them when fewer exist.

    ``exclude`` (a pattern of shape ``(n, m)``, keyword only) lists, per row, keys
    not to draw: the keys a row already sees through other patterns, so that the
    random keys are *extra* ones (BigBird's rule, see :func:`bigbird`). Row ``i``
    then gets ``min(per_row, r_i)`` keys, ``r_i`` the number of candidate keys
    left; it is not an error to ask for more than remain.

    The same arguments always give the same pattern. Rows are drawn all at once:
    ``per_row`` integers per row, rows with a repeated key drawn again (for rows
    with at least ``per_row²`` candidates, so that repeats are rare), or the first
    ``per_row`` keys of a random permutation of the row's candidates otherwise.

    Raises ``ValueError`` when ``per_row > m``.

    Examples
    --------
    >>> p = random(6, 2, seed=0, causal=True, exclude=local(6, 0))
    >>> p.sum(axis=1).tolist()                  # row 0 has no candidate left, row 1 only key 0
    [0, 1, 2, 2, 2, 2]
    """
    n = check_int(n, "n", minimum=0)
    m = n if m is None else check_int(m, "m", minimum=0)
    per_row = check_int(per_row, "per_row", minimum=0)
    if per_row > m:
        raise ValueError(f"per_row must be <= m = {m} (distinct keys per row), got {per_row}")
    seed = check_int(seed, "seed", minimum=0)
    causal = check_bool(causal, "causal")
    rows = np.arange(n, dtype=np.int64)
    hi = np.minimum(rows + 1, m) if causal else np.full(n, m, np.int64)   # candidates: range(hi[i])
    avail = hi
    if exclude is not None:
        ex = check_csr(exclude, n, m, "exclude")                           # canonical, int64
        ex_rows = np.repeat(rows, np.diff(ex.indptr))
        # entries of all rows on one sorted axis: row i's key j at i·(m+1) + j
        flat = ex.indices + ex_rows * (m + 1)
        below = np.searchsorted(flat, hi + rows * (m + 1)) - ex.indptr[:-1]  # excluded keys < hi[i]
        avail = hi - below
    indptr, ranks = _draw_ranks(np.random.default_rng(seed), avail, per_row)
    if exclude is not None and ranks.size:
        # the rank-th candidate of row i is rank + #{t : e_t - t <= rank}, e the row's sorted
        # excluded keys (e_t - t, the candidates before e_t, is non-decreasing along the row)
        shifted = ex.indices - (np.arange(ex.indices.size) - np.repeat(ex.indptr[:-1], np.diff(ex.indptr)))
        shifted += ex_rows * (m + 1)
        r_rows = np.repeat(rows, np.diff(indptr))
        ranks += np.searchsorted(shifted, ranks + r_rows * (m + 1), side="right") - ex.indptr[r_rows]
    idx = _index_dtype(ranks.size, m, n)
    return sp.csr_array((np.ones(ranks.size, bool), ranks.astype(idx), indptr.astype(idx)), shape=(n, m))


def union(*patterns) -> sp.csr_array:
    """Entries allowed in any of ``patterns`` (all of one shape)."""
    if not patterns:
        raise ValueError("union needs at least one pattern, got none")
    patterns, (n, m), _ = check_patterns(patterns, "patterns")
    out = None
    for i, p in enumerate(patterns):
        p = check_csr(p, n, m, f"patterns[{i}]")
        out = p if out is None else out.maximum(p)
    return _canonical(out)


def _lower(p: sp.csr_array) -> sp.csr_array:
    """The entries of a canonical CSR ``p`` with ``j <= i`` (causal), in O(nnz)."""
    rows = np.repeat(np.arange(p.shape[0], dtype=p.indices.dtype), np.diff(p.indptr))
    keep = p.indices <= rows
    kept = np.zeros(keep.size + 1, np.int64)
    np.cumsum(keep, out=kept[1:])
    indptr = kept[p.indptr].astype(p.indptr.dtype)         # entries kept before each row
    return sp.csr_array((p.data[keep], p.indices[keep], indptr), shape=p.shape)


def longformer(n: int, window: int, global_indices=(), dilation: int = 1,
               causal: bool = False) -> sp.csr_array:
    """Longformer: a (dilated) sliding window plus global tokens,
    ``union(strided(n, dilation, window), global_tokens(n, global_indices))``.

    With ``causal``: that union intersected with ``j <= i`` (a global token
    sees the keys up to itself, and is seen by the queries from itself on).
    ``dilation = 1`` is the plain sliding window :func:`local`. The lecture's
    per-head Longformer (local heads, dilated heads, global heads) is one
    pattern per head: ``SparseAttention([local(n, w), strided(n, s, w),
    global_tokens(n, g), ...])``.

    Examples
    --------
    >>> print(to_ascii(longformer(6, 1, [3], causal=True)))
    #.....
    ##....
    .##...
    ####..
    ...##.
    ...###
    """
    dilation = check_int(dilation, "dilation", minimum=1)
    window = check_int(window, "window", minimum=0)
    causal = check_bool(causal, "causal")
    p = union(strided(n, dilation, window, causal), global_tokens(n, global_indices))
    return _lower(p) if causal else p


def _bigbird_blocks(nb: int, n_random_blocks: int, n_global_blocks: int, window_blocks: int,
                    seed: int, causal: bool) -> dict:
    """BigBird's block pattern ``(nb, nb)`` in its three parts: ``window``, ``global`` and
    ``random`` (drawn among the blocks neither of the other two gives the row block;
    with ``causal`` also among ``J <= I`` only)."""
    window = local(nb, window_blocks // 2)
    glob = global_tokens(nb, np.arange(n_global_blocks))
    rand = random(nb, n_random_blocks, seed, causal=causal, exclude=union(window, glob))
    return {"random": rand, "window": window, "global": glob}


def bigbird(n: int, block_size: int, n_random_blocks: int, n_global_blocks: int,
            window_blocks: int = 3, seed: int = 0, causal: bool = False) -> sp.csr_array:
    """BigBird: block-sparse random + window + global attention.

    ``n`` must be a multiple of ``block_size``; with ``nb = n // block_size``
    blocks, block ``I`` sees block ``J`` iff ``abs(I-J) <= window_blocks // 2``,
    or ``I`` or ``J`` is one of the first ``n_global_blocks`` blocks, or ``J`` is
    one of the random blocks of row block ``I``. The block pattern is then
    expanded to tokens (every token of block ``I`` sees every token of block
    ``J``).

    The random blocks are *extra* blocks: for each row block ``I``,
    ``n_random_blocks`` distinct blocks are drawn uniformly (``seed``) among
    the blocks not already in ``I``'s window or global blocks, so a row block
    gets exactly ``n_random_blocks`` more blocks whenever that many remain, and
    all that remain otherwise (a global row block already sees every block and
    gets none). This is the paper's rule and HuggingFace's: HF's
    ``BigBirdBlockSparseAttention._bigbird_block_rand_mask`` takes, for each row
    block but the first and the last (its global blocks), a random permutation
    of the blocks outside the row block's window and outside the global blocks
    and keeps its first ``r`` (its fixed-length path leaves the window blocks
    among the candidates of the last two such rows, which its source marks as
    an omission; HF also uses no random blocks in eval mode).

    With ``causal``: the random blocks of row block ``I`` are drawn among the
    allowed blocks ``J <= I`` not already chosen (window or global), so a
    causal row block also gets ``n_random_blocks`` extra blocks when that many
    remain; then the token pattern is intersected with ``j <= i``.

    Examples
    --------
    >>> p = bigbird(16, 2, n_random_blocks=1, n_global_blocks=1, window_blocks=3, seed=0)
    >>> p.shape, int(p.sum(axis=1).min())     # 8 blocks of 2; a row sees >= 1 + 2 + 1 blocks
    ((16, 16), 8)
    """
    block_size, parts, causal = _bigbird_block_parts(n, block_size, n_random_blocks, n_global_blocks,
                                                     window_blocks, seed, causal)
    blocks = union(*parts.values())                           # (nb, nb) block pattern
    p = _canonical(sp.kron(blocks, np.ones((block_size, block_size), bool), format="csr"))
    return _lower(p) if causal else p


def bigbird_parts(n: int, block_size: int, n_random_blocks: int, n_global_blocks: int,
                  window_blocks: int = 3, seed: int = 0, causal: bool = False) -> dict:
    """BigBird's three kinds of blocks as separate token patterns.

    Same arguments and the same blocks as :func:`bigbird`; returns
    ``{"window": ..., "global": ..., "random": ...}``, each an ``(n, n)``
    boolean ``csr_array`` (causal: intersected with ``j <= i``) whose
    :func:`union` is ``bigbird(...)``. The parts may overlap (a window block
    of a global row is also a global block); the chapter's picture draws
    them in one colour each.
    """
    block_size, parts, causal = _bigbird_block_parts(n, block_size, n_random_blocks, n_global_blocks,
                                                     window_blocks, seed, causal)
    ones = np.ones((block_size, block_size), bool)
    out = {}
    for name, blocks in parts.items():
        p = _canonical(sp.kron(blocks, ones, format="csr"))
        out[name] = _lower(p) if causal else p
    return out


def _bigbird_block_parts(n, block_size, n_random_blocks, n_global_blocks, window_blocks, seed, causal):
    """Check :func:`bigbird`'s arguments; ``(block_size, block-level parts, causal)``."""
    n = check_int(n, "n", minimum=0)
    block_size = check_int(block_size, "block_size", minimum=1)
    if n % block_size:
        raise ValueError(f"n must be a multiple of block_size = {block_size}, got n = {n}")
    nb = n // block_size
    n_random_blocks = check_int(n_random_blocks, "n_random_blocks", minimum=0, maximum=nb)
    n_global_blocks = check_int(n_global_blocks, "n_global_blocks", minimum=0, maximum=nb)
    window_blocks = check_int(window_blocks, "window_blocks", minimum=0)
    seed = check_int(seed, "seed", minimum=0)
    causal = check_bool(causal, "causal")
    parts = _bigbird_blocks(nb, n_random_blocks, n_global_blocks, window_blocks, seed, causal)
    return block_size, parts, causal


# --------------------------------------------------------------------------- helpers for users and tests

def density(pattern) -> float:
    """Fraction of allowed entries, ``nnz / (N·M)``."""
    n, m = pattern.shape
    return float(pattern.count_nonzero()) / max(1, n * m)


def examples(n: int, seed: int = 0) -> dict:
    """One pattern of every builder for sequences of length ``n`` (``n >= 1``),
    with parameters derived from ``n``: a fixed, hypothesis-free set for tests
    (also of other implementations) and pictures.

    Keys: ``local``, ``local_causal``, ``strided``, ``strided_window``,
    ``strided_causal``, ``global``, ``random``, ``longformer``, ``bigbird``
    (block size the largest of 4, 2, 1 dividing ``n``), ``empty_rows`` (a
    pattern with fully masked rows).
    """
    n = check_int(n, "n", minimum=1)
    w = max(1, n // 8)
    s = max(1, n // 4)
    b = next(bs for bs in (4, 2, 1) if n % bs == 0)
    nb = n // b
    rnd = random(n, min(n, 3), seed)
    keep = np.zeros(n, bool)
    keep[::2] = True                                      # odd rows fully masked
    return {
        "local": local(n, w),
        "local_causal": local(n, w, causal=True),
        "strided": strided(n, s),
        "strided_window": strided(n, s, window=1),
        "strided_causal": strided(n, s, causal=True),
        "global": global_tokens(n, [0, n // 2]),
        "random": rnd,
        "longformer": longformer(n, w, [0]),
        "bigbird": bigbird(n, b, min(1, nb), min(1, nb), seed=seed),
        "empty_rows": _canonical(sp.diags_array(keep, dtype=bool) @ rnd),
    }


def draw_pattern(rng: np.random.Generator, n: int) -> tuple[str, sp.csr_array]:
    """A builder chosen by ``rng`` with parameters drawn by ``rng``, applied to
    ``n``: ``(description, pattern)``. Hypothesis-free (a strategy can wrap it:
    ``st.integers(0, 2**32 - 1).map(lambda s: draw_pattern(np.random.default_rng(s), n))``)."""
    n = check_int(n, "n", minimum=1)
    kind = rng.choice(["local", "strided", "global", "random", "longformer", "bigbird", "union"])
    causal = bool(rng.integers(2))
    if kind == "local":
        w = int(rng.integers(0, n + 1))
        return f"local(n={n}, window={w}, causal={causal})", local(n, w, causal)
    if kind == "strided":
        s = int(rng.integers(1, n + 1))
        w = None if rng.integers(2) else int(rng.integers(0, n + 1))
        return f"strided(n={n}, stride={s}, window={w}, causal={causal})", strided(n, s, w, causal)
    if kind == "global":
        g = rng.choice(n, size=int(rng.integers(0, min(n, 4) + 1)), replace=False)
        return f"global_tokens(n={n}, indices={sorted(g.tolist())})", global_tokens(n, g)
    if kind == "random":
        r, seed = int(rng.integers(0, n + 1)), int(rng.integers(2**31))
        return f"random(n={n}, per_row={r}, seed={seed}, causal={causal})", random(n, r, seed, causal=causal)
    if kind == "longformer":
        w, dil = int(rng.integers(0, n + 1)), int(rng.integers(1, 4))
        g = rng.choice(n, size=int(rng.integers(0, min(n, 3) + 1)), replace=False)
        return (f"longformer(n={n}, window={w}, global_indices={sorted(g.tolist())}, dilation={dil}, "
                f"causal={causal})", longformer(n, w, g, dil, causal))
    if kind == "bigbird":
        b = int(rng.choice([d for d in range(1, n + 1) if n % d == 0]))
        nb = n // b
        r, g, wb = int(rng.integers(0, nb + 1)), int(rng.integers(0, nb + 1)), int(rng.integers(0, 6))
        seed = int(rng.integers(2**31))
        return (f"bigbird(n={n}, block_size={b}, n_random_blocks={r}, n_global_blocks={g}, "
                f"window_blocks={wb}, seed={seed}, causal={causal})", bigbird(n, b, r, g, wb, seed, causal))
    a_name, a = draw_pattern(rng, n)
    b_name, b = draw_pattern(rng, n)
    return f"union({a_name}, {b_name})", union(a, b)


# --------------------------------------------------------------------------- pictures


def to_ascii(pattern, on: str = "#", off: str = ".", max_size: int = 128) -> str:
    """The pattern as text, one line per query row, one character per key.

    Patterns larger than ``max_size`` on a side are drawn coarsened: a
    character stands for a block and is ``on`` when any entry of the block is
    allowed.
    """
    chars = np.where(to_image(pattern, max_size), on, off)
    return "\n".join("".join(row) for row in chars)


