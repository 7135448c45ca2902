r"""Property-testing kit: hypothesis strategies, oracle assertions and a conformance runner.

Use it to test an attention implementation (this library's, or a PyTorch,
JAX or C++ one) against :class:`~efficient_attention.DenseAttention`::

    from hypothesis import given
    import efficient_attention as ea
    from efficient_attention.testing import qkv, assert_attention_close

    @given(qkv(dtype=np.float32))
    def test_my_attention(arrays):
        q, k, v = arrays
        oracle = ea.DenseAttention()
        expected = oracle(*(a.astype(np.float64) for a in arrays))   # the float64 "golden" result
        lowp = oracle(q, k, v)                                       # the oracle's own float32 result
        assert_attention_close(my_attention(q, k, v), expected, np.float32, lowp=lowp)

or let :func:`conformance` draw the inputs, compare and shrink a failure for you
(``python -m efficient_attention.conformance MODULE:CALLABLE --reference dense``
from the shell).

Tolerances
----------
A result computed in ``dtype`` is compared with a float64 ``expected``.
The *fixed* bound (``tolerances(dtype, row_length, kind)``):

=========  ==================================  ==============================
dtype      rtol                                atol
=========  ==================================  ==============================
float64    1e-10                               1e-12
float32    1e-5 · max(1, sqrt(row_length/64))  1e-6 · max(1, sqrt(row_length/64))
=========  ==================================  ==============================

Gradients (``kind="grad"``) are compared ten times more loosely. The fixed
bound assumes *well-conditioned* entries: entries of order one whose terms do
not cancel, so that an error of a few units in the last place of the inputs
stays of that order in the result. The float32 tolerance grows like the
rounding error of a sum of ``row_length`` terms (default: the length of the
last axis of ``expected``). Where terms cancel (a gradient that is exactly
zero in float64, for example ``dk`` when every value row is equal) a correct
float32 result can sit far above any fixed atol, because its error scales with
the size of the cancelling terms, not with the result.

The *low-precision rule* removes that trap. Pass ``lowp``, the oracle's own
result computed in ``dtype`` (or several such results, for example in two
key orders); then an entry passes when

.. math::

    |\text{actual} - \text{expected}| \le \max\big(\text{atol} + \text{rtol}\,|\text{expected}|,\;
        \text{LOWP\_FACTOR} \cdot \max_\text{row} |\text{lowp} - \text{expected}|\big),

that is, a correct implementation may be off by up to ``LOWP_FACTOR`` (10)
times the oracle's own rounding error. For softmax attention the bound also
takes ``magnitude`` (:func:`rounding_scale`: the size of the terms each entry
sums) and then admits ``LOWP_FACTOR · eps(dtype) · magnitude`` too: the oracle's
own rounding can be zero by luck at an entry where another correct order of
summation is not (seen: 47 of 40,000 adversarial float32 gradients failed the
``lowp`` rule alone, none with the magnitude). This is PyTorch's rule for
``scaled_dot_product_attention`` (factor 5) and FlexAttention (factor 10 in
float32, for the online softmax), with one difference: the oracle's error is
taken as its maximum over the row (the last axis) rather than entry by entry,
because which entry of a row rounding hits hardest depends on the order of the
sums, and every implementation sums in its own order. An error much larger than
the oracle's own (a 1e-3 error where float32 rounding gives 1e-6) still fails.
Importing this module needs ``hypothesis`` (the ``test`` extra).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import numpy as np

try:
    import hypothesis
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as exc:  # pragma: no cover
    raise ImportError("efficient_attention.testing needs hypothesis: pip install 'efficient_attention[test]'") from exc

import scipy.sparse as sp

__all__ = [
    "tolerances",
    "tolerance",
    "assert_attention_close",
    "LOWP_FACTOR",
    "rounding_scale",
    "Oracle",
    "dense_oracle",
    "assert_close_to_oracle",
    "float_arrays",
    "batch_shapes",
    "qkv",
    "masks",
    "sparse_masks",
    "patterns",
    "ELEMENTS",
    "conformance",
    "ConformanceReport",
    "ConformanceFailure",
]

#: bounded, finite elements for attention inputs
ELEMENTS = {"min_value": -3.0, "max_value": 3.0, "allow_nan": False, "allow_infinity": False,
            "allow_subnormal": False}

#: a correct result may be off by this many times the oracle's own low-precision
#: rounding error (the ``lowp`` rule; PyTorch uses 5 for SDPA, 10 for FlexAttention in float32)
LOWP_FACTOR = 10.0


def tolerances(dtype, row_length: int | None = None, kind: str = "value") -> tuple[float, float]:
    """The fixed bound ``(rtol, atol)`` for comparing a result computed in ``dtype``
    with a float64 reference; ``row_length`` is the number of terms per output sum.
    See the module docstring for what it assumes."""
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


def tolerance(expected, dtype, *, lowp=None, magnitude=None, row_length: int | None = None,
              kind: str = "value") -> np.ndarray:
    """The elementwise bound on ``|actual - expected|`` that :func:`assert_attention_close`
    applies (``expected`` float64; ``lowp`` one array or a sequence of arrays of its shape;
    ``magnitude`` the size of the terms behind each entry, see :func:`rounding_scale`)."""
    expected = np.asarray(expected, dtype=np.float64)
    if row_length is None:
        row_length = expected.shape[-1] if expected.ndim else 1
    rtol, atol = tolerances(dtype, row_length, kind)
    bound = atol + rtol * np.abs(expected)
    if magnitude is not None:
        magnitude = np.asarray(magnitude, dtype=np.float64)
        if magnitude.shape != expected.shape:
            raise ValueError(f"magnitude must have the shape of expected {expected.shape}, got {magnitude.shape}")
        bound = np.maximum(bound, LOWP_FACTOR * np.finfo(np.dtype(dtype)).eps * magnitude)
    if lowp is not None:
        for ref in (lowp if isinstance(lowp, (list, tuple)) else (lowp,)):
            ref = np.asarray(ref)
            if ref.shape != expected.shape:
                raise ValueError(f"lowp must have the shape of expected {expected.shape}, got {ref.shape}")
            err = np.abs(ref.astype(np.float64) - expected)
            if not np.all(np.isfinite(err)):
                raise ValueError("lowp must be finite where expected is (the oracle's own result in dtype)")
            if expected.ndim:
                err = np.max(err, axis=-1, keepdims=True, initial=0.0)
            bound = np.maximum(bound, LOWP_FACTOR * err)
    return bound


def assert_attention_close(actual, expected, dtype=None, *, lowp=None, magnitude=None,
                           row_length: int | None = None, kind: str = "value", err_msg: str = "") -> None:
    """Assert ``actual`` matches the float64 ``expected`` within the documented tolerance of ``dtype``.

    Parameters
    ----------
    actual : array_like
        The result under test; must be finite and have ``expected``'s shape.
    expected : array_like
        The float64 reference result.
    dtype : dtype, optional
        The precision ``actual`` was computed in (defaults to ``actual``'s dtype).
    lowp : array_like or sequence of array_like, optional
        The oracle's own result computed in ``dtype``. When given, the bound
        also admits ``LOWP_FACTOR`` times the oracle's own rounding error (its
        row maximum), so a correct result is never failed where cancellation
        leaves a float32 error above the fixed atol (module docstring).
    magnitude : array_like, optional
        The size of the terms each entry of ``expected`` sums (float64, its
        shape; :func:`rounding_scale` computes it for softmax attention). When
        given, the bound also admits ``LOWP_FACTOR · eps(dtype) · magnitude``:
        the rounding error any correct order of summation can make.
    row_length : int, optional
        Terms per output sum for the fixed bound (default: the last axis of ``expected``).
    kind : {"value", "grad"}
        Gradients get a ten times looser fixed bound.
    err_msg : str
        Appended to the failure message.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dtype = actual.dtype if dtype is None else np.dtype(dtype)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: actual {actual.shape}, expected {expected.shape}. {err_msg}")
    if not np.all(np.isfinite(actual)):
        raise AssertionError(f"actual contains NaN or Inf. {err_msg}")
    expected = expected.astype(np.float64)
    bound = tolerance(expected, dtype, lowp=lowp, magnitude=magnitude, row_length=row_length, kind=kind)
    err = np.abs(actual.astype(np.float64) - expected)
    bad = err > bound
    if np.any(bad):
        worst = np.unravel_index(np.argmax(np.where(bad, err / bound, 0.0)), err.shape) if err.ndim else ()
        raise AssertionError(
            f"{int(bad.sum())} of {err.size} entries differ beyond the {dtype} tolerance"
            f"{' (with the lowp rule)' if lowp is not None or magnitude is not None else ''}; worst at index {tuple(map(int, worst))}: "
            f"actual {float(actual[worst])!r}, expected {float(expected[worst])!r}, "
            f"|error| {float(err[worst]):.3g} > tolerance {float(bound[worst]):.3g}. {err_msg}")


