# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Chapter 2 — learned patterns: Sparse Sinkhorn attention
#
# Hand-designed patterns (chapter 1) fix in advance which keys a query reads.
# Sparse Sinkhorn attention (Tay et al. 2020, arXiv:2002.11296) lets a small
# **sort network**, trained with the rest of the model, decide it: the sequence
# is cut into $n_b$ blocks of $b$ tokens, the sort net scores every pair of
# blocks, Sinkhorn normalisation turns the scores into a soft permutation $P$,
# and every query block attends to its own block plus the block that $P$ sorts
# in front of it — $2b$ keys per query instead of $N$.
#
# This notebook checks the definition against a loop, draws $P$ and the token
# pattern it induces, follows the gradient into the sort net, trains the sort
# net alone on a task that needs a non-local block, and times the result.
# Run headless: `MPLBACKEND=Agg python notebooks/02_learned_patterns.py`
# (`EA_FULL=1` for larger sizes).

# %%
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

import efficient_attention as ea
from efficient_attention import bench
from efficient_attention.dense import DenseAttention
from efficient_attention.plot import plot_sort_matrix, show
from efficient_attention.sinkhorn import SinkhornAttention

FULL = os.environ.get("EA_FULL") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
IMG = HERE.parent / "docs" / "img"
rng = np.random.default_rng(0)

# %% [markdown]
# ## The definition, written as loops
# Block sums $s_c = \sum_{t\in c} k_t$, logits $R = S\,W$ (`w_sort` $W$ of shape
# $(D, n_b)$), $L = R/\tau$, `n_iters` rounds of "subtract the row log-sum-exp,
# then the column log-sum-exp", $P = e^L$; sorted blocks
# $\tilde K_c = \sum_{c'} P_{cc'} K_{c'}$, $\tilde V_c$ likewise; query block $c$
# attends with one softmax to $[K_c;\tilde K_c]$.

# %%
nb, bs, d = 4, 3, 5
n = nb * bs
q, k, v = (rng.standard_normal((n, d)) for _ in range(3))
w = rng.standard_normal((d, nb)) / math.sqrt(bs)
core = SinkhornAttention(bs, w, n_iters=8, temperature=1.0)

s = np.array([k[c * bs:(c + 1) * bs].sum(0) for c in range(nb)])
a = np.exp(s @ w)                                     # exp(L), in probability space
for _ in range(8):
    a = a / a.sum(1, keepdims=True)                   # rows
    a = a / a.sum(0, keepdims=True)                   # columns
loop = np.zeros((n, d))
for i in range(n):
    c = i // bs
    ks = sum(a[c, cc] * k[cc * bs:(cc + 1) * bs] for cc in range(nb))
    vs = sum(a[c, cc] * v[cc * bs:(cc + 1) * bs] for cc in range(nb))
    keys = np.vstack([k[c * bs:(c + 1) * bs], ks])
    vals = np.vstack([v[c * bs:(c + 1) * bs], vs])
    sc = keys @ q[i] / math.sqrt(d)
    p = np.exp(sc - sc.max())
    loop[i] = p @ vals / p.sum()
print("max |core - loop| =", np.abs(core(q, k, v) - loop).max())
assert np.allclose(core(q, k, v), loop, rtol=1e-12, atol=1e-12)
assert np.allclose(core.sort_matrix(k), a, rtol=1e-12, atol=1e-14)

# %% [markdown]
# ## Sinkhorn: from logits to a soft permutation
# After every round the columns sum to 1 exactly; the rows converge. A low
# temperature pushes $P$ towards a permutation matrix.

# %%
nb_big = 8
kk = rng.standard_normal((nb_big * 4, 8))
ww = rng.standard_normal((8, nb_big)) / 2
for it in (1, 2, 4, 8, 16, 32):
    p = SinkhornAttention(4, ww, n_iters=it).sort_matrix(kk)
    print(f"n_iters = {it:2d}: max |row sum - 1| = {np.abs(p.sum(1) - 1).max():.1e}, "
          f"max |col sum - 1| = {np.abs(p.sum(0) - 1).max():.1e}")


