"""The protocol every variant follows, and the registry that lists them.

Shape letters (used in every docstring and ``einsum`` of the package):

====  ==========================================================
B     batch (any number of leading axes, written ``...``)
H     heads (axis -3 when a variant is per head)
N     queries (sequence length)
M     keys and values
D     feature width of queries and keys (``d``)
Dv    feature width of values (``dv``)
K     projected length (Linformer), compressed positions
R     hash rounds (LSH)
C     buckets / clusters
F     features of a feature map φ (linear attention: ``φ(q)`` is ``(..., N, F)``)
BH    batch and heads flattened into one axis (the leading axis of the kernels' arrays)
====  ==========================================================

An *attention core* maps ``(q, k, v)`` of shapes ``(..., N, D)``,
``(..., M, D)``, ``(..., M, Dv)`` to ``out`` of shape ``(..., N, Dv)``::

    out, cache = core.forward(q, k, v)       # cache: what backward needs
    grads      = core.backward(cache, dout)  # Grads(dq, dk, dv, params)
    out        = core(q, k, v)               # the output only
    core.params                              # name -> live learnable array
    core.cost(n, d, dv, m=None)              # Cost(flops, memory)

A *sequence layer* maps ``x`` of shape ``(..., N, D)`` to ``y`` of the same
shape with the same five members (``backward`` returns ``LayerGrads``).

The registry maps a variant's name to its class and a small default
configuration; the tests, the benchmarks and the main command iterate over
it, so a new variant is tested, timed and listed by registering it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

__all__ = [
    "Grads",
    "LayerGrads",
    "Cost",
    "AttentionCore",
    "SequenceLayer",
    "Variant",
    "register",
    "registry",
    "get_variant",
]


class Grads(NamedTuple):
    """Gradients of an attention core.

    ``dq, dk, dv`` have the shapes of ``q, k, v`` (``dk`` is ``None`` where
    keys are derived from ``q``, as in shared-QK LSH attention); ``params``
    maps every name of ``core.params`` to the gradient of that parameter.
    """

    dq: np.ndarray
    dk: np.ndarray | None
    dv: np.ndarray
    params: dict


class LayerGrads(NamedTuple):
    """Gradients of a sequence layer: ``dx`` and one entry per ``layer.params``."""

    dx: np.ndarray
    params: dict


class Cost(NamedTuple):
    """Analytic cost of one forward pass over one sequence (one batch entry, one head).

    flops
        Floating-point operations of the matrix products, a multiply-add
        counted as two (so ``flops // 2`` is the lecture's count of
        multiplications). Elementwise work (exp, max, division) is left out:
        it is what a GEMM-bound kernel does on the side, and the fraction of
        the GEMM peak quoted by the benchmarks is taken on these useful FLOPs.
    memory
        Peak number of scalars the pass holds beyond its inputs (output,
        cache and the largest intermediate).
    """

    flops: int
    memory: int

    @property
    def multiplications(self) -> int:
        """The number of scalar multiplications in the matrix products."""
        return self.flops // 2

    def __add__(self, other):  # Cost + Cost adds fields (a NamedTuple would concatenate)
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(self.flops + other.flops, max(self.memory, other.memory))

    def scaled(self, factor: int) -> "Cost":
        """The cost of ``factor`` independent sequences (batch x heads)."""
        return Cost(self.flops * factor, self.memory * factor)


class AttentionCore:
    """Base class of attention cores ``(q, k, v) -> out``.

    Subclasses implement ``forward``, ``backward`` and ``cost``; they hold
    configuration only, the arrays of a call travel in the cache. ``forward``
    and ``backward`` take the keyword ``check_finite=True`` (a layer that has
    checked its own input calls its cores with ``check_finite=False``).
    """

    #: whether the core restricts query ``i`` to keys ``j <= i``
    causal: bool = False

    def forward(self, q, k, v, *, check_finite: bool = True):  # pragma: no cover - abstract
        """The output and what ``backward`` needs.

        Parameters
        ----------
        q : numpy.ndarray
            Queries, ``(..., N, D)``: any number of leading batch (and head) axes.
        k : numpy.ndarray
            Keys, ``(..., M, D)``.
        v : numpy.ndarray
            Values, ``(..., M, Dv)``.
        check_finite : bool
            Reject NaN and Inf in ``q, k, v`` (``ValueError``); False lets them propagate.

        Returns
        -------
        out : numpy.ndarray
            ``(..., N, Dv)``, float32 when ``q, k, v`` are all float32, else float64.
        cache : NamedTuple
            Exactly what ``backward`` needs; pass it back unchanged, to this core only.
        """
        raise NotImplementedError

    def backward(self, cache, dout, *, check_finite: bool = True) -> Grads:  # pragma: no cover - abstract
        """The gradients of ``sum(out * dout)`` with respect to ``q, k, v`` and ``params``.

        Parameters
        ----------
        cache : NamedTuple
            The second return value of this core's ``forward``.
        dout : numpy.ndarray
            The upstream gradient, the shape and dtype of ``out``.
        check_finite : bool
            Reject NaN and Inf in ``dout`` (``ValueError``).

        Returns
        -------
        Grads
            ``Grads(dq, dk, dv, params)``, each the shape of its input; ``params`` maps
            every name of ``self.params`` to its gradient.
        """
        raise NotImplementedError

    def __call__(self, q, k, v, **kwargs) -> np.ndarray:
        """The output of ``forward`` alone."""
        return self.forward(q, k, v, **kwargs)[0]

    @property
    def params(self) -> dict:
        """Name -> the live ndarray of each learnable parameter ({} if none)."""
        return {}

    def cost(self, n: int, d: int, dv: int | None = None, m: int | None = None,
             *, backward: bool = False) -> Cost:  # pragma: no cover - abstract
        """Analytic cost of ``forward`` (or, with ``backward=True``, of ``backward``) on one
        sequence of one head.

        Parameters
        ----------
        n : int
            Queries ``N``.
        d : int
            Query/key width ``D``.
        dv : int, optional
            Value width ``Dv`` (``d`` when None).
        m : int, optional
            Keys ``M`` (``n`` when None).
        backward : bool
            The cost of the backward pass instead of the forward pass.

        Returns
        -------
        Cost
            ``Cost(flops, memory)``: FLOPs of the matrix products (a multiply-add counts 2)
            and the peak number of scalars held.
        """
        raise NotImplementedError

    def dense_mask(self, n: int, m: int | None = None):
        """The boolean ``(N, M)`` mask with which ``DenseAttention`` computes
        exactly what this core computes, or ``None`` when the core is an
        approximation of full attention (then the oracle is unmasked)."""
        return None

    def reference_mask(self, n: int, m: int | None = None):
        """For an approximation: the mask of the dense attention it approximates
        (the causal mask for a causal approximation), ``None`` for full attention.
        For exact cores it is ``dense_mask``."""
        return self.dense_mask(n, m)

    def reference(self, q, k, v, dout):
        """``(out, dq, dk, dv)`` of the same computation by the float64 dense oracle, for
        cores whose oracle is not a masked attention over ``q, k, v`` alone (added
        tokens, ...); ``None`` (the default) means: use ``dense_mask``."""
        return None

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({cfg})"

    def options(self) -> dict:
        """The constructor's keyword arguments that configure this core (what ``repr`` shows;
        learnable parameters are in ``params``): ``type(core)(**core.options())`` builds an
        equal core when the options are all plain values."""
        return {}


class SequenceLayer:
    """Base class of sequence layers ``x -> y`` (shape ``(..., N, D)`` both)."""

    def forward(self, x, *, check_finite: bool = True):  # pragma: no cover - abstract
        """The output and what ``backward`` needs.

        Parameters
        ----------
        x : numpy.ndarray
            ``(..., N, D)``: any number of leading batch axes.
        check_finite : bool
            Reject NaN and Inf in ``x`` (``ValueError``); False lets them propagate.

        Returns
        -------
        y : numpy.ndarray
            ``(..., N, D)``, float32 when ``x`` is float32, else float64.
        cache : NamedTuple
            Exactly what ``backward`` needs; pass it back unchanged, to this layer only.
        """
        raise NotImplementedError

    def backward(self, cache, dy, *, check_finite: bool = True) -> LayerGrads:  # pragma: no cover - abstract
        """The gradients of ``sum(y * dy)`` with respect to ``x`` and ``params``.

        Parameters
        ----------
        cache, dy, check_finite
            As for :meth:`~efficient_attention.AttentionCore.backward`, with the layer's output ``y`` and its
            upstream gradient ``dy`` (the shape and dtype of ``y``) in place of ``out`` and
            ``dout``.

        Returns
        -------
        LayerGrads
            ``LayerGrads(dx, params)``; ``params`` maps every name of ``self.params`` to its
            gradient, in the parameter's own dtype.
        """
        raise NotImplementedError

    def __call__(self, x, **kwargs) -> np.ndarray:
        """The output of ``forward`` alone."""
        return self.forward(x, **kwargs)[0]

    @property
    def params(self) -> dict:
        """Name -> the live ndarray of each learnable parameter ({} if none)."""
        return {}

    def cost(self, n: int, d: int, *, backward: bool = False) -> Cost:  # pragma: no cover
        """Analytic cost of ``forward`` (or ``backward``) on one sequence of length ``n`` and
        width ``d``: ``Cost(flops, memory)``, FLOPs of the matrix products (a multiply-add
        counts 2) and the peak number of scalars held."""
        raise NotImplementedError


@dataclass(frozen=True)
class Variant:
    """One registered variant: a name, its class and a small default configuration.

    ``build(n, d, dv, seed)`` returns an instance for sequences of length
    ``n``; the default calls ``cls(**config)`` (cores) or
    ``cls.init(n=n, d=d, seed=seed, **config)`` (layers). Variants whose
    configuration depends on ``n`` (a pattern, a projection) pass ``factory``.
    """

    name: str
    cls: type
    chapter: int
    config: dict = field(default_factory=dict)
    factory: Callable[..., Any] | None = None
    description: str = ""
    #: True when the variant's output equals masked dense attention (its
    #: ``dense_mask``); False when it approximates full attention.
    exact: bool = True

    @property
    def kind(self) -> str:
        return "layer" if issubclass(self.cls, SequenceLayer) else "core"

    def build(self, n: int, d: int, dv: int | None = None, seed: int = 0):
        dv = d if dv is None else dv
        if self.factory is not None:
            return self.factory(n=n, d=d, dv=dv, seed=seed, **self.config)
        if self.kind == "layer":
            return self.cls.init(n=n, d=d, seed=seed, **self.config)
        return self.cls(**self.config)


#: name -> Variant; filled by the chapter modules as ``efficient_attention/__init__.py`` imports them
_REGISTRY: dict[str, Variant] = {}


def register(name: str, cls: type, chapter: int, config: dict | None = None, *,
             factory: Callable[..., Any] | None = None, description: str = "",
             exact: bool = True) -> Variant:
    """Add a variant to the registry (tests, benchmarks and the CLI iterate over it)."""
    if name in _REGISTRY:
        raise ValueError(f"variant name must be unique, {name!r} is already registered")
    variant = Variant(name, cls, chapter, dict(config or {}), factory, description, exact)
    _REGISTRY[name] = variant
    return variant


def registry(kind: str | None = None) -> dict[str, Variant]:
    """A copy of the registry (name -> Variant), optionally only ``kind`` 'core' or 'layer'."""
    if kind not in (None, "core", "layer"):
        raise ValueError(f"kind must be None, 'core' or 'layer', got {kind!r}")
    return {n: v for n, v in _REGISTRY.items() if kind is None or v.kind == kind}


def get_variant(name: str) -> Variant:
    """The registered variant called ``name`` (``ValueError`` listing the names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"variant must be one of {sorted(_REGISTRY)}, got {name!r}") from None
