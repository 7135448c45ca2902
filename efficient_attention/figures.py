"""The chapters' figures for the documentation (``docs/img/``), drawn by the notebooks.

Each function builds the chapter's patterns or cores and draws them with
:mod:`efficient_attention.plot` (matplotlib, optional: ``pip install
'efficient_attention[plot]'``) into ``directory``, returning the paths written.
This module sits above the chapters (it builds their objects); :mod:`~efficient_attention.plot`
sits below them (it only draws what it is given).
"""
from __future__ import annotations

import os

import numpy as np

from . import patterns as P
from .blocksparse import BlockMask
from .lsh import LSHAttention
from .plot import plot_pattern, plot_tiles, pyplot
from .routing import RoutingAttention

__all__ = ["hand_designed_figures", "clustered_figures", "engine_figures"]


def hand_designed_figures(directory, n: int = 24) -> list:
    """Draw chapter 1's pictures with :func:`plot_pattern` into ``directory`` as
    ``01_*.png`` (the docs page shows them; ``notebooks/01_hand_designed_patterns.py``
    draws them); returns the paths. Needs matplotlib."""
    plt = pyplot()
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
    plt = pyplot()
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


def engine_figures(directory, n: int = 1024) -> list:
    """Draw the tile pictures of chapter 1's section "one engine, many masks" into ``directory``
    (``01_engine_tiles.png``: Longformer, BigBird and a causal document mask); returns the paths."""
    plt = pyplot()
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
