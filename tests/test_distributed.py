"""DistributedAttention: every sharding equals the single-process core (forward and backward),
the graphs are lazy, and on a 2-worker LocalCluster the work is spread and no task holds more
than a few shards."""
import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster, futures_of, get_task_stream

import efficient_attention as ea
from efficient_attention.distributed import DistributedAttention, PairwiseSoftmax, register_pairwise
from efficient_attention.testing import assert_attention_close

D, DV = 4, 3
UNEVEN = (7, 7, 9, 3, 7, 7, 10)          # N = 50: uneven shards, N not a multiple of the chunk


def _arrays(n=50, lead=(2, 3), dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(lead + (n, D)).astype(dtype), rng.standard_normal(lead + (n, D)).astype(dtype),
            rng.standard_normal(lead + (n, DV)).astype(dtype), rng.standard_normal(lead + (n, DV)).astype(dtype))


def _dask(x, lead_chunks, seq_chunks):
    return da.from_array(x, chunks=tuple(lead_chunks) + (seq_chunks, x.shape[-1]))


def _run(core, lead_chunks=(1, (1, 2)), seq_chunks=UNEVEN, dtype=np.float64, n=50, lead=(2, 3), k_none=False,
         scheduler=None):
    """Distributed and single-process forward + backward on the same arrays."""
    q, k, v, dout = _arrays(n, lead, dtype)
    k = None if k_none else k
    ref_out, cache = core.forward(q, k, v, check_finite=False)
    ref = core.backward(cache, dout)
    dist = DistributedAttention(core)
    qd, kd, vd = (None if x is None else _dask(x, lead_chunks, seq_chunks) for x in (q, k, v))
    out, dcache = dist.forward(qd, kd, vd)
    grads = dist.backward(dcache, _dask(dout, lead_chunks, seq_chunks))
    assert out.chunks == qd.chunks[:-1] + ((DV,),)
    assert grads.dq.chunks == qd.chunks and grads.dv.chunks == vd.chunks
    assert k_none or grads.dk.chunks == kd.chunks
    got_out, got = dask.compute(out, grads, scheduler=scheduler)
    return dcache.sharding, (got_out, got), (ref_out, ref)


def _assert_equal(got, ref, rtol=1e-10, atol=1e-12):
    (out, g), (ref_out, r) = got, ref
    np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=atol)
    for name in ("dq", "dk", "dv"):
        a, b = getattr(g, name), getattr(r, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)
    assert set(g.params) == set(r.params)
    for name in r.params:
        np.testing.assert_allclose(g.params[name], r.params[name], rtol=rtol, atol=atol, err_msg=name)


def _omega(m=6):
    return ea.PerformerFeatureMap.draw(D, m, seed=0)


SEQUENCE_CASES = {
    # halos: a window narrower and one wider than a shard (10 > 7 rows), strided reaches 3·4
    "local": (ea.LocalAttention(window=3), "halo"),
    "local_wide": (ea.LocalAttention(window=10), "halo"),
    "local_causal_wide": (ea.LocalAttention(window=10, causal=True), "halo"),
    "strided": (ea.StridedAttention(stride=3, window=4), "halo"),
    "strided_causal": (ea.StridedAttention(stride=2, window=3, causal=True, scale=0.4), "halo"),
    # pairwise merge by log-sum-exp
    "dense": (ea.DenseAttention(), "pairwise"),
    "dense_causal": (ea.DenseAttention(causal=True, scale=0.8), "pairwise"),
    # linear attention: one global sum, or the scan of states
    "linear_elu": (ea.LinearAttention(ea.EluFeatureMap()), "sum"),
    "linear_elu_causal": (ea.LinearAttention(ea.EluFeatureMap(), causal=True), "scan"),
    "performer": (ea.LinearAttention(ea.PerformerFeatureMap(_omega())), "sum"),
    "performer_causal": (ea.LinearAttention(ea.PerformerFeatureMap(_omega()), causal=True), "scan"),
    "rfa_causal": (ea.LinearAttention(ea.RandomFourierFeatureMap(_omega()), causal=True), "scan"),
    "linear_causal_chunked": (ea.LinearAttention(ea.EluFeatureMap(), causal=True, method="chunked"), "scan"),
    "linear_causal_numpy": (ea.LinearAttention(ea.EluFeatureMap(), causal=True, method="numpy"), "scan"),
}


@pytest.mark.parametrize("case", sorted(SEQUENCE_CASES))
def test_sequence_sharding_equals_single_process(case):
    core, expected = SEQUENCE_CASES[case]
    sharding, got, ref = _run(core)
    assert sharding == expected
    _assert_equal(got, ref)


