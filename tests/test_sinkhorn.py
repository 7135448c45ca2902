"""Sparse Sinkhorn attention: oracle comparisons, gradients, causality, the sort matrix (the training
example lives in notebooks/02_learned_patterns.py, which tests/test_scripts.py runs)."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention.bench import rel_error
from efficient_attention.dense import DenseAttention
from efficient_attention.sinkhorn import SinkhornAttention, sinkhorn, sinkhorn_backward
from efficient_attention.testing import assert_attention_close, float_arrays


# ---------------------------------------------------------------- a slow, obvious twin

def naive_sinkhorn(q, k, v, w, bs, n_iters, tau, causal=False, sortcut=None, noise=None, scale=None):
    """Loops over blocks, rows, columns and queries; Sinkhorn in probability space."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n, d = q.shape
    dv = v.shape[1]
    nb = n // bs
    scale = 1 / math.sqrt(d) if scale is None else scale
    s = np.array([k[c * bs:(c + 1) * bs].sum(axis=0) for c in range(nb)])
    allowed = np.array([[(not causal) or cc < c for cc in range(nb)] for c in range(nb)])
    a = np.zeros((nb, nb))
    for c in range(nb):
        src = c - 1 if causal else c
        for cc in range(nb):
            if allowed[c, cc]:
                r = float(np.dot(s[src], w[:, cc])) + (0.0 if noise is None else noise[c, cc])
                a[c, cc] = math.exp(r / tau)
    for _ in range(n_iters):
        for c in range(nb):                                  # rows
            tot = a[c].sum()
            if tot > 0:
                a[c] /= tot
        new = a.copy()
        for cc in range(nb):                                 # columns (causal: rows <= c only)
            for c in range(nb):
                tot = a[:c + 1, cc].sum() if causal else a[:, cc].sum()
                if tot > 0:
                    new[c, cc] = a[c, cc] / tot
        a = new
    p = a
    ks = np.zeros((nb, bs, d))
    vs = np.zeros((nb, bs, dv))
    for c in range(nb):
        for cc in range(nb):
            ks[c] += p[c, cc] * k[cc * bs:(cc + 1) * bs]
            vs[c] += p[c, cc] * v[cc * bs:(cc + 1) * bs]
    out = np.zeros((n, dv))
    for i in range(n):
        c = i // bs
        if sortcut is None:
            keys = [(k[j], v[j]) for j in range(c * bs, (c + 1) * bs) if not causal or j <= i]
            if not causal or c > 0:
                keys += [(ks[c, t], vs[c, t]) for t in range(bs)]
        else:
            keys = [(ks[b, t], vs[b, t]) for b in range(sortcut) for t in range(bs)]
        sc = [scale * float(np.dot(q[i], kk)) for kk, _ in keys]
        top = max(sc)
        e = [math.exp(x - top) for x in sc]
        out[i] = sum(ei * vv for ei, (_, vv) in zip(e, keys)) / sum(e)
    return out, p


