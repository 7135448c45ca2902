r"""Chapter 4 — change the multiplication order: linear attention.

Ignore the softmax for a moment: attention is the product of three matrices,
``O = (Q Kᵀ) V`` (the lecture writes it ``V(KQ)`` with tokens as columns).
Matrix products are associative, so it is also ``O = Q (Kᵀ V)``
(the lecture's ``(VK)Q``), and the two orders cost very different amounts
(``N`` queries and keys, widths ``D`` and ``Dv``)::

    (Q Kᵀ) V :  N·N·D  +  N·N·Dv  = (D + Dv)·N²   multiplications
    Q (Kᵀ V) :  N·D·Dv +  N·D·Dv  = 2·D·Dv·N      multiplications

The softmax is what stops the reordering. Linear attention replaces
``exp(qᵀk/√D)`` by a product of features ``φ(q)ᵀφ(k)``
(:mod:`efficient_attention.feature_maps`) and keeps the normalisation:

.. math::

    o_i = \frac{\varphi(q_i)^\top \sum_j \varphi(k_j) v_j^\top}
               {\varphi(q_i)^\top \sum_j \varphi(k_j) + \varepsilon}
        = \frac{\varphi(q_i)^\top S}{\varphi(q_i)^\top z + \varepsilon},
    \qquad S = \varphi(K)^\top V \in \mathbb{R}^{F\times D_v},\ z = \varphi(K)^\top \mathbf 1 .

Non-causal: two matrix products, ``O(N·F·Dv)`` time, ``O(N·(F + Dv))``
memory. Causal (``j ≤ i``): ``S`` and ``z`` become prefix sums ``S_i, z_i``,
computed by a scan (:mod:`efficient_attention.kernels.linear`); read
left to right it is a recurrent network whose state is ``(S, z)`` —
"Transformers are RNNs" (Katharopoulos et al. 2020, arXiv:2006.16236, §3.4),
which is what :meth:`LinearAttention.step` decodes, one token at a time,
in ``O(F·Dv)`` per token whatever the position.

Backward (``g_i = dO_i/den_i``, ``c_i = −dO_i·o_i/den_i``), non-causal:

.. math::

    d\varphi(Q) = G S^\top + c\,z^\top,\quad dS = \varphi(Q)^\top G,\quad dz = \varphi(Q)^\top c,\quad
    d\varphi(K) = V\,dS^\top + \mathbf 1\,dz^\top,\quad dV = \varphi(K)\,dS,

and the feature maps' backward gives ``dQ, dK``.

**Stabiliser.** FAVOR+ features are exponentials; they are evaluated as
``φ̂ = φ·e^{-s}`` with a per-query ``s_q`` and one ``s_k`` per sequence (the
key maximum, or in causal mode the data-independent bound ``max‖ω‖²/2``, so
that no output depends on a future token). Since ``o_i`` is homogeneous of
degree 0 in ``(φ(q_i), φ(K), ε)``, replacing ``ε`` by ``ε_i = ε·e^{-(s_{q,i}+s_k)}``
makes the stabiliser cancel *exactly*: the output is the formula above,
whatever ``s``. (``ε_i`` is capped at ``ε·e^{80}`` in float32 and ``ε·e^{600}``
in float64; the cap only binds when the feature sum is below ``ε`` by that
factor, and the output then is 0 to working precision anyway.)

**Where peers differ.** fast-transformers and the paper: elu+1 on raw
``q, k``, ``ε = 1e-6`` added to the denominator (as here). performer-pytorch
adds its ``eps`` to the features, and stabilises keys with a maximum over all
keys, also in causal mode. Shen et al.'s efficient attention (below) has no
``1/√D`` and a normaliser of exactly 1.

EfficientAttention
------------------
Shen et al. 2021, "Efficient Attention: Attention with Linear Complexities",
arXiv:1812.01243, §3.2: ``O = ρ_q(Q) (ρ_k(K)ᵀ V)`` with ``ρ_q`` the softmax
over each query's features and ``ρ_k`` the softmax over the sequence, for each
key feature. Every row of ``ρ_q(Q)ρ_k(K)ᵀ`` sums to 1, like softmax attention.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import config
from .core import AttentionCore, Cost, Grads
from .dense import causal_mask
from .feature_maps import (EluFeatureMap, FeatureMap, PerformerFeatureMap,
                           RandomFourierFeatureMap)
from .kernels import linear as _kernels
from .softmax import softmax, softmax_backward
from .validate import (as_float_array, check_bool, check_cache, check_dout, check_finite_array,
                       check_int, check_qkv, check_real, finite_policy)

__all__ = ["LinearAttention", "LinearState", "EfficientAttention"]

METHODS = ("auto", "scan", "chunked", "numpy")
# the NumPy cumsum reference path runs by blocks of config.LINEAR_NUMPY_BLOCK tokens
# (memory B·block·F·Dv)


def _safe_inv(den):
    """1/den, 0 where den == 0 (a zero normaliser gives output 0 and zero gradient)."""
    nz = den != 0
    return np.where(nz, 1 / np.where(nz, den, 1), 0).astype(den.dtype, copy=False)


def _eps_rows(eps, log_q, log_k, shape, dtype):
    """``ε_i = ε·e^{-(s_q,i + s_k)}`` (the stabiliser's exchange), shape ``(..., N)``."""
    if log_q is None and log_k is None:
        return np.full(shape, eps, dtype)
    if eps == 0:
        return np.zeros(shape, dtype)
    lq = 0 if log_q is None else log_q
    lk = 0 if log_k is None else log_k[..., None]
    cap = 80.0 if dtype == np.float32 else 600.0
    expo = np.minimum(-(lq + lk), cap)
    return np.broadcast_to(dtype.type(eps) * np.exp(expo).astype(dtype), shape).astype(dtype)


class _LinearCache(NamedTuple):
    phq: np.ndarray          # φ̂(q)                    (..., N, F)
    phk: np.ndarray          # φ̂(k) (causal: N rows)   (..., N or M, F)
    v: np.ndarray            # (..., M or N, Dv)
    cache_q: object          # feature-map caches
    cache_k: object
    out: np.ndarray          # (..., N, Dv)
    den: np.ndarray          # (..., N)
    s: np.ndarray | None     # S = φ̂(K)ᵀV (non-causal)  (..., F, Dv)
    z: np.ndarray | None     # z = φ̂(K)ᵀ1               (..., F)
    m: int                   # number of keys M
    states: object = None    # causal scan: the prefix-sum state every config.LINEAR_CHECKPOINT tokens


def _forward_noncausal(phq, phk, v, eps_rows):
    s = np.swapaxes(phk, -1, -2) @ v                        # S = φ(K)ᵀV            (..., F, Dv)
    z = phk.sum(axis=-2)                                    # z = φ(K)ᵀ1            (..., F)
    out = phq @ s                                           # φ(Q) S                (..., N, Dv)
    den = (phq @ z[..., None])[..., 0] + eps_rows           # φ(Q) z + ε            (..., N)
    out *= _safe_inv(den)[..., None]                        # in place: one N × Dv array, not two
    return out, den, s, z


def _backward_noncausal(phq, phk, v, out, den, s, z, dout):
    inv = _safe_inv(den)
    dv_ = dout.shape[-1]
    # [G | c] with g = dO/den, c = −dO·o/den side by side, so that each product below is one
    # GEMM: dφ(Q) = [G | c][S | z]ᵀ = G Sᵀ + c zᵀ and [dS | dz] = φ(Q)ᵀ[G | c]
    gc = np.empty(dout.shape[:-1] + (dv_ + 1,), dout.dtype)                   # (..., N, Dv + 1)
    np.multiply(dout, inv[..., None], out=gc[..., :dv_])
    gc[..., dv_] = -np.einsum("...nc,...nc->...n", dout, out) * inv
    sz = np.concatenate([s, z[..., None]], axis=-1)                            # [S | z]  (..., F, Dv + 1)
    dphq = gc @ np.swapaxes(sz, -1, -2)                     # G Sᵀ + c zᵀ           (..., N, F)
    dsz = np.swapaxes(phq, -1, -2) @ gc                     # [dS | dz] = φ(Q)ᵀ[G | c]  (..., F, Dv + 1)
    del gc
    ds, dz = dsz[..., :dv_], dsz[..., dv_]
    dphk = v @ np.swapaxes(ds, -1, -2)                      # V dSᵀ                 (..., M, F)
    dphk += dz[..., None, :]                                # + 1 dzᵀ (in place)
    dv = phk @ ds                                           # dV = φ(K) dS          (..., M, Dv)
    return dphq, dphk, dv


def _flat(x):
    """``(..., T, W)`` -> contiguous ``(BH, T, W)``."""
    return np.ascontiguousarray(x.reshape((-1,) + x.shape[-2:]))


def _forward_causal(phq, phk, v, eps_rows, method):
    batch = phq.shape[:-2]
    a, b, vv = _flat(phq), _flat(phk), _flat(v)
    e = np.ascontiguousarray(eps_rows.reshape((-1, eps_rows.shape[-1])))
    states = None
    if method == "chunked":
        out, den = _kernels.chunked_forward(a, b, vv, e)
    elif method == "numpy":
        out, den = _kernels.causal_forward_reference(a, b, vv, e, block=config.LINEAR_NUMPY_BLOCK)
    else:        # the scan saves its state every config.LINEAR_CHECKPOINT tokens for the backward's sweep
        out, den, states = _kernels.causal_forward(a, b, vv, e, states=True)
    return out.reshape(batch + out.shape[-2:]), den.reshape(batch + den.shape[-1:]), states


def _backward_causal(phq, phk, v, out, den, dout, method, states):
    batch = phq.shape[:-2]
    args = [_flat(phq), _flat(phk), _flat(v), _flat(out),
            np.ascontiguousarray(den.reshape((-1, den.shape[-1]))), _flat(dout)]
    if method == "numpy":
        da, db, dv = _kernels.causal_backward_reference(*args, block=config.LINEAR_NUMPY_BLOCK)
    else:
        da, db, dv = (_kernels.chunked_backward(*args) if method == "chunked"
                      else _kernels.causal_backward(*args, states=states))
    return (da.reshape(batch + da.shape[-2:]), db.reshape(batch + db.shape[-2:]),
            dv.reshape(batch + dv.shape[-2:]))


class LinearState(NamedTuple):
    """The recurrent state of causal linear attention after ``t`` tokens.

    ``s = Σ_{j≤t} φ̂(k_j) v_jᵀ`` ``(..., F, Dv)``, ``z = Σ_{j≤t} φ̂(k_j)`` ``(..., F)``,
    ``log_k`` the key stabiliser ``s_k`` (``(...)``, or None for maps without one),
    ``t`` the number of tokens consumed.
    """

    s: np.ndarray
    z: np.ndarray
    log_k: np.ndarray | None
    t: int


class LinearAttention(AttentionCore):
    r"""Linear attention ``o_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / (φ(q_i)ᵀ Σ_j φ(k_j) + eps)``.

    Parameters
    ----------
    feature_map : FeatureMap
        ``EluFeatureMap()`` (linear transformer), ``PerformerFeatureMap(omega)``
        (FAVOR+), ``RandomFourierFeatureMap(omega)`` (RFA), or any object with
        ``forward(x) -> (phi, cache)``, ``backward(cache, dphi) -> dx`` and
        ``n_features(d)``.
    causal : bool
        Sum over ``j <= i`` only (prefix sums; ``N != M`` allowed: keys past the
        last query are unused, queries past the last key see all keys).
    eps : float
        ``>= 0``, added to the normaliser (the attribute ``eps``).
    method : {"auto", "scan", "chunked", "numpy"}
        Causal evaluation: the numba prefix-sum scan; chunks of 64 tokens
        (dense masked products inside a chunk via BLAS, a carried state between
        chunks); or the NumPy ``cumsum`` reference in blocks of 256 tokens
        (slow, no numba). All compute the same function. ``"auto"`` is the scan, which
        was faster on the benchmark machine (see ``benchmarks/bench_linear.py``).

    Notes
    -----
    ``cost()`` counts the matrix products of the reordered form (the
    normaliser's matrix-vector products are left out, as the lecture does):
    ``2·F·Dv·N`` multiplications forward for ``N = M``, against
    ``(D + Dv)·N²`` for :class:`~efficient_attention.DenseAttention`, plus
    the feature map's own matrix products (``feature_map.flops``: none for
    elu + 1, the projection ``ωᵀx`` for FAVOR+ and RFA, ``2·N·D·m`` FLOPs
    per input, as many as the attention itself when ``m = D = Dv``).
    ``dense_mask`` is None (an approximation); ``reference_mask(n, m)`` is
    the mask of the softmax attention it approximates (causal or None).
    """

    def __init__(self, feature_map, causal: bool = False, eps: float = 1e-6, method: str = "auto"):
        for attr in ("forward", "backward", "n_features"):
            if not callable(getattr(feature_map, attr, None)):
                raise TypeError(f"feature_map must have forward, backward and n_features methods "
                                f"(e.g. EluFeatureMap()), got {type(feature_map).__name__}")
        self.feature_map = feature_map
        self.causal = check_bool(causal, "causal")
        self.eps = check_real(eps, "eps", minimum=0.0)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.method = method

    def options(self):
        return {"feature_map": self.feature_map, "causal": self.causal, "eps": self.eps}

    @property
    def params(self):
        """``{}``: nothing is learned here (FAVOR+'s ``omega`` is a fixed random draw)."""
        return {}

    def reference_mask(self, n, m=None):
        """The mask of the softmax attention this core approximates."""
        return causal_mask(n, m) if self.causal else None

    # ------------------------------------------------------------------ features
    def _features(self, x, name, shift):
        fm = self.feature_map
        if hasattr(fm, "check_width"):
            fm.check_width(x.shape[-1], name)
        if isinstance(fm, FeatureMap):
            phi, log_scale, cache = fm.stable_forward(x, shift)
        else:
            (phi, cache), log_scale = fm.forward(x), None
        phi = np.asarray(phi)
        if phi.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"feature_map must map {name} {x.shape} to (..., {x.shape[-2]}, F), "
                             f"got {phi.shape}")
        return phi.astype(x.dtype, copy=False), log_scale, cache

    @finite_policy
    def forward(self, q, k, v, *, check_finite: bool = True):
        q, k, v = check_qkv(q, k, v, check_finite=check_finite)
        n, m = q.shape[-2], k.shape[-2]
        phq, lq, cq = self._features(q, "q", "row")
        phk, lk, ck = self._features(k, "k", "bound" if self.causal else "shared")
        if phq.shape[-1] != phk.shape[-1]:
            raise ValueError(f"feature_map must give q and k the same number of features, "
                             f"got {phq.shape[-1]} and {phk.shape[-1]}")
        eps_rows = _eps_rows(self.eps, lq, lk, q.shape[:-1], q.dtype)
        if not self.causal:
            out, den, s, z = _forward_noncausal(phq, phk, v, eps_rows)
            return out, _LinearCache(phq, phk, v, cq, ck, out, den, s, z, m)
        phk_n, v_n = _fit_keys(phk, v, n)                    # causal: key rows aligned with queries
        out, den, states = _forward_causal(phq, phk_n, v_n, eps_rows, self._method())
        return out, _LinearCache(phq, phk_n, v_n, cq, ck, out, den, None, None, m, states)

    def _method(self):
        return "scan" if self.method == "auto" else self.method

    @finite_policy
    def backward(self, cache: _LinearCache, dout, *, check_finite: bool = True) -> Grads:
        check_cache(cache, _LinearCache, "LinearAttention")
        dout = check_dout(dout, cache.out.shape, cache.out.dtype, check_finite=check_finite)
        if self.causal:
            dphq, dphk, dv = _backward_causal(cache.phq, cache.phk, cache.v, cache.out, cache.den,
                                              dout, self._method(), cache.states)
            dphk, dv = dphk[..., :cache.m, :], dv[..., :cache.m, :]
            if dphk.shape[-2] < cache.m:                     # keys past the last query: no gradient
                dphk, dv = _pad_rows(dphk, cache.m), _pad_rows(dv, cache.m)
        else:
            dphq, dphk, dv = _backward_noncausal(cache.phq, cache.phk, cache.v, cache.out, cache.den,
                                                 cache.s, cache.z, dout)
        # dφ(Q), dφ(K) are temporaries: a FeatureMap may write dQ, dK over them
        fm_backward = (self.feature_map.backward_consuming if isinstance(self.feature_map, FeatureMap)
                       else self.feature_map.backward)
        dq = fm_backward(cache.cache_q, dphq)
        del dphq                                                 # keep the peak at O(N·(F + Dv))
        dk = fm_backward(cache.cache_k, dphk)
        return Grads(dq, dk, dv, {})

    # ------------------------------------------------------------------ the RNN view
    @finite_policy
    def step(self, state, q_t, k_t, v_t, *, check_finite: bool = True):
        r"""Decode one token: ``(out_t, state)`` with ``out_t (..., Dv)``.

        ``q_t, k_t (..., D)``, ``v_t (..., Dv)``; ``state=None`` starts a
        sequence. Equals row ``t`` of the causal forward on the first ``t + 1``
        tokens (``S_t = S_{t-1} + φ(k_t)v_tᵀ``, ``z_t = z_{t-1} + φ(k_t)``,
        ``o_t = S_tᵀφ(q_t)/(φ(q_t)ᵀz_t + ε)``); costs ``O(F·Dv)`` whatever ``t``.
        ``check_finite=True`` rejects NaN and Inf in ``q_t, k_t, v_t``.
        """
        if not self.causal:
            raise ValueError("step needs a causal LinearAttention (causal=True): a non-causal "
                             "output depends on tokens not yet seen")
        arrays = []
        for x, name in ((q_t, "q_t"), (k_t, "k_t"), (v_t, "v_t")):
            x = as_float_array(x, name)
            if x.ndim < 1:
                raise ValueError(f"{name} must have shape (..., width) with at least 1 axis, got shape {x.shape}")
            if check_finite:                                  # the index in the caller's array
                check_finite_array(x, name)
            arrays.append(x[..., None, :])
        q1, k1, v1 = check_qkv(*arrays, check_finite=False, names=("q_t", "k_t", "v_t"))
        phq, lq, _ = self._features(q1, "q_t", "row")
        phk, lk, _ = self._features(k1, "k_t", "bound")
        batch, f, dv, dtype = q1.shape[:-2], phq.shape[-1], v1.shape[-1], q1.dtype
        if state is None:
            state = LinearState(np.zeros(batch + (f, dv), dtype), np.zeros(batch + (f,), dtype), lk, 0)
        elif not isinstance(state, LinearState):
            raise TypeError(f"state must be None or the LinearState returned by step, got {type(state).__name__}")
        elif state.s.shape != batch + (f, dv):
            raise ValueError(f"state must hold S of shape {batch + (f, dv)} for these inputs "
                             f"(..., F, Dv), got {state.s.shape}")
        s = state.s.astype(dtype, copy=False) + np.swapaxes(phk, -1, -2) @ v1   # S_t   (..., F, Dv)
        z = state.z.astype(dtype, copy=False) + phk[..., 0, :]                   # z_t   (..., F)
        eps_rows = _eps_rows(self.eps, lq, lk, q1.shape[:-1], dtype)             # (..., 1)
        num = (phq @ s)[..., 0, :]                                               # (..., Dv)
        den = np.einsum("...f,...f->...", phq[..., 0, :], z) + eps_rows[..., 0]
        out = num * _safe_inv(den)[..., None]
        return out, LinearState(s, z, lk, state.t + 1)

    # ------------------------------------------------------------------ cost
    def cost(self, n, d, dv=None, m=None, *, backward=False):
        n = check_int(n, "n", minimum=1)
        d = check_int(d, "d", minimum=1)
        dv = d if dv is None else check_int(dv, "dv", minimum=1)
        m = n if m is None else check_int(m, "m", minimum=1)
        f = int(self.feature_map.n_features(d))
        keys = min(m, n) if self.causal else m
        fm_flops = getattr(self.feature_map, "flops", None)
        fm = 0 if fm_flops is None else fm_flops(n, d, backward=backward) + fm_flops(m, d, backward=backward)
        if backward:     # dφ(Q) = G Sᵀ, dS = φ(Q)ᵀG, dφ(K) = V dSᵀ, dV = φ(K) dS (recomputation not counted)
            return Cost(2 * f * dv * (2 * n + 2 * keys) + fm, (n + keys) * (f + dv) + n * f + f * dv)
        # S = φ(K)ᵀV (M·F·Dv) and φ(Q)S (N·F·Dv): 2·F·Dv·N multiplications for N = M, plus the
        # feature map's own products (ωᵀx for FAVOR+ and RFA: 2·(N + M)·D·m; none for elu + 1)
        return Cost(2 * f * dv * (n + keys) + fm, (n + keys) * f + n * dv + n + f * dv)


