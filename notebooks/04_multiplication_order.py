# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Chapter 4 — change the multiplication order: linear attention
#
# Without the softmax, attention is a product of three matrices and the order
# of the products is ours to choose:
#
# $$(QK^\top)V \;:\; (D + D_v)\,N^2 \text{ multiplications}, \qquad
#   Q(K^\top V) \;:\; 2\,D\,D_v\,N .$$
#
# Linear attention keeps that freedom by writing the similarity as a dot
# product of features, $\operatorname{sim}(q,k) = \varphi(q)^\top\varphi(k)$:
#
# $$o_i = \frac{\varphi(q_i)^\top \sum_j \varphi(k_j) v_j^\top}{\varphi(q_i)^\top \sum_j \varphi(k_j) + \varepsilon}.$$
#
# This notebook checks the reordering against the quadratic form, counts the
# multiplications, runs the causal form as an RNN, measures how well FAVOR+
# approximates softmax attention, and times it.
#
# Run headless: `MPLBACKEND=Agg python notebooks/04_multiplication_order.py`
# (`EA_FULL=1` for larger sizes; `EA_SAVE_IMG=1` rewrites `docs/img/04_*.png`).

# %%
import os
import time
from pathlib import Path

import numpy as np

import efficient_attention as ea
from efficient_attention.bench import median_time, rel_error
from efficient_attention.dense import DenseAttention, causal_mask
from efficient_attention.feature_maps import (EluFeatureMap, PerformerFeatureMap,
                                              RandomFourierFeatureMap)
from efficient_attention.linear import EfficientAttention, LinearAttention
from efficient_attention.plot import show

FULL = os.environ.get("EA_FULL") == "1"
SAVE = os.environ.get("EA_SAVE_IMG") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
IMG = HERE.parent / "docs" / "img"
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The same numbers in either order
#
# The quadratic evaluation builds $A = \varphi(Q)\varphi(K)^\top$ (masked for the
# causal form), normalises its rows and multiplies by $V$; the linear one never
# forms $A$. They agree to rounding, for every feature map and both modes.

# %%
n, d = 48, 8
q, k, v = (rng.standard_normal((2, 3, n, d)) for _ in range(3))
maps = {
    "elu+1": EluFeatureMap(),
    "FAVOR+": PerformerFeatureMap(PerformerFeatureMap.draw(d, 16, seed=0)),
    "RFA": RandomFourierFeatureMap(RandomFourierFeatureMap.draw(d, 16, seed=0)),
}


def quadratic(fm, q, k, v, causal, eps=1e-6):
    pq, pk = fm(q), fm(k)
    a = pq @ np.swapaxes(pk, -1, -2)
    if causal:
        a = a * causal_mask(q.shape[-2])
    return (a @ v) / (a.sum(-1, keepdims=True) + eps)


for name, fm in maps.items():
    for causal in (False, True):
        err = np.abs(LinearAttention(fm, causal=causal)(q, k, v) - quadratic(fm, q, k, v, causal)).max()
        print(f"{name:7s} causal={causal!s:5s}  max |linear - quadratic| = {err:.1e}")
        assert err < 1e-10

# %% [markdown]
# ## 2. The lecture's counts
#
# `cost()` reports the multiplications of the matrix products (feature maps
# and normalisers left out): $(D + D_v)N^2$ for the dense order, $2DD_vN$ for
# the reordered one. They cross at $N = 2DD_v/(D+D_v)$ — 64 for $D = D_v = 64$.

# %%
dd = 64
rows = []
for n_ in (64, 256, 1024, 4096, 16384, 65536):
    dense_mul = DenseAttention().cost(n_, dd, dd).multiplications
    lin_mul = LinearAttention(EluFeatureMap()).cost(n_, dd, dd).multiplications
    assert dense_mul == 2 * dd * n_ * n_ and lin_mul == 2 * dd * dd * n_
    rows.append({"N": n_, "V(KQ): (d+d')N²": dense_mul, "(VK)Q: 2dd'N": lin_mul,
                 "ratio": dense_mul / lin_mul})
print(ea.bench.markdown_table(rows) if hasattr(ea, "bench") else rows)