def sinkhorn_in_dtype(q, k, v, w, bs, n_iters, tau, causal=False, sortcut=None, noise=None, scale=None):
    """:func:`naive_sinkhorn`'s output vectorised over blocks and batch axes, in the inputs' own dtype
    (``w`` and ``noise`` cast to it, no float64 anywhere): the float32 tests' independent
    low-precision evaluation for the lowp rule."""
    t = q.dtype.type
    *batch, n, d = q.shape
    nb, dv = n // bs, v.shape[-1]
    scale = t(1 / math.sqrt(d) if scale is None else scale)
    kb, vb = k.reshape(*batch, nb, bs, d), v.reshape(*batch, nb, bs, dv)
    s = kb.sum(-2)                                                       # block summaries (..., nb, D)
    if causal:                                                           # row c reads block c - 1
        s = np.concatenate([np.zeros_like(s[..., :1, :]), s[..., :-1, :]], axis=-2)
    r = s @ np.asarray(w).astype(q.dtype)                                # (..., nb, nb)
    if noise is not None:
        r = r + np.asarray(noise).astype(q.dtype)
    allowed = np.tril(np.ones((nb, nb), bool), -1) if causal else np.ones((nb, nb), bool)
    a = np.where(allowed, np.exp(r / t(tau)), t(0))
    for _ in range(n_iters):
        tot = a.sum(-1, keepdims=True)                                   # rows
        a = a / np.where(tot > 0, tot, t(1))
        tot = np.cumsum(a, axis=-2) if causal else a.sum(-2, keepdims=True)   # columns (causal: rows <= c)
        a = a / np.where(tot > 0, tot, t(1))
    ks = np.einsum("...cb,...btd->...ctd", a, kb)                        # sorted blocks (..., nb, bs, D)
    vs = np.einsum("...cb,...btd->...ctd", a, vb)
    if sortcut is None:                     # block c: its own keys (causal: j <= i), then sorted block c
        keys, vals = np.concatenate([kb, ks], axis=-2), np.concatenate([vb, vs], axis=-2)
        mask = np.ones((nb, bs, 2 * bs), bool)
        if causal:
            mask[:, :, :bs] = np.tril(np.ones((bs, bs), bool))
            mask[0, :, bs:] = False
        qs = q.reshape(*batch, nb, bs, d)
    else:                                   # every query: the first sortcut sorted blocks
        keys = ks[..., :sortcut, :, :].reshape(*batch, 1, sortcut * bs, d)
        vals = vs[..., :sortcut, :, :].reshape(*batch, 1, sortcut * bs, dv)
        mask = np.ones((1, n, sortcut * bs), bool)
        qs = q.reshape(*batch, 1, n, d)
    sc = np.where(mask, scale * qs @ np.swapaxes(keys, -1, -2), t(-np.inf))
    e = np.exp(sc - sc.max(-1, keepdims=True))
    return ((e / e.sum(-1, keepdims=True)) @ vals).reshape(*batch, n, dv)


