"""Synthesizer layers: direct formulas, dense-attention reduction, gradients, causality, bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import softmax as sp_softmax

import efficient_attention as ea
from efficient_attention.dense import DenseAttention
from efficient_attention.synthesizer import (DenseSynthesizer, FactorizedRandomSynthesizer,
                                             RandomSynthesizer)
from efficient_attention.testing import assert_attention_close, float_arrays

RNG = np.random.default_rng(99)
KINDS = ["dense", "random", "factorized"]


def _build(kind, n, d, seed=0, causal=False):
    if kind == "dense":
        layer = DenseSynthesizer.init(n, d, seed, dh=5, causal=causal)
        rng = np.random.default_rng(seed + 100)          # non-zero biases so they are exercised
        layer.b1[...] = rng.standard_normal(layer.b1.shape)
        layer.b2[...] = rng.standard_normal(layer.b2.shape)
        return layer
    if kind == "random":
        return RandomSynthesizer.init(n, d, seed, causal=causal)
    return FactorizedRandomSynthesizer.init(n, d, seed, k=3, causal=causal)


def _direct(layer, x):
    """softmax(B + mask)·(x·W_v) written out with scipy's softmax and an explicit loop over rows,
    in x's dtype (the parameters cast to it: in float32, the lowp of the float32 test)."""
    n = x.shape[-2]
    p = {name: np.asarray(getattr(layer, name)).astype(x.dtype) for name in layer.params}
    if isinstance(layer, DenseSynthesizer):
        logits = np.maximum(x @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"]
    elif isinstance(layer, RandomSynthesizer):
        logits = np.broadcast_to(p["r"], x.shape[:-2] + (n, n))
    else:
        logits = np.broadcast_to(p["r1"] @ p["r2"].T, x.shape[:-2] + (n, n))
    vals = x @ p["w_v"]
    y = np.zeros_like(x)
    for i in range(n):
        stop = i + 1 if layer.causal else n
        p = sp_softmax(logits[..., i, :stop], axis=-1)
        y[..., i, :] = np.einsum("...j,...jd->...d", p, vals[..., :stop, :])
    return y


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_forward_direct_formula(kind, causal, batch):
    n, d = 7, 4
    layer = _build(kind, n, d, causal=causal)
    x = RNG.standard_normal(batch + (n, d))
    y = layer(x)
    assert y.shape == x.shape and y.dtype == np.float64
    assert_attention_close(y, _direct(layer, x), np.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
def test_gradcheck_x_and_every_param(kind, causal, batch):
    layer = _build(kind, 6, 4, seed=1, causal=causal)
    errs = ea.gradcheck(layer, (RNG.standard_normal(batch + (6, 4)),), full=True)
    assert set(errs) == {"x"} | {f"param.{p}" for p in layer.params}
    assert max(errs.values()) < 1e-6


@pytest.mark.parametrize("causal", [False, True])
def test_random_synthesizer_with_dot_product_logits_is_dense_attention(causal):
    n, d = 9, 5
    q, k, x = (RNG.standard_normal((n, d)) for _ in range(3))
    r = (q @ k.T) / np.sqrt(d)                           # the logits dense attention computes for this input
    layer = RandomSynthesizer(r, np.eye(d), causal=causal)
    ref = DenseAttention(causal=causal)(q, k, x)
    assert_attention_close(layer(x), ref, np.float64)


def test_factorized_equals_random_with_the_product():
    n, d = 8, 3
    r1, r2, w_v = RNG.standard_normal((n, 2)), RNG.standard_normal((n, 2)), RNG.standard_normal((d, d))
    x = RNG.standard_normal((2, n, d))
    assert_attention_close(FactorizedRandomSynthesizer(r1, r2, w_v)(x), RandomSynthesizer(r1 @ r2.T, w_v)(x),
                           np.float64)


def test_dense_synthesizer_rows_depend_on_own_token_only():
    """Row i of the dense synthesizer's logits is a function of token i: permuting the
    other tokens leaves the attention weights of row i unchanged."""
    n, d = 6, 4
    layer = _build("dense", n, d, seed=2)
    x = RNG.standard_normal((n, d))
    x2 = x.copy()
    x2[[1, 4]] = x2[[4, 1]]
    p1 = layer.forward(x)[1].probs
    p2 = layer.forward(x2)[1].probs
    np.testing.assert_allclose(p1[0], p2[0], rtol=1e-14)
    np.testing.assert_allclose(p1[[2, 3, 5]], p2[[2, 3, 5]], rtol=1e-14)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_causal_synthesizers_never_read_the_future(data):
    kind = data.draw(st.sampled_from(KINDS))
    n = data.draw(st.integers(1, 9))
    d = data.draw(st.integers(1, 4))
    batch = data.draw(st.sampled_from([(), (2,)]))
    t = data.draw(st.integers(0, n - 1))                 # tokens t+1.. change
    layer = _build(kind, n, d, seed=data.draw(st.integers(0, 5)), causal=True)
    x = data.draw(float_arrays(batch + (n, d)))
    x2 = x.copy()
    x2[..., t + 1:, :] = data.draw(float_arrays(batch + (n - t - 1, d)))
    np.testing.assert_array_equal(layer(x)[..., : t + 1, :], layer(x2)[..., : t + 1, :])
    # and the gradient reaching past tokens from a loss on y[:t+1] is exactly zero for the future
    y, cache = layer.forward(x)
    dy = np.zeros_like(y)
    dy[..., : t + 1, :] = 1.0
    g = layer.backward(cache, dy)
    assert not np.any(g.dx[..., t + 1:, :])


@pytest.mark.parametrize("kind", KINDS)
def test_non_causal_reads_the_future(kind):
    """The property test above can fail: without the mask the first output depends on the last token."""
    layer = _build(kind, 5, 3, seed=3)
    x = RNG.standard_normal((5, 3))
    x2 = x.copy()
    x2[-1] += 1.0
    assert not np.allclose(layer(x)[0], layer(x2)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_float32(kind):
    layer = _build(kind, 16, 8)
    x = RNG.standard_normal((2, 16, 8)).astype(np.float32)
    y32, cache = layer.forward(x)
    assert y32.dtype == np.float32
    lowp = _direct(layer, x)                  # the lowp rule: the direct formula evaluated in float32
    assert lowp.dtype == np.float32
    assert_attention_close(y32, layer(x.astype(np.float64)), np.float32, lowp=lowp, row_length=16)
    g = layer.backward(cache, np.ones_like(y32))
    assert g.dx.dtype == np.float32 and all(v.dtype == np.float64 for v in g.params.values())


def test_init_is_seeded_and_float64_by_default():
    for cls in (DenseSynthesizer, RandomSynthesizer, FactorizedRandomSynthesizer):
        a, b = cls.init(n=16, d=8, seed=5), cls.init(n=16, d=8, seed=5)
        c = cls.init(n=16, d=8, seed=6)
        assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
        assert any(not np.array_equal(a.params[k], c.params[k]) for k in a.params)
        assert all(p.dtype == np.float64 for p in a.params.values())
        assert all(p.dtype == np.float32 for p in cls.init(n=16, d=8, dtype=np.float32).params.values())
    assert FactorizedRandomSynthesizer.init(n=4, d=2, k=8).r1.shape == (4, 4)   # k capped at n


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_sequence_length_must_be_the_layers(kind):
    layer = _build(kind, 8, 4)
    with pytest.raises(ValueError, match=r"x must have sequence length N = 8.*\(2, 7, 4\)"):
        layer(np.ones((2, 7, 4)))
    with pytest.raises(ValueError, match="x must have feature width D = 4"):
        layer(np.ones((8, 5)))


def test_wrong_parameter_shapes():
    d, dh, n = 4, 3, 6
    ok = dict(w1=np.ones((d, dh)), b1=np.ones(dh), w2=np.ones((dh, n)), b2=np.ones(n), w_v=np.eye(d))
    for name, bad, match in [("w2", np.ones((dh + 1, n)), r"w2 must have shape \(Dh, N\) with Dh = 3"),
                             ("b1", np.ones(dh + 1), r"b1 must have shape \(Dh,\)"),
                             ("b2", np.ones(n - 1), r"b2 must have shape \(N,\)"),
                             ("w_v", np.ones((d, d + 1)), r"w_v must have shape \(D, D\)"),
                             ("w_v", np.eye(d + 1), r"w_v must have shape \(D, D\) = \(4, 4\)"),
                             ("w1", np.ones(d), r"w1 must have shape \(D, Dh\)")]:
        with pytest.raises(ValueError, match=match):
            DenseSynthesizer(**{**ok, name: bad})
    with pytest.raises(ValueError, match=r"r must have shape \(N, N\)"):
        RandomSynthesizer(np.ones((3, 4)), np.eye(2))
    with pytest.raises(ValueError, match=r"w_v must have shape \(D, D\)"):
        RandomSynthesizer(np.ones((3, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"r2 must have shape \(N, K\)"):
        FactorizedRandomSynthesizer(np.ones((5, 2)), np.ones((5, 3)), np.eye(2))
    with pytest.raises(TypeError, match="r must be a float32 or float64"):
        RandomSynthesizer(np.ones((3, 3), dtype=int), np.eye(2))
    with pytest.raises(TypeError, match="causal must be True or False"):
        RandomSynthesizer(np.ones((3, 3)), np.eye(2), causal="yes")


def test_bad_dy_and_nonfinite_x():
    layer = _build("random", 4, 2)
    y, cache = layer.forward(np.ones((4, 2)))
    with pytest.raises(ValueError, match="dy must have the shape"):
        layer.backward(cache, np.ones((4, 3)))
    with pytest.raises(ValueError, match="x must contain only finite"):
        layer.forward(np.full((4, 2), np.inf), check_finite=True)


def test_registry_entries():
    reg = ea.registry("layer")
    for name, cls in [("synth_dense", DenseSynthesizer), ("synth_random", RandomSynthesizer),
                      ("synth_factorized", FactorizedRandomSynthesizer)]:
        assert reg[name].cls is cls and reg[name].chapter == 5
    assert reg["synth_dense_causal"].build(n=32, d=8).causal
