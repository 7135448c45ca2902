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


# --- float32 -----------------------------------------------------------------------------------

from efficient_attention.kernels.fastexp import (EXP32_LOWER, EXP32_UPPER, exp32_reference,  # noqa: E402
                                                 exp32_shift_inplace)

EPS32 = np.finfo(np.float32).eps


@pytest.mark.parametrize("impl", ["jit", "py_func"])
def test_exp32_within_one_ulp_of_the_exact_value(impl):
    f = exp32_shift_inplace if impl == "jit" else exp32_shift_inplace.py_func
    rng = np.random.default_rng(1)
    size = 200_000 if impl == "jit" else 3_000
    x = np.concatenate([rng.uniform(EXP32_LOWER, EXP32_UPPER, size), rng.uniform(-20, 0, size),
                        rng.uniform(-1e-3, 1e-3, size // 10),
                        [0.0, -0.0, 1.0, -1.0, EXP32_LOWER, EXP32_UPPER, np.log(2) / 2]]).astype(np.float32)
    for shift in (0.0, 3.5, -2.25):
        got = x.copy()
        f(got, shift)
        exact = np.exp((x - np.float32(shift)).astype(np.float64))   # of the float32 difference
        keep = (x - np.float32(shift) >= EXP32_LOWER) & (x - np.float32(shift) <= EXP32_UPPER)
        rel = np.abs(got[keep] - exact[keep]) / exact[keep]
        assert got.dtype == np.float32 and rel.max() <= 1.5 * EPS32, rel.max() / EPS32
        np.testing.assert_allclose(got, exp32_reference(x, shift), rtol=2 * EPS32, atol=0)


def test_exp32_edges_and_strided_views():
    x = np.array([-np.inf, -1e30, EXP32_LOWER - 0.5, EXP32_UPPER + 0.5, 1e30, np.inf, np.nan, 0.0],
                 np.float32)
    for f in (exp32_shift_inplace, exp32_shift_inplace.py_func):
        got = x.copy()
        f(got, 0.0)
        np.testing.assert_array_equal(got[:3], 0.0)
        assert np.all(np.isposinf(got[3:6])) and np.isnan(got[6]) and got[7] == 1.0
    ref = exp32_reference(x)
    np.testing.assert_array_equal(ref[:3], 0.0)
    assert np.all(np.isposinf(ref[3:6])) and np.isnan(ref[6]) and ref[7] == 1.0
    y = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    col = y[:, 1]                                            # a strided view: only it changes
    exp32_shift_inplace(col, 1.0)
    np.testing.assert_allclose(y[:, 1], np.exp(np.array([-5, -1, 3], np.float32)), rtol=2 * EPS32)
    np.testing.assert_array_equal(y[:, 0], [-5, -1, 3])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-80, 80, width=32), min_size=1, max_size=50), st.floats(-5, 5, width=32))
def test_exp32_property(values, shift):
    x = np.array(values, dtype=np.float32)
    got = x.copy()
    exp32_shift_inplace(got, shift)
    exact = np.exp((x - np.float32(shift)).astype(np.float64))      # of the float32 difference
    np.testing.assert_allclose(got, exact, rtol=1.5 * EPS32, atol=0)
