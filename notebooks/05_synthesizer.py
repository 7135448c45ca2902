# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Chapter 5 — no Q and K: the Synthesizer
#
# Dot-product attention computes its $N \times N$ logits from pairs of tokens,
# $s\,q_i \cdot k_j$. The Synthesizer (Tay et al. 2020, arXiv:2005.00743)
# *synthesizes* the logits $B$ without looking at pairs; only the values stay a
# projection of the input:
#
# $$ Y = \operatorname{softmax}_\text{rows}(B + \text{mask})\; X W_v. $$
#
# * dense: $B = \operatorname{relu}(X W_1 + b_1) W_2 + b_2$ — row $i$ from token $i$ alone;
# * random: $B = R$, one learned $N \times N$ matrix for every input;
# * factorized random: $B = R_1 R_2^\top$ of rank $K$.
#
# This notebook checks the layers against dense attention, derives and checks
# the backward pass, shows that the causal versions never read the future,
# trains a random synthesizer with the hand-written gradient, draws the
# attention matrices and times the layers. `EA_FULL=1` uses full sizes.

# %%
import os
from pathlib import Path

import numpy as np

import efficient_attention as ea
from efficient_attention.bench import median_time
from efficient_attention.dense import DenseAttention
from efficient_attention.layers import MultiHeadAttention
from efficient_attention.plot import show
from efficient_attention.synthesizer import (DenseSynthesizer, FactorizedRandomSynthesizer,
                                             RandomSynthesizer)

FULL = os.environ.get("EA_FULL") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
IMG = HERE.parent / "docs" / "img"
SAVE = os.environ.get("EA_SAVE_IMG") == "1"          # rewrite docs/img/05_*.png (off in CI)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. A random synthesizer can be dense attention — for one input
#
# Set $R$ to the logits dense attention computes on a fixed input,
# $R = QK^\top/\sqrt{D}$, and $W_v = I$: the layer reproduces dense attention on
# that input (causally too). It does so for *every* input, though: $R$ no
# longer depends on the tokens. That is the Synthesizer's question — how much of
# attention's benefit needs the token-token interaction at all?

# %%
n, d = 12, 8
q, k, x = (rng.standard_normal((n, d)) for _ in range(3))
for causal in (False, True):
    synth = RandomSynthesizer(q @ k.T / np.sqrt(d), np.eye(d), causal=causal)
    dense = DenseAttention(causal=causal)(q, k, x)
    print(f"causal={causal}: max |random synthesizer - dense attention| = {np.abs(synth(x) - dense).max():.1e}")
    assert np.allclose(synth(x), dense, rtol=1e-12, atol=1e-12)

# %% [markdown]
# ## 2. Backward, one chain-rule step a line
#
# With $P = \operatorname{softmax}(B)$, $V = XW_v$ and upstream $dY$:
#
# $$ dV = P^\top dY,\quad dP = dY\,V^\top,\quad
#    dB = P \odot (dP - \operatorname{rowsum}(P \odot dP)),\quad
#    dW_v = X^\top dV,\quad dX \mathrel{+}= dV\,W_v^\top, $$
#
# then through the logits: random $dR = \sum_\text{batch} dB$ (one $R$ for the
# whole batch); factorized $dR_1 = dB\,R_2$, $dR_2 = dB^\top R_1$; dense
# $db_2 = \sum dB$, $dW_2 = H^\top dB$, $dA = dB\,W_2^\top \odot [A > 0]$,
# $db_1 = \sum dA$, $dW_1 = X^\top dA$, $dX \mathrel{+}= dA\,W_1^\top$.
# `ea.gradcheck` compares with central differences for $x$ and every parameter.

# %%
layers = {
    "dense": DenseSynthesizer.init(n, d, seed=1),
    "dense causal": DenseSynthesizer.init(n, d, seed=1, causal=True),
    "random": RandomSynthesizer.init(n, d, seed=2),
    "factorized K=3": FactorizedRandomSynthesizer.init(n, d, seed=3, k=3, causal=True),
}
xb = rng.standard_normal((2, n, d))
for name, layer in layers.items():
    err = ea.gradcheck(layer, (xb,), full=True)
    print(f"{name:15s}", {k_: f"{e:.0e}" for k_, e in err.items()})
    assert max(err.values()) < 1e-6

# %% [markdown]
# ## 3. Causal synthesizers never read the future
#
# Change every token after position $t$: outputs $0\dots t$ stay the same, bit
# for bit (the dense synthesizer's row $i$ depends on token $i$ only, and the
# mask removes keys $j > i$).

