"""Feature maps of chapter 4: values, gradients, the FAVOR+ draw, unbiasedness, bad input."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention.feature_maps import (EluFeatureMap, PerformerFeatureMap,
                                              RandomFourierFeatureMap)
from efficient_attention.testing import float_arrays


def _gradcheck_map(fm, x):
    return ea.gradcheck(fm.forward, (x,), lambda cache, dphi: (fm.backward(cache, dphi),))


def _maps(d=5, m=7, seed=0):
    return [EluFeatureMap(),
            PerformerFeatureMap(PerformerFeatureMap.draw(d, m, seed)),
            PerformerFeatureMap(PerformerFeatureMap.draw(d, m, seed), kind="hyperbolic"),
            RandomFourierFeatureMap(RandomFourierFeatureMap.draw(d, m, seed))]


# ------------------------------------------------------------------ values
def test_elu_values():
    x = np.array([[-2.0, -0.5, 0.0, 0.3, 4.0]])
    phi, _ = EluFeatureMap().forward(x)
    np.testing.assert_allclose(phi, [[np.exp(-2), np.exp(-0.5), 1.0, 1.3, 5.0]], rtol=1e-15)
    assert EluFeatureMap().n_features(5) == 5
    big = np.array([[1e4, -1e4]], np.float32)                 # no overflow warning from the unused branch
    np.testing.assert_array_equal(EluFeatureMap()(big), np.array([[1e4 + 1, 0.0]], np.float32))


def test_performer_values_match_formula():
    d, m = 6, 9
    omega = PerformerFeatureMap.draw(d, m, 3)
    x = np.random.default_rng(0).standard_normal((2, 4, d))
    xs = x * d ** -0.25
    expected = np.exp(xs @ omega.T - 0.5 * (xs ** 2).sum(-1, keepdims=True)) / np.sqrt(m)
    np.testing.assert_allclose(PerformerFeatureMap(omega)(x), expected, rtol=1e-13)
    hyp = PerformerFeatureMap(omega, kind="hyperbolic")(x)
    e2 = np.concatenate([np.exp(xs @ omega.T), np.exp(-xs @ omega.T)], -1) \
        * np.exp(-0.5 * (xs ** 2).sum(-1, keepdims=True)) / np.sqrt(2 * m)
    np.testing.assert_allclose(hyp, e2, rtol=1e-13)
    assert PerformerFeatureMap(omega).n_features(d) == m
    assert PerformerFeatureMap(omega, kind="hyperbolic").n_features(d) == 2 * m


def test_rff_values_match_formula():
    d, m = 4, 6
    omega = RandomFourierFeatureMap.draw(d, m, 1, sigma=0.7)
    x = np.random.default_rng(1).standard_normal((3, d))
    xh = x / np.linalg.norm(x, axis=-1, keepdims=True)
    u = xh @ omega.T
    np.testing.assert_allclose(RandomFourierFeatureMap(omega)(x),
                               np.concatenate([np.sin(u), np.cos(u)], -1) / np.sqrt(m), rtol=1e-13)
    zero = RandomFourierFeatureMap(omega)(np.zeros((1, d)))    # x̂ = 0: sin 0, cos 0
    np.testing.assert_allclose(zero, np.r_[np.zeros(m), np.ones(m) / np.sqrt(m)][None], rtol=1e-15)


@pytest.mark.parametrize("shift", ["row", "shared", "bound"])
@pytest.mark.parametrize("kind", ["positive", "hyperbolic"])
def test_performer_stable_features_times_scale_are_exact(shift, kind):
    d = 5
    fm = PerformerFeatureMap(PerformerFeatureMap.draw(d, 8, 0), kind=kind)
    x = 2 * np.random.default_rng(2).standard_normal((2, 3, 6, d))
    phi_hat, s, _ = fm.stable_forward(x, shift)
    scale = np.exp(s[..., None] if shift == "row" else s[..., None, None])
    np.testing.assert_allclose(phi_hat * scale, fm(x), rtol=1e-12)
    if shift in ("row", "bound"):
        assert phi_hat.max() <= fm._norm(x) * (1 + 1e-12)    # stabilised features never exceed 1/√m
    if shift == "row":
        np.testing.assert_allclose(phi_hat.max(-1), fm._norm(x))


def test_performer_bound_holds_for_any_input():
    """max_r ‖ω_r‖²/2 bounds ωᵀx′ − ‖x′‖²/2 for every x (what makes it a causal stabiliser)."""
    d = 3
    fm = PerformerFeatureMap(PerformerFeatureMap.draw(d, 5, 4))
    x = np.concatenate([10 * np.random.default_rng(5).standard_normal((200, d)),
                        fm.omega * d ** 0.25])                # x′ = ω_r: the maximiser
    h = fm._exponent(x)[0]
    assert h.max() <= fm._bound(x.dtype) + 1e-12
    assert np.isclose(h.max(), fm._bound(x.dtype))


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("index", range(4))
def test_feature_map_gradcheck_with_batch_and_heads(index):
    fm = _maps()[index]
    x = np.random.default_rng(index).standard_normal((2, 3, 4, 5))
    assert _gradcheck_map(fm, x) < 1e-7


@pytest.mark.parametrize("shift", ["row", "shared", "bound"])
def test_performer_stable_backward_is_derivative_with_scale_held(shift):
    fm = PerformerFeatureMap(PerformerFeatureMap.draw(4, 6, 1))
    x = np.random.default_rng(3).standard_normal((2, 5, 4))
    _, s, _ = fm.stable_forward(x, shift)
    s_fixed = s[..., None] if shift == "row" else s[..., None, None]

    def fwd(x_):
        phi, cache = fm.forward(x_)
        return phi * np.exp(-s_fixed), cache

    def bwd(cache, dphi_hat):
        _, _, c = fm.stable_forward(cache.x, shift)
        return (fm.backward(c, dphi_hat),)

    assert ea.gradcheck(fwd, (x,), bwd) < 1e-7


@settings(max_examples=20)
@given(st.data())
def test_feature_maps_float32_close_to_float64(data):
    d = data.draw(st.integers(1, 6))
    n = data.draw(st.integers(1, 5))
    # rounded to 1/64: exactly representable in float32 (x/‖x‖ jumps at x = 0, so no
    # values that round to zero in float32 only)
    x = np.round(64 * data.draw(float_arrays((2, n, d), np.float64))) / 64
    for fm in _maps(d=d, m=data.draw(st.integers(1, 8))):
        phi64 = fm(x)
        phi32 = fm(x.astype(np.float32))
        assert phi32.dtype == np.float32 and phi64.dtype == np.float64
        np.testing.assert_allclose(phi32, phi64, rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------ the draw
def test_draw_orthogonal_blocks_and_chi_norms():
    d, m = 8, 20
    omega = PerformerFeatureMap.draw(d, m, seed=7)
    assert omega.shape == (m, d) and omega.dtype == np.float64
    np.testing.assert_array_equal(omega, PerformerFeatureMap.draw(d, m, seed=7))   # seeded
    assert not np.allclose(omega, PerformerFeatureMap.draw(d, m, seed=8))
    for lo in range(0, m, d):
        block = omega[lo:lo + d]
        unit = block / np.linalg.norm(block, axis=1, keepdims=True)
        np.testing.assert_allclose(unit @ unit.T, np.eye(len(block)), atol=1e-12)
    # the norms are chi(d): E‖ω‖² = d
    norms = np.linalg.norm(PerformerFeatureMap.draw(d, 4000, seed=1), axis=1)
    assert abs((norms ** 2).mean() - d) < 0.3
    iid = PerformerFeatureMap.draw(d, m, seed=7, orthogonal=False)
    unit = iid[:d] / np.linalg.norm(iid[:d], axis=1, keepdims=True)
    assert np.abs(unit @ unit.T - np.eye(d)).max() > 0.05      # iid rows are not orthogonal


@pytest.mark.parametrize("orthogonal", [True, False])
def test_performer_kernel_estimate_is_unbiased(orthogonal):
    """Average of φ(q)ᵀφ(k) over independent draws approaches exp(qᵀk/√d)."""
    d, m, draws = 4, 8, 3000
    rng = np.random.default_rng(11)
    q, k = 0.8 * rng.standard_normal((2, d))
    exact = np.exp(q @ k / np.sqrt(d))
    est = np.empty(draws)
    for seed in range(draws):
        fm = PerformerFeatureMap(PerformerFeatureMap.draw(d, m, seed, orthogonal=orthogonal))
        est[seed] = fm(q[None])[0] @ fm(k[None])[0]
    se = est.std() / np.sqrt(draws)
    assert abs(est.mean() - exact) < 4 * se
    assert abs(est.mean() / exact - 1) < 0.02
    # a biased map (the -‖x'‖²/2 term dropped) is caught by the same test
    biased = est * np.exp(0.5 * (q @ q + k @ k) / np.sqrt(d))
    assert abs(biased.mean() - exact) > 10 * se


def test_rff_kernel_estimate_is_unbiased():
    d, m, draws, sigma = 4, 8, 3000, 0.9
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((2, d))
    xh, yh = x / np.linalg.norm(x), y / np.linalg.norm(y)
    exact = np.exp(-sigma ** 2 * np.sum((xh - yh) ** 2) / 2)
    est = np.array([RandomFourierFeatureMap(RandomFourierFeatureMap.draw(d, m, s, sigma))(x[None])[0]
                    @ RandomFourierFeatureMap(RandomFourierFeatureMap.draw(d, m, s, sigma))(y[None])[0]
                    for s in range(draws)])
    assert abs(est.mean() - exact) < 4 * est.std() / np.sqrt(draws)


# ------------------------------------------------------------------ bad input
def test_bad_omega_and_m_zero():
    with pytest.raises(ValueError, match="omega.*m >= 1"):
        PerformerFeatureMap(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="omega.*m >= 1"):
        RandomFourierFeatureMap(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="m must be >= 1, got 0"):
        PerformerFeatureMap.draw(4, 0, 0)
    with pytest.raises(ValueError, match="m must be >= 1"):
        RandomFourierFeatureMap.draw(4, 0, 0)
    with pytest.raises(ValueError, match=r"omega must have shape \(m, D\)"):
        PerformerFeatureMap(np.zeros(4))
    with pytest.raises(ValueError, match="omega must contain only finite"):
        PerformerFeatureMap(np.full((2, 2), np.nan))
    with pytest.raises(TypeError, match="omega must be a float32 or float64 array, got dtype int64"):
        PerformerFeatureMap(np.ones((2, 2), np.int64))
    with pytest.raises(ValueError, match="kind must be one of"):
        PerformerFeatureMap(np.ones((2, 2)), kind="trig")
    with pytest.raises(TypeError, match="orthogonal must be True or False"):
        PerformerFeatureMap.draw(2, 2, 0, orthogonal=1)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        RandomFourierFeatureMap.draw(2, 2, 0, sigma=0.0)


@pytest.mark.parametrize("index", [1, 2, 3])
def test_width_mismatch_names_x_and_omega(index):
    fm = _maps(d=5)[index]
    with pytest.raises(ValueError, match=r"x must have feature width D = 5 \(omega has shape"):
        fm.forward(np.ones((3, 4)))


@pytest.mark.parametrize("index", range(4))
def test_bad_x(index):
    fm = _maps(d=5)[index]
    with pytest.raises(TypeError, match="x must be a float32 or float64 array, got dtype int64"):
        fm.forward(np.ones((3, 5), np.int64))
    bad = np.ones((3, 5))
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="x must contain only finite values"):
        fm.forward(bad, check_finite=True)


@pytest.mark.parametrize("kind", ["positive", "hyperbolic"])
@pytest.mark.parametrize("shift", [None, "row", "shared", "bound"])
def test_performer_row_blocks_do_not_change_the_result(kind, shift, monkeypatch):
    """The Performer map works on blocks of ROW_BLOCK rows; blocks that split sequences and
    batch entries give the same features, log-scales and gradients as one block."""
    fm = PerformerFeatureMap(PerformerFeatureMap.draw(4, 6, 2), kind=kind)
    rng = np.random.default_rng(7)
    x, dphi = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 5, fm.n_features(4)))
    phi, s, cache = fm.stable_forward(x, shift)
    dx = fm.backward(cache, dphi)
    monkeypatch.setattr(ea.config, "FEATURE_ROW_BLOCK", 3)
    phi3, s3, cache3 = fm.stable_forward(x, shift)
    np.testing.assert_allclose(phi3, phi, rtol=1e-14, atol=0)
    if s is None:
        assert s3 is None
    else:
        assert s3.shape == s.shape
        np.testing.assert_array_equal(s3, s)
    np.testing.assert_allclose(fm.backward(cache3, dphi), dx, rtol=1e-13, atol=1e-15)
