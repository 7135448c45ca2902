"""Chapter 4: linear attention (non-causal, causal, the RNN view), its kernels, efficient attention."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention.dense import DenseAttention, causal_mask
from efficient_attention.feature_maps import (EluFeatureMap, FeatureMap, PerformerFeatureMap,
                                              RandomFourierFeatureMap)
from efficient_attention.kernels import linear as K
from efficient_attention.linear import EfficientAttention, LinearAttention, LinearState
from efficient_attention.bench import rel_error, traced_peak
from efficient_attention.testing import assert_attention_close, float_arrays

MAPS = ["elu", "performer", "hyperbolic", "rfa"]


def _map(name, d, m=7, seed=0):
    if name == "elu":
        return EluFeatureMap()
    if name == "performer":
        return PerformerFeatureMap(PerformerFeatureMap.draw(d, m, seed))
    if name == "hyperbolic":
        return PerformerFeatureMap(PerformerFeatureMap.draw(d, m, seed), kind="hyperbolic")
    return RandomFourierFeatureMap(RandomFourierFeatureMap.draw(d, m, seed))


def _qkv(shape, n, d, dv=None, m=None, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    m = n if m is None else m
    dv = d if dv is None else dv
    return (scale * rng.standard_normal(shape + (n, d)), scale * rng.standard_normal(shape + (m, d)),
            rng.standard_normal(shape + (m, dv)))


# ------------------------------------------------------------------ the quadratic evaluation
def quadratic(fm, q, k, v, causal, eps, dout=None):
    """φ(Q)φ(K)ᵀ (masked for causal), normalised — the same formula in the N² order,
    with the exact (unstabilised) features; and, given dout, its gradients by hand."""
    pq, cq = fm.forward(q)
    pk, ck = fm.forward(k)
    mask = causal_mask(q.shape[-2], k.shape[-2]) if causal else np.ones((q.shape[-2], k.shape[-2]), bool)
    a = (pq @ np.swapaxes(pk, -1, -2)) * mask                    # (..., N, M)
    den = a.sum(-1) + eps
    out = (a @ v) / den[..., None]
    if dout is None:
        return out
    g = dout / den[..., None]
    c = -(dout * out).sum(-1) / den
    da = (g @ np.swapaxes(v, -1, -2) + c[..., None]) * mask     # dA
    dq = fm.backward(cq, da @ pk)
    dk = fm.backward(ck, np.swapaxes(da, -1, -2) @ pq)
    dv = np.swapaxes(a, -1, -2) @ g
    return out, (dq, dk, dv)


class FavorByDefinition:
    """FAVOR+ positive features written out in the input's own dtype (no float64, no stabiliser):
    φ(x) = exp(ωᵀx′ − ‖x′‖²/2)/√m, x′ = x·D^(-1/4); ``forward`` as a feature map's, for :func:`quadratic`
    (forward only). The float32 tests' independent low-precision evaluation (the lowp rule)."""

    def __init__(self, omega):
        self.omega = np.asarray(omega)

    def forward(self, x):
        t = x.dtype.type
        xp = x * t(x.shape[-1] ** -0.25)                                          # x′
        h = xp @ self.omega.astype(x.dtype).T - (xp * xp).sum(-1, keepdims=True) / t(2)
        return np.exp(h) * t(self.omega.shape[0] ** -0.5), None