@pytest.mark.parametrize("case", ["local_causal_wide", "dense_causal", "linear_elu_causal", "performer"])
def test_sequence_sharding_float32(case):
    core, _ = SEQUENCE_CASES[case]
    sharding, (out, g), (ref_out, r) = _run(core, dtype=np.float32, lead_chunks=((1, 1), 3))
    assert out.dtype == np.float32 and g.dq.dtype == np.float32
    assert_attention_close(out, ref_out, np.float32)
    for a, b in zip(g[:3], r[:3]):
        assert_attention_close(a, b, np.float32, kind="grad")


def test_sequence_sharding_without_batch_axes_and_one_shard_per_position_group():
    """(N, D) inputs (no leading axis) and shards of a single row."""
    for core in (ea.DenseAttention(causal=True), ea.LocalAttention(window=2),
                 ea.LinearAttention(ea.EluFeatureMap(), causal=True)):
        _, got, ref = _run(core, lead_chunks=(), lead=(), n=9, seq_chunks=(1, 4, 1, 3))
        _assert_equal(got, ref)


@pytest.mark.parametrize("name", sorted(ea.registry("core")))
def test_every_registered_core_shards_along_leading_axes(name):
    core = ea.get_variant(name).build(n=32, d=D, dv=DV, seed=0)
    sharding, got, ref = _run(core, n=32, seq_chunks=(32,), k_none=getattr(core, "shared_qk", False))
    assert sharding == "leading"
    _assert_equal(got, ref)


def test_per_head_patterns_follow_their_heads_across_head_chunks():
    pats = [ea.patterns.local(32, w) for w in (1, 2, 5)]
    _, got, ref = _run(ea.SparseAttention(pats), n=32, seq_chunks=(32,), lead_chunks=(1, (2, 1)))
    _assert_equal(got, ref)


def test_mixed_dtypes_promote_and_default_scheduler_threads():
    q, k, v, dout = _arrays(16, (2,))
    dist = DistributedAttention(ea.LocalAttention(window=2))
    out, cache = dist.forward(_dask(q.astype(np.float32), (1,), 4), _dask(k, (1,), 4), _dask(v, (1,), 4))
    assert out.dtype == np.float64
    got = out.compute(scheduler="threads")
    np.testing.assert_allclose(got, ea.LocalAttention(window=2)(q.astype(np.float32).astype(np.float64), k, v),
                               rtol=1e-12)


@pytest.fixture
def own_rules(monkeypatch):
    """Rules registered by a test are gone after it."""
    import efficient_attention.distributed as dist_module
    monkeypatch.setattr(dist_module, "_PAIRWISE", dict(dist_module._PAIRWISE))


def test_pairwise_path_takes_a_registered_rule(own_rules):
    """A core that brings its own pair rule (here: dense attention with a banded mask, rows
    past the band skipped) is sequence-sharded by the pairwise merge."""
    class BandedDense(ea.DenseAttention):
        pass

    class BandPairs(PairwiseSoftmax):
        def needed(self, rows, cols):
            return cols.start <= rows.stop - 1 + 5 and rows.start <= cols.stop - 1 + 5

        def mask(self, rows, cols):
            return np.abs(np.arange(rows.start, rows.stop)[:, None] - np.arange(cols.start, cols.stop)[None, :]) <= 5

    register_pairwise(BandedDense, BandPairs)
    sharding, (out, g), _ = _run(BandedDense())
    ref_core = ea.LocalAttention(window=5)
    q, k, v, dout = _arrays()
    ref_out, cache = ref_core.forward(q, k, v)
    ref = ref_core.backward(cache, dout)
    assert sharding == "pairwise"
    _assert_equal((out, g), (ref_out, ref))
    with pytest.raises(TypeError, match="PairwiseSoftmax subclass"):
        register_pairwise(BandedDense, object)


def test_fully_masked_rows_through_the_pairwise_merge(own_rules):
    """Rows with no allowed key in some pairs, and in all of them: zeros, zero gradient, no NaN."""
    class Holes(ea.DenseAttention):
        pass

    class HolePairs(PairwiseSoftmax):
        def mask(self, rows, cols):
            r = np.arange(rows.start, rows.stop)[:, None]
            c = np.arange(cols.start, cols.stop)[None, :]
            return ((r + c) % 3 == 0) & (r % 5 != 0)                 # rows 0, 5, 10, ... see nothing

    register_pairwise(Holes, HolePairs)
    q, k, v, dout = _arrays(20, (2,))
    mask = HolePairs(None).mask(range(20), range(20))
    ref_out, cache = ea.DenseAttention().forward(q, k, v, mask=mask)
    ref = ea.DenseAttention().backward(cache, dout)
    dist = DistributedAttention(Holes())
    out, dc = dist.forward(*(_dask(x, (1,), (6, 6, 8)) for x in (q, k, v)))
    g = dist.backward(dc, _dask(dout, (1,), (6, 6, 8)))
    got = dask.compute(out, g)
    assert np.all(got[0][:, ::5] == 0) and np.all(np.isfinite(got[1].dq))
    _assert_equal(got, (ref_out, ref))


