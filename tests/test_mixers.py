"""Attention-free token mixers: FNet, MLP-Mixer token mixing, gMLP spatial gating."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention.mixers import (FourierMixer, GatedMLP, SpatialGatingUnit, TokenMixingMLP, gelu,
                                        gelu_backward)
from efficient_attention.testing import assert_attention_close, batch_shapes, float_arrays

RNG = np.random.default_rng(7)


# -- FNet ---------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_fourier_equals_fft2_real(data):
    batch = data.draw(batch_shapes())
    n, d = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    x = data.draw(float_arrays(batch + (n, d), dtype))
    y = FourierMixer()(x)
    assert y.shape == x.shape and y.dtype == dtype
    ref = np.fft.fft2(x.astype(np.float64)).real
    rtol, atol = (1e-10, 1e-12) if dtype == np.float64 else (1e-5, 1e-5 * math.sqrt(n * d))
    np.testing.assert_allclose(y, ref, rtol=rtol, atol=atol)


def test_fourier_against_the_dft_sum():
    """Y[k1, k2] = Σ_{n, d} x[n, d] cos(2π(k1 n / N + k2 d / D)) — the definition, written out."""
    n, d = 5, 6
    x = RNG.standard_normal((n, d))
    ref = np.zeros((n, d))
    for k1 in range(n):
        for k2 in range(d):
            ref[k1, k2] = sum(x[i, j] * math.cos(2 * math.pi * (k1 * i / n + k2 * j / d))
                              for i in range(n) for j in range(d))
    assert_attention_close(FourierMixer()(x), ref, np.float64)


@pytest.mark.parametrize("shape", [(8, 6), (3, 5, 7), (2, 2, 4, 3)])
def test_fourier_backward_is_fft2_of_dy_and_gradchecks(shape):
    layer = FourierMixer()
    x, dy = RNG.standard_normal(shape), RNG.standard_normal(shape)
    y, cache = layer.forward(x)
    g = layer.backward(cache, dy)
    assert g.params == {}
    assert_attention_close(g.dx, np.fft.fft2(dy).real, np.float64)
    assert ea.gradcheck(layer, (x,)) < 1e-6


def test_fourier_is_linear_and_any_n():
    layer = FourierMixer()
    a, b = RNG.standard_normal((2, 9, 4)), RNG.standard_normal((2, 9, 4))
    assert_attention_close(layer(2 * a - 3 * b), 2 * layer(a) - 3 * layer(b), np.float64)
    for n in (1, 3, 16, 17):
        assert layer(np.ones((n, 4))).shape == (n, 4)


def test_fourier_bad_input():
    layer = FourierMixer()
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., N, D\)"):
        layer(np.ones(4))
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        layer(np.ones((4, 4), dtype=np.complex128))
    y, cache = layer.forward(np.ones((4, 4)))
    with pytest.raises(ValueError, match="dy must have the shape"):
        layer.backward(cache, np.ones((4, 5)))
    with pytest.raises(ValueError, match="x must have N >= 1 tokens and D >= 1"):
        layer(np.ones((2, 0, 4)))
    with pytest.raises(TypeError, match="takes no options"):
        FourierMixer.init(n=4, d=4, window=3)


# -- GELU -----------------------------------------------------------------------------------

def test_gelu_exact_and_derivative():
    a = np.linspace(-6, 6, 101)
    ref = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in a])
    np.testing.assert_allclose(gelu(a), ref, rtol=1e-14, atol=1e-300)
    h = 1e-6
    numeric = (gelu(a + h) - gelu(a - h)) / (2 * h)
    np.testing.assert_allclose(gelu_backward(a, np.ones_like(a)), numeric, rtol=1e-7, atol=1e-9)
    assert gelu(a.astype(np.float32)).dtype == np.float32


# -- MLP-Mixer ----------------------------------------------------------------------------

def _mixer(n, dh, seed=0):
    rng = np.random.default_rng(seed)
    return TokenMixingMLP(rng.standard_normal((n, dh)), rng.standard_normal(dh),
                          rng.standard_normal((dh, n)), rng.standard_normal(n))


def _gelu_direct(a):
    """gelu by math.erf, one entry at a time, each value rounded to a's dtype."""
    return np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in a.tolist()], dtype=a.dtype)


