r"""Chapter 2 — clustered patterns: Routing attention (online k-means clusters).

LSH buckets are random; the Routing Transformer (Roy, Saffar, Vaswani,
Grangier 2021, arXiv:2003.05997, §4) *learns* the clusters: ``C`` centroids
``μ_c`` are trained by spherical k-means on the queries and keys, and every
query attends only to the keys routed to the same centroid.

Routing (cosine)
    ``x̂ = x/‖x‖``, ``μ̂ = μ/‖μ‖``; a token's cluster is
    ``argmax_c x̂·μ̂_c`` (ties to the lowest index; a zero vector goes to
    cluster 0).

Exact mode (``top_k=None``)
    Query ``i`` attends to key ``j`` iff both are routed to the same centroid
    (and ``j <= i`` when causal); a query whose cluster holds no key outputs 0.
    This is exact bucket attention with one round whose buckets are the
    clusters, computed by the LSH engine (:mod:`efficient_attention.kernels.lsh`).

Balanced mode (``top_k = w``), the paper's equal-size clusters
    Each centroid takes its ``w`` nearest queries and its ``w`` nearest keys
    (largest cosine; ties to the lower position; ``w`` is clipped to N and
    M). A token can belong to several clusters or to none. Query ``i``
    attends to key ``j`` iff some cluster holds both — one softmax over the
    union, each pair counted once (the clusters are combined with their
    log-sum-exp weights and the duplicate correction, as LSH rounds are).
    Unrouted queries output 0. *Peers* (lucidrains) instead average the
    per-cluster outputs of a token (``scatter_mean``); ours equals masked
    dense attention over :meth:`RoutingAttention.pattern`.
    Cost ``O(C·w²·(D + Dv))``; with ``C = √N`` and ``w = N/C``, ``O(N^{1.5})``.

Training the centroids
    :func:`kmeans_update` is the online (EMA) spherical k-means step, applied
    outside the gradient: with ``m̂_c`` the unit mean direction of the unit
    vectors routed to ``c``, ``μ_c ← decay·μ_c + (1 − decay)·m̂_c`` (clusters
    with no member keep their centroid; no renormalisation afterwards, as
    lucidrains' ``routing_transformer``). The centroids are not a learnable
    parameter of the attention core (``params == {}``; assignments are
    piecewise constant, so ``q``, ``k``, ``v`` gradients hold them fixed).

Scale: ``scale · q·k`` with ``1/sqrt(D)`` by default on the raw ``q, k``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from .core import AttentionCore, Cost, Grads
from .kernels import lsh as _k
from .validate import (as_float_array, check_bool, check_cache, check_dout, check_int, check_qkv,
                       check_real, check_scale, resolve_scale, finite_policy)

__all__ = ["RoutingAttention", "kmeans_update"]


def _unit(x):
    norm = np.sqrt(np.einsum("...d,...d->...", x, x))[..., None]
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def _check_centroids(centroids, d=None):
    c = as_float_array(centroids, "centroids")
    if c.ndim != 2 or c.shape[0] < 1 or c.shape[1] < 1:
        raise ValueError(f"centroids must have shape (C, D) with C >= 1, got {c.shape}")
    if d is not None and c.shape[1] != d:
        raise ValueError(f"centroids must have shape (C, D) with D = {d} (the width of the inputs), "
                         f"got {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("centroids must contain only finite values")
    return c


def kmeans_update(centroids, x, decay: float = 0.999) -> np.ndarray:
    r"""One online spherical k-means step: ``μ_c ← decay·μ_c + (1 − decay)·m̂_c``.

    Parameters
    ----------
    centroids : (C, D) array
    x : (..., N, D) array
        The vectors to cluster (queries and/or keys); rows are normalised.
    decay : float in [0, 1]
        EMA decay (0.999 in the paper); 0 moves each centroid onto the unit mean
        direction of its members.

    Returns
    -------
    (C, D) array in ``centroids``' dtype (a new array; the input is not modified).
    Centroids with no member are returned unchanged.
    """
    c = _check_centroids(centroids)
    x = as_float_array(x, "x")
    if x.ndim < 2 or x.shape[-1] != c.shape[1]:
        raise ValueError(f"x must have shape (..., N, D) with D = {c.shape[1]}, got {x.shape}")
    decay = check_real(decay, "decay", minimum=0.0)
    if decay > 1:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    xhat = _unit(x.reshape(-1, x.shape[-1]).astype(np.float64))            # (T, D)
    assign = np.argmax(xhat @ _unit(c.astype(np.float64)).T, axis=1)        # nearest centroid (T,)
    onehot = sp.csr_array((np.ones(assign.size), (assign, np.arange(assign.size))),
                          shape=(c.shape[0], assign.size))
    mean_dir = _unit(onehot @ xhat)                                         # m̂_c   (C, D)
    has = np.bincount(assign, minlength=c.shape[0]) > 0
    new = c.astype(np.float64, copy=True)
    new[has] = decay * new[has] + (1 - decay) * mean_dir[has]
    return new.astype(c.dtype)


class _RoutingCache(NamedTuple):
    q: np.ndarray           # (B, N, D)
    k: np.ndarray           # (B, M, D)
    v: np.ndarray           # (B, M, Dv)
    out: np.ndarray         # (B, N, Dv)
    lse: np.ndarray         # (B, N)
    layout: object          # exact mode: LSH layout; top-k mode: (qidx, kidx, counts)
    batch: tuple
    scale: float


class RoutingAttention(AttentionCore):
    r"""Routing Transformer attention: queries and keys routed to their nearest centroid.

    Parameters
    ----------
    centroids : (C, D) array
        Cluster centroids (copied; train them with :func:`kmeans_update` /
        :meth:`update_centroids`).
    causal : bool
    top_k : int, optional
        None: exact clusters. ``w``: balanced clusters, each centroid takes its
        ``w`` nearest queries and ``w`` nearest keys.
    scale : float, optional
        ``1/sqrt(D)`` when None.

    Notes
    -----
    Semantics in the module docstring. ``q (..., N, D)``, ``k (..., M, D)``,
    ``v (..., M, Dv)``; the same centroids route every sequence.
    ``assign(x)`` gives the nearest centroid of each row, ``pattern(q, k)``
    the effective pattern of one sequence.
    """

    kmeans_update = staticmethod(kmeans_update)

    def __init__(self, centroids, causal=False, top_k=None, scale=None):
        self.centroids = _check_centroids(centroids).copy()
        self.causal = check_bool(causal, "causal")
        self.top_k = check_int(top_k, "top_k", minimum=1, allow_none=True)
        self.scale = check_scale(scale)

    def options(self):
        return {"centroids": f"array{self.centroids.shape}", "causal": self.causal,
                "top_k": self.top_k, "scale": self.scale}

    @classmethod
    def init(cls, n_clusters: int, d: int, seed: int = 0, dtype=np.float64, **kwargs):
        """Centroids drawn N(0, 1) from ``seed`` (float64 unless ``dtype``)."""
        n_clusters = check_int(n_clusters, "n_clusters", minimum=1)
        d = check_int(d, "d", minimum=1)
        c = np.random.default_rng(seed).standard_normal((n_clusters, d)).astype(dtype)
        return cls(c, **kwargs)

    def update_centroids(self, x, decay: float = 0.999) -> np.ndarray:
        """In place: ``self.centroids <- kmeans_update(self.centroids, x, decay)``."""
        self.centroids[...] = kmeans_update(self.centroids, x, decay)
        return self.centroids

    # ------------------------------------------------------------------ routing
    def _cosines(self, x3):
        mu = _unit(self.centroids.astype(x3.dtype))
        return np.einsum("bnd,cd->bcn", _unit(x3), mu)                     # x̂·μ̂   (B, C, N)

    def assign(self, x) -> np.ndarray:
        """Nearest centroid (cosine) of every row: ``(..., N)`` int64."""
        x = as_float_array(x, "x")
        if x.ndim < 2:
            raise ValueError(f"x must have shape (..., N, D), got {x.shape}")
        _check_centroids(self.centroids, x.shape[-1])
        x3 = x.reshape((-1,) + x.shape[-2:])
        return np.argmax(self._cosines(x3), axis=1).astype(np.int64).reshape(x.shape[:-1])

    def _top(self, x3):
        """Indices ``(B, C, w)`` (ascending positions) of each centroid's w nearest rows."""
        w = min(self.top_k, x3.shape[1])
        order = np.argsort(-self._cosines(x3), axis=-1, kind="stable")[..., :w]
        return np.ascontiguousarray(np.sort(order, axis=-1))

    def _route(self, q3, k3):
        if self.top_k is None:
            qb = self.assign(q3)[:, None, :]                                 # (B, 1, N)
            kb = self.assign(k3)[:, None, :]
            return _k.sort_layout(qb, kb, self.centroids.shape[0], None, False)
        qidx, kidx = self._top(q3), self._top(k3)
        B, C = qidx.shape[:2]
        qmem = np.zeros((B, C, q3.shape[1]))
        kmem = np.zeros((B, C, k3.shape[1]))
        np.put_along_axis(qmem, qidx, 1.0, -1)
        np.put_along_axis(kmem, kidx, 1.0, -1)
        # n_ij for the pairs of cluster c: clusters c' holding both i and j
        qin = np.take_along_axis(qmem[:, None], qidx[:, :, None], -1)        # (B, C, C', w)
        kin = np.take_along_axis(kmem[:, None], kidx[:, :, None], -1)        # (B, C, C', wk)
        counts = np.einsum("bcxw,bcxv->bcwv", qin, kin)                       # (B, C, w, wk)
        return qidx, kidx, counts

    def _allowed(self, qidx, kidx):
        if not self.causal:
            return None
        return kidx[..., None, :] <= qidx[..., :, None]                      # (B, C, w, wk)

    # ------------------------------------------------------------------ pattern
    def pattern(self, q, k) -> sp.csr_array:
        """The effective pattern of one sequence, boolean CSR ``(N, M)``; the
        output equals ``DenseAttention(scale=self.scale)`` masked with it."""
        q, k, _ = check_qkv(q, k, k, check_finite=False)
        if q.ndim != 2:
            raise ValueError(f"pattern takes one sequence: q (N, D) and k (M, D), got q {q.shape}, "
                             f"k {k.shape}")
        _check_centroids(self.centroids, q.shape[-1])
        n, m = q.shape[0], k.shape[0]
        route = self._route(q[None], k[None])
        if self.top_k is None:
            rows, cols = _k.layout_pairs(route, 0, causal=self.causal, shared=False, across=False)
        else:
            qidx, kidx, _ = route
            rows = np.broadcast_to(qidx[0][:, :, None], qidx.shape[1:] + (kidx.shape[-1],))
            cols = np.broadcast_to(kidx[0][:, None, :], rows.shape)
            keep = np.ones(rows.shape, bool) if not self.causal else cols <= rows
            rows, cols = rows[keep], cols[keep]
        pat = sp.csr_array(sp.coo_array((np.ones(rows.size, bool), (rows.ravel(), cols.ravel())),
                                        shape=(n, m)))
        pat.sum_duplicates()
        pat.sort_indices()
        return pat

    # ------------------------------------------------------------------ forward / backward
    @finite_policy
    def forward(self, q, k, v, *, check_finite: bool = True):
        q, k, v = check_qkv(q, k, v, check_finite=check_finite)
        _check_centroids(self.centroids, q.shape[-1])
        batch = q.shape[:-2]
        q3, k3, v3 = (np.ascontiguousarray(a.reshape((-1,) + a.shape[-2:])) for a in (q, k, v))
        scale = resolve_scale(self.scale, q.shape[-1])
        route = self._route(q3, k3)
        if self.top_k is None:
            out, lse = _k.bucket_forward(q3, k3, v3, route, causal=self.causal, shared=False,
                                         across=False, scale=scale)
        else:
            out, lse = _topk_forward(q3, k3, v3, *route, self._allowed(route[0], route[1]), scale)
        cache = _RoutingCache(q3, k3, v3, out, lse, route, batch, scale)
        return out.reshape(batch + out.shape[-2:]), cache

    @finite_policy
    def backward(self, cache: _RoutingCache, dout, *, check_finite: bool = True) -> Grads:
        check_cache(cache, _RoutingCache, "RoutingAttention")
        dout = check_dout(dout, cache.batch + cache.out.shape[-2:], cache.out.dtype,
                          check_finite=check_finite)
        dout3 = np.ascontiguousarray(dout.reshape(cache.out.shape))
        if self.top_k is None:
            dq, dk, dv = _k.bucket_backward(cache.q, cache.k, cache.v, dout3, cache.out, cache.lse,
                                            cache.layout, causal=self.causal, shared=False,
                                            across=False, scale=cache.scale)
        else:
            qidx, kidx, counts = cache.layout
            dq, dk, dv = _topk_backward(cache, dout3, qidx, kidx, counts,
                                        self._allowed(qidx, kidx))
        shape = lambda a: a.reshape(cache.batch + a.shape[-2:])  # noqa: E731
        return Grads(shape(dq), shape(dk), shape(dv), {})

    def cost(self, n, d, dv=None, m=None, *, backward=False):
        dv = d if dv is None else dv
        m = n if m is None else m
        C = self.centroids.shape[0]
        if self.top_k is None:
            pairs = n * -(-m // C)                              # expected cluster sizes
        else:
            pairs = C * min(self.top_k, n) * min(self.top_k, m)
        routing = 2 * (n + m) * d * C
        if backward:
            return Cost(2 * pairs * (3 * d + 2 * dv), n * d + m * (d + dv) + 2 * pairs)
        return Cost(2 * pairs * (d + dv) + routing, n * dv + n + pairs)


def _gather(x, idx):
    """x (B, N, F), idx (B, C, w) -> (B, C, w, F)."""
    return np.take_along_axis(x[:, None], idx[..., None], axis=2)


def _topk_scores(q, k, qidx, kidx, counts, allowed, scale):
    s = scale * (_gather(q, qidx) @ np.swapaxes(_gather(k, kidx), -1, -2))  # (B, C, w, wk)
    s = s - np.log(np.maximum(counts, 1)).astype(s.dtype)                # duplicate correction
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    return s


def _topk_forward(q, k, v, qidx, kidx, counts, allowed, scale):
    from .softmax import softmax_lse
    probs, lse_c = softmax_lse(_topk_scores(q, k, qidx, kidx, counts, allowed, scale))
    o_c = probs @ _gather(v, kidx)                                         # (B, C, w, Dv)
    B, N = q.shape[:2]
    out = np.zeros((B, N, v.shape[-1]), q.dtype)
    lse = np.full((B, N), -np.inf)
    rows = np.arange(B)[:, None]
    for c in range(qidx.shape[1]):                   # merge cluster c: indices unique within it
        idx = qidx[:, c]
        old, new = lse[rows, idx], lse_c[:, c].astype(np.float64)
        top = np.maximum(old, new)
        ok = np.isfinite(top)
        top = np.where(ok, top, 0.0)
        w_old = np.where(np.isfinite(old), np.exp(old - top), 0.0)
        w_new = np.where(np.isfinite(new), np.exp(new - top), 0.0)
        total = np.where(ok, w_old + w_new, 1.0)
        out[rows, idx] = ((w_old / total)[..., None] * out[rows, idx]
                          + (w_new / total)[..., None] * o_c[:, c]).astype(q.dtype)
        lse[rows, idx] = np.where(ok, top + np.log(total), -np.inf)
    return out, lse


def _topk_backward(cache, dout, qidx, kidx, counts, allowed):
    from .softmax import probs_from_lse
    q, k, v, out, lse, scale = cache.q, cache.k, cache.v, cache.out, cache.lse, cache.scale
    s = _topk_scores(q, k, qidx, kidx, counts, allowed, scale)
    lse_q = np.take_along_axis(lse[:, None, :], qidx, axis=2)              # L_i    (B, C, w)
    p = probs_from_lse(s, lse_q.astype(s.dtype))                           # exp(s - L_i)
    do = _gather(dout, qidx)                                               # (B, C, w, Dv)
    delta = np.take_along_axis(np.einsum("bnd,bnd->bn", dout, out)[:, None, :], qidx, axis=2)
    dv_c = np.swapaxes(p, -1, -2) @ do                                     # dV = Pᵀ dO
    ds = p * (do @ np.swapaxes(_gather(v, kidx), -1, -2) - delta[..., None])  # dS = P(dP - δ)
    dq_c = scale * (ds @ _gather(k, kidx))                                 # dQ = s dS K
    dk_c = scale * (np.swapaxes(ds, -1, -2) @ _gather(q, qidx))            # dK = s dSᵀ Q
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    rows = np.arange(q.shape[0])[:, None]
    for c in range(qidx.shape[1]):                   # indices unique within a cluster: += is safe
        dq[rows, qidx[:, c]] += dq_c[:, c]
        dk[rows, kidx[:, c]] += dk_c[:, c]
        dv[rows, kidx[:, c]] += dv_c[:, c]
    return dq, dk, dv


def _routing_factory(n, d, dv, seed, n_clusters=4, **kwargs):
    """Registry build: 4 centroids drawn N(0, 1) from ``seed`` (float64), exact clusters."""
    return RoutingAttention.init(n_clusters, d, seed=seed, **kwargs)


def _register():
    from .core import register
    register("routing", RoutingAttention, chapter=2, factory=_routing_factory, exact=False,
             description="Routing attention, 4 centroids from the seed, exact clusters")


_register()
