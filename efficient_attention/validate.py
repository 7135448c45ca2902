"""The input policy, in one place.

Every public entry point calls these helpers before any computation, so that
a bad argument raises ``TypeError`` or ``ValueError`` whose message names the
argument, what was expected and what was given, and so that no numba kernel
ever sees an array it could index out of bounds.

Policy
------
* Arrays: array-likes go through ``np.asarray``; objects with ``__dlpack__``
  (CPU torch tensors, JAX arrays) through ``np.from_dlpack``. Inputs are never
  written to.
* dtypes: float32 and float64. Mixed float32/float64 promote to float64.
  Integer, bool, complex, float16 and object arrays raise ``TypeError``.
* Shapes: ``q (..., N, D)``, ``k (..., M, D)``, ``v (..., M, Dv)``; the leading
  (batch) axes of all three must be equal.
* ``check_finite=True`` (the default of every public ``forward`` and ``backward``, as in
  scipy.linalg) rejects NaN and Inf in ``q, k, v``, ``x`` and ``dout`` with ``ValueError``
  naming the argument and the first bad index; ``check_finite=False`` skips the check.
  Each public entry checks once; a layer calling its cores passes ``check_finite=False``.
* ``backward(cache, dout)`` takes only the cache its own class's ``forward`` returned
  (:func:`check_cache`).
* Masks are boolean (True = may attend): dense arrays broadcastable to
  ``(..., N, M)``, or ``scipy.sparse`` arrays of shape ``(N, M)`` whose index
  arrays are checked with NumPy before scipy or a kernel touches them.
"""
from __future__ import annotations

import functools
import numbers
import operator

import numpy as np
import scipy.sparse as sp

__all__ = [
    "as_float_array",
    "result_dtype",
    "check_qkv",
    "check_x",
    "check_dout",
    "check_finite_array",
    "check_cache",
    "check_mask",
    "check_patterns",
    "check_csr",
    "check_int",
    "check_real",
    "check_scale",
    "resolve_scale",
    "check_bool",
    "check_indices",
    "finite_policy",
]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _describe(x) -> str:
    return type(x).__name__


def as_float_array(x, name: str) -> np.ndarray:
    """``x`` as a float32 or float64 ndarray (no copy when it already is one).

    Raises ``TypeError`` naming ``name`` for any other dtype.
    """
    if isinstance(x, np.ndarray):
        arr = x
    elif hasattr(x, "__dlpack__") and not isinstance(x, (list, tuple)):
        try:
            arr = np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError) as exc:
            msg = str(exc)
            hint = (" (call .detach() on a tensor that requires grad, and move it to the CPU)")
            raise TypeError(
                f"{name} must be an array exported to NumPy through __dlpack__ "
                f"from a CPU buffer{hint}; exporting the {_describe(x)} failed: {msg}") from exc
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be an array-like of floats, got {_describe(x)}: {exc}") from exc
    if arr.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {arr.dtype}"
                        + (" (cast it with .astype(np.float32) first)"
                           if arr.dtype.kind in "iub" or arr.dtype == np.float16 else ""))
    return arr


def result_dtype(*arrays) -> np.dtype:
    """float32 when every array is float32, else float64."""
    return np.dtype(np.float32) if all(a.dtype == np.float32 for a in arrays) else np.dtype(np.float64)


