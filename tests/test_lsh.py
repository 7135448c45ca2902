"""Reformer LSH attention: hashing, exact and chunked patterns, rounds, gradients, kernels, bad input."""
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from efficient_attention import gradcheck
from efficient_attention.bench import traced_peak
from efficient_attention.dense import DenseAttention
from efficient_attention.kernels import lsh as K
from efficient_attention.lsh import LSHAttention, hash_buckets
from efficient_attention.testing import assert_attention_close, dense_oracle, float_arrays


def _data(shape_q, m=None, dv=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    *batch, n, d = shape_q
    m = n if m is None else m
    q = rng.standard_normal(shape_q)
    k = rng.standard_normal(tuple(batch) + (m, d))
    v = rng.standard_normal(tuple(batch) + (m, dv))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def _unit(x):
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _oracle(core, q, k, v, mask):
    keys = _unit(q) if core.shared_qk else k
    return DenseAttention(scale=core.scale)(q, keys, v, mask=mask)


def _call(core, q, k, v):
    return core(q, None if core.shared_qk else k, v)


def _bucket_mask(core, q, k):
    """The exact-mode mask built from buckets() alone (one sequence)."""
    if core.shared_qk:
        bq = bk = core.buckets(q)                                    # (R, N)
    else:
        bq, bk = core.buckets(q, k)
    mask = (bq[:, :, None] == bk[:, None, :]).any(axis=0)            # same bucket in some round
    n, m = mask.shape
    if core.causal:
        mask &= np.arange(m)[None, :] <= np.arange(n)[:, None]
    if core.shared_qk:
        np.fill_diagonal(mask, False)
        lonely = ~mask.any(axis=1)
        mask[lonely, lonely] = True                                  # self only when alone
    return mask


CONFIGS = [dict(shared_qk=s, causal=c) for s in (True, False) for c in (False, True)]


# ------------------------------------------------------------------ hashing


def test_hash_matches_argmax_of_concatenation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 50, 6))
    rot = rng.standard_normal((2, 6, 5))
    got = hash_buckets(x, rot)
    for r in range(2):
        proj = x @ rot[r]
        np.testing.assert_array_equal(got[:, r], np.argmax(np.concatenate([proj, -proj], -1), -1))


def test_explicit_rotations_reproduce_hashing_and_output():
    q, k, v = _data((2, 40, 6), seed=2)
    seeded = LSHAttention(6, n_hashes=3, chunk_size=8, seed=5, shared_qk=False)
    rot = seeded.rotations_for(6)
    assert rot.shape == (3, 6, 3)
    manual = np.stack([np.argmax(np.concatenate([q @ rot[r], -(q @ rot[r])], -1), -1)
                       for r in range(3)], axis=-2)                  # (B, R, N)
    bq, bk = seeded.buckets(q, k)
    np.testing.assert_array_equal(bq, manual)
    explicit = LSHAttention(6, n_hashes=3, chunk_size=8, rotations=rot, shared_qk=False)
    np.testing.assert_array_equal(explicit.buckets(q, k)[1], bk)
    np.testing.assert_array_equal(explicit(q, k, v), seeded(q, k, v))


def test_same_seed_same_output_other_seed_other_buckets():
    q, _, v = _data((2, 64, 8), seed=3)
    a = LSHAttention(8, n_hashes=2, chunk_size=8, seed=11)
    b = LSHAttention(8, n_hashes=2, chunk_size=8, seed=11)
    np.testing.assert_array_equal(a(q, None, v), b(q, None, v))
    c = LSHAttention(8, n_hashes=2, chunk_size=8, seed=12)
    assert not np.array_equal(a.buckets(q), c.buckets(q))


def test_buckets_shape_and_range_batch_axes():
    q, k, _ = _data((2, 3, 20, 4))
    core = LSHAttention(6, n_hashes=2, shared_qk=False)
    bq, bk = core.buckets(q, k)
    assert bq.shape == bk.shape == (2, 3, 2, 20)
    assert bq.min() >= 0 and bq.max() < 6
    # per-sequence hashing: one sequence alone gives the same ids
    np.testing.assert_array_equal(core.buckets(q[1, 2]), bq[1, 2])


