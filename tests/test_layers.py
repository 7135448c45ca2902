"""MultiHeadAttention: textbook formula, per-head cores, gradients, head sets, bad input."""
import numpy as np
import pytest
from scipy.special import softmax as sp_softmax

import efficient_attention as ea
from efficient_attention import patterns
from efficient_attention.core import AttentionCore, Grads
from efficient_attention.dense import DenseAttention
from efficient_attention.layers import MultiHeadAttention, bigbird_heads, longformer_heads
from efficient_attention.local import LocalAttention, StridedAttention
from efficient_attention.sparse import GlobalAttention, SparseAttention
from efficient_attention.testing import assert_attention_close

RNG = np.random.default_rng(1234)


def _weights(d, h, dk, dv, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((d, h, dk)), rng.standard_normal((d, h, dk)),
            rng.standard_normal((d, h, dv)), rng.standard_normal((h, dv, d)))


def _textbook(x, w_q, w_k, w_v, w_o, masks=None, scales=None):
    """Vaswani et al.: concat_h softmax(Q_h K_hᵀ / sqrt(dk) [+ mask]) V_h, then · W_O (scipy softmax);
    a query row with no allowed key outputs zeros."""
    d, h, dk = w_q.shape
    heads = []
    for i in range(h):
        q, k, v = x @ w_q[:, i], x @ w_k[:, i], x @ w_v[:, i]
        s = (dk ** -0.5 if scales is None or scales[i] is None else scales[i]) * q @ np.swapaxes(k, -1, -2)
        some = np.ones(s.shape[:-1] + (1,), bool)
        if masks is not None and masks[i] is not None:
            some = np.broadcast_to(masks[i], s.shape).any(axis=-1, keepdims=True)
            s = np.where(masks[i] & some, s, -np.inf)
            s = np.where(some, s, 0.0)                     # fully masked rows: zeroed below
        heads.append(np.where(some, sp_softmax(s, axis=-1), 0.0) @ v)
    return np.concatenate(heads, axis=-1) @ w_o.reshape(-1, d)


class KeyBiasAttention(AttentionCore):
    """A test core with a learnable parameter: softmax(s·QKᵀ + key_bias)·V, key_bias (M,)."""

    def __init__(self, key_bias):
        self.key_bias = np.asarray(key_bias, dtype=np.float64)

    @property
    def params(self):
        return {"key_bias": self.key_bias}

    def forward(self, q, k, v, *, check_finite=True):       # the layer has checked x: False
        s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]) + self.key_bias.astype(q.dtype)
        p = sp_softmax(s, axis=-1).astype(q.dtype)
        return p @ v, (q, k, v, p)

    def backward(self, cache, dout, *, check_finite=True):
        q, k, v, p = cache
        dv = np.swapaxes(p, -1, -2) @ dout
        dp = dout @ np.swapaxes(v, -1, -2)
        ds = p * (dp - (p * dp).sum(-1, keepdims=True))
        c = 1 / np.sqrt(q.shape[-1])
        dbias = ds.reshape(-1, ds.shape[-1]).sum(0)
        return Grads(c * ds @ k, c * np.swapaxes(ds, -1, -2) @ q, dv, {"key_bias": dbias})


# -- forward against the textbook formula ----------------------------------------------

@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("h,dk,dv", [(1, 4, 4), (2, 3, 5), (4, 2, 2)])
def test_dense_heads_equal_textbook(batch, h, dk, dv):
    n, d = 7, 6
    w = _weights(d, h, dk, dv)
    x = RNG.standard_normal(batch + (n, d))
    layer = MultiHeadAttention(DenseAttention(), *w)
    assert layer.batched
    y = layer(x)
    assert y.shape == x.shape
    assert_attention_close(y, _textbook(x, *w), np.float64)


def test_mixed_dense_heads_loop_equals_textbook_with_masks():
    n, d, h = 9, 8, 3
    w = _weights(d, h, 4, 4, seed=1)
    cores = [DenseAttention(), DenseAttention(causal=True), DenseAttention(scale=0.3)]
    layer = MultiHeadAttention(cores, *w)
    assert not layer.batched                    # configurations differ: one call per head
    x = RNG.standard_normal((2, n, d))
    causal = np.tril(np.ones((n, n), bool))
    ref = _textbook(x, *w, masks=[None, causal, None], scales=[None, None, 0.3])
    assert_attention_close(layer(x), ref, np.float64)


