"""Every picture the library draws (matplotlib, optional: ``pip install 'efficient_attention[plot]'``).

The algorithm modules draw nothing and import no plotting code; the pictures
of the chapters live here:

=====================================  ===============================================================
function                               draws
=====================================  ===============================================================
:func:`plot_pattern`                   a pattern (or several, one colour each) as the N×N grid of
                                       cells the lecture draws (also :func:`patterns.plot
                                       <efficient_attention.patterns.plot>`)
:func:`plot_sort_matrix`               Sparse Sinkhorn's soft permutation ``P`` of the key blocks
:func:`hand_designed_figures`          chapter 1's pictures, ``01_*.png``
:func:`clustered_figures`              chapter 2's LSH and routing pictures, ``02_lsh_*.png``,
                                       ``02_routing.png``
=====================================  ===============================================================

Dependencies run one way: this module imports the chapters (the figures build
patterns and cores), a chapter never imports this module at import time.
matplotlib is imported inside the functions, so importing this module needs
no matplotlib; a function that draws raises an ``ImportError`` naming the
``plot`` extra when matplotlib is missing.
"""
from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp

from . import patterns as P
from .blocksparse import BlockMask
from .lsh import LSHAttention
from .routing import RoutingAttention
from .validate import check_csr

__all__ = ["COLORS", "plot_pattern", "plot_sort_matrix", "plot_tiles", "hand_designed_figures", "clustered_figures",
           "engine_figures"]