def _fit_keys(phk, v, n):
    """Causal with ``M != N``: keys past the last query are never used; when
    ``M < N`` zero feature rows are appended (queries past the last key see all keys)."""
    m = phk.shape[-2]
    if m >= n:
        return phk[..., :n, :], v[..., :n, :]
    return _pad_rows(phk, n), _pad_rows(v, n)


def _pad_rows(x, rows):
    pad = [(0, 0)] * x.ndim
    pad[-2] = (0, rows - x.shape[-2])
    return np.pad(x, pad)


# --------------------------------------------------------------------------- Shen et al.
class _EfficientCache(NamedTuple):
    rq: np.ndarray      # ρ_q(Q): softmax over features     (..., N, D)
    rk: np.ndarray      # ρ_k(K): softmax over the sequence  (..., M, D)
    v: np.ndarray       # (..., M, Dv)
    ctx: np.ndarray     # ρ_k(K)ᵀ V                           (..., D, Dv)
    out: np.ndarray


class EfficientAttention(AttentionCore):
    r"""Efficient attention (Shen et al. 2021, arXiv:1812.01243): ``ρ_q(Q) (ρ_k(K)ᵀ V)``.

    ``ρ_q`` is the softmax over each query's ``D`` features, ``ρ_k`` the
    softmax over the ``M`` keys for each feature; no ``1/√D``. Non-causal
    only. ``O(N·D·Dv)`` time, ``O(D·Dv)`` beyond the inputs and outputs.
    Backward: ``dctx = ρ_qᵀ dO``, ``dρ_q = dO ctxᵀ``, ``dρ_k = V dctxᵀ``,
    ``dV = ρ_k dctx``, then the two softmax backwards.
    """

    @finite_policy
    def forward(self, q, k, v, *, check_finite: bool = True):
        q, k, v = check_qkv(q, k, v, check_finite=check_finite)
        rq = softmax(q)                                             # over features     (..., N, D)
        rk = np.swapaxes(softmax(np.swapaxes(k, -1, -2)), -1, -2)   # over the sequence (..., M, D)
        ctx = np.swapaxes(rk, -1, -2) @ v                           # ρ_k(K)ᵀV          (..., D, Dv)
        out = rq @ ctx                                              # (..., N, Dv)
        return out, _EfficientCache(rq, rk, v, ctx, out)

    @finite_policy
    def backward(self, cache: _EfficientCache, dout, *, check_finite: bool = True) -> Grads:
        check_cache(cache, _EfficientCache, "EfficientAttention")
        dout = check_dout(dout, cache.out.shape, cache.out.dtype, check_finite=check_finite)
        rq, rk, v, ctx, _ = cache
        drq = dout @ np.swapaxes(ctx, -1, -2)                       # dρ_q = dO ctxᵀ    (..., N, D)
        dctx = np.swapaxes(rq, -1, -2) @ dout                       # dctx = ρ_qᵀ dO    (..., D, Dv)
        drk = v @ np.swapaxes(dctx, -1, -2)                         # dρ_k = V dctxᵀ    (..., M, D)
        dv = rk @ dctx                                              # dV = ρ_k dctx     (..., M, Dv)
        dq = softmax_backward(rq, drq)
        dk = np.swapaxes(softmax_backward(np.swapaxes(rk, -1, -2), np.swapaxes(drk, -1, -2)), -1, -2)
        return Grads(dq, dk, dv, {})

    def cost(self, n, d, dv=None, m=None, *, backward=False):
        dv = d if dv is None else dv
        m = n if m is None else m
        if backward:
            return Cost(2 * d * dv * (2 * n + 2 * m), (n + m) * (d + dv) + d * dv)
        return Cost(2 * d * dv * (n + m), (n + m) * d + n * dv + d * dv)


