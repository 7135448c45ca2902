"""Softmax / log-sum-exp: stability, the fully-masked-row rule, backward."""
import warnings

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention.softmax import logsumexp, probs_from_lse, softmax, softmax_backward, softmax_lse
from efficient_attention.testing import float_arrays


@given(st.data())
def test_softmax_matches_definition_and_rows_sum_to_one(data):
    shape = data.draw(st.tuples(st.integers(1, 4), st.integers(1, 6)))
    x = data.draw(float_arrays(shape, elements={"min_value": -50, "max_value": 50}))
    mask = data.draw(float_arrays(shape)) > -1.0
    p, lse = softmax_lse(x, mask)
    for i in range(shape[0]):
        allowed = mask[i]
        if not allowed.any():
            assert np.isneginf(lse[i]) and np.all(p[i] == 0)
            continue
        e = np.exp(x[i][allowed] - x[i][allowed].max())
        np.testing.assert_allclose(p[i][allowed], e / e.sum(), rtol=1e-12, atol=1e-300)
        assert np.all(p[i][~allowed] == 0)
        np.testing.assert_allclose(lse[i], np.log(np.sum(np.exp(x[i][allowed] - 50))) + 50, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(p[i].sum(), 1.0, rtol=1e-12)
    np.testing.assert_allclose(probs_from_lse(x, lse, mask), p, rtol=1e-12, atol=1e-300)


def test_large_logits_no_overflow_no_warning():
    x = np.array([[1e308, 1e308 * 0.5, -1e308], [1000.0, 999.0, -1000.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p, lse = softmax_lse(x)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(lse))
    np.testing.assert_allclose(p[1], np.exp([0, -1, -2000]) / (1 + np.exp(-1)))


def test_fully_masked_row_and_empty_axis():
    x = np.ones((3, 4), np.float32)
    mask = np.array([[True] * 4, [False] * 4, [True, False, False, False]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p, lse = softmax_lse(x, mask)
        assert p.dtype == np.float32 and lse.dtype == np.float32
        assert np.all(p[1] == 0) and np.isneginf(lse[1])
        assert softmax(np.zeros((2, 0))).shape == (2, 0)
        assert np.all(np.isneginf(logsumexp(np.zeros((2, 0)))))
        dx = softmax_backward(p, np.ones_like(p))
    assert np.all(dx[1] == 0)


def test_softmax_backward_gradcheck():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5))
    mask = rng.random((3, 5)) < 0.6
    mask[0] = False

    def fwd(x):
        p = softmax(x, mask)
        return p, p

    def bwd(p, dp):
        return [softmax_backward(p, dp)]

    assert ea.gradcheck(fwd, (x,), bwd) < 1e-7