def test_batched_and_per_head_paths_agree_values_and_grads():
    n, d, h = 8, 8, 4
    w = _weights(d, h, 2, 3, seed=2)
    x = RNG.standard_normal((3, n, d))
    dy = RNG.standard_normal((3, n, d))
    fast = MultiHeadAttention([DenseAttention(causal=True) for _ in range(h)], *w)
    slow = MultiHeadAttention([DenseAttention(causal=True) for _ in range(h)], *w)
    slow.batched = False
    assert fast.batched
    (y1, c1), (y2, c2) = fast.forward(x), slow.forward(x)
    assert_attention_close(y1, y2, np.float64)
    g1, g2 = fast.backward(c1, dy), slow.backward(c2, dy)
    assert_attention_close(g1.dx, g2.dx, np.float64, kind="grad")
    for name in fast.params:
        assert_attention_close(g1.params[name], g2.params[name], np.float64, kind="grad")


# -- gradients ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [(), (2,), (2, 2)])
def test_gradcheck_dense_heads(batch):
    layer = MultiHeadAttention(DenseAttention(), *_weights(6, 3, 2, 4, seed=3))
    x = RNG.standard_normal(batch + (5, 6))
    errs = ea.gradcheck(layer, (x,), full=True)
    assert set(errs) == {"x", "param.w_q", "param.w_k", "param.w_v", "param.w_o"}
    assert max(errs.values()) < 1e-6


def test_gradcheck_mixed_heads_loop():
    cores = [DenseAttention(causal=True), DenseAttention(), DenseAttention(scale=0.5)]
    layer = MultiHeadAttention(cores, *_weights(6, 3, 3, 2, seed=4))
    assert ea.gradcheck(layer, (RNG.standard_normal((2, 6, 6)),)) < 1e-6


def test_core_params_are_namespaced_and_checked():
    n, d, h = 6, 4, 3
    cores = [KeyBiasAttention(RNG.standard_normal(n)), DenseAttention(), KeyBiasAttention(RNG.standard_normal(n))]
    layer = MultiHeadAttention(cores, *_weights(d, h, 2, 2, seed=5))
    assert set(layer.params) == {"w_q", "w_k", "w_v", "w_o", "head0.key_bias", "head2.key_bias"}
    assert layer.params["head2.key_bias"] is cores[2].key_bias          # live arrays
    errs = ea.gradcheck(layer, (RNG.standard_normal((2, n, d)),), full=True)
    assert {"param.head0.key_bias", "param.head2.key_bias"} <= set(errs)
    assert max(errs.values()) < 1e-6


def test_shared_core_object_params_listed_once_with_summed_gradient():
    n, d, h = 5, 4, 3
    shared = KeyBiasAttention(RNG.standard_normal(n))
    w = _weights(d, h, 2, 2, seed=6)
    layer = MultiHeadAttention([shared] * h, *w)
    assert layer.batched
    assert set(layer.params) == {"w_q", "w_k", "w_v", "w_o", "head0.key_bias"}
    assert ea.gradcheck(layer, (RNG.standard_normal((2, n, d)),)) < 1e-6
    # the loop path sums the shared core's gradient over its heads the same way
    loop = MultiHeadAttention([shared] * h, *w)
    loop.batched = False
    x, dy = RNG.standard_normal((2, n, d)), RNG.standard_normal((2, n, d))
    g1 = layer.backward(layer.forward(x)[1], dy)
    g2 = loop.backward(loop.forward(x)[1], dy)
    assert_attention_close(g1.params["head0.key_bias"], g2.params["head0.key_bias"], np.float64, kind="grad")


def test_float32_input_computes_in_float32_and_grads_in_param_dtype():
    layer = MultiHeadAttention.init(n=8, d=8, seed=0)
    x = RNG.standard_normal((2, 8, 8))
    x32 = x.astype(np.float32)
    y32, cache = layer.forward(x32)
    assert y32.dtype == np.float32
    # the lowp rule: the textbook formula evaluated in float32 (inputs and weights), independent of the layer
    lowp = _textbook(x32, *(w.astype(np.float32) for w in (layer.w_q, layer.w_k, layer.w_v, layer.w_o)))
    assert lowp.dtype == np.float32
    assert_attention_close(y32, layer(x32.astype(np.float64)), np.float32, lowp=lowp)
    g = layer.backward(cache, np.ones_like(y32))
    assert g.dx.dtype == np.float32
    assert all(v.dtype == np.float64 for v in g.params.values())
    layer32 = MultiHeadAttention.init(n=8, d=8, seed=0, dtype=np.float32)
    assert all(p.dtype == np.float32 for p in layer32.params.values())
    assert layer32(x).dtype == np.float64           # float64 input: float64 computation


