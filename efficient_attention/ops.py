r"""Building blocks that several chapters share: softmax attention over one block pair,
its backward from a given (merged) log-sum-exp, and the exact merge of partial attentions.

Split the keys of a query block into blocks :math:`j` (key shards of a cluster, key tiles of a
kernel, the hash rounds of LSH). Each block gives a *partial* attention, normalised over its own
keys only, and the log-sum-exp of its scores:

.. math::

    S_j = s\,Q K_j^\top,\qquad \ell_j = \log\sum_{c\in j} e^{S_{j,c}},\qquad
    O_j = \operatorname{softmax}(S_j)\,V_j .

Full attention over all keys is recovered exactly from the partials (the FlashAttention
online softmax, arXiv:2205.14135 §3.1, done once at the end; ring attention, arXiv:2310.01889;
flash-decoding):

.. math::

    \ell = \log \sum_j e^{\ell_j},\qquad O = \sum_j e^{\ell_j - \ell}\, O_j .

The backward needs no partial output at all: with the *merged* :math:`\ell` and
:math:`\delta = \operatorname{rowsum}(dO \odot O)` of the *merged* output, block :math:`j`'s
probabilities are :math:`P_j = e^{S_j - \ell}` (the true probabilities of the full row,
restricted to the block) and, one chain-rule step a line,

.. math::

    dV_j = P_j^\top dO,\quad dP_j = dO\,V_j^\top,\quad
    dS_j = P_j \odot (dP_j - \delta),\quad dQ \mathrel{+}= s\,dS_j K_j,\quad dK_j = s\,dS_j^\top Q,

so :math:`dQ = \sum_j dQ_j` and each key block gets its own :math:`dK_j, dV_j`.

**Fully masked rows.** A row with no allowed key in a block has :math:`\ell_j = -\infty` and
:math:`O_j = 0`; it then carries weight 0 in the merge. A row with no allowed key anywhere has
:math:`\ell = -\infty`, output 0 and zero gradient. Nothing produces NaN and nothing warns.

Shapes (the package legend): ``q (..., N, D)``, ``k (..., M, D)``, ``v (..., M, Dv)``,
``out (..., N, Dv)``, ``lse (..., N)``. These functions are what
:class:`~efficient_attention.distributed.DistributedAttention` runs on each pair of a query shard
and a key shard; trax's ``attend`` (google/trax, ``efficient_attention.py``) is the model.
"""
from __future__ import annotations

import numpy as np

from .softmax import probs_from_lse, softmax_lse
from .validate import (as_float_array, check_bool, check_dout, check_finite_array, check_mask,
                       check_qkv, check_scale, resolve_scale)

__all__ = ["attend", "attend_backward", "merge"]


def _dense_mask(mask, n, m, batch_shape):
    """A validated mask as a dense boolean array (None passes)."""
    mask = check_mask(mask, n, m, batch_shape)
    if mask is not None and not isinstance(mask, np.ndarray):
        mask = mask.toarray()                                 # a scipy.sparse (N, M) pattern
    return mask


def _check_lse(lse, shape, dtype, name="lse"):
    """``lse`` of shape ``(..., N)``; ``-inf`` allowed (fully masked rows), NaN and ``+inf`` not."""
    lse = as_float_array(lse, name)
    if lse.shape != tuple(shape):
        raise ValueError(f"{name} must have shape (..., N) = {tuple(shape)}, got {lse.shape}")
    if np.isnan(lse).any() or np.isposinf(lse).any():
        raise ValueError(f"{name} must be finite or -inf (a fully masked row), found NaN or +inf")
    return lse.astype(dtype, copy=False)


