# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # More than one machine: attention over dask arrays
#
# Every core of the library runs in one process. `DistributedAttention(core)` runs it over
# dask arrays whose chunks are the shards, as a graph of tasks that dask's default scheduler
# or a `dask.distributed` cluster executes. Batch and heads are independent; the sequence
# shards too, with a recipe per family:
#
# * **halo** (local, strided): a shard plus `window` (× stride) rows of its neighbours is a
#   complete problem; the backward adds the halo's key gradients back to the neighbours;
# * **pairwise merge** (dense): partial outputs per (query shard, key shard) pair, merged
#   exactly by their log-sum-exp, $O = \sum_b e^{\ell_b - \ell} O_b$;
# * **state scan** (linear attention): each shard starts from the sums
#   $(S_{<a}, z_{<a})$ of the shards before it.
#
# This notebook checks each recipe against the single-process core, looks at the graph,
# runs it on a 2-worker `LocalCluster`, and draws the three pictures of the docs page.
#
# Run headless: `MPLBACKEND=Agg python notebooks/08_distributed.py` (`EA_FULL=1` for larger
# sizes; `EA_SAVE_IMG=1` rewrites `docs/img/08_*.png`).

# %%
import os
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np

import efficient_attention as ea
from efficient_attention import bench
from efficient_attention.distributed import DistributedAttention
from efficient_attention.plot import show

FULL = os.environ.get("EA_FULL") == "1"
SAVE = os.environ.get("EA_SAVE_IMG") == "1"
IMG = Path(__file__).resolve().parent.parent / "docs" / "img" if "__file__" in globals() else Path("../docs/img")

# %% [markdown]
# ## Shards are chunks
#
# `q, k, v` are dask arrays of shape `(B, H, N, D)`; their chunks along `N` are the sequence
# shards (uneven shards are fine), along `B, H` independent blocks. Nothing is computed
# until we ask.

# %%
if __name__ == "__main__":                       # workers re-import this file (see "On a cluster")
    n, heads, d = (4096, 4, 32) if FULL else (512, 2, 16)
    shard = n // 8
    rng = np.random.default_rng(0)
    q_np, k_np, v_np, dout_np = (rng.standard_normal((2, heads, n, d)) for _ in range(4))
    q, k, v, dout = (da.from_array(x, chunks=(1, heads, shard, d)) for x in (q_np, k_np, v_np, dout_np))
    print("q:", q.shape, "chunks along N:", q.chunks[2])

# %% [markdown]
# ## Each recipe against the single-process core
#
# Forward and backward (float64): the largest difference from the core on the whole arrays.

# %%
if __name__ == "__main__":                       # workers re-import this file (see "On a cluster")
    cores = {
        "local, window 24": ea.LocalAttention(window=24),
        "strided 4, window 8 (reach 32)": ea.StridedAttention(stride=4, window=8),
        "dense": ea.DenseAttention(),
        "dense causal": ea.DenseAttention(causal=True),
        "linear elu+1": ea.LinearAttention(ea.EluFeatureMap()),
        "linear elu+1 causal": ea.LinearAttention(ea.EluFeatureMap(), causal=True),
    }
    rows = []
    for name, core in cores.items():
        dist = DistributedAttention(core)
        out, cache = dist.forward(q, k, v)
        grads = dist.backward(cache, dout)
        t0 = time.perf_counter()
        got_out, got = dask.compute(out, grads)              # one compute: the forward runs once
        elapsed = time.perf_counter() - t0
        ref_out, ref_cache = core.forward(q_np, k_np, v_np)
        ref = core.backward(ref_cache, dout_np)
        err = max(np.max(np.abs(a - b)) for a, b in zip((got_out, *got[:3]), (ref_out, *ref[:3])))
        rows.append({"core": name, "sharding": cache.sharding, "tasks": len(dict(grads.dq.__dask_graph__())),
                     "max |difference|": err, "seconds (threads)": elapsed})
        assert err < 1e-10, (name, err)
    print(bench.markdown_table(rows))

# %% [markdown]
# ## The graph is lazy
#
# `forward` and `backward` only build graphs. Tasks have names after what they do: the
# halo path's `halo-forward-task`, the pairwise path's `pair-forward` and `merge-two`, the
# scan's `kv-state` and `add-tuples`.

# %%
from collections import Counter  # noqa: E402

if __name__ == "__main__":
    out, cache = DistributedAttention(ea.DenseAttention(causal=True)).forward(q, k, v)
    keys = [key[0] for key in dict(out.__dask_graph__()) if isinstance(key, tuple) and key[0].startswith("ea-")]
    print(dict(Counter(name.rsplit("-", 1)[0].removeprefix("ea-") for name in keys)))

# %% [markdown]
# ## On a cluster
#
# (A script that starts worker *processes* needs the `if __name__ == "__main__":` guard
# around its work, as the cells of this notebook have: each worker re-imports the main
# module, and must not run the work again.)
#
# The same graphs run on a `dask.distributed` cluster. A `LocalCluster` starts worker
# processes on this machine; `Client("tcp://scheduler-address:8786")` connects to a real
# cluster instead (start one with `dask scheduler` and `dask worker tcp://...` on each
# machine, or with dask-jobqueue / dask-kubernetes). The task stream says where each task
# ran and how large its result was: no task holds a whole `q`, `k` or `v`.

# %%
from distributed import Client, LocalCluster, futures_of, get_task_stream  # noqa: E402

