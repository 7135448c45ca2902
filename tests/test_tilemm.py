"""The register-blocked tile product (kernels/tilemm.py) against its NumPy reference."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from efficient_attention.kernels import tilemm as T

TOL = {np.float32: 2e-6, np.float64: 1e-14}


def _case(rng, dtype, m, k, n, trans_a):
    """``a`` (a transposed view when ``trans_a``), ``b`` and ``c`` views inside larger arrays
    (row strides wider than the rows), and the larger array of ``c``."""
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
    a = a.T if trans_a else a
    b = rng.standard_normal((k + 3, n + 5)).astype(dtype)[1:k + 1, 2:n + 2]
    c_all = rng.standard_normal((m + 2, n + 7)).astype(dtype)
    return a, b, c_all


def _check(dtype, m, k, n, trans_a, accumulate, seed=0):
    rng = np.random.default_rng(seed)
    a, b, c_all = _case(rng, dtype, m, k, n, trans_a)
    want_all = c_all.copy()
    T.tile_matmul_reference(a, b, want_all[1:m + 1, 3:n + 3], accumulate)
    got_all = c_all.copy()
    T.tile_matmul_compiled(a, b, got_all[1:m + 1, 3:n + 3], accumulate)
    scale = np.abs(a).sum(axis=1, keepdims=True) @ np.abs(b).max(axis=0, keepdims=True) if a.size else 0
    bound = TOL[dtype] * (np.abs(want_all[1:m + 1, 3:n + 3]) + scale + 1)
    assert np.all(np.abs(got_all[1:m + 1, 3:n + 3] - want_all[1:m + 1, 3:n + 3]) <= bound)
    outside = np.ones(c_all.shape, bool)
    outside[1:m + 1, 3:n + 3] = False
    np.testing.assert_array_equal(got_all[outside], c_all[outside])          # nothing written outside c


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_tile_matmul_matches_reference_on_every_edge(dtype, trans_a, accumulate):
    """Row counts around the panel height, column counts around a vector and a panel, and ``k``
    from 0: every narrower panel and the scalar columns."""
    lanes = T.VECTOR_BYTES // np.dtype(dtype).itemsize
    ms = sorted({0, 1, T.MR - 1, T.MR, T.MR + 1, 2 * T.MR + 3, 128})
    ns = sorted({0, 1, lanes - 1, lanes, lanes + 1, T.NV * lanes, T.NV * lanes + lanes + 3, 128, 130})
    for seed, (m, k, n) in enumerate(itertools.product(ms, [0, 1, 7, 64], ns)):
        _check(dtype, m, k, n, trans_a, accumulate, seed)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 40), k=st.integers(0, 70), n=st.integers(0, 150), trans_a=st.booleans(),
       accumulate=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]))
def test_tile_matmul_hypothesis(m, k, n, trans_a, accumulate, dtype):
    _check(dtype, m, k, n, trans_a, accumulate)


def test_tile_matmul_python_form_is_numpy():
    """In plain Python (what NUMBA_DISABLE_JIT=1 runs) ``tile_matmul`` is NumPy's product."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((6, 9)), rng.standard_normal((9, 20))
    c = rng.standard_normal((6, 20))
    got = c.copy()
    T.tile_matmul(a, b, got, True)
    np.testing.assert_array_equal(got, c + a @ b)
    T.tile_matmul(a, b, got, False)
    np.testing.assert_array_equal(got, a @ b)


def test_tile_matmul_needs_unit_stride_rows():
    """Strided rows of ``b`` or ``c`` are refused where vectors would be loaded from them."""
    a = np.ones((4, 4))
    with pytest.raises(ValueError, match="unit stride"):
        T.tile_matmul_compiled(a, np.ones((4, 128))[:, ::2], np.zeros((4, 64)), False)
    with pytest.raises(ValueError, match="unit stride"):
        T.tile_matmul_compiled(a, np.ones((4, 64)), np.zeros((4, 128))[:, ::2], False)


def test_tile_matmul_strides_that_no_vector_reads():
    """``k = 0`` reads no ``b`` (NumPy may give an empty array any strides), and a single column
    takes the scalar path whatever its stride."""
    a = np.ones((3, 0))
    c = np.full((3, 2), 5.0)
    T.tile_matmul_compiled(a, np.ones((2, 0)).T, c, False)
    np.testing.assert_array_equal(c, 0.0)
    a, b = np.arange(6.0).reshape(3, 2), np.arange(10.0).reshape(2, 5)[:, 2::5]     # one column, strides (40, 40)
    c = np.zeros((3, 1))
    T.tile_matmul_compiled(a, b, c, False)
    np.testing.assert_array_equal(c, a @ b)


def test_tile_matmul_special_values():
    """Infinities and NaN pass through as in any product (the engine masks before, not after)."""
    a = np.zeros((4, 3), np.float32)
    b = np.ones((3, 32), np.float32)
    a[1, 2] = np.inf
    a[2, 0] = np.nan
    c = np.empty((4, 32), np.float32)
    T.tile_matmul_compiled(a, b, c, False)
    assert np.all(c[0] == 0) and np.all(c[3] == 0)
    assert np.all(np.isposinf(c[1])) and np.all(np.isnan(c[2]))


_NARROW_CHECK = """
import itertools, numpy as np
from efficient_attention.kernels import tilemm as T
assert (T.VECTOR_BYTES, T.NV) == (16, 2), (T.VECTOR_BYTES, T.NV)
rng = np.random.default_rng(0)
for dtype, tol in ((np.float32, 2e-6), (np.float64, 1e-14)):
    for m, k, n, trans, acc in itertools.product([1, 5, 128], [1, 64], [3, 4, 9, 130], [False, True], [False, True]):
        a = rng.standard_normal((k, m) if trans else (m, k)).astype(dtype)
        a = a.T if trans else a
        b = rng.standard_normal((k, n + 1)).astype(dtype)[:, 1:]
        c = rng.standard_normal((m, n)).astype(dtype)
        want, got = c.copy(), c.copy()
        T.tile_matmul_reference(a, b, want, acc)
        T.tile_matmul_compiled(a, b, got, acc)
        bound = tol * (np.abs(want) + np.abs(a).sum(axis=1, keepdims=True) @ np.abs(b).max(axis=0, keepdims=True) + 1)
        assert np.all(np.abs(got - want) <= bound), (dtype, m, k, n, trans, acc)
print("narrow ok")
"""


def test_tile_matmul_on_a_cpu_without_wide_vectors(tmp_path):
    """Compiled for a generic x86-64 CPU (``NUMBA_CPU_NAME=generic``: 16-byte vectors, 16 registers,
    so panels of 2 vectors), the products are still right: the path of machines unlike this one."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", _NARROW_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "narrow ok" in run.stdout
