"""The float32 row kernels of the banded attention against their NumPy references."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_attention.kernels import band

EPS32 = np.finfo(np.float32).eps


def _scores(rows, length, seed, masked_rows=(), masked_frac=0.3):
    rng = np.random.default_rng(seed)
    s = (rng.standard_normal((rows, length)) * 4).astype(np.float32)
    s[rng.random((rows, length)) < masked_frac] = -np.inf
    s[:, 0] = rng.standard_normal(rows).astype(np.float32)        # every row sees a key ...
    for r in masked_rows:                                         # ... except these
        s[r] = -np.inf
    return s


@pytest.mark.parametrize("impl", ["jit", "py_func"])
@pytest.mark.parametrize("rows,length", [(1, 1), (3, 7), (64, 576), (5, 2048)])
def test_softmax_rows(impl, rows, length):
    f = band.softmax_rows if impl == "jit" else band.softmax_rows.py_func
    s = _scores(rows, length, seed=rows + length, masked_rows=[rows - 1] if rows > 2 else [])
    p, m, l = np.array(s), np.empty(rows, np.float32), np.empty(rows, np.float32)
    f(p, m, l)
    rp, rm, rl = band.softmax_rows_reference(s)
    np.testing.assert_array_equal(m, rm)
    np.testing.assert_allclose(p, rp, rtol=2 * EPS32, atol=0)
    np.testing.assert_allclose(l, rl, rtol=8 * EPS32 * np.sqrt(length), atol=0)
    if rows > 2:
        assert np.isneginf(m[-1]) and l[-1] == 0 and not p[-1].any()
    assert np.all(p[np.isneginf(s)] == 0)


@pytest.mark.parametrize("impl", ["jit", "py_func"])
def test_exp_rows(impl):
    f = band.exp_rows if impl == "jit" else band.exp_rows.py_func
    s = _scores(6, 100, seed=3, masked_rows=[2])
    with np.errstate(divide="ignore"):                            # row 2: log 0 = -inf
        shift = np.log(np.exp(s.astype(np.float64)).sum(axis=1)).astype(np.float32)   # an lse
    p = s.copy()
    f(p, shift)
    np.testing.assert_allclose(p, band.exp_rows_reference(s, shift), rtol=2 * EPS32, atol=0)
    np.testing.assert_allclose(p[[0, 1, 3]].sum(axis=1), 1, rtol=1e-5)
    assert not p[2].any()


@pytest.mark.parametrize("impl", ["jit", "py_func"])
@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 9), length=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_dsoftmax_rows(impl, rows, length, seed):
    f = band.dsoftmax_rows if impl == "jit" else band.dsoftmax_rows.py_func
    s = _scores(rows, length, seed)
    p, _, l = band.softmax_rows_reference(s)
    p = (p / l[:, None]).astype(np.float32)
    dp = np.random.default_rng(seed + 1).standard_normal((rows, length)).astype(np.float32)
    got = dp.copy()
    f(p, got)
    ref = band.dsoftmax_rows_reference(p, dp)
    exact = p.astype(np.float64) * (dp - (p.astype(np.float64) * dp).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(dp).max())
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6 * np.abs(dp).max())