def attend(q, k, v, *, mask=None, scale=None, check_finite: bool = True):
    r"""Softmax attention of a query block on a key block: ``(out, lse)``.

    Parameters
    ----------
    q : (..., N, D) float array
    k : (..., M, D) float array
    v : (..., M, Dv) float array
    mask : bool array broadcastable to ``(..., N, M)``, or a ``scipy.sparse`` ``(N, M)`` pattern, optional
        True where query ``i`` may attend key ``j``.
    scale : float, optional
        Multiplies the scores; ``1/sqrt(D)`` when None.
    check_finite : bool
        Reject NaN and Inf in ``q, k, v`` (``ValueError``).

    Returns
    -------
    out : (..., N, Dv)
        ``softmax(scale·QKᵀ + mask)·V`` over this block's keys (0 for a row with no allowed key).
    lse : (..., N)
        The log-sum-exp of each row's allowed scores (``-inf`` for a row with no allowed key).

    Notes
    -----
    ``out`` equals :class:`~efficient_attention.DenseAttention`'s output on the same arrays and
    mask; ``lse`` is what :func:`merge` needs to combine blocks and what
    :func:`attend_backward` needs to recompute the probabilities.

    Examples
    --------
    >>> import numpy as np
    >>> from efficient_attention.ops import attend, merge
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((4, 8)), rng.standard_normal((6, 8)), rng.standard_normal((6, 3))
    >>> out, lse = attend(q, k, v)
    >>> halves = [attend(q, k[s], v[s]) for s in (slice(0, 2), slice(2, 6))]
    >>> merged, merged_lse = merge([o for o, _ in halves], [l for _, l in halves])
    >>> bool(np.allclose(merged, out) and np.allclose(merged_lse, lse))
    True
    """
    q, k, v = check_qkv(q, k, v, check_finite=check_bool(check_finite, "check_finite"))
    mask = _dense_mask(mask, q.shape[-2], k.shape[-2], q.shape[:-2])
    scale = resolve_scale(check_scale(scale), q.shape[-1])
    scores = scale * (q @ np.swapaxes(k, -1, -2))            # S = s QKᵀ            (..., N, M)
    probs, lse = softmax_lse(scores, mask)                    # P = softmax(S), lse  (..., N, M), (..., N)
    return probs @ v, lse                                     # O = PV               (..., N, Dv)


def attend_backward(q, k, v, out, lse, dout, *, mask=None, scale=None, delta=None,
                    check_finite: bool = True):
    r"""Gradients ``(dq, dk, dv)`` of one block pair, from the merged ``lse`` and output.

    Parameters
    ----------
    q, k, v, mask, scale
        As given to :func:`attend` for this block pair.
    out : (..., N, Dv) float array or None
        The *merged* output of the query block over all key blocks (from :func:`merge`; for a
        single block, :func:`attend`'s own output). Used only for
        ``delta = rowsum(dout ⊙ out)``; may be None when ``delta`` is given.
    lse : (..., N) float array
        The *merged* log-sum-exp of the query block (``-inf`` for rows with no allowed key).
    dout : (..., N, Dv) float array
        The upstream gradient of the merged output.
    delta : (..., N) float array, optional
        ``rowsum(dout ⊙ out)``, when the caller has it already (it is the same for every key
        block of a query block).
    check_finite : bool
        Reject NaN and Inf in ``q, k, v, out, dout, delta`` (``lse`` may hold ``-inf``).

    Returns
    -------
    dq : (..., N, D)
        This key block's share of the query gradient (sum the shares over the key blocks).
    dk : (..., M, D), dv : (..., M, Dv)
        The gradients of this key block (complete: a key block meets each query block once).

    Notes
    -----
    With one key block (``out, lse`` from :func:`attend` on the same arrays) the result equals
    :class:`~efficient_attention.DenseAttention`'s backward.
    """
    check_finite = check_bool(check_finite, "check_finite")
    q, k, v = check_qkv(q, k, v, check_finite=check_finite)
    n, m, dtype = q.shape[-2], k.shape[-2], q.dtype
    out_shape = q.shape[:-1] + (v.shape[-1],)
    dout = check_dout(dout, out_shape, dtype)
    lse = _check_lse(lse, q.shape[:-1], dtype)
    if delta is None:
        if out is None:
            raise ValueError("out must be given (the merged output, shape (..., N, Dv)) when delta is None")
        out = check_dout(out, out_shape, dtype, name="out")
        if check_finite:
            check_finite_array(out, "out")
        delta = np.einsum("...nc,...nc->...n", dout, out)    # δ = rowsum(dO ⊙ O)   (..., N)
    else:
        delta = as_float_array(delta, "delta")
        if delta.shape != q.shape[:-1]:
            raise ValueError(f"delta must have shape (..., N) = {q.shape[:-1]}, got {delta.shape}")
        delta = delta.astype(dtype, copy=False)
        if check_finite:
            check_finite_array(delta, "delta")
    if check_finite:
        check_finite_array(dout, "dout")
    mask = _dense_mask(mask, n, m, q.shape[:-2])
    scale = resolve_scale(check_scale(scale), q.shape[-1])
    scores = scale * (q @ np.swapaxes(k, -1, -2))            # recompute S           (..., N, M)
    probs = probs_from_lse(scores, lse, mask)                 # P_j = exp(S_j - ℓ)
    dv = np.swapaxes(probs, -1, -2) @ dout                    # dV = Pᵀ dO            (..., M, Dv)
    dscores = dout @ np.swapaxes(v, -1, -2)                   # dP = dO Vᵀ            (..., N, M)
    dscores -= delta[..., None]                               # dS = P ⊙ (dP − δ)     (in place)
    dscores *= probs
    dq = scale * (dscores @ k)                                # dQ = s dS K           (..., N, D)
    dk = scale * (np.swapaxes(dscores, -1, -2) @ q)           # dK = s dSᵀ Q          (..., M, D)
    return dq, dk, dv


