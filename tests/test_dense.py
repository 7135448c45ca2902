"""Chapter 0: the dense oracle against the naive loop and finite differences."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention.testing import assert_attention_close, masks, qkv, sparse_masks

from naive import attention_grads_loop, attention_in_dtype, attention_loop


@st.composite
def case(draw, dtype=np.float64):
    q, k, v = draw(qkv(dtype=dtype, max_n=7, max_d=4))
    n, m = q.shape[-2], k.shape[-2]
    kind = draw(st.sampled_from(["none", "dense", "sparse"]))
    mask = None
    if kind == "dense":
        mask = draw(masks(n, m, q.shape[:-2]))
    elif kind == "sparse":
        mask = draw(sparse_masks(n, m))
    causal = draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.5, 1.0]))
    return q, k, v, mask, causal, scale


def _dense(mask):
    return mask.toarray() if sp.issparse(mask) else mask


@given(case())
def test_forward_backward_equal_naive_loop(c):
    q, k, v, mask, causal, scale = c
    core = ea.DenseAttention(causal=causal, scale=scale)
    out, cache = core.forward(q, k, v, mask=mask)
    expected = attention_loop(q, k, v, _dense(mask), causal, scale)
    assert_attention_close(out, expected, np.float64)
    dout = np.random.default_rng(0).standard_normal(out.shape)
    grads = core.backward(cache, dout)
    for got, want in zip(grads[:3], attention_grads_loop(q, k, v, dout, _dense(mask), causal, scale)):
        assert_attention_close(got, want, np.float64, kind="grad")
    assert grads.params == {}


@given(case())
def test_gradcheck(c):
    q, k, v, mask, causal, scale = c
    core = ea.DenseAttention(causal=causal, scale=scale)
    assert ea.gradcheck(core, (q, k, v), forward_kwargs={"mask": mask}) < 1e-6


@given(case(dtype=np.float32))
def test_float32_matches_float64(c):
    q, k, v, mask, causal, scale = c
    core = ea.DenseAttention(causal=causal, scale=scale)
    out32, cache = core.forward(q, k, v, mask=mask)
    assert out32.dtype == np.float32
    out64, cache64 = core.forward(*(a.astype(np.float64) for a in (q, k, v)), mask=mask)
    dout = np.ones_like(out32)
    g32, g64 = core.backward(cache, dout), core.backward(cache64, dout.astype(np.float64))
    # the lowp rule with an independent float32 implementation (the oracle itself would pass itself)
    dense = None if mask is None else (mask if isinstance(mask, np.ndarray) else mask.toarray())
    lowp = attention_in_dtype(q, k, v, dout, dense, causal, scale)
    magnitude = ea.testing.rounding_scale(q, k, v, dout, mask=dense, causal=causal, scale=scale)
    for a, b, ref, mag, kind in zip((out32,) + tuple(g32[:3]), (out64,) + tuple(g64[:3]), lowp, magnitude,
                                    ("value", "grad", "grad", "grad")):
        assert a.dtype == np.float32
        assert_attention_close(a, b, np.float32, lowp=ref, magnitude=mag, kind=kind)


def test_fully_masked_rows_zero_output_zero_grad_no_warning():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 4, 3)) * 50 for _ in range(3))   # large logits too
    mask = np.ones((4, 4), bool)
    mask[1] = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, cache = ea.DenseAttention().forward(q, k, v, mask=mask)
        g = ea.DenseAttention().backward(cache, np.ones_like(out))
    assert np.all(out[:, 1] == 0) and np.all(g.dq[:, 1] == 0)
    assert all(np.all(np.isfinite(a)) for a in (out, *g[:3]))
    # all rows masked: all zeros
    out0 = ea.DenseAttention()(q, k, v, mask=np.zeros((4, 4), bool))
    assert np.all(out0 == 0)


def test_large_logits_stable():
    q = np.array([[1e4, 0.0], [-1e4, 0.0]])
    k = np.array([[1e4, 0.0], [0.0, 1.0]])
    v = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = ea.DenseAttention(scale=1.0)(q, k, v)
    np.testing.assert_allclose(out, [[1.0, 2.0], [3.0, 4.0]])


def test_causal_with_more_keys_than_queries():
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((3, 2)), rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    out = ea.DenseAttention(causal=True)(q, k, v)
    assert_attention_close(out, attention_loop(q, k, v, causal=True), np.float64)
    np.testing.assert_allclose(out[0], v[0])


def test_mixed_dtypes_promote_and_float32_stays_float32():
    rng = np.random.default_rng(3)
    q32, k32, v32 = (rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3))
    assert ea.DenseAttention()(q32, k32, v32).dtype == np.float32
    assert ea.DenseAttention()(q32, k32.astype(np.float64), v32).dtype == np.float64
    out, cache = ea.DenseAttention().forward(q32, k32, v32)
    assert ea.DenseAttention().backward(cache, np.ones((4, 3))).dq.dtype == np.float32


def test_inputs_never_modified_and_any_layout_accepted():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((3, 6, 5))
    q = np.asfortranarray(base[:, :, :4])
    k = base[:, ::-1, 1:].copy()[:, :, :4]
    v = base[::-1, :, :]
    saved = [a.copy() for a in (q, k, v)]
    for a in (q, k, v):
        a.flags.writeable = False                  # read-only inputs work (and cannot be written)
    core = ea.DenseAttention(causal=True)
    out, cache = core.forward(q, k, v)
    core.backward(cache, np.ones_like(out))
    for a, s in zip((q, k, v), saved):
        np.testing.assert_array_equal(a, s)
    assert_attention_close(out, attention_loop(q, k, v, causal=True), np.float64)


def test_array_likes_and_dlpack():
    q = [[1.0, 0.0], [0.0, 1.0]]
    out = ea.DenseAttention()(q, q, q)
    assert out.shape == (2, 2)

    class Exporter:                                   # stands in for a CPU torch tensor / JAX array
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kwargs):
            return self.a.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    a = np.asarray(q)
    np.testing.assert_array_equal(ea.DenseAttention()(Exporter(a), a, a), out)


def test_cost_counts():
    c = ea.DenseAttention().cost(128, 64, 32, m=256)
    assert c.flops == 2 * 128 * 256 * (64 + 32) and c.multiplications == 128 * 256 * (64 + 32)
    assert c.memory >= 128 * 256
    assert ea.DenseAttention().cost(128, 64, backward=True).flops > c.flops // 2


def test_repr_and_params():
    core = ea.DenseAttention(causal=True, scale=0.5)
    assert repr(core) == "DenseAttention(causal=True, scale=0.5)"
    assert core.params == {}


@pytest.mark.parametrize("n", [1, 2])
def test_single_query(n):
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((n, 3)), rng.standard_normal((1, 3)), rng.standard_normal((1, 2))
    np.testing.assert_allclose(ea.DenseAttention()(q, k, v), np.broadcast_to(v, (n, 2)))
