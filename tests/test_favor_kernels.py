"""The float32 FAVOR+ row kernels against their NumPy references, and the float32 feature map
through them against the NumPy lines (``ROW_KERNELS = False``) and against float64."""
import numpy as np

import efficient_attention as ea
import pytest

from efficient_attention.feature_maps import PerformerFeatureMap
from efficient_attention.kernels import favor

EPS32 = np.finfo(np.float32).eps
MODES = [favor.ROW_SHIFT, favor.FIXED_SHIFT, favor.EXPONENT_ONLY]


def _block(rows, d, m, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d)).astype(np.float32)
    h = (3 * rng.standard_normal((rows, m))).astype(np.float32)
    return x, h


@pytest.mark.parametrize("impl", ["jit", "py_func"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows,d,m", [(1, 1, 1), (5, 3, 7), (300, 64, 64)])
def test_favor_rows(impl, mode, rows, d, m):
    f = favor.favor_rows if impl == "jit" else favor.favor_rows.py_func
    x, h = _block(rows, d, m, seed=rows + d + m)
    got, row_max = np.array(h), np.empty(rows, np.float32)
    f(got, x, 0.125, 0.25, 2.5, mode, row_max)
    want, want_max = favor.favor_rows_reference(h, x, 0.125, 0.25, 2.5, mode)
    # the exponent h - ‖x‖²/(2√D): a sum of D float32 squares in a different order
    np.testing.assert_allclose(row_max, want_max, rtol=0, atol=4 * d * EPS32 * (np.abs(want_max).max() + 1))
    tol = 4 * d * EPS32 * (np.abs(h).max() + np.einsum("rd,rd->r", x, x).max())   # of the exponent
    np.testing.assert_allclose(got, want, rtol=tol + 4 * EPS32, atol=0 if mode != favor.EXPONENT_ONLY else tol)
    if mode == favor.ROW_SHIFT:                        # the largest feature of each row is exactly norm
        np.testing.assert_array_equal(got.max(axis=1), np.float32(0.25))


@pytest.mark.parametrize("impl", ["jit", "py_func"])
def test_favor_scale_rows(impl):
    f = favor.favor_scale_rows if impl == "jit" else favor.favor_scale_rows.py_func
    _, h = _block(9, 4, 11, seed=1)
    shift = np.linspace(-2, 3, 9).astype(np.float32)
    got = np.array(h)
    f(got, shift, 0.5)
    np.testing.assert_allclose(got, 0.5 * np.exp(h.astype(np.float64) - shift[:, None]), rtol=4 * EPS32)


@pytest.mark.parametrize("impl", ["jit", "py_func"])
def test_favor_grad_and_dx_rows(impl):
    grad = favor.favor_grad_rows if impl == "jit" else favor.favor_grad_rows.py_func
    dxr = favor.favor_dx_rows if impl == "jit" else favor.favor_dx_rows.py_func
    x, phi = _block(37, 6, 13, seed=2)
    dphi = np.random.default_rng(3).standard_normal(phi.shape).astype(np.float32)
    dh, rs = np.empty_like(phi), np.empty(37, np.float32)
    grad(dphi, phi, dh, rs)
    want_dh, want_rs = favor.favor_grad_rows_reference(dphi, phi)
    np.testing.assert_array_equal(dh, want_dh)
    np.testing.assert_allclose(rs, want_rs, rtol=0, atol=8 * 13 * EPS32 * np.abs(want_dh).sum(1).max())
    dx = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    got = np.array(dx)
    dxr(got, x, rs, 0.7)
    np.testing.assert_allclose(got, favor.favor_dx_rows_reference(dx, x, rs, 0.7), rtol=4 * EPS32, atol=4 * EPS32)


def _performer(d=8, m=16, seed=0):
    return PerformerFeatureMap(PerformerFeatureMap.draw(d, m, seed))


@pytest.mark.parametrize("shift", [None, "row", "shared", "bound"])
@pytest.mark.parametrize("shape", [(7, 8), (2, 3, 2100, 8)])       # 2100 rows > one ROW_BLOCK
def test_float32_feature_map_kernels_match_the_numpy_lines(shift, shape, monkeypatch):
    fm = _performer()
    x = (0.8 * np.random.default_rng(5).standard_normal(shape)).astype(np.float32)
    dphi = np.random.default_rng(6).standard_normal(shape[:-1] + (16,)).astype(np.float32)
    assert fm._kernel_path(x)
    phi, s, cache = fm.stable_forward(x, shift)
    dx = fm.backward(cache, dphi)
    monkeypatch.setattr(ea.config, "FEATURE_ROW_KERNELS", False)
    assert not fm._kernel_path(x)
    phi_np, s_np, cache_np = fm.stable_forward(x, shift)
    dx_np = fm.backward(cache_np, dphi)
    for got, want in ((phi, phi_np), (dx, dx_np)):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    if shift is None:
        assert s is None and s_np is None
    else:
        assert s.shape == s_np.shape and s.dtype == np.float32
        np.testing.assert_allclose(s, s_np, rtol=1e-5, atol=1e-5)


def test_float32_feature_map_kernels_against_float64():
    fm = _performer(d=64, m=64, seed=3)
    x = (0.5 * np.random.default_rng(7).standard_normal((2, 4096, 64)))
    dphi = np.random.default_rng(8).standard_normal((2, 4096, 64))
    for shift in ("row", "bound"):
        phi32, _, c32 = fm.stable_forward(x.astype(np.float32), shift)
        phi64, _, c64 = fm.stable_forward(x, shift)
        np.testing.assert_allclose(phi32, phi64, rtol=2e-5, atol=1e-6 * phi64.max())
        dx32 = fm.backward(c32, dphi.astype(np.float32))
        dx64 = fm.backward(c64, dphi)
        np.testing.assert_allclose(dx32, dx64, rtol=1e-4, atol=1e-5 * np.abs(dx64).max())


# ------------------------------------------------------------------ elu + 1
@pytest.mark.parametrize("impl", ["jit", "py_func"])
@pytest.mark.parametrize("rows", [33, "2 chunks + 5"])
def test_elu_kernels_match_references(impl, rows):
    from efficient_attention.kernels import elu
    fwd = elu.elu_plus_one if impl == "jit" else elu.elu_plus_one.py_func
    bwd = elu.elu_backward if impl == "jit" else elu.elu_backward.py_func
    rows = rows if isinstance(rows, int) else 2 * elu.CHUNK + 5          # ragged last chunk
    x = (3 * np.random.default_rng(9).standard_normal((rows, 17))).astype(np.float32)
    x[0, :5] = [0.0, -0.0, np.inf, -np.inf, np.nan]
    x[1, :2] = [-100.0, 1e-30]
    phi = np.empty_like(x)
    fwd(x, phi)
    want = elu.elu_plus_one_reference(x)
    # NaN in the same places; below e^-87 the kernel flushes to 0 where numpy gives a subnormal
    np.testing.assert_allclose(phi, want, rtol=2 * EPS32, atol=np.finfo(np.float32).tiny)
    assert phi[0, 0] == 1 and phi[0, 1] == 1 and phi[0, 2] == np.inf and phi[0, 3] == 0
    assert np.isnan(phi[0, 4]) and phi[1, 0] == 0
    dphi = np.random.default_rng(10).standard_normal(x.shape).astype(np.float32)
    dx = np.empty_like(x)
    bwd(phi, dphi, dx)
    np.testing.assert_array_equal(dx, elu.elu_backward_reference(phi, dphi))


def test_float32_elu_map_kernels_match_the_numpy_lines(monkeypatch):
    from efficient_attention.feature_maps import EluFeatureMap
    fm = EluFeatureMap()
    x = (2 * np.random.default_rng(11).standard_normal((2, 3, 50, 8))).astype(np.float32)
    dphi = np.random.default_rng(12).standard_normal(x.shape).astype(np.float32)
    phi, cache = fm.forward(x)
    dx = fm.backward(cache, dphi)
    monkeypatch.setattr(ea.config, "FEATURE_ROW_KERNELS", False)
    phi_np, cache_np = fm.forward(x)
    dx_np = fm.backward(cache_np, dphi)
    assert phi.dtype == dx.dtype == np.float32
    np.testing.assert_allclose(phi, phi_np, rtol=2 * EPS32)
    np.testing.assert_allclose(dx, dx_np, rtol=2 * EPS32)
    np.testing.assert_allclose(phi, fm.forward(x.astype(np.float64))[0], rtol=2e-7)


@pytest.mark.parametrize("fmap", ["elu", "performer"])
def test_consuming_backward_equals_backward_and_only_overwrites_when_allowed(fmap):
    """LinearAttention hands its dφ temporaries to ``backward_consuming``, which may write dx
    over them; ``backward`` never touches its argument."""
    from efficient_attention.feature_maps import EluFeatureMap
    fm = EluFeatureMap() if fmap == "elu" else _performer(d=8, m=8)
    x = np.random.default_rng(13).standard_normal((2, 2100, 8)).astype(np.float32)
    dphi = np.random.default_rng(14).standard_normal(x.shape).astype(np.float32)
    phi, cache = fm.forward(x)
    keep = dphi.copy()
    dx = fm.backward(cache, dphi)
    np.testing.assert_array_equal(dphi, keep)
    dx2 = fm.backward_consuming(cache, dphi)
    np.testing.assert_array_equal(dx2, dx)
    assert np.shares_memory(dx2, dphi)