# ------------------------------------------------------------------ exact bucket attention


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("n_hashes", [1, 3])
def test_exact_mode_equals_dense_with_bucket_mask(cfg, n_hashes):
    q, k, v = _data((3, 30, 5), seed=n_hashes)
    core = LSHAttention(4, n_hashes=n_hashes, chunk_size=None, **cfg)
    out = _call(core, q, k, v)
    for b in range(3):
        mask = _bucket_mask(core, q[b], k[b])
        assert_attention_close(out[b], _oracle(core, q[b], k[b], v[b], mask), np.float64)
        np.testing.assert_array_equal(core.pattern(q[b], None if core.shared_qk else k[b]).toarray(),
                                      mask)


def test_exact_mode_separate_qk_different_lengths():
    q, k, v = _data((2, 12, 4), m=21, seed=4)
    core = LSHAttention(4, n_hashes=2, chunk_size=None, shared_qk=False, causal=True)
    out = core(q, k, v)
    for b in range(2):
        assert_attention_close(out[b], _oracle(core, q[b], k[b], v[b], _bucket_mask(core, q[b], k[b])),
                               np.float64)


# ------------------------------------------------------------------ chunked algorithm


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("across", [False, True])
@pytest.mark.parametrize("n, chunk", [(48, 8), (37, 8), (40, 3)])
def test_chunked_equals_masked_attention_over_pattern(cfg, across, n, chunk):
    q, k, v = _data((2, n, 6), seed=n + chunk)
    core = LSHAttention(6, n_hashes=3, chunk_size=chunk, attend_across_buckets=across, **cfg)
    out = _call(core, q, k, v)
    for b in range(2):
        pat = core.pattern(q[b], None if core.shared_qk else k[b])
        assert isinstance(pat, sp.csr_array) and pat.dtype == bool and pat.shape == (n, n)
        assert_attention_close(out[b], _oracle(core, q[b], k[b], v[b], pat.toarray()), np.float64)
        if core.causal:
            assert sp.triu(pat, k=1).nnz == 0


@pytest.mark.parametrize("cfg", CONFIGS)
def test_chunk_at_least_n_equals_exact(cfg):
    q, k, v = _data((2, 33, 5), seed=7)
    exact = LSHAttention(4, n_hashes=2, chunk_size=None, **cfg)
    one_chunk = LSHAttention(4, n_hashes=2, chunk_size=33, **cfg)
    assert_attention_close(_call(one_chunk, q, k, v), _call(exact, q, k, v), np.float64)
    big = LSHAttention(4, n_hashes=2, chunk_size=1000, **cfg)
    assert_attention_close(_call(big, q, k, v), _call(exact, q, k, v), np.float64)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_strict_chunked_pattern_is_subset_of_exact(cfg):
    q, k, _ = _data((64, 6), seed=8)
    kk = None if cfg["shared_qk"] else k
    exact = LSHAttention(4, n_hashes=3, chunk_size=None, **cfg).pattern(q, kk).toarray()
    chunked = LSHAttention(4, n_hashes=3, chunk_size=4, **cfg).pattern(q, kk).toarray()
    if cfg["shared_qk"]:                 # the self rule may add (i, i) where chunks found no other key
        np.fill_diagonal(exact, False)
        np.fill_diagonal(chunked, False)
    assert chunked.sum() < exact.sum()
    assert not (chunked & ~exact).any()


def test_across_buckets_sees_previous_chunk_no_wraparound():
    """With attend_across_buckets the pattern is exactly 'own chunk + previous chunk' in sorted order."""
    q, _, _ = _data((32, 4), seed=9)
    core = LSHAttention(4, n_hashes=1, chunk_size=4, attend_across_buckets=True)
    pat = core.pattern(q).toarray()
    order = np.argsort(core.buckets(q)[0], kind="stable")
    chunk = np.empty(32, int)
    chunk[order] = np.arange(32) // 4
    expected = (chunk[None, :] == chunk[:, None]) | (chunk[None, :] == chunk[:, None] - 1)
    np.fill_diagonal(expected, False)
    np.testing.assert_array_equal(pat, expected)     # chunk 0 does not see the last chunk


