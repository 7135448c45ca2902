"""NaN and Inf: refused by default (``check_finite=True``) with the argument and the first bad
index named; with ``check_finite=False`` they propagate without a RuntimeWarning, and stay out of
the rows (and batch entries) they do not touch. Every registered variant and the feature maps."""
import sys
import warnings

import numpy as np
import pytest

import efficient_attention as ea

N, D = 16, 8
ROW = 5                          # the row that gets the NaN
NAMES = sorted(ea.registry())
CORES = sorted(ea.registry("core"))
BANDED = (ea.LocalAttention, ea.StridedAttention)


def _build(name):
    return ea.get_variant(name).build(n=N, d=D, dv=D, seed=0)


def _inputs(name, dtype=np.float64, seed=0):
    """``{argument name: array}`` for the variant's forward: q, k, v (cores) or x (layers)."""
    rng = np.random.default_rng(seed)
    args = "qkv" if ea.get_variant(name).kind == "core" else "x"
    return {a: rng.standard_normal((2, N, D)).astype(dtype) for a in args}


def _dout_name(name):
    return "dout" if ea.get_variant(name).kind == "core" else "dy"


def _grads(name, g):
    """The input gradients of a backward result, by argument name (None: not an input of the core)."""
    if ea.get_variant(name).kind == "core":
        return {"q": g.dq, "k": g.dk, "v": g.dv}
    return {"x": g.dx}


