# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Chapter 6 — no attention: other token mixers
#
# Attention is one way for token $i$ to read tokens $j$. The lecture's last
# chapter drops the query–key scores altogether:
#
# * **FNet** (Lee-Thorp et al. 2021, arXiv:2105.03824): $Y = \operatorname{Re}(F_N X F_D)$,
#   the real part of the 2-D DFT — no parameters;
# * **MLP-Mixer** token mixing (Tolstikhin et al. 2021, arXiv:2105.01601): an MLP
#   along the sequence axis, applied to every channel;
# * **gMLP** spatial gating (Liu et al. 2021, arXiv:2105.08050):
#   $Y = U \odot (W\,\operatorname{LN}(Z) + b)$ with $[U\,|\,Z] = X$ and a learned $N \times N$ matrix $W$.
#
# The notebook checks each against its definition, derives FNet's backward,
# checks every backward against finite differences, draws *which tokens each
# output reads*, and times them. `EA_FULL=1` uses full sizes.

# %%
import math
import os
from pathlib import Path

import numpy as np

import efficient_attention as ea
from efficient_attention.bench import median_time
from efficient_attention.layers import MultiHeadAttention
from efficient_attention.mixers import FourierMixer, GatedMLP, SpatialGatingUnit, TokenMixingMLP
from efficient_attention.plot import show

FULL = os.environ.get("EA_FULL") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
IMG = HERE.parent / "docs" / "img"
SAVE = os.environ.get("EA_SAVE_IMG") == "1"          # rewrite docs/img/06_*.png (off in CI)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. FNet: the definition, and a backward derived rather than differentiated
#
# $Y_{k_1 k_2} = \sum_{n,d} X_{nd}\cos\big(2\pi(k_1 n/N + k_2 d/D)\big)$, i.e.
# `np.fft.fft2(x).real`. The map is linear; its gradient is its adjoint
# applied to $dY$. For real $X$, $dY$:
# $\langle dY, \operatorname{Re}(F_N X F_D)\rangle = \operatorname{Re}\operatorname{tr}(dY^\top F_N X F_D)
# = \langle \operatorname{Re}(F_N^\top dY F_D^\top), X\rangle$, and DFT matrices are
# symmetric, so $dX = \operatorname{Re}(F_N\,dY\,F_D)$ — the layer is its own adjoint.

# %%
n, d = 6, 4
x = rng.standard_normal((n, d))
direct = np.array([[sum(x[i, j] * math.cos(2 * math.pi * (k1 * i / n + k2 * j / d))
                        for i in range(n) for j in range(d)) for k2 in range(d)] for k1 in range(n)])
fnet = FourierMixer()
y, cache = fnet.forward(x)
dy = rng.standard_normal((n, d))
print("max |FNet - DFT sum|      =", np.abs(y - direct).max())
print("max |dX - fft2(dY).real|  =", np.abs(fnet.backward(cache, dy).dx - np.fft.fft2(dy).real).max())
print("gradcheck                 =", ea.gradcheck(fnet, (x,)))
assert np.allclose(y, direct, atol=1e-12) and ea.gradcheck(fnet, (x,)) < 1e-6

# %% [markdown]
# ## 2. MLP-Mixer token mixing, exact GELU
#
# $Y = W_2^\top \operatorname{gelu}(W_1^\top X + b_1) + b_2$ mixes along the sequence,
# the same MLP for every channel: channel $c$ of the output depends on channel
# $c$ of the input only. GELU is exact, $a\,\Phi(a)$, with
# $\operatorname{gelu}'(a) = \Phi(a) + a\,\varphi(a)$.

# %%
mixer = TokenMixingMLP.init(n=8, d=4, seed=1, dh=6)
x = rng.standard_normal((2, 8, 4))
print("gradcheck", {k: f"{e:.0e}" for k, e in ea.gradcheck(mixer, (x,), full=True).items()})
x2 = x.copy()
x2[..., 0] += 1.0
print("other channels unchanged when channel 0 changes:", np.array_equal(mixer(x)[..., 1:], mixer(x2)[..., 1:]))

# %% [markdown]
# ## 3. gMLP: the spatial gating unit halves the width
#
# The unit splits $D$ channels into $U$ and $Z$ and returns $D/2$ of them, as in
# the paper, where it sits between the block's expanding ($D \to 2F$) and
# contracting ($F \to D$) projections. `GatedMLP` is that block (without the
# outer norm and residual) and keeps the shape. Initialised as in the paper,
# $W \approx 0$ and $b = 1$, the unit starts as $Y \approx U$. Causal: $W$ is
# used lower-triangular.

