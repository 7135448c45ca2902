"""SparseAttention and GlobalAttention against the dense oracle; kernels against their NumPy references."""
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention import patterns as P
from efficient_attention.core import AttentionCore
from efficient_attention.kernels import sparse as K
from efficient_attention.sparse import GlobalAttention, SparseAttention
from efficient_attention.testing import (Oracle, assert_attention_close, assert_close_to_oracle, batch_shapes,
                                         dense_oracle, float_arrays)

FEW = settings(max_examples=20, deadline=None)


def _qkv(shape_q, m, dv, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    *batch, n, d = shape_q
    q = rng.standard_normal(shape_q)
    k = rng.standard_normal((*batch, m, d))
    v = rng.standard_normal((*batch, m, dv))
    return tuple(a.astype(dtype) for a in (q, k, v))


def _dense_fwd_bwd(q, k, v, mask, dout, scale=None):
    dense = ea.DenseAttention(scale=scale)
    out, cache = dense.forward(q, k, v, mask=mask)
    return out, dense.backward(cache, dout)


def _compare(core, q, k, v, mask, dtype, seed=1):
    """core vs DenseAttention(mask) in ``dtype``, forward and backward (oracle in float64)."""
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    out, cache = core.forward(q, k, v)
    assert out.dtype == dtype
    dout = np.random.default_rng(seed).standard_normal(out.shape).astype(dtype)
    g = core.backward(cache, dout)
    row = max(1, k.shape[-2])
    assert all(a.dtype == dtype for a in g[:3])
    if dtype == np.float32:     # the lowp rule: DenseAttention's own float32 result and the rounding scale
        assert_close_to_oracle((out,) + tuple(g[:3]), dense_oracle(q, k, v, dout, mask=mask, scale=core.scale),
                               dtype, row_length=row)
        return out, g
    ref, gref = _dense_fwd_bwd(*(a.astype(np.float64) for a in (q, k, v, )), mask, dout.astype(np.float64),
                               scale=core.scale)
    assert_attention_close(out, ref, dtype, row_length=row)
    for name, a, b in zip("qkv", g[:3], gref[:3]):
        assert_attention_close(a, b, dtype, row_length=row, kind="grad", err_msg=f"d{name}")
    return out, g


# --------------------------------------------------------------------------- SparseAttention vs oracle

@FEW
@given(data=st.data(), dtype=st.sampled_from([np.float64, np.float32]))
def test_sparse_matches_dense_builder_patterns(data, dtype):
    n = data.draw(st.integers(1, 20))
    seed = data.draw(st.integers(0, 2**32 - 1))
    desc, pattern = P.draw_pattern(np.random.default_rng(seed), n)
    batch = data.draw(batch_shapes(max_dims=2, max_side=3))
    d, dv = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    q = data.draw(float_arrays(batch + (n, d)))
    k = data.draw(float_arrays(batch + (n, d)))
    v = data.draw(float_arrays(batch + (n, dv)))
    _compare(SparseAttention(pattern), q, k, v, pattern.toarray(), dtype)


@FEW
@given(data=st.data(), dtype=st.sampled_from([np.float64, np.float32]))
def test_sparse_matches_dense_rectangular_any_csr(data, dtype):
    n, m = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 12))
    mask = data.draw(st.lists(st.lists(st.booleans(), min_size=m, max_size=m), min_size=n, max_size=n))
    mask = np.array(mask, bool).reshape(n, m)
    scale = data.draw(st.none() | st.floats(0.1, 2.0))
    q, k, v = _qkv((2, n, 3), m, 4, seed=data.draw(st.integers(0, 100)))
    _compare(SparseAttention(sp.csr_array(mask), scale=scale), q, k, v, mask, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sparse_one_pattern_per_head(dtype):
    n = 24
    heads = [P.local(n, 2), P.strided(n, 4), P.global_tokens(n, [0, 7]), P.random(n, 3, 1),
             P.examples(n)["empty_rows"]]
    core = SparseAttention(heads)
    q, k, v = _qkv((2, len(heads), n, 6), n, 5)
    mask = core.dense_mask(n)
    assert mask.shape == (len(heads), n, n)
    _compare(core, q, k, v, mask, dtype)
    # head h uses pattern h: equal to running that head alone
    out = core(q, k, v)
    for h, p in enumerate(heads):
        np.testing.assert_allclose(out[:, h], SparseAttention(p)(q[:, h], k[:, h], v[:, h]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_full_pattern_equals_unmasked_dense(dtype):
    n, m = 17, 11
    core = SparseAttention(sp.csr_array(np.ones((n, m), bool)))
    q, k, v = _qkv((3, n, 4), m, 2)
    out, g = _compare(core, q, k, v, None, dtype)
    if dtype == np.float32:
        assert_close_to_oracle((out,), dense_oracle(*(a.astype(dtype) for a in (q, k, v))), dtype)
    else:
        assert_attention_close(out, ea.DenseAttention()(q, k, v), dtype)


def test_fully_masked_rows_give_zero_and_zero_gradient():
    n = 10
    mask = np.zeros((n, n), bool)
    mask[::3, :4] = True                          # rows 1, 2, 4, 5, ... have no key
    core = SparseAttention(sp.csr_array(mask))
    q, k, v = _qkv((2, n, 3), n, 3)
    out, cache = core.forward(q, k, v)
    empty = ~mask.any(axis=1)
    assert np.all(out[:, empty] == 0)
    g = core.backward(cache, np.ones_like(out))
    assert np.all(g.dq[:, empty] == 0) and np.all(g.dk[:, 4:] == 0) and np.all(g.dv[:, 4:] == 0)
    empty_core = SparseAttention(sp.csr_array((n, n), dtype=bool))     # nothing allowed at all
    out, cache = empty_core.forward(q, k, v)
    g = empty_core.backward(cache, np.ones_like(out))
    assert not out.any() and not g.dq.any() and not g.dk.any() and not g.dv.any()


def test_inputs_untouched_noncontiguous_and_mixed_dtype():
    n = 12
    core = SparseAttention(P.longformer(n, 2, [0]))
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((n, 2, 4)) for _ in range(3))     # (N, B, D) -> transposed views
    qt, kt, vt = (np.swapaxes(a, 0, 1) for a in (q, k, v))
    copies = [a.copy() for a in (q, k, v)]
    out = core(qt, kt.astype(np.float32), vt)       # mixed -> float64
    assert out.dtype == np.float64
    ref = ea.DenseAttention()(qt, kt.astype(np.float32).astype(np.float64), vt, mask=core.dense_mask(n))
    assert_attention_close(out, ref, np.float64)
    for a, c in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, c)


def test_gradcheck_sparse():
    n = 14
    for p in (P.bigbird(n, 2, 1, 1), P.random(n, 3, 0), [P.local(n, 1), P.strided(n, 3, causal=True)]):
        core = SparseAttention(p)
        shape = (2, n, 3) if not isinstance(p, list) else (2, 2, n, 3)
        q, k, v = _qkv(shape, n, 2)
        assert ea.gradcheck(core, (q, k, v)) < 1e-6


def test_unsorted_and_duplicate_csr_is_canonicalised():
    # row 0 -> keys [3, 1, 1]; row 2 -> [2, 0]: unsorted with a duplicate
    indptr = np.array([0, 3, 3, 5])
    indices = np.array([3, 1, 1, 2, 0])
    messy = sp.csr_array((np.ones(5, bool), indices, indptr), shape=(3, 4))
    clean = sp.csr_array(messy.toarray())
    q, k, v = _qkv((2, 3, 3), 4, 2)
    a, b = SparseAttention(messy), SparseAttention(clean)
    np.testing.assert_array_equal(a(q, k, v), b(q, k, v))
    assert messy.indices.tolist() == [3, 1, 1, 2, 0]      # the user's pattern is not modified


# --------------------------------------------------------------------------- bad input

def test_sparse_bad_input():
    n = 8
    q, k, v = _qkv((2, n, 3), n, 3)
    with pytest.raises(ValueError, match="pattern"):
        SparseAttention(P.local(n + 1, 1))(q, k, v)          # wrong shape for q, k
    with pytest.raises(TypeError, match="pattern"):
        SparseAttention(np.ones((n, n), bool))
    with pytest.raises(ValueError, match="pattern\\[1\\]"):
        SparseAttention([P.local(n, 1), P.local(n + 1, 1)])
    with pytest.raises(ValueError, match="heads"):
        SparseAttention([P.local(n, 1)] * 3)(q, k, v)          # axis -3 is 2, not 3
    with pytest.raises(ValueError, match="heads"):
        SparseAttention([P.local(n, 1)] * 3)(q[0], k[0], v[0])  # no head axis at all
    with pytest.raises(ValueError, match="pattern"):
        SparseAttention([])
    with pytest.raises(TypeError, match="scale"):
        SparseAttention(P.local(n, 1), scale="big")
    bad = P.local(n, 1)
    bad.indices[4] = n + 5                                     # out of range: rejected, nothing read
    with pytest.raises(ValueError, match="indices"):
        SparseAttention(bad)
    bad = P.local(n, 1)
    bad.indices[4] = -1
    with pytest.raises(ValueError, match="indices"):
        SparseAttention(bad)
    bad = P.local(n, 1)
    bad.indptr[3] = bad.indptr[5]                              # indptr not monotone
    with pytest.raises(ValueError, match="indptr"):
        SparseAttention(bad)
    bad = sp.csr_array((np.ones(2, bool), np.array([0, 1]), np.array([0, 1, 2, 2])), shape=(3, 3))
    bad.indptr[-1] = 9                                         # scipy checks this only at construction
    with pytest.raises(ValueError, match="indptr|indices"):   # indptr beyond indices
        SparseAttention(bad)
    core = SparseAttention(P.local(n, 1))
    out, cache = core.forward(q, k, v)
    with pytest.raises(ValueError, match="dout"):
        core.backward(cache, np.ones((2, n, 4)))
    with pytest.raises(TypeError, match="q"):
        core(q.astype(np.int64), k, v)
    with pytest.raises(ValueError, match="q"):
        core(np.where(np.eye(n, 3, dtype=bool), np.nan, q), k, v, check_finite=True)


# --------------------------------------------------------------------------- GlobalAttention

@FEW
@given(data=st.data(), dtype=st.sampled_from([np.float64, np.float32]))
def test_global_chosen_tokens_match_dense(data, dtype):
    n = data.draw(st.integers(1, 16))
    idx = data.draw(st.lists(st.integers(0, n - 1), max_size=4))
    core = GlobalAttention(indices=idx)
    q, k, v = _qkv((2, n, 3), n, 2, seed=data.draw(st.integers(0, 100)))
    mask = core.dense_mask(n)
    np.testing.assert_array_equal(mask, P.global_tokens(n, idx).toarray())
    _compare(core, q, k, v, mask, dtype)


def _extended(core, q, k, v):
    """Oracle inputs: the extra tokens prepended to the sequence (broadcast over the batch)."""
    e = core.n_extra
    cat = [np.concatenate([np.broadcast_to(core.params[name].astype(a.dtype), a.shape[:-2] + core.params[name].shape),
                           a], axis=-2)
           for name, a in (("extra_q", q), ("extra_k", k), ("extra_v", v))]
    return cat, core.extended_mask(q.shape[-2]), e


def _rows(oracle, rows):
    """An Oracle of the extended sequence restricted to the rows ``rows`` (axis -2) of every array."""
    return Oracle(*(tuple(a[..., rows, :] for a in part) for part in oracle))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("idx, n_extra", [((), 1), ((0, 5), 2), ((3,), 3)])
def test_global_extra_tokens_match_concatenated_oracle(dtype, idx, n_extra):
    n, d, dv = 9, 4, 3
    core = GlobalAttention(indices=idx, n_extra=n_extra, d=d, dv=dv, seed=4)
    assert core.dense_mask(n) is None
    q, k, v = _qkv((2, 3, n, d), n, dv, dtype)
    (qc, kc, vc), mask, e = _extended(core, q, k, v)
    dense = ea.DenseAttention()
    ref, dcache = dense.forward(*(a.astype(np.float64) for a in (qc, kc, vc)), mask=mask)
    out, cache = core.forward(q, k, v)
    oute, cachee = core.forward_extra(q, k, v)
    assert out.shape == (2, 3, n, dv) and oute.shape == (2, 3, n_extra, dv) and out.dtype == dtype
    lowp = dtype == np.float32     # the lowp rule: DenseAttention over the extended sequence in float32
    if lowp:
        oracle = dense_oracle(qc, kc, vc, mask=mask)
        assert_close_to_oracle((out,), _rows(oracle, slice(e, None)), dtype)
        assert_close_to_oracle((oute,), _rows(oracle, slice(None, e)), dtype)
    else:
        assert_attention_close(out, ref[..., e:, :], dtype)
        assert_attention_close(oute, ref[..., :e, :], dtype)
    # backward of the originals' outputs, and of the extras' outputs, vs the concatenated oracle
    rng = np.random.default_rng(2)

    def summed(full):                                                # an extra token's gradient: all batch axes
        return full[..., :e, :].reshape((-1, e, full.shape[-1])).sum(0)

    for which, fwd_cache, rows in (("orig", cache, slice(e, None)), ("extra", cachee, slice(None, e))):
        dout_full = np.zeros(ref.shape)
        dout_part = rng.standard_normal(ref[..., rows, :].shape)
        dout_full[..., rows, :] = dout_part
        g = (core.backward if which == "orig" else core.backward_extra)(fwd_cache, dout_part.astype(dtype))
        assert all(a.dtype == dtype for a in g[:3])
        if lowp:
            oracle = dense_oracle(qc, kc, vc, dout_full.astype(dtype), mask=mask)
            assert_close_to_oracle((out,) + tuple(g[:3]), _rows(oracle, slice(e, None)), dtype, err_msg=which)
            for i, name in ((1, "extra_q"), (2, "extra_k"), (3, "extra_v")):
                assert g.params[name].dtype == np.float64            # the parameter's own dtype
                assert_attention_close(g.params[name], summed(oracle.expected[i]), dtype,
                                       lowp=summed(oracle.lowp[i]), magnitude=summed(oracle.magnitude[i]),
                                       kind="grad", err_msg=f"{which} {name}")
        else:
            gref = dense.backward(dcache, dout_full)
            for a, b, name in ((g.dq, gref.dq[..., e:, :], "dq"), (g.dk, gref.dk[..., e:, :], "dk"),
                               (g.dv, gref.dv[..., e:, :], "dv")):
                assert_attention_close(a, b, dtype, kind="grad", err_msg=f"{which} {name}")
            for name, full in (("extra_q", gref.dq), ("extra_k", gref.dk), ("extra_v", gref.dv)):
                assert g.params[name].dtype == np.float64            # the parameter's own dtype
                assert_attention_close(g.params[name], summed(full), dtype, kind="grad", err_msg=f"{which} {name}")
        if which == "orig":
            assert not g.params["extra_q"].any()                     # originals do not use extra queries


class _ExtraOutputs(AttentionCore):
    """forward_extra / backward_extra as a core, so gradcheck checks extra_q too."""

    def __init__(self, core):
        self.core = core

    def forward(self, q, k, v):
        return self.core.forward_extra(q, k, v)

    def backward(self, cache, dout):
        return self.core.backward_extra(cache, dout)

    @property
    def params(self):
        return self.core.params


def test_gradcheck_global():
    n = 10
    q, k, v = _qkv((2, n, 4), n, 3)
    assert ea.gradcheck(GlobalAttention(indices=(1, 6)), (q, k, v)) < 1e-6
    core = GlobalAttention(indices=(2,), n_extra=2, d=4, dv=3, seed=1)
    errors = ea.gradcheck(core, (q, k, v), full=True)
    assert set(errors) >= {"q", "k", "v", "param.extra_k", "param.extra_v", "param.extra_q"}
    assert max(errors.values()) < 1e-6
    errors = ea.gradcheck(_ExtraOutputs(core), (q, k, v), full=True)
    assert "param.extra_q" in errors and max(errors.values()) < 1e-6


def test_global_no_tokens_and_all_tokens():
    n = 7
    q, k, v = _qkv((n, 3), n, 2)
    out = GlobalAttention()(q, k, v)                   # nobody global: no keys anywhere
    assert not out.any()
    assert_attention_close(GlobalAttention(indices=range(n))(q, k, v), ea.DenseAttention()(q, k, v), np.float64)


def test_global_bad_input():
    n = 6
    q, k, v = _qkv((n, 3), n, 2)
    with pytest.raises(ValueError, match="indices"):
        GlobalAttention(indices=(6,))(q, k, v)
    with pytest.raises(ValueError, match="indices"):
        GlobalAttention(indices=(-1,))
    with pytest.raises(TypeError, match="indices"):
        GlobalAttention(indices=(1.5,))
    with pytest.raises(ValueError, match="n_extra"):
        GlobalAttention(n_extra=-1)
    with pytest.raises(ValueError, match="d must be given"):
        GlobalAttention(n_extra=1)
    with pytest.raises(ValueError, match="n_extra"):
        GlobalAttention(indices=(0,)).forward_extra(q, k, v)
    with pytest.raises(ValueError, match="widths"):
        GlobalAttention(n_extra=1, d=5, dv=2)(q, k, v)
    with pytest.raises(ValueError, match="same N"):
        GlobalAttention(indices=(0,))(q, k[:4], v[:4])
    core = GlobalAttention(indices=(0,), n_extra=1, d=3, dv=2)
    out, cache = core.forward(q, k, v)
    with pytest.raises(ValueError, match="dout"):
        core.backward(cache, np.ones((n, 3)))


# --------------------------------------------------------------------------- kernels vs references

def _kernel_inputs(dtype, heads=1, n=9, m=7, seed=0):
    rng = np.random.default_rng(seed)
    pats = [P.random(n, 3, s, m=m) for s in range(heads)]
    pats[0] = P.union(pats[0], sp.csr_array((np.ones(1, bool), ([n - 1], [m - 1])), shape=(n, m)))
    keep = np.ones(n, bool)
    keep[2] = False                                          # an empty row
    pats[0] = P._canonical(sp.diags_array(keep, dtype=bool) @ pats[0])
    from efficient_attention.sparse import _index
    index = _index([ea.validate.check_csr(p, n, m) for p in pats])
    bh = 2 * heads
    q = rng.standard_normal((bh, n, 4)).astype(dtype)
    k = rng.standard_normal((bh, m, 4)).astype(dtype)
    v = rng.standard_normal((bh, m, 3)).astype(dtype)
    dout = rng.standard_normal((bh, n, 3)).astype(dtype)
    return q, k, v, dout, index


def _impls(kernel):
    return [kernel, getattr(kernel, "py_func", kernel)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_building_block_kernels_match_references(dtype):
    q, k, v, _, index = _kernel_inputs(dtype)
    ptr, ind = index.indptr[0], index.indices[:index.nnz[0]]
    tol = 1e-12 if dtype == np.float64 else 2e-5
    s_ref = K.sddmm_reference(q, k, ptr, ind, 0.7)
    p_ref, lse_ref = K.csr_softmax_reference(s_ref.astype(np.float64), ptr)
    o_ref = K.spmm_reference(p_ref, ptr, ind, v.astype(np.float64))
    assert np.isneginf(lse_ref[:, 2]).all()
    for sddmm, softmax, spmm in zip(_impls(K.sddmm), _impls(K.csr_softmax), _impls(K.spmm)):
        s = np.empty((q.shape[0], len(ind)), dtype)
        sddmm(q, k, ptr, ind, 0.7, s)
        np.testing.assert_allclose(s, s_ref, rtol=tol, atol=tol)
        p, lse = np.empty_like(s), np.empty((q.shape[0], q.shape[1]), dtype)
        softmax(s, ptr, p, lse)
        np.testing.assert_allclose(p, p_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(lse, lse_ref, rtol=tol, atol=tol)
        o = np.empty((q.shape[0], q.shape[1], v.shape[-1]), dtype)
        spmm(p, ptr, ind, v, o)
        np.testing.assert_allclose(o, o_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("heads", [1, 3])
def test_fused_kernels_match_references(dtype, heads):
    q, k, v, dout, index = _kernel_inputs(dtype, heads=heads)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    f64 = [a.astype(np.float64) for a in (q, k, v, dout)]
    out_ref, lse_ref = K.sparse_attention_forward_reference(*f64[:3], index.indptr, index.indices, 0.6)
    delta = np.einsum("bnd,bnd->bn", dout, out_ref.astype(dtype))
    dq_ref = K.sparse_attention_backward_dq_reference(*f64, lse_ref, delta, index.indptr, index.indices, 0.6)
    dk_ref, dv_ref = K.sparse_attention_backward_dkdv_reference(*f64, lse_ref, delta, index.indptr,
                                                                index.indices, 0.6)
    # the references agree with the dense oracle
    masks = np.stack([sp.csr_array((np.ones(nz, bool), index.indices[p[0]:p[-1]], p - p[0]),
                                   shape=(q.shape[1], k.shape[1])).toarray()
                      for p, nz in zip(index.indptr, index.nnz)])
    mask = masks[np.arange(q.shape[0]) % heads]
    ref, gref = _dense_fwd_bwd(*f64[:3], mask, f64[3], scale=0.6)
    np.testing.assert_allclose(out_ref, ref, atol=1e-12)
    for a, b in zip((dq_ref, dk_ref, dv_ref), gref[:3]):
        np.testing.assert_allclose(a, b, atol=1e-12)
    for fwd, bdq, bdkdv in zip(_impls(K.sparse_attention_forward), _impls(K.sparse_attention_backward_dq),
                               _impls(K.sparse_attention_backward_dkdv)):
        out, lse = np.empty(out_ref.shape, dtype), np.empty(lse_ref.shape, dtype)
        fwd(q, k, v, index.indptr, index.indices, 0.6, out, lse)
        np.testing.assert_allclose(out, out_ref, rtol=tol, atol=tol)
        np.testing.assert_allclose(lse, lse_ref, rtol=tol, atol=tol)
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        bdq(q, k, v, dout, lse, delta, index.indptr, index.indices, 0.6, dq)
        bdkdv(q, k, v, dout, lse, delta, index.tptr, index.tind, 0.6, dk, dv)
        for a, b in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
            np.testing.assert_allclose(a, b, rtol=10 * tol, atol=10 * tol)


def test_registry_variants_build_for_many_n():
    for name in ("sparse_random", "longformer", "longformer_dilated", "bigbird", "global", "global_cls"):
        var = ea.get_variant(name)
        assert var.chapter == 1
        for n in (16, 48, 1024):
            core = var.build(n=n, d=8, dv=8)
            if isinstance(core, SparseAttention):
                assert core.pattern.shape == (n, n)
                assert core.cost(n, 8).flops < 2 * n * n * 16 or n == 16
    assert ea.get_variant("global_cls").exact is False
    big = ea.get_variant("bigbird").build(n=4096, d=8).pattern     # blocks of 64
    per_row = np.diff(big.indptr)
    assert per_row[0] == 4096                                          # global block row
    assert per_row[64:].max() <= 64 * (3 + 1 + 3) and per_row[64:].min() >= 64 * 3


def test_global_cls_reference_matches_forward_and_main_uses_it():
    from efficient_attention import bench
    from efficient_attention.sparse import GlobalAttention
    core = GlobalAttention(indices=(0, 3), n_extra=2, d=4, dv=3, seed=1)
    rng = np.random.default_rng(7)
    q, k = rng.standard_normal((2, 2, 9, 4)), rng.standard_normal((2, 2, 9, 4))
    v, dout = rng.standard_normal((2, 2, 9, 3)), rng.standard_normal((2, 2, 9, 3))
    out, cache = core.forward(q, k, v)
    g = core.backward(cache, dout)
    ref = core.reference(q, k, v, dout)
    for a, b in zip((out, g.dq, g.dk, g.dv), ref):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    row = bench.bench_core(GlobalAttention(indices=(0,), n_extra=1, d=8, dv=8, seed=0), 32, 8, repeat=1)
    assert row["oracle"] == "reference" and row["err out"] < 1e-5 and row["err grad"] < 1e-5