def test_duplicate_pairs_count_once():
    """Three identical rounds give the one-round result: pairs are not counted three times."""
    q, k, v = _data((2, 40, 4), seed=10)
    rot = np.random.default_rng(0).standard_normal((1, 4, 3))
    for shared in (True, False):
        one = LSHAttention(6, n_hashes=1, chunk_size=5, rotations=rot, shared_qk=shared)
        three = LSHAttention(6, n_hashes=3, chunk_size=5, rotations=np.repeat(rot, 3, 0),
                             shared_qk=shared)
        assert_attention_close(_call(three, q, k, v), _call(one, q, k, v), np.float64)


def test_shared_qk_self_rule():
    q, _, v = _data((2, 24, 4), seed=11)
    core = LSHAttention(4, n_hashes=2, chunk_size=4, causal=True)
    out = core(q, None, v)
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=0, atol=0)  # token 0 has no other key
    pat = core.pattern(q[0]).toarray()
    diag = np.diag(pat)
    others = pat.sum(axis=1) - diag
    assert np.array_equal(diag, others == 0)                          # self iff alone


def test_query_alone_in_its_bucket_outputs_zero():
    # d = 2, C = 2, rotation e_0: bucket 0 iff x_0 >= 0. All keys have x_0 > 0, query 3 has x_0 < 0.
    rng = np.random.default_rng(12)
    k = np.abs(rng.standard_normal((1, 8, 2))) + 0.1
    q = np.abs(rng.standard_normal((1, 8, 2))) + 0.1
    q[0, 3, 0] = -1.0
    v = rng.standard_normal((1, 8, 3))
    rot = np.array([[[1.0], [0.0]]])
    for chunk in (None, 2):
        core = LSHAttention(2, chunk_size=chunk, shared_qk=False, rotations=rot)
        out, cache = core.forward(q, k, v)
        assert np.all(np.isfinite(out)) and np.all(out[0, 3] == 0)
        g = core.backward(cache, np.ones_like(out))
        assert np.all(g.dq[0, 3] == 0) and all(np.all(np.isfinite(a)) for a in g[:3])


def test_batch_axes_are_independent_sequences():
    q, k, v = _data((2, 3, 24, 4), seed=13)
    core = LSHAttention(4, n_hashes=2, chunk_size=4, shared_qk=False, causal=True)
    out = core(q, k, v)
    for a in range(2):
        for h in range(3):
            np.testing.assert_array_equal(out[a, h], core(q[a, h], k[a, h], v[a, h]))


def test_float32_matches_float64():
    q, k, v = _data((2, 64, 8), seed=14, dtype=np.float32)
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    core = LSHAttention(8, n_hashes=2, chunk_size=8, shared_qk=False)
    out32 = core(q, k, v)
    assert out32.dtype == np.float32
    # the lowp rule: the output is dense attention over the pattern (the same buckets in both precisions),
    # DenseAttention over it in float32 is an independent low-precision evaluation
    pattern = np.stack([core.pattern(q[b], k[b]).toarray() for b in range(2)])
    np.testing.assert_array_equal(pattern, np.stack([core.pattern(q64[b], k64[b]).toarray() for b in range(2)]))
    oracle = dense_oracle(q, k, v, mask=pattern, scale=core.scale)
    assert_attention_close(out32, core(q64, k64, v64), np.float32, lowp=oracle.lowp[0],
                           magnitude=oracle.magnitude[0])


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("chunk", [None, 4])
def test_gradcheck_fixed_hashes(cfg, chunk):
    q, k, v = _data((2, 20, 4), seed=15)
    core = LSHAttention(4, n_hashes=2, chunk_size=chunk, **cfg)
    if core.shared_qk:
        def fwd(q, v):
            return core.forward(q, None, v)

        def bwd(cache, g):
            grads = core.backward(cache, g)
            assert grads.dk is None
            return grads.dq, grads.dv
        assert gradcheck(fwd, (q, v), bwd) < 1e-6
    else:
        assert gradcheck(core, (q, k, v)) < 1e-6