def check_finite_array(x, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` and the first non-finite entry (C order) of ``x``."""
    x = np.asarray(x)
    finite = np.isfinite(x)
    if finite.all():
        return
    index = tuple(int(i) for i in np.unravel_index(np.argmin(finite), x.shape))
    raise ValueError(f"{name} must contain only finite values (check_finite=True); found {x[index]} "
                     f"at index {index}; pass check_finite=False to skip this check")


def check_cache(cache, expected_type: type, owner_name: str):
    """``cache`` itself, when it is an ``expected_type``: the cache ``owner_name.forward`` returns.

    Raises ``TypeError`` naming the ``cache`` argument, the expected type and the given one
    (a cache of another core, or a plain tuple, would otherwise fail deep inside backward).
    """
    if not isinstance(cache, expected_type):
        raise TypeError(f"cache must be the cache returned by {owner_name}.forward (a "
                        f"{expected_type.__name__}), got {_describe(cache)}")
    return cache


def check_qkv(q, k, v, *, check_finite: bool = True, names=("q", "k", "v")):
    """Validate ``q (..., N, D)``, ``k (..., M, D)``, ``v (..., M, Dv)``.

    Returns the three arrays in their common computation dtype. ``check_finite``: NaN or
    Inf in any of them raises ``ValueError`` (:func:`check_finite_array`).
    """
    nq, nk, nv = names
    q = as_float_array(q, nq)
    k = as_float_array(k, nk)
    v = as_float_array(v, nv)
    for arr, name, letters in ((q, nq, "(..., N, D)"), (k, nk, "(..., M, D)"), (v, nv, "(..., M, Dv)")):
        if arr.ndim < 2:
            raise ValueError(f"{name} must have shape {letters} with at least 2 axes, got shape {arr.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{nq} and {nk} must share the feature width D, got {nq} {q.shape} and {nk} {k.shape}")
    if q.shape[-1] < 1:
        raise ValueError(f"{nq} must have a feature width D >= 1, got shape {q.shape}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{nk} and {nv} must share the number of keys M, got {nk} {k.shape} and {nv} {v.shape}")
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(f"{nq}, {nk} and {nv} must have the same leading (batch) axes, got "
                         f"{nq} {q.shape}, {nk} {k.shape}, {nv} {v.shape}")
    if check_finite:
        for arr, name in ((q, nq), (k, nk), (v, nv)):
            check_finite_array(arr, name)
    dtype = result_dtype(q, k, v)
    return q.astype(dtype, copy=False), k.astype(dtype, copy=False), v.astype(dtype, copy=False)


def check_x(x, *, name: str = "x", d: int | None = None, n: int | None = None,
            check_finite: bool = True) -> np.ndarray:
    """Validate a sequence-layer input ``x (..., N, D)`` (finite unless ``check_finite=False``)."""
    x = as_float_array(x, name)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (..., N, D) with at least 2 axes, got shape {x.shape}")
    if d is not None and x.shape[-1] != d:
        raise ValueError(f"{name} must have feature width D = {d}, got shape {x.shape}")
    if n is not None and x.shape[-2] != n:
        raise ValueError(f"{name} must have sequence length N = {n} (the layer's), got shape {x.shape}")
    if check_finite:
        check_finite_array(x, name)
    return x


def check_dout(dout, shape, dtype, name: str = "dout", *, check_finite: bool = True) -> np.ndarray:
    """The upstream gradient, checked against the forward output's shape (and, with
    ``check_finite``, for NaN and Inf), in the forward's ``dtype`` (None: its own)."""
    dout = as_float_array(dout, name)
    if dout.shape != tuple(shape):
        raise ValueError(f"{name} must have the shape of the forward output {tuple(shape)}, got {dout.shape}")
    if check_finite:
        check_finite_array(dout, name)
    return dout if dtype is None else dout.astype(dtype, copy=False)


def check_int(value, name: str, *, minimum: int | None = None, maximum: int | None = None,
              allow_none: bool = False):
    """An integer argument (bools are rejected), optionally bounded."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_describe(value)} {value!r}")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_real(value, name: str, *, minimum: float | None = None, strict: bool = False,
               allow_none: bool = False):
    """A finite real scalar, optionally bounded below (``strict``: ``> minimum``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_describe(value)} {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def check_scale(scale) -> float | None:
    """``scale``: None (meaning 1/sqrt(D)) or a finite real number."""
    return check_real(scale, "scale", allow_none=True)


def resolve_scale(scale: float | None, d: int) -> float:
    """The score scale as a Python float: ``scale``, or ``1/sqrt(d)`` when None
    (a Python float keeps float32 computations in float32)."""
    return float(d) ** -0.5 if scale is None else float(scale)


def check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {_describe(value)} {value!r}")
    return bool(value)


def check_patterns(pattern, name: str = "pattern"):
    """``(patterns, (N, M), per_head)`` of ``pattern``: one 2-D ``scipy.sparse`` array, or a
    non-empty list or tuple of them (one per head, ``per_head`` True), ``(N, M)`` the first's
    shape. Checks the types only; :func:`check_csr` checks each one's shape and index arrays."""
    per_head = isinstance(pattern, (list, tuple))
    patterns = list(pattern) if per_head else [pattern]
    if not patterns:
        raise ValueError(f"{name} must be a sparse array or a non-empty list of them, "
                         f"got an empty {_describe(pattern)}")
    for i, p in enumerate(patterns):
        if not sp.issparse(p) or p.ndim != 2:
            label, alternative = (f"{name}[{i}]", "") if per_head else (name, " or a list of them")
            shape = f" of shape {p.shape}" if sp.issparse(p) else ""
            raise TypeError(f"{label} must be a 2-D scipy.sparse array (N, M){alternative}, "
                            f"got {_describe(p)}{shape}")
    return patterns, tuple(patterns[0].shape), per_head


def check_csr(pattern, n: int, m: int, name: str = "pattern") -> sp.csr_array:
    """A sparse pattern of shape ``(n, m)`` as a canonical boolean ``csr_array``
    with int64 index arrays.

    The raw index arrays are checked with NumPy first (lengths, ``indptr``
    starting at 0, non-decreasing and ending at ``len(indices)``, indices in
    ``[0, m)``), so that neither scipy's compiled routines nor our kernels
    ever read out of bounds. Stored entries mean "may attend"; explicitly
    stored zeros / False are dropped.
    """
    if not sp.issparse(pattern):
        raise TypeError(f"{name} must be a scipy.sparse array of shape (N, M) = ({n}, {m}), "
                        f"got {_describe(pattern)}")
    if pattern.ndim != 2 or tuple(pattern.shape) != (n, m):
        raise ValueError(f"{name} must have shape (N, M) = ({n}, {m}), got {tuple(pattern.shape)}")
    if pattern.format in ("csr", "csc", "bsr"):
        _check_compressed_indices(pattern, name)
    elif pattern.format == "coo":
        rows, cols = pattern.coords if hasattr(pattern, "coords") else (pattern.row, pattern.col)
        for idx, bound, what in ((rows, n, "row"), (cols, m, "column")):
            idx = np.asarray(idx)
            if idx.size and (idx.min() < 0 or idx.max() >= bound):
                raise ValueError(f"{name} has {what} indices outside [0, {bound}): "
                                 f"min {idx.min()}, max {idx.max()}")
    if pattern.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold bool (or real) entries, got dtype {pattern.dtype}")
    csr = sp.csr_array(pattern, copy=True).astype(bool)
    csr.eliminate_zeros()
    csr.sum_duplicates()
    csr.sort_indices()
    csr.indptr = csr.indptr.astype(np.int64, copy=False)
    csr.indices = csr.indices.astype(np.int64, copy=False)
    return csr


def _check_compressed_indices(pattern, name: str) -> None:
    """Bounds of a CSR / CSC / BSR array's raw ``indptr`` / ``indices``."""
    indptr = np.asarray(pattern.indptr)
    indices = np.asarray(pattern.indices)
    if pattern.format == "bsr":
        r, c = pattern.blocksize
        n_major, n_minor = pattern.shape[0] // r, pattern.shape[1] // c
    elif pattern.format == "csr":
        n_major, n_minor = pattern.shape
    else:  # csc
        n_minor, n_major = pattern.shape
    if indptr.ndim != 1 or indptr.shape[0] != n_major + 1:
        raise ValueError(f"{name}.indptr must have length {n_major + 1}, got shape {indptr.shape}")
    if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
        raise TypeError(f"{name} index arrays must be integer, got indptr {indptr.dtype}, indices {indices.dtype}")
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ValueError(f"{name}.indptr must start at 0 and be non-decreasing, got {indptr[:8]}...")
    nnz = int(indptr[-1])
    if indices.ndim != 1 or indices.shape[0] < nnz:
        raise ValueError(f"{name}.indices must have at least indptr[-1] = {nnz} entries, "
                         f"got shape {indices.shape}")
    used = indices[:nnz]
    if nnz and (used.min() < 0 or used.max() >= n_minor):
        raise ValueError(f"{name}.indices must lie in [0, {n_minor}), got min {used.min()}, max {used.max()}")
    data = np.asarray(pattern.data)
    if data.shape[0] < nnz:
        raise ValueError(f"{name}.data must have at least indptr[-1] = {nnz} entries, got shape {data.shape}")


def check_mask(mask, n: int, m: int, batch_shape=()):
    """A dense boolean mask broadcastable to ``batch_shape + (n, m)``, or a
    sparse ``(n, m)`` pattern (returned as canonical CSR). ``None`` passes."""
    if mask is None:
        return None
    if sp.issparse(mask):
        return check_csr(mask, n, m, "mask")
    if hasattr(mask, "__dlpack__") and not isinstance(mask, np.ndarray):
        mask = np.from_dlpack(mask)
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array (True = may attend), got dtype {mask.dtype}")
    target = tuple(batch_shape) + (n, m)
    try:
        shape = np.broadcast_shapes(mask.shape, target)
    except ValueError:
        shape = None
    if shape != target:
        raise ValueError(f"mask must broadcast to (..., N, M) = {target}, got shape {mask.shape}")
    return mask


def check_indices(indices, n: int | None, name: str) -> np.ndarray:
    """Token indices as a sorted, de-duplicated int64 array, each in ``[0, n)`` (``>= 0`` when n is None)."""
    if isinstance(indices, (numbers.Integral, np.integer)) and not isinstance(indices, bool):
        indices = [indices]
    arr = np.asarray(indices)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must be a sequence of integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64)
    if n is None:
        if arr.min() < 0:
            raise ValueError(f"{name} must be >= 0, got min {arr.min()}")
    elif arr.min() < 0 or arr.max() >= n:
        raise ValueError(f"{name} must lie in [0, {n}) (n = {n}), got min {arr.min()}, max {arr.max()}")
    return np.unique(arr)


def finite_policy(method):
    """Decorate a public ``forward``/``backward`` that takes ``check_finite``.

    With ``check_finite=True`` (the default) the method checks its arrays
    itself and runs as written. With ``check_finite=False`` the user has chosen
    to pass NaN or Inf through: the computation runs under
    ``np.errstate(all="ignore")``, so non-finite values propagate to the
    entries they touch without a ``RuntimeWarning`` escaping from inside the
    library (worker threads that the library starts carry the same error
    state: see ``local.py``).
    """
    @functools.wraps(method)
    def entry(*args, check_finite: bool = True, **kwargs):
        if check_finite:
            return method(*args, check_finite=True, **kwargs)
        with np.errstate(all="ignore"):
            return method(*args, check_finite=False, **kwargs)
    return entry