if __name__ == "__main__":                       # workers re-import the main module
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        dist = DistributedAttention(ea.LocalAttention(window=24))
        out, cache = dist.forward(q, k, v)
        grads = dist.backward(cache, dout)
        with get_task_stream(client) as ts:
            kept = client.persist([out, *grads[:3]])
            client.gather(futures_of(kept))
        per_worker = Counter(t["worker"] for t in ts.data)
        largest = max(t["nbytes"] for t in ts.data)
        print("tasks per worker:", dict(per_worker))
        print(f"largest task result {largest / 1024:.0f} KiB; one shard of q: {q.blocks[0, 0, 0].nbytes / 1024:.0f} KiB,"
              f" all of q: {q.nbytes / 1024:.0f} KiB")
        got = client.compute(kept[0], sync=True)
        print("max |difference| from the core:", np.max(np.abs(got - ea.LocalAttention(window=24)(q_np, k_np, v_np))))

# %% [markdown]
# ## Pictures of the three shardings

# %%
try:
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
except ImportError:                               # matplotlib is the optional extra "plot"
    plt = None


def _grid(ax, n_shards, title):
    ax.set_xlim(0, n_shards)
    ax.set_ylim(n_shards, 0)
    ax.set_aspect("equal")
    ax.set_xticks(np.arange(n_shards) + 0.5, [f"k{j}" for j in range(n_shards)], fontsize=7)
    ax.set_yticks(np.arange(n_shards) + 0.5, [f"q{i}" for i in range(n_shards)], fontsize=7)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9)
    for x in range(n_shards + 1):
        ax.axhline(x, color="0.8", lw=0.6)
        ax.axvline(x, color="0.8", lw=0.6)


def draw_halo(path):
    """Local attention on 4 shards: the band, shard 1's rows and its halo."""
    fig, ax = plt.subplots(figsize=(3.2, 3.2))
    _grid(ax, 4, "halo: shard 1 + window rows")
    w = 0.35
    band = np.array([[0, 0], [w, 0], [4, 4 - w], [4, 4], [4 - w, 4], [0, w]])
    ax.add_patch(plt.Polygon(band, color="0.85"))
    ax.add_patch(Rectangle((1 - w, 1), 2 + 2 * w - 1, 1, color="tab:orange", alpha=0.35, lw=0))
    ax.add_patch(Rectangle((1, 1), 1, 1, fill=False, ec="tab:red", lw=1.5))
    ax.annotate("halo", (1 - w / 2, 1.5), ha="center", va="center", fontsize=7, rotation=90)
    ax.annotate("halo", (2 + w / 2, 1.5), ha="center", va="center", fontsize=7, rotation=90)
    ax.text(2, 3.6, "backward: the halo's dK, dV\nare added to shards 0 and 2", ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    show(fig)


def draw_pairs(path):
    """Causal dense attention on 4 shards: one task per pair on or below the diagonal, then a
    log-sum-exp merge per query shard."""
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    _grid(ax, 4, "pairwise: partials merged by lse")
    for i in range(4):
        for j in range(i + 1):
            color = "tab:blue" if j < i else "tab:cyan"              # diagonal pairs: causal mask
            ax.add_patch(Rectangle((j + 0.06, i + 0.06), 0.88, 0.88, color=color, alpha=0.45, lw=0))
            ax.text(j + 0.5, i + 0.5, f"$O_{{{i}{j}}}, \\ell_{{{i}{j}}}$", ha="center", va="center", fontsize=6)
        ax.annotate(f"merge $\\to O_{i}$", xy=(4.05, i + 0.5), xycoords="data", ha="left", va="center",
                    fontsize=7, color="tab:red", annotation_clip=False)
    ax.text(2.6, 0.5, "skipped\n(above the diagonal)", ha="center", va="center", fontsize=7, color="0.4")
    ax.set_xlabel(r"$O_i = \sum_j e^{\ell_{ij}-\ell_i} O_{ij},\ \ell_i = \log\sum_j e^{\ell_{ij}}$", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    show(fig)


def draw_scan(path):
    """Causal linear attention on 4 shards: per-shard states, an exclusive scan, the shards."""
    fig, ax = plt.subplots(figsize=(5.2, 2.0))
    ax.set_xlim(0, 4)
    ax.set_ylim(0, 2)
    ax.axis("off")
    ax.set_title("state scan: shard a starts from the sums of the shards before it", fontsize=9)
    for a in range(4):
        ax.add_patch(Rectangle((a + 0.08, 0.15), 0.84, 0.6, color="tab:green", alpha=0.35, lw=0))
        ax.text(a + 0.5, 0.45, f"shard {a}\nlocal scan", ha="center", va="center", fontsize=7)
        ax.add_patch(Rectangle((a + 0.25, 1.2), 0.5, 0.45, color="tab:purple", alpha=0.35, lw=0))
        ax.text(a + 0.5, 1.42, f"$S_{{<{a}}}, z_{{<{a}}}$", ha="center", va="center", fontsize=7)
        ax.annotate("", xy=(a + 0.5, 0.77), xytext=(a + 0.5, 1.18), arrowprops={"arrowstyle": "->"})
        if a < 3:
            ax.annotate("", xy=(a + 1.25, 1.42), xytext=(a + 0.75, 1.42),
                        arrowprops={"arrowstyle": "->", "color": "tab:purple"})
            ax.text(a + 1.0, 1.72, f"$+\\varphi(K_{a})^\\top V_{a}$", ha="center", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    show(fig)


if plt is not None and __name__ == "__main__":
    out_dir = IMG if SAVE else Path(os.environ.get("TMPDIR", "/tmp"))
    for name, draw in (("halo", draw_halo), ("pairs", draw_pairs), ("scan", draw_scan)):
        path = out_dir / f"08_{name}.png"
        draw(path)
        print("drew", path)