def _shared_qk_reference(q, v, g, mask, scale):
    """Shared-QK attention and its gradients in float64, written out for one sequence: keys
    k̂ = q/‖q‖, softmax(scale·q k̂ᵀ) over ``mask`` (rows with no key give 0), and dq through both
    paths, the query and the key k̂ = q/‖q‖. Returns (out, dq, dv)."""
    q, v, g = (np.asarray(a, np.float64) for a in (q, v, g))
    norm = np.linalg.norm(q, axis=-1, keepdims=True)                    # (N, 1)
    khat = q / norm
    s = np.where(mask, scale * q @ khat.T, -np.inf)                     # (N, N)
    some = mask.any(axis=1, keepdims=True)
    p = np.where(some, np.exp(s - np.where(some, s.max(axis=1, keepdims=True), 0.0)), 0.0)
    p = np.divide(p, p.sum(axis=1, keepdims=True), out=np.zeros_like(p), where=some)
    out = p @ v
    dv = p.T @ g
    dp = g @ v.T
    ds = p * (dp - (p * dp).sum(axis=1, keepdims=True))                 # softmax backward
    dq = scale * ds @ khat                                              # through the query
    dkhat = scale * ds.T @ q                                            # through the key k̂
    dq += (dkhat - (dkhat * khat).sum(axis=1, keepdims=True) * khat) / norm   # d(q/‖q‖)
    return out, dq, dv


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("scale", [None, 0.7])
def test_gradients_equal_dense_oracle_gradients(cfg, scale):
    q, k, v = _data((1, 24, 4), seed=16)
    core = LSHAttention(4, n_hashes=3, chunk_size=4, scale=scale, **cfg)
    out, cache = core.forward(q, None if core.shared_qk else k, v)
    g = np.random.default_rng(0).standard_normal(out.shape)
    grads = core.backward(cache, g)
    s = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    if core.shared_qk:
        assert grads.dk is None
        mask = core.pattern(q[0]).toarray()                 # the effective pattern, self rule included
        diag = np.diag(mask)
        assert np.array_equal(diag, mask.sum(axis=1) == diag)   # self only where no other key
        ref_out, ref_dq, ref_dv = _shared_qk_reference(q[0], v[0], g[0], mask, s)
        assert_attention_close(out[0], ref_out, np.float64)
        assert_attention_close(grads.dq[0], ref_dq, np.float64, kind="grad")
        assert_attention_close(grads.dv[0], ref_dv, np.float64, kind="grad")
    else:
        mask = core.pattern(q[0], k[0]).toarray()
        dense = DenseAttention(scale=scale)
        ref_out, ref_cache = dense.forward(q, k, v, mask=mask)
        ref = dense.backward(ref_cache, g)
        assert_attention_close(out, ref_out, np.float64)
        for a, b in zip((grads.dq, grads.dk, grads.dv), ref[:3]):
            assert_attention_close(a, b, np.float64, kind="grad")


# ------------------------------------------------------------------ kernels against references


def _layout_case(shared, chunk, seed=17, n=26, m=None):
    rng = np.random.default_rng(seed)
    m = n if m is None or shared else m
    qb = rng.integers(0, 4, (2, 3, n))
    kb = None if shared else rng.integers(0, 4, (2, 3, m))
    lay = K.sort_layout(qb, kb, 4, chunk, shared)
    q, k, v = _data((2, n, 5), m=m, seed=seed)
    if shared:
        k = _unit(q)
    return q, k, v, lay


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("py", [False, True])
def test_kernels_match_numpy_reference(shared, chunk, causal, py):
    q, k, v, lay = _layout_case(shared, chunk, m=19)
    kw = dict(causal=causal, shared=shared, across=False, scale=0.7)
    fk = getattr(K._forward_round, "py_func", K._forward_round) if py else None
    bk = getattr(K._backward_round, "py_func", K._backward_round) if py else None
    out, lse = K.bucket_forward(q, k, v, lay, kernel=fk, **kw)
    ref_out, ref_lse = K.bucket_forward_reference(q, k, v, lay, **kw)
    assert_attention_close(out, ref_out, np.float64)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=1e-12)
    dout = np.random.default_rng(1).standard_normal(out.shape)
    got = K.bucket_backward(q, k, v, dout, out, lse, lay, kernel=bk, **kw)
    ref = K.bucket_backward_reference(q, k, v, dout, out, lse, lay, **kw)
    for a, b in zip(got, ref):
        assert_attention_close(a, b, np.float64)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("py", [False, True])
