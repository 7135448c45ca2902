"""Routing attention: cosine routing, exact clusters, balanced top-k clusters, k-means update."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_attention import gradcheck
from efficient_attention.dense import DenseAttention
from efficient_attention.routing import RoutingAttention, kmeans_update
from efficient_attention.testing import assert_attention_close, dense_oracle, float_arrays


def _data(batch, n, m, d=5, dv=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(batch + (n, d)), rng.standard_normal(batch + (m, d)),
            rng.standard_normal(batch + (m, dv)))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _cluster_mask(core, q, k):
    """Exact mode mask from the definition: same nearest centroid by cosine."""
    mu = _unit(core.centroids)
    cq = np.argmax(_unit(q) @ mu.T, -1)
    ck = np.argmax(_unit(k) @ mu.T, -1)
    mask = cq[:, None] == ck[None, :]
    if core.causal:
        mask &= np.arange(k.shape[0])[None, :] <= np.arange(q.shape[0])[:, None]
    return mask


def _topk_mask(core, q, k, w):
    mu = _unit(core.centroids)
    mask = np.zeros((q.shape[0], k.shape[0]), bool)
    for c in range(mu.shape[0]):
        qi = np.argsort(-(_unit(q) @ mu[c]), kind="stable")[:w]
        kj = np.argsort(-(_unit(k) @ mu[c]), kind="stable")[:w]
        mask[np.ix_(qi, kj)] = True
    if core.causal:
        mask &= np.arange(k.shape[0])[None, :] <= np.arange(q.shape[0])[:, None]
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n, m", [(30, 30), (17, 25)])
def test_exact_mode_equals_dense_with_cluster_mask(causal, n, m):
    q, k, v = _data((2,), n, m, seed=n)
    core = RoutingAttention.init(4, 5, seed=1, causal=causal)
    out = core(q, k, v)
    for b in range(2):
        mask = _cluster_mask(core, q[b], k[b])
        ref = DenseAttention()(q[b], k[b], v[b], mask=mask)
        assert_attention_close(out[b], ref, np.float64)
        np.testing.assert_array_equal(core.pattern(q[b], k[b]).toarray(), mask)
        np.testing.assert_array_equal(core.assign(q[b]), np.argmax(_unit(q[b]) @ _unit(core.centroids).T, -1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("w", [1, 6, 12, 100])
def test_topk_mode_equals_dense_with_union_mask(causal, w):
    q, k, v = _data((2,), 20, 20, seed=w)
    core = RoutingAttention.init(3, 5, seed=2, causal=causal, top_k=w)
    out = core(q, k, v)
    for b in range(2):
        mask = _topk_mask(core, q[b], k[b], min(w, 20))
        np.testing.assert_array_equal(core.pattern(q[b], k[b]).toarray(), mask)
        ref = DenseAttention()(q[b], k[b], v[b], mask=mask)
        assert_attention_close(out[b], ref, np.float64)
    if w == 1 and not causal:
        routed = _topk_mask(core, q[0], k[0], 1).any(axis=1)
        assert np.all(out[0, ~routed] == 0)                     # unrouted queries output 0


def test_one_cluster_all_tokens_is_dense():
    q, k, v = _data((2,), 16, 16, seed=3)
    for top_k in (None, 16):
        core = RoutingAttention(np.ones((1, 5)), top_k=top_k, causal=True)
        assert_attention_close(core(q, k, v), DenseAttention(causal=True)(q, k, v), np.float64)


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(top_k, causal):
    q, k, v = _data((2,), 14, 14, seed=4)
    core = RoutingAttention.init(3, 5, seed=5, causal=causal, top_k=top_k)
    assert gradcheck(core, (q, k, v)) < 1e-6


@pytest.mark.parametrize("top_k", [None, 5])
def test_gradients_equal_masked_dense_gradients(top_k):
    q, k, v = _data((1,), 14, 14, seed=6)
    core = RoutingAttention.init(3, 5, seed=7, top_k=top_k)
    out, cache = core.forward(q, k, v)
    g = np.random.default_rng(0).standard_normal(out.shape)
    got = core.backward(cache, g)
    dense = DenseAttention()
    ref_out, ref_cache = dense.forward(q, k, v, mask=core.pattern(q[0], k[0]).toarray())
    ref = dense.backward(ref_cache, g)
    for a, b in zip(got[:3], ref[:3]):
        assert_attention_close(a, b, np.float64)


def test_float32_and_batch_axes():
    q, k, v = _data((2, 3), 16, 16, seed=8)
    core = RoutingAttention.init(4, 5, seed=9, top_k=6)
    out = core(q, k, v)
    assert out.shape == (2, 3, 16, 3)
    np.testing.assert_array_equal(out[1, 2], core(q[1, 2], k[1, 2], v[1, 2]))
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    out32 = core(q32, k32, v32)
    assert out32.dtype == np.float32
    # the lowp rule: the output is dense attention over the pattern (the same clusters in both precisions),
    # DenseAttention over it in float32 is an independent low-precision evaluation
    pattern = np.zeros(q.shape[:-1] + (k.shape[-2],), bool)
    for b in np.ndindex(*q.shape[:-2]):
        pattern[b] = core.pattern(q32[b], k32[b]).toarray()
        np.testing.assert_array_equal(pattern[b], core.pattern(q32[b].astype(np.float64),
                                                               k32[b].astype(np.float64)).toarray())
    oracle = dense_oracle(q32, k32, v32, mask=pattern, scale=core.scale)
    assert_attention_close(out32, core(*(a.astype(np.float64) for a in (q32, k32, v32))), np.float32,
                           lowp=oracle.lowp[0], magnitude=oracle.magnitude[0])


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_property_output_equals_pattern_oracle(data):
    n, m, d = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 4))
    c = data.draw(st.integers(1, 4))
    core = RoutingAttention(data.draw(float_arrays((c, d))), causal=data.draw(st.booleans()),
                            top_k=data.draw(st.sampled_from([None, 1, 3, 20])))
    q, k = data.draw(float_arrays((n, d))), data.draw(float_arrays((m, d)))
    v = data.draw(float_arrays((m, 2)))
    out = core(q, k, v)
    ref = DenseAttention()(q, k, v, mask=core.pattern(q, k).toarray())
    assert_attention_close(out, ref, np.float64)


# ------------------------------------------------------------------ k-means


def test_kmeans_update_moves_centroids_toward_members():
    rng = np.random.default_rng(10)
    centers = _unit(rng.standard_normal((3, 6)))
    x = np.concatenate([c + 0.3 * rng.standard_normal((50, 6)) for c in centers])[None]
    mu = _unit(centers + 0.8 * rng.standard_normal((3, 6)))
    before = mu.copy()
    new = kmeans_update(mu, x, decay=0.9)
    np.testing.assert_array_equal(mu, before)                      # input untouched
    xhat = _unit(x[0])
    assign = np.argmax(xhat @ mu.T, 1)
    for c in range(3):
        members = xhat[assign == c]
        assert len(members)
        direction = _unit(members.mean(0))
        assert _unit(new[c]) @ direction > _unit(mu[c]) @ direction   # closer to its members
    np.testing.assert_allclose(kmeans_update(mu, x, decay=0.0)[0], _unit((xhat[assign == 0]).sum(0)))
    # repeated updates converge on the true centers
    for _ in range(20):
        mu = kmeans_update(mu, x, decay=0.5)
    assert np.all(np.sum(_unit(mu) * centers, 1) > 0.99)


def test_kmeans_update_empty_cluster_unchanged_and_method():
    mu = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    x = np.array([[[2.0, 0.1], [0.1, 3.0]]])
    new = RoutingAttention.kmeans_update(mu, x, 0.5)
    np.testing.assert_array_equal(new[2], mu[2])
    core = RoutingAttention(mu)
    core.update_centroids(x, 0.5)
    np.testing.assert_array_equal(core.centroids, new)
    assert core.params == {}


def test_bad_inputs():
    with pytest.raises(ValueError, match="centroids must have shape"):
        RoutingAttention(np.ones(3))
    with pytest.raises(TypeError, match="centroids must be a float32 or float64"):
        RoutingAttention(np.ones((2, 3), int))
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        RoutingAttention(np.ones((2, 3)), top_k=0)
    q, k, v = _data((), 6, 6, d=4)
    with pytest.raises(ValueError, match="centroids must have shape .* D = 4"):
        RoutingAttention(np.ones((2, 3)))(q, k, v)
    with pytest.raises(ValueError, match="decay must be in"):
        kmeans_update(np.ones((2, 4)), q, 1.5)
    with pytest.raises(ValueError, match="x must have shape"):
        kmeans_update(np.ones((2, 3)), q, 0.5)