# --------------------------------------------------------------------------- registry
def _performer(n, d, dv, seed, causal=False, m=None, kind="positive"):
    omega = PerformerFeatureMap.draw(d, d if m is None else m, seed)     # float64, orthogonal
    return LinearAttention(PerformerFeatureMap(omega, kind=kind), causal=causal)


def _rfa(n, d, dv, seed, causal=False, m=None):
    omega = RandomFourierFeatureMap.draw(d, 2 * d if m is None else m, seed)
    return LinearAttention(RandomFourierFeatureMap(omega), causal=causal)


def _elu(n, d, dv, seed, causal=False):
    return LinearAttention(EluFeatureMap(), causal=causal)


def _register():
    from .core import register
    register("linear_elu", LinearAttention, chapter=4, factory=_elu, exact=False,
             description="linear transformer: φ = elu + 1, (φ(K)ᵀV) first")
    register("linear_elu_causal", LinearAttention, chapter=4, config={"causal": True}, factory=_elu,
             exact=False, description="linear transformer, causal by prefix sums (the RNN view)")
    register("performer", LinearAttention, chapter=4, factory=_performer, exact=False,
             description="Performer FAVOR+: m = d positive orthogonal random features")
    register("performer_causal", LinearAttention, chapter=4, config={"causal": True}, factory=_performer,
             exact=False, description="Performer FAVOR+, causal by prefix sums")
    register("rfa", LinearAttention, chapter=4, factory=_rfa, exact=False,
             description="random feature attention: sin/cos features of x/|x|, m = 2d")
    register("rfa_causal", LinearAttention, chapter=4, config={"causal": True}, factory=_rfa, exact=False,
             description="random feature attention, causal")
    register("efficient", EfficientAttention, chapter=4, exact=False,
             description="Shen et al.: softmax over Q's features and K's sequence, (ρ(K)ᵀV) first")


_register()
