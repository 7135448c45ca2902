"""The input policy: every bad argument raises TypeError/ValueError naming the argument."""
import numpy as np
import pytest
import scipy.sparse as sp

import efficient_attention as ea
from efficient_attention import validate

rng = np.random.default_rng(0)
Q = rng.standard_normal((2, 4, 3))
K = rng.standard_normal((2, 5, 3))
V = rng.standard_normal((2, 5, 2))


def _bad_csr(indptr, indices, shape=(4, 5)):
    # build without scipy's own checks, as a corrupted user array would be
    a = sp.csr_array(shape, dtype=bool)
    a.indptr = np.asarray(indptr)
    a.indices = np.asarray(indices)
    a.data = np.ones(len(indices), bool)
    return a


BAD_CALLS = [
    # (id, call, exception, words the message must contain)
    ("int q", lambda: ea.DenseAttention()(Q.astype(np.int64), K, V), TypeError, ["q", "int64"]),
    ("bool k", lambda: ea.DenseAttention()(Q, K > 0, V), TypeError, ["k", "bool"]),
    ("complex v", lambda: ea.DenseAttention()(Q, K, V.astype(complex)), TypeError, ["v", "complex128"]),
    ("float16 q", lambda: ea.DenseAttention()(Q.astype(np.float16), K, V), TypeError, ["q", "float16"]),
    ("object q", lambda: ea.DenseAttention()(np.array([[None]]), K, V), TypeError, ["q", "object"]),
    ("string q", lambda: ea.DenseAttention()("abc", K, V), TypeError, ["q"]),
    ("1-d q", lambda: ea.DenseAttention()(Q[0, 0], K, V), ValueError, ["q", "(..., N, D)"]),
    ("d mismatch", lambda: ea.DenseAttention()(Q, K[..., :2], V), ValueError, ["q", "k", "D"]),
    ("m mismatch", lambda: ea.DenseAttention()(Q, K, V[:, :4]), ValueError, ["k", "v", "M"]),
    ("batch mismatch", lambda: ea.DenseAttention()(Q, K[:1], V[:1]), ValueError, ["leading", "(2, 4, 3)"]),
    ("nan q", lambda: ea.DenseAttention()(np.where(Q > 1, np.nan, Q), K, V), ValueError,
     ["q must contain only finite values (check_finite=True)",
      f"found nan at index {tuple(int(i) for i in np.argwhere(Q > 1)[0])}", "pass check_finite=False"]),
    ("inf v", lambda: ea.DenseAttention()(Q, K, np.full_like(V, np.inf), check_finite=True),
     ValueError, ["v", "found inf at index (0, 0, 0)"]),
    ("nan dout", lambda: ea.DenseAttention().backward(ea.DenseAttention().forward(Q, K, V)[1],
                                                      np.full((2, 4, 2), np.nan)),
     ValueError, ["dout", "found nan at index (0, 0, 0)"]),
    ("foreign cache", lambda: ea.LocalAttention(1).backward(ea.DenseAttention().forward(Q, K, V)[1],
                                                            np.ones((2, 4, 2))), TypeError,
     ["cache", "LocalAttention.forward", "_BandCache", "_DenseCache"]),
    ("int mask", lambda: ea.DenseAttention()(Q, K, V, mask=np.ones((4, 5), int)), TypeError, ["mask", "bool"]),
    ("mask shape", lambda: ea.DenseAttention()(Q, K, V, mask=np.ones((5, 4), bool)), ValueError,
     ["mask", "(2, 4, 5)", "(5, 4)"]),
    ("sparse mask shape", lambda: ea.DenseAttention()(Q, K, V, mask=sp.csr_array(np.ones((4, 4), bool))),
     ValueError, ["mask", "(4, 5)"]),
    ("csr index out of range", lambda: ea.DenseAttention()(Q, K, V, mask=_bad_csr([0, 1, 2, 2, 3], [0, 7, 1])),
     ValueError, ["mask.indices", "[0, 5)"]),
    ("csr negative index", lambda: ea.DenseAttention()(Q, K, V, mask=_bad_csr([0, 1, 2, 2, 3], [0, -1, 1])),
     ValueError, ["mask.indices"]),
    ("csr indptr not monotone", lambda: ea.DenseAttention()(Q, K, V, mask=_bad_csr([0, 2, 1, 2, 3], [0, 1, 1])),
     ValueError, ["mask.indptr", "non-decreasing"]),
    ("csr indptr too short", lambda: ea.DenseAttention()(Q, K, V, mask=_bad_csr([0, 1, 2], [0, 1])),
     ValueError, ["mask.indptr", "length 5"]),
    ("causal not bool", lambda: ea.DenseAttention(causal="yes"), TypeError, ["causal"]),
    ("scale string", lambda: ea.DenseAttention(scale="0.5"), TypeError, ["scale"]),
    ("scale nan", lambda: ea.DenseAttention(scale=float("nan")), ValueError, ["scale", "finite"]),
    ("dout shape", lambda: ea.DenseAttention().backward(ea.DenseAttention().forward(Q, K, V)[1], np.ones((2, 4, 3))),
     ValueError, ["dout", "(2, 4, 2)"]),
    ("dout int", lambda: ea.DenseAttention().backward(ea.DenseAttention().forward(Q, K, V)[1],
                                                      np.ones((2, 4, 2), int)), TypeError, ["dout", "int"]),
    ("zero width", lambda: ea.DenseAttention()(Q[..., :0], K[..., :0], V), ValueError, ["q", "D >= 1"]),
]


