# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Chapter 2 — clustered patterns: Reformer LSH and Routing attention
#
# Instead of fixing the pattern by hand (chapter 1), put queries and keys into
# clusters and compute only the pairs inside a cluster. Reformer (Kitaev et al.
# 2020, arXiv:2001.04451) clusters with a random angular hash and needs no
# training; the Routing Transformer (Roy et al. 2021, arXiv:2003.05997) learns
# the clusters with online k-means.
#
# This notebook checks both against the dense oracle masked with the pattern
# they claim, shows why sorting by bucket turns the scattered pattern into
# a band of chunks, shows the duplicate correction across hash rounds, trains
# routing centroids with `kmeans_update`, and times LSH against dense attention.
# Run headless: `MPLBACKEND=Agg python notebooks/02_clustered_patterns.py`
# (`EA_FULL=1` for larger sizes).

# %%
import os
import time
from pathlib import Path

import numpy as np

import efficient_attention as ea
from efficient_attention import bench
from efficient_attention.dense import DenseAttention
from efficient_attention.lsh import LSHAttention, hash_buckets
from efficient_attention.figures import clustered_figures
from efficient_attention.plot import show
from efficient_attention.routing import RoutingAttention, kmeans_update

FULL = os.environ.get("EA_FULL") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
IMG = HERE.parent / "docs" / "img"
rng = np.random.default_rng(0)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# %% [markdown]
# ## Angular LSH, written as a loop
# For round $r$ with rotations $R_r \in \mathbb{R}^{D\times C/2}$,
# $h_r(x) = \operatorname{argmax}[xR_r, -xR_r]$: the index of the closest of the
# $C$ directions $\pm$ (columns of $R_r$). Close vectors (small angle) tend to
# share it.