def rounding_scale(q, k, v, dout=None, *, mask=None, causal: bool = False, scale=None):
    r"""The size of the terms behind each entry of softmax attention and its gradients.

    Returns float64 arrays shaped like ``out`` (and ``dq, dk, dv`` when ``dout``
    is given): each entry is the sum of the absolute values of the terms that
    entry adds up, with the rounding of the scores folded in. Rounding in any
    correct order of evaluation changes an entry by at most a small multiple of
    ``eps(dtype)`` times it, which is what ``assert_attention_close(...,
    magnitude=...)`` admits. With ``P`` the probabilities, ``A = s|Q||K|ᵀ`` the
    score magnitudes and ``G = |dO||V|ᵀ``:

    .. math::

        |O| \to P(1 + A)|V|,\qquad
        |dS| \to P(1 + A)\big(G + \operatorname{rowsum}(P G) + \operatorname{rowsum}(|dO||O|)\big),

        |dQ| \to s|dS||K|,\quad |dK| \to s|dS|^\top|Q|,\quad |dV| \to (P(1 + A))^\top|dO|.

    This is what makes the bound scale with the problem: where terms cancel
    (every value row equal, so ``dk`` is exactly zero in exact arithmetic) a
    correct float32 ``dk`` is of order ``eps·|dk terms|``, not of order ``eps``.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    n, m = q.shape[-2], k.shape[-2]
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    allowed = np.ones((n, m), bool) if mask is None else np.asarray(mask, dtype=bool)
    if causal:
        allowed = allowed & (np.arange(m)[None, :] <= np.arange(n)[:, None])
    scores = np.where(allowed, s * (q @ np.swapaxes(k, -1, -2)), -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
    z = np.sum(p, axis=-1, keepdims=True)
    p = p / np.where(z > 0, z, 1.0)                                   # P, zero on masked entries
    pa = p * (1.0 + s * (np.abs(q) @ np.swapaxes(np.abs(k), -1, -2)))  # P (1 + A)
    out = pa @ np.abs(v)
    if dout is None:
        return out
    dout = np.abs(np.asarray(dout, dtype=np.float64))
    g = dout @ np.swapaxes(np.abs(v), -1, -2)                          # G = |dO||V|ᵀ
    delta = np.sum(p * g, axis=-1, keepdims=True) + np.sum(dout * (p @ np.abs(v)), axis=-1, keepdims=True)
    ds = pa * (g + delta)
    return (out, s * (ds @ np.abs(k)), s * (np.swapaxes(ds, -1, -2) @ np.abs(q)),
            np.swapaxes(pa, -1, -2) @ dout)


class Oracle(NamedTuple):
    """What a result computed in low precision is compared with: the float64 ``expected``
    results, the oracle's own ``lowp`` results in the inputs' dtype, and the ``magnitude``
    of the terms behind each entry (:func:`rounding_scale`); each a tuple ``(out,)`` or
    ``(out, dq, dk, dv)``."""

    expected: tuple
    lowp: tuple
    magnitude: tuple


def dense_oracle(q, k, v, dout=None, *, mask=None, causal: bool = False, scale=None) -> Oracle:
    """:class:`~efficient_attention.DenseAttention` on ``q, k, v`` (and ``dout``) in float64
    and in their own dtype, with the rounding scale: everything
    :func:`assert_close_to_oracle` needs. ``mask`` is a dense boolean mask."""
    from .dense import DenseAttention
    core = DenseAttention(causal=causal, scale=scale)

    def run(arrays, g):
        out, cache = core.forward(*arrays, mask=mask)
        if g is None:
            return (out,)
        return (out,) + tuple(core.backward(cache, g)[:3])

    arrays = tuple(np.asarray(a) for a in (q, k, v))
    g = None if dout is None else np.asarray(dout)
    expected = run(tuple(a.astype(np.float64) for a in arrays), None if g is None else g.astype(np.float64))
    lowp = run(arrays, g)
    magnitude = rounding_scale(*arrays, g, mask=mask, causal=causal, scale=scale)
    return Oracle(expected, lowp, (magnitude,) if g is None else magnitude)


def assert_close_to_oracle(results, oracle: Oracle, dtype=None, *, row_length: int | None = None,
                           err_msg: str = "") -> None:
    """:func:`assert_attention_close` on each of ``results`` (``(out,)`` or ``(out, dq, dk, dv)``)
    against an :class:`Oracle`, with its ``lowp`` and ``magnitude``; gradients as ``kind="grad"``."""
    if len(results) > len(oracle.expected):
        raise ValueError(f"results has {len(results)} arrays, the oracle {len(oracle.expected)}")
    for i, (got, want, ref, mag) in enumerate(zip(results, *oracle)):
        name = ("out", "dq", "dk", "dv")[i]
        assert_attention_close(got, want, dtype, lowp=ref, magnitude=mag, row_length=row_length,
                               kind="value" if i == 0 else "grad", err_msg=f"{name} {err_msg}".strip())


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


# --------------------------------------------------------------------------------------------
# The conformance runner: property-test another implementation against a core of this library
# --------------------------------------------------------------------------------------------

#: sequence lengths, widths and batch shapes the runner tries (small, so counterexamples are readable)
_SIDES = range(1, 10)
_WIDTHS = range(1, 6)
_BATCHES = [(), (1,), (2,), (3,), (1, 2), (2, 3)]
#: how drawn values are made adversarial (see :func:`conformance`)
FAMILIES = ("plain", "constant_v", "repeated_keys", "near_ties", "large_logits")


class ConformanceFailure(NamedTuple):
    """One (shrunk) counterexample found by :func:`conformance`.

    ``inputs`` maps each argument given to the candidate (``q, k, v``, and
    ``mask``, ``dout`` when given) to its array; ``output`` names the result that
    disagrees (``out``, ``dq``, ``dk``, ``dv``; for layers ``y``, ``dx``; ``exception``
    when the candidate raised); ``index`` is the worst entry, where the candidate gave
    ``actual``, the float64 reference ``expected``, ``|error|`` and its ``tolerance``.
    """

    inputs: dict
    family: str
    output: str
    index: tuple
    actual: float
    expected: float
    error: float
    tolerance: float
    message: str


class ConformanceReport(NamedTuple):
    """What :func:`conformance` found: ``passed``, the ``failures`` (the shrunk
    counterexample, at most one), the number of ``examples`` tried, and what was run.
    ``str(report)`` is a readable summary."""

    passed: bool
    failures: list
    examples: int
    candidate: str
    reference: str
    dtype: str
    grads: bool
    seed: int

    def __str__(self) -> str:
        what = "outputs and gradients" if self.grads else "outputs"
        head = (f"conformance of {self.candidate} against {self.reference} "
                f"({self.dtype}, {what}, seed {self.seed}): "
                f"{'PASSED' if self.passed else 'FAILED'} after {self.examples} examples")
        lines = [head]
        with np.printoptions(precision=9, suppress=False, threshold=200, linewidth=100):
            for f in self.failures:
                lines.append(f"  counterexample ({f.family} values): {f.message}")
                for name, arr in f.inputs.items():
                    if arr is None:
                        lines.append(f"    {name} = None")
                        continue
                    arr = np.asarray(arr)
                    lines.append(f"    {name} {arr.dtype}{arr.shape} =")
                    lines.extend("      " + line for line in np.array2string(arr).splitlines())
        return "\n".join(lines)


class _Mismatch(AssertionError):
    def __init__(self, failure: ConformanceFailure):
        super().__init__(failure.message)
        self.failure = failure


class _Reference:
    """A reference as the runner uses it: how to build it for a shape, and which shapes it accepts."""

    def __init__(self, reference):
        from .core import AttentionCore, SequenceLayer, Variant, get_variant
        if isinstance(reference, str):
            reference = get_variant(reference)
        if isinstance(reference, Variant):
            variant = reference
            self.name = repr(variant.name)
            self.kind = variant.kind
            self.exact = variant.exact
            self.build = lambda n, d, dv: variant.build(n, d, dv, seed=0)
        elif isinstance(reference, (AttentionCore, SequenceLayer)):
            self.name = repr(reference)
            self.kind = "layer" if isinstance(reference, SequenceLayer) else "core"
            self.exact = True
            self.build = lambda n, d, dv: reference
        else:
            raise TypeError("reference must be a registered variant's name, a Variant, an attention core "
                            f"or a sequence layer of this library, got {type(reference).__name__}")
        self.shapes = self._probe()
        if not self.shapes:
            raise ValueError(f"reference {self.name} accepts none of the small shapes the runner draws "
                             f"(N, M in {_SIDES.start}..{_SIDES.stop - 1})")

    def run(self, core, arrays, mask, dout, check_finite=False):
        """``(outputs, names)`` of the reference core on ``arrays`` (float64 or the low precision)."""
        if self.kind == "layer":
            y, cache = core.forward(arrays[0])
            if dout is None:
                return (y,), ("y",)
            return (y, core.backward(cache, dout).dx), ("y", "dx")
        q, k, v = arrays
        kwargs = {} if mask is None else {"mask": mask}
        out, cache = core.forward(q, k, v, **kwargs)
        if dout is None:
            return (out,), ("out",)
        g = core.backward(cache, dout)
        return (out, g.dq, g.dk, g.dv), ("out", "dq", "dk", "dv")

    def softmax_mask(self, core, n, m):
        """``(True, mask)`` when the reference is masked softmax attention over ``q, k, v``
        (then :func:`rounding_scale` applies), ``(False, None)`` otherwise."""
        from .dense import DenseAttention
        if self.kind != "core" or not self.exact or self.shared_qk(core) or getattr(core, "n_extra", 0):
            return False, None
        mask = core.dense_mask(n, m)
        if mask is None and not isinstance(core, DenseAttention):
            return False, None
        return True, mask

    def shared_qk(self, core) -> bool:
        return bool(getattr(core, "shared_qk", False))

    def takes_mask(self, core) -> bool:
        return self.kind == "core" and "mask" in inspect.signature(core.forward).parameters

    def _probe(self):
        """Every small ``(n, m, d, dv, batch)`` corner the reference accepts, smallest first."""
        import warnings
        rng = np.random.default_rng(0)

        def works(n, m, d, dv, batch):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    core = self.build(n, d, dv)
                    if self.kind == "layer":
                        core.forward(rng.standard_normal(batch + (n, d)))
                    else:
                        k = None if self.shared_qk(core) else rng.standard_normal(batch + (m, d))
                        core.forward(rng.standard_normal(batch + (n, d)), k, rng.standard_normal(batch + (m, dv)))
                return True
            except (ValueError, TypeError):
                return False

        sides = [(n, m) for n in _SIDES for m in _SIDES]
        if self.kind == "layer":
            sides = [(n, n) for n in _SIDES]
        accepted = [(n, m) for n, m in sides if works(n, m, 2, 2, ())]
        if not accepted:
            return []
        n0, m0 = accepted[0]
        widths = [(d, dv) for d in _WIDTHS for dv in (_WIDTHS if self.kind == "core" else (d,))
                  if works(n0, m0, d, dv, ())]
        batches = [b for b in _BATCHES if works(n0, m0, *widths[0], b)] if widths else []
        return {"sides": sorted(accepted, key=lambda s: (max(s), s)), "widths": widths, "batches": batches}


def _adversarial(data, family, q, k, v):
    """Apply one adversarial ``family`` to drawn ``q, k, v`` (copies; dtype kept)."""
    q, k, v = (None if a is None else a.copy() for a in (q, k, v))
    if family == "constant_v" and v is not None:
        v[...] = v[..., :1, :]                       # every value row equal: dk cancels exactly
    elif family == "repeated_keys" and k is not None and k.shape[-2] > 1:
        j = data.draw(st.integers(1, k.shape[-2] - 1), label="repeat up to")
        k[..., :j + 1, :] = k[..., :1, :]            # equal scores for the first j+1 keys
    elif family == "near_ties" and k is not None:
        eps = data.draw(st.sampled_from([1e-3, 1e-5]), label="tie gap")
        k[...] = k[..., :1, :] + (eps * np.arange(k.shape[-2], dtype=np.float64)[:, None]).astype(k.dtype)
    elif family == "large_logits":
        q *= q.dtype.type(8.0)                       # scores up to ~8x larger: exp saturates
    return q, k, v


def _call_kwargs(candidate):
    try:
        params = inspect.signature(candidate).parameters
    except (TypeError, ValueError):
        return set()
    return {name for name in ("mask", "core") if name in params}


def _compare(results, expected, lowp, magnitude, names, dtype, inputs, family):
    """The first output (in ``names`` order) that breaks the tolerance, as a failure, else None."""
    for name, got, want, ref, mag in zip(names, results, expected, lowp, magnitude):
        if want is None:                             # shared-QK: no dk
            continue
        got = np.asarray(got) if got is not None else None
        if got is None or got.shape != want.shape:
            return ConformanceFailure(inputs, family, name, (), np.nan, np.nan, np.inf, 0.0,
                                      f"{name} has shape {None if got is None else got.shape}, "
                                      f"expected {want.shape}")
        want = np.asarray(want, dtype=np.float64)
        kind = "value" if name in ("out", "y") else "grad"
        bound = tolerance(want, dtype, lowp=np.asarray(ref), magnitude=mag, kind=kind)
        with np.errstate(invalid="ignore", over="ignore"):
            err = np.abs(got.astype(np.float64) - want)
        bad = ~(err <= bound)                        # NaN counts as bad
        if np.any(bad):
            ratio = np.where(bad, np.nan_to_num(err / bound, nan=np.inf, posinf=np.inf), 0.0)
            idx = tuple(int(i) for i in np.unravel_index(np.argmax(ratio), err.shape)) if err.ndim else ()
            msg = (f"{name}{list(idx)}: got {float(got[idx])!r}, expected {float(want[idx])!r} "
                   f"(|error| {float(err[idx]):.3g} > tolerance {float(bound[idx]):.3g}; "
                   f"{int(bad.sum())} of {err.size} entries of {name} out of tolerance)")
            return ConformanceFailure(inputs, family, name, idx, float(got[idx]), float(want[idx]),
                                      float(err[idx]), float(bound[idx]), msg)
    return None


def conformance(candidate: Callable, reference: Any, *, grads: bool = False, dtype=np.float32,
                max_examples: int = 100, seed: int = 0) -> ConformanceReport:
    """Property-test ``candidate`` against a ``reference`` of this library.

    Parameters
    ----------
    candidate : callable
        ``candidate(q, k, v) -> out`` on NumPy arrays of ``dtype`` with shapes
        ``(..., N, D)``, ``(..., M, D)``, ``(..., M, Dv)``; with ``grads=True``
        ``candidate(q, k, v, dout) -> (out, dq, dk, dv)``. For a sequence-layer
        reference: ``candidate(x) -> y`` (``candidate(x, dy) -> (y, dx)``). If its
        signature names ``mask``, it also gets the boolean ``(..., N, M)`` mask the
        reference applies (drawn, with fully masked rows, for references that take
        a mask such as ``"dense"``; the reference's own ``dense_mask`` otherwise, or
        None); if it names ``core``, it gets the reference instance built for the
        example (to read a window, a pattern or parameters). Where the reference
        derives its keys from ``q`` (shared-QK LSH) ``k`` is None.
    reference : str, Variant, attention core or sequence layer
        A registered variant's name (``ea.registry()``; built for each drawn
        length with its default configuration and ``seed=0``) or an instance.
    grads : bool
        Also compare ``dq, dk, dv`` (``dx``) for a random upstream gradient.
    dtype : float32 or float64
        The precision the candidate is fed and compared in.
    max_examples, seed : int
        Hypothesis budget and seed; the same arguments give the same run.

    Returns
    -------
    ConformanceReport
        ``passed``, ``failures`` (the shrunk counterexample), ``examples``; ``str`` is readable.

    Notes
    -----
    Shapes are drawn first, among those the reference accepts (found by trying
    it on every small shape): ``N = 1``, ``N != M``, batch axes. Values lie in
    [-3, 3] and come in adversarial families (:data:`FAMILIES`): constant ``v``
    (the gradient of ``k`` cancels exactly), repeated keys (exact ties), near
    ties, large logits (``q`` times 8). The candidate's results are compared in
    float64 with the reference computed in float64, under the ``lowp`` rule (the
    reference's own result in ``dtype`` sets how much rounding error a correct
    result may have; see the module docstring). A failure is shrunk by hypothesis
    to a small counterexample.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    if not callable(candidate):
        raise TypeError(f"candidate must be callable, got {type(candidate).__name__}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be an integer >= 1, got {max_examples!r}")
    ref = _Reference(reference)
    extras = _call_kwargs(candidate)
    shapes = ref.shapes
    counter, failed = [0], []

    @st.composite
    def example(draw):
        n, m = draw(st.sampled_from(shapes["sides"]), label="(N, M)")
        d, dv = draw(st.sampled_from(shapes["widths"]), label="(D, Dv)")
        batch = draw(st.sampled_from(shapes["batches"]), label="batch")
        family = draw(st.sampled_from(FAMILIES), label="family")
        return n, m, d, dv, batch, family

    @hypothesis.settings(max_examples=max_examples, deadline=None, database=None, derandomize=False,
                         report_multiple_bugs=False, print_blob=False,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.seed(seed)
    @hypothesis.given(example(), st.data())
    def run(shape, data):
        if not failed:
            counter[0] += 1                          # examples tried until the first failure (not the shrinks)
        n, m, d, dv, batch, family = shape
        core = ref.build(n, d, dv)
        if ref.kind == "layer":
            x = data.draw(float_arrays(batch + (n, d), dtype), label="x")
            if family == "constant_v":
                x[...] = x[..., :1, :]
            elif family == "large_logits":
                x *= x.dtype.type(8.0)
            arrays, names_in = (x,), ("x",)
        else:
            q = data.draw(float_arrays(batch + (n, d), dtype), label="q")
            k = None if ref.shared_qk(core) else data.draw(float_arrays(batch + (m, d), dtype), label="k")
            v = data.draw(float_arrays(batch + (m, dv), dtype), label="v")
            q, k, v = _adversarial(data, family, q, k, v)
            arrays, names_in = (q, k, v), ("q", "k", "v")
        mask = ref_mask = None
        if ref.kind == "core" and "mask" in extras:
            mask = core.dense_mask(n, m)               # what the reference applies (None: nothing)
            if ref.takes_mask(core):                   # a reference that takes masks: draw one too
                ref_mask = data.draw(masks(n, m, batch), label="mask")
                mask = ref_mask if mask is None else ref_mask & mask
        dout = None
        if grads:
            out_shape = batch + ((n, d) if ref.kind == "layer" else (n, dv))
            dout = data.draw(float_arrays(out_shape, dtype), label="dout")
        inputs = dict(zip(names_in, arrays))
        if "mask" in extras and ref.kind == "core":
            inputs["mask"] = mask
        if dout is not None:
            inputs["dout" if ref.kind == "core" else "dy"] = dout

        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            as64 = tuple(None if a is None else a.astype(np.float64) for a in arrays)
            expected, names = ref.run(core, as64, ref_mask, None if dout is None else dout.astype(np.float64))
            lowp, _ = ref.run(core, arrays, ref_mask, dout)
        call = [np.array(a, copy=True) if a is not None else None for a in arrays]
        if dout is not None:
            call.append(dout.copy())
        kwargs = {}
        if "mask" in extras and ref.kind == "core":
            kwargs["mask"] = None if mask is None else np.array(mask, copy=True)
        if "core" in extras:
            kwargs["core"] = core
        try:
            results = candidate(*call, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a candidate's exception is a finding
            failed.append(True)
            raise _Mismatch(ConformanceFailure(inputs, family, "exception", (), np.nan, np.nan, np.inf, 0.0,
                                               f"the candidate raised {type(exc).__name__}: {exc}")) from exc
        if not grads:
            results = (results,)
        elif not isinstance(results, (tuple, list)) or len(results) != len(names):
            failed.append(True)
            raise _Mismatch(ConformanceFailure(inputs, family, "return", (), np.nan, np.nan, np.inf, 0.0,
                                               f"with grads=True the candidate must return {tuple(names)}, "
                                               f"got {type(results).__name__}"))
        magnitude = [None] * len(names)
        softmax, own_mask = ref.softmax_mask(core, n, m)
        if softmax:
            full = own_mask if ref_mask is None else (ref_mask if own_mask is None else ref_mask & own_mask)
            scale = getattr(core, "scale", None)
            magnitude = rounding_scale(*as64, None if dout is None else dout.astype(np.float64),
                                       mask=full, scale=scale)
            magnitude = (magnitude,) if dout is None else magnitude
        failure = _compare(results, expected, lowp, magnitude, names, dtype, inputs, family)
        if failure is not None:
            failed.append(True)
            raise _Mismatch(failure)

    failures = []
    try:
        run()
    except _Mismatch as exc:
        failures.append(exc.failure)
    name = getattr(candidate, "__qualname__", None) or type(candidate).__name__
    module = getattr(candidate, "__module__", None)
    return ConformanceReport(not failures, failures, counter[0], f"{module}:{name}" if module else name,
                             ref.name, str(dtype), bool(grads), seed)