def draw_sort_matrices(path=None):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(9, 2.6))
    for ax, (it, tau) in zip(axes, [(1, 1.0), (8, 1.0), (8, 0.25), (30, 0.05)]):
        p = SinkhornAttention(4, ww, n_iters=it, temperature=tau).sort_matrix(kk)
        plot_sort_matrix(p, ax=ax, title=f"n_iters={it}, τ={tau}")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=70)
    show(fig)


# %% [markdown]
# ## The token pattern $P$ induces
# Query $i$ in block $c$ reads its own block with weight 1 and every key block
# $c'$ through the sorted block with weight $P_{cc'}$. Causal mode masks the own
# block causally and lets block $c$ sort in blocks $c' < c$ only (block 0 has
# none); SortCut lets every query read the first $k$ sorted blocks only.

# %%
def token_pattern(core, k):
    """(N, N) weight of key j in query i's key set (own block + sorted block)."""
    p = core.sort_matrix(k)
    n = k.shape[0]
    bsz = core.block_size
    blk = np.arange(n) // bsz
    weight = np.zeros((n, n))
    if core.sortcut is None:
        weight += blk[:, None] == blk[None, :]
        if core.causal:
            weight *= np.arange(n)[None, :] <= np.arange(n)[:, None]
        weight += p[blk[:, None], blk[None, :]]
    else:
        weight += p[:core.sortcut].sum(0)[blk][None, :]
    return weight


def draw_patterns(path=None):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(8, 2.9))
    for ax, (name, kw) in zip(axes, [("own + sorted", {}), ("causal", {"causal": True}),
                                     ("SortCut k=2", {"sortcut": 2})]):
        c = SinkhornAttention(4, ww, n_iters=8, temperature=0.25, **kw)
        ax.imshow(token_pattern(c, kk), cmap="Greys", vmin=0, vmax=2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=70)
    show(fig)


# %% [markdown]
# ## The oracle check: the identity permutation is block-local attention
# If $P = I$ the sorted block *is* the own block: every key appears twice in the
# one softmax, weights and normaliser double, and the output is exactly dense
# attention with a block-diagonal mask. A `w_sort` solving $S W = I$ with a low
# temperature forces it.

# %%
w_id = np.linalg.lstsq(k.reshape(nb, bs, d).sum(1), np.eye(nb), rcond=None)[0]
core_id = SinkhornAttention(bs, w_id, temperature=0.01)
blk = np.arange(n) // bs
ref = DenseAttention()(q, k, v, mask=blk[:, None] == blk[None, :])
print("P = I:", np.allclose(core_id.sort_matrix(k), np.eye(nb)),
      "| max |sinkhorn - block-diagonal dense| =", np.abs(core_id(q, k, v) - ref).max())
assert np.allclose(core_id(q, k, v), ref, rtol=1e-10, atol=1e-12)

# %% [markdown]
# ## How the gradient reaches the sort net
# Backward goes: block attention → $d\tilde K, d\tilde V$ →
# $dP = d\tilde K\,K_\text{blocks}^\top + d\tilde V\,V_\text{blocks}^\top$ →
# $dL = dP \odot P$ → back through every Sinkhorn round
# ($dL_\text{pre} = dL_\text{post} - P_\text{post}\odot\sum dL_\text{post}$ over the
# normalised axis, iterates rebuilt from the saved log-normalisers) →
# $dR = dL_0/\tau$ → $dW = S^\top dR$ (summed over batch and heads) and
# $dS = dR\,W^\top$, which reaches every key of the block. Central differences agree:

# %%
qb, kb, vb = (rng.standard_normal((2, n, d)) for _ in range(3))
for kw in ({}, {"causal": True}, {"sortcut": 2}, {"seed": 1, "n_iters": 32}):
    errs = ea.gradcheck(SinkhornAttention(bs, w, **kw), (qb, kb, vb), full=True)
    print(kw, {name: f"{e:.1e}" for name, e in errs.items()})
    assert max(errs.values()) < 1e-6