# %%
sgu = SpatialGatingUnit.init(n=8, seed=0)
x = rng.standard_normal((8, 6))
print("SGU: x", x.shape, "-> y", sgu(x).shape, "; max |y - U| at init =", np.abs(sgu(x) - x[:, :3]).max())
block = GatedMLP.init(n=8, d=6, seed=0, causal=True)
block.params["w"][...] = rng.standard_normal((8, 8))             # a trained-looking gate
print("gMLP block: x", x.shape, "-> y", block(x).shape)
print("gradcheck", {k: f"{e:.0e}" for k, e in ea.gradcheck(block, (x,), full=True).items()})
x2 = x.copy()
x2[5:] += 1.0
print("causal: outputs 0..4 unchanged when tokens 5.. change:", np.array_equal(block(x)[:5], block(x2)[:5]))
assert np.array_equal(block(x)[:5], block(x2)[:5])


# %% [markdown]
# ## 4. The picture: which tokens each output reads
#
# $|\partial y_i / \partial x_j|$ summed over channels, computed with each layer's
# own backward pass (one call per output row). Dense attention reads every token
# through input-dependent weights; FNet reads every token with fixed cosine
# weights; the token MLP reads every token through a learned matrix; the
# causal gMLP only the past.

# %%
def token_influence(layer, x):
    """(N, N) matrix of sum_c |d y_i / d x_j,c| for a single sequence, via backward."""
    y, cache = layer.forward(x)
    out = np.zeros((x.shape[0], x.shape[0]))
    for i in range(x.shape[0]):
        dy = np.zeros_like(y)
        dy[i] = 1.0
        out[i] = np.abs(layer.backward(cache, dy).dx).sum(axis=1)
    return out


def draw_token_mixing(path=None, n=16, d=8, seed=0):
    import matplotlib.pyplot as plt
    g = np.random.default_rng(seed)
    xin = g.standard_normal((n, d))
    gate = GatedMLP.init(n, d, seed=seed, causal=True)
    gate.params["w"][...] = g.standard_normal((n, n)) / np.sqrt(n)
    layers = {"dense attention (MHA)": MultiHeadAttention.init(n, d, seed=seed),
              "FNet": FourierMixer(),
              "MLP-Mixer token MLP": TokenMixingMLP.init(n, d, seed=seed),
              "gMLP, causal gate": gate}
    mats = {name: token_influence(layer, xin) for name, layer in layers.items()}
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.0))
    for ax, (title, m) in zip(axes, mats.items()):
        ax.imshow(m, cmap="Blues")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("input token j")
        ax.set_ylabel("output token i")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=70)
    show(fig)
    return mats


mats = draw_token_mixing(IMG / "06_token_mixing.png" if SAVE else None)
assert np.all(np.triu(mats["gMLP, causal gate"], 1) == 0)       # the causal gate reads no future token

# %% [markdown]
# ## 5. Causal use and variable length
#
# | layer | causal | any N |
# |---|---|---|
# | `FourierMixer` | no: every output mixes every token | yes: no parameters |
# | `TokenMixingMLP` | no | no: `w1` (N, Dh), `w2` (Dh, N) |
# | `SpatialGatingUnit` / `GatedMLP` | yes, `causal=True` (lower-triangular `W`) | no: `w` (N, N) |
#
# ## 6. Time
#
# FNet costs $O(ND\log(ND))$; the token MLP $4ND_hD$ FLOPs, linear in $N$
# for a fixed $D_h$ (quadratic with our default $D_h = N/2$); the gating
# unit $2N^2F$ — quadratic, but one GEMM with no softmax. Full table:
# `benchmarks/bench_layers.py`.

# %%
sizes = [1024, 4096] if FULL else [256, 512]
d_b = 64
for n_b in sizes:
    xb = rng.standard_normal((n_b, d_b)).astype(np.float32)
    row = {}
    for name, layer in {"MHA (dense)": MultiHeadAttention.init(n_b, d_b, 0, dtype=np.float32),
                        "FNet": FourierMixer(),
                        "token MLP": TokenMixingMLP.init(n_b, d_b, 0, dtype=np.float32),
                        "gMLP": GatedMLP.init(n_b, d_b, 0, dtype=np.float32)}.items():
        def fwd_bwd(layer=layer):
            y, cache = layer.forward(xb)
            layer.backward(cache, y)
        row[name] = median_time(fwd_bwd, repeat=3)
    print(f"N = {n_b:5d}: " + ", ".join(f"{k} {1e3 * v:6.2f} ms" for k, v in row.items()))
