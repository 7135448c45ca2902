r"""Chapter 6 — no attention: other ways to mix tokens.

Attention is one *token mixer*: it lets token ``i`` read from tokens ``j``.
The lecture's last chapter shows mixers with no query–key scores at all.
Each maps ``x`` (..., N, D) to a sequence, with a hand-written backward.

**FNet** — :class:`FourierMixer` (Lee-Thorp et al. 2021, arXiv:2105.03824, §3.2).
The real part of the two-dimensional discrete Fourier transform over the
sequence and hidden axes, no parameters:

.. math::

    Y = \operatorname{Re}\big(F_N\, X\, F_D\big),\qquad
    (F_N)_{kn} = e^{-2\pi i\,kn/N}.

*Backward, derived.* The map is linear and real, so ``dX`` is its adjoint
applied to ``dY``. For real ``X`` and ``dY``,
``⟨dY, Re(F_N X F_D)⟩ = Re tr(dYᵀ F_N X F_D) = Re tr(F_D dYᵀ F_N X)
= ⟨Re(F_Nᵀ dY F_Dᵀ), X⟩``, and DFT matrices are symmetric (``F_Nᵀ = F_N``),
so

.. math::

    dX = \operatorname{Re}\big(F_N\, dY\, F_D\big) = \texttt{fft2}(dY).\mathrm{real}:

the layer is self-adjoint and its backward is its forward applied to ``dY``.
Cost ``O(N·D·log(N·D))``; the forward uses the real-input FFT along D
(half the columns) and rebuilds the other half from the Hermitian symmetry
``Y[k_1, k_2] = \overline{Y[-k_1, -k_2]}``. Any N (no parameters), not causal:
every output mixes every token.

**MLP-Mixer token mixing** — :class:`TokenMixingMLP` (Tolstikhin et al. 2021,
arXiv:2105.01601, §2). A two-layer MLP applied along the sequence axis, to
every channel (column) separately, with exact GELU:

.. math::

    Y = W_2^\top\,\operatorname{gelu}(W_1^\top X + b_1 \mathbf 1^\top) + b_2 \mathbf 1^\top,
    \qquad W_1 \in \mathbb{R}^{N\times D_h},\ W_2 \in \mathbb{R}^{D_h\times N},

``gelu(a) = a·Φ(a)``, ``Φ`` the standard normal CDF (``scipy.special.erf``),
``gelu'(a) = Φ(a) + a·φ(a)``. Backward: ``dB_2 = Σ dY``, ``dW_2 = Σ H dYᵀ``,
``dH = W_2 dY``, ``dA = dH ⊙ gelu'(A)``, ``db_1 = Σ dA``, ``dW_1 = Σ X dAᵀ``,
``dX = W_1 dA``. The paper's block adds a layer norm before and a residual
after; this layer is the MLP alone. Fixed N, not causal.

**gMLP spatial gating** — :class:`SpatialGatingUnit` (Liu et al. 2021,
arXiv:2105.08050, §2.1, eq. 3). Split the channels into halves ``U, Z``
(D even), normalise ``Z`` over its channels (layer norm, fixed affine
γ = 1, β = 0, ``eps`` = 1e-5), mix it along the sequence with a learned
N × N matrix ``W`` and a per-token bias ``b``, and gate ``U`` with it:

.. math::

    Y = U \odot \big(W\,\operatorname{LN}(Z) + b\,\mathbf 1^\top\big)
    \in \mathbb{R}^{N\times D/2}.

The unit halves the width (as in the paper, where it sits between the
block's expanding and contracting projections), so it is the one layer
here whose output is not ``(..., N, D)``. The registered, shape-keeping
layer is :class:`GatedMLP`, the gMLP block around it (without the block's
outer layer norm and residual): ``Y = SGU(gelu(X W_in + b_in)) W_out + b_out``.
With ``causal=True`` ``W`` is used lower-triangular (the paper's
autoregressive gMLP), so token i reads tokens ``j <= i`` only. Fixed N.
The paper initialises ``W`` near zero and ``b = 1`` (the unit starts as
``U`` itself); ``init`` does the same.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import erf

from .core import Cost, LayerGrads, SequenceLayer
from .layers import left_matmul, right_matmul
from .validate import (as_float_array, check_bool, check_cache, check_dout, check_int, check_real, check_x,
                       finite_policy)

__all__ = ["FourierMixer", "TokenMixingMLP", "SpatialGatingUnit", "GatedMLP", "gelu", "gelu_backward"]

_SQRT_HALF = np.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


def gelu(a: np.ndarray) -> np.ndarray:
    """Exact GELU ``a·Φ(a) = a/2·(1 + erf(a/√2))`` in ``a``'s dtype."""
    return (0.5 * a * (1.0 + erf(a * a.dtype.type(_SQRT_HALF)))).astype(a.dtype, copy=False)