def _mixer_direct(layer, x):
    """Per channel c: y[:, c] = W2ᵀ gelu(W1ᵀ x[:, c] + b1) + b2, with math.erf; in x's dtype
    (the parameters cast to it: in float32, the lowp of the float32 test)."""
    w1, b1, w2, b2 = (np.asarray(a).astype(x.dtype) for a in (layer.w1, layer.b1, layer.w2, layer.b2))
    y = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[:-2]):
        for c in range(x.shape[-1]):
            col = x[idx + (slice(None), c)]
            h = _gelu_direct(w1.T @ col + b1)
            y[idx + (slice(None), c)] = w2.T @ h + b2
    return y


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
def test_token_mixing_direct_formula(batch):
    layer = _mixer(6, 4)
    x = RNG.standard_normal(batch + (6, 3))
    assert_attention_close(layer(x), _mixer_direct(layer, x), np.float64)


@pytest.mark.parametrize("batch", [(), (2,), (2, 2)])
def test_token_mixing_gradcheck(batch):
    layer = _mixer(5, 3, seed=1)
    errs = ea.gradcheck(layer, (RNG.standard_normal(batch + (5, 4)),), full=True)
    assert set(errs) == {"x", "param.w1", "param.b1", "param.w2", "param.b2"}
    assert max(errs.values()) < 1e-6


def test_token_mixing_mixes_tokens_not_channels():
    """Channels are independent: changing channel 0 leaves the other channels' outputs alone."""
    layer = _mixer(6, 4)
    x = RNG.standard_normal((6, 3))
    x2 = x.copy()
    x2[:, 0] += 1
    np.testing.assert_array_equal(layer(x)[:, 1:], layer(x2)[:, 1:])
    assert not np.allclose(layer(x)[:, 0], layer(x2)[:, 0])


def test_token_mixing_bad_input():
    layer = _mixer(6, 4)
    with pytest.raises(ValueError, match="x must have sequence length N = 6"):
        layer(np.ones((5, 3)))
    with pytest.raises(ValueError, match=r"w2 must have shape \(Dh, N\) = \(4, 6\)"):
        TokenMixingMLP(np.ones((6, 4)), np.ones(4), np.ones((4, 5)), np.ones(6))
    with pytest.raises(ValueError, match=r"b1 must have shape \(Dh,\)"):
        TokenMixingMLP(np.ones((6, 4)), np.ones(3), np.ones((4, 6)), np.ones(6))
    with pytest.raises(ValueError, match=r"b2 must have shape \(N,\)"):
        TokenMixingMLP(np.ones((6, 4)), np.ones(4), np.ones((4, 6)), np.ones(4))


# -- gMLP ------------------------------------------------------------------------------------