@pytest.mark.parametrize("method", ["scan", "chunked", "numpy"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fmap", MAPS)
def test_forward_backward_match_quadratic_form(fmap, causal, method):
    q, k, v = _qkv((2, 3), 70, 5, dv=4, seed=1)             # 70 > one chunk of 64
    core = LinearAttention(_map(fmap, 5), causal=causal, eps=1e-6, method=method)
    dout = np.random.default_rng(2).standard_normal((2, 3, 70, 4))
    ref, ref_grads = quadratic(core.feature_map, q, k, v, causal, 1e-6, dout)
    out, cache = core.forward(q, k, v)
    assert_attention_close(out, ref, np.float64)
    grads = core.backward(cache, dout)
    for got, want in zip(grads[:3], ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    assert grads.params == {}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nm", [(9, 5), (5, 9)])
def test_n_differs_from_m(causal, nm):
    n, m = nm
    q, k, v = _qkv((2,), n, 3, m=m, seed=3)
    core = LinearAttention(_map("performer", 3), causal=causal)
    dout = np.random.default_rng(4).standard_normal((2, n, 3))
    ref, ref_grads = quadratic(core.feature_map, q, k, v, causal, core.eps, dout)
    out, cache = core.forward(q, k, v)
    assert_attention_close(out, ref, np.float64)
    for got, want in zip(core.backward(cache, dout)[:3], ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert ea.gradcheck(core, (q, k, v)) < 1e-7


@settings(max_examples=25)
@given(st.data())
def test_hypothesis_against_quadratic(data):
    batch = data.draw(st.sampled_from([(), (1,), (2, 2)]))
    n = data.draw(st.integers(1, 12))
    d = data.draw(st.integers(1, 4))
    dv = data.draw(st.integers(1, 4))
    causal = data.draw(st.booleans())
    fmap = data.draw(st.sampled_from(["elu", "performer", "hyperbolic"]))
    eps = data.draw(st.sampled_from([0.0, 1e-6, 0.5]))
    q = data.draw(float_arrays(batch + (n, d)))
    k = data.draw(float_arrays(batch + (n, d)))
    v = data.draw(float_arrays(batch + (n, dv)))
    core = LinearAttention(_map(fmap, d, m=data.draw(st.integers(1, 6))), causal=causal, eps=eps)
    assert_attention_close(core(q, k, v), quadratic(core.feature_map, q, k, v, causal, eps), np.float64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fmap", MAPS)
def test_gradcheck_with_batch_and_heads(fmap, causal):
    q, k, v = _qkv((2, 2), 9, 4, dv=3, seed=5)
    core = LinearAttention(_map(fmap, 4, m=6), causal=causal)
    assert ea.gradcheck(core, (q, k, v)) < 1e-6


def test_gradcheck_chunked_causal_across_chunks():
    q, k, v = _qkv((2,), 150, 3, seed=6)
    core = LinearAttention(EluFeatureMap(), causal=True, method="chunked")
    assert ea.gradcheck(core, (q, k, v), directions=2) < 1e-6


@pytest.mark.parametrize("causal", [False, True])
def test_stabiliser_cancels_exactly_eps_included(causal):
    """With a large eps the output still equals the formula with the exact features."""
    q, k, v = _qkv((2,), 20, 4, seed=7, scale=2.0)
    for eps in (0.0, 1e-3, 0.5, 50.0):
        core = LinearAttention(_map("performer", 4, m=16), causal=causal, eps=eps)
        assert_attention_close(core(q, k, v), quadratic(core.feature_map, q, k, v, causal, eps), np.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_large_inputs_stay_finite_in_float32(causal):
    """Unstabilised features underflow float32 here (exponents of minus several hundred)."""
    q, k, v = _qkv((2,), 32, 16, seed=8, scale=12.0)
    core = LinearAttention(_map("performer", 16, m=32), causal=causal)
    assert (core.feature_map(q.astype(np.float32)) == 0).all(axis=-1).any()   # whole rows vanish
    out64 = core(q, k, v)
    out32, cache = core.forward(*(a.astype(np.float32) for a in (q, k, v)))
    assert np.isfinite(out32).all() and np.isfinite(out64).all()
    g = core.backward(cache, np.ones_like(out32))
    assert all(np.isfinite(x).all() for x in g[:3])
    np.testing.assert_allclose(out32, out64, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ causality and the RNN view
@pytest.mark.parametrize("method", ["scan", "chunked"])
@pytest.mark.parametrize("fmap", MAPS)
def test_causal_output_ignores_future_exactly(fmap, method):
    n, i = 80, 37
    q, k, v = _qkv((3,), n, 4, seed=9)
    core = LinearAttention(_map(fmap, 4), causal=True, method=method)
    out = core(q, k, v)
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    rng = np.random.default_rng(10)
    for a in (q2, k2, v2):
        a[:, i + 1:] = 5 * rng.standard_normal(a[:, i + 1:].shape)   # change every future token
    out2 = core(q2, k2, v2)
    np.testing.assert_array_equal(out2[:, :i + 1], out[:, :i + 1])
    assert not np.allclose(out2[:, i + 1:], out[:, i + 1:])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("fmap", MAPS)
def test_step_reproduces_causal_forward(fmap, dtype):
    q, k, v = (a.astype(dtype) for a in _qkv((2, 3), 15, 4, dv=5, seed=11))
    core = LinearAttention(_map(fmap, 4), causal=True)
    ref = core(q, k, v)
    state = None
    for t in range(15):
        out_t, state = core.step(state, q[..., t, :], k[..., t, :], v[..., t, :])
        assert out_t.shape == (2, 3, 5) and out_t.dtype == dtype
        # two evaluations of the core in one dtype (no float64 reference in float32): fixed bound, no lowp
        assert_attention_close(out_t, ref[..., t, :], dtype, row_length=t + 1)
    assert isinstance(state, LinearState) and state.t == 15
    assert state.s.shape == (2, 3, core.feature_map.n_features(4), 5)


def test_step_bad_input():
    core = LinearAttention(EluFeatureMap(), causal=True)
    q = np.ones((2, 4))
    _, state = core.step(None, q, q, np.ones((2, 3)))
    with pytest.raises(ValueError, match="state must hold S of shape"):
        core.step(state, q, q, np.ones((2, 5)))
    with pytest.raises(TypeError, match="state must be None or the LinearState"):
        core.step((1, 2), q, q, np.ones((2, 3)))
    with pytest.raises(ValueError, match="step needs a causal"):
        LinearAttention(EluFeatureMap()).step(None, q, q, q)
    with pytest.raises(ValueError, match="q_t and k_t must share the feature width"):
        core.step(None, q, np.ones((2, 5)), q)


# ------------------------------------------------------------------ kernels vs NumPy references
def _kernel_inputs(nh=3, n=37, f=6, dv=5, dtype=np.float64, seed=12):
    rng = np.random.default_rng(seed)
    a = np.exp(0.5 * rng.standard_normal((nh, n, f))).astype(dtype)
    b = np.exp(0.5 * rng.standard_normal((nh, n, f))).astype(dtype)
    v = rng.standard_normal((nh, n, dv)).astype(dtype)
    eps = np.full((nh, n), 1e-3, dtype)
    dout = rng.standard_normal((nh, n, dv)).astype(dtype)
    return a, b, v, eps, dout


@pytest.mark.parametrize("block", [None, 1, 8])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_scan_kernels_match_cumsum_reference(block, dtype):
    a, b, v, eps, dout = _kernel_inputs(dtype=dtype)
    out, den = K.causal_forward(a, b, v, eps)
    ref_out, ref_den = K.causal_forward_reference(a, b, v, eps, block=block)
    rtol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(den, ref_den, rtol=rtol)
    got = K.causal_backward(a, b, v, out, den, dout)
    want = K.causal_backward_reference(a, b, v, ref_out, ref_den, dout, block=block)
    for x, y in zip(got, want):
        assert x.dtype == dtype
        np.testing.assert_allclose(x, y, rtol=10 * rtol, atol=10 * rtol)


@pytest.mark.parametrize("f, dv", [(6, 5), (3, 5), (4, 4)])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 20, 21])
def test_scan_kernels_pairing_of_tokens(n, f, dv):
    """The scans advance two tokens per pass and two state rows per pass; short, even and odd
    lengths (20 and 21 reach the reverse scan's prefetch), odd row counts and F < Dv, against
    the reference."""
    a, b, v, eps, dout = _kernel_inputs(n=n, f=f, dv=dv)
    out, den = K.causal_forward(a, b, v, eps)
    ref_out, ref_den = K.causal_forward_reference(a, b, v, eps)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(den, ref_den, rtol=1e-12)
    for x, y in zip(K.causal_backward(a, b, v, out, den, dout),
                    K.causal_backward_reference(a, b, v, ref_out, ref_den, dout)):
        np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_chunked_matches_reference(chunk):
    a, b, v, eps, dout = _kernel_inputs(n=21)
    out, den = K.chunked_forward(a, b, v, eps, chunk=chunk)
    ref_out, ref_den = K.causal_forward_reference(a, b, v, eps)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    np.testing.assert_allclose(den, ref_den, rtol=1e-12)
    for x, y in zip(K.chunked_backward(a, b, v, out, den, dout, chunk=chunk),
                    K.causal_backward_reference(a, b, v, ref_out, ref_den, dout)):
        np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-12)


def test_kernels_python_path_matches_reference():
    """The plain-Python function behind the jit (NUMBA_DISABLE_JIT path), on a small input
    (long enough for the reverse scan's prefetch hints, a no-op in Python), in chunks of 6
    tokens with a short last chunk."""
    a, b, v, eps, dout = _kernel_inputs(nh=2, n=2 * K.REVERSE_PREFETCH + 5, f=3, dv=2)
    nh, n, f = a.shape
    nck = -(-n // 6)
    out, den = np.empty_like(v), np.empty(a.shape[:2])
    sck, zck = np.empty((nh, nck, f, 2)), np.empty((nh, nck, f))
    getattr(K._causal_forward_kernel, "py_func", K._causal_forward_kernel)(a, b, v, eps, out, den, 6, sck, zck)
    ref_out, ref_den = K.causal_forward_reference(a, b, v, eps)
    np.testing.assert_allclose(out, ref_out, rtol=1e-13)
    grads = [np.empty_like(a), np.empty_like(b), np.empty_like(v)]
    getattr(K._causal_backward_kernel, "py_func", K._causal_backward_kernel)(a, b, v, out, den, dout, 6,
                                                                             sck, zck, *grads)
    for x, y in zip(grads, K.causal_backward_reference(a, b, v, out, den, dout)):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("chunk", [2, 4, 6, ea.config.LINEAR_CHECKPOINT])
@pytest.mark.parametrize("n", [1, 5, 6, 7, 12, 13])
def test_backward_sweep_by_chunks(chunk, n, monkeypatch):
    """The forward saves the state before each chunk (the prefix sums of the reference at
    the chunk starts); the backward's sweep over chunks, with short, odd and exact last chunks,
    agrees with the reference, and with the states recomputed when none are given. On the
    thread pool (3 sequences), however small the work."""
    monkeypatch.setattr(ea.config, "LINEAR_PARALLEL_MIN_WORK", 0)
    a, b, v, eps, dout = _kernel_inputs(n=n, f=4, dv=3)
    out, den, states = K.causal_forward(a, b, v, eps, states=True, chunk=chunk)
    assert states.chunk == chunk and states.n == n and states.s.shape == (3, -(-n // chunk), 4, 3)
    cum_s = np.cumsum(b[..., :, None] * v[..., None, :], axis=1)
    starts = np.arange(0, n, chunk)
    want_s = np.concatenate([np.zeros((3, 1, 4, 3)), cum_s[:, starts[1:] - 1]], axis=1)
    want_z = np.concatenate([np.zeros((3, 1, 4)), np.cumsum(b, axis=1)[:, starts[1:] - 1]], axis=1)
    np.testing.assert_allclose(states.s, want_s, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(states.z, want_z, rtol=1e-13, atol=1e-14)
    want = K.causal_backward_reference(a, b, v, out, den, dout)
    for got in (K.causal_backward(a, b, v, out, den, dout, states), K.causal_backward(a, b, v, out, den, dout)):
        for x, y in zip(got, want):
            np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("fmap", ["elu", "performer"])
def test_causal_scan_across_checkpoints(fmap):
    """LinearAttention's causal scan over more than one checkpoint chunk: the forward keeps
    the states in its cache, the backward's sweep uses them; against the quadratic form."""
    n = ea.config.LINEAR_CHECKPOINT + 77
    q, k, v = _qkv((2,), n, 3, seed=16)
    core = LinearAttention(_map(fmap, 3, m=4), causal=True)
    dout = np.random.default_rng(17).standard_normal((2, n, 3))
    ref, ref_grads = quadratic(core.feature_map, q, k, v, True, core.eps, dout)
    out, cache = core.forward(q, k, v)
    f = core.feature_map.n_features(3)
    assert isinstance(cache.states, K.ScanStates) and cache.states.s.shape == (2, 2, f, 3)
    assert_attention_close(out, ref, np.float64, row_length=n)
    grads = core.backward(cache, dout)
    for got, want in zip(grads[:3], ref_grads):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    # the backward reads the cached states (altered states, altered dq)
    bad = cache._replace(states=cache.states._replace(s=2 * cache.states.s))
    assert not np.allclose(core.backward(bad, dout).dq, grads.dq)


def test_scan_states_errors():
    a, b, v, eps, dout = _kernel_inputs(n=9, f=4, dv=3)
    for chunk in (0, 3, -2, 4.0, True):
        with pytest.raises(ValueError, match="chunk must be an even number"):
            K.causal_forward(a, b, v, eps, states=True, chunk=chunk)
    out, den, states = K.causal_forward(a, b, v, eps, states=True, chunk=4)
    with pytest.raises(ValueError, match="states.chunk must be an even number"):
        K.causal_backward(a, b, v, out, den, dout, states._replace(chunk=3))
    for bad in (states._replace(chunk=2), states._replace(s=states.s[:, :2]), states._replace(z=states.z[:1]),
                states._replace(s=states.s[:1]), states._replace(n=8)):
        with pytest.raises(ValueError, match="states must be those of 3 sequences of 9 tokens"):
            K.causal_backward(a, b, v, out, den, dout, bad)
    a12, b12, v12, eps12, _ = _kernel_inputs(n=12, f=4, dv=3)
    _, _, states12 = K.causal_forward(a12, b12, v12, eps12, states=True, chunk=4)
    assert states12.s.shape == states.s.shape
    with pytest.raises(ValueError, match="got n = 12"):                # same chunk count, other n
        K.causal_backward(a, b, v, out, den, dout, states12)
    with pytest.raises(TypeError, match="states must be None or the ScanStates"):
        K.causal_backward(a, b, v, out, den, dout, (states.s, states.z, 4))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_prefetch_hint_changes_nothing(dtype):
    """prefetch_range compiles for contiguous 1-D arrays of any dtype, returns None and leaves
    the array as it was (out-of-range and empty ranges included); in Python it is a no-op; a
    2-D or strided array is a typing error, not a silent partial hint."""
    import numba
    from efficient_attention.kernels.prefetch import prefetch_range

    @numba.njit
    def hint_all(x, ranges):
        for k in range(ranges.shape[0]):
            prefetch_range(x, ranges[k, 0], ranges[k, 1])
        return x.sum()

    x = np.arange(100).astype(dtype)
    before = x.copy()
    ranges = np.array([[0, 100], [-50, 10], [90, 500], [40, 40], [70, 20], [99, 100]])
    assert hint_all(x, ranges) == before.sum()
    np.testing.assert_array_equal(x, before)
    assert prefetch_range(x, 0, 100) is None
    if numba.config.DISABLE_JIT:                       # no typing without the jit
        return
    hint = numba.njit(lambda y: prefetch_range(y, 0, 4))
    for bad in (np.zeros((2, 2), dtype), np.zeros(8, dtype)[::2]):
        with pytest.raises(numba.core.errors.TypingError):
            hint(bad)


def test_prefetch_line_indices_are_clamped_one_per_line():
    """The elements hinted: one per 64-byte line from the clamped start, plus the last one."""
    from efficient_attention.kernels.prefetch import line_indices
    assert line_indices(100, 4, 0, 100).tolist() == [0, 16, 32, 48, 64, 80, 96, 99]
    assert line_indices(100, 8, -5, 10).tolist() == [0, 8, 9]
    assert line_indices(100, 4, 90, 500).tolist() == [90, 99]
    assert line_indices(100, 4, 40, 40).tolist() == []
    assert line_indices(100, 4, 70, 20).tolist() == []
    assert line_indices(100, 1, 3, 70).tolist() == [3, 67, 69]


def test_prefetch_emits_a_prefetch_instruction():
    """The reverse scan's hints reach the machine code (x86 prefetcht0, arm64 prfm)."""
    import platform
    import numba
    from efficient_attention.kernels.prefetch import prefetch_range

    @numba.njit
    def hint(x):
        prefetch_range(x, 0, x.shape[0])

    hint(np.zeros(64, np.float32))
    asm = "".join(hint.inspect_asm().values()).lower()
    want = {"x86_64": "prefetch", "amd64": "prefetch", "aarch64": "prfm", "arm64": "prfm"}
    machine = platform.machine().lower()
    if machine not in want:
        pytest.skip(f"no known prefetch mnemonic for {machine}")
    assert want[machine] in asm


def test_zero_denominator_gives_zero_output_and_gradient():
    """A map whose features vanish, with eps = 0: output 0, gradient 0, no NaN, no warning."""
    class Zero(FeatureMap):
        def n_features(self, d):
            return d

        def forward(self, x, *, check_finite=False):
            return np.zeros_like(x), None

        def backward(self, cache, dphi):
            return np.zeros_like(dphi)

    q, k, v = _qkv((2,), 6, 3, seed=13)
    for causal in (False, True):
        core = LinearAttention(Zero(), causal=causal, eps=0.0)
        out, cache = core.forward(q, k, v)
        np.testing.assert_array_equal(out, 0)
        for g in core.backward(cache, np.ones_like(out))[:3]:
            np.testing.assert_array_equal(g, 0)


# ------------------------------------------------------------------ accuracy as an approximation
def test_performer_error_falls_as_m_grows():
    n, d = 64, 16
    q, k, v = _qkv((2,), n, d, seed=14, scale=0.3)   # FAVOR+ variance grows like e^{‖q′+k′‖²}
    exact = DenseAttention()(q, k, v)
    errs = []
    for m in (8, 64, 512):
        e = [rel_error(LinearAttention(_map("performer", d, m=m, seed=s))(q, k, v), exact)
             for s in range(4)]
        errs.append(np.mean(e))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < errs[0] / 4                       # ~ m^(-1/2): 64× more features, ~8× less error


def test_float32_scan_close_to_float64_long_sequence():
    q, k, v = (a.astype(np.float32) for a in _qkv((2,), 600, 8, seed=15))
    core = LinearAttention(_map("performer", 8, m=16), causal=True)
    out64 = core(*(a.astype(np.float64) for a in (q, k, v)))
    out32 = core(q, k, v)
    # the lowp rule: the quadratic form with the features written out, evaluated in float32
    by_definition = FavorByDefinition(core.feature_map.omega)
    lowp = quadratic(by_definition, q, k, v, True, core.eps)
    assert lowp.dtype == np.float32
    assert_attention_close(quadratic(by_definition, *(a.astype(np.float64) for a in (q, k, v)), True, core.eps),
                           out64, np.float64)           # the same math: in float64 it is the core's result
    assert_attention_close(out32, out64, np.float32, lowp=lowp, row_length=600)


# ------------------------------------------------------------------ memory: O(N·d), no N×N
def _fwd_bwd_peaks(core, sizes, d=4):
    """Traced peak bytes of forward + backward at each N of ``sizes`` (inputs allocated outside)."""
    core(*_qkv((), 64, d))                                          # compile outside the trace
    peaks = {}
    for n in sizes:
        q, k, v = _qkv((), n, d, seed=n)
        g = np.random.default_rng(1).standard_normal(v.shape)

        def run():
            out, cache = core.forward(q, k, v)
            core.backward(cache, g)
        peaks[n] = traced_peak(run)
    return peaks


class _QuadraticTemporary(LinearAttention):
    """Linear attention that also makes an N × N/64 float64 temporary in its forward pass:
    what the memory test must catch."""

    def forward(self, q, k, v, **kw):
        np.ones((q.shape[-2], q.shape[-2] // 64)).sum()
        return super().forward(q, k, v, **kw)


N_SMALL, N_LARGE = 1 << 11, 1 << 14


@pytest.mark.parametrize("fmap, causal, method", [(f, False, "auto") for f in ("elu", "performer")] +
                         [(f, True, m) for f in ("elu", "performer") for m in ("auto", "numpy", "chunked")])
def test_memory_is_linear_in_n(fmap, causal, method):
    """From N to 8N the traced peak of forward + backward grows < 12x (about 8x or less
    measured); an N x N intermediate would grow it ~64x, and the peak stays far below one
    N x N float64 array. (``method`` only chooses the causal evaluation.)"""
    peaks = _fwd_bwd_peaks(LinearAttention(_map(fmap, 4, m=16), causal=causal, method=method),
                           (N_SMALL, N_LARGE))
    assert peaks[N_LARGE] < 12 * peaks[N_SMALL], peaks
    assert peaks[N_LARGE] < N_LARGE * N_LARGE * 8 / 64, peaks


def test_memory_test_catches_a_quadratic_temporary():
    """The bound above fails for an N x N/64 temporary (so for any N x N one)."""
    peaks = _fwd_bwd_peaks(_QuadraticTemporary(_map("elu", 4)), (N_SMALL, N_LARGE))
    assert peaks[N_LARGE] > 12 * peaks[N_SMALL], peaks


# ------------------------------------------------------------------ cost: the lecture's counts
@pytest.mark.parametrize("n,d,dv", [(1024, 64, 64), (4096, 64, 32), (100, 8, 16)])
def test_cost_reproduces_the_lecture_counts(n, d, dv):
    assert DenseAttention().cost(n, d, dv).multiplications == (d + dv) * n * n        # V(KQ)
    for causal in (False, True):
        lin = LinearAttention(EluFeatureMap(), causal=causal)
        assert lin.cost(n, d, dv).multiplications == 2 * d * dv * n                     # (VK)Q
    perf = LinearAttention(PerformerFeatureMap(np.ones((3 * d, d))))
    # d′ = m features, plus FAVOR+'s own projections ωᵀq, ωᵀk (n·d·m each)
    assert perf.cost(n, d, dv).multiplications == 2 * (3 * d) * dv * n + 2 * n * d * (3 * d)
    assert EfficientAttention().cost(n, d, dv).multiplications == 2 * d * dv * n
    # the crossover: linear is cheaper exactly when N > 2·d·dv/(d + dv)
    cross = 2 * d * dv / (d + dv)
    assert (lin.cost(n, d, dv).flops < DenseAttention().cost(n, d, dv).flops) == (n > cross)


# ------------------------------------------------------------------ efficient attention
def test_efficient_attention_formula_and_gradcheck():
    q, k, v = _qkv((2, 3), 11, 4, dv=5, m=7, seed=16)
    core = EfficientAttention()
    rq = np.exp(q) / np.exp(q).sum(-1, keepdims=True)
    rk = np.exp(k) / np.exp(k).sum(-2, keepdims=True)
    assert_attention_close(core(q, k, v), rq @ (np.swapaxes(rk, -1, -2) @ v), np.float64)
    ones = np.ones_like(v)
    np.testing.assert_allclose(core(q, k, ones), 1.0, rtol=1e-14)     # rows of ρ_q ρ_kᵀ sum to 1
    assert ea.gradcheck(core, (q, k, v)) < 1e-7
    with pytest.raises(ValueError, match="dout must have the shape"):
        core.backward(core.forward(q, k, v)[1], np.ones((2, 3, 11, 4)))


# ------------------------------------------------------------------ bad input
def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="eps must be >= 0.0, got -1e-06"):
        LinearAttention(EluFeatureMap(), eps=-1e-6)
    with pytest.raises(TypeError, match="eps must be a real number"):
        LinearAttention(EluFeatureMap(), eps="small")
    with pytest.raises(TypeError, match="feature_map must have forward, backward and n_features"):
        LinearAttention(np.exp)
    with pytest.raises(TypeError, match="causal must be True or False"):
        LinearAttention(EluFeatureMap(), causal="yes")
    with pytest.raises(ValueError, match="method must be one of"):
        LinearAttention(EluFeatureMap(), method="fft")
    with pytest.raises(ValueError, match=r"omega must have at least one row \(m >= 1"):
        LinearAttention(PerformerFeatureMap(np.zeros((0, 4))))


@pytest.mark.parametrize("causal", [False, True])
def test_bad_inputs(causal):
    core = LinearAttention(_map("performer", 4), causal=causal)
    q, k, v = _qkv((2,), 6, 4, seed=17)
    with pytest.raises(ValueError, match=r"q must have feature width D = 4 \(omega has shape \(7, 4\)\), got D = 5"):
        core.forward(np.ones((2, 6, 5)), np.ones((2, 6, 5)), v)
    bad = q.copy()
    bad[0, 2, 1] = np.nan
    with pytest.raises(ValueError, match="q must contain only finite values"):
        core.forward(bad, k, v, check_finite=True)
    bad_v = v.copy()
    bad_v[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match="v must contain only finite values"):
        core.forward(q, k, bad_v, check_finite=True)
    with pytest.raises(TypeError, match="k must be a float32 or float64 array, got dtype int64"):
        core.forward(q, np.ones((2, 6, 4), np.int64), v)
    with pytest.raises(ValueError, match="k and v must share the number of keys"):
        core.forward(q, k, v[:, :5])
    out, cache = core.forward(q, k, v)
    with pytest.raises(ValueError, match="dout must have the shape of the forward output"):
        core.backward(cache, np.ones((2, 6, 3)))


def test_registry_entries():
    names = {"linear_elu", "linear_elu_causal", "performer", "performer_causal", "rfa", "rfa_causal",
             "efficient"}
    reg = ea.registry()
    assert names <= set(reg)
    for name in names:
        variant = reg[name]
        assert variant.chapter == 4 and variant.exact is False
        core = variant.build(n=16, d=8, seed=0)
        assert core.params == {}
        if isinstance(core, LinearAttention):
            assert core.causal == name.endswith("_causal")
            fm = core.feature_map
            if hasattr(fm, "omega"):
                assert fm.omega.dtype == np.float64