def _run(obj, name, arrays, dout_row=None, check_finite=False):
    """forward and backward (upstream gradient 1, NaN at ``dout_row`` of batch entry 0)
    with RuntimeWarnings raised as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, cache = obj.forward(*arrays.values(), check_finite=check_finite)
        dout = np.ones_like(out)
        if dout_row is not None:
            dout[0, dout_row, 1] = np.nan
        g = obj.backward(cache, dout, check_finite=check_finite)
    return out, _grads(name, g)


def _bad_rows(a):
    """Rows of batch entry 0 holding a non-finite value."""
    return set(np.flatnonzero(~np.isfinite(a[0]).all(axis=-1)).tolist())


def _message(arg, value, index):
    return (f"{arg} must contain only finite values (check_finite=True); found {value} at index {index}; "
            "pass check_finite=False to skip this check")


# ------------------------------------------------------------------ refused by default

@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_input_raises_naming_argument(name, value):
    obj = _build(name)
    for arg in _inputs(name):
        arrays = _inputs(name)
        arrays[arg][1, 3, 2] = value
        copies = {a: x.copy() for a, x in arrays.items()}
        with pytest.raises(ValueError) as info:
            obj.forward(*arrays.values())                      # the default checks
        assert str(info.value) == _message(arg, value, (1, 3, 2))
        with pytest.raises(ValueError, match=f"^{arg} must contain only finite"):
            obj(*arrays.values(), check_finite=True)
        for a, x in arrays.items():
            np.testing.assert_array_equal(x, copies[a])        # inputs never modified


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_dout_raises_naming_argument(name, value):
    obj = _build(name)
    out, cache = obj.forward(*_inputs(name).values())
    dout = np.ones_like(out)
    dout[0, ROW, 0] = value
    dout0 = dout.copy()
    with pytest.raises(ValueError) as info:
        obj.backward(cache, dout)
    assert str(info.value) == _message(_dout_name(name), value, (0, ROW, 0))
    np.testing.assert_array_equal(dout, dout0)
    g = obj.backward(cache, np.ones_like(out))                 # the cache is still good
    assert all(np.isfinite(a).all() for a in _grads(name, g).values() if a is not None)


# ------------------------------------------------------------------ check_finite=False

def _poisoned(name, dtype, value):
    """``(arg, arrays, copies)`` for each input ``arg`` with ``value`` at ``[0, ROW, 1]``, then
    ``arg = None`` (clean inputs: the value goes into dout)."""
    for arg in list(_inputs(name)) + [None]:
        arrays = _inputs(name, dtype)
        if arg is not None:
            arrays[arg][0, ROW, 1] = value
        yield arg, arrays, {a: x.copy() for a, x in arrays.items()}


def _assert_contained(what, arg, out, grads, arrays, copies):
    """Batch entry 1 of the output and the gradients finite; the inputs unchanged."""
    assert np.isfinite(out[1]).all(), f"{what} in {arg} reached batch entry 1 of the output"
    for a, g in grads.items():
        if g is not None:
            assert np.isfinite(g[1]).all(), f"{what} in {arg or 'dout'} reached batch entry 1 of d{a}"
    for a, x in arrays.items():
        np.testing.assert_array_equal(x, copies[a])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NAMES)
def test_nan_propagates_without_warning_and_stays_in_its_batch_entry(name, dtype):
    """A NaN in one row of batch entry 0: no RuntimeWarning from forward or backward, the
    inputs unchanged, and nothing non-finite in batch entry 1 (batch entries are independent)."""
    obj = _build(name)
    for arg, arrays, copies in _poisoned(name, dtype, np.nan):
        out, grads = _run(obj, name, arrays, dout_row=ROW if arg is None else None)
        _assert_contained("NaN", arg, out, grads, arrays, copies)


@pytest.mark.parametrize("value", [np.inf, -np.inf], ids=["inf", "-inf"])
@pytest.mark.parametrize("name", NAMES)
def test_inf_propagates_without_warning_and_stays_in_its_batch_entry(name, value):
    """An Inf (in each input, then in dout) with check_finite=False: no RuntimeWarning escapes
    from forward or backward (worker threads included), the inputs are unchanged, and batch
    entry 1 stays finite."""
    obj = _build(name)
    for arg, arrays, copies in _poisoned(name, np.float32, value):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            out, cache = obj.forward(*arrays.values(), check_finite=False)
            dout = np.ones_like(out)
            if arg is None:
                dout[0, ROW, 1] = value
            grads = _grads(name, obj.backward(cache, dout, check_finite=False))
        _assert_contained("Inf", arg, out, grads, arrays, copies)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", CORES)
def test_nan_query_row_and_dout_row_stay_in_their_row(name, dtype):
    """Every core computes query i's output from q_i (and all k, v), and dq_i from dout_i: a
    NaN in row i of q leaves every other output row finite; one in row i of dout every other
    row of dq."""
    obj = _build(name)
    arrays = _inputs(name, dtype)
    arrays["q"][0, ROW, 1] = np.nan
    out, _ = _run(obj, name, arrays)
    assert _bad_rows(out) <= {ROW}
    _, grads = _run(obj, name, _inputs(name, dtype), dout_row=ROW)
    assert _bad_rows(grads["q"]) <= {ROW}


def _gathering(name):
    """Exact cores that read only the allowed keys (sparse patterns on the row-CSR kernels,
    global tokens): not the banded cores (whole key blocks with a -inf bias), not the cores on
    the block-sparse engine (whole tiles: a key's NaN reaches every row of its tiles) and, for
    values, not the dense oracle (it multiplies the whole P by V, and 0 * NaN is NaN)."""
    var = ea.get_variant(name)
    on_tiles = issubclass(var.cls, ea.BlockSparseAttention) or getattr(_build(name), "engine", False)
    return var.exact and not issubclass(var.cls, BANDED) and not on_tiles


KEY_CASES = [(n, "k") for n in CORES if _gathering(n)] + \
    [(n, "v") for n in CORES if _gathering(n) and ea.get_variant(n).cls is not ea.DenseAttention]


@pytest.mark.parametrize("name, arg", KEY_CASES)
def test_nan_key_reaches_exactly_the_rows_that_attend_to_it(name, arg):
    """A NaN in key (value) j makes exactly the output rows i with mask[i, j] NaN, for the
    exact cores that gather their keys (see _gathering: the claim is made only where true)."""
    obj = _build(name)
    mask = obj.dense_mask(N, N)
    allowed = np.ones((N, N), bool) if mask is None else np.broadcast_to(mask, (N, N))
    for dtype in (np.float32, np.float64):
        arrays = _inputs(name, dtype)
        arrays[arg][0, ROW, 1] = np.nan
        out, _ = _run(obj, name, arrays)
        assert _bad_rows(out) == set(np.flatnonzero(allowed[:, ROW]).tolist())


# ------------------------------------------------------------------ one check, at the public entry

@pytest.fixture
def finite_checks(monkeypatch):
    """Count the calls of validate.check_finite_array (every module that imported it)."""
    calls = []
    original = ea.validate.check_finite_array

    def counting(x, name):
        calls.append(name)
        return original(x, name)

    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("efficient_attention") and \
                getattr(mod, "check_finite_array", None) is original:
            monkeypatch.setattr(mod, "check_finite_array", counting)
    return calls


@pytest.mark.parametrize("name", NAMES)
def test_each_array_is_checked_once_at_the_public_entry(name, finite_checks):
    """A layer checks x once and calls its cores with check_finite=False; a core calling
    another (global tokens -> dense, linear attention -> its feature map) does the same."""
    obj = _build(name)
    arrays = _inputs(name)
    out, cache = obj.forward(*arrays.values())
    assert finite_checks == list(arrays)
    obj.backward(cache, np.ones_like(out))
    assert finite_checks == list(arrays) + [_dout_name(name)]
    finite_checks.clear()
    out, cache = obj.forward(*arrays.values(), check_finite=False)
    obj.backward(cache, np.ones_like(out), check_finite=False)
    assert finite_checks == []


# ------------------------------------------------------------------ the other public entries

def test_global_attention_forward_extra_and_backward_extra():
    core = ea.GlobalAttention(indices=(0,), n_extra=2, d=D, seed=0)
    q, k, v = _inputs("dense").values()
    bad = v.copy()
    bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match=r"^v must contain only finite values .* found inf at index \(1, 2, 3\)"):
        core.forward_extra(q, k, bad)
    out, cache = core.forward_extra(q, k, v)
    dout = np.ones_like(out)
    dout[0, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"^dout_extra must contain only finite .* index \(0, 1, 0\)"):
        core.backward_extra(cache, dout)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        g = core.backward_extra(cache, dout, check_finite=False)
    assert np.isfinite(g.dq[1]).all() and not np.isfinite(g.params["extra_q"]).all()


def test_sinkhorn_sort_matrix_checks_k():
    core = _build("sinkhorn")
    k = _inputs("dense")["k"]
    k[0, 7, 0] = np.nan
    with pytest.raises(ValueError, match=r"^k must contain only finite values .* index \(0, 7, 0\)"):
        core.sort_matrix(k)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        p = core.sort_matrix(k, check_finite=False)
    assert np.isfinite(p[1]).all()


@pytest.mark.parametrize("name", ["linear_elu_causal", "performer_causal", "rfa_causal"])
def test_linear_step_checks_its_inputs(name):
    core = _build(name)
    rng = np.random.default_rng(3)
    q_t, k_t, v_t = (rng.standard_normal((2, D)) for _ in range(3))
    out, state = core.step(None, q_t, k_t, v_t)
    for i, arg in enumerate(("q_t", "k_t", "v_t")):
        args = [q_t.copy(), k_t.copy(), v_t.copy()]
        args[i][1, 4] = np.nan
        with pytest.raises(ValueError, match=rf"^{arg} must contain only finite values .* index \(1, 4\);"):
            core.step(state, *args)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            o, _ = core.step(state, *args, check_finite=False)
        assert np.isfinite(o[0]).all() and not np.isfinite(o[1]).all()


# ------------------------------------------------------------------ feature maps

def _maps():
    omega = ea.PerformerFeatureMap.draw(D, 6, seed=1)
    return {"elu": ea.EluFeatureMap(), "performer": ea.PerformerFeatureMap(omega),
            "performer_hyperbolic": ea.PerformerFeatureMap(omega, kind="hyperbolic"),
            "rfa": ea.RandomFourierFeatureMap(ea.RandomFourierFeatureMap.draw(D, 6, seed=2))}


MAPS = sorted(_maps())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", MAPS)
def test_feature_map_refuses_nonfinite_x_and_dphi(name, value, dtype):
    fm = _maps()[name]
    x = np.random.default_rng(4).standard_normal((2, N, D)).astype(dtype)
    bad = x.copy()
    bad[1, ROW, 2] = value
    with pytest.raises(ValueError) as info:
        fm.forward(bad)
    assert str(info.value) == _message("x", value, (1, ROW, 2))
    phi, cache = fm.forward(x)
    dphi = np.ones_like(phi)
    dphi[0, 2, 1] = value
    with pytest.raises(ValueError) as info:
        fm.backward(cache, dphi)
    assert str(info.value) == _message("dphi", value, (0, 2, 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", MAPS)
def test_feature_map_nan_stays_in_its_row_without_warning(name, dtype):
    """The maps act row by row: a NaN in row i of x (of dphi) leaves every other row of phi
    (of dx) finite, with no RuntimeWarning."""
    fm = _maps()[name]
    x = np.random.default_rng(5).standard_normal((2, N, D)).astype(dtype)
    bad = x.copy()
    bad[0, ROW, 1] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        phi, _ = fm.forward(bad, check_finite=False)
        _, cache = fm.forward(x)
        dphi = np.ones_like(phi)
        dphi[0, ROW, 0] = np.nan
        dx = fm.backward(cache, dphi, check_finite=False)
    assert _bad_rows(phi) == {ROW} and np.isfinite(phi[1]).all()
    assert _bad_rows(dx) <= {ROW} and np.isfinite(dx[1]).all()