# %% [markdown]
# ## Trainable with the network
# Each block must retrieve the values of a partner block given by a fixed
# permutation. Keys carry a one-hot block identity (so the block sums the sort
# net reads identify the block); the queries of block $c$ point at the keys of
# its partner, so once the partner is sorted in, its keys dominate the softmax.
# Values are fresh random numbers at every step and the target is the mean of
# the partner block's values. Only `w_sort` is trained, by plain gradient
# descent on the mean squared error, with the library's own backward.

# %%
class PartnerTask(NamedTuple):
    """Block retrieval: every block must read the values of its partner block ``partner[c]``."""
    partner: np.ndarray     # (n_b,) a fixed permutation without fixed points
    q: np.ndarray           # (N, D)
    k: np.ndarray           # (N, D)
    block_size: int
    dv: int


def partner_task(n_blocks=8, block_size=4, d=16, dv=8, noise=0.1, seed=0) -> PartnerTask:
    """Queries and keys for the partner-retrieval task (``d >= n_blocks``).

    Keys of block ``c`` are ``e_c`` (one-hot block identity) plus a small
    per-block offset, so the block sums that feed the sort net carry the
    identity ``block_size·e_c`` (and keys are equal inside a block, so
    attention over a block is uniform); queries of block ``c`` are
    ``6·sqrt(D)·e_partner[c]`` plus noise, so with the default scale a query
    scores about 6 against its partner's keys and about 0 against its own:
    once the partner block is sorted in, its keys dominate the one softmax.
    Values are fresh random numbers at every step; the target of every query
    of block ``c`` is the mean of the partner block's values (what uniform
    attention over that block returns).
    """
    if d < n_blocks:
        raise ValueError(f"d must be >= n_blocks = {n_blocks} (one-hot block identities), got {d}")
    rng = np.random.default_rng(seed)
    partner = rng.permutation(n_blocks)
    while n_blocks > 1 and np.any(partner == np.arange(n_blocks)):
        partner = rng.permutation(n_blocks)
    ids = np.repeat(np.arange(n_blocks), block_size)           # block of every token  (N,)
    n = n_blocks * block_size
    k = np.eye(d)[ids]                                         # identical keys inside a block
    k = k + noise * rng.standard_normal((n_blocks, d))[ids]    # + a per-block offset
    q = 6.0 * np.sqrt(d) * np.eye(d)[partner[ids]] + noise * rng.standard_normal((n, d))
    return PartnerTask(partner, q, k, block_size, dv)


def train_partner_task(task, steps=200, lr=2.0, batch=4, temperature=0.5, n_iters=8, seed=0):
    """Train **only** ``w_sort`` by plain gradient descent with the library's backward.

    Loss: mean squared error between the outputs and the partner blocks'
    mean values, on a batch of fresh random values per step (so ``w_sort``
    must learn the permutation, not the values). Returns ``(core, losses)``.
    """
    n, d = task.k.shape
    bs, nb = task.block_size, n // task.block_size
    core = SinkhornAttention.init(bs, d, nb, seed, n_iters=n_iters, temperature=temperature)
    rng = np.random.default_rng(seed + 1)
    q = np.broadcast_to(task.q, (batch, n, d))
    k = np.broadcast_to(task.k, (batch, n, d))
    losses = []
    for _ in range(steps):
        v = rng.standard_normal((batch, nb, bs, task.dv))
        target = np.repeat(v[:, task.partner].mean(axis=2), bs, axis=1)   # (B, N, Dv)
        out, cache = core.forward(q, k, v.reshape(batch, n, task.dv))
        diff = out - target
        losses.append(float(np.mean(diff ** 2)))
        grads = core.backward(cache, 2.0 * diff / diff.size)              # d(mean sq. error)/d out
        core.w_sort -= lr * grads.params["w_sort"]                        # plain gradient descent
    return core, np.array(losses)