def test_init_defaults_and_options():
    layer = MultiHeadAttention.init(n=16, d=8, seed=0)
    assert (layer.heads, layer.dk, layer.dv) == (2, 4, 4)
    layer = MultiHeadAttention.init(n=16, d=256, seed=0)
    assert (layer.heads, layer.dk) == (8, 32)
    layer = MultiHeadAttention.init(d=12, seed=1, heads=3, dk=5, dv=2)
    assert layer.w_q.shape == (12, 3, 5) and layer.w_v.shape == (12, 3, 2) and layer.w_o.shape == (3, 2, 12)
    a, b = MultiHeadAttention.init(d=8, seed=3), MultiHeadAttention.init(d=8, seed=3)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)


def test_inputs_not_modified_and_call_matches_forward():
    layer = MultiHeadAttention.init(n=6, d=8, seed=0)
    x = RNG.standard_normal((6, 8))
    x0 = x.copy()
    y, cache = layer.forward(x)
    layer.backward(cache, np.ones_like(y))
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(layer(x), y)


# -- bad input ---------------------------------------------------------------------------

def test_head_count_mismatch():
    w = _weights(4, 2, 2, 2)
    with pytest.raises(ValueError, match="cores.*H = 2.*got 3"):
        MultiHeadAttention([DenseAttention()] * 3, *w)


@pytest.mark.parametrize("which,shape,match", [
    ("w_k", (4, 2, 3), "w_k must have the shape of w_q"),
    ("w_v", (5, 2, 2), r"w_v must have shape \(D, H, Dv\)"),
    ("w_v", (4, 3, 2), r"w_v must have shape \(D, H, Dv\)"),
    ("w_o", (2, 2, 5), r"w_o must have shape \(H, Dv, D\)"),
    ("w_o", (2, 3, 4), r"w_o must have shape \(H, Dv, D\)"),
    ("w_q", (4, 2), r"w_q must have shape \(D, H, Dk\)"),
    ("w_q", (4, 0, 2), r"w_q must have shape \(D, H, Dk\)"),
])
def test_wrong_weight_shapes(which, shape, match):
    w = dict(zip(("w_q", "w_k", "w_v", "w_o"), _weights(4, 2, 2, 2)))
    w[which] = np.ones(shape)
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(DenseAttention(), **w)


