# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Chapter 1 — hand-designed N×N patterns
#
# Compute only some entries of the attention matrix. A pattern $A$ (boolean,
# $N \times M$, a `scipy.sparse.csr_array`) says which keys each query may see;
# sparse attention is softmax attention restricted to it:
#
# $$o_i = \sum_{j: A_{ij}=1} \frac{e^{s_{ij}}}{\sum_{l: A_{il}=1} e^{s_{il}}}\, v_j,
# \qquad s_{ij} = \text{scale}\; q_i\cdot k_j .$$
#
# Cost: $2\,\mathrm{nnz}(A)(D + D_v)$ FLOPs instead of $2NM(D + D_v)$.
# Run headless: `MPLBACKEND=Agg python notebooks/01_hand_designed_patterns.py`
# (`EA_FULL=1` for full sizes).

# %%
import os
import time

import numpy as np

import efficient_attention as ea
from efficient_attention import patterns as P
from efficient_attention.bench import median_time
from efficient_attention.figures import hand_designed_figures
from efficient_attention.plot import show
from efficient_attention.sparse import GlobalAttention, SparseAttention
from efficient_attention.testing import assert_attention_close

FULL = os.environ.get("EA_FULL") == "1"
rng = np.random.default_rng(0)

# %% [markdown]
# ## The patterns, as text
# Query rows top to bottom, key columns left to right.

# %%
for name, pat in [("local(12, 2)", P.local(12, 2)),
                  ("strided(12, 3, causal=True)", P.strided(12, 3, causal=True)),
                  ("global_tokens(12, [0, 6])", P.global_tokens(12, [0, 6])),
                  ("random(12, 2, seed=0)", P.random(12, 2, 0)),
                  ("longformer(12, 1, [0], dilation=2)", P.longformer(12, 1, [0], dilation=2)),
                  ("bigbird(12, 2, 1, 1)", P.bigbird(12, 2, 1, 1))]:
    print(name, f"density {P.density(pat):.2f}")
    print(P.to_ascii(pat), end="\n\n")

# %% [markdown]
# ## The pictures
# `patterns.plot` (the same as `efficient_attention.plot.plot_pattern`) draws a
# pattern (or several, one colour each) the way the lecture does;
# `efficient_attention.figures.hand_designed_figures` draws the pictures of the docs page.

# %%
here = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd()
if os.environ.get("EA_SAVE_IMG") == "1":                # rewrite docs/img/01_*.png (off in CI)
    img_dir = os.path.join(here, "..", "docs", "img")
else:
    import tempfile
    img_dir = tempfile.mkdtemp(prefix="ea_patterns_")
for path in hand_designed_figures(img_dir):
    print("drew", path)
    show(path)                                          # in Jupyter: the picture

# %% [markdown]
# ## Check against the dense oracle
# Every pattern: `SparseAttention(A)` equals `DenseAttention` with the mask
# `A.toarray()`, forward and backward, float64 and float32 — also with one
# pattern per head (Longformer-style heads: local, dilated, global).

# %%
n, d = 64, 16
q, k, v = (rng.standard_normal((2, 4, n, d)) for _ in range(3))
dout = rng.standard_normal((2, 4, n, d))
for name, pat in P.examples(n).items():
    for dtype in (np.float64, np.float32):
        core = SparseAttention(pat)
        args = [a.astype(dtype) for a in (q, k, v)]
        out, cache = core.forward(*args)
        g = core.backward(cache, dout.astype(dtype))
        dense = ea.DenseAttention()
        ref, dcache = dense.forward(q, k, v, mask=pat.toarray())
        gref = dense.backward(dcache, dout)
        assert_attention_close(out, ref, dtype)
        for a, b in zip(g[:3], gref[:3]):
            assert_attention_close(a, b, dtype, kind="grad")
    print(f"{name:15s} nnz {pat.nnz:5d}  matches the dense oracle (float64 and float32)")

heads = SparseAttention([P.local(n, 4), P.strided(n, 2, 4), P.global_tokens(n, [0]), P.random(n, 4, 0)])
assert_attention_close(heads(q, k, v), ea.DenseAttention()(q, k, v, mask=heads.dense_mask(n)), np.float64)
small = SparseAttention([P.local(16, 2), P.strided(16, 2, 2), P.global_tokens(16, [0]), P.random(16, 3, 0)])
err = ea.gradcheck(small, (q[:1, :, :16], k[:1, :, :16], v[:1, :, :16]))
print(f"one pattern per head: matches the oracle; gradcheck {err:.1e}")

