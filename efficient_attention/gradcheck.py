r"""Gradient checking by directional central differences in float64.

For a scalar loss ``L = sum(out * G)`` with a fixed random ``G``, a random
direction ``u`` of an input ``x`` and a step ``h``,

.. math::

    \frac{8\,[L(x + h u) - L(x - h u)] - [L(x + 2h u) - L(x - 2h u)]}{12h}
    \approx \langle \nabla_x L, u \rangle,

the fourth-order central difference, with an error of order ``h⁴`` (plus
rounding of order ``eps·|L|/h``). The
relative error of the two sides (cs231n's
``|a - b| / max(|a|, |b|, floor)``) is reported, worst over all inputs,
parameters and directions. A correct float64 backward gives about 1e-9 or
less; a wrong one gives errors of order 1.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .core import AttentionCore, Grads, LayerGrads, SequenceLayer

__all__ = ["gradcheck"]


def _as_f64(x):
    return None if x is None else np.array(x, dtype=np.float64, copy=True)


def gradcheck(fn, inputs: Sequence, backward: Callable | None = None, *,
              forward_kwargs: dict | None = None, directions: int = 3, eps: float = 1e-5,
              atol: float = 1e-10, rel_floor: float = 1e-3, seed: int = 0, check_params: bool = True,
              full: bool = False):
    """Worst relative error between a backward pass and central differences.

    Parameters
    ----------
    fn : AttentionCore, SequenceLayer or callable
        A core (``inputs = (q, k, v)``), a layer (``inputs = (x,)``), or a
        function ``forward(*inputs, **forward_kwargs) -> (out, cache)``
        paired with ``backward(cache, dout)`` returning one gradient per
        input (a sequence, a ``Grads`` / ``LayerGrads``, or a bare array when
        there is one input).
    inputs : sequence of arrays
        Converted to float64 copies (the caller's arrays are not touched).
        ``None`` entries are passed through and not checked.
    backward : callable, optional
        Required when ``fn`` is a plain function.
    forward_kwargs : dict, optional
        Extra keywords for the forward call (e.g. ``mask``).
    directions : int
        Random directions per input and parameter.
    eps : float
        The finite-difference step ``h``: at 1e-5 the truncation error (order
        ``h⁴``) is negligible and rounding (order ``1e-16·abs(L)/h``), which
        dominates where a derivative is exactly zero, stays near ``1e-11·abs(L)``.
    atol, rel_floor : float
        The denominator is at least ``max(atol, rel_floor * largest)``, where
        ``largest`` is the largest directional derivative seen in the whole
        check: a derivative that is exactly zero (or tiny next to the others)
        is compared against rounding noise absolutely instead of relatively.
    seed : int
        Seeds ``G`` and the directions.
    check_params : bool
        Also check ``fn.params`` (a core's or layer's learnable arrays, which
        must be float64; they are perturbed in place and restored).
    full : bool
        Return ``{name: worst error}`` instead of the overall worst.
    """
    kwargs = dict(forward_kwargs or {})
    xs = [_as_f64(x) for x in inputs]
    if isinstance(fn, (AttentionCore, SequenceLayer)):
        obj = fn
        forward, backward = obj.forward, obj.backward
        names = ["q", "k", "v"] if isinstance(obj, AttentionCore) else ["x"]
        if len(xs) != len(names):
            raise ValueError(f"inputs must be {tuple(names)} for a {type(obj).__name__}, got {len(xs)} arrays")
        params = obj.params if check_params else {}
    else:
        if backward is None:
            raise ValueError("backward must be given when fn is a plain forward function")
        forward, names, params = fn, [f"input{i}" for i in range(len(xs))], {}
    for name, p in params.items():
        if p.dtype != np.float64:
            raise ValueError(f"gradcheck needs float64 parameters; parameter {name!r} is {p.dtype} "
                             "(build the core or layer with float64 arrays)")

    rng = np.random.default_rng(seed)
    out, cache = forward(*xs, **kwargs)
    g = rng.standard_normal(out.shape)                      # L = sum(out * G)
    grads = backward(cache, g)
    if isinstance(grads, Grads):
        grad_of = dict(zip(names, (grads.dq, grads.dk, grads.dv)))
        grad_of.update({f"param.{n}": grads.params[n] for n in params})
    elif isinstance(grads, LayerGrads):
        grad_of = {"x": grads.dx, **{f"param.{n}": grads.params[n] for n in params}}
    else:
        if isinstance(grads, np.ndarray):                   # one input, one bare gradient
            grads = [grads]
        grad_of = dict(zip(names, grads))

    def loss():
        return float(np.sum(forward(*xs, **kwargs)[0] * g))

    targets = [(n, xs[i]) for i, n in enumerate(names) if xs[i] is not None]
    targets += [(f"param.{n}", p) for n, p in params.items()]
    pairs = {}                                             # name -> [(numeric, analytic), ...]
    for name, x in targets:
        analytic = grad_of.get(name)
        if analytic is None:
            raise ValueError(f"backward returned no gradient for {name}")
        analytic = np.asarray(analytic, dtype=np.float64)
        if analytic.shape != x.shape:
            raise ValueError(f"gradient of {name} has shape {analytic.shape}, expected {x.shape}")
        pairs[name] = []
        for _ in range(directions):
            u = rng.standard_normal(x.shape)
            saved = x.copy()
            at = {}
            for step in (-2, -1, 1, 2):                     # L(x + step·h·u)
                x[...] = saved + step * eps * u
                at[step] = loss()
            x[...] = saved
            # fourth-order central difference: error O(h⁴) instead of O(h²)
            numeric = (8 * (at[1] - at[-1]) - (at[2] - at[-2])) / (12 * eps)
            pairs[name].append((numeric, float(np.sum(analytic * u))))
    # Directional derivatives far below the largest one of the same function are compared
    # absolutely: their finite differences are dominated by rounding noise.
    largest = max((abs(a) for ps in pairs.values() for p in ps for a in p), default=0.0)
    floor = max(atol, rel_floor * largest)
    errors = {name: max((abs(n - a) / max(abs(n), abs(a), floor) for n, a in ps), default=0.0)
              for name, ps in pairs.items()}
    return errors if full else max(errors.values(), default=0.0)
