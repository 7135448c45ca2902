"""ops: attend / attend_backward on block pairs and the log-sum-exp merge, against DenseAttention."""
import warnings

import numpy as np
import pytest

import efficient_attention as ea
from efficient_attention.ops import attend, attend_backward, merge


def _qkv(n=7, m=9, d=4, dv=3, lead=(2,), dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(lead + (n, d)).astype(dtype), rng.standard_normal(lead + (m, d)).astype(dtype),
            rng.standard_normal(lead + (m, dv)).astype(dtype))


def _mask(n, m, seed=1, empty_rows=(2,)):
    mask = np.random.default_rng(seed).random((n, m)) < 0.5
    mask[list(empty_rows)] = False                             # fully masked rows on purpose
    return mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_attend_and_backward_equal_dense_on_one_block(dtype, masked):
    q, k, v = _qkv(dtype=dtype)
    mask = _mask(7, 9) if masked else None
    out, lse = attend(q, k, v, mask=mask, scale=0.7)
    ref_out, cache = ea.DenseAttention(scale=0.7).forward(q, k, v, mask=mask)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert out.dtype == dtype and lse.dtype == dtype
    np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(lse, cache.lse, rtol=rtol, atol=rtol)
    dout = np.random.default_rng(5).standard_normal(out.shape).astype(dtype)
    grads = attend_backward(q, k, v, out, lse, dout, mask=mask, scale=0.7)
    ref = ea.DenseAttention(scale=0.7).backward(cache, dout)
    for g, r in zip(grads, ref[:3]):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, r, rtol=rtol, atol=rtol)
    if masked:                                                  # the fully masked row: lse -inf, zeros
        assert np.all(np.isneginf(lse[:, 2])) and np.all(out[:, 2] == 0) and np.all(grads[0][:, 2] == 0)


def test_attend_default_scale_and_sparse_mask():
    import scipy.sparse as sp
    q, k, v = _qkv()
    mask = _mask(7, 9)
    out, _ = attend(q, k, v, mask=sp.csr_array(mask))
    np.testing.assert_allclose(out, ea.DenseAttention()(q, k, v, mask=mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("splits", [[3], [1, 4, 6], [2, 5, 8]])
@pytest.mark.parametrize("causal", [False, True])
def test_key_blocks_merged_by_lse_equal_dense_forward_and_backward(splits, causal):
    """Split the keys into blocks, attend per block, merge: the dense output and lse; the
    per-block backwards from the merged lse sum to the dense gradients."""
    n = m = 9
    q, k, v = _qkv(n, m, lead=(2, 3))
    full_mask = ea.causal_mask(n, m) if causal else _mask(n, m, empty_rows=(4,))
    bounds = list(zip([0] + splits, splits + [m]))
    parts = [attend(q, k[..., a:b, :], v[..., a:b, :], mask=full_mask[:, a:b]) for a, b in bounds]
    out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
    ref_out, cache = ea.DenseAttention().forward(q, k, v, mask=full_mask)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, cache.lse, rtol=1e-12, atol=1e-12)
    dout = np.random.default_rng(3).standard_normal(out.shape)
    ref = ea.DenseAttention().backward(cache, dout)
    delta = np.einsum("...nc,...nc->...n", dout, out)
    dq = np.zeros_like(q)
    for (a, b), use_delta in zip(bounds, [True, False] * len(bounds)):
        g = attend_backward(q, k[..., a:b, :], v[..., a:b, :], None if use_delta else out, lse, dout,
                            mask=full_mask[:, a:b], delta=delta if use_delta else None)
        dq += g[0]
        np.testing.assert_allclose(g[1], ref.dk[..., a:b, :], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g[2], ref.dv[..., a:b, :], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dq, ref.dq, rtol=1e-10, atol=1e-12)


def test_attend_gradcheck():
    q, k, v = _qkv(5, 6, lead=(1,))
    mask = _mask(5, 6, empty_rows=(1,))

    def forward(q, k, v):
        out, lse = attend(q, k, v, mask=mask, scale=0.9)
        return out, (q, k, v, out, lse)

    def backward(cache, dout):
        q, k, v, out, lse = cache
        return attend_backward(q, k, v, out, lse, dout, mask=mask, scale=0.9)
    assert ea.gradcheck(forward, (q, k, v), backward) < 1e-7


def test_merge_rules_fully_masked_rows_without_nan_or_warning():
    outs = [np.array([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]), np.array([[5.0, 6.0], [0.0, 0.0], [0.0, 0.0]])]
    lses = [np.array([0.0, 1.0, -np.inf]), np.array([np.log(3.0), -np.inf, -np.inf])]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = merge(outs, lses)
        _, lse_q = attend(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)), mask=np.zeros((1, 1), bool))
    np.testing.assert_allclose(out[0], 0.25 * outs[0][0] + 0.75 * outs[1][0])      # weights 1 : 3
    np.testing.assert_allclose(lse[0], np.log(4.0))
    np.testing.assert_array_equal(out[1], outs[0][1])                               # the other block is empty
    assert lse[1] == 1.0 and np.isneginf(lse[2]) and np.all(out[2] == 0) and np.isneginf(lse_q[0])
    merged_in_two_steps = merge([merge(outs[:1], lses[:1])[0], outs[1]], [merge(outs[:1], lses[:1])[1], lses[1]])
    np.testing.assert_allclose(merged_in_two_steps[0], out)


def test_errors_name_the_argument():
    q, k, v = _qkv()
    out, lse = attend(q, k, v)
    with pytest.raises(ValueError, match="mask must broadcast"):
        attend(q, k, v, mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="q must contain only finite"):
        attend(np.full_like(q, np.nan), k, v)
    assert np.isnan(attend(np.full_like(q, np.nan), k, v, check_finite=False)[0]).all()
    with pytest.raises(ValueError, match="lse must have shape"):
        attend_backward(q, k, v, out, lse[..., :3], out)
    with pytest.raises(ValueError, match="lse must be finite or -inf"):
        attend_backward(q, k, v, out, np.full_like(lse, np.nan), out)
    with pytest.raises(ValueError, match="out must be given"):
        attend_backward(q, k, v, None, lse, out)
    with pytest.raises(ValueError, match="delta must have shape"):
        attend_backward(q, k, v, None, lse, out, delta=np.zeros(3))
    with pytest.raises(ValueError, match="dout must have the shape"):
        attend_backward(q, k, v, out, lse, out[..., :2])
    with pytest.raises(ValueError, match="outs and lses must be"):
        merge([out], [])
    with pytest.raises(ValueError, match=r"outs\[1\] must have shape"):
        merge([out, out[:, :3]], [lse, lse[:, :3]])
    with pytest.raises(TypeError, match="q must be a float32 or float64"):
        attend(q.astype(int), k, v)
