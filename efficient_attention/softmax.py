r"""Stable softmax and log-sum-exp over the last axis, with their backward.

.. math::

    \operatorname{lse}(s) = m + \log \sum_j e^{s_j - m}, \quad m = \max_j s_j,
    \qquad p_j = e^{s_j - \operatorname{lse}(s)}

Subtracting the row maximum keeps every exponent ``<= 0``, so large logits
never overflow. A mask (True = may attend) removes entries from the sum.

**Fully masked rows.** A row with no allowed entry has ``lse = -inf`` and
probabilities 0 everywhere, so its attention output is 0 and every gradient
through it is 0; nothing produces NaN and nothing warns.

Backward of the softmax (``dp`` the upstream gradient of the probabilities):

.. math::

    \frac{\partial L}{\partial s_j} = p_j \Big(dp_j - \sum_l p_l\, dp_l\Big)

**float32.** The exponentials of float32 scores use the library's vectorised float32 ``exp``
(:func:`efficient_attention.kernels.fastexp.exp_`, within 1 ulp; numpy's is several times
slower on these machines); probabilities below ``e^-87`` (about ``1.6e-38``, the float32
subnormal range) come out as 0. float64 uses ``np.exp``.
"""
from __future__ import annotations

import numpy as np

from .kernels.fastexp import exp_

__all__ = ["logsumexp", "softmax", "softmax_lse", "probs_from_lse", "softmax_backward"]


def softmax_lse(scores: np.ndarray, mask: np.ndarray | None = None):
    """Softmax over the last axis and the per-row log-sum-exp.

    Parameters
    ----------
    scores : (..., M) float array
    mask : bool array broadcastable to ``scores.shape``, optional
        True where an entry may take part.

    Returns
    -------
    probs : (..., M), rows sum to 1 (0 for fully masked rows)
    lse : (...), ``-inf`` for fully masked rows
    """
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True) if scores.shape[-1] else \
        np.full(scores.shape[:-1] + (1,), -np.inf, scores.dtype)
    empty = np.isneginf(row_max)                             # fully masked rows (or M = 0)
    row_max = np.where(empty, 0, row_max).astype(scores.dtype, copy=False)
    with np.errstate(over="ignore"):                         # s - max may round to -inf: exp gives 0
        e = exp_(scores - row_max)                           # exp(-inf) = 0 for masked entries
    total = e.sum(axis=-1, keepdims=True)
    safe_total = np.where(empty, 1, total)
    probs = e / safe_total
    lse = np.where(empty, -np.inf, row_max + np.log(safe_total))[..., 0]
    return probs, lse.astype(scores.dtype, copy=False)


def logsumexp(scores: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``log(sum(exp(scores), axis=-1))`` over the allowed entries; ``-inf`` for empty rows."""
    return softmax_lse(scores, mask)[1]


def softmax(scores: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Softmax over the last axis; fully masked rows give all zeros."""
    return softmax_lse(scores, mask)[0]


def probs_from_lse(scores: np.ndarray, lse: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Recompute ``p = exp(scores - lse)`` from the saved log-sum-exp (the
    FlashAttention trick: keep a number per row, not the whole matrix).
    Rows with ``lse = -inf`` and masked entries give 0."""
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)             # masked entries before exp: no overflow
    lse = lse[..., None]
    empty = np.isneginf(lse)
    with np.errstate(over="ignore"):
        p = exp_(np.where(empty, -np.inf, scores - np.where(empty, 0, lse)))
    return p.astype(scores.dtype, copy=False)


def softmax_backward(probs: np.ndarray, dprobs: np.ndarray) -> np.ndarray:
    """``dscores = p * (dp - sum(p * dp))`` over the last axis."""
    return probs * (dprobs - np.sum(probs * dprobs, axis=-1, keepdims=True))
