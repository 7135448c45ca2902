"""The vectorisable exp against numpy.exp (to float64 rounding) and against its NumPy reference."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_attention.kernels.fastexp import EXP_LOWER, EXP_UPPER, exp_inplace, exp_reference

EPS = np.finfo(np.float64).eps


def _run(f, x):
    buf = np.array(x, dtype=np.float64)
    work = np.empty_like(buf)
    f(buf, work, buf.size)
    return buf


@pytest.mark.parametrize("impl", ["jit", "py_func"])
def test_exp_matches_numpy_to_rounding(impl):
    f = exp_inplace if impl == "jit" else getattr(exp_inplace, "py_func", exp_inplace)
    rng = np.random.default_rng(0)
    size = 200_000 if impl == "jit" else 2_000
    x = np.concatenate([rng.uniform(EXP_LOWER, EXP_UPPER, size), rng.uniform(-20, 1, size),
                        rng.uniform(-1e-3, 1e-3, size // 10),
                        [0.0, -0.0, 1.0, -1.0, EXP_LOWER, EXP_UPPER, np.log(2), -np.log(2) / 2,
                         np.log(2) / 2]])
    got = _run(f, x)
    ref = np.exp(x)
    rel = np.abs(got - ref) / ref
    assert rel.max() <= 4 * EPS, rel.max()
    np.testing.assert_allclose(got, exp_reference(x), rtol=2 * EPS, atol=0)


def test_exp_edges():
    x = np.array([-np.inf, -1e300, -745.2, EXP_LOWER - 1e-9, EXP_UPPER + 1e-9, 1e300, np.inf, np.nan, 0.0])
    for f in (exp_inplace, getattr(exp_inplace, "py_func", exp_inplace)):
        got = _run(f, x)
        np.testing.assert_array_equal(got[:4], 0.0)
        assert np.all(np.isposinf(got[4:7])) and np.isnan(got[7]) and got[8] == 1.0
    ref = exp_reference(x)
    np.testing.assert_array_equal(ref[:4], 0.0)
    assert np.all(np.isposinf(ref[4:7])) and np.isnan(ref[7]) and ref[8] == 1.0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(EXP_LOWER, EXP_UPPER), min_size=1, max_size=50))
def test_exp_property(values):
    x = np.array(values)
    got = _run(exp_inplace, x)
    np.testing.assert_allclose(got, np.exp(x), rtol=4 * EPS, atol=0)


def test_exp_only_touches_n_elements():
    x = np.array([0.0, 1.0, 2.0, 3.0])
    work = np.empty(4)
    exp_inplace(x, work, 2)
    np.testing.assert_allclose(x[:2], [1.0, np.e], rtol=4 * EPS)
    np.testing.assert_array_equal(x[2:], [2.0, 3.0])