def test_bad_types_and_x():
    w = _weights(4, 2, 2, 2)
    with pytest.raises(TypeError, match=r"cores\[1\] must be an AttentionCore"):
        MultiHeadAttention([DenseAttention(), "dense"], *w)
    with pytest.raises(TypeError, match="cores must be"):
        MultiHeadAttention(3, *w)
    with pytest.raises(TypeError, match="w_o must be a float32 or float64"):
        MultiHeadAttention(DenseAttention(), *w[:3], w[3].astype(int))
    layer = MultiHeadAttention(DenseAttention(), *w)
    with pytest.raises(ValueError, match="x must have feature width D = 4"):
        layer(np.ones((3, 5)))
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        layer(np.ones((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="x must contain only finite"):
        layer.forward(np.full((3, 4), np.nan), check_finite=True)
    y, cache = layer.forward(np.ones((3, 4)))
    with pytest.raises(ValueError, match="dy must have the shape"):
        layer.backward(cache, np.ones((3, 5)))
    with pytest.raises(ValueError, match="heads must be >= 1"):
        MultiHeadAttention.init(d=4, heads=0)


# -- Longformer / BigBird head sets (the chapter 1 cores) ------------------------------

def _each_head_separately(layer, x):
    """Σ_h core_h(x·w_q[:, h], x·w_k[:, h], x·w_v[:, h]) · w_o[h], one core call per head."""
    y = 0
    for h, core in enumerate(layer.cores):
        o = core(x @ layer.w_q[:, h], x @ layer.w_k[:, h], x @ layer.w_v[:, h])
        y = y + o @ layer.w_o[h]
    return y


def test_longformer_heads_equal_each_core_separately_and_masked_textbook():
    n, d, h = 16, 8, 4
    cores = longformer_heads(n, h, window=2, dilation=3, global_indices=(0, 5))
    assert [type(c) for c in cores] == [LocalAttention, StridedAttention, GlobalAttention, LocalAttention]
    w = _weights(d, h, 2, 2, seed=7)
    layer = MultiHeadAttention(cores, *w)
    x = RNG.standard_normal((2, n, d))
    y = layer(x)
    assert_attention_close(y, _each_head_separately(layer, x), np.float64)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    local = np.abs(i - j) <= 2
    strided = ((i - j) % 3 == 0) & (np.abs(i - j) <= 6)
    glob = np.isin(i, (0, 5)) | np.isin(j, (0, 5))
    assert_attention_close(y, _textbook(x, *w, masks=[local, strided, glob, local]), np.float64)
    assert ea.gradcheck(layer, (x[:1],)) < 1e-6


def test_longformer_causal_heads_never_read_the_future():
    n, d = 16, 8
    layer = MultiHeadAttention.init(n=n, d=d, seed=0, heads=3, dk=2,
                                    cores=longformer_heads(n, 3, window=3, dilation=2, causal=True))
    x = RNG.standard_normal((n, d))
    x2 = x.copy()
    x2[9:] += RNG.standard_normal((n - 9, d))
    np.testing.assert_array_equal(layer(x)[:9], layer(x2)[:9])


def _bigbird_random_rule(n, window, global_indices, causal):
    """Keys a BigBird random head may draw: outside the window and the global keys and rows
    (causal: only j <= i, outside the causal window; the causal set has no global head)."""
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    if causal:
        return (j <= i) & (i - j > window)
    glob = np.isin(i, global_indices) | np.isin(j, global_indices)
    return (np.abs(i - j) > window) & ~glob


def test_bigbird_heads_equal_each_core_separately():
    n, d, h = 16, 8, 5
    cores = bigbird_heads(n, h, window=1, dilation=4, global_indices=(0,), per_row=3, seed=11)
    assert [type(c) for c in cores] == [SparseAttention, LocalAttention, StridedAttention, GlobalAttention,
                                        SparseAttention]
    w = _weights(d, h, 2, 3, seed=8)
    layer = MultiHeadAttention(cores, *w)
    x = RNG.standard_normal((2, n, d))
    y = layer(x)
    assert_attention_close(y, _each_head_separately(layer, x), np.float64)
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    cand = _bigbird_random_rule(n, 1, (0,), causal=False)
    rand = [cores[0].pattern.toarray().astype(bool), cores[4].pattern.toarray().astype(bool)]
    for r in rand:
        assert not np.any(r & ~cand)                                   # extra keys only
        np.testing.assert_array_equal(r.sum(axis=1), np.minimum(3, cand.sum(axis=1)))
    assert (rand[0] != rand[1]).any()                                  # a new draw per head
    seen = patterns.union(patterns.local(n, 1), patterns.global_tokens(n, (0,)))
    rand0 = patterns.random(n, 3, 11, exclude=seen).toarray().astype(bool)
    rand4 = patterns.random(n, 3, 15, exclude=seen).toarray().astype(bool)
    masks = [rand0, np.abs(i - j) <= 1, ((i - j) % 4 == 0) & (np.abs(i - j) <= 4), (i == 0) | (j == 0), rand4]
    assert_attention_close(y, _textbook(x, *w, masks=masks), np.float64)
    assert ea.gradcheck(layer, (x[:1],)) < 1e-6


def test_bigbird_causal_heads_never_read_the_future():
    n, d, h = 16, 8, 5
    cores = bigbird_heads(n, h, window=2, dilation=3, per_row=2, seed=3, causal=True)
    assert [type(c) for c in cores] == [SparseAttention, LocalAttention, StridedAttention, LocalAttention,
                                        SparseAttention]
    cand = _bigbird_random_rule(n, 2, (0,), causal=True)
    for r in (cores[0].pattern.toarray().astype(bool), cores[4].pattern.toarray().astype(bool)):
        assert not np.any(r & ~cand)
        np.testing.assert_array_equal(r.sum(axis=1), np.minimum(2, cand.sum(axis=1)))
    layer = MultiHeadAttention.init(n=n, d=d, seed=0, heads=h, dk=2, cores=cores)
    x = RNG.standard_normal((n, d))
    x2 = x.copy()
    x2[9:] += RNG.standard_normal((n - 9, d))
    np.testing.assert_array_equal(layer(x)[:9], layer(x2)[:9])
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    masks = [cores[0].pattern.toarray().astype(bool), (i - j >= 0) & (i - j <= 2),
             (j <= i) & ((i - j) % 3 == 0) & (i - j <= 6), (i - j >= 0) & (i - j <= 2),
             cores[4].pattern.toarray().astype(bool)]
    assert_attention_close(layer(x), _textbook(x, layer.w_q, layer.w_k, layer.w_v, layer.w_o, masks=masks),
                           np.float64)


def test_head_set_bad_arguments():
    with pytest.raises(ValueError, match="global_indices"):
        longformer_heads(8, 3, window=1, dilation=2, global_indices=(8,))
    with pytest.raises(ValueError, match="window must be >= 0"):
        longformer_heads(8, 3, window=-1)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        bigbird_heads(8, 4, dilation=0)
    with pytest.raises(ValueError, match="per_row must be <= 8"):
        bigbird_heads(8, 4, per_row=9)
    with pytest.raises(TypeError, match="causal"):
        bigbird_heads(8, 4, causal="no")


def test_registry_entries():
    reg = ea.registry("layer")
    assert reg["mha_dense"].cls is MultiHeadAttention
    for n in (16, 32, 64):
        layer = reg["mha_dense"].build(n=n, d=8, seed=0)
        assert layer(np.ones((n, 8))).shape == (n, 8)


def test_global_head_with_added_token_params_namespaced_and_checked():
    n, d, h, dk = 8, 6, 3, 2
    cores = [DenseAttention(), GlobalAttention(indices=(3,), n_extra=1, d=dk, dv=dk, seed=4),
             DenseAttention(causal=True)]
    layer = MultiHeadAttention(cores, *_weights(d, h, dk, dk, seed=9))
    assert {"head1.extra_q", "head1.extra_k", "head1.extra_v"} <= set(layer.params)
    assert layer.params["head1.extra_k"] is cores[1].params["extra_k"]
    x = RNG.standard_normal((2, n, d))
    assert_attention_close(layer(x), _each_head_separately(layer, x), np.float64)
    errs = ea.gradcheck(layer, (x,), full=True)
    assert "param.head1.extra_v" in errs and max(errs.values()) < 1e-6


def test_equal_parameter_free_cores_run_batched():
    w = _weights(4, 3, 2, 2)
    assert MultiHeadAttention([DenseAttention(causal=True) for _ in range(3)], *w).batched
    assert not MultiHeadAttention([DenseAttention(), DenseAttention(causal=True), DenseAttention()], *w).batched
    assert not MultiHeadAttention([KeyBiasAttention(np.zeros(4)) for _ in range(3)], *w).batched


def test_per_head_cores_equal_one_sparse_core_with_a_pattern_per_head():
    """The loop over Longformer-style heads equals one batched SparseAttention call with one
    pattern per head (axis -3): two independent routes to the same layer."""
    n, d, h = 16, 8, 3
    w = _weights(d, h, 2, 2, seed=12)
    loop = MultiHeadAttention(longformer_heads(n, h, window=2, dilation=3, global_indices=(4,)), *w)
    pats = [patterns.local(n, 2), patterns.strided(n, 3, 2), patterns.global_tokens(n, (4,))]
    batched = MultiHeadAttention(SparseAttention(pats), *w)
    assert batched.batched and not loop.batched
    x, dy = RNG.standard_normal((2, n, d)), RNG.standard_normal((2, n, d))
    (y1, c1), (y2, c2) = loop.forward(x), batched.forward(x)
    assert_attention_close(y1, y2, np.float64)
    g1, g2 = loop.backward(c1, dy), batched.backward(c2, dy)
    assert_attention_close(g1.dx, g2.dx, np.float64, kind="grad")
    for name in ("w_q", "w_k", "w_v", "w_o"):
        assert_attention_close(g1.params[name], g2.params[name], np.float64, kind="grad")