@pytest.mark.parametrize("call, exc, words", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_with_named_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), f"{w!r} not in message {str(info.value)!r}"


def test_at_least_twelve_distinct_bad_inputs():
    assert len({c[0] for c in BAD_CALLS}) >= 12


def test_unsorted_csr_with_duplicates_is_canonicalised():
    dense = rng.random((4, 5)) < 0.5
    good = sp.csr_array(dense)
    # same pattern with each row's indices reversed and the first entry duplicated
    indptr, indices = [0], []
    for i in range(4):
        cols = list(np.flatnonzero(dense[i])[::-1])
        if cols:
            cols.append(cols[0])
        indices += cols
        indptr.append(len(indices))
    messy = _bad_csr(indptr, indices)
    np.testing.assert_array_equal(validate.check_csr(messy, 4, 5).toarray(), dense)
    out_good = ea.DenseAttention()(Q, K, V, mask=good)
    out_messy = ea.DenseAttention()(Q, K, V, mask=messy)
    np.testing.assert_array_equal(out_good, out_messy)


def test_explicit_false_entries_are_dropped():
    a = sp.csr_array((np.array([True, False]), np.array([0, 1]), np.array([0, 2, 2, 2, 2])), shape=(4, 5))
    np.testing.assert_array_equal(validate.check_csr(a, 4, 5).toarray()[0], [1, 0, 0, 0, 0])


def test_coo_and_csc_masks_accepted():
    dense = rng.random((4, 5)) < 0.5
    ref = ea.DenseAttention()(Q, K, V, mask=dense)
    for m in (sp.coo_array(dense), sp.csc_array(dense), sp.csr_matrix(dense)):
        np.testing.assert_allclose(ea.DenseAttention()(Q, K, V, mask=m), ref)