def draw_counts(path=None):
    import matplotlib.pyplot as plt
    ns = np.logspace(4, 18, 29, base=2)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.loglog(ns, 2 * dd * ns ** 2, label="V(KQ): (d + d′)·N²")
    ax.loglog(ns, 2 * dd * dd * ns, label="(VK)Q: 2·d·d′·N")
    ax.axvline(dd, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("N (d = d′ = 64)")
    ax.set_ylabel("multiplications")
    ax.legend(frameon=False)
    ax.set_title("the multiplication order")
    fig.tight_layout()
    if path:
        fig.savefig(path)
    show(fig)


# %% [markdown]
# ## 3. Causal: prefix sums, and the RNN view
#
# With $j \le i$ the sums become prefix sums $S_i = S_{i-1} + \varphi(k_i)v_i^\top$,
# $z_i = z_{i-1} + \varphi(k_i)$, and the output $o_i = S_i^\top\varphi(q_i) /
# (\varphi(q_i)^\top z_i + \varepsilon)$: a recurrent network with a
# $F \times D_v$ state. `step` runs it one token at a time; the scan kernel runs it
# for all tokens at once. A causal output does not move when the future changes.

# %%
core = LinearAttention(maps["FAVOR+"], causal=True)
full = core(q, k, v)
state = None
for t in range(n):
    out_t, state = core.step(state, q[..., t, :], k[..., t, :], v[..., t, :])
    assert np.allclose(out_t, full[..., t, :], rtol=1e-12, atol=1e-13)
print("step() reproduces the causal forward for all", n, "tokens; state S:", state.s.shape)
q2, k2, v2 = q.copy(), k.copy(), v.copy()
for a in (q2, k2, v2):
    a[..., 30:, :] += 3.0
assert np.array_equal(core(q2, k2, v2)[..., :30, :], full[..., :30, :])
print("outputs 0..29 unchanged (bit for bit) when tokens 30.. change")

# %% [markdown]
# ## 4. Gradients
#
# The backward pass is hand-written in both orders' place: two products for the
# non-causal form, a forward scan and a reverse-time scan for the causal one.

# %%
small = [rng.standard_normal((2, 10, 4)) for _ in range(3)]
for name, fm in [("elu+1", EluFeatureMap()),
                 ("FAVOR+", PerformerFeatureMap(PerformerFeatureMap.draw(4, 8, 1))),
                 ("RFA", RandomFourierFeatureMap(RandomFourierFeatureMap.draw(4, 8, 1)))]:
    for causal in (False, True):
        err = ea.gradcheck(LinearAttention(fm, causal=causal), small)
        print(f"{name:7s} causal={causal!s:5s} gradcheck {err:.1e}")
        assert err < 1e-6
print(f"efficient attention      gradcheck {ea.gradcheck(EfficientAttention(), small):.1e}")

# %% [markdown]
# ## 5. How good is the approximation?
#
# FAVOR+ is an unbiased estimate of $\exp(q^\top k/\sqrt D)$; the *ratio* in
# the normalised output is only consistent, with an error falling like
# $m^{-1/2}$ — as long as $\lVert q'\rVert, \lVert k'\rVert$ are moderate: the
# estimator's variance grows like $e^{\lVert q' + k'\rVert^2}$. elu+1 and
# efficient attention are different kernels altogether: their error has no
# parameter to shrink it (here it is small only because at this scale softmax
# attention is nearly uniform).

# %%
n_acc, d_acc = 128, 16
qa, ka, va = (rng.standard_normal((2, n_acc, d_acc)) for _ in range(3))
ms = [8, 16, 32, 64, 128, 256, 512] + ([1024, 2048] if FULL else [])
errors = {}
for scale in (0.3, 0.6):
    exact = DenseAttention()(scale * qa, scale * ka, va)
    errors[scale] = [np.mean([rel_error(LinearAttention(PerformerFeatureMap(
        PerformerFeatureMap.draw(d_acc, m_, s)))(scale * qa, scale * ka, va), exact) for s in range(3)])
        for m_ in ms]
    print(f"|q|,|k| × {scale}: FAVOR+ error", " ".join(f"m={m_}:{e:.3f}" for m_, e in zip(ms, errors[scale])))
exact = DenseAttention()(0.3 * qa, 0.3 * ka, va)
print("elu+1 error:", round(rel_error(LinearAttention(EluFeatureMap())(0.3 * qa, 0.3 * ka, va), exact), 3),
      " efficient attention error:", round(rel_error(EfficientAttention()(0.3 * qa, 0.3 * ka, va), exact), 3))


def draw_accuracy(path=None):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.0), dpi=100)
    ax = axes[0]
    for scale, errs in errors.items():
        ax.loglog(ms, errs, "o-", ms=3, label=f"q, k × {scale}")
    ax.loglog(ms, errors[0.3][0] * (np.array(ms) / ms[0]) ** -0.5, "k:", lw=0.8, label="m^(-1/2)")
    ax.set_xlabel("features m")
    ax.set_ylabel("rel. error vs softmax")
    ax.legend(frameon=False, fontsize=7)
    ax.set_title("FAVOR+ error", fontsize=9)
    qs, ks = 0.6 * qa[0, :32], 0.6 * ka[0, :32]
    soft = np.exp(qs @ ks.T / np.sqrt(d_acc))
    fm = PerformerFeatureMap(PerformerFeatureMap.draw(d_acc, 64, 0))
    approx = fm(qs) @ fm(ks).T
    for ax, mat, title in ((axes[1], soft / soft.sum(1, keepdims=True), "softmax attention"),
                           (axes[2], approx / approx.sum(1, keepdims=True), "FAVOR+, m = 64")):
        ax.imshow(mat, cmap="viridis", vmin=0, vmax=soft.max(1).max() / soft.sum(1).min())
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if path:
        fig.savefig(path)
    show(fig)