def _data(batch=(2,), nb=4, bs=3, d=5, dv=4, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    n = nb * bs
    q = rng.standard_normal(batch + (n, d)).astype(dtype)
    k = rng.standard_normal(batch + (n, d)).astype(dtype)
    v = rng.standard_normal(batch + (n, dv)).astype(dtype)
    w = rng.standard_normal((d, nb)) / math.sqrt(bs)        # logits of order 1: P far from uniform
    return q, k, v, w


CONFIGS = [
    dict(),
    dict(causal=True),
    dict(sortcut=1),
    dict(sortcut=3),
    dict(seed=7),
    dict(causal=True, seed=3),
    dict(sortcut=2, seed=1, temperature=0.5),
    dict(n_iters=1),
    dict(n_iters=20, temperature=0.3),
    dict(scale=0.7),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_forward_equals_naive_twin(cfg):
    q, k, v, w = _data()
    core = SinkhornAttention(3, w, **cfg)
    out = core(q, k, v)
    p = core.sort_matrix(k)
    noise = core._noise(q.shape[:-2], np.float64)
    for b in range(q.shape[0]):
        ref, p_ref = naive_sinkhorn(q[b], k[b], v[b], w, 3, core.n_iters, core.temperature, core.causal,
                                    core.sortcut, None if noise is None else noise[b], core.scale)
        assert_attention_close(out[b], ref, np.float64)
        np.testing.assert_allclose(p[b], p_ref, rtol=1e-12, atol=1e-14)
        # the vectorised twin (the float32 tests' lowp) computes the same in float64
        vec = sinkhorn_in_dtype(q[b], k[b], v[b], w, 3, core.n_iters, core.temperature, core.causal,
                                core.sortcut, None if noise is None else noise[b], core.scale)
        assert_attention_close(vec, ref, np.float64)


def test_sort_matrix_shapes_single_and_batched():
    q, k, v, w = _data(batch=(2, 3))
    core = SinkhornAttention(3, w)
    assert core.sort_matrix(k[0, 0]).shape == (4, 4)
    pb = core.sort_matrix(k)
    assert pb.shape == (2, 3, 4, 4)
    np.testing.assert_allclose(pb[1, 2], core.sort_matrix(k[1, 2]), rtol=1e-14)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_gradcheck_all_inputs_and_w_sort(cfg):
    q, k, v, w = _data()
    core = SinkhornAttention(3, w, **cfg)
    errors = ea.gradcheck(core, (q, k, v), full=True, directions=4)
    assert set(errors) == {"q", "k", "v", "param.w_sort"}
    assert max(errors.values()) < 1e-6, errors


def test_w_sort_gradient_reaches_the_sort_net_and_is_summed_over_batch():
    q, k, v, w = _data(batch=(3,))
    core = SinkhornAttention(3, w, temperature=0.5)
    rng = np.random.default_rng(5)
    g = rng.standard_normal(q.shape[:-1] + (v.shape[-1],))
    whole = core.backward(core.forward(q, k, v)[1], g).params["w_sort"]
    parts = [core.backward(core.forward(q[b], k[b], v[b])[1], g[b]).params["w_sort"] for b in range(3)]
    assert np.abs(whole).max() > 1e-3                          # the sort net does get a gradient
    np.testing.assert_allclose(whole, sum(parts), rtol=1e-12, atol=1e-14)


def test_sinkhorn_backward_through_every_iteration():
    """sinkhorn_backward alone against central differences, causal and not, many rounds."""
    rng = np.random.default_rng(3)
    for causal in (False, True):
        log_r = rng.standard_normal((2, 5, 5)) * 2
        if causal:
            log_r = np.where(np.tril(np.ones((5, 5), bool), -1), log_r, -np.inf)
        g = rng.standard_normal(log_r.shape)
        for n_iters in (1, 3, 12):
            log_p, norms = sinkhorn(log_r, n_iters, causal)
            p = np.exp(log_p)
            analytic = sinkhorn_backward(g * p, log_p, norms, causal)   # loss = sum(g * P)
            u = np.where(np.isfinite(log_r), rng.standard_normal(log_r.shape), 0)
            h = 1e-6
            plus = np.sum(g * np.exp(sinkhorn(log_r + h * u, n_iters, causal)[0]))
            minus = np.sum(g * np.exp(sinkhorn(log_r - h * u, n_iters, causal)[0]))
            numeric = (plus - minus) / (2 * h)
            exact = np.sum(np.where(np.isfinite(log_r), analytic, 0) * u)
            assert abs(numeric - exact) <= 1e-7 * max(1.0, abs(exact)), (causal, n_iters, numeric, exact)
            assert np.all(analytic[~np.isfinite(log_r)] == 0)


@pytest.mark.parametrize("cfg", [dict(), dict(causal=True), dict(sortcut=2), dict(seed=4)], ids=str)
def test_float32_matches_float64(cfg):
    q, k, v, w = _data(dtype=np.float32)
    core = SinkhornAttention(3, w, **cfg)
    out64, c64 = core.forward(*(a.astype(np.float64) for a in (q, k, v)))
    out32, c32 = core.forward(q, k, v)
    assert out32.dtype == np.float32
    # the lowp rule: the vectorised twin evaluated in float32 (inputs, w_sort and the core's float32 noise)
    lowp = sinkhorn_in_dtype(q, k, v, w, 3, core.n_iters, core.temperature, core.causal, core.sortcut,
                             core._noise(q.shape[:-2], np.float32), core.scale)
    assert lowp.dtype == np.float32
    assert_attention_close(out32, out64, np.float32, lowp=lowp)
    g = np.random.default_rng(2).standard_normal(out64.shape)
    g64 = core.backward(c64, g)
    g32 = core.backward(c32, g.astype(np.float32))
    for a, b in zip((g32.dq, g32.dk, g32.dv), (g64.dq, g64.dk, g64.dv)):
        assert a.dtype == np.float32
        assert rel_error(a, b) < 1e-5
    assert g32.params["w_sort"].dtype == np.float64           # the parameter's own dtype
    assert rel_error(g32.params["w_sort"], g64.params["w_sort"]) < 1e-5


def test_float32_parameter_with_float64_inputs():
    q, k, v, w = _data()
    core = SinkhornAttention(3, w.astype(np.float32))
    out, cache = core.forward(q, k, v)
    assert out.dtype == np.float64
    assert core.backward(cache, np.ones_like(out)).params["w_sort"].dtype == np.float32


# ---------------------------------------------------------------- the sort matrix

def test_P_doubly_stochastic_after_enough_iterations():
    q, k, v, w = _data(batch=(3,), nb=6, bs=2)
    for n_iters, tol in ((1, None), (60, 1e-6)):
        p = SinkhornAttention(2, w, n_iters=n_iters).sort_matrix(k)
        np.testing.assert_allclose(p.sum(axis=-2), 1, atol=1e-12)   # last step: columns exact
        if tol is None:
            assert np.abs(p.sum(axis=-1) - 1).max() > 1e-6         # one round is not enough
        else:
            np.testing.assert_allclose(p.sum(axis=-1), 1, atol=tol)
        assert np.all(p >= 0)


def test_low_temperature_gives_the_best_permutation():
    """Logits = 3·Π + noise: at low temperature P is the permutation matrix of the
    max-weight assignment (here Π, checked with scipy's linear_sum_assignment)."""
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(4)
    nb, bs, d = 5, 2, 6
    k = rng.standard_normal((nb * bs, d))
    perm = rng.permutation(nb)
    logits = 3 * np.eye(nb)[perm] + 0.5 * rng.standard_normal((nb, nb))
    s = k.reshape(nb, bs, d).sum(axis=1)
    w = np.linalg.lstsq(s, logits, rcond=None)[0]
    rows, cols = linear_sum_assignment(logits, maximize=True)
    best = np.zeros((nb, nb))
    best[rows, cols] = 1
    p = SinkhornAttention(bs, w, temperature=0.05, n_iters=100).sort_matrix(k)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, best, atol=1e-3)


def _forcing_w(k, bs, alpha):
    """w_sort with S·w = alpha·I for the block sums S of k (needs n_b <= D)."""
    nb = k.shape[-2] // bs
    s = k.reshape(nb, bs, -1).sum(axis=1)
    return np.linalg.lstsq(s, alpha * np.eye(nb), rcond=None)[0]


def test_identity_permutation_equals_block_local_attention():
    """P = I: the sorted block is the own block, every key appears twice in the one
    softmax; weights and normaliser both double, so the output is exactly
    block-diagonal attention (and so are the q, k, v gradients)."""
    rng = np.random.default_rng(0)
    nb, bs, d = 4, 3, 6
    q, k, v = (rng.standard_normal((nb * bs, d)) for _ in range(3))
    core = SinkhornAttention(bs, _forcing_w(k, bs, 1.0), temperature=0.01)
    np.testing.assert_allclose(core.sort_matrix(k), np.eye(nb), atol=1e-15)
    blocks = np.arange(nb * bs) // bs
    mask = blocks[:, None] == blocks[None, :]
    out, cache = core.forward(q, k, v)
    ref, ref_cache = DenseAttention().forward(q, k, v, mask=mask)
    assert_attention_close(out, ref, np.float64)
    g = rng.standard_normal(out.shape)
    grads, ref_grads = core.backward(cache, g), DenseAttention().backward(ref_cache, g)
    for a, b in zip(grads[:3], ref_grads[:3]):
        assert_attention_close(a, b, np.float64, kind="grad")


def test_causal_shift_permutation_equals_own_causal_plus_previous_block():
    """Causal mode with a w_sort forcing 'block c sorts in block c - 1': query i
    sees j <= i in its block and the whole previous block."""
    rng = np.random.default_rng(1)
    nb, bs, d = 4, 3, 6
    q, k, v = (rng.standard_normal((nb * bs, d)) for _ in range(3))
    core = SinkhornAttention(bs, _forcing_w(k, bs, 1.0), temperature=0.01, causal=True)
    np.testing.assert_allclose(core.sort_matrix(k), np.eye(nb, k=-1), atol=1e-15)
    blocks = np.arange(nb * bs) // bs
    i, j = np.arange(nb * bs)[:, None], np.arange(nb * bs)[None, :]
    mask = ((blocks[:, None] == blocks[None, :]) & (j <= i)) | (blocks[None, :] == blocks[:, None] - 1)
    assert_attention_close(core(q, k, v), DenseAttention()(q, k, v, mask=mask), np.float64)


# ---------------------------------------------------------------- causality, empty rows

@settings(max_examples=30, deadline=None)
@given(st.data())
def test_causal_outputs_never_depend_on_future_tokens(data):
    nb = data.draw(st.integers(2, 4))
    bs = data.draw(st.integers(1, 4))
    d = data.draw(st.integers(1, 4))
    n = nb * bs
    q, k, v = (data.draw(float_arrays((n, d))) for _ in range(3))
    w = data.draw(float_arrays((d, nb)))
    i = data.draw(st.integers(0, n - 1))
    seed = data.draw(st.one_of(st.none(), st.integers(0, 5)))
    core = SinkhornAttention(bs, w, causal=True, seed=seed,
                             temperature=data.draw(st.sampled_from([0.1, 1.0, 3.0])))
    out = core(q, k, v)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    future = slice(i + 1, None)
    for a in (q2, k2, v2):
        a[future] = data.draw(float_arrays(a[future].shape))
    out2 = core(q2, k2, v2)
    np.testing.assert_allclose(out2[:i + 1], out[:i + 1], rtol=1e-12, atol=1e-12)
    assert np.all(np.isfinite(out2))


def test_causal_P_structure():
    """Causal balancing: strictly lower triangular, and the first row that may use a
    block (row c' + 1) is alone in its column prefix, so P[c, c-1] = 1 exactly."""
    q, k, v, w = _data(batch=(2,), nb=6, bs=2)
    for it in (1, 3, 8):
        p = SinkhornAttention(2, w, causal=True, n_iters=it).sort_matrix(k)
        assert np.all(np.triu(p[0]) == 0) and np.all(np.triu(p[1]) == 0)
        np.testing.assert_allclose(np.diagonal(p, offset=-1, axis1=-2, axis2=-1), 1, rtol=1e-14)
        assert np.all(p.sum(axis=-1)[:, 1:] >= 1 - 1e-12)


def test_causal_first_block_is_plain_causal_attention_and_no_nan_at_extremes():
    q, k, v, w = _data(batch=(2,))
    core = SinkhornAttention(3, 50 * w, causal=True, temperature=1e-3, n_iters=30)
    out, cache = core.forward(q, k, v)
    ref = DenseAttention(causal=True)(q[:, :3], k[:, :3], v[:, :3])
    assert_attention_close(out[:, :3], ref, np.float64)
    g = core.backward(cache, np.ones_like(out))
    for a in (out, g.dq, g.dk, g.dv, g.params["w_sort"]):
        assert np.all(np.isfinite(a))


def test_noise_is_seeded_and_optional():
    q, k, v, w = _data()
    plain = SinkhornAttention(3, w)
    a, b, c = (SinkhornAttention(3, w, seed=s) for s in (1, 1, 2))
    assert np.array_equal(a(q, k, v), b(q, k, v))
    assert not np.allclose(a(q, k, v), c(q, k, v))
    assert not np.allclose(a.sort_matrix(k), plain.sort_matrix(k))


def test_inputs_not_modified_and_params_live():
    q, k, v, w = _data()
    copies = [x.copy() for x in (q, k, v)]
    core = SinkhornAttention(3, w)
    core.forward(q, k, v)
    for x, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(x, c)
    assert core.params["w_sort"] is w


# ---------------------------------------------------------------- bad input

def test_bad_inputs():
    q, k, v, w = _data()
    core = SinkhornAttention(3, w)
    with pytest.raises(ValueError, match="block_size"):
        core(q[:, :-1], k[:, :-1], v[:, :-1])                  # N = 11, not a multiple of 3
    with pytest.raises(ValueError, match="w_sort"):
        SinkhornAttention(2, w)(q, k, v)                        # N / 2 = 6 blocks, w_sort has 4
    with pytest.raises(ValueError, match="w_sort"):
        SinkhornAttention(3, w[:-1])(q, k, v)                   # D = 5, w_sort has 4 rows
    with pytest.raises(ValueError, match="w_sort"):
        SinkhornAttention(3, w[0])
    with pytest.raises(TypeError, match="w_sort"):
        SinkhornAttention(3, np.ones((5, 4), int))
    with pytest.raises(ValueError, match="n_iters"):
        SinkhornAttention(3, w, n_iters=0)
    with pytest.raises(TypeError, match="n_iters"):
        SinkhornAttention(3, w, n_iters=2.5)
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            SinkhornAttention(3, w, temperature=t)
    with pytest.raises(ValueError, match="sortcut"):
        SinkhornAttention(3, w, sortcut=5)                      # n_b = 4
    with pytest.raises(ValueError, match="sortcut"):
        SinkhornAttention(3, w, sortcut=0)
    with pytest.raises(ValueError, match="sortcut"):
        SinkhornAttention(3, w, sortcut=2, causal=True)
    with pytest.raises(ValueError, match="block_size"):
        SinkhornAttention(0, w)
    with pytest.raises(ValueError, match="k must have as many positions"):
        core(q, k[:, :6], v[:, :6])
    with pytest.raises(ValueError, match="seed"):
        SinkhornAttention(3, w, seed=-1)
    with pytest.raises(ValueError, match="block_size"):
        core.sort_matrix(k[:, :-1])
    with pytest.raises(ValueError, match="dout"):
        out, cache = core.forward(q, k, v)
        core.backward(cache, out[:, :-1])


def test_init_draws_float64_and_accepts_keywords():
    core = SinkhornAttention.init(block_size=4, d=8, n_blocks=5, seed=3, causal=True, n_iters=4)
    assert core.w_sort.shape == (8, 5) and core.w_sort.dtype == np.float64
    assert core.causal and core.n_iters == 4 and core.seed is None
    again = SinkhornAttention.init(4, 8, 5, 3)
    np.testing.assert_array_equal(core.w_sort, again.w_sort)
    assert SinkhornAttention.init(4, 8, 5, 3, noise_seed=9).seed == 9
    assert SinkhornAttention.init(4, 8, 5, 3, dtype=np.float32).w_sort.dtype == np.float32


def test_registry_builds():
    for name, causal in (("sinkhorn", False), ("sinkhorn_causal", True)):
        var = ea.get_variant(name)
        assert not var.exact
        for n in (16, 32, 1024, 4096):
            core = var.build(n=n, d=8)
            assert core.causal == causal and core.w_sort.dtype == np.float64
            assert core.block_size * core.n_blocks == n and core.n_blocks >= 4
        assert var.build(n=4096, d=64).block_size == 64


# ---------------------------------------------------------------- the numba kernels against their NumPy twins

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "py_func"])
def test_kernels_match_numpy_reference(dtype, jit):
    from efficient_attention.kernels import sinkhorn as ks
    fwd = ks.sinkhorn_kernel if jit else getattr(ks.sinkhorn_kernel, "py_func", ks.sinkhorn_kernel)
    bwd = ks.sinkhorn_backward_kernel if jit else getattr(ks.sinkhorn_backward_kernel, "py_func",
                                                          ks.sinkhorn_backward_kernel)
    rng = np.random.default_rng(0)
    nb, n_iters = 5, 4
    log_r = (3 * rng.standard_normal((3, nb, nb))).astype(dtype)
    results = []
    for f_fwd, f_bwd in ((fwd, bwd), (ks.sinkhorn_reference, ks.sinkhorn_backward_reference)):
        x = log_r.copy()
        norms = np.empty((3, 2 * n_iters, nb), dtype)
        f_fwd(x, norms)
        g = rng.standard_normal(x.shape).astype(dtype) if not results else results[0][3]
        g0 = g.copy()
        post = x.copy()
        f_bwd(g, post, norms)
        results.append((x, norms, g, g0, post))
    (x1, n1, g1, _, p1), (x2, n2, g2, _, p2) = results
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(x1, x2, rtol=tol, atol=tol)
    np.testing.assert_allclose(n1, n2, rtol=tol, atol=tol)
    np.testing.assert_allclose(g1, g2, rtol=tol, atol=tol)
    np.testing.assert_allclose(p1, log_r, rtol=tol, atol=10 * tol)      # iterate rebuilt back to L(0)
    np.testing.assert_allclose(p2, log_r, rtol=tol, atol=10 * tol)