def test_float32_kernels_match_the_float64_reference(shared, causal, py):
    """float32 blocks take the in-place float32 exp; forward and backward agree with the NumPy
    reference evaluated in float64 to float32 rounding."""
    q, k, v, lay = _layout_case(shared, 3, m=19)
    kw = dict(causal=causal, shared=shared, across=False, scale=0.7)
    fk = getattr(K._forward_round, "py_func", K._forward_round) if py else None
    bk = getattr(K._backward_round, "py_func", K._backward_round) if py else None
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    out, lse = K.bucket_forward(q32, k32, v32, lay, kernel=fk, **kw)
    ref_out, ref_lse = K.bucket_forward_reference(*(a.astype(np.float64) for a in (q32, k32, v32)),
                                                  lay, **kw)
    assert out.dtype == np.float32
    dout = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
    got = K.bucket_backward(q32, k32, v32, dout, out, lse, lay, kernel=bk, **kw)
    ref = K.bucket_backward_reference(*(a.astype(np.float64) for a in (q32, k32, v32, dout)),
                                      ref_out, ref_lse, lay, **kw)
    # the lowp rule: the rounds combine to dense attention over the pairs some round allows, and
    # DenseAttention over that mask in float32 is an independent low-precision evaluation
    mask = np.zeros((q.shape[0], q.shape[1], k.shape[1]), bool)
    for b in range(q.shape[0]):
        rows, cols = K.layout_pairs(lay, b, causal=causal, shared=shared, across=False)
        mask[b, rows, cols] = True
    oracle = dense_oracle(q32, k32, v32, dout, mask=mask, scale=0.7)
    for want, ref64 in zip(oracle.expected, (ref_out,) + tuple(ref)):
        assert_attention_close(want, ref64, np.float64)          # the same math as the NumPy reference
    assert_attention_close(out, ref_out, np.float32, lowp=oracle.lowp[0], magnitude=oracle.magnitude[0])
    for a, b, lowp, mag in zip(got, ref, oracle.lowp[1:], oracle.magnitude[1:]):
        assert a.dtype == np.float32
        assert_attention_close(a, b, np.float32, lowp=lowp, magnitude=mag, kind="grad")


def test_sort_layout_is_a_stable_bucket_sort():
    rng = np.random.default_rng(18)
    qb, kb = rng.integers(0, 6, (2, 2, 23)), rng.integers(0, 6, (2, 2, 17))
    lay = K.sort_layout(qb, kb, 6, 4, False)
    for b in range(2):
        for r in range(2):
            np.testing.assert_array_equal(lay.qperm[b, r], np.argsort(qb[b, r], kind="stable"))
            np.testing.assert_array_equal(lay.kperm[b, r], np.argsort(kb[b, r], kind="stable"))
            # every chunk holds 8 merged items (the last one the rest)
            sizes = np.diff(lay.qptr[b, r]) + np.diff(lay.kptr[b, r])
            assert np.all(sizes[:-1] == 8) and sizes.sum() == 40


# ------------------------------------------------------------------ property test


@settings(max_examples=20, deadline=None)
@given(st.data())
def test_property_output_equals_pattern_oracle(data):
    n = data.draw(st.integers(1, 20))
    d = data.draw(st.integers(1, 4))
    shared = data.draw(st.booleans())
    chunk = data.draw(st.sampled_from([None, 1, 2, 5]))
    core = LSHAttention(data.draw(st.sampled_from([2, 4, 6])), n_hashes=data.draw(st.integers(1, 3)),
                        chunk_size=chunk, causal=data.draw(st.booleans()), shared_qk=shared,
                        attend_across_buckets=data.draw(st.booleans()), seed=data.draw(st.integers(0, 3)))
    q = data.draw(float_arrays((n, d)))
    k = data.draw(float_arrays((n, d)))
    v = data.draw(float_arrays((n, 2)))
    out = _call(core, q, k, v)
    pat = core.pattern(q, None if shared else k).toarray()
    assert_attention_close(out, _oracle(core, q, k, v, pat), np.float64)


# ------------------------------------------------------------------ memory


