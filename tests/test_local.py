"""Local and strided (banded) attention against the dense oracle with independently built masks."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import efficient_attention as ea
from efficient_attention import bench
from efficient_attention.dense import DenseAttention
from efficient_attention.gradcheck import gradcheck
from efficient_attention.local import LocalAttention, StridedAttention
from efficient_attention.testing import assert_attention_close, assert_close_to_oracle, dense_oracle, float_arrays


# --- masks from the definition, written out independently of the library ---------------------

def local_rule(n, window, causal=False):
    return np.array([[(0 <= i - j <= window) if causal else (abs(i - j) <= window)
                      for j in range(n)] for i in range(n)], dtype=bool)


def strided_rule(n, stride, window=None, causal=False):
    return np.array([[(i - j) % stride == 0
                      and (window is None or abs(i - j) <= window * stride)
                      and (not causal or j <= i)
                      for j in range(n)] for i in range(n)], dtype=bool)


def _arrays(shape_lead, n, d, dv, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(shape_lead + (n, d))
    k = rng.standard_normal(shape_lead + (n, d))
    v = rng.standard_normal(shape_lead + (n, dv))
    g = rng.standard_normal(shape_lead + (n, dv))
    return tuple(a.astype(dtype) for a in (q, k, v, g))


def _oracle(q, k, v, g, mask, scale=None):
    """Float64 dense attention with the mask: output and (dq, dk, dv)."""
    dense = DenseAttention(scale=scale)
    out, cache = dense.forward(*(a.astype(np.float64) for a in (q, k, v)), mask=mask)
    grads = dense.backward(cache, g.astype(np.float64))
    return out, grads[:3]


def _check_against_oracle(core, mask, shape_lead, n, d=5, dv=3, dtype=np.float64, seed=0):
    q, k, v, g = _arrays(shape_lead, n, d, dv, dtype, seed)
    out, cache = core.forward(q, k, v)
    grads = core.backward(cache, g)
    assert out.dtype == dtype and all(a.dtype == dtype for a in grads[:3])
    row = max(1, int(mask.sum(axis=1).max()))
    if dtype == np.float32:     # the lowp rule: DenseAttention's own float32 result and the rounding scale
        assert_close_to_oracle((out,) + tuple(grads[:3]), dense_oracle(q, k, v, g, mask=mask, scale=core.scale),
                               dtype, row_length=row)
    else:
        ref, ref_grads = _oracle(q, k, v, g, mask, core.scale)
        assert_attention_close(out, ref, dtype, row_length=row)
        for a, b, name in zip(grads[:3], ref_grads, ("dq", "dk", "dv")):
            assert_attention_close(a, b, dtype, row_length=row, err_msg=name)
    assert grads.params == {}


LOCAL_CASES = [(n, w, c) for n in (1, 7, 33, 130, 300) for w in (0, 1, 5, 64) for c in (False, True)]
STRIDED_CASES = [(n, r, w, c) for n in (1, 9, 40, 257) for r in (1, 2, 3, 7)
                 for w in (None, 0, 1, 6) for c in (False, True)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,window,causal", LOCAL_CASES)
def test_local_equals_masked_dense(n, window, causal, dtype):
    core = LocalAttention(window, causal=causal)
    _check_against_oracle(core, local_rule(n, window, causal), (2, 3), n, dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n,stride,window,causal", STRIDED_CASES)
def test_strided_equals_masked_dense(n, stride, window, causal, dtype):
    core = StridedAttention(stride, window=window, causal=causal)
    _check_against_oracle(core, strided_rule(n, stride, window, causal), (2, 2), n, dtype=dtype)


@pytest.mark.parametrize("causal", [False, True])
def test_online_softmax_path_with_small_blocks(causal):
    """Key ranges longer than key_block go through the online (chunked) softmax and the
    two-pass backward; small blocks force it on small inputs."""
    for core, mask in ((LocalAttention(23, causal=causal), local_rule(97, 23, causal)),
                       (StridedAttention(2, causal=causal), strided_rule(97, 2, None, causal))):
        core.query_block, core.key_block = 8, 7
        _check_against_oracle(core, mask, (3,), 97, d=4, dv=6, seed=1)
        _check_against_oracle(core, mask, (3,), 97, d=4, dv=6, dtype=np.float32, seed=1)


@pytest.mark.parametrize("query_block", [1, 3, 16, 1000])
def test_block_sizes_do_not_change_the_result(query_block):
    n, w = 75, 9
    ref_core = LocalAttention(w)
    core = LocalAttention(w)
    core.query_block = query_block
    q, k, v, g = _arrays((2,), n, 4, 4, np.float64)
    out, cache = core.forward(q, k, v)
    ref, ref_cache = ref_core.forward(q, k, v)
    assert_attention_close(out, ref, np.float64)
    for a, b in zip(core.backward(cache, g)[:3], ref_core.backward(ref_cache, g)[:3]):
        assert_attention_close(a, b, np.float64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 16, 45])
def test_window_covering_everything_equals_dense(n, causal):
    q, k, v, g = _arrays((2,), n, 4, 4, np.float64, seed=3)
    dense = DenseAttention(causal=causal)
    ref, ref_cache = dense.forward(q, k, v)
    ref_grads = dense.backward(ref_cache, g)
    for core in (LocalAttention(n - 1 if n > 1 else 0, causal=causal), LocalAttention(n + 100, causal=causal),
                 StridedAttention(1, causal=causal), StridedAttention(1, window=n, causal=causal)):
        out, cache = core.forward(q, k, v)
        assert_attention_close(out, ref, np.float64)
        for a, b in zip(core.backward(cache, g)[:3], ref_grads[:3]):
            assert_attention_close(a, b, np.float64)


@pytest.mark.parametrize("core", [LocalAttention(0), LocalAttention(0, causal=True),
                                  StridedAttention(3, window=0), StridedAttention(50)])
def test_only_itself_outputs_v(core):
    """Window 0 (or a stride beyond N): every query sees only its own key, so out = v,
    dv = dout and dq = dk = 0."""
    q, k, v, g = _arrays((2,), 20, 4, 3, np.float64, seed=4)
    out, cache = core.forward(q, k, v)
    np.testing.assert_allclose(out, v, rtol=1e-14, atol=0)
    grads = core.backward(cache, g)
    np.testing.assert_allclose(grads.dv, g, rtol=1e-14, atol=0)
    np.testing.assert_allclose(grads.dq, 0, atol=1e-14)
    np.testing.assert_allclose(grads.dk, 0, atol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 2, 11])
def test_stride_one_is_local(window, causal):
    q, k, v, g = _arrays((3,), 50, 6, 2, np.float64, seed=5)
    strided, local = StridedAttention(1, window=window, causal=causal), LocalAttention(window, causal=causal)
    a, ca = strided.forward(q, k, v)
    b, cb = local.forward(q, k, v)
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)
    for x, y in zip(strided.backward(ca, g)[:3], local.backward(cb, g)[:3]):
        np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-14)


def test_strided_is_local_on_each_residue_class():
    n, r, w = 40, 3, 2
    q, k, v, _ = _arrays((2,), n, 4, 4, np.float64, seed=6)
    out = StridedAttention(r, window=w)(q, k, v)
    for c in range(r):
        sub = LocalAttention(w)(q[:, c::r], k[:, c::r], v[:, c::r])
        np.testing.assert_allclose(out[:, c::r], sub, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("core", [LocalAttention(3), LocalAttention(4, causal=True, scale=0.7),
                                  StridedAttention(2), StridedAttention(3, window=1, causal=True)])
def test_gradcheck(core):
    q, k, v, _ = _arrays((2,), 19, 4, 3, np.float64, seed=7)
    assert gradcheck(core, (q, k, v)) < 1e-7
    core2 = type(core)(**core.options())
    core2.query_block, core2.key_block = 4, 5          # the chunked online-softmax path too
    assert gradcheck(core2, (q, k, v)) < 1e-7


def test_scale_and_batch_axes_and_layout():
    n = 30
    core = LocalAttention(4, scale=0.3)
    rng = np.random.default_rng(8)
    q = rng.standard_normal((n, 2, 3, 5)).transpose(1, 2, 0, 3)        # non-contiguous (2, 3, N, D)
    k = rng.standard_normal((2, 3, n, 5))
    v = rng.standard_normal((2, 3, 5, n)).swapaxes(-1, -2)               # (2, 3, N, 5), transposed
    copies = [a.copy() for a in (q, k, v)]
    out = core(q, k, v)
    ref = DenseAttention(scale=0.3)(q, k, v, mask=local_rule(n, 4))
    assert_attention_close(out, ref, np.float64)
    for a, b in zip((q, k, v), copies):
        np.testing.assert_array_equal(a, b)
    # the batch entries are independent
    assert_attention_close(out[1, 2], core(q[1, 2], k[1, 2], v[1, 2]), np.float64)


def test_mixed_dtypes_promote_and_float32_stays_float32():
    q, k, v, g = _arrays((), 12, 3, 3, np.float32)
    core = LocalAttention(2)
    assert core(q, k, v).dtype == np.float32
    out, cache = core.forward(q, k.astype(np.float64), v)
    assert out.dtype == np.float64
    assert core.backward(cache, g).dq.dtype == np.float64


@pytest.mark.parametrize("n", [16, 33, 100])
@pytest.mark.parametrize("d,dv", [(8, 8), (5, 3)])
def test_cost_counts_the_band_exactly(n, d, dv):
    cases = [(LocalAttention(w, causal=c), local_rule(n, w, c))
             for w in (0, 3, 10, 200) for c in (False, True)]
    cases += [(StridedAttention(r, w, causal=c), strided_rule(n, r, w, c))
              for r in (1, 4, 5) for w in (None, 0, 2) for c in (False, True)]
    for core, mask in cases:
        nnz = int(mask.sum())
        assert core.cost(n, d, dv).flops == 2 * nnz * (d + dv), core
        assert core.cost(n, d, dv, backward=True).flops == 2 * nnz * (3 * d + 2 * dv), core
        np.testing.assert_array_equal(core.dense_mask(n, n), mask)


def test_memory_is_linear_in_n():
    """No N x N and no N x window array: the traced peak of forward + backward stays far below
    one N x window float64 array (and grows linearly)."""
    d, window = 4, 64
    peaks = {}
    for n in (1 << 14, 1 << 16):
        q, k, v, g = _arrays((), n, d, d, np.float64)
        core = LocalAttention(window)

        def run():
            out, cache = core.forward(q, k, v)
            core.backward(cache, g)
        peaks[n] = bench.traced_peak(run)
    n = 1 << 16
    band_bytes = n * (2 * window + 1) * 8
    assert peaks[n] < band_bytes / 4, (peaks, band_bytes)
    assert peaks[n] < 4.5 * peaks[1 << 14], peaks


def _fwd_bwd_peaks(core, sizes, d=4, dv=4):
    """Traced peak bytes of forward + backward at each N of ``sizes`` (inputs allocated outside)."""
    core(*_arrays((), 64, d, dv, np.float64)[:3])                  # compile outside the trace
    peaks = {}
    for n in sizes:
        q, k, v, g = _arrays((), n, d, dv, np.float64)

        def run():
            out, cache = core.forward(q, k, v)
            core.backward(cache, g)
        peaks[n] = bench.traced_peak(run)
    return peaks


@pytest.mark.parametrize("causal", [False, True])
def test_strided_memory_is_linear_in_n(causal):
    """O(N·d): from N to 8N the peak of forward + backward grows < 12x (about 8x measured;
    an N x N/stride intermediate, which is what the unwindowed reach is, would give ~64x), and
    with a window it stays below an N x (2·window + 1) float64 band (no N x window array)."""
    n0, n1 = 1 << 11, 1 << 14
    window = 128
    peaks = _fwd_bwd_peaks(StridedAttention(4, window=window, causal=causal), (n0, n1))
    band_bytes = n1 * (2 * window + 1) * 8
    assert peaks[n1] < band_bytes / 4, (peaks, band_bytes)
    assert peaks[n1] < 12 * peaks[n0], peaks
    n0, n1 = 1 << 10, 1 << 13                                        # no window: reach N/stride
    peaks = _fwd_bwd_peaks(StridedAttention(8, causal=causal), (n0, n1))
    assert peaks[n1] < 12 * peaks[n0], peaks
    assert peaks[n1] < n1 * (n1 // 8) * 8 / 4, peaks                 # far below one N x N/stride array


# --- hypothesis -------------------------------------------------------------------------------

@settings(max_examples=25)
@given(data=st.data(), n=st.integers(1, 40), window=st.integers(0, 45), causal=st.booleans(),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_local_property(data, n, window, causal, dtype):
    d = data.draw(st.integers(1, 4))
    q = data.draw(float_arrays((2, n, d), dtype))
    k = data.draw(float_arrays((2, n, d), dtype))
    v = data.draw(float_arrays((2, n, 2), dtype))
    core = LocalAttention(window, causal=causal)
    core.query_block = data.draw(st.sampled_from([1, 4, 128]))
    core.key_block = data.draw(st.sampled_from([3, 2048]))
    mask = local_rule(n, window, causal)
    out, cache = core.forward(q, k, v)
    g = np.ones_like(out)
    grads = core.backward(cache, g)[:3]
    if dtype == np.float32:
        assert_close_to_oracle((out,) + tuple(grads), dense_oracle(q, k, v, g, mask=mask), dtype, row_length=n)
        return
    ref, ref_grads = _oracle(q, k, v, g, mask)
    assert_attention_close(out, ref, dtype, row_length=n)
    for a, b in zip(grads, ref_grads):
        assert_attention_close(a, b, dtype, row_length=n, kind="grad")


@settings(max_examples=25)
@given(data=st.data(), n=st.integers(1, 40), stride=st.integers(1, 9),
       window=st.one_of(st.none(), st.integers(0, 12)), causal=st.booleans())
def test_strided_property(data, n, stride, window, causal):
    q = data.draw(float_arrays((n, 3)))
    k = data.draw(float_arrays((n, 3)))
    v = data.draw(float_arrays((n, 2)))
    core = StridedAttention(stride, window=window, causal=causal)
    mask = strided_rule(n, stride, window, causal)
    out, cache = core.forward(q, k, v)
    g = np.ones_like(out)
    ref, ref_grads = _oracle(q, k, v, g, mask)
    assert_attention_close(out, ref, np.float64)
    for a, b in zip(core.backward(cache, g)[:3], ref_grads):
        assert_attention_close(a, b, np.float64, kind="grad")


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("make,exc,words", [
    (lambda: LocalAttention(-1), ValueError, "window"),
    (lambda: LocalAttention(2.5), TypeError, "window"),
    (lambda: LocalAttention("3"), TypeError, "window"),
    (lambda: LocalAttention(True), TypeError, "window"),
    (lambda: LocalAttention(2, causal=1), TypeError, "causal"),
    (lambda: LocalAttention(2, scale=float("nan")), ValueError, "scale"),
    (lambda: StridedAttention(0), ValueError, "stride"),
    (lambda: StridedAttention(-2), ValueError, "stride"),
    (lambda: StridedAttention(2.0), TypeError, "stride"),
    (lambda: StridedAttention(2, window=-1), ValueError, "window"),
    (lambda: StridedAttention(2, window=1.5), TypeError, "window"),
])
def test_bad_arguments(make, exc, words):
    with pytest.raises(exc, match=words):
        make()


@pytest.mark.parametrize("core", [LocalAttention(2), StridedAttention(2, 1)])
def test_bad_arrays(core):
    q, k, v, g = _arrays((2,), 10, 3, 3, np.float64)
    with pytest.raises(ValueError, match="N == M"):
        core.forward(q, k[:, :7], v[:, :7])
    with pytest.raises(ValueError, match=r"N == M"):
        core.cost(10, 3, 3, m=7)
    with pytest.raises(TypeError, match="q"):
        core.forward(q.astype(np.int64), k, v)
    with pytest.raises(ValueError, match="leading"):
        core.forward(q, k[:1], v[:1])
    bad = q.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="q"):
        core.forward(bad, k, v, check_finite=True)
    out, cache = core.forward(q, k, v)
    with pytest.raises(ValueError, match="dout"):
        core.backward(cache, g[:, :5])


@pytest.mark.parametrize("core", [LocalAttention(5), LocalAttention(700, causal=True),
                                  StridedAttention(3, 2)])
def test_threads_do_not_change_the_result(core):
    """Work items (batch groups, residue classes, query segments) own their output rows, and
    dk/dv segments that share rows run in different waves: any thread count gives the same bits."""
    q, k, v, g = _arrays((2,), 3000, 4, 3, np.float64, seed=9)
    results = []
    for threads in (1, 2, 3):
        core.threads = threads
        out, cache = core.forward(q, k, v)
        results.append((out,) + tuple(core.backward(cache, g)[:3]))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)
    mask = core.dense_mask(3000)
    ref = DenseAttention()(q[:1], k[:1], v[:1], mask=mask)
    assert_attention_close(results[0][0][:1], ref, np.float64)


@pytest.mark.parametrize("core", [LocalAttention(9), LocalAttention(30, causal=True),
                                  StridedAttention(3, 4), StridedAttention(2, causal=True)])
def test_float32_row_kernels_match_the_numpy_lines(core, monkeypatch):
    """float32 blocks run their elementwise work in numba (kernels/band.py); the NumPy lines
    beside them (ROW_KERNELS = False) give the same result to float32 rounding."""
    q, k, v, g = _arrays((2, 3), 200, 8, 5, np.float32, seed=4)
    out, cache = core.forward(q, k, v)
    grads = core.backward(cache, g)
    monkeypatch.setattr(ea.config, "LOCAL_ROW_KERNELS", False)
    ref, ref_cache = core.forward(q, k, v)
    ref_grads = core.backward(ref_cache, g)
    # two float32 paths of the same core (no float64 reference): fixed bound, no lowp
    assert_attention_close(out, ref, np.float32)
    for a, b in zip(grads[:3], ref_grads[:3]):
        assert_attention_close(a, b, np.float32, kind="grad")