def test_kernel_twins_equal_the_chapter_functions():
    """The kernels' NumPy twins (written in kernels/, which imports nothing above it) compute
    the chapter's sinkhorn / sinkhorn_backward (non-causal) in the kernels' layout."""
    from efficient_attention import sinkhorn as chapter
    from efficient_attention.kernels import sinkhorn as ks
    rng = np.random.default_rng(3)
    log_r = 3 * rng.standard_normal((2, 6, 6))
    log_r[0, 2, :] = -np.inf                                  # an all -inf row is left alone
    x, norms = log_r.copy(), np.empty((2, 8, 6))
    ks.sinkhorn_reference(x, norms)
    log_p, steps = chapter.sinkhorn(log_r.copy(), 4)
    np.testing.assert_allclose(x, log_p, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(norms, np.stack(steps, axis=1), rtol=1e-13, atol=1e-13)
    g = rng.standard_normal(log_r.shape)
    g[0, 2, :] = 0
    expected = chapter.sinkhorn_backward(g.copy(), log_p.copy(), steps)
    post = x.copy()
    ks.sinkhorn_backward_reference(g, post, norms)
    np.testing.assert_allclose(g, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cfg", [dict(), dict(causal=True), dict(sortcut=2)], ids=str)
def test_chunked_block_attention_equals_one_chunk(cfg, monkeypatch):
    """The block attention runs in chunks of blocks (query rows for SortCut); tiny chunks
    must give the same outputs and gradients as one chunk."""
    q, k, v, w = _data(batch=(2,), nb=5, bs=3)
    core = SinkhornAttention(3, w, **cfg)
    g = np.random.default_rng(1).standard_normal(q.shape[:-1] + (v.shape[-1],))
    out, cache = core.forward(q, k, v)
    ref = core.backward(cache, g)
    assert len(cache.attn) == 1
    monkeypatch.setattr(ea.config, "SINKHORN_CHUNK", 1)
    out2, cache2 = core.forward(q, k, v)
    assert len(cache2.attn) == (5 if core.sortcut is None else 15)
    got = core.backward(cache2, g)
    np.testing.assert_allclose(out2, out, rtol=1e-13, atol=1e-14)
    for a, b in zip(got[:3], ref[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got.params["w_sort"], ref.params["w_sort"], rtol=1e-12, atol=1e-13)
    assert ea.gradcheck(core, (q, k, v)) < 1e-6


@pytest.mark.parametrize("cfg", [dict(), dict(sortcut=2, seed=3)], ids=str)
def test_core_through_the_kernel_path(cfg, monkeypatch):
    """Force the numba Sinkhorn path at small n_b: same outputs, P and gradients as NumPy."""
    q, k, v, w = _data(batch=(2,), nb=5, bs=3)
    core = SinkhornAttention(3, w, **cfg)
    g = np.random.default_rng(1).standard_normal(q.shape[:-1] + (v.shape[-1],))
    out, cache = core.forward(q, k, v)
    ref = core.backward(cache, g)
    assert isinstance(cache.norms, list)                       # NumPy path below the threshold
    monkeypatch.setattr(ea.config, "SINKHORN_KERNEL_MIN_BLOCKS", 1)
    out2, cache2 = core.forward(q, k, v)
    assert isinstance(cache2.norms, np.ndarray)                # kernel path
    got = core.backward(cache2, g)
    np.testing.assert_allclose(out2, out, rtol=1e-12, atol=1e-13)
    for a, b in zip(got[:3], ref[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(got.params["w_sort"], ref.params["w_sort"], rtol=1e-11, atol=1e-12)
    assert ea.gradcheck(core, (q, k, v)) < 1e-6
