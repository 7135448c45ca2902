"""The three tasks of the small Long Range Arena (``bench_long_range.py``), generated offline from a seed.

Every generator is ``make(n, size, seed) -> (tokens (size, N) int64, labels (size,) int64)``:
the same ``(n, size, seed)`` always gives the same arrays. ``TASKS`` maps a task's name to
its :class:`Task` (generator, vocabulary size, number of classes, chance level, rule).

**ListOps-mini** (after Nangia & Bowman 2018 and LRA's ListOps, Tay et al. 2020, arXiv:2011.04006).
A nested expression in prefix form, e.g. ``[MAX 4 3 [MIN 2 3 ] 1 0 [SM 8 9 ] ]``, whose value
(a digit) is the class: ``MAX`` and ``MIN`` of their arguments, ``MED`` the median (of an even number
of arguments, the lower of the two middle values), ``SM`` the sum modulo 10. Ten classes. Limits:
the root is an operator; operators nest at most ``max_depth`` deep (the root is depth 1); an operator
has 2 to ``max_args`` arguments, each a digit or, below the depth limit, with probability
``p_op`` another operator; an expression has between ``N/8`` and ``N`` tokens (others are drawn
again) and is padded with ``PAD`` at the end. With the defaults (``max_depth`` 5, ``max_args`` 6,
``p_op`` 0.5) and N = 256, the lengths range from 32 to 256 tokens (median about 130). LRA's
ListOps has sequences of up to 2000 tokens; ours is smaller so that a two-layer model on a CPU
has a chance. To make chance a plain 10 %, the ten classes are balanced: expressions are drawn
until every class has a tenth of the set, a class that is full keeping no more.

**Retrieval (keyed marker).** Four *pair tokens* at distinct random positions in the first
quarter, pair token ``(k, c)`` saying "key k holds class c", with keys 0..3 each once and classes
a random permutation of 0..3; the last quarter all *query tokens* naming one key; noise tokens
(16 symbols) between and around them. The class is the one the queried key holds, so it must
travel at least ``N/2`` positions from the pair to any query. The permutation makes the bag of
tokens carry no information about the answer: the model has to match the query with its pair,
which a mean-pooled model cannot do without attention. The query fills a quarter of the
sequence (not one position) because the classifier reads the mean over all positions: one
query position would carry the answer with weight 1/N. Chance 25 %.

**Local (marker neighbour).** ``N`` noise tokens from 16 symbols, one *marker* at a random
position ``p`` and one *label symbol* (one of four, the class) at ``p + δ`` with
``1 <= |δ| <= radius``; further label symbols are scattered as distractors (about one in 16
positions, classes uniform), never closer to the marker than ``clear``. The class is the label
symbol nearest the marker. With ``radius`` = min(16, N/8) and ``clear`` = min(64, N/4) a window of
``radius`` to ``clear`` keys each side sees exactly one label symbol, so a local pattern needs no
position information, while full attention must learn to prefer near keys. Chance 25 %.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

__all__ = ["Task", "TASKS", "listops", "retrieval", "local", "listops_tree", "listops_value",
           "LISTOPS_OPS", "LISTOPS_VOCAB"]


class Task(NamedTuple):
    name: str
    make: Callable                 # (n, size, seed) -> (tokens (size, N), labels (size,))
    vocab: int
    classes: int
    chance: float
    rule: str


# -- ListOps-mini ----------------------------------------------------------------------------

PAD, CLOSE = 0, 15                             # token ids: 0 pad, 1..10 digits 0..9, 11..14 ops, 15 "]"
LISTOPS_OPS = ("MAX", "MIN", "MED", "SM")
LISTOPS_VOCAB = 16


def _digit(d):
    return 1 + d


def _op_token(op):
    return 11 + LISTOPS_OPS.index(op)


def listops_value(op, values):
    """The value of one operator on its argument values (digits)."""
    if op == "MAX":
        return max(values)
    if op == "MIN":
        return min(values)
    if op == "MED":
        return sorted(values)[(len(values) - 1) // 2]      # lower median of an even count
    return sum(values) % 10                                # SM


def listops_tree(rng, max_depth=5, max_args=6, p_op=0.5, depth=1):
    """A random expression: a digit (int) or ``(op, [args])``; the root is always an operator."""
    op = LISTOPS_OPS[rng.integers(len(LISTOPS_OPS))]
    args = []
    for _ in range(rng.integers(2, max_args + 1)):
        if depth < max_depth and rng.random() < p_op:
            args.append(listops_tree(rng, max_depth, max_args, p_op, depth + 1))
        else:
            args.append(int(rng.integers(10)))
    return op, args


def _tokens_and_value(tree, out):
    """Append the tree's tokens to ``out`` and return its value."""
    if isinstance(tree, int):
        out.append(_digit(tree))
        return tree
    op, args = tree
    out.append(_op_token(op))
    value = listops_value(op, [_tokens_and_value(a, out) for a in args])
    out.append(CLOSE)
    return value