# %% [markdown]
# ## Added global tokens (a CLS token)
# The extra tokens are prepended to the sequence and global; the oracle is
# dense attention over the extended sequence with `extended_mask`.

# %%
cls = GlobalAttention(indices=(0,), n_extra=1, d=d, dv=d, seed=0)
ext = lambda a, name: np.concatenate([np.broadcast_to(cls.params[name], a.shape[:-2] + cls.params[name].shape), a], -2)  # noqa: E731
ref = ea.DenseAttention()(ext(q, "extra_q"), ext(k, "extra_k"), ext(v, "extra_v"), mask=cls.extended_mask(n))
assert_attention_close(cls(q, k, v), ref[..., 1:, :], np.float64)
assert_attention_close(cls.forward_extra(q, k, v)[0], ref[..., :1, :], np.float64)
print("CLS token: original and extra outputs match the concatenated oracle; gradcheck",
      f"{ea.gradcheck(cls, (q[:1, :1, :16], k[:1, :1, :16], v[:1, :1, :16])):.1e}")

# %% [markdown]
# ## Time
# Sparse attention costs in proportion to the allowed entries: a Longformer
# window keeps the cost linear in $N$, while dense attention grows like $N^2$.

# %%
sizes = [1024, 2048, 4096, 8192] if FULL else [512, 1024, 2048]
heads_, d = (8, 64) if FULL else (2, 32)
print(f"{'N':>6s} {'nnz/row':>8s} {'sparse fwd+bwd':>15s} {'dense fwd+bwd':>14s}")
for n in sizes:
    q, k, v = (rng.standard_normal((1, heads_, n, d)).astype(np.float32) for _ in range(3))
    core = SparseAttention(P.longformer(n, 64, [0]))
    dense = ea.DenseAttention()
    mask = core.dense_mask(n)

    def sparse_step():
        out, cache = core.forward(q, k, v)
        core.backward(cache, out)

    def dense_step():
        out, cache = dense.forward(q, k, v, mask=mask)
        dense.backward(cache, out)

    ts = median_time(sparse_step, repeat=3)
    td = median_time(dense_step, repeat=3)
    print(f"{n:6d} {core.pattern.nnz / n:8.1f} {ts * 1e3:12.1f} ms {td * 1e3:11.1f} ms")

# %% [markdown]
# ## One engine, many masks
# `BlockMask` is the tile layout of a mask; `BlockSparseAttention` runs FlashAttention-2 on its
# tiles (forward and backward). The same engine takes a pattern, a FlexAttention-style
# `mask_mod` (here: documents, causal) or nothing (dense), and equals the dense oracle.

# %%
from efficient_attention.figures import engine_figures  # noqa: E402

for path in engine_figures(img_dir):
    print("drew", path)
    show(path)                                          # in Jupyter: the picture
n = 300
docs = np.repeat(np.arange(4), [70, 30, 150, 50])


def document_causal(b, h, q_idx, kv_idx):
    return (docs[q_idx] == docs[kv_idx]) & (kv_idx <= q_idx)


q, k, v = (rng.standard_normal((2, 3, n, 16)) for _ in range(3))
dout = rng.standard_normal((2, 3, n, 16))
for name, mask, dense_mask in [
        ("longformer", ea.BlockMask.from_pattern(P.longformer(n, 20, [0, 150])), P.longformer(n, 20, [0, 150]).toarray()),
        ("documents", ea.BlockMask.from_mask_mod(document_causal, n),
         (docs[:, None] == docs[None, :]) & ea.causal_mask(n)),
        ("dense", None, None)]:
    core = ea.BlockSparseAttention(mask)
    out, cache = core.forward(q, k, v)
    g = core.backward(cache, dout)
    oracle = ea.DenseAttention()
    ref, rc = oracle.forward(q, k, v, mask=dense_mask)
    rg = oracle.backward(rc, dout)
    for a, b in zip((out, g.dq, g.dk, g.dv), (ref, rg.dq, rg.dk, rg.dv)):
        assert_attention_close(a, b, np.float64)
    print(f"{name:10s} {mask if mask is not None else 'dense'}: equals the dense oracle, forward and backward")
