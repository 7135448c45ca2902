r"""Chapter 2 — clustered patterns: Reformer LSH attention.

Full attention spends ``N × M`` scores although the softmax is dominated by
the few keys nearest each query. Reformer (Kitaev, Kaiser, Levskaya 2020,
arXiv:2001.04451, §2) puts queries and keys into *buckets* with an angular
locality-sensitive hash, so that close vectors share a bucket with high
probability, and computes only pairs inside a bucket.

Hashing (angular LSH, Andoni et al. 2015)
    For round ``r`` with random rotations ``R_r`` of shape ``(D, C/2)``,

    .. math:: h_r(x) = \operatorname{argmax}\,[\,xR_r,\; -xR_r\,] \in \{0, …, C-1\}

    ``C = n_buckets`` is even; ``rotations`` of shape ``(n_hashes, D, C/2)``
    may be passed in, otherwise they are drawn ``N(0, 1)`` from
    ``np.random.default_rng(seed)`` (in float64, cast to the computation
    dtype) the first time a width ``D`` is seen. Ties go to the first index,
    as ``np.argmax`` does. Hashing costs ``R·N·D·C`` multiply-adds (done in
    row blocks, so it never holds more than a few MB).

Shared QK (``shared_qk=True``, Reformer)
    Keys are the unit-normalised queries, ``k̂_j = q_j / ‖q_j‖`` (``k̂ = 0``
    for a zero query), so ``k`` must be None; a token attends to itself only
    when it has no other key in the pattern (then its output is ``v_i``).
    Separate Q and K (``shared_qk=False``): ``q`` and ``k`` are hashed with
    the same rotations ("Q and K clustered together").

Exact bucket attention (``chunk_size=None``, the reference)
    Query ``i`` attends to key ``j`` iff ``h_r(q_i) = h_r(k_j)`` in at least
    one round (each pair counted once however many rounds it shares), plus
    the causal rule (``j <= i``) and the self rule. Cost: ``Σ_buckets n_b·m_b``
    pairs per round, quadratic when one bucket holds everything.

The efficient algorithm (``chunk_size`` given)
    Per round, the tokens are stably sorted by (bucket, position) and cut
    into chunks; each query chunk attends to its own chunk and to the
    previous one, keeping only keys of its own bucket unless
    ``attend_across_buckets=True`` (the original implementation's
    behaviour). **No wrap-around**: chunk 0 attends to itself only
    (lucidrains, trax and LRA let chunk 0 see the last chunk too).
    *Shared QK*: chunks of ``chunk_size`` sorted tokens. *Separate QK*: the
    N queries and M keys are merged in position order (a key before the query
    of the same position), sorted stably by bucket, and cut into chunks of
    ``2·chunk_size`` items (so a chunk holds about ``chunk_size`` queries and
    ``chunk_size`` keys). **N not a multiple of the chunk**: the sorted
    sequence is padded at its end with empty slots, i.e. the last chunk is
    shorter; no error, no pad token ever attended to.

    Rounds are combined with their log-sum-exp weights and the *duplicate
    correction*: a pair allowed in ``n_ij`` rounds enters each of them with
    score ``s_ij − log n_ij``, so that

    .. math::

        o_i = \sum_r e^{\mathrm{lse}_r(i) - L_i}\, o_r(i)
            = \sum_{j \in P(i)} \frac{e^{s_{ij}}}{\sum_{l\in P(i)} e^{s_{il}}}\, v_j ,

    one softmax over the union ``P(i)`` of the rounds' allowed keys, each
    counted once. :meth:`LSHAttention.pattern` returns ``P`` (with the
    self entries) as a sparse matrix, and the output equals
    ``DenseAttention(scale=...)`` masked with it (keys ``k̂`` for shared QK).

Scale
    ``s_ij = scale · q_i·k_j`` with ``scale = 1/sqrt(D)`` by default (as
    lucidrains and fast-transformers); HF/trax use unit keys and no
    ``1/sqrt(D)``: pass ``scale=1.0`` to reproduce them. Peers' self rule is a
    finite penalty (−5e4 / −1e5) instead of our exact "self only if alone",
    and they count a pair found in several rounds several times (lucidrains
    optionally subtracts ``log(count)`` as we always do).

Gradients
    Buckets are piecewise constant in ``q`` and ``k``: the backward pass
    holds them fixed and differentiates the masked softmax. With shared QK the
    gradient reaching ``k̂`` flows into ``dq`` through the normalisation,
    ``dq += (dk̂ − (dk̂·k̂) k̂)/‖q‖``, and ``Grads.dk`` is None.

Complexity
    Forward ``R·N·2c·(D + Dv)`` multiply-adds of attention (``c`` the chunk)
    plus the hashing ``R·N·D·C/2``; memory ``O(N·(D + Dv) + R·N)`` beyond the
    inputs (no ``N × N`` and no per-round output buffer; see
    :mod:`efficient_attention.kernels.lsh`).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from . import config
from .core import AttentionCore, Cost, Grads
from .kernels import lsh as _k
from .validate import (as_float_array, check_bool, check_cache, check_dout, check_int, check_qkv,
                       check_scale, resolve_scale, finite_policy)

__all__ = ["LSHAttention", "hash_buckets"]

def hash_buckets(x: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    r"""Angular LSH buckets ``argmax([xR_r, -xR_r])`` of every row, every round.

    Parameters
    ----------
    x : (B, N, D) float array
    rotations : (R, D, C/2) array of the same dtype

    Returns
    -------
    (B, R, N) int64 in ``[0, C)``
    """
    B, N, D = x.shape
    R, _, half = rotations.shape
    flat = x.reshape(B * N, D)
    out = np.empty((R, B * N), np.int64)
    rows = max(1, config.LSH_HASH_BLOCK // max(half, 1))
    for r in range(R):
        for s in range(0, B * N, rows):
            proj = flat[s:s + rows] @ rotations[r]                   # x R_r        (rows, C/2)
            hi, lo = proj.argmax(axis=1), proj.argmin(axis=1)
            top = np.take_along_axis(proj, hi[:, None], 1)[:, 0]
            bottom = np.take_along_axis(proj, lo[:, None], 1)[:, 0]
            # argmax over [xR, -xR]: the first half wins ties, as np.argmax would
            out[r, s:s + rows] = np.where(top >= -bottom, hi, half + lo)
    return np.ascontiguousarray(out.reshape(R, B, N).transpose(1, 0, 2))


class _LSHCache(NamedTuple):
    q: np.ndarray            # (B, N, D) flattened batch
    k: np.ndarray            # (B, M, D) keys (k̂ for shared QK)
    v: np.ndarray            # (B, M, Dv)
    qnorm: np.ndarray | None  # (B, N, 1) ‖q‖ for shared QK
    out: np.ndarray          # (B, N, Dv)
    lse: np.ndarray          # (B, N) combined log-sum-exp (-inf: no key)
    self_only: np.ndarray | None  # (B, N) rows that attend to themselves only (shared QK)
    layout: _k.Layout
    batch: tuple
    scale: float


class LSHAttention(AttentionCore):
    r"""Reformer LSH attention: hash, sort, attend within chunks, combine the rounds.

    Parameters
    ----------
    n_buckets : int
        ``C``, even, >= 2.
    n_hashes : int
        ``R``, the number of hash rounds.
    chunk_size : int or None
        Chunk of the efficient algorithm; None gives exact bucket attention.
    causal : bool
        Key ``j`` allowed for query ``i`` only when ``j <= i``.
    shared_qk : bool
        Keys are the unit-normalised queries (call ``forward(q, None, v)``).
    attend_across_buckets : bool
        Chunks see every key of their two chunks, whatever its bucket.
    rotations : (n_hashes, D, n_buckets/2) array, optional
        The hash rotations; drawn from ``seed`` when None.
    seed : int
    scale : float, optional
        ``1/sqrt(D)`` when None; 1.0 reproduces HF/trax.

    Notes
    -----
    The exact semantics (hashing, self rule, chunking without wrap-around,
    the padding rule, the duplicate correction) are in the module docstring.
    ``q (..., N, D)``, ``k (..., M, D)`` or None, ``v (..., M, Dv)``; every
    sequence of the leading axes is hashed and sorted on its own, with the
    same rotations. ``buckets(q, k=None)`` gives the hashes,
    ``pattern(q, k=None)`` the effective pattern of one sequence.

    Examples
    --------
    >>> import numpy as np
    >>> from efficient_attention.lsh import LSHAttention
    >>> rng = np.random.default_rng(0)
    >>> q, v = rng.standard_normal((2, 64, 8)), rng.standard_normal((2, 64, 8))
    >>> core = LSHAttention(n_buckets=4, n_hashes=2, chunk_size=16)
    >>> out, cache = core.forward(q, None, v)
    >>> out.shape
    (2, 64, 8)
    >>> core.pattern(q[0]).shape
    (64, 64)
    """

    def __init__(self, n_buckets, n_hashes=1, chunk_size=64, causal=False, shared_qk=True,
                 attend_across_buckets=False, rotations=None, seed=0, scale=None):
        self.n_buckets = check_int(n_buckets, "n_buckets", minimum=2)
        if self.n_buckets % 2:
            raise ValueError(f"n_buckets must be even (angular LSH uses [xR, -xR]), got {n_buckets}")
        self.n_hashes = check_int(n_hashes, "n_hashes", minimum=1)
        self.chunk_size = check_int(chunk_size, "chunk_size", minimum=1, allow_none=True)
        self.causal = check_bool(causal, "causal")
        self.shared_qk = check_bool(shared_qk, "shared_qk")
        self.attend_across_buckets = check_bool(attend_across_buckets, "attend_across_buckets")
        self.seed = check_int(seed, "seed", minimum=0)
        self.scale = check_scale(scale)
        if rotations is not None:
            rotations = as_float_array(rotations, "rotations")
            expected = (self.n_hashes, "D", self.n_buckets // 2)
            if (rotations.ndim != 3 or rotations.shape[0] != self.n_hashes
                    or rotations.shape[2] != self.n_buckets // 2 or rotations.shape[1] < 1):
                raise ValueError(f"rotations must have shape (n_hashes, D, n_buckets/2) = "
                                 f"({expected[0]}, D, {expected[2]}), got {rotations.shape}")
            if not np.isfinite(rotations).all():
                raise ValueError("rotations must contain only finite values")
            rotations = rotations.copy()
        self.rotations = rotations
        self._drawn: dict[int, np.ndarray] = {}

    def options(self):
        return {"n_buckets": self.n_buckets, "n_hashes": self.n_hashes, "chunk_size": self.chunk_size,
                "causal": self.causal, "shared_qk": self.shared_qk,
                "attend_across_buckets": self.attend_across_buckets, "seed": self.seed,
                "scale": self.scale}

    # ------------------------------------------------------------------ hashing
    def rotations_for(self, d: int) -> np.ndarray:
        """The ``(n_hashes, d, n_buckets/2)`` rotations used for width ``d`` (float64 when drawn)."""
        if self.rotations is not None:
            if self.rotations.shape[1] != d:
                raise ValueError(f"rotations must have shape (n_hashes, D, n_buckets/2) with D = {d} "
                                 f"(the width of q), got {self.rotations.shape}")
            return self.rotations
        if d not in self._drawn:
            rng = np.random.default_rng(self.seed)
            self._drawn[d] = rng.standard_normal((self.n_hashes, d, self.n_buckets // 2))
        return self._drawn[d]

    def _check(self, q, k, v=None, check_finite=False):
        """Validated ``(q, k, v)`` (``k = q`` for shared QK; ``v`` defaults to ``k``)."""
        if self.shared_qk and k is not None:
            raise ValueError("k must be None when shared_qk=True (the keys are the unit-normalised "
                             f"queries), got an array of type {type(k).__name__}")
        if not self.shared_qk and k is None:
            raise ValueError("k must be given (an array (..., M, D)) when shared_qk=False, got None")
        if self.shared_qk:
            q, _, v = check_qkv(q, q, q if v is None else v, check_finite=check_finite,
                                names=("q", "q (the shared keys)", "v"))
            return q, None, v
        return check_qkv(q, k, k if v is None else v, check_finite=check_finite)

    def _hash(self, x3: np.ndarray) -> np.ndarray:
        rot = self.rotations_for(x3.shape[-1]).astype(x3.dtype, copy=False)
        return hash_buckets(np.ascontiguousarray(x3), rot)

    def buckets(self, q, k=None):
        """Bucket ids of every round: ``(..., R, N)`` for ``q``; a pair ``(q's, k's)``
        ``(..., R, M)`` when ``k`` is given (separate QK only). Hashing the
        normalised keys of shared QK gives the queries' buckets."""
        if self.shared_qk and k is not None:
            raise ValueError("k must be None when shared_qk=True (the keys are the queries), "
                             f"got an array of type {type(k).__name__}")
        arrays = [as_float_array(q, "q")] + ([] if k is None else [as_float_array(k, "k")])
        out = []
        for arr, name in zip(arrays, ("q", "k")):
            if arr.ndim < 2:
                raise ValueError(f"{name} must have shape (..., N, D), got {arr.shape}")
            x3 = arr.reshape((-1,) + arr.shape[-2:])
            out.append(self._hash(x3).reshape(arr.shape[:-2] + (self.n_hashes, arr.shape[-2])))
        return out[0] if k is None else tuple(out)

    def _layout(self, q3, k3):
        qb = self._hash(q3)
        kb = None if self.shared_qk else self._hash(k3)
        return _k.sort_layout(qb, kb, self.n_buckets, self.chunk_size, self.shared_qk)

    # ------------------------------------------------------------------ pattern
    def pattern(self, q, k=None) -> sp.csr_array:
        """The effective pattern of one sequence: boolean CSR ``(N, M)``.

        ``(i, j)`` is stored iff key ``j`` takes part in query ``i``'s softmax
        (for shared QK the keys are ``q/‖q‖``, and ``(i, i)`` is stored iff
        row ``i`` has no other key). ``forward`` equals
        ``DenseAttention(scale=self.scale)`` masked with it.
        """
        q, k, _ = self._check(q, k)
        if q.ndim != 2 or (k is not None and k.ndim != 2):
            raise ValueError(f"pattern takes one sequence: q of shape (N, D) (and k (M, D)), "
                             f"got q {q.shape}" + ("" if k is None else f", k {k.shape}"))
        n = q.shape[0]
        m = n if k is None else k.shape[0]
        lay = self._layout(q[None], None if k is None else k[None])
        rows, cols = _k.layout_pairs(lay, 0, causal=self.causal, shared=self.shared_qk,
                                     across=self.attend_across_buckets)
        pat = sp.coo_array((np.ones(rows.size, bool), (rows, cols)), shape=(n, m)).tocsr()
        pat.sum_duplicates()
        if self.shared_qk:
            lonely = np.flatnonzero(np.diff(pat.indptr) == 0)
            pat = (pat + sp.coo_array((np.ones(lonely.size, bool), (lonely, lonely)),
                                      shape=(n, m))).tocsr()
        pat = sp.csr_array(pat, dtype=bool)
        pat.sum_duplicates()
        pat.sort_indices()
        return pat

    # ------------------------------------------------------------------ forward / backward
    @finite_policy
    def forward(self, q, k=None, v=None, *, check_finite: bool = True):
        """``out (..., N, Dv)`` and the cache; ``k`` must be None for shared QK
        (``forward(q, None, v)`` or ``forward(q, v=v)``)."""
        if v is None and self.shared_qk and k is not None:      # lsh(q, v): v landed in k
            raise ValueError("k must be None when shared_qk=True (the keys are the unit-normalised "
                             f"queries), got an array of type {type(k).__name__} and v=None; the "
                             "second positional argument is k, not v: pass v= by keyword, "
                             "core(q, v=v), or call core(q, None, v)")
        if v is None:
            raise ValueError("v must be given (an array (..., M, Dv)), got None")
        q, k, v = self._check(q, k, v, check_finite)
        batch, (n, d) = q.shape[:-2], q.shape[-2:]
        q3 = np.ascontiguousarray(q.reshape((-1, n, d)))
        v3 = np.ascontiguousarray(v.reshape((-1,) + v.shape[-2:]))
        scale = resolve_scale(self.scale, d)
        qnorm = None
        if self.shared_qk:
            qnorm = np.sqrt(np.einsum("bnd,bnd->bn", q3, q3))[..., None]     # ‖q‖     (B, N, 1)
            k3 = np.divide(q3, qnorm, out=np.zeros_like(q3), where=qnorm > 0)  # k̂ = q/‖q‖
        else:
            k3 = np.ascontiguousarray(k.reshape((-1,) + k.shape[-2:]))
        lay = self._layout(q3, None if self.shared_qk else k3)
        out, lse = _k.bucket_forward(q3, k3, v3, lay, causal=self.causal, shared=self.shared_qk,
                                     across=self.attend_across_buckets, scale=scale)
        self_only = None
        if self.shared_qk:
            self_only = np.isneginf(lse)                      # no other key: attend to itself
            out[self_only] = v3[self_only]
        cache = _LSHCache(q3, k3, v3, qnorm, out, lse, self_only, lay, batch, scale)
        return out.reshape(batch + out.shape[-2:]), cache

    def __call__(self, q, k=None, v=None, **kwargs):
        return self.forward(q, k, v, **kwargs)[0]

    @finite_policy
    def backward(self, cache: _LSHCache, dout, *, check_finite: bool = True) -> Grads:
        check_cache(cache, _LSHCache, "LSHAttention")
        dout = check_dout(dout, cache.batch + cache.out.shape[-2:], cache.out.dtype,
                          check_finite=check_finite)
        dout3 = np.ascontiguousarray(dout.reshape(cache.out.shape))
        dq, dk, dv = _k.bucket_backward(cache.q, cache.k, cache.v, dout3, cache.out, cache.lse,
                                        cache.layout, causal=self.causal, shared=self.shared_qk,
                                        across=self.attend_across_buckets, scale=cache.scale)
        if self.shared_qk:
            dv[cache.self_only] += dout3[cache.self_only]     # out_i = v_i for lonely rows
            khat, norm = cache.k, cache.qnorm
            radial = np.einsum("bnd,bnd->bn", dk, khat)[..., None]
            # d k̂ / d q = (I - k̂ k̂ᵀ)/‖q‖
            dq += np.divide(dk - radial * khat, norm, out=np.zeros_like(dk), where=norm > 0)
            dk_out = None
        else:
            dk_out = dk.reshape(cache.batch + dk.shape[-2:])
        return Grads(dq.reshape(cache.batch + dq.shape[-2:]), dk_out,
                     dv.reshape(cache.batch + dv.shape[-2:]), {})

    # ------------------------------------------------------------------ cost
    def cost(self, n, d, dv=None, m=None, *, backward=False):
        dv = d if dv is None else dv
        m = n if m is None else m
        R, C = self.n_hashes, self.n_buckets
        if self.chunk_size is None:
            keys = -(-m // C)                                  # expected bucket size
        else:
            keys = min(m, 2 * self.chunk_size)
        attn = 2 * R * n * keys * (d + dv)
        hashing = 2 * R * (n + (0 if self.shared_qk else m)) * d * (C // 2)
        ints = 3 * R * (n + (0 if self.shared_qk else m))
        if backward:
            # S again, dV, dP, dQ, dK
            return Cost(2 * R * n * keys * (3 * d + 2 * dv), n * d + m * (d + dv) + ints)
        return Cost(attn + hashing, n * dv + n + ints)


def _lsh_factory(n, d, dv, seed, causal=False, n_hashes=2):
    """Registry build: separate QK (the generic tests pass k), chunk min(64, n/2) >= 8,
    n_buckets ~ n / chunk (even, >= 2)."""
    chunk = min(64, max(8, n // 2))
    n_buckets = max(2, 2 * (n // (2 * chunk)))
    return LSHAttention(n_buckets, n_hashes=n_hashes, chunk_size=chunk, causal=causal,
                        shared_qk=False, seed=seed)


def _register():
    from .core import register
    register("lsh", LSHAttention, chapter=2, factory=_lsh_factory, exact=False,
             description="Reformer LSH (separate QK, 2 rounds, chunks of min(64, n/2))")
    register("lsh_causal", LSHAttention, chapter=2, factory=_lsh_factory, config={"causal": True},
             exact=False, description="Reformer LSH, causal (separate QK, 2 rounds)")


_register()
