"""Generic tests run on every registered variant: registering is enough to be tested."""
import numpy as np
import pytest

import efficient_attention as ea
from efficient_attention.testing import assert_attention_close, assert_close_to_oracle, dense_oracle

CORES = sorted(ea.registry("core"))
LAYERS = sorted(ea.registry("layer"))
D = 8


def _qkv(n, dtype, heads=2, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((heads, n, D)).astype(dtype) for _ in range(3))


def _build(name, n, seed=0):
    return ea.get_variant(name).build(n=n, d=D, dv=D, seed=seed)


def _f64_params(obj):
    """gradcheck perturbs parameters in place: they must be float64."""
    return all(p.dtype == np.float64 for p in obj.params.values())


def test_registry_lists_dense_and_unique_names():
    reg = ea.registry()
    assert "dense" in reg and reg["dense"].cls is ea.DenseAttention
    with pytest.raises(ValueError, match="already registered"):
        ea.register("dense", ea.DenseAttention, 0)
    with pytest.raises(ValueError, match="variant must be one of"):
        ea.get_variant("no-such-variant")


@pytest.mark.parametrize("name", CORES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [16, 32])
def test_core_forward_backward_shapes_dtype(name, dtype, n):
    core = _build(name, n)
    q, k, v = _qkv(n, dtype)
    copies = [a.copy() for a in (q, k, v)]
    out, cache = core.forward(q, k, v)
    assert out.shape == (2, n, D) and out.dtype == dtype and np.all(np.isfinite(out))
    g = core.backward(cache, np.ones_like(out))
    assert isinstance(g, ea.Grads)
    for grad, ref in zip((g.dq, g.dk, g.dv), (q, k, v)):
        if grad is not None:
            assert grad.shape == ref.shape and grad.dtype == dtype and np.all(np.isfinite(grad))
    assert set(g.params) == set(core.params)
    for name_p, p in core.params.items():
        assert g.params[name_p].shape == p.shape
    for a, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, c)          # inputs never modified
    assert np.array_equal(core(q, k, v), out)          # __call__ is forward's output, deterministic


@pytest.mark.parametrize("name", CORES)
def test_core_gradcheck(name):
    core = _build(name, 16)
    if not _f64_params(core):
        pytest.fail(f"{name}: registry builds must draw float64 parameters")
    assert ea.gradcheck(core, _qkv(16, np.float64, heads=1)) < 1e-6


@pytest.mark.parametrize("name", [n for n in CORES if ea.get_variant(n).exact])
def test_exact_core_equals_masked_oracle(name):
    core = _build(name, 32)
    q, k, v = _qkv(32, np.float64)
    mask = core.dense_mask(32, 32)
    ref = ea.DenseAttention(scale=getattr(core, "scale", None))(q, k, v, mask=mask)
    assert_attention_close(core(q, k, v), ref, np.float64)


@pytest.mark.parametrize("name", CORES)
def test_core_float32_close_to_float64(name):
    core = _build(name, 32)
    q, k, v = _qkv(32, np.float64)
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    out32 = core(q32, k32, v32)
    mask = core.dense_mask(32, 32)
    if ea.get_variant(name).exact and (mask is not None or isinstance(core, ea.DenseAttention)):
        # the lowp rule: DenseAttention's own float32 result over the core's mask and the rounding scale
        oracle = dense_oracle(q32, k32, v32, mask=mask, scale=getattr(core, "scale", None))
        assert_close_to_oracle((out32,), oracle, np.float32, row_length=32)
        return
    # fixed bound, no lowp: an approximation has no generic independent float32 evaluation
    # (its chapter's tests compare it with one)
    out64 = core(q, k, v)
    assert_attention_close(out32, out64, np.float32, row_length=32)


@pytest.mark.parametrize("name", CORES)
def test_core_cost_positive(name):
    core = _build(name, 32)
    for backward in (False, True):
        c = core.cost(32, D, D, backward=backward)
        assert isinstance(c, ea.Cost) and c.flops > 0 and c.memory > 0


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_forward_backward(name, dtype):
    layer = _build(name, 16)
    x = np.random.default_rng(1).standard_normal((2, 16, D)).astype(dtype)
    x0 = x.copy()
    y, cache = layer.forward(x)
    assert y.shape == x.shape and y.dtype == dtype and np.all(np.isfinite(y))
    g = layer.backward(cache, np.ones_like(y))
    assert isinstance(g, ea.LayerGrads) and g.dx.shape == x.shape and g.dx.dtype == dtype
    assert set(g.params) == set(layer.params)
    np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_gradcheck(name):
    layer = _build(name, 16)
    assert _f64_params(layer), f"{name}: registry builds must draw float64 parameters"
    x = np.random.default_rng(2).standard_normal((1, 16, D))
    assert ea.gradcheck(layer, (x,)) < 1e-6


@pytest.mark.parametrize("name", CORES)
def test_core_own_reference_when_given(name):
    """Cores with their own oracle (``reference``) agree with it; the others fall back to dense_mask."""
    core = _build(name, 16)
    q, k, v = _qkv(16, np.float64)
    dout = np.random.default_rng(9).standard_normal(v.shape)
    ref = core.reference(q, k, v, dout)
    if ref is None:
        return                      # no own oracle: covered by test_exact_core_equals_masked_oracle
    out, cache = core.forward(q, k, v)
    g = core.backward(cache, dout)
    for a, b in zip((out, g.dq, g.dk, g.dv), ref):
        assert_attention_close(a, b, np.float64, kind="grad")
