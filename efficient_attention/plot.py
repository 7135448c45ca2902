"""Every picture the library draws (matplotlib, optional: ``pip install 'efficient_attention[plot]'``).

The algorithm modules draw nothing; the drawing lives here, given the objects to draw:

=====================================  ===============================================================
function                               draws
=====================================  ===============================================================
:func:`plot_pattern`                   a pattern (or several, one colour each) as the N×N grid of
                                       cells the lecture draws (also :func:`patterns.plot
                                       <efficient_attention.patterns.plot>`)
:func:`plot_tiles`                     a :class:`~efficient_attention.BlockMask`'s tile layout
:func:`plot_sort_matrix`               Sparse Sinkhorn's soft permutation ``P`` of the key blocks
:func:`to_image`                       a pattern as a (coarsened) boolean image, what
                                       :func:`plot_pattern` draws and ``patterns.to_ascii`` prints
=====================================  ===============================================================

Dependencies run one way: this module imports no chapter (it draws what it is given), so the
chapters may use it (``patterns.plot`` is :func:`plot_pattern`); the chapters' figures for the
documentation, which build patterns and cores, are in :mod:`efficient_attention.figures`, above
the chapters. matplotlib is imported inside the functions, so importing this module needs no
matplotlib; a function that draws raises an ``ImportError`` naming the ``plot`` extra when
matplotlib is missing.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .validate import check_csr, check_int, check_patterns

__all__ = ["COLORS", "pyplot", "show", "to_image", "plot_pattern", "plot_sort_matrix", "plot_tiles"]

#: one colour per pattern (the lecture's: local, strided, global, random, ...)
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def to_image(pattern, max_size: int | None = None) -> np.ndarray:
    """The pattern as a dense boolean ``(rows, cols)`` array: what
    :func:`efficient_attention.patterns.to_ascii` prints and :func:`plot_pattern` draws.

    With ``max_size``, a side longer than ``max_size`` is coarsened to at most
    ``max_size`` cells: a cell stands for a block of entries and is True when
    any entry of the block is allowed. ``None`` keeps every entry.
    """
    if not sp.issparse(pattern) or pattern.ndim != 2:
        raise TypeError(f"pattern must be a 2-D scipy.sparse array, got {type(pattern).__name__}")
    n, m = pattern.shape
    pattern = check_csr(pattern, n, m)
    if max_size is not None:
        max_size = check_int(max_size, "max_size", minimum=1)
    fr = -(-n // max_size) if max_size is not None and n > max_size else 1
    fc = -(-m // max_size) if max_size is not None and m > max_size else 1
    if fr == 1 and fc == 1:
        return pattern.toarray()
    coo = sp.coo_array(pattern)
    img = np.zeros((-(-n // fr), -(-m // fc)), bool)
    img[coo.row // fr, coo.col // fc] = True
    return img


def pyplot():
    """``matplotlib.pyplot``, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("drawing needs matplotlib, which is not installed: "
                          "pip install 'efficient_attention[plot]'") from exc
    return plt


def show(figure) -> None:
    """Show a figure (or a saved picture, given its path) in a running Jupyter notebook, then
    close the figure; in a script or a test it only closes it.

    The notebooks call it after each picture: the rendered docs show the picture, a headless
    run (``MPLBACKEND=Agg python notebooks/...``) draws nothing on screen and keeps no figure open.
    """
    import os
    import sys
    shell = sys.modules["IPython"].get_ipython() if "IPython" in sys.modules else None
    in_notebook = getattr(shell, "kernel", None) is not None
    if isinstance(figure, (str, os.PathLike)):
        if in_notebook:
            from IPython.display import Image, display
            display(Image(filename=os.fspath(figure)))
        return
    if in_notebook:                       # as a PNG, whatever backend the notebook switched to
        import io
        from IPython.display import Image, display
        png = io.BytesIO()
        figure.savefig(png, format="png", bbox_inches="tight")
        display(Image(data=png.getvalue()))
    pyplot().close(figure)


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
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    pats, (n, m), _ = check_patterns(pattern)
    pats = [check_csr(p, n, m, f"pattern[{i}]") for i, p in enumerate(pats)]
    colors = list(colors) if colors is not None else [COLORS[i % len(COLORS)] for i in range(len(pats))]
    if len(colors) < len(pats):
        raise ValueError(f"colors must give one colour per pattern ({len(pats)}), got {len(colors)}")
    if labels is not None and len(labels) != len(pats):
        raise ValueError(f"labels must give one label per pattern ({len(pats)}), got {len(labels)}")
    layers = [to_image(p, max_size) for p in pats]
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
    plt = pyplot()
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


def plot_tiles(mask, ax=None, path=None, *, title=None, head: int = 0, max_size: int = 256):
    """Draw the tile layout of a :class:`~efficient_attention.BlockMask` (slice ``head``) as the
    engine computes it (:meth:`~efficient_attention.BlockMask.tile_map`): skipped tiles white,
    full tiles blue, partial tiles orange, thin tiles computed pair by pair red, the allowed
    entries dark on top. Returns the Axes; ``path`` saves the figure."""
    plt = pyplot()
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


