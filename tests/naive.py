"""Slow, obvious references: explicit Python loops over queries, no tricks.

Everything optimised (and the oracle itself) is compared with these.
"""
import math

import numpy as np


def attention_loop(q, k, v, mask=None, causal=False, scale=None):
    """Per-query loop over a single sequence or any batch: softmax(scale q_i·k_j) over allowed j."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    batch = q.shape[:-2]
    full_mask = np.ones(batch + (n, m), bool) if mask is None else np.broadcast_to(mask, batch + (n, m))
    out = np.zeros(batch + (n, v.shape[-1]))
    for b in np.ndindex(*batch):
        for i in range(n):
            allowed = [j for j in range(m) if full_mask[b + (i, j)] and (not causal or j <= i)]
            if not allowed:
                continue
            s = [scale * float(np.dot(q[b + (i,)], k[b + (j,)])) for j in allowed]
            top = max(s)
            w = [math.exp(x - top) for x in s]
            total = sum(w)
            for wj, j in zip(w, allowed):
                out[b + (i,)] += (wj / total) * v[b + (j,)]
    return out


def attention_grads_loop(q, k, v, dout, mask=None, causal=False, scale=None):
    """Gradients of sum(out * dout) by the per-entry chain rule, one query at a time."""
    q, k, v, dout = (np.asarray(a, dtype=np.float64) for a in (q, k, v, dout))
    n, m, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    batch = q.shape[:-2]
    full_mask = np.ones(batch + (n, m), bool) if mask is None else np.broadcast_to(mask, batch + (n, m))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in np.ndindex(*batch):
        for i in range(n):
            allowed = [j for j in range(m) if full_mask[b + (i, j)] and (not causal or j <= i)]
            if not allowed:
                continue
            s = np.array([scale * np.dot(q[b + (i,)], k[b + (j,)]) for j in allowed])
            p = np.exp(s - s.max())
            p /= p.sum()
            dp = np.array([np.dot(dout[b + (i,)], v[b + (j,)]) for j in allowed])
            ds = p * (dp - np.dot(p, dp))
            for pj, dsj, j in zip(p, ds, allowed):
                dv[b + (j,)] += pj * dout[b + (i,)]
                dq[b + (i,)] += scale * dsj * k[b + (j,)]
                dk[b + (j,)] += scale * dsj * q[b + (i,)]
    return dq, dk, dv


def _matmul(a, b):
    """``a @ b`` without numpy's invalid-operation warning. On finite inputs ``@`` cannot make
    an invalid operation, yet the CI run of stop 26 saw "invalid value encountered in matmul" on
    float32 products of a few finite entries (1×5 by 5×2, 3×5 by 5×1), on the first call and not
    on a repeat of the same call. Most likely that was the BLAS's own flag, as in numpy#13173 and
    OpenBLAS#1924; it did not happen again on the development machine. With the pytest setting
    that turns RuntimeWarnings into errors, it failed a correct candidate at random. Overflow
    and division warnings stay on."""
    with np.errstate(invalid="ignore"):
        return a @ b


def attention_in_dtype(q, k, v, dout=None, mask=None, causal=False, scale=None):
    """The textbook formulas, vectorised, in the inputs' own dtype (no float64 anywhere):
    ``(out,)`` or ``(out, dq, dk, dv)``. An independent low-precision implementation (scale
    applied to q, P normalised before P·V, the rowsum(P ⊙ dP) form of the softmax backward),
    for the ``lowp`` rule of ``assert_attention_close``.

    Its products go through :func:`_matmul`, which ignores the invalid-operation flag: the
    results are compared, so a NaN or Inf they make still shows."""
    q, k, v = (np.asarray(a) for a in (q, k, v))
    sc = q.dtype.type(q.shape[-1] ** -0.5 if scale is None else scale)
    s = _matmul(q * sc, np.swapaxes(k, -1, -2))
    allowed = np.ones(s.shape[-2:], bool) if mask is None else np.asarray(mask, bool)
    if causal:
        allowed = allowed & (np.arange(s.shape[-1])[None, :] <= np.arange(s.shape[-2])[:, None])
    s = np.where(allowed, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(top), top, 0))
    z = np.sum(p, axis=-1, keepdims=True)
    p = p / np.where(z > 0, z, 1)
    out = _matmul(p, v).astype(q.dtype)
    if dout is None:
        return (out,)
    dout = np.asarray(dout, dtype=q.dtype)
    dv = _matmul(np.swapaxes(p, -1, -2), dout)
    dp = _matmul(dout, np.swapaxes(v, -1, -2))
    ds = p * (dp - np.sum(p * dp, axis=-1, keepdims=True))
    return out, _matmul(ds, k) * sc, _matmul(np.swapaxes(ds, -1, -2), q) * sc, dv


def random_candidates(n, m, causal=False, exclude=None):
    """Dense (n, m) mask of the keys ``patterns.random`` may draw for each row: all of
    ``range(m)``, only ``j <= i`` when causal, minus ``exclude`` (a dense mask), one row at a time."""
    cand = np.zeros((n, m), bool)
    for i in range(n):
        for j in range(m):
            cand[i, j] = (not causal or j <= i) and (exclude is None or not exclude[i, j])
    return cand


def bigbird_fixed_blocks(nb, n_global_blocks, window_blocks):
    """BigBird's window and global blocks, (nb, nb), element by element."""
    fixed = np.zeros((nb, nb), bool)
    for bi in range(nb):
        for bj in range(nb):
            fixed[bi, bj] = (abs(bi - bj) <= window_blocks // 2 or bi < n_global_blocks
                             or bj < n_global_blocks)
    return fixed


def expand_blocks(blocks, block_size, causal=False):
    """A block mask (nb, nb) as a token mask (nb·b, nb·b); causal: also j <= i."""
    n = blocks.shape[0] * block_size
    out = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            out[i, j] = blocks[i // block_size, j // block_size] and (not causal or j <= i)
    return out
