"""The block-sparse engine: BlockMask against the dense mask, BlockSparseAttention against
DenseAttention, the numba kernels against their NumPy references, thread-count independence."""
import numba
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention import blocksparse as B
from efficient_attention import patterns as P
from efficient_attention.blocksparse import BlockMask, BlockSparseAttention
from efficient_attention.kernels import blocksparse as K
from efficient_attention.testing import assert_attention_close

FEW = settings(max_examples=25, deadline=None)


@pytest.fixture(params=["thin pairs split off", "tiles only"])
def pair_cost(request, monkeypatch):
    """Run a test with the thin blocks computed pair by pair (the default) and as tiles."""
    if request.param == "tiles only":
        monkeypatch.setattr(ea.config, "ENGINE_PAIR_COST", float("inf"))
    return request.param


def _causal(n, m):
    return np.arange(m)[None, :] <= np.arange(n)[:, None]


def _tile_truth(dense, bq, bk):
    """(any, all-in-range) of every tile of a dense (G, N, M) mask, computed independently."""
    g, n, m = dense.shape
    nqb, nkb = -(-n // bq), -(-m // bk)
    anyt = np.zeros((g, nqb, nkb), bool)
    allt = np.zeros((g, nqb, nkb), bool)
    for i in range(nqb):
        for j in range(nkb):
            t = dense[:, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            anyt[:, i, j] = t.any(axis=(1, 2))
            allt[:, i, j] = t.all(axis=(1, 2))
    return anyt, allt


def _check_layout(bm, dense):
    """The layout of ``bm`` lists exactly the tiles with an allowed entry of ``dense``, full exactly
    where every in-range entry is allowed, partial tiles equal to the dense tile."""
    dense = dense.reshape((-1,) + dense.shape[-2:])
    bq, bk = bm.block_size
    anyt, allt = _tile_truth(dense, bq, bk)
    g_count, nqb, nkb = anyt.shape
    assert bm._indptr.shape == (g_count * nqb + 1,)
    got_any = np.zeros_like(anyt)
    got_full = np.zeros_like(anyt)
    for r in range(g_count * nqb):
        cols = bm._cols[bm._indptr[r]:bm._indptr[r + 1]]
        assert np.all(np.diff(cols) > 0)                            # sorted, unique
        for e in range(bm._indptr[r], bm._indptr[r + 1]):
            g, i, j = r // nqb, r % nqb, bm._cols[e]
            got_any[g, i, j] = True
            got_full[g, i, j] = bm._tile[e] < 0
            if bm._tile[e] >= 0:
                t = dense[g, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                tile = bm._tiles[bm._tile[e]]
                np.testing.assert_array_equal(tile[:t.shape[0], :t.shape[1]], t)
                assert not tile[t.shape[0]:].any() and not tile[:, t.shape[1]:].any()
    np.testing.assert_array_equal(got_any, anyt)
    np.testing.assert_array_equal(got_full, allt & anyt)
    assert len({t.tobytes() for t in bm._tiles}) == bm._tiles.shape[0]     # distinct tiles stored once


# --------------------------------------------------------------------------- BlockMask

@FEW
@given(data=st.data())
def test_layout_matches_dense_mask(data):
    n, m = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    bq, bk = data.draw(st.integers(1, 17)), data.draw(st.integers(1, 17))
    lead = data.draw(st.sampled_from([(), (2,), (2, 3)]))
    p = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    seed = data.draw(st.integers(0, 2**31))
    dense = np.random.default_rng(seed).random(lead + (n, m)) < p
    bm = BlockMask.from_dense(dense, (bq, bk))
    assert bm.shape == dense.shape and bm.block_size == (bq, bk)
    _check_layout(bm, dense)
    np.testing.assert_array_equal(bm.to_dense(), dense)
    assert bm.nnz == dense.sum()
    if lead == ():
        pat = sp.csr_array(dense)
        bp = BlockMask.from_pattern(pat, (bq, bk))
        for a in ("_indptr", "_cols", "_tile", "_tiles"):
            np.testing.assert_array_equal(getattr(bp, a), getattr(bm, a))
        assert (bm.to_pattern() != pat).nnz == 0
        mm = BlockMask.from_mask_mod(lambda b, h, qi, ki: dense[qi, ki], n, m, block_size=(bq, bk))
        np.testing.assert_array_equal(mm.to_dense(), dense)


@pytest.mark.parametrize("n", [1, 7, 64, 100])
@pytest.mark.parametrize("block_size", [1, 8, (16, 4), 128])
def test_every_builder(n, block_size):
    for name, pat in P.examples(n).items():
        bm = BlockMask.from_pattern(pat, block_size)
        np.testing.assert_array_equal(bm.to_dense(), pat.toarray(), err_msg=name)
        _check_layout(bm, pat.toarray())


def test_per_head_list_and_to_pattern():
    pats = [P.local(50, 3), P.strided(50, 5), P.global_tokens(50, [0, 7]), P.random(50, 4, 1)]
    bm = BlockMask.from_pattern(pats, 8)
    assert bm.shape == (4, 50, 50)
    dense = np.stack([p.toarray() for p in pats])
    np.testing.assert_array_equal(bm.to_dense(), dense)
    _check_layout(bm, dense)
    back = bm.to_pattern()
    assert len(back) == 4 and all((a != b).nnz == 0 for a, b in zip(back, pats))
    per_batch = BlockMask.from_dense(np.stack([dense[:2], dense[2:]]), 8).to_pattern()
    assert len(per_batch) == 2 and (per_batch[1][0] != pats[2]).nnz == 0


def test_density_of_a_window():
    bm = BlockMask.from_mask_mod(lambda b, h, q, kv: abs(q - kv) <= 64, 4096)
    assert bm.density < 0.15
    assert BlockMask.from_pattern(P.local(4096, 64)).density < 0.15
    np.testing.assert_array_equal(bm._indptr, BlockMask.from_pattern(P.local(4096, 64))._indptr)
    assert BlockMask.full(300, 200, 64).density == 1.0


def test_mask_mod_never_forms_the_full_matrix(monkeypatch):
    monkeypatch.setattr(ea.config, "ENGINE_BUILD_SCALARS", 1 << 14)
    shapes = []

    def window(b, h, q_idx, kv_idx):
        shapes.append(np.broadcast_shapes(np.shape(q_idx), np.shape(kv_idx)))
        return np.abs(q_idx - kv_idx) <= 8
    n = 2048
    bm = BlockMask.from_mask_mod(window, n, block_size=16)
    assert max(a * b for a, b in shapes) <= 1 << 15 and len(shapes) > 1
    np.testing.assert_array_equal(bm._indptr, BlockMask.from_pattern(P.local(n, 8), 16)._indptr)


def _document(b, h, q_idx, kv_idx, docs=np.repeat(np.arange(5), [7, 20, 1, 12, 10])):
    return docs[q_idx] == docs[kv_idx]


def _prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) | (kv_idx < 10)


def _window_per_head(b, h, q_idx, kv_idx):
    return np.abs(q_idx - kv_idx) <= 2 + 3 * h


def _per_batch_doc(b, h, q_idx, kv_idx):
    return (q_idx // (7 + 5 * b)) == (kv_idx // (7 + 5 * b))


def _dense_of(mask_mod, n, m, batch=None, heads=None):
    b = np.arange(batch).reshape(-1, 1, 1, 1) if batch else 0
    h = np.arange(heads).reshape(-1, 1, 1) if heads else 0
    lead = ((batch,) if batch else ()) + ((heads or 1,) if heads or batch else ())   # batch: (B, H)
    return np.broadcast_to(mask_mod(b, h, np.arange(n)[:, None], np.arange(m)[None, :]), lead + (n, m))


@pytest.mark.parametrize("mask_mod, batch, heads", [(_document, None, None), (_prefix_lm, None, 3),
                                                    (_window_per_head, None, 3), (_per_batch_doc, 2, None),
                                                    (_window_per_head, 2, 3)])
def test_mask_mod_shapes(mask_mod, batch, heads):
    bm = BlockMask.from_mask_mod(mask_mod, 50, batch=batch, heads=heads, block_size=(8, 16))
    dense = _dense_of(mask_mod, 50, 50, batch, heads)
    assert bm.shape == dense.shape
    np.testing.assert_array_equal(bm.to_dense(), dense)
    _check_layout(bm, dense)


def test_and_or():
    n = 70
    a = BlockMask.from_pattern(P.local(n, 5), 8)
    b = BlockMask.from_pattern(P.random(n, 6, 3), 8)
    c = BlockMask.causal(n, block_size=8)
    heads = BlockMask.from_mask_mod(_window_per_head, n, heads=3, block_size=8)
    for x, y in [(a, b), (a, c), (b, c), (c, c), (a, heads), (heads, b)]:
        for op in ("&", "|"):
            got = (x & y) if op == "&" else (x | y)
            want = (x.to_dense() & y.to_dense()) if op == "&" else (x.to_dense() | y.to_dense())
            np.testing.assert_array_equal(got.to_dense(), want)
            _check_layout(got, want)
    empty = a & BlockMask.from_pattern(sp.csr_array((n, n), dtype=bool), 8)
    assert empty.n_blocks == 0 and not empty.to_dense().any()


def test_causal_and_full_constructors():
    for n, m, bs in [(1, 1, 4), (9, 30, 4), (30, 9, (4, 7)), (128, 128, 128)]:
        np.testing.assert_array_equal(BlockMask.causal(n, m, bs).to_dense(), _causal(n, m))
        np.testing.assert_array_equal(BlockMask.full(n, m, bs).to_dense(), np.ones((n, m), bool))
        _check_layout(BlockMask.causal(n, m, bs), _causal(n, m))


def test_bad_masks():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockMask.from_pattern(P.local(10, 1), 0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockMask.from_mask_mod(_prefix_lm, 10, block_size=(4, -1))
    with pytest.raises(TypeError, match="block_size"):
        BlockMask.full(10, block_size=2.5)
    with pytest.raises(TypeError, match="boolean"):
        BlockMask.from_mask_mod(lambda b, h, q, kv: q - kv, 10)
    with pytest.raises(ValueError, match="broadcasts to"):
        BlockMask.from_mask_mod(lambda b, h, q, kv: np.ones((3, 3), bool), 10)
    with pytest.raises(ValueError, match="broadcasts to"):
        BlockMask.from_mask_mod(lambda b, h, q, kv: np.stack([q >= kv, q < kv]), 10)   # a head axis
    with pytest.raises(TypeError, match="callable"):
        BlockMask.from_mask_mod("window", 10)
    with pytest.raises(TypeError, match="scipy.sparse"):
        BlockMask.from_pattern(np.ones((4, 4), bool))
    with pytest.raises(TypeError, match="boolean"):
        BlockMask.from_dense(np.ones((4, 4)))
    with pytest.raises(ValueError, match="same \\(N, M\\)"):
        BlockMask.full(10, block_size=4) & BlockMask.full(11, block_size=4)
    with pytest.raises(ValueError, match="broadcast"):
        BlockMask.from_mask_mod(_window_per_head, 10, heads=3) | BlockMask.from_mask_mod(_window_per_head, 10,
                                                                                          heads=2)


def test_bad_pattern_indices_are_caught():
    bad = sp.csr_array((np.ones(2, bool), np.array([0, 9]), np.array([0, 1, 2])), shape=(2, 4))
    with pytest.raises(ValueError, match="indices"):
        BlockMask.from_pattern(bad)
    unsorted = sp.csr_array((np.ones(3, bool), np.array([2, 0, 1]), np.array([0, 3, 3])), shape=(2, 4))
    np.testing.assert_array_equal(BlockMask.from_pattern(unsorted, 2).to_dense(), unsorted.toarray())


# --------------------------------------------------------------------------- the engine against the oracle

def _qkv(lead, n, m, d=6, dv=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(lead + (n, d)), rng.standard_normal(lead + (m, d)),
            rng.standard_normal(lead + (m, dv)))


def _compare(core, q, k, v, mask, causal=False, dtype=np.float64, seed=1):
    """core vs DenseAttention with the dense mask: forward and backward (oracle in float64)."""
    qd, kd, vd = (a.astype(dtype) for a in (q, k, v))
    out, cache = core.forward(qd, kd, vd)
    assert out.dtype == dtype
    dout = np.random.default_rng(seed).standard_normal(out.shape)
    g = core.backward(cache, dout.astype(dtype))
    dense = ea.DenseAttention(causal=causal, scale=core.scale)
    ref, rc = dense.forward(*(a.astype(np.float64) for a in (qd, kd, vd)), mask=mask)
    rg = dense.backward(rc, dout)
    row = max(1, k.shape[-2])
    assert_attention_close(out, ref, dtype, row_length=row)
    for name, a, b in zip("qkv", g[:3], rg[:3]):
        assert a.dtype == dtype
        assert_attention_close(a, b, dtype, row_length=row, kind="grad", err_msg=f"d{name}")
    return out, g


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n, m", [(1, 1), (1, 9), (9, 1), (37, 37), (64, 40), (40, 100), (130, 130)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_and_causal(dtype, n, m, causal):
    q, k, v = _qkv((2,), n, m)
    core = BlockSparseAttention(BlockMask.full(n, m, (16, 8)), causal=causal)
    _compare(core, q, k, v, None, causal, dtype)
    _compare(BlockSparseAttention(causal=causal), q, k, v, None, causal, dtype)     # default tiles


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("block_size", [4, (16, 8), (5, 11)])
def test_random_csr_with_empty_rows(dtype, block_size, pair_cost):
    n, m = 61, 45
    pat = P.random(n, 6, 2, m=m)
    keep = np.zeros(n, bool)
    keep[::3] = True
    pat = sp.csr_array(sp.diags_array(keep, dtype=bool) @ pat)
    q, k, v = _qkv((2, 3), n, m)
    out, g = _compare(BlockSparseAttention(BlockMask.from_pattern(pat, block_size)), q, k, v, pat.toarray(),
                      dtype=dtype)
    assert not out[..., ~keep, :].any() and not g.dq[..., ~keep, :].any()      # zero output and gradient
    _compare(BlockSparseAttention(pat), q, k, v, pat.toarray(), dtype=dtype)


@pytest.mark.parametrize("name", sorted(P.examples(8)))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_builder_against_oracle(name, dtype, pair_cost):
    pat = P.examples(48)[name]
    q, k, v = _qkv((2,), 48, 48, seed=3)
    for bs in (8, (16, 4)):
        _compare(BlockSparseAttention(BlockMask.from_pattern(pat, bs)), q, k, v, pat.toarray(), dtype=dtype)
        _compare(BlockSparseAttention(BlockMask.from_pattern(pat, bs), causal=True), q, k, v,
                 pat.toarray(), causal=True, dtype=dtype)


@pytest.mark.parametrize("mask_mod, batch, heads", [(_document, None, None), (_prefix_lm, None, 3),
                                                    (_window_per_head, None, 3), (_per_batch_doc, 2, None),
                                                    (_window_per_head, 2, 3)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_mask_mods_against_oracle(mask_mod, batch, heads, dtype, pair_cost):
    n = 50
    q, k, v = _qkv((2, 3), n, n, seed=4)
    dense = _dense_of(mask_mod, n, n, batch, heads)
    bm = BlockMask.from_mask_mod(mask_mod, n, batch=batch, heads=heads, block_size=(8, 16))
    _compare(BlockSparseAttention(bm), q, k, v, dense, dtype=dtype)
    # a callable: evaluated for the inputs' heads (axis -3) and batch (axis -4)
    core = BlockSparseAttention(mask_mod)
    full = _dense_of(mask_mod, n, n, 2, 3)
    _compare(core, q, k, v, full, dtype=dtype)
    ref = core.reference(q, k, v, np.ones(q.shape[:-1] + (v.shape[-1],)))
    assert_attention_close(core(q, k, v), ref[0], np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_and_or_masks_against_oracle(dtype, pair_cost):
    n = 70
    a = BlockMask.from_pattern(P.local(n, 5), 8)
    b = BlockMask.from_mask_mod(_window_per_head, n, heads=3, block_size=8)
    c = BlockMask.from_mask_mod(lambda bb, h, qi, ki: (qi // 20) == (ki // 20), n, block_size=8)
    q, k, v = _qkv((3,), n, n, seed=5)
    for mask in (a & b, a | c, (a | b) & c):
        _compare(BlockSparseAttention(mask), q, k, v, mask.to_dense(), dtype=dtype)


def test_per_head_pattern_list_and_broadcasting(pair_cost):
    pats = [P.local(40, 3), P.strided(40, 5), P.global_tokens(40, [0, 7])]
    dense = np.stack([p.toarray() for p in pats])
    q, k, v = _qkv((2, 3), 40, 40, seed=6)
    _compare(BlockSparseAttention(pats), q, k, v, dense)
    with pytest.raises(ValueError, match="broadcast to the leading axes"):
        BlockSparseAttention(pats)(q[:, :2], k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="broadcast to the leading axes"):
        BlockSparseAttention(pats)(q[0, 0], k[0, 0], v[0, 0])


def test_fully_masked_rows_no_nan_no_warning(pair_cost):
    n = 33
    mask = np.zeros((n, n), bool)
    mask[5:, :3] = True
    q, k, v = _qkv((2,), n, n, seed=7)
    for dtype, big in ((np.float64, 300.0), (np.float32, 3.0)):    # large logits (float32: moderate,
        core = BlockSparseAttention(BlockMask.from_dense(mask, 8))  # its cancellation exceeds a fixed atol)
        out, g = _compare(core, q * big, k, v, mask, dtype=dtype)
        assert np.all(out[:, :5] == 0) and np.all(g.dq[:, :5] == 0)
        assert np.all(g.dk[:, 3:] == 0) and np.all(g.dv[:, 3:] == 0)
    empty = BlockSparseAttention(BlockMask.from_dense(np.zeros((n, n), bool), 8))
    out, cache = empty.forward(q, k, v)
    assert not out.any() and np.all(np.isneginf(cache.lse))
    g = empty.backward(cache, np.ones_like(out))
    assert not g.dq.any() and not g.dk.any() and not g.dv.any()


def test_gradcheck(pair_cost):
    q, k, v = _qkv((2,), 21, 17, d=4, dv=3, seed=8)
    pat = P.random(21, 4, 0, m=17)
    for core in (BlockSparseAttention(BlockMask.from_pattern(pat, (4, 8))),
                 BlockSparseAttention(BlockMask.from_pattern(pat, 4), causal=True, scale=0.7),
                 BlockSparseAttention(causal=True)):
        assert ea.gradcheck(core, (q, k, v)) < 1e-6


def test_attention_one_call():
    q, k, v = _qkv((2, 3), 45, 45, seed=9)
    pat = P.longformer(45, 4, [0])
    ref = ea.DenseAttention()(q, k, v, mask=pat.toarray())
    assert_attention_close(ea.attention(q, k, v, mask=pat), ref, np.float64)
    assert_attention_close(ea.attention(q, k, v, mask=BlockMask.from_pattern(pat, 8)), ref, np.float64)
    assert_attention_close(ea.attention(q, k, v, mask=lambda b, h, qi, ki: pat.toarray()[qi, ki]), ref,
                           np.float64)
    assert_attention_close(ea.attention(q, k, v, causal=True, scale=0.3),
                           ea.DenseAttention(causal=True, scale=0.3)(q, k, v), np.float64)


def test_bad_inputs():
    q, k, v = _qkv((2,), 20, 20)
    with pytest.raises(ValueError, match="\\(N, M\\)"):
        BlockSparseAttention(P.local(21, 2))(q, k, v)
    with pytest.raises(TypeError, match="mask must be"):
        BlockSparseAttention(np.ones((20, 20), bool))
    with pytest.raises(TypeError, match="boolean"):
        BlockSparseAttention(lambda b, h, qi, ki: qi - ki)(q, k, v)
    with pytest.raises(ValueError, match="finite"):
        BlockSparseAttention()(np.where(q > 1, np.nan, q), k, v)
    core = BlockSparseAttention()
    out, cache = core.forward(q, k, v)
    with pytest.raises(ValueError, match="dout"):
        core.backward(cache, np.ones((2, 20, 4)))
    with pytest.raises(ValueError, match="finite"):
        core.backward(cache, np.full(out.shape, np.inf))
    assert core.backward(cache, np.full(out.shape, np.inf), check_finite=False).dq.shape == q.shape


def test_memory_is_linear_in_n():
    """Forward + backward at N = 4096 (one head) holds far less than an N × N float32 matrix."""
    from efficient_attention.bench import traced_peak
    n = 4096
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, n, 64)).astype(np.float32) for _ in range(4))
    core = BlockSparseAttention(causal=True)

    def run():
        out, cache = core.forward(q, k, v)
        core.backward(cache, dout)
    run()
    assert traced_peak(run) < n * n * 4 / 8                                  # 8 MB against 64 MB


# --------------------------------------------------------------------------- kernels against references

def _layout_args(bm, lead):
    slice_of = B._slice_map(bm.shape[:-2], lead)
    return slice_of, bm._indptr, bm._cols, bm._tile, bm._tiles, bm._boxes()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("block_size", [(8, 8), (16, 4), (5, 13)])
def test_kernels_match_numpy_references(dtype, block_size):
    n, m = 45, 38
    pat = P.random(n, 7, 1, m=m)
    bm = BlockMask.from_pattern(pat, block_size) | BlockMask.from_mask_mod(
        lambda b, h, qi, ki: ki <= qi - 20 * h, n, m, heads=2, block_size=block_size)
    q, k, v = (a.astype(dtype).reshape((-1,) + a.shape[-2:]) for a in _qkv((3, 2), n, m, seed=10))
    slice_of, indptr, cols, tile, tiles, boxes = _layout_args(bm, (3, 2))
    bq, bk = block_size
    kt, vt = K.pack_transposed_reference(k, bk), K.pack_transposed_reference(v, bk)
    out = np.empty(q.shape[:2] + (v.shape[2],), dtype)
    lse = np.empty(q.shape[:2], dtype)
    K.blocksparse_forward(q, k, v, kt, 0.4, slice_of, indptr, cols, tile, tiles, boxes, bq, bk, out, lse)
    ref_out, ref_lse = K.blocksparse_forward_reference(q, k, v, 0.4, slice_of, indptr, cols, tile, tiles, bq, bk)
    assert_attention_close(out, ref_out, dtype)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    assert_attention_close(lse[fin], ref_lse[fin], dtype)
    dout = np.random.default_rng(2).standard_normal(out.shape).astype(dtype)
    delta = np.einsum("bnd,bnd->bn", dout, out)
    refs = K.blocksparse_backward_reference(q, k, v, dout, lse, delta, 0.4, slice_of, indptr, cols, tile, tiles,
                                            bq, bk)
    fused = (np.empty_like(q), np.zeros_like(k), np.zeros_like(v))
    K.blocksparse_backward(q, k, kt, vt, dout, lse, delta, 0.4, slice_of, indptr, cols, tile, tiles, boxes,
                           bq, bk, *fused)
    split = (np.empty_like(q), np.zeros_like(k), np.zeros_like(v))
    tindptr, trows, ttile = bm._transposed_layout()
    K.blocksparse_backward_dq(q, k, kt, vt, dout, lse, delta, 0.4, slice_of, indptr, cols, tile, tiles, boxes,
                              bq, bk, split[0])
    K.blocksparse_backward_dkdv(q, k, kt, vt, dout, lse, delta, 0.4, slice_of, tindptr, trows, ttile, tiles, boxes,
                                bq, bk, split[1], split[2])
    for a, b, c in zip(fused, split, refs):
        assert_attention_close(a, c, dtype, kind="grad")
        np.testing.assert_array_equal(a, b)                               # the two schemes: same bits


def test_kernels_python_path_matches_compiled():
    """The kernels' plain-Python form (what NUMBA_DISABLE_JIT=1 runs) computes the same."""
    n, m = 20, 17
    bm = BlockMask.from_pattern(P.random(n, 5, 0, m=m), (8, 4))
    q, k, v = (a.reshape((-1,) + a.shape[-2:]) for a in _qkv((2,), n, m, seed=11))
    slice_of, indptr, cols, tile, tiles, boxes = _layout_args(bm, (2,))
    kt, vt = K.pack_transposed_reference(k, 4), K.pack_transposed_reference(v, 4)
    outs = []
    for f in (K.blocksparse_forward, K.blocksparse_forward.py_func):
        out, lse = np.empty(q.shape[:2] + (v.shape[2],)), np.empty(q.shape[:2])
        f(q, k, v, kt, 0.5, slice_of, indptr, cols, tile, tiles, boxes, 8, 4, out, lse)
        outs.append((out, lse))
    assert_attention_close(outs[1][0], outs[0][0], np.float64)
    dout = np.ones_like(outs[0][0])
    delta = np.einsum("bnd,bnd->bn", dout, outs[0][0])
    grads = []
    for f in (K.blocksparse_backward, K.blocksparse_backward.py_func):
        g = (np.empty_like(q), np.zeros_like(k), np.zeros_like(v))
        f(q, k, kt, vt, dout, outs[0][1], delta, 0.5, slice_of, indptr, cols, tile, tiles, boxes, 8, 4, *g)
        grads.append(g)
    for a, b in zip(*grads):
        assert_attention_close(b, a, np.float64, kind="grad")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pack_transposed_matches_reference(dtype):
    """The key tiles, transposed, with zeros past the last key (M not a multiple of the tile)."""
    x = np.random.default_rng(3).standard_normal((3, 37, 5)).astype(dtype)
    for b in (1, 8, 37, 40):
        want = K.pack_transposed_reference(x, b)
        for f in (K.pack_transposed, K.pack_transposed.py_func):
            got = np.full(want.shape, np.nan, dtype)
            f(x, b, got)
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(K.pack_transposed_reference(x, 8)[1, 2, :, 3], x[1, 19])


def test_build_kernels_match_references():
    pat = P.union(P.random(77, 9, 4), P.local(77, 3))
    indptr, indices = pat.indptr.astype(np.int64), pat.indices.astype(np.int64)
    for bq, bk in [(8, 8), (5, 16), (77, 1)]:
        r0, r1 = bq, min(77, 5 * bq)
        shape = (-(-(r1 - r0) // bq), -(-77 // bk))
        counts = np.zeros(shape, np.int64)
        K.csr_tile_counts(indptr, indices, r0, r1, bq, bk, counts)
        np.testing.assert_array_equal(counts, K.csr_tile_counts_reference(indptr, indices, r0, r1, bq, bk, shape))
        pid = np.where(counts % 2 == 1, 1, -1) * np.arange(counts.size).reshape(shape)
        pid = np.where(pid > 0, np.cumsum(pid > 0).reshape(shape) - 1, -1)
        tiles = np.zeros((int((pid >= 0).sum()), bq, bk), bool)
        K.csr_fill_tiles(indptr, indices, r0, r1, bq, bk, pid, tiles)
        np.testing.assert_array_equal(tiles, K.csr_fill_tiles_reference(indptr, indices, r0, r1, bq, bk, pid,
                                                                        tiles.shape[0]))
        strip = pat.toarray()[None, r0:r1]
        counts = np.zeros((1,) + shape, np.int64)
        K.dense_tile_counts(strip, bq, bk, counts)
        np.testing.assert_array_equal(counts, K.dense_tile_counts_reference(strip, bq, bk))
    for idx, ok in [([0, 2, 5], True), ([5, 0, 2], False), ([0, 5, 2], True), ([2, 2, 0], False), ([0, 2, 60], False)]:
        ptr = np.array([0, 2, 3])
        arr = np.array(idx)
        assert K.csr_is_canonical(ptr, arr, 60) == ok == K.csr_is_canonical_reference(ptr, arr, 60)


# --------------------------------------------------------------------------- threads

@pytest.mark.parametrize("heads", [1, 2, 8])
def test_same_bits_with_one_and_two_threads(heads, pair_cost):
    n = 300
    mask = BlockMask.from_pattern(P.longformer(n, 20, [0, 5]), (32, 64))
    rng = np.random.default_rng(12)
    q, k, v, dout = (rng.standard_normal((heads, n, 16)).astype(np.float32) for _ in range(4))
    results = []
    before = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            core = BlockSparseAttention(mask, causal=True)
            out, cache = core.forward(q, k, v)
            g = core.backward(cache, dout)
            results.append((out, cache.lse, g.dq, g.dk, g.dv))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_coarsened_layout_equals_direct_build():
    pats = dict(P.examples(100))
    pats["bigbird16"] = P.bigbird(256, 16, 2, 1)
    for name, pat in pats.items():
        for fine in [(8, 8), (5, 7)]:
            bm = BlockMask.from_pattern(pat, fine)
            for fq, fk in [(1, 2), (2, 2), (3, 1)]:
                coarse = bm._coarsen(fq, fk)
                direct = BlockMask.from_pattern(pat, (fine[0] * fq, fine[1] * fk))
                for a in ("_indptr", "_cols", "_tile", "_tiles"):
                    np.testing.assert_array_equal(getattr(coarse, a), getattr(direct, a), err_msg=name)
                blk = direct._blocks()
                whole = B._valid_counts(*pat.shape, *direct.block_size, blk.i, blk.j).sum()
                assert bm._coarse_pairs(fq, fk) == whole
                assert direct.computed_pairs() <= whole                  # partial tiles on their boxes


def test_default_tiles_are_chosen_per_mask():
    assert BlockMask.full(1024).block_size == (128, 128)
    assert BlockMask.causal(1024).block_size == (128, 128)
    assert BlockMask.from_pattern(P.local(4096, 256)).block_size == (128, 128)
    assert BlockMask.from_pattern(P.bigbird(4096, 64, 3, 2)).block_size == (64, 64)     # no wasted entry
    np.testing.assert_array_equal(BlockMask.from_pattern(P.longformer(500, 30, [0, 250])).to_dense(),
                                  P.longformer(500, 30, [0, 250]).toarray())


def test_partial_tiles_are_computed_on_their_bounding_boxes():
    """A global token's column is a box one key wide: computed as a tile (not pair by pair), the
    engine's work is the box, and the result equals the dense oracle."""
    n = 512
    pat = P.longformer(n, 32, [0, 1])
    bm = BlockMask.from_pattern(pat, (64, 64))
    boxes = bm._boxes()
    for t in range(bm._tiles.shape[0]):                        # each box holds its tile's True entries
        a0, a1, c0, c1 = boxes[t]
        inside = np.zeros(bm._tiles.shape[1:], bool)
        inside[a0:a1, c0:c1] = True
        assert not (bm._tiles[t] & ~inside).any()
        assert bm._tiles[t, a0, c0:c1].any() and bm._tiles[t, a1 - 1, c0:c1].any()      # and is tight
        assert bm._tiles[t, a0:a1, c0].any() and bm._tiles[t, a0:a1, c1 - 1].any()
    blk = bm._blocks()
    away = np.abs(blk.i - blk.j) > 1                            # only global rows or columns there
    assert away.sum() == 2 * (n // 64 - 2)
    np.testing.assert_array_equal(bm._box_area()[away], bm._block_nnz()[away])      # 2 x 64: no waste
    tiles, thin = bm._split_thin()
    thin_blocks = set(zip(thin._blocks().i.tolist(), thin._blocks().j.tolist()))
    assert thin_blocks <= {(0, 1), (1, 0)}                       # where a global row meets the window
    q, k, v = _qkv((2,), n, n, seed=3)
    dout = np.random.default_rng(4).standard_normal(v.shape)
    out, cache = BlockSparseAttention(bm).forward(q, k, v)
    g = BlockSparseAttention(bm).backward(cache, dout)
    ref_out, ref_cache = ea.DenseAttention().forward(q, k, v, mask=pat.toarray())
    ref = ea.DenseAttention().backward(ref_cache, dout)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=1e-10)
    for a, b in zip(g[:3], ref[:3]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def test_thin_blocks_go_pair_by_pair():
    n = 600
    pat = (P.local(n, 40) + P.random(n, 2, 5)).astype(bool)     # a window and 2 random keys per row
    core = BlockSparseAttention(BlockMask.from_pattern(pat, 64))
    mask, tiles, pairs = core.plan(n)
    assert pairs is not None and tiles.n_blocks < mask.n_blocks
    thin = pairs[0][0, -1]                                        # pairs split off
    assert 0 < thin <= 2 * n
    np.testing.assert_array_equal(tiles.to_dense() | sp.csr_array((np.ones(pairs[1].size, bool), pairs[1],
                                                                   pairs[0][0]), shape=(n, n)).toarray(),
                                  pat.toarray())
    assert not (tiles.to_dense() & sp.csr_array((np.ones(pairs[1].size, bool), pairs[1], pairs[0][0]),
                                                shape=(n, n)).toarray()).any()     # disjoint parts
    assert core.plan(n) is core.plan(n)                           # kept


# --------------------------------------------------------------------------- wiring

def test_sparse_attention_picks_the_engine_when_tiles_are_dense():
    n = 256
    for pat, engine in [(P.longformer(n, 40, [0]), True), (P.bigbird(n, 64, 1, 1), True),
                        (P.local(n, 20, causal=True), True), (P.random(n, 8, 0), False)]:
        core = ea.SparseAttention(pat)
        assert core.engine == engine
        q, k, v = _qkv((2,), n, n, seed=13)
        _compare(core, q, k, v, pat.toarray())
    per_head = ea.SparseAttention([P.local(n, 20), P.bigbird(n, 32, 1, 1)])
    assert per_head.engine
    q, k, v = _qkv((3, 2), n, n, seed=14)
    _compare(per_head, q, k, v, np.stack([P.local(n, 20).toarray(), P.bigbird(n, 32, 1, 1).toarray()]))
    with ea.config.override(ENGINE_MIN_TILED=2.0):                 # never: the row-CSR kernels
        assert not ea.SparseAttention(P.longformer(n, 40, [0])).engine


def test_multihead_pattern_heads_run_as_one_engine_call():
    n, d = 64, 16
    cores = [ea.SparseAttention(P.random(n, 5, h)) for h in range(3)] + [ea.LocalAttention(3),
                                                                         ea.SparseAttention(P.local(n, 4))]
    layer = ea.MultiHeadAttention.init(n=n, d=d, seed=0, heads=5, dk=4, cores=cores)
    assert layer.pattern_group is not None and layer.pattern_group[0] == (0, 1, 2, 4)
    loop = ea.MultiHeadAttention(cores, layer.w_q, layer.w_k, layer.w_v, layer.w_o)
    loop.pattern_group = None                                       # one call per head
    x = np.random.default_rng(15).standard_normal((2, n, d))
    y, cache = layer.forward(x)
    y_loop, cache_loop = loop.forward(x)
    assert_attention_close(y, y_loop, np.float64)
    dy = np.random.default_rng(16).standard_normal(y.shape)
    g, g_loop = layer.backward(cache, dy), loop.backward(cache_loop, dy)
    assert_attention_close(g.dx, g_loop.dx, np.float64, kind="grad")
    for name in g.params:
        assert_attention_close(g.params[name], g_loop.params[name], np.float64, kind="grad", err_msg=name)
    assert ea.gradcheck(layer, (x[:1],)) < 1e-6
    assert ea.MultiHeadAttention.init(n=n, d=d, seed=0, heads=2, dk=4,
                                      cores=[ea.SparseAttention(P.local(n, 4)),
                                             ea.SparseAttention(P.local(n, 4), scale=0.3)]).pattern_group is None