def test_feature_underflow_is_an_error_not_a_wrong_answer():
    """The sharded path uses exact FAVOR+ features: where a query's features all underflow it
    says so instead of giving that query the output 0 (the core, with its stabiliser, still
    works there)."""
    q, k, v, _ = _arrays(20, (1,), dtype=np.float32)
    core = ea.LinearAttention(ea.PerformerFeatureMap(_omega()), causal=True)
    big = 60 * q
    assert np.isfinite(core(big, k, v)).all()
    out, _ = DistributedAttention(core).forward(*(_dask(x, (1,), 5) for x in (big, k, v)))
    with pytest.raises(ValueError, match="feature_map underflowed on q"):
        out.compute()


def test_graphs_are_lazy():
    """Building forward and backward computes nothing (a scheduler that fails if called)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the library computed something while building the graph")

    q, k, v, dout = _arrays()
    for core, _ in SEQUENCE_CASES.values():
        with dask.config.set(scheduler=refuse):
            dist = DistributedAttention(core)
            out, cache = dist.forward(*(_dask(x, (1, 3), UNEVEN) for x in (q, k, v)))
            grads = dist.backward(cache, _dask(dout, (1, 3), UNEVEN))
        assert all(isinstance(x, da.Array) for x in (out, *grads[:3]))


def test_check_finite_raises_at_compute_naming_the_index():
    q, k, v, dout = _arrays(20, (2,))
    k = k.copy()
    k[1, 13, 2] = np.nan
    dist = DistributedAttention(ea.DenseAttention())
    out, cache = dist.forward(*(_dask(x, (1,), 5) for x in (q, k, v)))         # builds: no error yet
    with pytest.raises(ValueError, match=r"k must contain only finite values .*NaN at index \(1, 13, 2\)"):
        out.compute()
    out, cache = dist.forward(*(_dask(x, (1,), 5) for x in (q, k, v)), check_finite=False)
    assert np.isnan(out[1].compute()).all() and np.isfinite(out[0].compute()).all()
    d = dout.copy()
    d[0, 3, 0] = np.inf
    out, cache = dist.forward(*(_dask(x, (1,), 5) for x in _arrays(20, (2,))[:3]))
    with pytest.raises(ValueError, match=r"dout must contain only finite values .*Inf at index \(0, 3, 0\)"):
        dist.backward(cache, _dask(d, (1,), 5)).dq.compute()


def test_bad_inputs_raise_clear_errors():
    q, k, v, dout = _arrays(20, (2,))
    dist = DistributedAttention(ea.DenseAttention(causal=True))
    qd, kd, vd = (_dask(x, (1,), 5) for x in (q, k, v))
    with pytest.raises(ValueError, match=r"k must have the chunks of q along the sequence axis"):
        dist.forward(qd, _dask(k, (1,), (10, 10)), _dask(v, (1,), (10, 10)))
    with pytest.raises(ValueError, match=r"k must have the chunks of q along the sequence axis"):
        dist.forward(_dask(q, (1,), 20), kd, vd)
    with pytest.raises(ValueError, match="v must have the chunks of k along the key axis"):
        dist.forward(qd, kd, _dask(v, (1,), (10, 10)))
    with pytest.raises(ValueError, match="along the leading"):
        dist.forward(qd, _dask(k, (2,), 5), _dask(v, (2,), 5))
    with pytest.raises(ValueError, match="one chunk along its last"):
        dist.forward(da.from_array(q, chunks=(1, 5, 2)), kd, vd)
    with pytest.raises(TypeError, match="q must be a dask array"):
        dist.forward(q, kd, vd)
    with pytest.raises(TypeError, match="v must be a float32 or float64"):
        dist.forward(qd, kd, vd.astype(np.int64))
    with pytest.raises(ValueError, match="must share the feature width"):
        dist.forward(qd, _dask(k[..., :2], (1,), 5), vd)
    with pytest.raises(TypeError, match="core must be an attention core"):
        DistributedAttention(ea.MultiHeadAttention.init(n=8, d=4, seed=0))
    for core, match in ((ea.LSHAttention(n_buckets=2, shared_qk=False), "LSHAttention cannot be sharded along "
                         "the sequence axis .* DenseAttention, LinearAttention, LocalAttention, StridedAttention"),
                        (ea.EfficientAttention(), "EfficientAttention cannot be sharded along the sequence"),
                        (ea.StridedAttention(stride=2), "StridedAttention without a window"),
                        (ea.LocalAttention(window=15), "would hold the whole sequence")):
        with pytest.raises(ValueError, match=match):
            DistributedAttention(core).forward(qd, kd, vd)
    out, cache = dist.forward(qd, kd, vd)
    with pytest.raises(ValueError, match="dout must have the chunks of the forward output"):
        dist.backward(cache, _dask(dout, (2,), 5))
    with pytest.raises(ValueError, match="dout must have the shape"):
        dist.backward(cache, _dask(dout[:, :10], (1,), 5))
    with pytest.raises(TypeError, match="dout must be a dask array"):
        dist.backward(cache, dout)
    with pytest.raises(TypeError, match="cache must be the cache returned by DistributedAttention"):
        dist.backward(ea.DenseAttention().forward(q, k, v)[1], _dask(dout, (1,), 5))


# ------------------------------------------------------------------------------------ a real cluster
@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as c:
        yield c


CLUSTER_CASES = ["local", "dense_causal", "linear_elu_causal"]


@pytest.mark.parametrize("case", CLUSTER_CASES)
def test_cluster_spreads_the_work_and_no_task_holds_a_whole_input(client, case):
    core, _ = SEQUENCE_CASES[case]
    n, shard = 256, 16                                             # 16 shards along N per head block
    q, k, v, dout = _arrays(n, (1, 2), seed=1)
    dist = DistributedAttention(core)
    qd, kd, vd, dd = (_dask(x, (1, 2), shard) for x in (q, k, v, dout))
    with get_task_stream(client) as building:
        out, cache = dist.forward(qd, kd, vd)
        grads = dist.backward(cache, dd)
    assert building.data == []                                     # building the graph ran no task
    with get_task_stream(client) as ts:                            # persist: the blocks stay on the
        kept = client.persist([out, *grads[:3]])                   # workers (no gathering task)
        client.gather(futures_of(kept))
    got = client.compute(kept, sync=True)
    ref_out, ref_cache = core.forward(q, k, v)
    _assert_equal((got[0], ea.Grads(*got[1:], {})), (ref_out, core.backward(ref_cache, dout)))
    workers = {t["worker"] for t in ts.data}
    assert len(workers) == 2, workers                              # the work ran on both workers
    shard = sum(x.blocks[0, 0, 0].nbytes for x in (qd, kd, vd))    # one shard of q, k and v together
    largest = max(t["nbytes"] for t in ts.data)
    assert largest <= 3 * shard < q.nbytes, (largest, shard, q.nbytes)


def test_cluster_leading_axes_and_parameter_gradients(client):
    core = ea.get_variant("linformer").build(n=32, d=D, dv=DV, seed=0)
    q, k, v, dout = _arrays(32, (4, 2))
    dist = DistributedAttention(core)
    out, cache = dist.forward(*(_dask(x, (1, 2), 32) for x in (q, k, v)))
    grads = dist.backward(cache, _dask(dout, (1, 2), 32))
    with get_task_stream(client) as ts:
        got = client.compute([out, grads], sync=True)
    ref_out, ref_cache = core.forward(q, k, v)
    _assert_equal(got, (ref_out, core.backward(ref_cache, dout)))
    assert len({t["worker"] for t in ts.data}) == 2


def test_block_sparse_mask_mod_per_batch_and_head_follows_its_blocks():
    """A mask_mod that reads (b, h) sees the global batch and head indices in every block."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (np.abs(q_idx - kv_idx) <= 1 + 2 * h + 3 * b) | (kv_idx == 0)
    core = ea.BlockSparseAttention(mask_mod, causal=True)
    _, got, ref = _run(core, n=32, seq_chunks=(32,), lead_chunks=(1, (1, 2)))
    _assert_equal(got, ref)


def test_block_sparse_per_head_block_mask_refuses_a_head_split():
    mask = ea.BlockMask.from_pattern([ea.patterns.local(32, w) for w in (1, 2, 5)])
    core = ea.BlockSparseAttention(mask)
    q, k, v, _ = _arrays(32, (2, 3))
    with pytest.raises(ValueError, match="one chunk"):
        DistributedAttention(core).forward(*(_dask(x, (1, (1, 2)), (32,)) for x in (q, k, v)))
    _, got, ref = _run(core, n=32, seq_chunks=(32,), lead_chunks=(1, 3))      # heads in one chunk: fine
    _assert_equal(got, ref)