#: one colour per pattern (the lecture's: local, strided, global, random, ...)
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def _pyplot():
    """``matplotlib.pyplot``, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("drawing needs matplotlib, which is not installed: "
                          "pip install 'efficient_attention[plot]'") from exc
    return plt


# --------------------------------------------------------------------------- patterns (chapter 1)

def plot_pattern(pattern, ax=None, path=None, *, labels=None, colors=None, title=None, max_size: int = 256):
    """Draw a pattern (or several) the way the lecture does: an N×N grid of
    cells, query ``i`` down the rows, key ``j`` along the columns, allowed
    cells filled.

    Parameters
    ----------
    pattern : sparse (N, M) array or list of them
        Several patterns are drawn in one picture, one colour each; where
        they overlap the later one is on top.
    ax : matplotlib Axes, optional
        Drawn into; a new figure otherwise.
    path : str or Path, optional
        Save the figure there (PNG).
    labels, colors : list of str, optional
        Legend entries and colours, one per pattern (colours: :data:`COLORS`
        in turn by default).
    title : str, optional
    max_size : int
        Larger patterns are coarsened to blocks (a block is filled when any
        of its entries is allowed; :func:`~efficient_attention.patterns.to_image`).

    Returns
    -------
    The matplotlib ``Axes``; its image holds ``0`` where no pattern allows
    the entry and ``c`` where pattern ``c`` (from 1) is the last that does.
    Needs matplotlib (``pip install 'efficient_attention[plot]'``).
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    pats = list(pattern) if isinstance(pattern, (list, tuple)) else [pattern]
    if not pats:
        raise ValueError("pattern must be a sparse array or a non-empty list of them, got an empty list")
    for i, p in enumerate(pats):
        if not sp.issparse(p) or p.ndim != 2:
            raise TypeError(f"pattern[{i}] must be a 2-D scipy.sparse array, got {type(p).__name__}")
    n, m = pats[0].shape
    pats = [check_csr(p, n, m, f"pattern[{i}]") for i, p in enumerate(pats)]
    colors = list(colors) if colors is not None else [COLORS[i % len(COLORS)] for i in range(len(pats))]
    if len(colors) < len(pats):
        raise ValueError(f"colors must give one colour per pattern ({len(pats)}), got {len(colors)}")
    if labels is not None and len(labels) != len(pats):
        raise ValueError(f"labels must give one label per pattern ({len(pats)}), got {len(labels)}")
    layers = [P.to_image(p, max_size) for p in pats]
    img = np.zeros(layers[0].shape, np.int64)
    for c, layer in enumerate(layers, start=1):               # later patterns on top
        img[layer] = c
    if ax is None:
        side = 4.0 if max(img.shape) > 24 else 3.0
        fig, ax = plt.subplots(figsize=(side + (1.4 if labels else 0), side))
    else:
        fig = ax.figure
    cmap = ListedColormap(["white"] + colors[:len(pats)])
    ax.imshow(img, cmap=cmap, vmin=0, vmax=len(pats), interpolation="nearest", aspect="equal")
    rows, cols = img.shape
    if max(rows, cols) <= 64:                                  # the grid of cells
        ax.set_xticks(np.arange(-0.5, cols, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, rows, 1), minor=True)
        ax.grid(which="minor", color="#bbbbbb", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.xaxis.set_label_position("top")
    ax.set_xlabel(f"key j ({m})")
    ax.set_ylabel(f"query i ({n})")
    if title:
        ax.set_title(title, fontsize=10, pad=18)
    if labels:
        ax.legend(handles=[Patch(color=c, label=lab) for c, lab in zip(colors, labels)],
                  loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    if path is not None:
        fig.savefig(path, dpi=80, bbox_inches="tight")
    return ax


def hand_designed_figures(directory, n: int = 24) -> list:
    """Draw chapter 1's pictures with :func:`plot_pattern` into ``directory`` as
    ``01_*.png`` (the docs page shows them; ``notebooks/01_hand_designed_patterns.py``
    draws them); returns the paths. Needs matplotlib."""
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    paths = []

    def panels(name, items, width=2.6):
        fig, axes = plt.subplots(1, len(items), figsize=(width * len(items) + 1.2, width + 0.6))
        axes = np.atleast_1d(axes)
        for ax, (title, pats, labels) in zip(axes, items):
            plot_pattern(pats, ax=ax, labels=labels, title=title)
        fig.tight_layout()
        path = os.path.join(directory, f"01_{name}.png")
        fig.savefig(path, dpi=72)
        plt.close(fig)
        paths.append(path)

    w = 3
    panels("local_strided", [
        ("local, window 3", [P.local(n, w)], None),
        ("local, causal", [P.local(n, w, causal=True)], None),
        ("strided, stride 4", [P.strided(n, 4)], None),
        ("strided, causal", [P.strided(n, 4, causal=True)], None),
    ])
    panels("global_random", [
        ("global tokens 0, 12", [P.global_tokens(n, [0, n // 2])], None),
        ("random, 3 per row", [P.random(n, 3, 0)], None),
    ])
    panels("longformer", [
        ("Longformer", [P.local(n, w), P.global_tokens(n, [0])], ["window", "global"]),
        ("dilated (2)", [P.strided(n, 2, w), P.global_tokens(n, [0])], ["dilated window", "global"]),
    ], width=3.0)
    parts = P.bigbird_parts(32, 4, 1, 1, seed=1)
    panels("bigbird", [
        ("BigBird, blocks of 4", [parts["random"], parts["window"], parts["global"]],
         ["random", "window", "global"]),
    ], width=3.4)
    panels("per_head", [
        ("head 0: local", [P.local(n, 2)], None),
        ("head 1: strided", [P.strided(n, 5, causal=False)], None),
        ("head 2: global", [P.global_tokens(n, [0])], None),
        ("head 3: random", [P.random(n, 2, 0)], None),
    ])
    return paths


# --------------------------------------------------------------------------- clustered patterns (chapter 2)

def _clustered_queries(n, d, n_clusters, seed):
    """Queries around ``n_clusters`` random directions (the pictures' data: clear buckets)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d))
    return centers[rng.integers(0, n_clusters, n)] + 0.35 * rng.standard_normal((n, d))


def _pattern_image(pattern, label_rows, order=None):
    """Entries coloured by the row's label (1 + label), 0 where not allowed; rows and
    columns permuted by ``order`` when given."""
    dense = pattern.toarray()
    img = np.where(dense, 1 + label_rows[:, None], 0)
    if order is not None:
        img = img[np.ix_(order, order)]
    return img


def clustered_figures(directory, n: int = 48, seed: int = 0) -> list:
    """Draw chapter 2's pictures of LSH and routing attention (``02_lsh_sorting.png``,
    ``02_lsh_rounds.png``, ``02_routing.png``) into ``directory``; the docs page shows
    them and ``notebooks/02_clustered_patterns.py`` draws them. Needs matplotlib.
    Returns the paths."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    os.makedirs(directory, exist_ok=True)
    cmap = ListedColormap(["white"] + [plt.get_cmap("tab10")(i) for i in range(10)] * 4)
    paths = []

    def save(fig, name):
        fig.tight_layout()
        path = os.path.join(directory, name)
        fig.savefig(path, dpi=64)
        plt.close(fig)
        paths.append(path)

    def show(ax, img, title):
        ax.imshow(img, cmap=cmap, vmin=0, vmax=cmap.N - 1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])

    q = _clustered_queries(n, 8, 4, seed)
    chunk, n_buckets = 6, 8
    exact = LSHAttention(n_buckets, chunk_size=None, seed=seed)
    chunked = LSHAttention(n_buckets, chunk_size=chunk, seed=seed)
    b = exact.buckets(q)[0]
    order = np.argsort(b, kind="stable")
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.6))
    show(axes[0], _pattern_image(exact.pattern(q), b), "buckets, original order")
    show(axes[1], _pattern_image(exact.pattern(q), b, order), "buckets, sorted by (bucket, i)")
    img = _pattern_image(chunked.pattern(q), b, order)
    show(axes[2], img, f"chunks of {chunk} + previous chunk,\nsame bucket (sorted)")
    for c in range(1, -(-n // chunk)):
        for ax in axes[2:3]:
            ax.axhline(c * chunk - 0.5, color="0.7", lw=0.5)
            ax.axvline(c * chunk - 0.5, color="0.7", lw=0.5)
    show(axes[3], _pattern_image(chunked.pattern(q), b), "chunked, original order")
    save(fig, "02_lsh_sorting.png")

    fig, axes = plt.subplots(1, 3, figsize=(8.4, 3.2))
    for ax, rounds in zip(axes, (1, 2, 4)):
        core = LSHAttention(n_buckets, n_hashes=rounds, chunk_size=chunk, seed=seed)
        pat = core.pattern(q)
        show(ax, _pattern_image(pat, np.zeros(n, np.int64)),
             f"{rounds} round{'s' if rounds > 1 else ''}: {pat.nnz / n:.1f} keys/query")
    save(fig, "02_lsh_rounds.png")

    centroids = np.random.default_rng(seed + 1).standard_normal((4, 8))
    exact_r = RoutingAttention(centroids)
    topk = RoutingAttention(centroids, top_k=n // 4)
    cq = exact_r.assign(q)
    order_r = np.argsort(cq, kind="stable")
    fig, axes = plt.subplots(1, 3, figsize=(8.4, 3.2))
    show(axes[0], _pattern_image(exact_r.pattern(q, q), cq), "routing, original order")
    show(axes[1], _pattern_image(exact_r.pattern(q, q), cq, order_r), "sorted by cluster")
    show(axes[2], _pattern_image(topk.pattern(q, q), cq, order_r),
         f"balanced: top {n // 4} per centroid")
    save(fig, "02_routing.png")
    return paths


# --------------------------------------------------------------------------- learned patterns (chapter 2)

def plot_sort_matrix(p, ax=None, partner=None, title=None):
    """Draw Sparse Sinkhorn's sort matrix ``P`` (rows: query blocks ``c``, columns:
    key blocks ``c'``; :meth:`SinkhornAttention.sort_matrix
    <efficient_attention.sinkhorn.SinkhornAttention.sort_matrix>`) as a grey-scale
    picture, black where ``P`` is largest.

    Parameters
    ----------
    p : (n_b, n_b) array
    ax : matplotlib Axes, optional
        Drawn into; a new figure otherwise.
    partner : (n_b,) integer array, optional
        Marks entry ``(c, partner[c])`` of every row with a red ring (a target permutation).
    title : str, optional

    Returns
    -------
    The matplotlib ``Axes``. Needs matplotlib (``pip install 'efficient_attention[plot]'``).
    """
    plt = _pyplot()
    p = np.asarray(p)
    if p.ndim != 2:
        raise ValueError(f"p must be a 2-D array (query blocks, key blocks), got shape {p.shape}")
    if partner is not None:
        partner = np.asarray(partner)
        if partner.shape != (p.shape[0],):
            raise ValueError(f"partner must give one key block per row of p, shape ({p.shape[0]},), "
                             f"got shape {partner.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(p, cmap="Greys", vmin=0, vmax=max(1e-12, float(p.max())))
    if partner is not None:
        ax.scatter(partner, np.arange(len(partner)), s=80, facecolors="none",
                   edgecolors="red", linewidths=1)
    ax.set_xlabel("key block c'")
    ax.set_ylabel("query block c")
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_tiles(mask: BlockMask, ax=None, path=None, *, title=None, head: int = 0, max_size: int = 256):
    """Draw the tile layout of a :class:`~efficient_attention.BlockMask` (slice ``head``) as the
    engine computes it (:meth:`~efficient_attention.BlockMask.tile_map`): skipped tiles white,
    full tiles blue, partial tiles orange, thin tiles computed pair by pair red, the allowed
    entries dark on top. Returns the Axes; ``path`` saves the figure."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    n, m = mask.shape[-2:]
    bq, bk = mask.block_size
    kinds = mask.tile_map(head)                                        # (N/b_q, M/b_k)
    if ax is None:
        fig, ax = plt.subplots(figsize=(3.6, 3.6))
    else:
        fig = ax.figure
    colors = ["white", "#2f6db5", "#f0a04b", "#d62728"]
    ax.imshow(kinds, cmap=ListedColormap(colors), vmin=0, vmax=3, interpolation="nearest",
              extent=(0, kinds.shape[1] * bk, kinds.shape[0] * bq, 0))
    dense = mask.to_dense().reshape((-1, n, m))[head]                  # small masks only
    fr, fc = max(1, -(-n // max_size)), max(1, -(-m // max_size))
    img = np.zeros((-(-n // fr), -(-m // fc)), bool)
    rows, cols = np.nonzero(dense)
    img[rows // fr, cols // fc] = True
    ax.imshow(np.ma.masked_where(~img, img), cmap=ListedColormap(["#1f2d3d"]), interpolation="nearest",
              extent=(0, img.shape[1] * fc, img.shape[0] * fr, 0), alpha=0.45)
    ax.set_xlim(0, m)
    ax.set_ylim(n, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.xaxis.set_label_position("top")
    ax.set_xlabel(f"key j ({m}), tiles of {bk}", fontsize=8)
    ax.set_ylabel(f"query i ({n}), tiles of {bq}", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9, pad=16)
    ax.legend(handles=[Patch(color=c, label=lab) for c, lab in zip(colors[1:], ["full tile", "partial tile",
                                                                             "thin: pair by pair"])],
              loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=6, frameon=False)
    if path is not None:
        fig.savefig(path, dpi=80, bbox_inches="tight")
    return ax


def engine_figures(directory, n: int = 1024) -> list:
    """Draw the tile pictures of chapter 1's section "one engine, many masks" into ``directory``
    (``01_engine_tiles.png``: Longformer, BigBird and a causal document mask); returns the paths."""
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    bounds = (np.array([0, 0.22, 0.30, 0.60, 0.65, 0.85, 1.0]) * n).astype(int)      # 6 documents
    docs = np.repeat(np.arange(6), np.diff(bounds))

    def document(b, h, q_idx, kv_idx):
        return (docs[q_idx] == docs[kv_idx]) & (kv_idx <= q_idx)
    masks = [("Longformer: window 64, tokens 0 and N/2",
              BlockMask.from_pattern(P.longformer(n, 64, [0, n // 2]))),
             ("BigBird: blocks of 64, 2 random, 1 global",
              BlockMask.from_pattern(P.bigbird(n, 64, 2, 1, seed=3))),
             ("documents, causal (a mask_mod)", BlockMask.from_mask_mod(document, n))]
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 4.0))
    for ax, (title, mask) in zip(axes, masks):
        plot_tiles(mask, ax=ax, title=f"{title}\n{mask.block_size[0]}×{mask.block_size[1]} tiles, "
                                      f"density {mask.density:.2f}")
    fig.tight_layout()
    path = os.path.join(directory, "01_engine_tiles.png")
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return [path]

