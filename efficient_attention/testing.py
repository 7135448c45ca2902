"""Property-testing kit: hypothesis strategies and oracle assertions.

Use it to test an attention implementation (this library's, or a PyTorch,
JAX or C++ one) against :class:`~efficient_attention.DenseAttention`::

    from hypothesis import given
    import efficient_attention as ea
    from efficient_attention.testing import qkv, assert_attention_close

    @given(qkv(dtype=np.float32))
    def test_my_attention(arrays):
        q, k, v = arrays
        assert_attention_close(my_attention(q, k, v), ea.DenseAttention()(q, k, v), np.float32)

Tolerances (``tolerances(dtype, row_length)``), against a float64 reference:

=========  ==================================  ==============================
dtype      rtol                                atol
=========  ==================================  ==============================
float64    1e-10                               1e-12
float32    1e-5 · max(1, sqrt(row_length/64))  1e-6 · max(1, sqrt(row_length/64))
=========  ==================================  ==============================

The float32 tolerance grows like the rounding error of a sum of
``row_length`` terms. Gradients are compared ten times more loosely
(``kind="grad"``). Importing this module needs ``hypothesis`` (the ``test`` extra).
"""
from __future__ import annotations

import numpy as np

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as exc:  # pragma: no cover
    raise ImportError("efficient_attention.testing needs hypothesis: pip install 'efficient_attention[test]'") from exc

import scipy.sparse as sp

__all__ = [
    "tolerances",
    "assert_attention_close",
    "float_arrays",
    "batch_shapes",
    "qkv",
    "masks",
    "sparse_masks",
    "patterns",
    "ELEMENTS",
]

#: bounded, finite elements for attention inputs
ELEMENTS = {"min_value": -3.0, "max_value": 3.0, "allow_nan": False, "allow_infinity": False,
            "allow_subnormal": False}


def tolerances(dtype, row_length: int | None = None, kind: str = "value") -> tuple[float, float]:
    """``(rtol, atol)`` for comparing a result computed in ``dtype`` with a
    float64 reference; ``row_length`` is the number of terms per output sum."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        rtol, atol = 1e-10, 1e-12
    elif dtype == np.float32:
        grow = max(1.0, np.sqrt((row_length or 1) / 64.0))
        rtol, atol = 1e-5 * grow, 1e-6 * grow
    else:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    if kind == "grad":
        rtol, atol = 10 * rtol, 10 * atol
    elif kind != "value":
        raise ValueError(f"kind must be 'value' or 'grad', got {kind!r}")
    return rtol, atol


def assert_attention_close(actual, expected, dtype=None, *, row_length: int | None = None,
                           kind: str = "value", err_msg: str = "") -> None:
    """Assert ``actual`` matches ``expected`` within the documented tolerance of ``dtype``.

    ``dtype`` defaults to ``actual``'s dtype. Shapes must be equal and
    ``actual`` must be finite; ``row_length`` defaults to the last axis of
    ``expected`` (pass the number of keys per row for long rows).
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dtype = actual.dtype if dtype is None else np.dtype(dtype)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: actual {actual.shape}, expected {expected.shape}. {err_msg}")
    if not np.all(np.isfinite(actual)):
        raise AssertionError(f"actual contains NaN or Inf. {err_msg}")
    rtol, atol = tolerances(dtype, row_length if row_length is not None else
                            (expected.shape[-1] if expected.ndim else 1), kind)
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                               rtol=rtol, atol=atol, err_msg=err_msg)


def float_arrays(shape, dtype=np.float64, elements=None):
    """Finite arrays of ``shape`` with bounded elements."""
    return hnp.arrays(np.dtype(dtype), shape, elements=dict(ELEMENTS, **(elements or {})))


def batch_shapes(max_dims: int = 2, max_side: int = 3):
    """Leading batch axes: ``()`` up to ``max_dims`` axes of size 1..max_side."""
    return st.lists(st.integers(1, max_side), min_size=0, max_size=max_dims).map(tuple)


@st.composite
def qkv(draw, dtype=np.float64, *, batch_shape=None, max_n: int = 9, max_m: int | None = None,
        max_d: int = 5, same_nm: bool = False, elements=None):
    """``(q, k, v)`` with shapes drawn first: ``(..., N, D)``, ``(..., M, D)``, ``(..., M, Dv)``.

    ``N`` and ``M`` range over ``1..max_n`` (``M = N`` with ``same_nm``),
    ``D`` and ``Dv`` over ``1..max_d``; ``batch_shape`` is drawn by
    :func:`batch_shapes` unless given. Size-1 edges come up on purpose.
    """
    batch = draw(batch_shapes()) if batch_shape is None else tuple(batch_shape)
    n = draw(st.integers(1, max_n))
    m = n if same_nm else draw(st.integers(1, max_m or max_n))
    d = draw(st.integers(1, max_d))
    dv = draw(st.integers(1, max_d))
    q = draw(float_arrays(batch + (n, d), dtype, elements))
    k = draw(float_arrays(batch + (m, d), dtype, elements))
    v = draw(float_arrays(batch + (m, dv), dtype, elements))
    return q, k, v


@st.composite
def masks(draw, n: int, m: int, batch_shape=(), *, broadcast: bool = True, empty_rows: bool = True):
    """Boolean masks broadcastable to ``batch_shape + (n, m)``.

    With ``broadcast`` the batch axes may be dropped or set to 1; with
    ``empty_rows`` some query rows are forced to be fully masked.
    """
    shape = tuple(batch_shape)
    if broadcast and shape:
        shape = draw(st.sampled_from([(), tuple(1 for _ in shape), shape]))
    mask = draw(hnp.arrays(np.bool_, shape + (n, m)))
    if empty_rows and draw(st.booleans()):
        rows = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
        mask = mask.copy()
        mask[..., rows, :] = False
    return mask


@st.composite
def sparse_masks(draw, n: int, m: int, *, empty_rows: bool = True):
    """Boolean ``scipy.sparse.csr_array`` patterns of shape ``(n, m)``."""
    dense = draw(masks(n, m, (), broadcast=False, empty_rows=empty_rows))
    return sp.csr_array(dense)


@st.composite
def patterns(draw, n: int, m: int | None = None):
    """Boolean ``(n, m)`` CSR patterns made by the library's builders (local,
    strided, global tokens, random, a union of two) or drawn entry by entry,
    with their arguments drawn by hypothesis (so failures shrink to small
    windows and strides). ``m`` defaults to ``n``; builders that need a square
    pattern are only used when ``m == n``."""
    from . import patterns as P
    m = n if m is None else m

    def one():
        kinds = ["entries", "random"] + (["local", "strided", "global"] if m == n else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "local":
            return P.local(n, draw(st.integers(0, n)), causal=draw(st.booleans()))
        if kind == "strided":
            window = draw(st.one_of(st.none(), st.integers(0, n)))
            return P.strided(n, draw(st.integers(1, n + 1)), window, causal=draw(st.booleans()))
        if kind == "global":
            return P.global_tokens(n, draw(st.lists(st.integers(0, n - 1), max_size=3, unique=True)))
        if kind == "random":
            return P.random(n, draw(st.integers(0, m)), draw(st.integers(0, 2**16)), m=m)
        return draw(sparse_masks(n, m))

    first = one()
    return P.union(first, one()) if draw(st.booleans()) else first
