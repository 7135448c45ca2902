# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Chapter 3 — no N×N matrix: Linformer and memory-compressed attention
#
# Keep all $N$ queries, replace the $M$ keys and values by $K$ representatives:
#
# $$O = \operatorname{softmax}\big(s\,Q\tilde K^\top\big)\,\tilde V,\qquad
#   \tilde K = \mathcal R_k(K) \in \mathbb R^{K\times D},\ \tilde V = \mathcal R_v(V).$$
#
# Two ways to choose them: a learned projection along the sequence (Linformer,
# $\tilde K = EK$, $E\in\mathbb R^{K\times M}$) or a strided convolution over
# neighbouring positions (memory-compressed attention,
# $\tilde K_b = \sum_t K_{bs+t} W_k[t]$). This notebook checks both against the
# dense oracle, draws which keys feed which representative, and times them.
#
# Run headless: `MPLBACKEND=Agg python notebooks/03_no_nxn.py` (`EA_FULL=1` for larger sizes).

# %%
import os
import time
from pathlib import Path

import numpy as np

import efficient_attention as ea
from efficient_attention.dense import DenseAttention
from efficient_attention.lowrank import CompressedAttention, LinformerAttention, visible_counts
from efficient_attention.plot import show

FULL = os.environ.get("EA_FULL") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
IMG = HERE.parent / "docs" / "img"
SAVE = os.environ.get("EA_SAVE_IMG") == "1"          # rewrite docs/img/03_*.png (off in CI)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The degenerate settings are dense attention
#
# With $K = M$ and $E = F = I$ the Linformer *is* dense attention; so is the
# compressed layer with $c = s = 1$ and identity weights (also causally).

# %%
n, d = 64, 16
q, k, v = (rng.standard_normal((2, 4, n, d)) for _ in range(3))
dense = DenseAttention()(q, k, v)
lin = LinformerAttention(np.eye(n))(q, k, v)
comp = CompressedAttention(np.eye(d)[None], np.eye(d)[None], stride=1)(q, k, v)
comp_causal = CompressedAttention(np.eye(d)[None], np.eye(d)[None], stride=1, causal=True)(q, k, v)
print("Linformer E = F = I    vs dense:", np.abs(lin - dense).max())
print("compressed c = s = 1   vs dense:", np.abs(comp - dense).max())
print("causal compressed c = 1 vs causal dense:",
      np.abs(comp_causal - DenseAttention(causal=True)(q, k, v)).max())
assert np.allclose(lin, dense, rtol=1e-10, atol=1e-12)
assert np.allclose(comp, dense, rtol=1e-10, atol=1e-12)

# %% [markdown]
# ## 2. Gradients of the representatives' maps
#
# The backward pass reuses the dense one for $dQ, d\tilde K, d\tilde V$ and
# then goes through the linear maps: $dK = E^\top d\tilde K$,
# $dE = \sum_\text{batch} d\tilde K K^\top$; for the convolution
# $dK_{bs+t} \mathrel{+}= d\tilde K_b W_k[t]^\top$, $dW_k[t] = \sum K_{bs+t}^\top d\tilde K_b$.
# Central differences agree:

# %%
small = [rng.standard_normal((2, 12, 4)) for _ in range(3)]
for name, core in [("linformer", LinformerAttention.init(12, 4, seed=0)),
                   ("compressed", CompressedAttention.init(4, 4, 3, seed=0)),
                   ("compressed causal", CompressedAttention.init(4, 4, 3, seed=0, causal=True))]:
    errs = ea.gradcheck(core, small, full=True)
    print(f"{name:18s}", {k_: f"{e:.1e}" for k_, e in errs.items()})
    assert max(errs.values()) < 1e-6

# %% [markdown]
# ## 3. Two ways to choose the representatives
#
# Left: Linformer's $E$ — every representative is a combination of *all* $M$
# keys (so it has no causal form, and it is tied to one length $M$). Right: the
# convolution — representative $b$ reads the window $bs \dots bs + c - 1$ only.
# Far right: the causal rule of the compressed layer — query $i$ sees
# representative $b$ once the whole window lies at or before $i$.


