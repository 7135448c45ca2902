r"""Chapter 4 — feature maps: the kernels that linear attention factorises.

Softmax attention weighs key ``j`` for query ``i`` by ``exp(q_iᵀk_j/√D)``.
Linear attention (:mod:`efficient_attention.linear`) replaces that weight by a
dot product of *features*,

.. math::

    \operatorname{sim}(q, k) = \varphi(q)^\top \varphi(k),\qquad
    \varphi: \mathbb{R}^D \to \mathbb{R}^F,

so that the sum over keys can be taken *before* the queries arrive. This
module holds the feature maps ``φ``; each has ``forward(x) -> (phi, cache)``
with ``x (..., N, D)`` and ``phi (..., N, F)``, ``backward(cache, dphi) -> dx``
(both with the keyword ``check_finite=True``: NaN or Inf in ``x`` or ``dphi``
raise ``ValueError``), ``n_features(d)`` (``F`` for inputs of width ``D``) and ``params`` (``{}``:
none of them learns).

* ``EluFeatureMap``: ``φ(x) = elu(x) + 1``, ``F = D`` (Katharopoulos et al. 2020,
  arXiv:2006.16236, §3.2);
* ``PerformerFeatureMap``: ``φ(x) = exp(ωᵀx′ − ‖x′‖²/2)/√m`` with ``x′ = x·D^(-1/4)``,
  ``F = m`` (FAVOR+, Choromanski et al. 2021, arXiv:2009.14794, §2.3);
* ``RandomFourierFeatureMap``: ``φ(x) = [sin(ωᵀx̂), cos(ωᵀx̂)]/√m`` with ``x̂ = x/‖x‖``,
  ``F = 2m`` (RFA, Peng et al. 2021, arXiv:2103.02143, §2).

**Why FAVOR+ is unbiased.** For ``ω ~ N(0, I_D)``,
``E[exp(ωᵀa)] = exp(‖a‖²/2)``, hence

.. math::

    \mathbb{E}_\omega\!\left[e^{\omega^\top q' - \|q'\|^2/2}\,
    e^{\omega^\top k' - \|k'\|^2/2}\right]
    = e^{\|q'+k'\|^2/2 - \|q'\|^2/2 - \|k'\|^2/2} = e^{q'^\top k'} = e^{q^\top k/\sqrt{D}}.

Every feature is positive, so the normaliser of linear attention never
changes sign (the trigonometric features of RFA can, and then the output can
blow up). Orthogonal rows (``draw(..., orthogonal=True)``: blocks of ``D``
orthonormal rows, each scaled by an independent chi(D) norm so that each row
is still marginally ``N(0, I_D)``) keep the estimate unbiased and lower its
variance (§2.4 of the paper).

**Stabilisation.** ``exp`` of ``ωᵀx′ − ‖x′‖²/2`` can under- or overflow.
:meth:`PerformerFeatureMap.forward` returns the exact features; linear
attention instead calls ``stable_forward(x, shift)``, which returns ``φ̂ = φ·e^{-s}``
and the log-scale ``s``: per row for queries (``shift="row"``), one value per
sequence for keys (``"shared"``: the maximum over the keys, non-causal), or
the data-independent bound ``s = max_r ‖ω_r‖²/2 ≥ ωᵀx′ − ‖x′‖²/2``
(``"bound"``, used by causal attention: it cannot depend on future tokens).
Linear attention multiplies its ``eps`` by ``e^{-(s_q + s_k)}`` in exchange,
so the stabiliser cancels *exactly*, ``eps`` included (see ``linear.py``).
Peers subtract a maximum over all keys in causal mode as well, which makes
a causal output depend on future keys (PEERS.md); we do not.

**Where peers differ.** performer-pytorch and the paper default to
``m = D·ln D`` features and redraw ``ω`` during training; we draw once from
``seed`` and never redraw (call ``draw`` again to redraw). RFA also gates
and learns ``σ``; we take ``ω`` as given (``draw(..., sigma=...)``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import config
from .kernels import elu as _elu
from .kernels import favor as _favor
from .kernels.fastexp import exp_
from .validate import (as_float_array, check_cache, check_dout, check_finite_array, check_int,
                       check_real, finite_policy)

__all__ = ["FeatureMap", "EluFeatureMap", "PerformerFeatureMap", "RandomFourierFeatureMap"]


def _check_x(x, name: str = "x", d: int | None = None, what: str = "") -> np.ndarray:
    x = as_float_array(x, name)
    if x.ndim < 1:
        raise ValueError(f"{name} must have shape (..., D) with at least 1 axis, got shape {x.shape}")
    if d is not None and x.shape[-1] != d:
        raise ValueError(f"{name} must have feature width D = {d}{what}, got shape {x.shape}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} must have feature width D >= 1, got shape {x.shape}")
    return x


def _check_omega(omega, name: str = "omega") -> np.ndarray:
    """``omega`` as a finite float (m, d) array with m >= 1, d >= 1 (kept in its own dtype)."""
    omega = as_float_array(omega, name)
    if omega.ndim != 2:
        raise ValueError(f"{name} must have shape (m, D), got shape {omega.shape}")
    if omega.shape[0] < 1:
        raise ValueError(f"{name} must have at least one row (m >= 1 random features), got shape {omega.shape}")
    if omega.shape[1] < 1:
        raise ValueError(f"{name} must have D >= 1 columns, got shape {omega.shape}")
    if not np.isfinite(omega).all():
        raise ValueError(f"{name} must contain only finite values")
    return omega


class FeatureMap:
    """Base class: ``φ`` applied to the last axis, ``(..., N, D) -> (..., N, F)``.

    The protocol :class:`~efficient_attention.LinearAttention` uses (a map of your own
    implements the first two; the others have defaults):

    ``forward(x) -> (phi, cache)`` and ``backward(cache, dphi) -> dx``
        the map and its gradient, with the input checks of a public entry point;
    ``stable_forward(x, shift) -> (phi_hat, log_scale, cache)``
        ``φ = φ̂·exp(log_scale)`` with a log-scale per row (``shift="row"``) or one per
        sequence (``"shared"``, ``"bound"``), so that exponential features cannot overflow
        (default: no shift, ``log_scale`` None); no input checks (the caller has made them);
    ``backward_consuming(cache, dphi) -> dx``
        ``backward`` for a ``dphi`` the caller gives up (the result may be written over it);
        no input checks;
    ``n_features(d)``, ``check_width(d)``, ``flops(n, d)``, ``params``
        the width ``F`` of ``φ``, the check of an input width, the FLOPs of its products and
        its learnable parameters.
    """

    #: whether ``_stable`` uses its ``shift`` (False: the log-scale is always 0)
    stabilised: bool = False

    @property
    def params(self) -> dict:
        """Learnable parameters (none for the maps of this module)."""
        return {}

    def n_features(self, d: int) -> int:  # pragma: no cover - abstract
        """``F``, the width of ``φ(x)`` for inputs of width ``d``."""
        raise NotImplementedError

    def check_width(self, d: int, name: str = "x") -> None:
        """Raise ``ValueError`` if inputs of width ``d`` do not fit this map."""

    def flops(self, n: int, d: int, *, backward: bool = False) -> int:
        """FLOPs of the map's matrix products for ``n`` rows of width ``d``
        (elementwise work such as ``exp`` is not counted; 0 for elu + 1)."""
        return 0

    def forward(self, x, *, check_finite: bool = True):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, cache, dphi, *, check_finite: bool = True):  # pragma: no cover - abstract
        raise NotImplementedError

    def _checked(self, x, check_finite: bool) -> np.ndarray:
        """``x`` as a float array of a width this map takes (and finite, with ``check_finite``):
        the checks of a public ``forward``, in one place."""
        x = _check_x(x)
        self.check_width(x.shape[-1])
        if check_finite:
            check_finite_array(x, "x")
        return x

    def backward_consuming(self, cache, dphi):
        """``backward`` for a ``dphi`` the caller gives up: the result may be written over it
        (linear attention's ``dφ(Q)``, ``dφ(K)`` are temporaries; reusing them saves two
        fresh ``N × D`` arrays per backward). Default: ``backward``."""
        return self.backward(cache, dphi)

    def __call__(self, x):
        return self.forward(x)[0]

    def stable_forward(self, x: np.ndarray, shift: str):
        """``(phi_hat, log_scale, cache)`` with ``phi = phi_hat * exp(log_scale)``.

        ``log_scale`` is None (zero), or ``(..., N)`` for ``shift="row"``, or
        ``(...)`` for ``"shared"`` and ``"bound"``. ``backward(cache, dphi_hat)``
        differentiates ``phi_hat`` with the log-scale held constant, which is the
        exact gradient of any quantity the log-scale cancels from.
        """
        phi, cache = self.forward(x)
        return phi, None, cache

    def __repr__(self):
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------- elu + 1
class _UnshiftedMap(FeatureMap):
    """A map whose features cannot overflow (no log-scale): ``forward`` checks ``x`` and calls
    ``_phi(x) -> (phi, cache)``; ``stable_forward`` calls it unchecked, with log-scale None."""

    @finite_policy
    def forward(self, x, *, check_finite: bool = True):
        return self._phi(self._checked(x, check_finite))

    def stable_forward(self, x, shift):
        phi, cache = self._phi(x)                  # no checks: linear attention has made them
        return phi, None, cache

    def _phi(self, x):  # pragma: no cover - abstract
        raise NotImplementedError


class _EluCache(NamedTuple):
    phi: np.ndarray      # (..., N, D); φ'(x) = min(φ, 1)


class EluFeatureMap(_UnshiftedMap):
    r"""``φ(x) = elu(x) + 1``: ``x + 1`` for ``x > 0``, ``eˣ`` otherwise (``F = D``).

    Katharopoulos et al. 2020, "Transformers are RNNs", arXiv:2006.16236, §3.2.
    Positive everywhere, so the normaliser of linear attention is positive.
    The derivative is ``1`` for ``x > 0`` and ``eˣ = φ(x)`` otherwise, i.e.
    ``min(φ(x), 1)``: the cache keeps ``φ`` alone.
    """

    def n_features(self, d):
        return int(d)

    def _phi(self, x):
        if _elu_kernel_path(x):                                       # one pass (kernels/elu.py)
            phi = np.empty(x.shape, np.float32)
            _elu.elu_plus_one(x.reshape(-1, x.shape[-1]), phi.reshape(-1, x.shape[-1]))
        else:
            phi = np.where(x > 0, x + 1, exp_(np.minimum(x, 0)))   # elu(x) + 1   (..., N, D)
        return phi, _EluCache(phi)

    @finite_policy
    def backward(self, cache: _EluCache, dphi, *, check_finite: bool = True):
        check_cache(cache, _EluCache, "EluFeatureMap")
        dphi = check_dout(dphi, cache.phi.shape, None, "dphi", check_finite=check_finite)
        return self._backward(cache, dphi, False)

    def backward_consuming(self, cache, dphi):
        return self._backward(cache, dphi, True)

    def _backward(self, cache, dphi, consume):
        phi = cache.phi
        dphi = np.asarray(dphi)
        if _elu_kernel_path(phi) and _elu_kernel_path(dphi) and dphi.shape == phi.shape:
            dx = dphi if consume and dphi.flags.writeable else np.empty(phi.shape, np.float32)
            w = phi.shape[-1]
            _elu.elu_backward(phi.reshape(-1, w), dphi.reshape(-1, w), dx.reshape(-1, w))
            return dx
        return dphi * np.minimum(phi, 1)                           # dx = dφ · min(φ, 1)


def _elu_kernel_path(x):
    """float32, C-contiguous, at least 1 row: the numba kernels (``config.FEATURE_ROW_KERNELS``
    permitting)."""
    return (config.FEATURE_ROW_KERNELS and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim >= 1
            and x.size > 0)


# --------------------------------------------------------------------------- FAVOR+
# rows of x per block in the Performer map: ``config.FEATURE_ROW_BLOCK`` (temporaries stay
# block-sized, in cache); float32 FAVOR+ (``kind="positive"``) and elu + 1 run their elementwise
# work in the numba kernels of :mod:`efficient_attention.kernels.favor` and
# :mod:`~efficient_attention.kernels.elu` unless ``config.FEATURE_ROW_KERNELS`` is False (then the
# NumPy lines, as for float64)


class _PerformerCache(NamedTuple):
    x: np.ndarray        # the input (a reference, no copy; x' = x·D^(-1/4) is recomputed)
    phi: np.ndarray      # exp(h - s)/√m            (..., N, F)
    omega: np.ndarray    # (m, D) in the computation dtype


class PerformerFeatureMap(FeatureMap):
    r"""FAVOR+ positive random features of the softmax kernel.

    .. math::

        \varphi(x)_r = \frac{1}{\sqrt m}\exp\!\big(\omega_r^\top x' - \tfrac12\|x'\|^2\big),
        \qquad x' = x\,D^{-1/4},

    so that ``E[φ(q)ᵀφ(k)] = exp(qᵀk/√D)`` exactly (Choromanski et al. 2021,
    arXiv:2009.14794, Lemma 1). ``kind="hyperbolic"`` uses ``±ω``
    (``F = 2m``, ``φ = [e^{ωᵀx′}, e^{-ωᵀx′}]·e^{-‖x′‖²/2}/√(2m)``), also
    positive and unbiased, with lower variance.

    Parameters
    ----------
    omega : (m, D) float array
        The random projections, drawn by :meth:`draw`. Not learnable: kept as
        given (``params`` is empty) and cast to the inputs' dtype per call.
    kind : {"positive", "hyperbolic"}
    """

    stabilised = True
    KINDS = ("positive", "hyperbolic")

    def __init__(self, omega, kind: str = "positive"):
        self.omega = _check_omega(omega)
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind

    @classmethod
    def draw(cls, d: int, m: int, seed: int = 0, orthogonal: bool = True) -> np.ndarray:
        """Random ``omega`` of shape ``(m, d)``, float64, every row marginally ``N(0, I_d)``.

        ``orthogonal=True``: blocks of ``d`` rows orthonormal within the block
        (QR of a Gaussian matrix, sign-corrected so the block is Haar
        distributed), each row rescaled by an independent chi(d) norm (the norm
        of a fresh Gaussian vector); the last block is truncated to fill ``m``.
        """
        d = check_int(d, "d", minimum=1)
        m = check_int(m, "m", minimum=1)
        seed = check_int(seed, "seed", minimum=0)
        if not isinstance(orthogonal, (bool, np.bool_)):
            raise TypeError(f"orthogonal must be True or False, got {type(orthogonal).__name__}")
        rng = np.random.default_rng(seed)
        if not orthogonal:
            return rng.standard_normal((m, d))
        blocks = []
        for _ in range(-(-m // d)):
            g = rng.standard_normal((d, d))
            qmat, r = np.linalg.qr(g)
            qmat = qmat * np.sign(np.diag(r))[None, :]              # Haar: fix the QR sign ambiguity
            blocks.append(qmat.T)                                   # rows orthonormal   (d, d)
        rows = np.concatenate(blocks, axis=0)[:m]                   # (m, d)
        norms = np.linalg.norm(rng.standard_normal((m, d)), axis=1)  # chi(d) lengths    (m,)
        return rows * norms[:, None]

    def n_features(self, d):
        m = self.omega.shape[0]
        return 2 * m if self.kind == "hyperbolic" else m

    def check_width(self, d, name="x"):
        if d != self.omega.shape[1]:
            raise ValueError(f"{name} must have feature width D = {self.omega.shape[1]} "
                             f"(omega has shape {self.omega.shape}), got D = {d}")

    def options(self):
        return {"omega": f"array{self.omega.shape}", "kind": self.kind}

    def flops(self, n, d, *, backward=False):
        """``x′ωᵀ`` forward and ``dh·ω`` backward: ``2·n·d·m`` each."""
        return 2 * n * d * self.omega.shape[0]

    def __repr__(self):
        return f"PerformerFeatureMap(omega=<{self.omega.shape[0]}x{self.omega.shape[1]}>, kind={self.kind!r})"

    def _exponent(self, x):
        """``h = ωᵀx′ − ‖x′‖²/2`` (both signs for hyperbolic) as ``(rows, F)``, and ``ω`` in x's
        dtype. ``ωᵀx′ = (ω D^(-1/4))ᵀx``: x′ itself is never formed; rows in blocks of
        ``config.FEATURE_ROW_BLOCK`` so that every temporary is block-sized."""
        block = config.FEATURE_ROW_BLOCK
        d = x.shape[-1]
        omega = self.omega.astype(x.dtype, copy=False)
        w_t = np.ascontiguousarray((omega * x.dtype.type(d ** -0.25)).T)   # (ω D^(-1/4))ᵀ  (D, m)
        half = x.dtype.type(0.5 * d ** -0.5)                              # ‖x′‖²/2 = ‖x‖²/(2√D)
        x2 = x.reshape(-1, d)
        m = omega.shape[0]
        h = np.empty((x2.shape[0], self.n_features(d)), x.dtype)         # (rows, F)
        for r0 in range(0, x2.shape[0], block):
            xb, hb = x2[r0:r0 + block], h[r0:r0 + block]
            np.matmul(xb, w_t, out=hb[:, :m])                            # ωᵀx′
            if self.kind == "hyperbolic":
                np.negative(hb[:, :m], out=hb[:, m:])                    # ±ωᵀx′
            hb -= (half * np.einsum("nd,nd->n", xb, xb))[:, None]        # − ‖x′‖²/2
        return h, omega

    def _bound(self, dtype):
        """``max_r ‖ω_r‖²/2``: no exponent ``ωᵀx′ − ‖x′‖²/2`` can exceed it (complete the square)."""
        return float(0.5 * np.max(np.einsum("md,md->m", self.omega, self.omega)))

    def _norm(self, x):
        m = self.omega.shape[0]
        return x.dtype.type((2 * m if self.kind == "hyperbolic" else m) ** -0.5)

    @finite_policy
    def forward(self, x, *, check_finite: bool = True):
        """Exact features ``φ(x)`` ``(..., N, F)`` (no stabiliser)."""
        return self._forward(self._checked(x, check_finite), None)[::2]

    def _forward(self, x, shift):
        block = config.FEATURE_ROW_BLOCK
        if shift not in (None, "row", "shared", "bound"):
            raise ValueError(f"shift must be None, 'row', 'shared' or 'bound', got {shift!r}")
        if self._kernel_path(x):
            return self._forward_kernels(x, shift)
        h, omega = self._exponent(x)                                 # (rows, F)
        lead, n_f = x.shape[:-1], h.shape[1]
        n = x.shape[-2] if x.ndim >= 2 else 1
        if shift == "row":
            s = h.max(axis=-1) if n_f else np.zeros(h.shape[0], x.dtype)      # (rows,)
            rows_s = s
            s = s.reshape(lead)                                               # (..., N)
        elif shift == "shared":
            hs = h.reshape(-1, n * n_f)
            s = (hs.max(axis=-1) if hs.shape[1] else np.zeros(hs.shape[0], x.dtype)).reshape(lead[:-1])
            rows_s = np.repeat(s.reshape(-1), n)
        elif shift == "bound":
            s = np.full(lead[:-1], self._bound(x.dtype), x.dtype)     # data-independent (...)
            rows_s = np.full(h.shape[0], s.flat[0] if s.size else 0, x.dtype)
        else:
            s, rows_s = None, None
        norm = self._norm(x)
        for r0 in range(0, h.shape[0], block):                   # φ̂ = e^{h - s}/√m, by blocks
            hb = h[r0:r0 + block]
            if rows_s is not None:
                hb -= rows_s[r0:r0 + block, None]
            exp_(hb)
            hb *= norm
        phi = h.reshape(lead + (n_f,))
        return phi, s, _PerformerCache(x, phi, omega)

    def _kernel_path(self, x):
        return (config.FEATURE_ROW_KERNELS and x.dtype == np.float32 and self.kind == "positive" and x.ndim >= 2
                and x.size > 0 and self.omega.shape[0] > 0)

    def _forward_kernels(self, x, shift):
        """``_forward`` for float32 positive features: per block of rows one BLAS product, then
        one pass of :func:`~efficient_attention.kernels.favor.favor_rows` (the same steps)."""
        block = config.FEATURE_ROW_BLOCK
        d = x.shape[-1]
        omega = self.omega.astype(np.float32)
        w_t = np.ascontiguousarray((omega * np.float32(d ** -0.25)).T)   # (ω D^(-1/4))ᵀ  (D, m)
        x2 = np.ascontiguousarray(x.reshape(-1, d))
        rows, m, n = x2.shape[0], omega.shape[0], x.shape[-2]
        lead = x.shape[:-1]
        h = np.empty((rows, m), np.float32)
        row_max = np.empty(rows, np.float32)
        mode = {"row": _favor.ROW_SHIFT, "shared": _favor.EXPONENT_ONLY}.get(shift, _favor.FIXED_SHIFT)
        fixed = self._bound(np.float32) if shift == "bound" else 0.0
        half, norm = 0.5 * d ** -0.5, float(self._norm(x))
        for r0 in range(0, rows, block):
            xb, hb = x2[r0:r0 + block], h[r0:r0 + block]
            np.matmul(xb, w_t, out=hb)                               # ωᵀx′
            _favor.favor_rows(hb, xb, half, norm, fixed, mode, row_max[r0:r0 + block])
        if shift == "row":
            s = row_max.reshape(lead)
        elif shift == "shared":                                      # the maximum over each sequence
            s = row_max.reshape(-1, n).max(axis=-1)
            rows_s = np.repeat(s, n)
            for r0 in range(0, rows, block):
                _favor.favor_scale_rows(h[r0:r0 + block], rows_s[r0:r0 + block], norm)
            s = s.reshape(lead[:-1])
        elif shift == "bound":
            s = np.full(lead[:-1], fixed, np.float32)
        else:
            s = None
        phi = h.reshape(lead + (m,))
        return phi, s, _PerformerCache(x, phi, omega)

    def stable_forward(self, x, shift):
        return self._forward(x, shift)

    @finite_policy
    def backward(self, cache: _PerformerCache, dphi, *, check_finite: bool = True):
        """``dx = D^(-1/4)·(dh·ω − (Σ_r dh_r)·x′)`` with ``dh = dφ ⊙ φ`` (hyperbolic: the two
        halves of ``dh`` enter ``ω`` with opposite signs), by blocks of ``ROW_BLOCK`` rows."""
        check_cache(cache, _PerformerCache, "PerformerFeatureMap")
        dphi = check_dout(dphi, cache.phi.shape, None, "dphi", check_finite=check_finite)
        return self._backward(cache, dphi, False)

    def backward_consuming(self, cache, dphi):
        return self._backward(cache, dphi, True)

    def _backward(self, cache, dphi, consume):
        block = config.FEATURE_ROW_BLOCK
        x, phi, omega = cache
        d = x.shape[-1]
        c = x.dtype.type(d ** -0.25)
        m = omega.shape[0]
        x2, phi2 = x.reshape(-1, d), phi.reshape(-1, phi.shape[-1])
        dphi2 = np.reshape(dphi, phi2.shape)
        if self._kernel_path(x) and phi2.dtype == np.float32 and np.asarray(dphi2).dtype == np.float32:
            return self._backward_kernels(x, phi2, np.asarray(dphi2), omega, consume)
        dx = np.empty(x2.shape, np.result_type(dphi2.dtype, phi2.dtype, omega.dtype))
        for r0 in range(0, x2.shape[0], block):
            rows = slice(r0, r0 + block)
            dh = dphi2[rows] * phi2[rows]                            # ∂φ/∂h = φ
            dproj = dh[:, :m] - dh[:, m:] if self.kind == "hyperbolic" else dh
            dxb = dx[rows]
            dxb[...] = dproj @ omega                                 # dh·ω
            dxb -= x2[rows] * (c * dh.sum(axis=-1))[:, None]         # − (Σ_r dh_r)·x′
            dxb *= c                                                 # dx = dx′·D^(-1/4)
        return dx.reshape(x.shape)

    def _backward_kernels(self, x, phi2, dphi2, omega, consume=False):
        """``backward`` for float32 positive features: per block of rows, one pass of
        :func:`~efficient_attention.kernels.favor.favor_grad_rows`, the BLAS product ``dh·ω``
        and one pass of :func:`~efficient_attention.kernels.favor.favor_dx_rows`. With
        ``consume`` and ``F = D``, ``dx`` is written over ``dφ`` (each block of ``dφ`` is read
        into ``dh`` before its rows of ``dx`` are written)."""
        block = config.FEATURE_ROW_BLOCK
        d = x.shape[-1]
        x2 = np.ascontiguousarray(x.reshape(-1, d))
        consume = consume and dphi2.shape == x2.shape and dphi2.flags.c_contiguous and dphi2.flags.writeable
        phi2, dphi2 = np.ascontiguousarray(phi2), np.ascontiguousarray(dphi2)
        rows = x2.shape[0]
        dx = dphi2 if consume else np.empty(x2.shape, np.float32)
        dh = np.empty((min(rows, block), phi2.shape[1]), np.float32)
        row_sum = np.empty(min(rows, block), np.float32)
        for r0 in range(0, rows, block):
            nb = min(block, rows - r0)
            sl = slice(r0, r0 + nb)
            _favor.favor_grad_rows(dphi2[sl], phi2[sl], dh[:nb], row_sum[:nb])   # dh = dφ ⊙ φ
            np.matmul(dh[:nb], omega, out=dx[sl])                               # dh·ω
            _favor.favor_dx_rows(dx[sl], x2[sl], row_sum[:nb], d ** -0.25)      # − (Σ_r dh_r)·x′, ·D^(-1/4)
        return dx.reshape(x.shape)


# --------------------------------------------------------------------------- RFA
class _RffCache(NamedTuple):
    xhat: np.ndarray     # x/‖x‖         (..., N, D)
    norm: np.ndarray     # ‖x‖ (floored) (..., N)
    sin: np.ndarray      # sin(ωᵀx̂)     (..., N, m)
    cos: np.ndarray      # cos(ωᵀx̂)     (..., N, m)
    omega: np.ndarray    # (m, D) in the computation dtype


class RandomFourierFeatureMap(_UnshiftedMap):
    r"""Random Fourier features of the normalised input (random feature attention).

    .. math::

        \varphi(x) = \frac{1}{\sqrt m}\big[\sin(\omega^\top \hat x),\ \cos(\omega^\top \hat x)\big],
        \qquad \hat x = x/\|x\|,

    so that for ``ω ~ N(0, σ²I)``, ``E[φ(q)ᵀφ(k)] = E cos(ωᵀ(q̂ − k̂)) =
    exp(−σ²‖q̂ − k̂‖²/2) = e^{−σ²}·exp(σ² q̂ᵀk̂)``: a softmax kernel with
    temperature ``σ²`` on unit vectors (the constant cancels in the
    normalisation). Peng et al. 2021, arXiv:2103.02143, §2–3. ``F = 2m``.

    Features can be negative, so a normaliser can come out near zero for
    small ``m`` (the output then blows up); FAVOR+ features cannot.
    A zero row ``x`` maps to ``x̂ = 0`` (its norm is floored at
    ``sqrt(tiny)`` of the dtype).
    """

    def __init__(self, omega):
        self.omega = _check_omega(omega)

    @classmethod
    def draw(cls, d: int, m: int, seed: int = 0, sigma: float = 1.0) -> np.ndarray:
        """``omega ~ N(0, σ² I_d)`` of shape ``(m, d)``, float64."""
        d = check_int(d, "d", minimum=1)
        m = check_int(m, "m", minimum=1)
        seed = check_int(seed, "seed", minimum=0)
        sigma = check_real(sigma, "sigma", minimum=0.0, strict=True)
        return sigma * np.random.default_rng(seed).standard_normal((m, d))

    def n_features(self, d):
        return 2 * self.omega.shape[0]

    def check_width(self, d, name="x"):
        if d != self.omega.shape[1]:
            raise ValueError(f"{name} must have feature width D = {self.omega.shape[1]} "
                             f"(omega has shape {self.omega.shape}), got D = {d}")

    def flops(self, n, d, *, backward=False):
        """``x̂ωᵀ`` forward and ``du·ω`` backward: ``2·n·d·m`` each."""
        return 2 * n * d * self.omega.shape[0]

    def __repr__(self):
        return f"RandomFourierFeatureMap(omega=<{self.omega.shape[0]}x{self.omega.shape[1]}>)"

    def _phi(self, x):
        omega = self.omega.astype(x.dtype, copy=False)
        floor = np.sqrt(np.finfo(x.dtype).tiny)
        norm = np.maximum(np.sqrt(np.einsum("...d,...d->...", x, x)), floor)   # ‖x‖      (..., N)
        xhat = x / norm[..., None]                                             # x̂        (..., N, D)
        u = xhat @ omega.T                                                     # ωᵀx̂      (..., N, m)
        s, c = np.sin(u), np.cos(u)
        scale = x.dtype.type(omega.shape[0] ** -0.5)
        phi = np.concatenate([s, c], axis=-1) * scale                          # (..., N, 2m)
        return phi, _RffCache(xhat, norm, s, c, omega)

    @finite_policy
    def backward(self, cache: _RffCache, dphi, *, check_finite: bool = True):
        check_cache(cache, _RffCache, "RandomFourierFeatureMap")
        dphi = check_dout(dphi, cache.sin.shape[:-1] + (2 * cache.omega.shape[0],), None, "dphi",
                          check_finite=check_finite)
        return self.backward_consuming(cache, dphi)

    def backward_consuming(self, cache, dphi):          # reads dphi, never writes it
        xhat, norm, s, c, omega = cache
        m = omega.shape[0]
        scale = xhat.dtype.type(m ** -0.5)
        du = (dphi[..., :m] * c - dphi[..., m:] * s) * scale                  # d sin = cos, d cos = −sin
        dxhat = du @ omega                                                     # (..., N, D)
        radial = np.einsum("...d,...d->...", xhat, dxhat)[..., None]
        return (dxhat - xhat * radial) / norm[..., None]                       # dx = (I − x̂x̂ᵀ)dx̂/‖x‖