def merge(outs, lses):
    r"""Merge partial attentions of the same queries over disjoint key blocks: ``(out, lse)``.

    Parameters
    ----------
    outs : sequence of (..., N, Dv) arrays
        The partial outputs ``O_j`` (each normalised over its own block, as :func:`attend` gives).
    lses : sequence of (..., N) arrays
        Their log-sum-exps ``ℓ_j`` (``-inf`` where a row has no allowed key in the block).

    Returns
    -------
    out : (..., N, Dv)
        ``Σ_j e^{ℓ_j − ℓ} O_j``: the attention over all the blocks' keys.
    lse : (..., N)
        ``ℓ = log Σ_j e^{ℓ_j}`` (``-inf`` where every block has ``-inf``).

    Notes
    -----
    The weights ``e^{ℓ_j − ℓ}`` are the softmax of the ``ℓ_j`` over ``j``
    (:func:`~efficient_attention.softmax.softmax_lse` on the stacked ``ℓ_j``, which also gives
    ``ℓ`` and the fully-masked rule). Merging is associative: blocks can be merged in any tree.
    """
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty sequences of the same length, got "
                         f"{len(outs)} and {len(lses)}")
    outs = [as_float_array(o, f"outs[{j}]") for j, o in enumerate(outs)]
    lses = [as_float_array(s, f"lses[{j}]") for j, s in enumerate(lses)]
    dtype = np.result_type(*outs, *lses)
    for j, (o, s) in enumerate(zip(outs, lses)):
        if o.shape != outs[0].shape or s.shape != o.shape[:-1]:
            raise ValueError(f"outs[{j}] must have shape {outs[0].shape} and lses[{j}] shape "
                             f"{outs[0].shape[:-1]}, got {o.shape} and {s.shape}")
    weights, lse = softmax_lse(np.stack(lses, axis=-1).astype(dtype, copy=False))   # (..., N, J), (..., N)
    out = np.zeros(outs[0].shape, dtype)
    for j, o in enumerate(outs):
        out += weights[..., j, None] * o                      # O = Σ_j e^{ℓ_j − ℓ} O_j
    return out, lse