def test_memory_is_linear_not_quadratic():
    n, d = 4096, 16
    q, k, v = _data((n, d), seed=19)
    core = LSHAttention(64, n_hashes=2, chunk_size=32, shared_qk=False)
    core(q[:64], k[:64], v[:64])                                 # compile outside the trace

    def run():
        out, cache = core.forward(q, k, v)
        core.backward(cache, out)
    peak = traced_peak(run)
    assert peak < 0.05 * n * n * 8                               # far below one N x N float64 matrix


# ------------------------------------------------------------------ bad input


def test_bad_inputs():
    with pytest.raises(ValueError, match="n_buckets must be even"):
        LSHAttention(5)
    with pytest.raises(ValueError, match="n_buckets"):
        LSHAttention(0)
    with pytest.raises(TypeError, match="n_hashes"):
        LSHAttention(4, n_hashes=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        LSHAttention(4, chunk_size=0)
    with pytest.raises(ValueError, match=r"rotations must have shape \(n_hashes, D, n_buckets/2\)"):
        LSHAttention(4, n_hashes=2, rotations=np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="rotations must have shape"):
        LSHAttention(4, n_hashes=2, rotations=np.ones((1, 3, 2)))
    q, k, v = _data((10, 4))
    with pytest.raises(ValueError, match="rotations must have shape .* D = 4"):
        LSHAttention(4, n_hashes=2, rotations=np.ones((2, 3, 2)))(q, None, v)
    with pytest.raises(ValueError, match="k must be None when shared_qk=True"):
        LSHAttention(4)(q, k, v)
    with pytest.raises(ValueError, match="k must be None when shared_qk=True"):
        LSHAttention(4).buckets(q, k)
    with pytest.raises(ValueError, match="k must be given"):
        LSHAttention(4, shared_qk=False)(q, None, v)
    with pytest.raises(ValueError, match="v must be given"):
        LSHAttention(4)(q, None, None)
    with pytest.raises(TypeError, match="q must be a float32 or float64"):
        LSHAttention(4)(q.astype(int), None, v)
    with pytest.raises(ValueError, match="pattern takes one sequence"):
        LSHAttention(4).pattern(q[None])
    with pytest.raises(ValueError, match="dout must have the shape"):
        core = LSHAttention(4)
        _, cache = core.forward(q, None, v)
        core.backward(cache, np.ones((3, 3)))
    with pytest.raises(ValueError, match="q must contain only finite"):
        bad = q.copy()
        bad[0, 0] = np.nan
        LSHAttention(4).forward(bad, None, v, check_finite=True)


def test_n_not_multiple_of_chunk_pads_last_chunk():
    """Documented rule: the sorted sequence is padded with empty slots (the last chunk is shorter)."""
    q, _, v = _data((1, 10, 4), seed=20)
    core = LSHAttention(2, chunk_size=4, attend_across_buckets=True)
    lay = core._layout(q, None)
    np.testing.assert_array_equal(lay.qptr[0, 0], [0, 4, 8, 10])
    assert_attention_close(core(q, None, v)[0], _oracle(core, q[0], None, v[0],
                                                        core.pattern(q[0]).toarray()), np.float64)




@pytest.mark.parametrize("shared", [True, False])
def test_public_buckets_and_sort_layout_give_forwards_layout(shared):
    """benchmarks/bench_lsh.py times hashing + sorting on its own through public calls:
    ``kernels.lsh.sort_layout(core.buckets(q), ...)`` must be the layout forward uses."""
    q, k, _ = _data((2, 40, 6), seed=21)
    core = LSHAttention(4, n_hashes=3, chunk_size=8, shared_qk=shared)
    if shared:
        public = K.sort_layout(core.buckets(q), None, core.n_buckets, core.chunk_size, True)
    else:
        qb, kb = core.buckets(q, k)
        public = K.sort_layout(qb, kb, core.n_buckets, core.chunk_size, False)
    inner = core._layout(q, None if shared else k)
    assert public._fields == inner._fields
    for name, a, b in zip(inner._fields, public, inner):
        if isinstance(b, np.ndarray):
            assert a.dtype == b.dtype, name
            np.testing.assert_array_equal(a, b, err_msg=name)
        else:
            assert a == b, name