def _sgu_direct(w, b, x, causal=False, eps=1e-5):
    f = x.shape[-1] // 2
    u, z = x[..., :f], x[..., f:]
    zn = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + eps)
    w = np.tril(w) if causal else w
    gate = np.einsum("ij,...jc->...ic", w, zn) + b[:, None]
    return u * gate


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_sgu_direct_formula_and_width(causal, batch):
    n, d = 7, 6
    w, b = RNG.standard_normal((n, n)), RNG.standard_normal(n)
    x = RNG.standard_normal(batch + (n, d))
    y = SpatialGatingUnit(w, b, causal=causal)(x)
    assert y.shape == batch + (n, d // 2)            # the paper's unit halves the width
    assert_attention_close(y, _sgu_direct(w, b, x, causal), np.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_sgu_gradcheck(causal):
    layer = SpatialGatingUnit(RNG.standard_normal((5, 5)), RNG.standard_normal(5), causal=causal)
    errs = ea.gradcheck(layer, (RNG.standard_normal((2, 5, 8)),), full=True)
    assert set(errs) == {"x", "param.w", "param.b"} and max(errs.values()) < 1e-6
    if causal:   # the masked upper triangle gets no gradient
        y, cache = layer.forward(RNG.standard_normal((5, 8)))
        assert not np.any(np.triu(layer.backward(cache, np.ones_like(y)).params["w"], 1))


def test_sgu_init_starts_near_identity_gate():
    layer = SpatialGatingUnit.init(16, seed=0)
    assert np.all(layer.b == 1) and np.abs(layer.w).max() <= 1e-3 / 16
    x = RNG.standard_normal((16, 8))
    np.testing.assert_allclose(layer(x), x[:, :4], rtol=0, atol=1e-2)


def test_sgu_bad_input():
    layer = SpatialGatingUnit(np.ones((4, 4)), np.ones(4))
    with pytest.raises(ValueError, match="x must have an even feature width D"):
        layer(np.ones((4, 5)))
    with pytest.raises(ValueError, match="x must have sequence length N = 4"):
        layer(np.ones((5, 4)))
    with pytest.raises(ValueError, match=r"w must have shape \(N, N\)"):
        SpatialGatingUnit(np.ones((4, 3)), np.ones(4))
    with pytest.raises(ValueError, match=r"b must have shape \(N,\)"):
        SpatialGatingUnit(np.ones((4, 4)), np.ones(3))
    with pytest.raises(ValueError, match="eps must be > 0"):
        SpatialGatingUnit(np.ones((4, 4)), np.ones(4), eps=0.0)


def _gated(n, d, f, seed=0, causal=False):
    rng = np.random.default_rng(seed)
    return GatedMLP(rng.standard_normal((d, 2 * f)) / np.sqrt(d), rng.standard_normal(2 * f),
                    rng.standard_normal((n, n)), rng.standard_normal(n),
                    rng.standard_normal((f, d)), rng.standard_normal(d), causal=causal)


def _gated_direct(layer, x):
    """gMLP block by the formula: SGU(gelu(x W_in + b_in)) W_out + b_out; in x's dtype (the
    parameters cast to it: in float32, the lowp of the float32 test)."""
    w_in, b_in, w, b, w_out, b_out = (np.asarray(a).astype(x.dtype) for a in (
        layer.w_in, layer.b_in, layer.params["w"], layer.params["b"], layer.w_out, layer.b_out))
    h = _gelu_direct((x @ w_in + b_in).ravel()).reshape(x.shape[:-1] + (-1,))
    return _sgu_direct(w, b, h, layer.causal) @ w_out + b_out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_gated_mlp_direct_formula(causal, batch):
    n, d, f = 6, 4, 3
    layer = _gated(n, d, f, causal=causal)
    x = RNG.standard_normal(batch + (n, d))
    ref = _gated_direct(layer, x)
    y = layer(x)
    assert y.shape == x.shape
    assert_attention_close(y, ref, np.float64)


@pytest.mark.parametrize("causal", [False, True])
def test_gated_mlp_gradcheck(causal):
    layer = _gated(5, 4, 2, seed=3, causal=causal)
    errs = ea.gradcheck(layer, (RNG.standard_normal((2, 5, 4)),), full=True)
    assert set(errs) == {"x"} | {f"param.{p}" for p in ("w_in", "b_in", "w", "b", "w_out", "b_out")}
    assert max(errs.values()) < 1e-6


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_causal_gating_never_reads_the_future(data):
    n = data.draw(st.integers(1, 9))
    t = data.draw(st.integers(0, n - 1))
    layer = _gated(n, 4, 2, seed=data.draw(st.integers(0, 3)), causal=True)
    x = data.draw(float_arrays((n, 4)))
    x2 = x.copy()
    x2[t + 1:] = data.draw(float_arrays((n - t - 1, 4)))
    np.testing.assert_array_equal(layer(x)[: t + 1], layer(x2)[: t + 1])


def test_gated_mlp_bad_input():
    layer = _gated(6, 4, 2)
    with pytest.raises(ValueError, match="x must have sequence length N = 6"):
        layer(np.ones((5, 4)))
    with pytest.raises(ValueError, match="x must have feature width D = 4"):
        layer(np.ones((6, 3)))
    with pytest.raises(ValueError, match="w_in must have shape .* even"):
        GatedMLP(np.ones((4, 3)), np.ones(3), np.ones((6, 6)), np.ones(6), np.ones((1, 4)), np.ones(4))
    with pytest.raises(ValueError, match=r"w_out must have shape \(F, D\) = \(2, 4\)"):
        GatedMLP(np.ones((4, 4)), np.ones(4), np.ones((6, 6)), np.ones(6), np.ones((3, 4)), np.ones(4))


@pytest.mark.parametrize("cls", [TokenMixingMLP, GatedMLP])
def test_float32_and_init(cls):
    layer = cls.init(n=16, d=8, seed=2)
    assert all(p.dtype == np.float64 for p in layer.params.values())
    x = RNG.standard_normal((2, 16, 8)).astype(np.float32)
    y32, cache = layer.forward(x)
    assert y32.dtype == np.float32
    lowp = (_mixer_direct if cls is TokenMixingMLP else _gated_direct)(layer, x)   # the formula in float32
    assert lowp.dtype == np.float32
    assert_attention_close(y32, layer(x.astype(np.float64)), np.float32, lowp=lowp, row_length=16)
    g = layer.backward(cache, np.ones_like(y32))
    assert g.dx.dtype == np.float32 and all(v.dtype == np.float64 for v in g.params.values())


def test_registry_entries():
    reg = ea.registry("layer")
    assert reg["fnet"].cls is FourierMixer and reg["fnet"].chapter == 6
    assert reg["mixer_token_mlp"].cls is TokenMixingMLP
    assert reg["gmlp"].cls is GatedMLP and reg["gmlp_causal"].build(n=16, d=8).causal


@pytest.mark.parametrize("name", ["fnet", "mixer_token_mlp", "gmlp", "gmlp_causal", "synth_dense",
                                  "synth_random", "synth_factorized", "mha_dense"])
def test_cost_positive(name):
    layer = ea.get_variant(name).build(n=32, d=8)
    for backward in (False, True):
        c = layer.cost(32, 8, backward=backward)
        assert isinstance(c, ea.Cost) and c.flops > 0 and c.memory > 0
    assert layer.cost(32, 8, backward=True).flops > layer.cost(32, 8).flops


@pytest.mark.parametrize("name", ["fnet", "mixer_token_mlp", "gmlp", "gmlp_causal", "synth_dense",
                                  "synth_dense_causal", "synth_random", "synth_factorized", "mha_dense",
                                  "mha_longformer", "mha_bigbird"])
def test_float32_values_and_grads_close_to_float64(name):
    """Every registered layer (chapters 0, 1, 5 and 6): the float32 path agrees with the float64
    one (outputs, dx and every parameter gradient), inputs well scaled. A layer missing from the
    registry fails here."""
    assert name in ea.registry("layer"), f"{name} is not registered"
    n, d = 32, 8
    layer = ea.get_variant(name).build(n=n, d=d, seed=1)
    x = np.random.default_rng(3).standard_normal((2, n, d))
    dy = np.random.default_rng(4).standard_normal((2, n, d))
    y64, c64 = layer.forward(x)
    y32, c32 = layer.forward(x.astype(np.float32))
    g64, g32 = layer.backward(c64, dy), layer.backward(c32, dy.astype(np.float32))
    scale = np.abs(y64).max()
    # fixed bound, no lowp: no independent float32 forward and backward (dx, every parameter) for every layer
    assert_attention_close(y32 / scale, y64 / scale, np.float32, row_length=n * d)
    for key, ref in [("dx", g64.dx)] + list(g64.params.items()):
        got = g32.dx if key == "dx" else g32.params[key]
        s = max(np.abs(ref).max(), 1e-30)
        assert_attention_close(np.asarray(got, np.float64) / s, ref / s, np.float32, row_length=n * d,
                               kind="grad", err_msg=key)
