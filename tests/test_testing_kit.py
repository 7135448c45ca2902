"""efficient_attention.testing: the strategies draw what they promise and the assertion catches planted bugs."""
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention.testing import (assert_attention_close, masks, patterns, qkv, sparse_masks,
                                         tolerances)


def _softmax_attention(q, k, v, scale):
    s = scale * q @ np.swapaxes(k, -1, -2)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _property_test(impl, dtype):
    """The recipe: property-test an implementation against DenseAttention (in float32 with
    the lowp rule: dense_oracle and assert_close_to_oracle)."""
    @settings(max_examples=60, database=None, derandomize=True, deadline=None)
    @given(qkv(dtype=dtype))
    def test(arrays):
        q, k, v = arrays
        if dtype == np.float32:
            ea.testing.assert_close_to_oracle((impl(q, k, v),), ea.testing.dense_oracle(q, k, v), dtype)
            return
        expected = ea.DenseAttention()(*(a.astype(np.float64) for a in arrays))
        assert_attention_close(impl(q, k, v), expected, dtype)
    test()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_correct_implementation_passes(dtype):
    _property_test(lambda q, k, v: _softmax_attention(q, k, v, q.shape[-1] ** -0.5), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_planted_missing_scale_is_caught(dtype):
    with pytest.raises(AssertionError):
        _property_test(lambda q, k, v: _softmax_attention(q, k, v, 1.0), dtype)


def test_planted_transposed_softmax_is_caught():
    def wrong(q, k, v):   # normalises over queries instead of keys
        s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max(-2, keepdims=True))
        return (p / p.sum(-2, keepdims=True)) @ v
    with pytest.raises(AssertionError):
        _property_test(wrong, np.float64)


def test_float32_tolerance_rejects_float32_noise_in_float64_mode():
    x = np.linspace(-1, 1, 50)
    noisy = x.astype(np.float32).astype(np.float64)
    assert_attention_close(noisy, x, np.float32)            # the fixed bound itself under test: no lowp
    with pytest.raises(AssertionError):
        assert_attention_close(noisy, x, np.float64)
    with pytest.raises(AssertionError, match="shape"):
        assert_attention_close(x[:3], x, np.float64)
    with pytest.raises(AssertionError, match="NaN"):
        assert_attention_close(np.full(3, np.nan), np.zeros(3), np.float64)


def test_tolerances_documented_values():
    assert tolerances(np.float64) == (1e-10, 1e-12)
    assert tolerances(np.float32) == (1e-5, 1e-6)
    assert tolerances(np.float32, row_length=256) == (2e-5, 2e-6)
    assert tolerances(np.float64, kind="grad") == (1e-9, 1e-11)
    with pytest.raises(TypeError, match="dtype"):
        tolerances(np.float16)


@given(st.data())
def test_strategies_draw_consistent_shapes(data):
    q, k, v = data.draw(qkv(dtype=np.float32))
    assert q.dtype == k.dtype == v.dtype == np.float32
    assert q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
    assert q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2]
    assert np.all(np.abs(q) <= 3)
    n, m = q.shape[-2], k.shape[-2]
    mask = data.draw(masks(n, m, q.shape[:-2]))
    assert mask.dtype == bool
    np.broadcast_shapes(mask.shape, q.shape[:-2] + (n, m))
    pat = data.draw(sparse_masks(n, m))
    assert sp.issparse(pat) and pat.shape == (n, m) and pat.dtype == bool


def test_masks_produce_fully_masked_rows():
    found = []

    @settings(max_examples=50, database=None, derandomize=True)
    @given(masks(4, 3))
    def collect(mask):
        found.append((~mask.any(-1)).any())
    collect()
    assert any(found)


@given(st.data())
def test_patterns_strategy_draws_valid_csr(data):
    n = data.draw(st.integers(1, 8))
    m = data.draw(st.sampled_from([n, n + 2]))
    pat = data.draw(patterns(n, m))
    assert sp.issparse(pat) and pat.format == "csr" and pat.shape == (n, m) and pat.dtype == bool
    q, k, v = (np.random.default_rng(0).standard_normal(s) for s in ((n, 3), (m, 3), (m, 2)))
    dense = ea.DenseAttention()(q, k, v, mask=pat.toarray())
    np.testing.assert_allclose(ea.DenseAttention()(q, k, v, mask=pat), dense)


def test_default_profile_is_derandomized():
    """The README's test command draws the same examples on every run and machine."""
    import os

    from hypothesis import settings as current
    if os.environ.get("HYPOTHESIS_PROFILE", "ea") == "ea":
        assert current.default.derandomize and current.default.database is None


def test_dense_oracle_and_assert_close_to_oracle():
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal(s).astype(np.float32) for s in ((2, 5, 3), (2, 6, 3), (2, 6, 2), (2, 5, 2)))
    mask = rng.random((5, 6)) < 0.6
    mask[1] = False
    oracle = ea.testing.dense_oracle(q, k, v, g, mask=mask, causal=True)
    assert [a.dtype for a in oracle.expected] == [np.float64] * 4
    assert [a.dtype for a in oracle.lowp] == [np.float32] * 4
    assert all(m.shape == e.shape for m, e in zip(oracle.magnitude, oracle.expected))
    assert np.all(oracle.magnitude[0][:, 1] == 0)          # a fully masked row sums no terms
    ea.testing.assert_close_to_oracle(oracle.lowp, oracle, np.float32)
    wrong = list(oracle.lowp)
    wrong[2] = wrong[2] + np.float32(1e-3)
    with pytest.raises(AssertionError, match="dk"):
        ea.testing.assert_close_to_oracle(wrong, oracle, np.float32)
    only_out = ea.testing.dense_oracle(q, k, v)
    assert len(only_out.expected) == 1