# %%
t = 5
x1 = rng.standard_normal((n, d))
x2 = x1.copy()
x2[t + 1:] += 3 * rng.standard_normal((n - t - 1, d))
for name, layer in layers.items():
    same = np.array_equal(layer(x1)[: t + 1], layer(x2)[: t + 1])
    print(f"{name:15s} past outputs unchanged: {same}")
    assert same == layer.causal

# %% [markdown]
# ## 4. Training with the hand-written gradient
#
# A random synthesizer learns the attention pattern a task needs. Target: the
# output of a fixed dense attention (the "teacher") on random inputs. Plain
# gradient descent on $R$ and $W_v$ with the layer's own backward pass drives
# the error down — but not to zero, because the teacher's weights depend on
# the input and $R$ cannot.

# %%
n_t, d_t = 16, 8
w_q, w_k = rng.standard_normal((2, d_t, d_t)) / np.sqrt(d_t)
student = RandomSynthesizer.init(n_t, d_t, seed=4)
r0 = student.r.copy()
lr, steps = 0.5, (400 if FULL else 150)
losses = []
for step in range(steps):
    xs = rng.standard_normal((16, n_t, d_t))
    target = DenseAttention()(xs @ w_q, xs @ w_k, xs)
    y, cache = student.forward(xs)
    diff = y - target
    losses.append(float(np.mean(diff ** 2)))
    grads = student.backward(cache, 2 * diff / (xs.shape[0] * n_t))   # d(loss)/dy, loss per token
    for name_, g in grads.params.items():
        student.params[name_][...] -= lr * g                         # live arrays: update in place
late = float(np.mean(losses[-10:]))
print(f"mean squared error: step 0 {losses[0]:.3f} -> last 10 steps {late:.3f}")
assert late < 0.6 * losses[0]


# %% [markdown]
# ## 5. The picture: attention matrices with and without Q and K
#
# Left to right: dense attention's weights for one input; the dense
# synthesizer's (each row from one token); a random synthesizer's
# $\operatorname{softmax}(R)$ at initialisation — one matrix for all inputs;
# and the factorized one's, of rank $K = 3$ before the softmax.

# %%
def draw_synthesizer_matrices(path=None, n=16, d=8, seed=0):
    """Attention matrices of dense attention and the three synthesizers (one input)."""
    import matplotlib.pyplot as plt
    g = np.random.default_rng(seed)
    xin = g.standard_normal((n, d))
    wq, wk = g.standard_normal((2, d, d)) / np.sqrt(d)
    mats = {
        "dense attention": ea.softmax.softmax((xin @ wq) @ (xin @ wk).T / np.sqrt(d)),
        "dense synthesizer": DenseSynthesizer.init(n, d, seed=seed).forward(xin)[1].probs,
        "random synthesizer": RandomSynthesizer.init(n, d, seed=seed).forward(xin)[1].probs,
        "factorized, K = 3": FactorizedRandomSynthesizer.init(n, d, seed=seed, k=3).forward(xin)[1].probs,
    }
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.0))
    for ax, (title, m) in zip(axes, mats.items()):
        ax.imshow(m, cmap="Blues")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=70)
    show(fig)
    return mats


mats = draw_synthesizer_matrices(IMG / "05_synthesizer.png" if SAVE else None)
print({k_: m.shape for k_, m in mats.items()})

# %% [markdown]
# ## 6. Time: no $QK^\top$ product
#
# Against one head of dense attention of the same width: the dense
# synthesizer pays a $N \times D_h \times N$ product instead of
# $N \times D \times N$; the random ones pay no logit product per sequence at
# all (one softmax of $R$ per call, shared by the batch). All of them are
# still quadratic: the $N\times N$ matrix is there. `benchmarks/bench_layers.py`
# has the full table (N = 1024 and 4096, D = 256, 8 heads).

# %%
sizes = [1024, 2048, 4096] if FULL else [256, 512]
d_b = 64
for n_b in sizes:
    xb = rng.standard_normal((n_b, d_b)).astype(np.float32)
    row = {}
    for name, layer in {
        "1-head MHA": MultiHeadAttention.init(n_b, d_b, seed=0, heads=1, dtype=np.float32),
        "dense synth": DenseSynthesizer.init(n_b, d_b, seed=0, dtype=np.float32),
        "random synth": RandomSynthesizer.init(n_b, d_b, seed=0, dtype=np.float32),
        "factorized": FactorizedRandomSynthesizer.init(n_b, d_b, seed=0, dtype=np.float32),
    }.items():
        def fwd_bwd(layer=layer):
            y, cache = layer.forward(xb)
            layer.backward(cache, y)
        row[name] = median_time(fwd_bwd, repeat=3)
    print(f"N = {n_b:5d}: " + ", ".join(f"{k_} {1e3 * v:6.1f} ms" for k_, v in row.items()))