# %% [markdown]
# The loss must fall at least 10×, and the learned $P$ must put most of every
# row's mass on the partner block (the arg-max of every row), where the
# untrained $P$ does not (the test suite runs this notebook, so these checks are
# part of it).

# %%
task = partner_task(n_blocks=8, block_size=4, d=16, dv=8, seed=0)
t0 = time.perf_counter()
trained, losses = train_partner_task(task, steps=200, lr=2.0, seed=0)
print(f"200 steps in {time.perf_counter() - t0:.2f} s; loss {losses[:5].mean():.3f} -> "
      f"{losses[-10:].mean():.5f} ({losses[:5].mean() / losses[-10:].mean():.0f}x lower)")
p_learned = trained.sort_matrix(task.k)
p_start = SinkhornAttention.init(4, 16, 8, 0, temperature=0.5).sort_matrix(task.k)
on_partner = p_learned[np.arange(8), task.partner]
print("mass on the partner block per row:", np.round(on_partner, 3))
assert losses[:5].mean() / losses[-10:].mean() >= 10 and on_partner.min() > 0.5
assert np.array_equal(p_learned.argmax(axis=1), task.partner)
assert p_start[np.arange(8), task.partner].mean() < 0.5          # before training, far from it


def draw_training(path=None):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(9, 2.8))
    axes[0].semilogy(losses)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("mean squared error")
    axes[0].set_title("training w_sort only", fontsize=9)
    plot_sort_matrix(p_start, ax=axes[1], partner=task.partner, title="P before")
    plot_sort_matrix(p_learned, ax=axes[2], partner=task.partner, title="P after (rings: partners)")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=70)
    show(fig)


# %% [markdown]
# ## Pictures (saved for the docs page when matplotlib is installed)

# %%
try:
    import matplotlib
    matplotlib.use("Agg")
except ImportError:
    print("matplotlib not installed: no pictures")
else:
    save = os.environ.get("EA_SAVE_IMG") == "1"      # rewrite docs/img/02_sinkhorn_*.png (off in CI)
    if save:
        IMG.mkdir(parents=True, exist_ok=True)
    draw_sort_matrices(IMG / "02_sinkhorn_P.png" if save else None)
    draw_patterns(IMG / "02_sinkhorn_pattern.png" if save else None)
    draw_training(IMG / "02_sinkhorn_training.png" if save else None)
    print("pictures drawn" + (" and saved under docs/img" if save else " (EA_SAVE_IMG=1 saves them)"))

# %% [markdown]
# ## Time
# Linear in $N$ while the $n_b^2$ terms (Sinkhorn on $n_b\times n_b$ and the
# sorted-block products, $2 n_b^2 b (D + D_v)$ FLOPs) stay small against the
# block attention ($4 N b (D + D_v)$): they are equal at $N = 2b^2$. The full
# benchmark is `benchmarks/bench_sinkhorn.py`.

# %%
sizes = [1024, 2048, 4096, 8192] if FULL else [512, 1024, 2048]
heads, dd, b = (8, 64, 64) if FULL else (2, 32, 32)
for n_ in sizes:
    c = SinkhornAttention.init(b, dd, n_ // b, seed=0)
    qq, kq, vq, g = bench.random_qkv((heads,), n_, dd)

    def step(c=c, qq=qq, kq=kq, vq=vq, g=g):
        c.backward(c.forward(qq, kq, vq)[1], g)

    def dense_step(qq=qq, kq=kq, vq=vq, g=g):
        o = DenseAttention()
        o.backward(o.forward(qq, kq, vq)[1], g)

    t_s = bench.median_time(step, 3)
    t_d = bench.median_time(dense_step, 3)
    print(f"N = {n_:5d}: sinkhorn fwd+bwd {1e3 * t_s:7.1f} ms, dense {1e3 * t_d:7.1f} ms")
