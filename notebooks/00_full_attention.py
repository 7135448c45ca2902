# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Chapter 0 — full attention, the oracle
#
# Every query $q_i$ scores every key $k_j$, the scores go through a softmax over
# the keys, and the output is the weighted mean of the values:
#
# $$ O = \operatorname{softmax}\!\big(s\,QK^\top + \text{mask}\big)\,V, \qquad s = 1/\sqrt{D}. $$
#
# The $N \times M$ score matrix costs $2NM(D + D_v)$ FLOPs and $NM$ memory: the
# quadratic cost every later chapter removes. This notebook derives the
# backward pass, checks it, draws the attention matrix and times it.
# Run it as a script (`python notebooks/00_full_attention.py`); `EA_FULL=1`
# uses the full sizes.

# %%
import os
import time

import numpy as np

import efficient_attention as ea

FULL = os.environ.get("EA_FULL") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## Forward, and the same thing written as a loop
# The oracle is `DenseAttention`; here it is checked against the definition
# written as plainly as possible, one query at a time.

# %%
n, d = 6, 4
q, k, v = (rng.standard_normal((n, d)) for _ in range(3))
out, cache = ea.DenseAttention(causal=True).forward(q, k, v)

loop = np.zeros_like(out)
for i in range(n):
    s = np.array([q[i] @ k[j] / np.sqrt(d) for j in range(i + 1)])   # causal: keys j <= i
    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    loop[i] = p @ v[: i + 1]
print("max |oracle - loop| =", np.abs(out - loop).max())
assert np.allclose(out, loop, rtol=1e-12, atol=1e-12)

# %% [markdown]
# ## Backward, one chain-rule step a line
# With $P = \operatorname{softmax}(S)$, $O = PV$ and upstream gradient $dO$:
#
# $$ dV = P^\top dO,\quad dP = dO\,V^\top,\quad dS = P \odot (dP - \operatorname{rowsum}(P\odot dP)),
#    \quad dQ = s\,dS\,K,\quad dK = s\,dS^\top Q. $$
#
# The cache keeps the per-row log-sum-exp, not $P$; backward recomputes $P$.
# `ea.gradcheck` compares the hand-written backward with central differences.

# %%
err = ea.gradcheck(ea.DenseAttention(causal=True), (q, k, v), full=True)
print({name: f"{e:.1e}" for name, e in err.items()})
assert max(err.values()) < 1e-6

# %% [markdown]
# ## The picture: which (query, key) pairs are computed
# Full attention computes all $N^2$ entries (causal: the lower triangle).

# %%
try:
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
if plt is not None:
    from efficient_attention.plot import show
    n_pic = 16
    qp, kp = rng.standard_normal((2, n_pic, 8))
    probs = ea.softmax.softmax(qp @ kp.T / np.sqrt(8), ea.causal_mask(n_pic))
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.5))
    axes[0].imshow(np.ones((n_pic, n_pic)), cmap="Blues", vmin=0, vmax=1.5)
    axes[0].set_title("full: all N² pairs")
    axes[1].imshow(probs, cmap="Blues")
    axes[1].set_title("causal: softmax weights")
    for ax in axes:
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    fig.tight_layout()
    show(fig)                      # in Jupyter: the picture; in a script: closed

# %% [markdown]
# ## Time it: quadratic in N

# %%
sizes = [512, 1024, 2048, 4096] if FULL else [128, 256, 512]
for n in sizes:
    q, k, v = (rng.standard_normal((2, n, 64)).astype(np.float32) for _ in range(3))
    core = ea.DenseAttention()
    t0 = time.perf_counter()
    out, cache = core.forward(q, k, v)
    core.backward(cache, out)
    dt = time.perf_counter() - t0
    print(f"N = {n:5d}: forward+backward {1e3 * dt:7.1f} ms, {core.cost(n, 64).memory * 2 * 4 / 2**20:6.1f} MB of scores")