def listops(n, size, seed, *, max_depth=5, max_args=6, p_op=0.5):
    """ListOps-mini: ``size`` expressions of ``n // 8`` to ``n`` tokens, ten balanced classes.

    Expressions are drawn one after another and each is kept if its class still has room
    (``size // 10`` each, the remainder to the lowest classes), then the kept ones are shuffled."""
    rng = np.random.default_rng(seed)
    quota = np.full(10, size // 10) + (np.arange(10) < size % 10)
    kept: list = [[] for _ in range(10)]
    while any(len(kept[c]) < quota[c] for c in range(10)):
        seq: list = []
        value = _tokens_and_value(listops_tree(rng, max_depth, max_args, p_op), seq)
        if len(kept[value]) < quota[value] and n // 8 <= len(seq) <= n:
            kept[value].append(seq)
    order = rng.permutation(size)
    tokens = np.full((size, n), PAD, dtype=np.int64)
    labels = np.empty(size, dtype=np.int64)
    flat = [(c, seq) for c in range(10) for seq in kept[c]]
    for i, j in enumerate(order):
        labels[i], seq = flat[j]
        tokens[i, :len(seq)] = seq
    return tokens, labels


# -- retrieval (keyed marker) ------------------------------------------------------------------

N_NOISE = 16
R_KEYS = 4                                     # keys = classes = 4
R_PAIR0 = N_NOISE                              # pair token (k, c) = 16 + 4k + c
R_QUERY0 = R_PAIR0 + R_KEYS * R_KEYS           # query token for key k = 32 + k
R_VOCAB = R_QUERY0 + R_KEYS


def retrieval(n, size, seed):
    """Keyed marker retrieval: the class held by the key the last quarter asks for."""
    if n < 4 * R_KEYS:
        raise ValueError(f"n must be >= {4 * R_KEYS} for the retrieval task, got {n}")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, N_NOISE, size=(size, n))
    labels = np.empty(size, dtype=np.int64)
    for i in range(size):
        pos = rng.choice(n // 4, size=R_KEYS, replace=False)            # keys 0..3 at these positions
        held = rng.permutation(R_KEYS)                                   # key k holds class held[k]
        tokens[i, pos] = R_PAIR0 + R_KEYS * np.arange(R_KEYS) + held
        key = rng.integers(R_KEYS)
        tokens[i, n - n // 4:] = R_QUERY0 + key
        labels[i] = held[key]
    return tokens, labels


# -- local (marker neighbour) ------------------------------------------------------------------

L_LABEL0 = N_NOISE                             # label symbol of class c = 16 + c
L_MARKER = L_LABEL0 + 4
L_VOCAB = L_MARKER + 1


def local_limits(n):
    """``(radius, clear)`` of the local task at length ``n``."""
    return min(16, n // 8), min(64, n // 4)


def local(n, size, seed):
    """Marker neighbour: the class of the one label symbol within ``radius`` of the marker."""
    radius, clear = local_limits(n)
    if radius < 1:
        raise ValueError(f"n must be >= 8 for the local task, got {n}")
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, N_NOISE, size=(size, n))
    labels = rng.integers(0, 4, size=size)
    idx = np.arange(n)
    for i in range(size):
        p = int(rng.integers(radius, n - radius))                        # room for δ on both sides
        delta = int(rng.integers(1, radius + 1)) * (1 if rng.random() < 0.5 else -1)
        far = np.abs(idx - p) > clear
        scatter = far & (rng.random(n) < 1 / 16)                          # distractors, far only
        tokens[i, scatter] = L_LABEL0 + rng.integers(0, 4, size=int(scatter.sum()))
        tokens[i, p] = L_MARKER
        tokens[i, p + delta] = L_LABEL0 + labels[i]
    return tokens, labels


TASKS = {
    "listops": Task("listops", listops, LISTOPS_VOCAB, 10, 0.10,
                    "value of a nested MAX/MIN/MED/SM expression (depth <= 5, 2-6 arguments, N/8 to N tokens)"),
    "retrieval": Task("retrieval", retrieval, R_VOCAB, 4, 0.25,
                      "class held by the queried key: pairs in the first quarter, queries in the last"),
    "local": Task("local", local, L_VOCAB, 4, 0.25,
                  "class of the label symbol within min(16, N/8) of the marker"),
}