# %%
def draw_representatives(m=24, k=6, c=3, path=None):
    """Which keys feed which representative (Linformer vs convolution), and the causal rule."""
    import matplotlib.pyplot as plt
    e = LinformerAttention.init(m, k, seed=0).e
    kc = -(-m // c)
    windows = np.zeros((kc, m))
    for b in range(kc):
        windows[b, b * c:min(m, b * c + c)] = 1.0
    vis = np.arange(kc)[None, :] < visible_counts(m, m, c, c)[:, None]          # (N, Kc)
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.0), gridspec_kw={"width_ratios": [m, m, kc * 1.6]})
    axes[0].imshow(np.abs(e), cmap="Blues", aspect="auto")
    axes[0].set_title(f"Linformer: |E| ({k}×{m})")
    axes[1].imshow(windows, cmap="Blues", aspect="auto", vmin=0, vmax=1)
    axes[1].set_title(f"convolution c = s = {c} ({kc}×{m})")
    axes[2].imshow(vis, cmap="Greys", aspect="auto", vmin=0, vmax=1)
    axes[2].set_title(f"causal: query sees ({m}×{kc})")
    for ax, (xl, yl) in zip(axes, [("key j", "representative b")] * 2 + [("representative b", "query i")]):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=80)
    return fig


show(draw_representatives(path=IMG / "03_representatives.png" if SAVE else None))

# %% [markdown]
# ## 4. Causal compressed attention never reads the future
#
# Change every key and value after position $t$: the outputs of queries
# $0 \dots t$ do not move (bit for bit).

# %%
core = CompressedAttention.init(d, d, 3, seed=1, causal=True)
q1, k1, v1 = (rng.standard_normal((n, d)) for _ in range(3))
t = 40
k2, v2 = k1.copy(), v1.copy()
k2[t + 1:] += 5 * rng.standard_normal(k2[t + 1:].shape)
v2[t + 1:] += 5 * rng.standard_normal(v2[t + 1:].shape)
o1, o2 = core(q1, k1, v1), core(q1, k2, v2)
print("past outputs unchanged:", np.array_equal(o1[:t + 1], o2[:t + 1]),
      "| future outputs changed:", not np.allclose(o1[t + 1:], o2[t + 1:]))
assert np.array_equal(o1[:t + 1], o2[:t + 1])

# %% [markdown]
# ## 5. Time: linear for fixed $K$, quadratic for fixed $c$
#
# Linformer with fixed $K$ costs $O(N\cdot K)$; the compressed layer with a
# fixed window $c$ has $K = N/c$ representatives, i.e. $O(N^2/c)$ — $c$ times
# cheaper than dense attention but not linear. The benchmark script
# `benchmarks/bench_lowrank.py` runs the full sizes (8 heads, $d = 64$,
# $K = 256$, $N$ up to 262144).


# %%
def time_variants(ns, d=32, heads=2, kp=64, repeat=3):
    from efficient_attention.bench import median_time, random_qkv
    rows = []
    for n in ns:
        q, k, v, _ = random_qkv((heads,), n, d, dtype=np.float32)
        cores = {"linformer K=%d" % kp: LinformerAttention.init(n, kp, 0, dtype=np.float32),
                 "compressed c=3": CompressedAttention.init(d, d, 3, 0, dtype=np.float32),
                 "dense": DenseAttention()}
        for name, c_ in cores.items():
            rows.append((name, n, median_time(lambda: c_.forward(q, k, v), repeat=repeat)))
    return rows


def draw_times(rows, path=None):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name in dict.fromkeys(r[0] for r in rows):
        pts = [(n, t) for nm, n, t in rows if nm == name]
        ax.loglog(*zip(*pts), "o-", label=name)
    ax.set_xlabel("N")
    ax.set_ylabel("forward time (s)")
    ax.legend(fontsize=8)
    ax.set_title("forward, float32")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=80)
    return fig


ns = [256, 512, 1024, 2048] if not FULL else [1024, 2048, 4096, 8192]
t0 = time.perf_counter()
from threadpoolctl import threadpool_limits   # noqa: E402  one BLAS thread: robust on a busy machine
with threadpool_limits(limits=1, user_api="blas"):
    rows = time_variants(ns)
for name, n_, t_ in rows:
    print(f"{name:16s} N={n_:6d} {1e3 * t_:8.2f} ms")
show(draw_times(rows, path=IMG / "03_scaling.png" if SAVE else None))
print(f"timing took {time.perf_counter() - t0:.1f} s")