# %%
n, d, C, R = 40, 6, 8, 3
q = rng.standard_normal((1, n, d))
rot = rng.standard_normal((R, d, C // 2))
loop = np.array([[max(range(C), key=lambda c: (q[0, i] @ rot[r][:, c % (C // 2)]) * (1 if c < C // 2 else -1))
                  for i in range(n)] for r in range(R)])
assert np.array_equal(hash_buckets(q, rot)[0], loop)
print("buckets of the first 12 tokens, round 0:", loop[0, :12])

# %% [markdown]
# ## Exact bucket attention equals masked dense attention
# `chunk_size=None`: query $i$ sees key $j$ iff they share a bucket in at least
# one round. With shared QK the keys are $q_j/\lVert q_j\rVert$ and a token sees
# itself only when it has nothing else.

# %%
v = rng.standard_normal((1, n, 4))
core = LSHAttention(C, n_hashes=R, chunk_size=None, rotations=rot)
b = core.buckets(q)[0]                                     # (R, N)
mask = (b[:, :, None] == b[:, None, :]).any(0)
np.fill_diagonal(mask, False)
lonely = ~mask.any(1)
mask[lonely, lonely] = True
ref = DenseAttention()(q[0], unit(q[0]), v[0], mask=mask)
print("exact mode vs masked dense:", np.abs(core(q, None, v)[0] - ref).max())

# %% [markdown]
# ## Sorting turns buckets into chunks
# Sorted by (bucket, position), every bucket is a contiguous run: the pattern
# becomes block diagonal (second panel). Buckets have unequal sizes, so the
# efficient algorithm cuts the sorted sequence into equal **chunks** instead
# and lets each chunk see itself and the previous chunk, keeping same-bucket
# keys only (third panel): at most $2c$ keys per query, whatever the bucket
# sizes. We do **not** wrap around (chunk 0 does not see the last chunk).

# %%
if os.environ.get("EA_SAVE_IMG") == "1":      # rewrite docs/img/02_lsh_*.png, 02_routing.png (off in CI)
    img_dir = IMG
else:
    import tempfile
    img_dir = Path(tempfile.mkdtemp(prefix="ea_clustered_"))
paths = clustered_figures(img_dir)
print("\n".join(str(p) for p in paths))
show(img_dir / "02_lsh_sorting.png")           # in Jupyter: the picture (the others further down)

# %% [markdown]
# The chunked output equals dense attention masked with `pattern()`, for shared
# and separate QK, causal or not, and `N` not a multiple of the chunk (the last
# chunk is shorter):

# %%
for shared in (True, False):
    for causal in (False, True):
        core = LSHAttention(C, n_hashes=R, chunk_size=7, causal=causal, shared_qk=shared, seed=1)
        k = rng.standard_normal((n, d))
        out = core(q[0], None if shared else k, v[0])
        pat = core.pattern(q[0], None if shared else k)
        keys = unit(q[0]) if shared else k
        err = np.abs(out - DenseAttention()(q[0], keys, v[0], mask=pat.toarray())).max()
        print(f"shared={shared!s:5} causal={causal!s:5}  keys/query {pat.nnz / n:5.1f}  error {err:.1e}")

# %% [markdown]
# ## Rounds and the duplicate correction
# Each round computes its own softmax over its pairs; with
# $\mathrm{lse}_r$ the round's log-sum-exp, $o = \sum_r e^{\mathrm{lse}_r - L} o_r$ is
# one softmax over the union — **if** a pair found in $n_{ij}$ rounds enters each
# of them with $s_{ij} - \log n_{ij}$. Three identical rounds must then give the
# one-round answer:

# %%
one = LSHAttention(C, n_hashes=1, chunk_size=7, rotations=rot[:1])
three = LSHAttention(C, n_hashes=3, chunk_size=7, rotations=np.repeat(rot[:1], 3, 0))
print("3 identical rounds vs 1:", np.abs(one(q, None, v) - three(q, None, v)).max())

# %% [markdown]
# More rounds find more of each query's near neighbours, so LSH approaches
# full attention (without self, as LSH's rule) on data with structure: queries
# near a few directions, scaled so that the softmax is peaked:

# %%
xq = np.random.default_rng(3).standard_normal((8, 8))[np.random.default_rng(4).integers(0, 8, 256)]
xq = 8 * (xq + 0.3 * np.random.default_rng(5).standard_normal(xq.shape))[None]
xv = np.random.default_rng(6).standard_normal((1, 256, 8))
full = DenseAttention()(xq, unit(xq), xv, mask=~np.eye(256, dtype=bool))
for rounds in (1, 2, 4, 8):
    exact = LSHAttention(16, n_hashes=rounds, chunk_size=None)(xq, None, xv)
    chunked = LSHAttention(16, n_hashes=rounds, chunk_size=32)(xq, None, xv)
    print(f"{rounds} rounds: relative error vs full attention: exact buckets "
          f"{bench.rel_error(exact, full):.3f}, chunks of 32 {bench.rel_error(chunked, full):.3f}")

show(img_dir / "02_lsh_rounds.png")

# %% [markdown]
# ## Gradients
# Buckets are piecewise constant, so the backward pass differentiates the
# masked softmax with the buckets fixed; with shared QK the key gradient flows
# into `dq` through $k = q/\lVert q\rVert$.

# %%
core = LSHAttention(4, n_hashes=2, chunk_size=4)
qs, vs = rng.standard_normal((2, 20, 4)), rng.standard_normal((2, 20, 3))
err = ea.gradcheck(lambda q, v: core.forward(q, None, v),
                   (qs, vs), lambda c, g: (lambda gr: (gr.dq, gr.dv))(core.backward(c, g)))
print("gradcheck, shared QK:", err)

# %% [markdown]
# ## Routing attention
# Centroids $\mu_c$, tokens routed to $\operatorname{argmax}_c \hat x\cdot\hat\mu_c$.
# Exact clusters are unbalanced (one cluster can take most tokens: quadratic
# again); `top_k` gives every centroid its $w$ nearest queries and keys.
# `kmeans_update` is the online spherical k-means step that trains the centroids:

# %%
true = unit(np.random.default_rng(7).standard_normal((4, 8)))
x = true[np.random.default_rng(8).integers(0, 4, 512)]
x = x + 0.2 * np.random.default_rng(9).standard_normal((512, 8))
mu = np.random.default_rng(10).standard_normal((4, 8))
for step in range(31):
    if step % 10 == 0:
        match = np.max(unit(mu) @ true.T, axis=0)
        print(f"step {step:2d}: best cosine of each true center to a centroid {np.round(match, 3)}")
    mu = kmeans_update(mu, x, decay=0.7)
core = RoutingAttention(mu, top_k=None)
out = core(x, x, x)
print("routing vs masked dense:",
      np.abs(out - DenseAttention()(x, x, x, mask=core.pattern(x, x).toarray())).max())
print("cluster sizes:", np.bincount(core.assign(x), minlength=4))

show(img_dir / "02_routing.png")

# %% [markdown]
# ## Time
# float32, D = 64, chunk 64, `n_buckets = N/64`, 4 rounds (the benchmark script
# `benchmarks/bench_lsh.py` goes to N = 262144 with 8 heads).

# %%
sizes = [1024, 4096, 16384] if FULL else [512, 2048]
heads = 8 if FULL else 2
rows = []
for N in sizes:
    qq, _, vv, dout = bench.random_qkv((heads,), N, 64)
    lsh = LSHAttention(N // 64, n_hashes=4, chunk_size=64)
    lsh.backward(lsh.forward(qq[:, :128], None, vv[:, :128])[1], dout[:, :128])

    def lsh_fb():
        out, cache = lsh.forward(qq, None, vv)
        lsh.backward(cache, dout)

    def dense_fb():
        dense = DenseAttention()
        out, cache = dense.forward(qq, qq, vv)
        dense.backward(cache, dout)
    rep = 3 if FULL else 1
    rows.append({"N": N, "lsh fwd+bwd ms": 1e3 * bench.median_time(lsh_fb, rep, 1),
                 "dense fwd+bwd ms": 1e3 * bench.median_time(dense_fb, rep, 1)})
print(bench.markdown_table(rows))
