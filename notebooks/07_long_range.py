# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # How fast, how much memory, how good: a small Long Range Arena
#
# Every chapter promises attention that is cheaper than $N^2$ *and still good*.
# This notebook runs the code of `benchmarks/bench_long_range.py` at a small size:
# three tasks generated from a seed (ListOps-mini, keyed retrieval, a local task),
# a two-block pre-norm model trained with this library's backward passes and a
# NumPy Adam, and the chart of the Long Range Arena paper: speed on one axis,
# average accuracy on the other, memory as the area of each point.
#
# The full run (docs page `long_range`) takes about an hour on two cores; by
# default this notebook trains three variants for a few steps at N = 64
# (`EA_FULL=1`: the full run's sizes, which take much longer).

# %%
import os
import pathlib
import sys

root = pathlib.Path(__file__).resolve().parent.parent if "__file__" in globals() else pathlib.Path("..").resolve()
sys.path.insert(0, str(root / "benchmarks"))
import bench_long_range as lra  # noqa: E402
import lra_tasks  # noqa: E402

FULL = os.environ.get("EA_FULL") == "1"

# %% [markdown]
# ## The tasks
#
# One sequence of each task at N = 32. ListOps-mini: digits 0–9 are tokens 1–10,
# `[MAX [MIN [MED [SM` are 11–14, `]` is 15, padding 0. Retrieval: noise 0–15,
# pair tokens 16–31 (key $k$ holds class $c$: $16 + 4k + c$), the queried key
# $32 + k$ fills the last quarter. Local: noise 0–15, label symbols 16–19, the marker 20.

# %%
names = {11: "[MAX", 12: "[MIN", 13: "[MED", 14: "[SM", 15: "]"}
tokens, labels = lra_tasks.listops(32, 1, seed=0)
print("ListOps-mini:", " ".join(names.get(int(t), str(int(t) - 1)) for t in tokens[0] if t), "=", labels[0])
for task in ("retrieval", "local"):
    tokens, labels = lra_tasks.TASKS[task].make(32, 1, seed=0)
    print(f"{task}:", tokens[0].tolist(), "class", labels[0])

# %% [markdown]
# ## Train a few variants on the three tasks

# %%
n, steps, batch = (256, 300, 16) if FULL else (64, 20, 8)
variants = lra.default_variants() if FULL else ["dense", "local", "linear_elu"]
records = [lra.run(task, name, n, seed=0, steps=steps, batch=batch, eval_size=64)
           for name in variants for task in lra_tasks.TASKS]
rows = lra.summary(records, list(lra_tasks.TASKS))
print(lra.results_table(rows, list(lra_tasks.TASKS)))

# %% [markdown]
# ## The chart
#
# The numbers beside the axes name the points, so no label covers another.

# %%
try:
    import matplotlib  # noqa: F401
    import tempfile
    out = pathlib.Path(os.environ.get("EA_CHART", pathlib.Path(tempfile.gettempdir()) / "long_range_notebook.png"))
    boxes = lra.draw_chart(rows, out, f"N = {n}, {steps} steps of {batch}, one seed")
    print("overlapping labels:", lra.overlaps(boxes))
    from efficient_attention.plot import show
    show(out)                                  # in Jupyter: the picture; in a script: nothing
except ImportError:
    print("matplotlib not installed: no chart")