def test_scalar_checks():
    assert validate.check_int(np.int32(3), "window", minimum=0) == 3
    with pytest.raises(TypeError, match="window must be an integer"):
        validate.check_int(2.5, "window")
    with pytest.raises(TypeError, match="window must be an integer"):
        validate.check_int(True, "window")
    with pytest.raises(ValueError, match="window must be >= 0, got -3"):
        validate.check_int(-3, "window", minimum=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        validate.check_real(0.0, "temperature", minimum=0, strict=True)
    assert validate.resolve_scale(None, 16) == 0.25 and isinstance(validate.resolve_scale(None, 16), float)


def test_dlpack_export_failure_is_a_type_error_with_hint():
    class Refuses:
        def __dlpack__(self, **kwargs):
            raise RuntimeError("Can't export tensors that require gradient, use tensor.detach()")

        def __dlpack_device__(self):
            return (1, 0)

    with pytest.raises(TypeError, match=r"q must be .*detach"):
        ea.DenseAttention()(Refuses(), K, V)


# ------------------------------------------------------------------ traps: a clear error, not an AttributeError

N_TRAP, D_TRAP = 16, 8
VARIANTS = sorted(ea.registry())


def _variant(name):
    var = ea.get_variant(name)
    obj = var.build(n=N_TRAP, d=D_TRAP, dv=D_TRAP, seed=0)
    x = np.random.default_rng(1).standard_normal((2, N_TRAP, D_TRAP))
    return obj, ((x, x.copy(), x.copy()) if var.kind == "core" else (x,))


@pytest.mark.parametrize("name", VARIANTS)
def test_backward_with_a_foreign_cache_names_cache_and_both_types(name):
    obj, args = _variant(name)
    out, own = obj.forward(*args)
    other = ea.LocalAttention(1) if isinstance(obj, ea.DenseAttention) else ea.DenseAttention()
    x = args[0]
    _, foreign = other.forward(x, x, x)
    expected = type(own).__name__
    for cache, given in ((foreign, type(foreign).__name__), ((1, 2), "tuple"), (list(own), "list")):
        with pytest.raises(TypeError) as info:
            obj.backward(cache, np.ones_like(out))
        msg = str(info.value)
        assert msg.startswith(f"cache must be the cache returned by {type(obj).__name__}.forward"), msg
        assert f"(a {expected})" in msg and msg.endswith(f"got {given}"), msg
    obj.backward(own, np.ones_like(out))                     # its own cache still works


def test_synthesizers_tell_their_caches_apart():
    x = np.random.default_rng(2).standard_normal((2, N_TRAP, D_TRAP))
    dense = ea.DenseSynthesizer.init(N_TRAP, D_TRAP)
    rand = ea.RandomSynthesizer.init(N_TRAP, D_TRAP)
    _, cache = dense.forward(x)
    with pytest.raises(TypeError, match="cache must be the cache returned by RandomSynthesizer.forward"):
        rand.backward(cache, np.ones_like(x))


@pytest.mark.parametrize("fm", [ea.EluFeatureMap(), ea.PerformerFeatureMap(np.eye(3)),
                                ea.RandomFourierFeatureMap(np.eye(3))], ids=lambda fm: type(fm).__name__)
def test_feature_map_backward_with_a_foreign_cache(fm):
    x = np.random.default_rng(3).standard_normal((4, 3))
    phi, _ = fm.forward(x)
    other = ea.EluFeatureMap() if not isinstance(fm, ea.EluFeatureMap) else ea.RandomFourierFeatureMap(np.eye(3))
    _, foreign = other.forward(x)
    with pytest.raises(TypeError, match=rf"^cache must be the cache returned by {type(fm).__name__}.forward"):
        fm.backward(foreign, np.ones_like(phi))
    with pytest.raises(ValueError, match=r"^dphi must have the shape of the forward output"):
        fm.backward(fm.forward(x)[1], np.ones((4, 2)))


@pytest.mark.parametrize("name", [n for n in VARIANTS if ea.get_variant(n).cls is not ea.DenseAttention])
def test_unknown_keyword_names_it_and_the_public_class(name):
    """``mask=`` is DenseAttention's alone (the other cores fix their pattern in the constructor):
    a TypeError naming ``mask`` and the variant's public class, never a private base class."""
    obj, args = _variant(name)
    mask = np.ones((N_TRAP, N_TRAP), bool)
    for call in (obj, obj.forward):
        with pytest.raises(TypeError) as info:
            call(*args, mask=mask)
        msg = str(info.value)
        assert f"{type(obj).__name__}.forward()" in msg and "'mask'" in msg, msg
        assert "._" not in msg and not msg.startswith("_"), msg


def test_shared_qk_lsh_called_with_values_in_place_of_keys():
    q, v = Q, V[:, :4]
    core = ea.LSHAttention(4)                                # shared QK: k must be None
    with pytest.raises(ValueError) as info:
        core(q, v)
    msg = str(info.value)
    assert "second positional argument is k" in msg and "v=" in msg, msg
    np.testing.assert_array_equal(core(q, v=v), core(q, None, v))
    with pytest.raises(ValueError, match="k must be None when shared_qk=True") as info:
        core(q, K[:, :4], v)                                 # k given as well: no hint about v=
    assert "v=" not in str(info.value)
