"""Chapter 3: Linformer and memory-compressed attention (efficient_attention.lowrank).

Every fast path is compared with a direct NumPy formula written out here
(explicit exp, einsum and Python loops, no code shared with the module),
gradient-checked for every input and parameter, reduced to dense attention in
its degenerate settings, and fed bad input.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention.dense import DenseAttention
from efficient_attention.lowrank import (CompressedAttention, LinformerAttention, compress,
                                         compress_backward, visible_counts)
from efficient_attention.testing import assert_attention_close, assert_close_to_oracle, dense_oracle

BATCHES = [(), (2,), (2, 3)]


def _rand(shape, seed, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------------------------------
# direct formulas (float64; in float32 too, as the independent low-precision evaluation that
# the float32 tests' lowp rule needs)
# ------------------------------------------------------------------------------------------

def _flat(x):
    """(..., P, R) -> (B, P, R): all batch axes in one."""
    return x.reshape((-1,) + x.shape[-2:])


def naive_attention(q, kr, vr, scale, mask=None):
    """softmax(s Q K̃ᵀ + mask) Ṽ and its backward, written out in full (N x K matrices)."""
    s = scale * np.einsum("...nd,...kd->...nk", q, kr)
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(s - mx)
    tot = e.sum(-1, keepdims=True)
    p = e / np.where(tot > 0, tot, 1.0)
    out = np.einsum("...nk,...kv->...nv", p, vr)

    def backward(dout):
        dvr = np.einsum("...nk,...nv->...kv", p, dout)
        dp = np.einsum("...nv,...kv->...nk", dout, vr)
        ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
        dq = scale * np.einsum("...nk,...kd->...nd", ds, kr)
        dkr = scale * np.einsum("...nk,...nd->...kd", ds, q)
        return dq, dkr, dvr

    return out, backward


def naive_linformer(q, k, v, e, f, dout, scale=None, dtype=np.float64):
    q, k, v, e, dout = (np.asarray(a, dtype) for a in (q, k, v, e, dout))
    ff = e if f is None else np.asarray(f, dtype)
    scale = q.dtype.type(q.shape[-1] ** -0.5 if scale is None else scale)
    kr = np.einsum("km,...md->...kd", e, k)
    vr = np.einsum("km,...mv->...kv", ff, v)
    out, bwd = naive_attention(q, kr, vr, scale)
    dq, dkr, dvr = bwd(dout)
    dk = np.einsum("km,...kd->...md", e, dkr)
    dv = np.einsum("km,...kv->...mv", ff, dvr)
    de = np.einsum("zkd,zmd->km", _flat(dkr), _flat(k))     # summed over every batch axis
    df = np.einsum("zkv,zmv->km", _flat(dvr), _flat(v))
    params = {"e": de + df} if f is None else {"e": de, "f": df}
    return out, (dq, dk, dv), params


def naive_compress(x, w, stride):
    """y_b = Σ_t x[b·stride + t] w[t] by loops, zeros past the end."""
    m, c = x.shape[-2], w.shape[0]
    kc = -(-m // stride)
    y = np.zeros(x.shape[:-2] + (kc, w.shape[2]), np.result_type(x, w))
    for b in range(kc):
        for t in range(c):
            j = b * stride + t
            if j < m:
                y[..., b, :] += x[..., j, :] @ w[t]
    return y


def naive_compress_backward(x, w, stride, dy):
    m, c = x.shape[-2], w.shape[0]
    dx = np.zeros(x.shape, np.result_type(x, w, dy))
    dw = np.zeros(w.shape, dx.dtype)
    for b in range(dy.shape[-2]):
        for t in range(c):
            j = b * stride + t
            if j < m:
                dx[..., j, :] += dy[..., b, :] @ w[t].T
                dw[t] += np.einsum("zi,zo->io", x[..., j, :].reshape(-1, x.shape[-1]),
                                   dy[..., b, :].reshape(-1, dy.shape[-1]))
    return dx, dw


def naive_causal_mask(n, m, c, stride):
    kc = -(-m // stride)
    mask = np.zeros((n, kc), bool)
    for i in range(n):
        for b in range(kc):
            last = min(b * stride + c, m) - 1          # last real key of window b
            mask[i, b] = last <= i
    return mask


def naive_compressed(q, k, v, w_k, w_v, stride, causal, dout, scale=None, dtype=np.float64):
    q, k, v, w_k, w_v, dout = (np.asarray(a, dtype) for a in (q, k, v, w_k, w_v, dout))
    c = w_k.shape[0]
    stride = c if stride is None else stride
    scale = q.dtype.type(q.shape[-1] ** -0.5 if scale is None else scale)
    kr = naive_compress(k, w_k, stride)
    vr = naive_compress(v, w_v, stride)
    mask = naive_causal_mask(q.shape[-2], k.shape[-2], c, stride) if causal else None
    out, bwd = naive_attention(q, kr, vr, scale, mask)
    dq, dkr, dvr = bwd(dout)
    dk, dw_k = naive_compress_backward(k, w_k, stride, dkr)
    dv, dw_v = naive_compress_backward(v, w_v, stride, dvr)
    return out, (dq, dk, dv), {"w_k": dw_k, "w_v": dw_v}


def _check_against(core, naive_fn, q, k, v, dout, dtype):
    """``core`` against ``naive_fn(float64)``; in float32 with the lowp rule, the lowp being
    ``naive_fn(float32)``: the direct formula evaluated in float32 (inputs and parameters)."""
    out, cache = core.forward(q, k, v)
    grads = core.backward(cache, dout)
    ref_out, ref_grads, ref_params = naive_fn(np.float64)
    low_out, low_grads, low_params = None, (None,) * 3, dict.fromkeys(ref_params)
    if dtype == np.float32:
        low_out, low_grads, low_params = naive_fn(np.float32)
        assert all(a.dtype == np.float32 for a in (low_out, *low_grads, *low_params.values()))
    assert out.dtype == dtype
    assert_attention_close(out, ref_out, dtype, lowp=low_out)
    for name, a, b, low in zip("qkv", (grads.dq, grads.dk, grads.dv), ref_grads, low_grads):
        assert a.dtype == dtype
        assert_attention_close(a, b, dtype, lowp=low, kind="grad", err_msg=f"d{name}")
    assert set(grads.params) == set(ref_params) == set(core.params)
    for name, ref in ref_params.items():
        assert grads.params[name].dtype == core.params[name].dtype
        assert_attention_close(grads.params[name].astype(np.float64), ref, dtype, lowp=low_params[name],
                               kind="grad", row_length=q.shape[-2] * int(np.prod(q.shape[:-2])), err_msg=name)


# ------------------------------------------------------------------------------------------
# Linformer
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("nm", [(7, 7), (5, 9)])
def test_linformer_matches_direct_formula(dtype, batch, shared, nm):
    n, m = nm
    d, dv, kp = 4, 3, 3
    core = LinformerAttention.init(m, kp, seed=1, shared=shared)
    q, k, v, dout = (_rand(batch + s, i, dtype) for i, s in enumerate([(n, d), (m, d), (m, dv), (n, dv)]))
    _check_against(core, lambda dt: naive_linformer(q, k, v, core.e, core.f, dout, dtype=dt), q, k, v, dout, dtype)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("batch", [(1,), (2, 2)])
def test_linformer_gradcheck_every_input_and_parameter(shared, batch):
    core = LinformerAttention.init(6, 3, seed=2, shared=shared, method="jl", scale=0.7)
    q, k, v = (_rand(batch + (s, w), i) for i, (s, w) in enumerate([(5, 4), (6, 4), (6, 2)]))
    errs = ea.gradcheck(core, (q, k, v), full=True)
    assert set(errs) == {"q", "k", "v"} | {f"param.{p}" for p in core.params}
    assert max(errs.values()) < 1e-7, errs


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_linformer_identity_projection_is_dense(dtype):
    n, d = 9, 4
    eye = np.eye(n)
    q, k, v, dout = (_rand((2, 3, n, d), i, dtype) for i in range(4))
    for core in (LinformerAttention(eye, eye.copy()), LinformerAttention(eye)):
        out, cache = core.forward(q, k, v)
        g = core.backward(cache, dout)
        if dtype == np.float32:     # the lowp rule: DenseAttention's own float32 result and the rounding scale
            assert_close_to_oracle((out, g.dq, g.dk, g.dv), dense_oracle(q, k, v, dout), dtype)
            continue
        ref, ref_cache = DenseAttention().forward(q.astype(np.float64), k.astype(np.float64),
                                                  v.astype(np.float64))
        rg = DenseAttention().backward(ref_cache, dout.astype(np.float64))
        assert_attention_close(out, ref, dtype)
        for a, b in zip((g.dq, g.dk, g.dv), rg[:3]):
            assert_attention_close(a, b, dtype, kind="grad")


def test_linformer_scale_attribute_and_default():
    e = np.eye(5)
    q, k, v = (_rand((5, 4), i) for i in range(3))
    assert LinformerAttention(e).scale is None
    core = LinformerAttention(e, scale=0.3)
    assert core.scale == 0.3
    assert_attention_close(core(q, k, v), DenseAttention(scale=0.3)(q, k, v), np.float64)


def test_linformer_init():
    a = LinformerAttention.init(100, 8, seed=3)
    b = LinformerAttention.init(100, 8, seed=3)
    assert a.e.shape == a.f.shape == (8, 100) and a.e.dtype == np.float64
    np.testing.assert_array_equal(a.e, b.e)
    assert not np.array_equal(a.e, a.f)
    bound = np.sqrt(3 / 108)
    assert np.abs(a.e).max() <= bound and np.abs(a.e).max() > 0.9 * bound   # xavier uniform, gain 1/sqrt2
    s = LinformerAttention.init(100, 8, seed=3, shared=True, dtype=np.float32)
    assert set(s.params) == {"e"} and s.f is None and s.e.dtype == np.float32
    jl = LinformerAttention.init(4000, 16, seed=0, method="jl")
    assert abs(jl.e.var() - 1 / 16) < 0.05 / 16                              # N(0, 1/k)


def test_linformer_params_are_live_and_inputs_untouched():
    e = _rand((3, 6), 0)
    core = LinformerAttention(e)
    assert core.params["e"] is e
    q, k, v = (_rand((2, 6, 4), i) for i in range(3))
    copies = [a.copy() for a in (q, k, v, e)]
    out, cache = core.forward(q, k, v)
    core.backward(cache, np.ones_like(out))
    for a, c in zip((q, k, v, e), copies):
        np.testing.assert_array_equal(a, c)
    e *= 2.0                                                  # training updates the live array
    assert not np.allclose(core(q, k, v), out)


@pytest.mark.parametrize("in_dtype,p_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_linformer_dtype_rule(in_dtype, p_dtype):
    core = LinformerAttention.init(6, 2, seed=0, dtype=p_dtype)
    q, k, v = (_rand((6, 4), i, in_dtype) for i in range(3))
    out, cache = core.forward(q, k, v)
    g = core.backward(cache, np.ones_like(out))
    assert out.dtype == in_dtype and g.dq.dtype == in_dtype
    assert g.params["e"].dtype == p_dtype and g.params["f"].dtype == p_dtype


def test_linformer_bad_input():
    q, k, v = (_rand((2, 8, 4), i) for i in range(3))
    with pytest.raises(ValueError, match=r"e must have shape \(K, M\) with M = 8"):
        LinformerAttention(np.ones((3, 10)))(q, k, v)            # projection length != N
    with pytest.raises(ValueError, match=r"f must have the shape of e"):
        LinformerAttention(np.ones((3, 8)), np.ones((2, 8)))
    with pytest.raises(ValueError, match=r"e must project to K >= 1.*K = 0"):
        LinformerAttention(np.ones((0, 8)))
    with pytest.raises(ValueError, match=r"f must project to K >= 1"):
        LinformerAttention(np.ones((2, 8)), np.ones((0, 8)))
    with pytest.raises(ValueError, match=r"e must have shape \(K, M\)"):
        LinformerAttention(np.ones(8))
    with pytest.raises(TypeError, match=r"e must be a float32 or float64 array, got dtype int"):
        LinformerAttention(np.ones((2, 8), dtype=np.int64))
    with pytest.raises(ValueError, match=r"causal must be False.*future"):
        LinformerAttention(np.ones((2, 8)), causal=True)
    with pytest.raises(TypeError, match=r"causal must be True or False"):
        LinformerAttention(np.ones((2, 8)), causal="no")
    with pytest.raises(ValueError, match=r"k must be >= 1"):
        LinformerAttention.init(8, 0)
    with pytest.raises(ValueError, match=r"method must be"):
        LinformerAttention.init(8, 2, method="orthogonal")
    core = LinformerAttention(np.ones((2, 8)))
    out, cache = core.forward(q, k, v)
    with pytest.raises(ValueError, match=r"dout must have the shape"):
        core.backward(cache, np.ones((2, 8, 5)))


# ------------------------------------------------------------------------------------------
# memory-compressed attention
# ------------------------------------------------------------------------------------------

CONFIGS = [  # (c, stride, M): divisible, not divisible, overlapping, gaps, stride > M
    (3, None, 9), (3, None, 10), (3, None, 11), (2, 1, 7), (3, 2, 8), (2, 4, 9), (2, 3, 10),
    (1, 1, 5), (4, 6, 5)]


@pytest.mark.parametrize("c,stride,m", CONFIGS)
def test_compress_matches_loops(c, stride, m):
    s = c if stride is None else stride
    x = _rand((2, m, 3), 0)
    w = _rand((c, 3, 4), 1)
    y = compress(x, w, s)
    np.testing.assert_allclose(y, naive_compress(x, w, s), rtol=1e-12, atol=1e-12)
    dy = _rand(y.shape, 2)
    dx, dw = compress_backward(x, w, s, dy)
    rdx, rdw = naive_compress_backward(x, w, s, dy)
    np.testing.assert_allclose(dx, rdx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, rdw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c,stride,m", CONFIGS)
def test_causal_rule_matches_definition(c, stride, m):
    s = c if stride is None else stride
    for n in (m, m + 3, max(1, m - 2)):
        counts = visible_counts(n, m, c, s)
        mask = np.arange(-(-m // s))[None, :] < counts[:, None]
        np.testing.assert_array_equal(mask, naive_causal_mask(n, m, c, s))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("c,stride,m", CONFIGS)
def test_compressed_matches_direct_formula(dtype, batch, causal, c, stride, m):
    n, d, dv = m, 3, 2
    core = CompressedAttention.init(d, dv, c, seed=4, stride=stride, causal=causal)
    q, k, v, dout = (_rand(batch + s, i, dtype) for i, s in enumerate([(n, d), (m, d), (m, dv), (n, dv)]))
    _check_against(core, lambda dt: naive_compressed(q, k, v, core.w_k, core.w_v, stride, causal, dout, dtype=dt),
                   q, k, v, dout, dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_compressed_cross_lengths(causal):
    """N != M works (queries from one sequence, keys from another)."""
    core = CompressedAttention.init(3, 2, 2, seed=0, causal=causal)
    q, k, v, dout = (_rand(s, i) for i, s in enumerate([(2, 4, 3), (2, 9, 3), (2, 9, 2), (2, 4, 2)]))
    _check_against(core, lambda dt: naive_compressed(q, k, v, core.w_k, core.w_v, None, causal, dout, dtype=dt),
                   q, k, v, dout, np.float64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("c,stride", [(3, None), (2, 1), (2, 3)])
def test_compressed_gradcheck_every_input_and_parameter(causal, c, stride):
    core = CompressedAttention.init(3, 2, c, seed=5, stride=stride, causal=causal)
    q, k, v = (_rand((2, 2, 8, w), i) for i, w in enumerate([3, 3, 2]))
    errs = ea.gradcheck(core, (q, k, v), full=True)
    assert set(errs) == {"q", "k", "v", "param.w_k", "param.w_v"}
    assert max(errs.values()) < 1e-7, errs


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_compressed_identity_width_one_is_dense(dtype, causal):
    n, d, dv = 10, 4, 3
    core = CompressedAttention(np.eye(d)[None], np.eye(dv)[None], stride=1, causal=causal)
    q, k, v, dout = (_rand((2, 3) + s, i, dtype) for i, s in enumerate([(n, d), (n, d), (n, dv), (n, dv)]))
    out, cache = core.forward(q, k, v)
    g = core.backward(cache, dout)
    if dtype == np.float32:         # the lowp rule: DenseAttention's own float32 result and the rounding scale
        assert_close_to_oracle((out, g.dq, g.dk, g.dv), dense_oracle(q, k, v, dout, causal=causal), dtype)
        return
    oracle = DenseAttention(causal=causal)
    ref, rc = oracle.forward(*(a.astype(np.float64) for a in (q, k, v)))
    rg = oracle.backward(rc, dout.astype(np.float64))
    assert_attention_close(out, ref, dtype)
    for a, b in zip((g.dq, g.dk, g.dv), rg[:3]):
        assert_attention_close(a, b, dtype, kind="grad")


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_causal_compressed_never_reads_the_future(data):
    m = data.draw(st.integers(1, 12), label="N")
    c = data.draw(st.integers(1, m), label="c")
    stride = data.draw(st.one_of(st.none(), st.integers(1, 5)), label="stride")
    t = data.draw(st.integers(0, m - 1), label="last unchanged query")
    batch = data.draw(st.sampled_from([(), (2,), (1, 2)]), label="batch")
    dtype = data.draw(st.sampled_from([np.float64, np.float32]), label="dtype")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    core = CompressedAttention.init(3, 2, c, seed=seed, stride=stride, causal=True)
    q, k, v, dout = (_rand(batch + s, seed + i, dtype) for i, s in enumerate([(m, 3), (m, 3), (m, 2), (m, 2)]))
    k2, v2 = k.copy(), v.copy()
    k2[..., t + 1:, :] += 10 * _rand(k2[..., t + 1:, :].shape, seed + 7, dtype)   # change the future
    v2[..., t + 1:, :] -= 10 * _rand(v2[..., t + 1:, :].shape, seed + 8, dtype)
    out, cache = core.forward(q, k, v)
    out2, cache2 = core.forward(q, k2, v2)
    np.testing.assert_array_equal(out[..., :t + 1, :], out2[..., :t + 1, :])
    # and the gradient flowing from the past queries into q does not see the future either
    g_past = np.zeros_like(dout)
    g_past[..., :t + 1, :] = dout[..., :t + 1, :]
    dq = core.backward(cache, g_past).dq
    dq2 = core.backward(cache2, g_past).dq
    np.testing.assert_array_equal(dq[..., :t + 1, :], dq2[..., :t + 1, :])


def test_non_causal_compressed_does_read_the_future():
    """The property above can fail: without causal, query 0 sees the last window."""
    core = CompressedAttention.init(3, 3, 3, seed=0)
    q, k, v = (_rand((9, 3), i) for i in range(3))
    v2 = v.copy()
    v2[-1] += 1.0
    assert not np.allclose(core(q, k, v)[0], core(q, k, v2)[0])


def test_causal_compressed_first_rows_empty_no_nan():
    core = CompressedAttention.init(3, 3, 3, seed=0, causal=True)
    q, k, v = (_rand((2, 9, 3), i) for i in range(3))
    with np.errstate(all="raise"):
        out, cache = core.forward(q, k, v)
        g = core.backward(cache, np.ones_like(out))
    assert np.all(out[:, :2] == 0) and np.all(g.dq[:, :2] == 0)     # queries 0, 1 precede window 0
    assert np.all(out[:, 2] != 0)
    assert all(np.all(np.isfinite(a)) for a in (g.dq, g.dk, g.dv, *g.params.values()))


@pytest.mark.parametrize("cls", ["linformer", "compressed", "compressed_causal"])
def test_blocked_equals_one_block(monkeypatch, cls):
    """Query rows are processed in blocks; block boundaries change nothing."""
    n, d = 13, 4
    core = {"linformer": lambda: LinformerAttention.init(n, 5, seed=0),
            "compressed": lambda: CompressedAttention.init(d, d, 3, seed=0),
            "compressed_causal": lambda: CompressedAttention.init(d, d, 3, seed=0, causal=True)}[cls]()
    q, k, v, dout = (_rand((2, n, d), i) for i in range(4))
    out1, c1 = core.forward(q, k, v)
    g1 = core.backward(c1, dout)
    assert c1.attend.block >= n
    monkeypatch.setattr(ea.config, "LOWRANK_BLOCK_ELEMENTS", 11)
    out2, c2 = core.forward(q, k, v)
    g2 = core.backward(c2, dout)
    assert c2.attend.block < n
    assert_attention_close(out2, out1, np.float64)
    for a, b in zip((g2.dq, g2.dk, g2.dv, *g2.params.values()), (g1.dq, g1.dk, g1.dv, *g1.params.values())):
        assert_attention_close(a, b, np.float64, kind="grad")


@pytest.mark.parametrize("in_dtype,p_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_compressed_dtype_rule(in_dtype, p_dtype):
    core = CompressedAttention.init(4, 4, 3, seed=0, dtype=p_dtype)
    q, k, v = (_rand((7, 4), i, in_dtype) for i in range(3))
    out, cache = core.forward(q, k, v)
    g = core.backward(cache, np.ones_like(out))
    assert out.dtype == in_dtype and g.dk.dtype == in_dtype
    assert g.params["w_k"].dtype == p_dtype and g.params["w_v"].dtype == p_dtype


def test_compressed_init():
    a = CompressedAttention.init(8, 4, 3, seed=1)
    assert a.w_k.shape == (3, 8, 8) and a.w_v.shape == (3, 4, 4) and a.stride is None and a.step == 3
    np.testing.assert_array_equal(a.w_k, CompressedAttention.init(8, 4, 3, seed=1).w_k)
    assert np.abs(a.w_k).max() <= np.sqrt(3 / 24)
    assert a.scale is None and not a.causal


def test_compressed_bad_input():
    q, k, v = (_rand((2, 4, 3), i) for i in range(3))
    w3, w2 = np.ones((3, 3, 3)), np.ones((2, 3, 3))
    with pytest.raises(ValueError, match=r"w_k has kernel size c = 5, larger than the number of keys M = 4"):
        CompressedAttention(np.ones((5, 3, 3)), np.ones((5, 3, 3)))(q, k, v)
    with pytest.raises(ValueError, match=r"w_k must have shape \(c, D, D\) with D = 3"):
        CompressedAttention(np.ones((2, 4, 4)), w2)(q, k, v)
    with pytest.raises(ValueError, match=r"w_v must have shape \(c, Dv, Dv\) with Dv = 2"):
        CompressedAttention(w2, w2)(q, k, v[..., :2])
    with pytest.raises(ValueError, match=r"w_k must have shape \(c, D, D\), got shape \(3, 3, 4\)"):
        CompressedAttention(np.ones((3, 3, 4)), w3)
    with pytest.raises(ValueError, match=r"w_v must have shape \(c, Dv, Dv\), got shape \(3, 3\)"):
        CompressedAttention(w3, np.ones((3, 3)))
    with pytest.raises(ValueError, match=r"w_v must have the kernel size c = 3"):
        CompressedAttention(w3, w2)
    with pytest.raises(ValueError, match=r"w_k must have a kernel size c >= 1"):
        CompressedAttention(np.ones((0, 3, 3)), np.ones((0, 3, 3)))
    with pytest.raises(ValueError, match=r"stride must be >= 1, got 0"):
        CompressedAttention(w3, w3, stride=0)
    with pytest.raises(TypeError, match=r"stride must be an integer"):
        CompressedAttention(w3, w3, stride=1.5)
    with pytest.raises(TypeError, match=r"causal must be True or False"):
        CompressedAttention(w3, w3, causal=1)
    with pytest.raises(TypeError, match=r"w_k must be a float32 or float64 array"):
        CompressedAttention(np.ones((3, 3, 3), dtype=np.int32), w3)
    with pytest.raises(ValueError, match=r"c must be >= 1"):
        CompressedAttention.init(3, 3, 0)
    with pytest.raises(ValueError, match=r"q must contain only finite"):
        bad = q.copy()
        bad[0, 0, 0] = np.nan
        CompressedAttention(w3, w3).forward(bad, k, v, check_finite=True)


def test_cost_linear_in_n_for_linformer_and_quadratic_for_compressed():
    lin = LinformerAttention.init(4096, 256, seed=0, dtype=np.float32)
    f1 = lin.cost(4096, 64).flops
    lin4 = LinformerAttention.init(16384, 256, seed=0, dtype=np.float32)
    assert lin4.cost(16384, 64).flops == 4 * f1
    comp = CompressedAttention.init(64, 64, 3, seed=0)
    ratio = comp.cost(4 * 3 * 1024, 64).flops / comp.cost(3 * 1024, 64).flops
    assert 15 < ratio <= 16
    dense = DenseAttention().cost(3 * 1024, 64).flops
    assert comp.cost(3 * 1024, 64).flops < dense / 2.5          # about c = 3 times less, plus the convolutions


@pytest.mark.parametrize("shared", [False, True])
def test_linformer_projection_blocks_match_direct_formula(shared, monkeypatch):
    """E K, F V and their gradients run by blocks of PROJ_BLOCK key positions (with a ragged last
    block here: 7 = 3 + 3 + 1) and equal the one-block result and the direct formula."""
    m, d, dv, kp = 7, 4, 3, 3
    core = LinformerAttention.init(m, kp, seed=4, shared=shared)
    q, k, v, dout = (_rand((2, 3) + s, i) for i, s in enumerate([(5, d), (m, d), (m, dv), (5, dv)]))
    out1, cache1 = core.forward(q, k, v)
    g1 = core.backward(cache1, dout)
    monkeypatch.setattr(ea.config, "LOWRANK_PROJ_BLOCK", 3)
    _check_against(core, lambda dt: naive_linformer(q, k, v, core.e, core.f, dout, dtype=dt), q, k, v, dout,
                   np.float64)
    out3, cache3 = core.forward(q, k, v)
    g3 = core.backward(cache3, dout)
    np.testing.assert_allclose(out3, out1, rtol=1e-13)
    for a, b in zip(list(g3[:3]) + list(g3.params.values()), list(g1[:3]) + list(g1.params.values())):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