def gelu_backward(a: np.ndarray, dout: np.ndarray) -> np.ndarray:
    """``dout ⊙ gelu'(a)`` with ``gelu'(a) = Φ(a) + a·φ(a)``."""
    t = a.dtype.type
    cdf = t(0.5) * (t(1.0) + erf(a * t(_SQRT_HALF)))
    pdf = t(_INV_SQRT_2PI) * np.exp(t(-0.5) * a * a)
    return (dout * (cdf + a * pdf)).astype(a.dtype, copy=False)


def _param(a, name, shape, letters):
    a = as_float_array(a, name)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {letters} = {tuple(shape)}, got {a.shape}")
    return a


def _matrix(a, name, letters):
    a = as_float_array(a, name)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"{name} must have shape {letters} with both axes non-empty, got {a.shape}")
    return a


def _batch_dot(a, b):
    """``Σ_batch Σ_last a[..., i, c] b[..., j, c]`` -> (I, J): one GEMM over the batch and last axes."""
    axes = list(range(a.ndim - 2)) + [a.ndim - 1]
    return np.tensordot(a, b, axes=(axes, axes))


def _repr(self):
    return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in self.options().items()) + ")"


# -- FNet ------------------------------------------------------------------------------

def _re_fft2(x: np.ndarray) -> np.ndarray:
    """``np.fft.fft2(x).real`` over the last two axes, from the real-input FFT (half the work)."""
    n, d = x.shape[-2:]
    half = np.fft.fft(np.fft.rfft(x, axis=-1), axis=-2).real        # Re Y[:, :D//2+1]   (..., N, D//2+1)
    y = np.empty(x.shape, dtype=x.dtype)
    y[..., : d // 2 + 1] = half
    if d // 2 + 1 < d:
        rows = (-np.arange(n)) % n                                  # Re Y[k1, k2] = Re Y[-k1, D-k2]
        y[..., d // 2 + 1:] = half[..., rows, 1: d - d // 2][..., ::-1]
    return y


class _FourierCache(NamedTuple):
    shape: tuple         # of x (..., N, D)
    dtype: np.dtype


class FourierMixer(SequenceLayer):
    r"""FNet: ``y = Re(fft2(x))`` over the sequence and hidden axes (no parameters, any N).

    Notes
    -----
    ``forward(x, *, check_finite=True)``; ``backward(cache, dy, *, check_finite=True)`` returns
    ``dx = Re(fft2(dy))`` (the map is self-adjoint, see the module docstring).
    """

    def __init__(self):
        pass

    def options(self):
        return {}

    __repr__ = _repr

    @classmethod
    def init(cls, n: int | None = None, d: int | None = None, seed: int = 0, **_unused):
        """The layer has no parameters; ``n``, ``d`` and ``seed`` are accepted for uniformity."""
        if _unused:
            raise TypeError(f"FourierMixer.init takes no options, got {sorted(_unused)}")
        return cls()

    @finite_policy
    def forward(self, x, *, check_finite: bool = True):
        x = check_x(x, check_finite=check_finite)
        if 0 in x.shape[-2:]:
            raise ValueError(f"x must have N >= 1 tokens and D >= 1 channels for the DFT, got shape {x.shape}")
        return _re_fft2(x), _FourierCache(x.shape, x.dtype)

    @finite_policy
    def backward(self, cache: _FourierCache, dy, *, check_finite: bool = True) -> LayerGrads:
        shape, dtype = check_cache(cache, _FourierCache, "FourierMixer")
        dy = check_dout(dy, shape, dtype, name="dy", check_finite=check_finite)
        return LayerGrads(_re_fft2(dy), {})                         # dX = Re(F_N dY F_D)

    def cost(self, n, d, *, backward=False):
        n, d = check_int(n, "n", minimum=1), check_int(d, "d", minimum=1)
        f = int(5 * n * d * np.log2(max(2, n * d)))                 # ~5 N D log2(N D) for a complex FFT
        return Cost(f * (2 if backward else 1), n * d)


# -- MLP-Mixer ------------------------------------------------------------------------

class _MixerCache(NamedTuple):
    x: np.ndarray        # (..., N, D)
    pre: np.ndarray      # A = W1ᵀ X + b1          (..., Dh, D)


class TokenMixingMLP(SequenceLayer):
    r"""MLP-Mixer's token mixing: ``Y = W2ᵀ gelu(W1ᵀ X + b1) + b2`` along the sequence axis.

    Parameters
    ----------
    w1 : (N, Dh), b1 : (Dh,), w2 : (Dh, N), b2 : (N,)

    Notes
    -----
    The biases broadcast over the channels (``b1`` per hidden unit,
    ``b2`` per output token). Tolstikhin et al. 2021, arXiv:2105.01601, §2.
    """

    def __init__(self, w1, b1, w2, b2):
        w1 = _matrix(w1, "w1", "(N, Dh)")
        n, dh = w1.shape
        self.w1 = w1
        self.b1 = _param(b1, "b1", (dh,), "(Dh,)")
        self.w2 = _param(w2, "w2", (dh, n), "(Dh, N)")
        self.b2 = _param(b2, "b2", (n,), "(N,)")
        self.n = n

    @property
    def params(self):
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    def options(self):
        return {"n": self.n, "dh": self.w1.shape[1]}

    __repr__ = _repr

    @classmethod
    def init(cls, n: int, d: int | None = None, seed: int = 0, *, dh: int | None = None, dtype=np.float64):
        """Normal weights of variance 1/fan-in, zero biases; ``dh`` defaults to ``max(1, n // 2)``
        (``d`` is not needed: the MLP acts on every channel alike)."""
        n = check_int(n, "n", minimum=1)
        dh = check_int(max(1, n // 2) if dh is None else dh, "dh", minimum=1)
        rng = np.random.default_rng(seed)
        w1 = rng.standard_normal((n, dh)) / np.sqrt(n)
        w2 = rng.standard_normal((dh, n)) / np.sqrt(dh)
        dtype = np.dtype(dtype)
        return cls(w1.astype(dtype), np.zeros(dh, dtype), w2.astype(dtype), np.zeros(n, dtype))

    @finite_policy
    def forward(self, x, *, check_finite: bool = True):
        x = check_x(x, n=self.n, check_finite=check_finite)
        w1, b1, w2, b2 = (p.astype(x.dtype, copy=False) for p in self.params.values())
        pre = left_matmul(w1.T, x) + b1[:, None]                              # A = W1ᵀ X + b1      (..., Dh, D)
        y = left_matmul(w2.T, gelu(pre)) + b2[:, None]                        # Y = W2ᵀ gelu(A) + b2 (..., N, D)
        return y, _MixerCache(x, pre)

    @finite_policy
    def backward(self, cache: _MixerCache, dy, *, check_finite: bool = True) -> LayerGrads:
        x, pre = check_cache(cache, _MixerCache, "TokenMixingMLP")
        dy = check_dout(dy, x.shape, x.dtype, name="dy", check_finite=check_finite)
        w1, _, w2, _ = (p.astype(x.dtype, copy=False) for p in self.params.values())
        db2 = dy.reshape(-1, *dy.shape[-2:]).sum(axis=(0, 2))      # db2 = Σ dY          (N,)
        dw2 = _batch_dot(gelu(pre), dy)                             # dW2 = Σ H dYᵀ       (Dh, N)
        dpre = gelu_backward(pre, left_matmul(w2, dy))                        # dA = W2 dY ⊙ gelu'(A) (..., Dh, D)
        db1 = dpre.reshape(-1, *dpre.shape[-2:]).sum(axis=(0, 2))  # db1 = Σ dA          (Dh,)
        dw1 = _batch_dot(x, dpre)                                   # dW1 = Σ X dAᵀ       (N, Dh)
        dx = left_matmul(w1, dpre)                                            # dX = W1 dA          (..., N, D)
        grads = {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
        return LayerGrads(dx, {k: g.astype(self.params[k].dtype, copy=False) for k, g in grads.items()})

    def cost(self, n=None, d=None, *, backward=False):
        """FLOPs of the two token GEMMs for ``d`` channels (``d`` is required: the
        layer works for any width)."""
        d = check_int(d, "d", minimum=1)
        f = 4 * self.n * self.w1.shape[1] * d
        return Cost(f * (2 if backward else 1), 2 * self.w1.shape[1] * d + self.n * d)


# -- gMLP ----------------------------------------------------------------------------------

class _SGUCache(NamedTuple):
    u: np.ndarray        # (..., N, F)
    zn: np.ndarray       # LN(Z)                 (..., N, F)
    inv: np.ndarray      # 1/sqrt(var + eps)      (..., N, 1)
    gate: np.ndarray     # G = W LN(Z) + b        (..., N, F)
    x_shape: tuple
    dtype: np.dtype


class SpatialGatingUnit(SequenceLayer):
    r"""gMLP's spatial gating unit: ``Y = U ⊙ (W·LN(Z) + b)``, ``[U | Z] = X`` — output width D/2.

    Parameters
    ----------
    w : (N, N)
        Token mixing matrix of the gate.
    b : (N,)
        Per-token bias of the gate.
    causal : bool
        Use ``tril(W)`` (token i reads ``j <= i``); the gradient of the upper
        triangle is then 0.
    eps : float
        Layer-norm epsilon (the norm has no learnable affine).

    Notes
    -----
    ``forward(x)`` takes ``x (..., N, D)`` with D even and returns
    ``(..., N, D/2)`` — the paper's unit. Use :class:`GatedMLP` for a layer
    that keeps the width. Liu et al. 2021, arXiv:2105.08050, §2.1.
    """

    def __init__(self, w, b, causal: bool = False, eps: float = 1e-5):
        w = as_float_array(w, "w")
        if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 1:
            raise ValueError(f"w must have shape (N, N), got {w.shape}")
        self.w = w
        self.n = w.shape[0]
        self.b = _param(b, "b", (self.n,), "(N,)")
        self.causal = check_bool(causal, "causal")
        self.eps = check_real(eps, "eps", minimum=0.0, strict=True)

    @property
    def params(self):
        return {"w": self.w, "b": self.b}

    def options(self):
        return {"n": self.n, "causal": self.causal, "eps": self.eps}

    __repr__ = _repr

    @classmethod
    def init(cls, n: int, d: int | None = None, seed: int = 0, *, causal: bool = False, eps: float = 1e-5,
             dtype=np.float64):
        """The paper's initialisation: ``W ~ U(-1e-3/N, 1e-3/N)``, ``b = 1`` (the gate starts at 1)."""
        n = check_int(n, "n", minimum=1)
        rng = np.random.default_rng(seed)
        lim = 1e-3 / n
        w = rng.uniform(-lim, lim, (n, n))
        dtype = np.dtype(dtype)
        return cls(w.astype(dtype), np.ones(n, dtype), causal=causal, eps=eps)

    def _w(self, dtype):
        w = self.w.astype(dtype, copy=False)
        return np.tril(w) if self.causal else w

    @finite_policy
    def forward(self, x, *, check_finite: bool = True):
        x = check_x(x, n=self.n, check_finite=check_finite)
        d = x.shape[-1]
        if d % 2:
            raise ValueError(f"x must have an even feature width D (split into U and Z), got shape {x.shape}")
        f = d // 2
        u, z = x[..., :f], x[..., f:]                               # [U | Z] = X           (..., N, F) each
        mu = z.mean(axis=-1, keepdims=True)
        inv = 1.0 / np.sqrt(z.var(axis=-1, keepdims=True) + x.dtype.type(self.eps))
        zn = (z - mu) * inv                                         # LN(Z) over channels   (..., N, F)
        gate = left_matmul(self._w(x.dtype), zn) + self.b.astype(x.dtype, copy=False)[:, None]  # G = W LN(Z) + b
        return u * gate, _SGUCache(u, zn, inv, gate, x.shape, x.dtype)   # Y = U ⊙ G   (..., N, F)

    @finite_policy
    def backward(self, cache: _SGUCache, dy, *, check_finite: bool = True) -> LayerGrads:
        u, zn, inv, gate, x_shape, dtype = check_cache(cache, _SGUCache, "SpatialGatingUnit")
        dy = check_dout(dy, u.shape, dtype, name="dy", check_finite=check_finite)
        du = dy * gate                                              # dU = dY ⊙ G
        dgate = dy * u                                              # dG = dY ⊙ U           (..., N, F)
        db = dgate.reshape(-1, *dgate.shape[-2:]).sum(axis=(0, 2))  # db = Σ dG             (N,)
        dw = _batch_dot(dgate, zn)                                  # dW = Σ dG LN(Z)ᵀ      (N, N)
        if self.causal:
            dw = np.tril(dw)
        dzn = left_matmul(self._w(dtype).T, dgate)                            # dLN = Wᵀ dG
        # dZ = (dLN - mean(dLN) - LN(Z)·mean(dLN ⊙ LN(Z))) / σ   (layer-norm backward)
        dz = inv * (dzn - dzn.mean(axis=-1, keepdims=True) - zn * (dzn * zn).mean(axis=-1, keepdims=True))
        dx = np.concatenate([du, dz], axis=-1)                      # (..., N, D)
        return LayerGrads(dx, {"w": dw.astype(self.w.dtype, copy=False), "b": db.astype(self.b.dtype, copy=False)})

    def cost(self, n=None, d=None, *, backward=False):
        """FLOPs of the N × N gate product for an input of ``d`` channels (required)."""
        d = check_int(d, "d", minimum=2)
        f = 2 * self.n * self.n * (d // 2)
        return Cost(f * (2 if backward else 1), 3 * self.n * d)


class _GatedCache(NamedTuple):
    x: np.ndarray        # (..., N, D)
    pre: np.ndarray      # A = X W_in + b_in      (..., N, 2F)
    s: np.ndarray        # SGU(gelu(A))           (..., N, F)
    sgu: _SGUCache


class GatedMLP(SequenceLayer):
    r"""The gMLP block around a spatial gating unit: ``Y = SGU(gelu(X W_in + b_in)) W_out + b_out``.

    Parameters
    ----------
    w_in : (D, 2F), b_in : (2F,)
        Channel expansion; the SGU splits its 2F channels into U and Z.
    w, b : (N, N), (N,)
        The SGU's gate (params ``w`` and ``b``).
    w_out : (F, D), b_out : (D,)
        Channel contraction back to D.
    causal, eps
        Passed to :class:`SpatialGatingUnit`.

    Notes
    -----
    Keeps the shape ``(..., N, D)``; the block's outer layer norm and residual
    are left to the caller. Liu et al. 2021, arXiv:2105.08050, §2 (Fig. 1).
    """

    def __init__(self, w_in, b_in, w, b, w_out, b_out, causal: bool = False, eps: float = 1e-5):
        w_in = _matrix(w_in, "w_in", "(D, 2F)")
        d, f2 = w_in.shape
        if f2 % 2:
            raise ValueError(f"w_in must have shape (D, 2F) with an even output width, got {w_in.shape}")
        f = f2 // 2
        self.w_in = w_in
        self.b_in = _param(b_in, "b_in", (f2,), "(2F,)")
        self.w_out = _param(w_out, "w_out", (f, d), "(F, D)")
        self.b_out = _param(b_out, "b_out", (d,), "(D,)")
        self.sgu = SpatialGatingUnit(w, b, causal=causal, eps=eps)
        self.n, self.d, self.f = self.sgu.n, d, f

    @property
    def causal(self):
        return self.sgu.causal

    @property
    def params(self):
        return {"w_in": self.w_in, "b_in": self.b_in, "w": self.sgu.w, "b": self.sgu.b,
                "w_out": self.w_out, "b_out": self.b_out}

    def options(self):
        return {"n": self.n, "d": self.d, "f": self.f, "causal": self.causal}

    __repr__ = _repr

    @classmethod
    def init(cls, n: int, d: int, seed: int = 0, *, f: int | None = None, causal: bool = False,
             eps: float = 1e-5, dtype=np.float64):
        """Normal projections of variance 1/fan-in, zero biases, the SGU's near-identity gate;
        ``f`` (the gated width) defaults to ``d`` (the paper uses d_ffn / 2 = 3·d)."""
        n, d = check_int(n, "n", minimum=1), check_int(d, "d", minimum=1)
        f = check_int(d if f is None else f, "f", minimum=1)
        rng = np.random.default_rng(seed)
        w_in = rng.standard_normal((d, 2 * f)) / np.sqrt(d)
        w_out = rng.standard_normal((f, d)) / np.sqrt(f)
        sgu = SpatialGatingUnit.init(n, seed=seed + 1, causal=causal, eps=eps)
        dtype = np.dtype(dtype)
        return cls(w_in.astype(dtype), np.zeros(2 * f, dtype), sgu.w.astype(dtype), sgu.b.astype(dtype),
                   w_out.astype(dtype), np.zeros(d, dtype), causal=causal, eps=eps)

    @finite_policy
    def forward(self, x, *, check_finite: bool = True):
        x = check_x(x, d=self.d, n=self.n, check_finite=check_finite)
        dt = x.dtype
        pre = right_matmul(x, self.w_in.astype(dt, copy=False)) + self.b_in.astype(dt, copy=False)   # A (..., N, 2F)
        s, sgu_cache = self.sgu.forward(gelu(pre), check_finite=False)   # S = SGU(gelu(A))  (..., N, F)
        y = right_matmul(s, self.w_out.astype(dt, copy=False)) + self.b_out.astype(dt, copy=False)   # Y (..., N, D)
        return y, _GatedCache(x, pre, s, sgu_cache)

    @finite_policy
    def backward(self, cache: _GatedCache, dy, *, check_finite: bool = True) -> LayerGrads:
        x, pre, s, sgu_cache = check_cache(cache, _GatedCache, "GatedMLP")
        dy = check_dout(dy, x.shape, x.dtype, name="dy", check_finite=check_finite)
        dt = x.dtype
        db_out = dy.reshape(-1, self.d).sum(axis=0)                 # db_out = Σ dY        (D,)
        dw_out = s.reshape(-1, self.f).T @ dy.reshape(-1, self.d)   # dW_out = Sᵀ dY       (F, D)
        g = self.sgu.backward(sgu_cache, right_matmul(dy, self.w_out.astype(dt, copy=False).T),
                              check_finite=False)                   # dS = dY W_outᵀ
        dpre = gelu_backward(pre, g.dx)                             # dA = dH ⊙ gelu'(A)   (..., N, 2F)
        db_in = dpre.reshape(-1, 2 * self.f).sum(axis=0)            # db_in = Σ dA         (2F,)
        dw_in = x.reshape(-1, self.d).T @ dpre.reshape(-1, 2 * self.f)   # dW_in = Xᵀ dA   (D, 2F)
        dx = right_matmul(dpre, self.w_in.astype(dt, copy=False).T)            # dX = dA W_inᵀ        (..., N, D)
        grads = {"w_in": dw_in, "b_in": db_in, "w": g.params["w"], "b": g.params["b"],
                 "w_out": dw_out, "b_out": db_out}
        params = self.params
        return LayerGrads(dx, {k: v.astype(params[k].dtype, copy=False) for k, v in grads.items()})

    def cost(self, n=None, d=None, *, backward=False):
        n, d, f = self.n, self.d, self.f
        proj = 2 * n * d * 2 * f + 2 * n * f * d                    # X W_in and S W_out
        return Cost(proj * (2 if backward else 1), 4 * n * f) + self.sgu.cost(n, 2 * f, backward=backward)


def _register():
    from .core import register
    register("fnet", FourierMixer, chapter=6, description="FNet: real part of the 2-D DFT (no parameters)")
    register("mixer_token_mlp", TokenMixingMLP, chapter=6,
             description="MLP-Mixer token-mixing MLP along the sequence axis (exact GELU)")
    register("gmlp", GatedMLP, chapter=6,
             description="gMLP block: channel expansion, spatial gating unit, contraction")
    register("gmlp_causal", GatedMLP, chapter=6, config={"causal": True},
             description="gMLP block with a causal (lower-triangular) spatial gate")


_register()
