# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # How fast, how much memory, how good: a small long-range benchmark
#
# Every chapter promises attention that is cheaper than $N^2$ *and still good*.
# This notebook trains a tiny model with each variant on a task that needs
# long-range information, using only this library's backward passes and a
# NumPy Adam, and draws the lecture's chart: speed on one axis, accuracy on the
# other, memory as the size of each point.
#
# **Task (marker retrieval).** Noise tokens, one label token (4 classes) in
# the first half of the sequence, and a query token at the last position; the
# class must travel at least $N/2$ positions to be read out at the end.
#
# The full run (`python benchmarks/bench_long_range.py --chart docs/img/long_range.png`,
# N = 1024 and 4096, every registered variant) takes tens of minutes; by
# default this notebook runs a few variants at a small N (`EA_FULL=1` for all).

# %%
import os
import pathlib
import sys

import numpy as np

import efficient_attention as ea

root = pathlib.Path(__file__).resolve().parent.parent if "__file__" in globals() else pathlib.Path("..").resolve()
sys.path.insert(0, str(root / "benchmarks"))
import bench_long_range as lr  # noqa: E402

FULL = os.environ.get("EA_FULL") == "1"

# %% [markdown]
# ## The data

# %%
tokens, labels = lr.make_batch(np.random.default_rng(0), 2, 24)
print(tokens)
print("labels:", labels, "(label token = 1 + class, query token = 0 at the end)")

# %% [markdown]
# ## Train a few variants

# %%
n = 1024 if FULL else 64
steps = 150 if FULL else 40
registry = ea.registry()
names = list(registry) if FULL else [v for v in ("dense", "local", "linear_elu", "mha_dense") if v in registry]
rows = []
for name in names:
    row = {"variant": name, "N": n, **lr.train_variant(registry[name], n, steps=steps)}
    rows.append(row)
from efficient_attention import bench  # noqa: E402
print(bench.markdown_table(rows, ["variant", "N", "accuracy", "ms/step", "peak MB", "first loss", "last loss"]))

# %% [markdown]
# ## The chart

# %%
try:
    import matplotlib  # noqa: F401
    out = pathlib.Path(os.environ.get("EA_CHART", "/tmp/long_range_notebook.png"))
    lr.draw_chart(rows, out)
    print("chart written to", out)
except ImportError:
    print("matplotlib not installed: no chart")
