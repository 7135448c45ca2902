r"""Chapter 5 — no Q and K: the attention matrix as parameters (Synthesizer).

Dot-product attention computes its N × N logits from pairs of tokens,
``s·q_i·k_j``. Tay et al. (2020, *Synthesizer: Rethinking Self-Attention in
Transformer Models*, arXiv:2005.00743, §3) ask whether the pairs are needed,
and *synthesize* the logits ``B`` without them; the values stay a projection
of the input:

.. math::

    Y = \operatorname{softmax}_\text{rows}(B + \text{mask})\; X W_v,
    \qquad X \in \mathbb{R}^{N\times D},\ W_v \in \mathbb{R}^{D\times D}.

* :class:`DenseSynthesizer` (§3.1.1): ``B = relu(X W_1 + b_1) W_2 + b_2``; row i
  comes from token i alone. Parameters ``w1 (D, Dh), b1 (Dh,), w2 (Dh, N), b2 (N,), w_v``.
* :class:`RandomSynthesizer` (§3.1.2): ``B = R``, one learned matrix for every
  input. Parameters ``r (N, N), w_v``.
* :class:`FactorizedRandomSynthesizer` (§3.1.3): ``B = R_1 R_2^T`` of rank K.
  Parameters ``r1, r2 (N, K), w_v``.

``causal=True`` masks key ``j > i`` (row i keeps at least key i, so no row is empty).

Cost per sequence: the dense synthesizer ``2·N·D·Dh + 2·N·Dh·N`` FLOPs for the
logits and ``2·N²·D`` for the mixing; the random ones only ``2·N²·D`` (plus
``2·N²·K`` for the factorized logits), and their attention matrix is the same
for every sequence of a batch: it is computed once per call, not per sequence.
All three hold ``N × N`` probabilities (the cache keeps them: recomputing the
dense synthesizer's logits would cost as much as its forward).

**Fixed length.** ``w2``, ``b2`` and ``r``, ``r1``, ``r2`` have one row or
column per position, so a layer only accepts sequences of its own N (the
paper pads to the maximum length; a shorter sequence would have to use the
top-left block, which we do not do implicitly).

Backward (``dY``; ``P`` the probabilities, ``V = X W_v``), one step a line:

.. math::

    dV = P^\top dY,\quad dP = dY V^\top,\quad
    dB = P \odot (dP - \operatorname{rowsum}(P\odot dP)),\quad
    dW_v = X^\top dV,\quad dX \mathrel{+}= dV\, W_v^\top,

then through the logits: random ``dR = Σ_batch dB``; factorized ``dR_1 = dB R_2``,
``dR_2 = dB^\top R_1``; dense ``db_2 = Σ dB``, ``dW_2 = H^\top dB``,
``dH = dB W_2^\top``, ``dA = dH ⊙ [A > 0]`` (A the pre-activation),
``db_1 = Σ dA``, ``dW_1 = X^\top dA``, ``dX \mathrel{+}= dA W_1^\top``.

Peers: LRA's synthesizer layers are multi-head (one ``B`` per head) and add an
output projection; a single head of ours with ``W_v`` (D, D) is the
one-head case, and mixtures with dot-product attention are left out.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .core import Cost, LayerGrads, SequenceLayer
from .dense import causal_mask
from .layers import left_matmul, right_matmul
from .softmax import softmax_backward, softmax_lse
from .validate import as_float_array, check_bool, check_cache, check_dout, check_int, check_x, finite_policy

__all__ = ["DenseSynthesizer", "RandomSynthesizer", "FactorizedRandomSynthesizer"]


def _param(a, name, shape, letters):
    """A parameter array of exactly ``shape`` (letters name the axes in the message)."""
    a = as_float_array(a, name)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {letters} = {tuple(shape)}, got {a.shape}")
    return a


def _check_w_v(w_v, d=None):
    w_v = as_float_array(w_v, "w_v")
    if w_v.ndim != 2 or w_v.shape[0] != w_v.shape[1] or w_v.shape[0] < 1 or (d is not None and w_v.shape[0] != d):
        want = "(D, D)" if d is None else f"(D, D) = ({d}, {d})"
        raise ValueError(f"w_v must have shape {want} (the layer keeps the width D), got {w_v.shape}")
    return w_v


def _sum_to(a, shape):
    """Sum the leading (batch) axes of ``a`` away so it has ``shape``."""
    return a.reshape((-1,) + tuple(shape)).sum(axis=0)


class _SynthCache(NamedTuple):
    x: np.ndarray          # (..., N, D)
    vals: np.ndarray       # V = X W_v                 (..., N, D)
    probs: np.ndarray      # P = softmax(B + mask)     (..., N, N) or (N, N)
    hidden: np.ndarray | None   # dense synthesizer: A = X W_1 + b_1   (..., N, Dh)


# one cache type per synthesizer, so that backward recognises a cache of another one
class _DenseSynthCache(_SynthCache):
    __slots__ = ()


class _RandomSynthCache(_SynthCache):
    __slots__ = ()


class _FactorizedSynthCache(_SynthCache):
    __slots__ = ()


def _wide(a):
    """(..., N, D) -> (N, B·D): the batch entries side by side (a view when possible)."""
    return a if a.ndim == 2 else np.moveaxis(a, -2, 0).reshape(a.shape[-2], -1)


def _mix_forward(x, logits, w_v, causal):
    """``Y = softmax(B + mask)·(X W_v)`` — the part every synthesizer shares.

    ``logits`` is (N, N) for the random synthesizers (one matrix for the
    whole batch: one GEMM against the batch laid side by side) or
    (..., N, N) for the dense one."""
    n = x.shape[-2]
    probs, _ = softmax_lse(logits, causal_mask(n) if causal else None)   # P         (..., N, N)
    vals = right_matmul(x, w_v)                                          # V = X W_v (..., N, D)
    y = left_matmul(probs, vals) if probs.ndim == 2 else probs @ vals    # Y = P V   (..., N, D)
    return y, probs, vals


def _mix_backward(cache, dy, w_v):
    """``dX`` through the values, ``dW_v`` and ``dB`` (with the batch axes of ``P``)."""
    x, vals, probs = cache.x, cache.vals, cache.probs
    pt = np.swapaxes(probs, -1, -2)
    if probs.ndim == 2:                                                  # P shared by the batch
        dvals = left_matmul(pt, dy)                                      # dV = Pᵀ dY           (..., N, D)
        dprobs = _wide(dy) @ _wide(vals).T                               # dP = Σ_b dY_b V_bᵀ   (N, N)
    else:
        dvals = pt @ dy                                                  # dV = Pᵀ dY           (..., N, D)
        dprobs = dy @ np.swapaxes(vals, -1, -2)                          # dP = dY Vᵀ           (..., N, N)
    dlogits = softmax_backward(probs, dprobs)                            # dB = P ⊙ (dP - rowsum(P ⊙ dP))
    d = x.shape[-1]
    dw_v = x.reshape(-1, d).T @ dvals.reshape(-1, d)                     # dWv = Xᵀ dV          (D, D)
    dx = right_matmul(dvals, w_v.T)                                      # dX = dV Wvᵀ          (..., N, D)
    return dx, dw_v, dlogits


class _Synthesizer(SequenceLayer):
    """Shared configuration: ``n``, ``causal`` and the forward/backward frame."""

    n: int
    causal: bool

    def _x(self, x, check_finite):
        return check_x(x, d=self.w_v.shape[0], n=self.n, check_finite=check_finite)

    def _dy(self, cache, cache_type, dy, check_finite):
        check_cache(cache, cache_type, type(self).__name__)
        return check_dout(dy, cache.x.shape, cache.x.dtype, name="dy", check_finite=check_finite)

    def _grads(self, dx, grads):
        params = self.params
        return LayerGrads(dx, {k: np.asarray(g).astype(params[k].dtype, copy=False) for k, g in grads.items()})

    def options(self):
        return {"n": self.n, "d": self.w_v.shape[0], "causal": self.causal}

    def __repr__(self):
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in self.options().items()) + ")"


class DenseSynthesizer(_Synthesizer):
    r"""``Y = softmax(relu(X W_1 + b_1) W_2 + b_2)·(X W_v)``: each token writes its own row of logits.

    Parameters
    ----------
    w1 : (D, Dh), b1 : (Dh,), w2 : (Dh, N), b2 : (N,), w_v : (D, D)
    causal : bool
        Mask keys ``j > i``.

    Notes
    -----
    ``forward(x, *, check_finite=True)``: ``x (..., N, D)`` with the layer's N.
    Tay et al. 2020, arXiv:2005.00743, §3.1.1.
    """

    def __init__(self, w1, b1, w2, b2, w_v, causal: bool = False):
        w1 = as_float_array(w1, "w1")
        if w1.ndim != 2 or 0 in w1.shape:
            raise ValueError(f"w1 must have shape (D, Dh) with both axes non-empty, got {w1.shape}")
        d, dh = w1.shape
        w2 = as_float_array(w2, "w2")
        if w2.ndim != 2 or w2.shape[0] != dh or w2.shape[1] < 1:
            raise ValueError(f"w2 must have shape (Dh, N) with Dh = {dh} from w1, got {w2.shape}")
        n = w2.shape[1]
        self.w1, self.w2 = w1, w2
        self.b1 = _param(b1, "b1", (dh,), "(Dh,)")
        self.b2 = _param(b2, "b2", (n,), "(N,)")
        self.w_v = _check_w_v(w_v, d)
        self.n = n
        self.causal = check_bool(causal, "causal")

    @property
    def params(self):
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2, "w_v": self.w_v}

    @classmethod
    def init(cls, n: int, d: int, seed: int = 0, *, dh: int | None = None, causal: bool = False,
             dtype=np.float64):
        """He-normal ``w1`` (ReLU follows), normal ``w2`` and ``w_v`` of variance 1/fan-in,
        zero biases; ``dh`` defaults to ``d``."""
        n, d = check_int(n, "n", minimum=1), check_int(d, "d", minimum=1)
        dh = check_int(d if dh is None else dh, "dh", minimum=1)
        rng = np.random.default_rng(seed)
        w1 = rng.standard_normal((d, dh)) * np.sqrt(2.0 / d)
        w2 = rng.standard_normal((dh, n)) / np.sqrt(dh)
        w_v = rng.standard_normal((d, d)) / np.sqrt(d)
        dtype = np.dtype(dtype)
        return cls(w1.astype(dtype), np.zeros(dh, dtype), w2.astype(dtype), np.zeros(n, dtype),
                   w_v.astype(dtype), causal=causal)

    @finite_policy
    def forward(self, x, *, check_finite: bool = True):
        x = self._x(x, check_finite)
        w1, b1, w2, b2, w_v = (p.astype(x.dtype, copy=False) for p in self.params.values())
        hidden = right_matmul(x, w1) + b1                         # A = X W1 + b1         (..., N, Dh)
        logits = right_matmul(np.maximum(hidden, 0), w2) + b2     # B = relu(A) W2 + b2   (..., N, N)
        y, probs, vals = _mix_forward(x, logits, w_v, self.causal)
        return y, _DenseSynthCache(x, vals, probs, hidden)

    @finite_policy
    def backward(self, cache: _DenseSynthCache, dy, *, check_finite: bool = True) -> LayerGrads:
        dy = self._dy(cache, _DenseSynthCache, dy, check_finite)
        x = cache.x
        w1, _, w2, _, w_v = (p.astype(x.dtype, copy=False) for p in self.params.values())
        dx, dw_v, dlogits = _mix_backward(cache, dy, w_v)
        hidden = cache.hidden
        n, dh = self.n, w1.shape[1]
        db2 = _sum_to(dlogits, (n, n)).sum(axis=0)                # db2 = Σ dB              (N,)
        relu = np.maximum(hidden, 0)
        dw2 = relu.reshape(-1, dh).T @ dlogits.reshape(-1, n)     # dW2 = relu(A)ᵀ dB     (Dh, N)
        dhidden = right_matmul(dlogits, w2.T) * (hidden > 0)      # dA = dB W2ᵀ ⊙ [A > 0]  (..., N, Dh)
        db1 = dhidden.reshape(-1, dh).sum(axis=0)                 # db1 = Σ dA             (Dh,)
        dw1 = x.reshape(-1, x.shape[-1]).T @ dhidden.reshape(-1, dh)   # dW1 = Xᵀ dA      (D, Dh)
        dx = dx + right_matmul(dhidden, w1.T)                     # dX += dA W1ᵀ           (..., N, D)
        return self._grads(dx, {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2, "w_v": dw_v})

    def cost(self, n=None, d=None, *, backward=False):
        n, d, dh = self.n, self.w_v.shape[0], self.w1.shape[1]
        f = 2 * n * d * dh + 2 * n * dh * n + 2 * n * d * d + 2 * n * n * d
        return Cost(f * (2 if backward else 1), 2 * n * n + 2 * n * d + n * dh)


class RandomSynthesizer(_Synthesizer):
    r"""``Y = softmax(R)·(X W_v)``: one learned N × N logit matrix for every input.

    Parameters
    ----------
    r : (N, N), w_v : (D, D)
    causal : bool

    Notes
    -----
    With ``r = s·QKᵀ`` of one fixed input and ``w_v = I`` the layer is dense
    attention on that input — the Synthesizer's point: attention weights
    need not be computed from the tokens. Tay et al. 2020, arXiv:2005.00743, §3.1.2.
    """

    def __init__(self, r, w_v, causal: bool = False):
        r = as_float_array(r, "r")
        if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 1:
            raise ValueError(f"r must have shape (N, N), got {r.shape}")
        self.r = r
        self.n = r.shape[0]
        self.w_v = _check_w_v(w_v)
        self.causal = check_bool(causal, "causal")

    @property
    def params(self):
        return {"r": self.r, "w_v": self.w_v}

    @classmethod
    def init(cls, n: int, d: int, seed: int = 0, *, causal: bool = False, dtype=np.float64):
        """Standard-normal ``r`` (logits of order one) and ``w_v`` of variance 1/D."""
        n, d = check_int(n, "n", minimum=1), check_int(d, "d", minimum=1)
        rng = np.random.default_rng(seed)
        r = rng.standard_normal((n, n))
        w_v = rng.standard_normal((d, d)) / np.sqrt(d)
        return cls(r.astype(dtype), w_v.astype(dtype), causal=causal)

    @finite_policy
    def forward(self, x, *, check_finite: bool = True):
        x = self._x(x, check_finite)
        r, w_v = self.r.astype(x.dtype, copy=False), self.w_v.astype(x.dtype, copy=False)
        y, probs, vals = _mix_forward(x, r, w_v, self.causal)     # P (N, N), shared by the batch
        return y, _RandomSynthCache(x, vals, probs, None)

    @finite_policy
    def backward(self, cache: _RandomSynthCache, dy, *, check_finite: bool = True) -> LayerGrads:
        dy = self._dy(cache, _RandomSynthCache, dy, check_finite)
        x = cache.x
        dx, dw_v, dr = _mix_backward(cache, dy, self.w_v.astype(x.dtype, copy=False))   # dR = dB
        return self._grads(dx, {"r": dr, "w_v": dw_v})

    def cost(self, n=None, d=None, *, backward=False):
        n, d = self.n, self.w_v.shape[0]
        f = 2 * n * d * d + 2 * n * n * d
        return Cost(f * (2 if backward else 1), n * n + 2 * n * d)


class FactorizedRandomSynthesizer(_Synthesizer):
    r"""``Y = softmax(R_1 R_2ᵀ)·(X W_v)``: a rank-K learned logit matrix (2·N·K parameters instead of N²).

    Parameters
    ----------
    r1, r2 : (N, K), w_v : (D, D)
    causal : bool

    Notes
    -----
    Tay et al. 2020, arXiv:2005.00743, §3.1.3 (factorized random synthesizer).
    """

    def __init__(self, r1, r2, w_v, causal: bool = False):
        r1 = as_float_array(r1, "r1")
        if r1.ndim != 2 or 0 in r1.shape:
            raise ValueError(f"r1 must have shape (N, K) with both axes non-empty, got {r1.shape}")
        self.r1 = r1
        self.r2 = _param(r2, "r2", r1.shape, "(N, K) like r1")
        self.n = r1.shape[0]
        self.w_v = _check_w_v(w_v)
        self.causal = check_bool(causal, "causal")

    @property
    def params(self):
        return {"r1": self.r1, "r2": self.r2, "w_v": self.w_v}

    @classmethod
    def init(cls, n: int, d: int, seed: int = 0, *, k: int = 8, causal: bool = False, dtype=np.float64):
        """Normal ``r1, r2`` of variance ``1/sqrt(K)`` (so the logits have variance 1),
        ``w_v`` of variance 1/D; ``k`` is capped at ``n``."""
        n, d = check_int(n, "n", minimum=1), check_int(d, "d", minimum=1)
        k = min(check_int(k, "k", minimum=1), n)
        rng = np.random.default_rng(seed)
        r1 = rng.standard_normal((n, k)) * k ** -0.25
        r2 = rng.standard_normal((n, k)) * k ** -0.25
        w_v = rng.standard_normal((d, d)) / np.sqrt(d)
        return cls(r1.astype(dtype), r2.astype(dtype), w_v.astype(dtype), causal=causal)

    @finite_policy
    def forward(self, x, *, check_finite: bool = True):
        x = self._x(x, check_finite)
        r1, r2, w_v = (p.astype(x.dtype, copy=False) for p in self.params.values())
        y, probs, vals = _mix_forward(x, r1 @ r2.T, w_v, self.causal)   # B = R1 R2ᵀ  (N, N)
        return y, _FactorizedSynthCache(x, vals, probs, None)

    @finite_policy
    def backward(self, cache: _FactorizedSynthCache, dy, *, check_finite: bool = True) -> LayerGrads:
        dy = self._dy(cache, _FactorizedSynthCache, dy, check_finite)
        x = cache.x
        r1, r2, w_v = (p.astype(x.dtype, copy=False) for p in self.params.values())
        dx, dw_v, dlogits = _mix_backward(cache, dy, w_v)
        dr1 = dlogits @ r2                                        # dR1 = dB R2     (N, K)
        dr2 = dlogits.T @ r1                                      # dR2 = dBᵀ R1    (N, K)
        return self._grads(dx, {"r1": dr1, "r2": dr2, "w_v": dw_v})

    def cost(self, n=None, d=None, *, backward=False):
        n, d, k = self.n, self.w_v.shape[0], self.r1.shape[1]
        f = 2 * n * n * k + 2 * n * d * d + 2 * n * n * d
        return Cost(f * (2 if backward else 1), 2 * n * n + 2 * n * d)


def _register():
    from .core import register
    register("synth_dense", DenseSynthesizer, chapter=5,
             description="Synthesizer: logits from a two-layer MLP of each token")
    register("synth_dense_causal", DenseSynthesizer, chapter=5, config={"causal": True},
             description="dense Synthesizer, causal")
    register("synth_random", RandomSynthesizer, chapter=5,
             description="Synthesizer: a learned N x N logit matrix")
    register("synth_factorized", FactorizedRandomSynthesizer, chapter=5,
             description="Synthesizer: a learned rank-K logit matrix R1 R2^T")


_register()