# %% [markdown]
# ## 6. Time: linear in N
#
# Dense attention against non-causal and causal FAVOR+ (float32, two heads of
# width 64, m = 64). The dense order grows by 16× per 4× of N, the linear one by 4×.
# BLAS runs on one thread here: on a busy shared machine OpenBLAS's threads wait
# on each other and small products become many times slower.

# %%
from threadpoolctl import threadpool_limits

_blas = threadpool_limits(1, "blas")
sizes = [256, 1024, 4096] + ([16384] if FULL else [])
timing = {"dense": [], "FAVOR+": [], "FAVOR+ causal": []}
omega = PerformerFeatureMap.draw(64, 64, 0)
for n_ in sizes:
    qt, kt, vt = (rng.standard_normal((2, n_, 64)).astype(np.float32) for _ in range(3))
    for name, c in (("dense", DenseAttention()),
                    ("FAVOR+", LinearAttention(PerformerFeatureMap(omega))),
                    ("FAVOR+ causal", LinearAttention(PerformerFeatureMap(omega), causal=True))):
        if name == "dense" and n_ > (4096 if FULL or SAVE else 1024):
            timing[name].append(np.nan)
            continue
        timing[name].append(median_time(lambda: c.forward(qt * 0.5, kt * 0.5, vt), repeat=5))
_blas.restore_original_limits()
for name, ts in timing.items():
    print(f"{name:14s}", " ".join(f"N={n_}: {1e3 * t:7.2f} ms" for n_, t in zip(sizes, ts)))


def draw_timing(path=None):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for name, ts in timing.items():
        ax.loglog(sizes, 1e3 * np.array(ts), "o-", ms=3, label=name)
    ax.set_xticks(sizes, [str(n_) for n_ in sizes])
    ax.minorticks_off()
    ax.set_xlabel("N (d = m = 64, float32, 2 heads, 1 BLAS thread)")
    ax.set_ylabel("forward ms (median)")
    ax.legend(frameon=False)
    fig.tight_layout()
    if path:
        fig.savefig(path)
    show(fig)


# %%
try:
    import matplotlib  # noqa: F401
    have_mpl = True
except ImportError:
    have_mpl = False
    print("matplotlib not installed: no pictures")
if have_mpl:
    for fn, stem in ((draw_counts, "04_counts"), (draw_accuracy, "04_accuracy"), (draw_timing, "04_timing")):
        fn(IMG / f"{stem}.png" if SAVE else None)
    print("pictures drawn" + (f" and saved under {IMG}" if SAVE else " (EA_SAVE_IMG=1 saves them)"))
