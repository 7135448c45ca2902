r"""Scale-out — attention over dask arrays, on one machine's cores or on a cluster.

The library's cores run in one process. :class:`DistributedAttention` runs any of them over
`dask arrays <https://docs.dask.org/en/stable/array.html>`_ whose chunks are the shards: it
builds a dask graph of tasks, each calling the single-process code on a few shards, and
computes nothing itself. The graph runs on dask's default scheduler (threads of this process)
or on a ``dask.distributed`` cluster (``Client(...)``), unchanged.

Shards along the leading axes (batch, heads) are independent: one task per block calls
``core.forward`` / ``core.backward`` (every core; parameter gradients are summed over the
blocks). Shards along the sequence axis ``N`` need a recipe per family, and no task ever holds
a whole ``q``, ``k`` or ``v``:

**Halo** (:class:`~efficient_attention.LocalAttention`, :class:`~efficient_attention.StridedAttention`
with a window). Query ``i`` sees only keys with ``|i − j| ≤ h``, ``h = window`` (× ``stride``;
causal: ``0 ≤ i − j ≤ h``). A shard ``[s, e)`` with the halo ``[s − h, e + h)`` of its
neighbours' rows is a complete problem: the single-process core runs on it and its output is
trimmed to ``[s, e)``. The backward runs the core's backward with ``dO`` zero on the halo rows;
the gradients it gives the halo keys belong to the neighbours' shards and are added there
(overlap-add), so that ``dK_j = Σ_{\text{shards } i} dK^{(i)}_j`` exactly.

**Pairwise merge** (:class:`~efficient_attention.DenseAttention`, causal or not). Each pair of a
query shard ``a`` and a key shard ``b`` gives a partial output and its log-sum-exp
(:func:`~efficient_attention.ops.attend`); the partials of a query shard are merged exactly,

.. math::

    \ell_a = \log\sum_b e^{\ell_{ab}},\qquad O_a = \sum_b e^{\ell_{ab} - \ell_a} O_{ab}

(:func:`~efficient_attention.ops.merge`, in a tree; ring attention, Liu et al. 2023,
arXiv:2310.01889; flash-decoding). Causal attention skips the pairs above the diagonal. The
backward of each pair recomputes its probabilities from the merged :math:`\ell_a` and
:math:`\delta_a = \operatorname{rowsum}(dO_a \odot O_a)` of the merged output
(:func:`~efficient_attention.ops.attend_backward`); ``dQ_a`` sums over ``b`` and ``dK_b, dV_b``
over ``a``. Another softmax core joins this path by registering how it attends one pair
(:class:`PairwiseSoftmax`, :func:`register_pairwise`).

**State scan** (:class:`~efficient_attention.LinearAttention`). Linear attention needs of the
other shards only the sums :math:`S = \sum_j \varphi(k_j) v_j^\top` (``F × Dv``) and
:math:`z = \sum_j \varphi(k_j)` (``F``). Non-causal: one global sum of the shards' states.
Causal: shard ``a`` starts from the exclusive prefix :math:`(S_{<a}, z_{<a})` of the shards
before it (a scan over shards of ``F × Dv`` states, the chunked form of "Transformers are
RNNs", Katharopoulos et al. 2020, arXiv:2006.16236 §3.4, at cluster scale):

.. math::

    \text{den}_i = \varphi(q_i)^\top (z_{<a} + z^{\text{loc}}_i) + \varepsilon,\qquad
    o_i = \varphi(q_i)^\top (S_{<a} + S^{\text{loc}}_i) / \text{den}_i .

The shard's own prefix sums run in the single-process scan
(:func:`efficient_attention.kernels.linear.causal_forward`) with :math:`\varphi(q_i)^\top z_{<a}
+ \varepsilon` passed as its per-row ``eps``, so that it returns the global denominators. The
backward adds to the scan's local gradients the terms of the carried states:
``dφ(Q) += G S_{<a}ᵀ + c z_{<a}ᵀ``, ``dφ(K) += V R_{>a}ᵀ + r_{>a}``, ``dV += φ(K) R_{>a}``, with
:math:`R_{>a} = \sum_{b > a} \varphi(Q_b)^\top G_b` and :math:`r_{>a} = \sum_{b>a}\varphi(Q_b)^\top c_b`
(a reverse scan over shards; ``G = dO/\text{den}``, ``c = −\operatorname{rowsum}(dO \odot O)/\text{den}``).
The features are the feature map's public ``forward``/``backward`` (exact features:
:class:`~efficient_attention.LinearAttention` alone applies the FAVOR+ stabiliser, which
cancels exactly, so the two agree to rounding wherever the exact features neither overflow
nor underflow; a query whose features all underflow raises ``ValueError`` at compute time
rather than get the output 0).

**Chunks.** ``q, k, v`` may be chunked along their leading axes (the same chunks for all three)
and along the sequence axis (``k`` and ``v`` then with ``q``'s chunks, so ``M = N``); the
feature axes ``D``, ``Dv`` must be one chunk. Results have the chunks of the inputs:
``out`` and ``dq`` those of ``q``, ``dk`` of ``k``, ``dv`` of ``v``.

**Finite values.** A dask array cannot be checked for NaN/Inf without computing it, so
``check_finite=True`` (the default) adds to the graph one check per block, before the block is
used: the computation, not the call, raises ``ValueError`` naming the argument and the first
bad index. The cores then run with ``check_finite=False`` inside the tasks (the blocks they see
are checked already). ``check_finite=False`` leaves the checks out.

**Forward and backward together.** ``forward`` returns a cache of lazy parts; the backward
graph reuses the forward's tasks. Compute the output and the gradients in one call
(``dask.compute(out, grads)``) or ``persist`` the cache first; computing them separately runs
the forward twice.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import config
from .core import AttentionCore, Grads
from .dense import DenseAttention
from .kernels import linear as _scan
from .linear import LinearAttention
from .local import LocalAttention, StridedAttention
from .ops import attend, attend_backward, merge
from .blocksparse import BlockMask, BlockSparseAttention
from .sparse import SparseAttention
from .validate import as_float_array, check_bool, check_qkv

__all__ = ["DistributedAttention", "PairwiseSoftmax", "register_pairwise", "SEQUENCE_SHARDED"]


def _dask():
    """``(dask, dask.array)``, imported on first use (``dask`` is the optional extra ``distributed``)."""
    try:
        import dask
        import dask.array as da
    except ImportError as exc:                                    # pragma: no cover - extra installed in CI
        raise ImportError("efficient_attention.distributed needs dask: "
                          "pip install 'efficient_attention[distributed]'") from exc
    return dask, da


# ============================================================================ pairwise softmax
class PairwiseSoftmax:
    """How a softmax core attends one query shard to one key shard (the pairwise-merge path).

    ``rows`` and ``cols`` are the ``range`` of global positions of the query and key shard.
    The default methods compute masked dense attention on the pair with
    :func:`~efficient_attention.ops.attend` / :func:`~efficient_attention.ops.attend_backward`;
    a core with its own engine (a block-sparse kernel returning the per-row log-sum-exp)
    overrides :meth:`forward` and :meth:`backward` and registers itself with
    :func:`register_pairwise`.
    """

    def __init__(self, core):
        self.core = core

    @property
    def scale(self):
        return getattr(self.core, "scale", None)

    def needed(self, rows: range, cols: range) -> bool:
        """Whether the pair has any allowed (query, key) entry (False: the task is skipped)."""
        return True

    def mask(self, rows: range, cols: range):
        """The boolean ``(len(rows), len(cols))`` mask of the pair, or None (all allowed)."""
        return None

    def forward(self, q, k, v, rows: range, cols: range):
        """``(out, lse)`` of the pair (shapes ``(..., n, Dv)``, ``(..., n)``)."""
        return attend(q, k, v, mask=self.mask(rows, cols), scale=self.scale, check_finite=False)

    def backward(self, q, k, v, delta, lse, dout, rows: range, cols: range):
        """``(dq, dk, dv)`` of the pair from the merged ``lse`` and ``delta = rowsum(dO ⊙ O)``."""
        return attend_backward(q, k, v, None, lse, dout, mask=self.mask(rows, cols), scale=self.scale,
                               delta=delta, check_finite=False)


class _DensePairs(PairwiseSoftmax):
    """DenseAttention: every pair, or (causal) the pairs on and below the diagonal."""

    def needed(self, rows, cols):
        return not self.core.causal or cols.start <= rows.stop - 1       # some key j <= some query i

    def mask(self, rows, cols):
        if not self.core.causal or cols.stop - 1 <= rows.start:          # below the diagonal: all allowed
            return None
        return np.arange(cols.start, cols.stop)[None, :] <= np.arange(rows.start, rows.stop)[:, None]


_PAIRWISE: dict = {DenseAttention: _DensePairs}


def register_pairwise(cls: type, rule: type) -> None:
    """Let cores of class ``cls`` be sequence-sharded by the pairwise merge, with ``rule`` (a
    :class:`PairwiseSoftmax` subclass, built as ``rule(core)``) computing each pair."""
    if not (isinstance(cls, type) and isinstance(rule, type) and issubclass(rule, PairwiseSoftmax)):
        raise TypeError(f"register_pairwise needs a core class and a PairwiseSoftmax subclass, "
                        f"got {cls!r} and {rule!r}")
    _PAIRWISE[cls] = rule


#: the sharding used along the sequence axis, by core class (see the module docstring)
SEQUENCE_SHARDED = {
    "DenseAttention": "pairwise merge by log-sum-exp (causal: pairs on and below the diagonal)",
    "LocalAttention": "halo of window rows",
    "StridedAttention": "halo of window × stride rows (a window is required)",
    "LinearAttention": "state scan (causal) or one global state sum (non-causal)",
}


def _supported() -> str:
    names = sorted(set(SEQUENCE_SHARDED) | {c.__name__ for c in _PAIRWISE})
    return ", ".join(names)


# ============================================================================ the public class
class _DistCache(NamedTuple):
    sharding: str            # "leading", "halo", "pairwise", "scan" or "sum"
    q: object                # the checked dask arrays (computation dtype)
    k: object
    v: object
    out: object              # the dask output
    parts: np.ndarray        # per block: a reference to its forward result, shape q.numblocks[:-1]
    extra: dict              # the forward's graph, the core's reference, per sharding: states, geometry


class DistributedAttention:
    r"""Any attention core over dask arrays: forward and backward as lazy dask graphs.

    Parameters
    ----------
    core : AttentionCore
        A core of this library. Chunks along the leading axes work for every core; chunks along
        the sequence axis for the cores in :data:`SEQUENCE_SHARDED` (and those registered with
        :func:`register_pairwise`).

    Notes
    -----
    ``forward(q, k, v, *, check_finite=True) -> (out, cache)`` with ``q (..., N, D)``,
    ``k (..., M, D)``, ``v (..., M, Dv)`` dask arrays; ``out`` has the chunks of ``q`` (its last
    axis one chunk of ``Dv``). ``backward(cache, dout, *, check_finite=True) -> Grads`` with
    ``dout`` chunked like ``out``; ``dq, dk, dv`` have the chunks of ``q, k, v`` and each
    ``params[name]`` is one chunk, the sum over the blocks. Nothing is computed by either call;
    the module docstring has the recipes, the chunk rules and the finite check.

    Examples
    --------
    >>> import numpy as np, dask.array as da, efficient_attention as ea
    >>> from efficient_attention.distributed import DistributedAttention
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 64, 8)) for _ in range(3))
    >>> dq, dk, dv = (da.from_array(x, chunks=(1, 16, 8)) for x in (q, k, v))   # 2 x 4 shards
    >>> dist = DistributedAttention(ea.DenseAttention(causal=True))
    >>> out, cache = dist.forward(dq, dk, dv)
    >>> out.chunks
    ((1, 1), (16, 16, 16, 16), (8,))
    >>> bool(np.allclose(out.compute(), ea.DenseAttention(causal=True)(q, k, v)))
    True
    """

    def __init__(self, core):
        if not isinstance(core, AttentionCore):
            raise TypeError(f"core must be an attention core of efficient_attention (an AttentionCore, "
                            f"e.g. ea.DenseAttention()), got {type(core).__name__}")
        self.core = core

    def __repr__(self):
        return f"DistributedAttention({self.core!r})"

    def __call__(self, q, k, v, *, check_finite: bool = True):
        return self.forward(q, k, v, check_finite=check_finite)[0]

    # ------------------------------------------------------------------ forward
    def forward(self, q, k, v, *, check_finite: bool = True):
        """The lazy output (a dask array with ``q``'s chunks) and the cache for :meth:`backward`."""
        check_finite = check_bool(check_finite, "check_finite")
        q, k, v = _check_inputs(q, k, v)
        sharding = self.sharding(q, k, v)
        if check_finite:
            q, k, v = (None if x is None else _finite_checked(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
        forward = {"leading": _leading_forward, "halo": _halo_forward, "pairwise": _pairwise_forward,
                   "scan": _linear_forward, "sum": _linear_forward}[sharding]
        out, parts, extra = forward(self.core, q, k, v)
        return out, _DistCache(sharding, q, k, v, out, parts, extra)

    def sharding(self, q, k, v) -> str:
        """How these inputs are sharded: ``"leading"`` (one chunk along the sequence axis), or
        along the sequence axis ``"halo"``, ``"pairwise"``, ``"scan"`` (causal linear) or
        ``"sum"`` (non-causal linear). Raises ``ValueError`` for a core (or configuration) that
        cannot be sequence-sharded, naming those that can."""
        q, k, v = _check_inputs(q, k, v)
        if q.numblocks[-2] == 1:
            return "leading"
        core, kind = self.core, type(self.core)
        if kind in _PAIRWISE:
            return "pairwise"
        if kind is LocalAttention:
            return "halo"
        if kind is StridedAttention:
            if core.window is None:
                raise ValueError("StridedAttention without a window cannot be sharded along the sequence "
                                 "axis (each query sees its whole residue class, so a shard would need every "
                                 "other); give it a window, or chunk only the leading axes "
                                 "(q.rechunk({-2: -1}), the same for k and v)")
            return "halo"
        if kind is LinearAttention:
            return "scan" if core.causal else "sum"
        raise ValueError(f"{kind.__name__} cannot be sharded along the sequence axis (q has "
                         f"{q.numblocks[-2]} chunks along N); the cores that can are: {_supported()}. "
                         f"Chunk only the leading (batch, head) axes instead: q.rechunk({{-2: -1}}), "
                         f"the same for k and v")

    # ------------------------------------------------------------------ backward
    def backward(self, cache, dout, *, check_finite: bool = True) -> Grads:
        """Lazy ``Grads(dq, dk, dv, params)`` (dask arrays with the chunks of ``q, k, v``)."""
        check_finite = check_bool(check_finite, "check_finite")
        if not isinstance(cache, _DistCache):
            raise TypeError(f"cache must be the cache returned by DistributedAttention.forward, "
                            f"got {type(cache).__name__}")
        _, da = _dask()
        if not isinstance(dout, da.Array):
            raise TypeError(f"dout must be a dask array with the chunks of the forward output, got "
                            f"{type(dout).__name__} (wrap a NumPy array with "
                            f"dask.array.from_array(dout, chunks=out.chunks))")
        as_float_array(np.empty(0, dout.dtype), "dout")
        if dout.shape != cache.out.shape:
            raise ValueError(f"dout must have the shape of the forward output {cache.out.shape}, got {dout.shape}")
        if dout.chunks != cache.out.chunks:
            raise ValueError(f"dout must have the chunks of the forward output {cache.out.chunks}, got "
                             f"{dout.chunks} (dout.rechunk(out.chunks))")
        dout = dout.astype(cache.out.dtype)
        if check_finite:
            dout = _finite_checked(dout, "dout")
        backward = {"leading": _leading_backward, "halo": _halo_backward, "pairwise": _pairwise_backward,
                    "scan": _linear_causal_backward, "sum": _linear_sum_backward}[cache.sharding]
        return backward(self.core, cache, dout)


# ============================================================================ input checks
def _check_inputs(q, k, v):
    """Types, dtypes (float32/float64, mixed promote), shapes and chunks of dask ``q, k, v``."""
    _, da = _dask()
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        if x is None and name == "k":
            continue
        if not isinstance(x, da.Array):
            raise TypeError(f"{name} must be a dask array (dask.array.from_array({name}, chunks=...)), "
                            f"got {type(x).__name__}")
        as_float_array(np.empty(0, x.dtype), name)                 # the dtype policy (TypeError)
        if any(np.isnan(c) for cs in x.chunks for c in cs):
            raise ValueError(f"{name} must have known chunk sizes, got {x.chunks} "
                             f"(call {name}.compute_chunk_sizes() first)")
        if x.ndim >= 2 and x.numblocks[-1] != 1:
            raise ValueError(f"{name} must have one chunk along its last (feature) axis, got chunks "
                             f"{x.chunks[-1]} ({name}.rechunk({{-1: -1}}))")
    present = [(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")) if x is not None]
    # shapes through the library's policy, on zero-memory views of the same shapes
    views = [np.broadcast_to(np.zeros((), np.float64), x.shape) for x, _ in present]
    if k is None:
        check_qkv(views[0], views[0][..., :v.shape[-2], :], views[1])
    else:
        check_qkv(*views)
    dtype = np.result_type(*[x.dtype for x, _ in present])
    q, k, v = (None if x is None else x.astype(dtype) for x in (q, k, v))
    lead = q.chunks[:-2]
    for x, name in present[1:]:
        if x.chunks[:-2] != lead:
            raise ValueError(f"{name} must have the chunks of q along the leading (batch) axes, got "
                             f"{x.chunks[:-2]} and q {lead} ({name}.rechunk(q.chunks[:-2] + ...))")
    keys = [(x, n) for x, n in ((k, "k"), (v, "v")) if x is not None]
    for x, name in keys:
        if x.chunks[-2] != keys[0][0].chunks[-2]:
            raise ValueError(f"{name} must have the chunks of {keys[0][1]} along the key axis M, got "
                             f"{x.chunks[-2]} and {keys[0][0].chunks[-2]}")
        sharded = q.numblocks[-2] > 1 or x.numblocks[-2] > 1
        if sharded and x.chunks[-2] != q.chunks[-2]:
            raise ValueError(f"{name} must have the chunks of q along the sequence axis when either is "
                             f"chunked along it (shard i of the keys goes with shard i of the queries), "
                             f"got q {q.chunks[-2]} and {name} {x.chunks[-2]}")
    return q, k, v


def _finite_block(x, name, block_info=None):
    """Identity on one block; ``ValueError`` naming ``name`` and the global index of the first
    NaN / Inf."""
    if not np.isfinite(x).all():
        local = np.unravel_index(int(np.argmin(np.isfinite(x).reshape(-1))), x.shape)
        start = [lo for lo, _ in block_info[0]["array-location"]] if block_info else [0] * x.ndim
        index = tuple(int(s + i) for s, i in zip(start, local))
        bad = "NaN" if np.isnan(x[local]) else "Inf"
        raise ValueError(f"{name} must contain only finite values (check_finite=True), found {bad} "
                         f"at index {index}")
    return x


def _finite_checked(x, name):
    return x.map_blocks(_finite_block, name, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype))


# ============================================================================ graph helpers
class _Graph:
    """The tasks of one forward or one backward, gathered into one layer of a dask graph.

    ``task(func, *args)`` adds a task and returns a reference to its result; ``args`` may hold
    such references and the blocks of input arrays (:func:`_grid`). ``array(refs, chunks,
    dtype)`` makes a dask array whose blocks are the referenced results. A ``_Graph`` is a
    dask collection (``__dask_graph__``), so that a later graph (the backward) can depend on it.
    Building costs a dictionary entry per task, whatever the size of the graph.
    """

    def __init__(self, kind: str, *inputs):
        import uuid
        self.token = uuid.uuid4().hex[:16]
        self.name = f"ea-{kind}-{self.token}"
        self.inputs = [x for x in inputs if x is not None]
        self.tasks = {}
        self.counts = {}
        self.arrays = 0
        self._hlg = None

    def _key(self, prefix: str):
        n = self.counts.get(prefix, 0)
        self.counts[prefix] = n + 1
        return (f"ea-{prefix.strip('_').replace('_', '-')}-{self.token}", n)

    def data(self, value):
        """A value stored once in the graph (the core), referenced by every task that uses it."""
        from dask.task_spec import DataNode, TaskRef
        key = self._key(type(value).__name__)
        self.tasks[key] = DataNode(key, value)
        return TaskRef(key)

    def task(self, func, *args):
        from dask.task_spec import Task, TaskRef
        key = self._key(func.__name__)
        self.tasks[key] = Task(key, func, *args)
        return TaskRef(key)

    def __dask_graph__(self):
        if self._hlg is None:
            from dask.highlevelgraph import HighLevelGraph
            self._hlg = HighLevelGraph.from_collections(self.name, self.tasks, dependencies=self.inputs)
        return self._hlg

    def __dask_layers__(self):
        return (self.name,)

    def __dask_keys__(self):
        return list(self.tasks)

    def array(self, refs, chunks, dtype, item=None):
        """A dask array laid out as ``chunks`` whose blocks are the results ``refs`` (an object
        array of references, shape = the number of blocks per axis), or their element ``item``."""
        _, da = _dask()
        from dask.highlevelgraph import HighLevelGraph
        from dask.task_spec import Task
        self.arrays += 1
        name = f"ea-blocks-{self.token}{self.arrays}"
        layer = {}
        for idx in np.ndindex(refs.shape):
            key = (name,) + idx
            layer[key] = (Task(key, _identity, refs[idx]) if item is None
                          else Task(key, _item, refs[idx], item))
        graph = HighLevelGraph.from_collections(name, layer, dependencies=[self])
        return da.Array(graph, name, chunks, meta=np.empty((0,) * len(chunks), dtype))


def _grid(x):
    """References to the blocks of a dask array (an object array of shape ``x.numblocks``)."""
    if x is None:
        return None
    from dask.task_spec import TaskRef
    refs = np.empty(x.numblocks, object)
    for idx in np.ndindex(x.numblocks):
        refs[idx] = TaskRef((x.name,) + idx)
    return refs


def _tree(g, items, combine):
    """Combine the results ``items`` pairwise in a balanced tree of ``combine(a, b)`` tasks."""
    items = list(items)
    while len(items) > 1:
        items = [g.task(combine, items[i], items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


def _item(x, i):
    return x[i]


def _rows(x, lo, hi):
    """Rows ``[lo, hi)`` of the sequence axis (-2) of a block."""
    return x[..., lo:hi, :]


def _concat(*parts):
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-2)


def _add(a, b):
    return a + b


def _add_tuples(a, b):
    return tuple(x + y for x, y in zip(a, b))


def _add_dicts(a, b):
    return {name: a[name] + b[name] for name in a}


def _shard_offsets(chunks):
    return np.concatenate([[0], np.cumsum(chunks)]).astype(int)


def _lead_blocks(x):
    return list(np.ndindex(x.numblocks[:-2]))


def _pieces(g, grid, offsets, lead, lo, hi):
    """References covering the global rows ``[lo, hi)`` of the sequence shards
    ``grid[lead + (j, 0)]``: whole blocks as they are, parts of blocks sliced by a task (which
    the scheduler runs where the block lives, so that only the rows needed travel)."""
    out = []
    for j in range(len(offsets) - 1):
        a, b = max(lo, offsets[j]), min(hi, offsets[j + 1])
        if a >= b:
            continue
        block = grid[lead + (j, 0)]
        if (a, b) == (offsets[j], offsets[j + 1]):
            out.append(block)
        else:
            out.append(g.task(_rows, block, int(a - offsets[j]), int(b - offsets[j])))
    return out


# ============================================================================ leading axes
def _core_forward(core, q, k, v):
    return core.forward(q, k, v, check_finite=False)            # (out, cache); blocks checked before


def _core_backward(core, cache, dout):
    grads = core.backward(cache, dout)
    return grads.dq, grads.dk, grads.dv, dict(grads.params)


def _head_core(core, h0, h1, n_heads, b0=0):
    """The core for heads ``[h0, h1)`` (and batch entries from ``b0`` on): a per-head pattern
    restricted to them; a block-sparse core whose ``mask_mod`` reads ``(b, h)`` with its
    indices shifted to the block's; any other core as it is."""
    if isinstance(core, SparseAttention) and core.per_head and (h0, h1) != (0, n_heads):
        return SparseAttention(core.pattern[h0:h1], scale=core.scale)
    if _mask_mod(core) is not None and (h0 or b0):
        mask_mod = _mask_mod(core)

        def shifted(b, h, q_idx, kv_idx):
            return mask_mod(b + b0, h + h0, q_idx, kv_idx)
        return BlockSparseAttention(shifted, causal=core.causal, scale=core.scale)
    return core


def _mask_mod(core):
    """A block-sparse core's ``mask_mod`` (a function of ``(b, h, q_idx, kv_idx)``), else None."""
    if isinstance(core, BlockSparseAttention) and callable(core.mask) and not isinstance(core.mask, BlockMask):
        return core.mask
    return None


def _check_leading_blocks(core, q):
    """A block-sparse core with a per-head / per-batch BlockMask cannot be cut along those axes."""
    if isinstance(core, BlockSparseAttention) and isinstance(core.mask, BlockMask) and len(core.mask.shape) > 2:
        axes = len(core.mask.shape) - 2
        if any(nb > 1 for nb in q.numblocks[-2 - axes:-2]):
            raise ValueError(f"BlockSparseAttention with a BlockMask of shape {core.mask.shape} (per head or "
                             f"per batch entry) shards along its head and batch axes only as one chunk: got q "
                             f"chunks {q.chunks[:-2]}; give those axes one chunk, or the mask as a mask_mod")


def _leading_forward(core, q, k, v):
    g = _Graph("forward", q, k, v)
    qg, kg, vg = _grid(q), _grid(k), _grid(v)
    core_ref = g.data(core)
    head_cores = {}
    _check_leading_blocks(core, q)
    per_head = isinstance(core, SparseAttention) and core.per_head
    if (per_head or _mask_mod(core) is not None) and q.ndim >= 3 and max(q.numblocks[:-2]) > 1:
        heads = _shard_offsets(q.chunks[-3])
        batches = _shard_offsets(q.chunks[-4]) if q.ndim >= 4 else [0, 1]
        for b in range(len(batches) - 1):
            for h in range(len(heads) - 1):
                head_cores[b, h] = g.data(_head_core(core, heads[h], heads[h + 1], q.shape[-3], batches[b]))
    parts = np.empty(q.numblocks[:-1], object)
    for idx in np.ndindex(parts.shape):
        block = idx + (0,)
        key = (idx[-3] if len(idx) >= 3 else 0, idx[-2] if len(idx) >= 2 else 0)
        parts[idx] = g.task(_core_forward, head_cores.get(key, core_ref) if head_cores else core_ref,
                            qg[block], None if kg is None else kg[block], vg[block])
    out = g.array(parts[..., None], q.chunks[:-1] + ((v.shape[-1],),), q.dtype, item=0)
    return out, parts, {"graph": g, "core": core_ref, "head_cores": head_cores}


def _identity(x):
    return x


def _leading_backward(core, cache, dout):
    q, k, v = cache.q, cache.k, cache.v
    g = _Graph("backward", cache.extra["graph"], dout)
    dg = _grid(dout)
    head_cores, core_ref = cache.extra["head_cores"], cache.extra["core"]
    res = np.empty(q.numblocks[:-1] + (1,), object)
    for idx in np.ndindex(cache.parts.shape):
        key = (idx[-3] if len(idx) >= 3 else 0, idx[-2] if len(idx) >= 2 else 0)
        res[idx + (0,)] = g.task(_core_backward, head_cores.get(key, core_ref) if head_cores else core_ref,
                                 g.task(_item, cache.parts[idx], 1), dg[idx + (0,)])
    grads_params = {}
    if core.params:
        _, da = _dask()
        total = _tree(g, [g.task(_item, r, 3) for r in res.flat], _add_dicts)   # summed over the blocks
        for name, p in core.params.items():
            ref = np.empty((1,) * np.ndim(p), object)
            ref[(0,) * np.ndim(p)] = g.task(_item, total, name)
            grads_params[name] = g.array(ref, tuple((n,) for n in np.shape(p)), p.dtype)
    return Grads(g.array(res, q.chunks, q.dtype, item=0),
                 None if k is None else g.array(res, k.chunks, k.dtype, item=1),
                 g.array(res, v.chunks, v.dtype, item=2), grads_params)


# ============================================================================ halo (local, strided)
def _halo(core):
    """Rows of halo ``(before, after)`` a shard needs: the band's reach in positions."""
    reach = core.window * (core.stride if isinstance(core, StridedAttention) else 1)
    return reach, (0 if core.causal else reach)


def _halo_geometry(core, q):
    offsets = _shard_offsets(q.chunks[-2])
    n = q.shape[-2]
    before, after = _halo(core)
    ranges = []
    for j in range(len(offsets) - 1):
        s, e = offsets[j], offsets[j + 1]
        lo, hi = max(0, s - before), min(n, e + after)
        if (lo, hi) == (0, n):
            raise ValueError(f"{type(core).__name__}(window={core.window}) reaches {max(before, after)} "
                             f"positions, so shard {j} (rows {s}:{e}) with its halo would hold the whole "
                             f"sequence of {n}: use fewer, longer shards along N (or chunk only the "
                             f"leading axes, q.rechunk({{-2: -1}}))")
        ranges.append((s, e, lo, hi))
    return offsets, ranges


def _halo_forward_task(core, q, k, v, trim):
    """The core on the shard plus halo; the output trimmed to the shard's rows, and the cache."""
    out, cache = core.forward(q, k, v, check_finite=False)
    return out[..., trim[0]:trim[1], :], cache


def _halo_forward(core, q, k, v):
    offsets, ranges = _halo_geometry(core, q)
    g = _Graph("forward", q, k, v)
    qg, kg, vg = _grid(q), _grid(k), _grid(v)
    core_ref = g.data(core)
    parts = np.empty(q.numblocks[:-1], object)
    for lead in _lead_blocks(q):
        for j, (s, e, lo, hi) in enumerate(ranges):
            pieces = [g.task(_concat, *_pieces(g, x, offsets, lead, lo, hi)) for x in (qg, kg, vg)]
            parts[lead + (j,)] = g.task(_halo_forward_task, core_ref, *pieces, (int(s - lo), int(e - lo)))
    out = g.array(parts[..., None], q.chunks[:-1] + ((v.shape[-1],),), q.dtype, item=0)
    return out, parts, {"graph": g, "core": core_ref, "offsets": offsets, "ranges": ranges}


def _halo_backward_task(core, cache, dout, trim, n_ext):
    """The core's backward on the shard plus halo, ``dO = 0`` on the halo rows; ``dq`` of the
    shard's rows, ``dk, dv`` of all the rows (the halo's go to the neighbours)."""
    ext = np.zeros(dout.shape[:-2] + (n_ext, dout.shape[-1]), dout.dtype)
    ext[..., trim[0]:trim[1], :] = dout
    grads = core.backward(cache, ext)
    return grads.dq[..., trim[0]:trim[1], :], grads.dk, grads.dv


def _overlap_add(n_rows, starts, *pieces):
    """A shard's ``n_rows`` rows of ``dk`` (or ``dv``): each piece added at its start row."""
    if len(pieces) == 1 and pieces[0].shape[-2] == n_rows:
        return pieces[0]
    total = np.zeros(pieces[0].shape[:-2] + (n_rows, pieces[0].shape[-1]), pieces[0].dtype)
    for start, piece in zip(starts, pieces):
        total[..., start:start + piece.shape[-2], :] += piece
    return total


def _halo_backward(core, cache, dout):
    q, k, v = cache.q, cache.k, cache.v
    ranges = cache.extra["ranges"]
    g = _Graph("backward", cache.extra["graph"], dout)
    dg = _grid(dout)
    dqs = np.empty(q.numblocks, object)
    dks, dvs = np.empty(k.numblocks, object), np.empty(v.numblocks, object)
    for lead in _lead_blocks(q):
        ext = []
        for j, (s, e, lo, hi) in enumerate(ranges):
            ext.append(g.task(_halo_backward_task, cache.extra["core"], g.task(_item, cache.parts[lead + (j,)], 1),
                              dg[lead + (j, 0)], (int(s - lo), int(e - lo)), int(hi - lo)))
            dqs[lead + (j, 0)] = g.task(_item, ext[-1], 0)
        for m, (s, e, _, _) in enumerate(ranges):            # overlap-add: shard m's rows of every ext
            terms_k, terms_v, starts = [], [], []
            for j, (_, _, lo, hi) in enumerate(ranges):
                a, b = max(s, lo), min(e, hi)
                if a < b:
                    terms_k.append(g.task(_item_rows, ext[j], 1, int(a - lo), int(b - lo)))
                    terms_v.append(g.task(_item_rows, ext[j], 2, int(a - lo), int(b - lo)))
                    starts.append(int(a - s))
            dks[lead + (m, 0)] = g.task(_overlap_add, int(e - s), tuple(starts), *terms_k)
            dvs[lead + (m, 0)] = g.task(_overlap_add, int(e - s), tuple(starts), *terms_v)
    return Grads(g.array(dqs, q.chunks, q.dtype), g.array(dks, k.chunks, k.dtype),
                 g.array(dvs, v.chunks, v.dtype), {})


def _item_rows(x, i, lo, hi):
    """Rows ``[lo, hi)`` of element ``i`` of a task's result."""
    return x[i][..., lo:hi, :]


# ============================================================================ pairwise merge (dense)
def _pair_forward(rule, q, k, v, rows, cols):
    return rule.forward(q, k, v, rows, cols)


def _merge_two(a, b):
    return merge([a[0], b[0]], [a[1], b[1]])


def _pairwise_forward(core, q, k, v):
    rule = _PAIRWISE[type(core)](core)
    g = _Graph("forward", q, k, v)
    rule_ref = g.data(rule)
    offsets = _shard_offsets(q.chunks[-2])
    shards = [range(int(offsets[j]), int(offsets[j + 1])) for j in range(len(offsets) - 1)]
    qg, kg, vg = _grid(q), _grid(k), _grid(v)
    parts = np.empty(q.numblocks[:-1], object)
    pairs = set()
    for lead in _lead_blocks(q):
        for a, rows in enumerate(shards):
            partials = []
            for b, cols in enumerate(shards):
                if rule.needed(rows, cols):
                    pairs.add(lead + (a, b))
                    partials.append(g.task(_pair_forward, rule_ref, qg[lead + (a, 0)], kg[lead + (b, 0)],
                                           vg[lead + (b, 0)], rows, cols))
            if not partials:                                   # no allowed key at all: zeros, lse -inf
                partials.append(g.task(_empty_pair, qg[lead + (a, 0)], v.shape[-1]))
            parts[lead + (a,)] = _tree(g, partials, _merge_two)   # (out, lse) of query shard a
    out = g.array(parts[..., None], q.chunks[:-1] + ((v.shape[-1],),), q.dtype, item=0)
    return out, parts, {"graph": g, "rule": rule_ref, "shards": shards, "pairs": pairs}


def _empty_pair(q, dv):
    return np.zeros(q.shape[:-1] + (dv,), q.dtype), np.full(q.shape[:-1], -np.inf, q.dtype)


def _delta(merged, dout):
    return np.einsum("...nc,...nc->...n", dout, merged[0])    # δ = rowsum(dO ⊙ O), merged O


def _pair_backward(rule, q, k, v, delta, lse, dout, rows, cols):
    return rule.backward(q, k, v, delta, lse, dout, rows, cols)


def _field_sum(g, items, i):
    """The sum of element ``i`` of the results ``items``, in a tree."""
    return _tree(g, [g.task(_item, t, i) for t in items], _add)


def _pairwise_backward(core, cache, dout):
    q, k, v = cache.q, cache.k, cache.v
    shards, pairs, rule_ref = cache.extra["shards"], cache.extra["pairs"], cache.extra["rule"]
    g = _Graph("backward", cache.extra["graph"], dout)
    qg, kg, vg, dg = _grid(q), _grid(k), _grid(v), _grid(dout)
    dqs = np.empty(q.numblocks, object)
    dks, dvs = np.empty(k.numblocks, object), np.empty(v.numblocks, object)
    for lead in _lead_blocks(q):
        deltas = [g.task(_delta, cache.parts[lead + (a,)], dg[lead + (a, 0)]) for a in range(len(shards))]
        lses = [g.task(_item, cache.parts[lead + (a,)], 1) for a in range(len(shards))]
        by_query = {a: [] for a in range(len(shards))}
        by_key = {b: [] for b in range(len(shards))}
        for a, rows in enumerate(shards):
            for b, cols in enumerate(shards):
                if lead + (a, b) in pairs:
                    pair = g.task(_pair_backward, rule_ref, qg[lead + (a, 0)], kg[lead + (b, 0)], vg[lead + (b, 0)],
                                  deltas[a], lses[a], dg[lead + (a, 0)], rows, cols)
                    by_query[a].append(pair)
                    by_key[b].append(pair)
        for a in range(len(shards)):
            block = lead + (a, 0)
            dqs[block] = _field_sum(g, by_query[a], 0) if by_query[a] else g.task(np.zeros_like, qg[block])
            dks[block] = _field_sum(g, by_key[a], 1) if by_key[a] else g.task(np.zeros_like, kg[block])
            dvs[block] = _field_sum(g, by_key[a], 2) if by_key[a] else g.task(np.zeros_like, vg[block])
    return Grads(g.array(dqs, q.chunks, q.dtype), g.array(dks, k.chunks, k.dtype),
                 g.array(dvs, v.chunks, v.dtype), {})


# ============================================================================ linear attention
def _features(core, x, name):
    """Exact features ``φ(x)`` and the map's cache (its public ``forward``)."""
    fm = core.feature_map
    phi, fcache = fm.forward(x)
    phi = np.asarray(phi)
    if phi.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"feature_map must map {name} {x.shape} to (..., {x.shape[-2]}, F), got {phi.shape}")
    overflow = not np.isfinite(phi).all() and np.isfinite(x).all()
    # a stabilised map's features are positive: a row of zeros is an underflow, which would
    # silently give that query the output 0 (LinearAttention's row shift prevents it)
    underflow = (name == "q" and getattr(fm, "stabilised", False) and phi.size
                 and bool((phi.max(axis=-1) <= 0).any()))
    if overflow or underflow:
        raise ValueError(f"feature_map {'overflowed' if overflow else 'underflowed'} on {name}: the "
                         f"sequence-sharded linear attention uses the exact features φ({name}) (the "
                         f"stabiliser of LinearAttention itself is a step of the feature map this module "
                         f"cannot call), and these inputs are too large for them in {x.dtype}; scale "
                         f"{name} down, use float64, or shard only the leading axes")
    return phi.astype(x.dtype, copy=False), fcache


def _safe_inv(den):
    """1/den, 0 where den == 0 (a zero normaliser gives output 0 and zero gradient, as in the core)."""
    nz = den != 0
    return np.where(nz, 1 / np.where(nz, den, 1), 0).astype(den.dtype, copy=False)


def _flat(x):
    return np.ascontiguousarray(x.reshape((-1,) + x.shape[-2:]))


def _scan_forward(method, a, b, v, eps_rows):
    """The core's causal prefix sums on one shard: ``(out, den, states)``, batch axes kept."""
    lead = a.shape[:-2]
    args = (_flat(a), _flat(b), _flat(v), np.ascontiguousarray(eps_rows.reshape(-1, eps_rows.shape[-1])))
    states = None
    if method == "chunked":
        out, den = _scan.chunked_forward(*args)
    elif method == "numpy":
        out, den = _scan.causal_forward_reference(*args, block=config.LINEAR_NUMPY_BLOCK)
    else:
        out, den, states = _scan.causal_forward(*args, states=True)
    return out.reshape(lead + out.shape[-2:]), den.reshape(lead + den.shape[-1:]), states


def _scan_backward(method, a, b, v, out, den, dout, states):
    lead = a.shape[:-2]
    args = (_flat(a), _flat(b), _flat(v), _flat(out), np.ascontiguousarray(den.reshape(-1, den.shape[-1])),
            _flat(dout))
    if method == "chunked":
        da_, db, dv = _scan.chunked_backward(*args)
    elif method == "numpy":
        da_, db, dv = _scan.causal_backward_reference(*args, block=config.LINEAR_NUMPY_BLOCK)
    else:
        da_, db, dv = _scan.causal_backward(*args, states=states)
    return tuple(x.reshape(lead + x.shape[-2:]) for x in (da_, db, dv))


def _method(core):
    return "scan" if core.method == "auto" else core.method


def _kv_state(core, k, v):
    """``(S, z) = (φ(K)ᵀV, φ(K)ᵀ1)`` of one shard: ``(..., F, Dv)``, ``(..., F)``."""
    b, _ = _features(core, k, "k")
    return np.swapaxes(b, -1, -2) @ v, b.sum(axis=-2)


def _zeros_state(state):
    return tuple(np.zeros_like(x) for x in state)


def _linear_causal_forward_task(core, q, k, v, prefix):
    s_prev, z_prev = prefix                                   # S_{<a}, z_{<a}
    a, _ = _features(core, q, "q")
    b, _ = _features(core, k, "k")
    eps_rows = np.einsum("...nf,...f->...n", a, z_prev) + q.dtype.type(core.eps)   # φ(q)ᵀz_{<a} + ε
    out, den, states = _scan_forward(_method(core), a, b, v, eps_rows)             # den: global
    out += (a @ s_prev) * _safe_inv(den)[..., None]           # + φ(q)ᵀS_{<a} / den
    return out, den, states


def _linear_sum_forward_task(core, q, total):
    s, z = total
    a, _ = _features(core, q, "q")
    den = (a @ z[..., None])[..., 0] + q.dtype.type(core.eps)  # φ(Q) z + ε
    out = (a @ s) * _safe_inv(den)[..., None]                   # φ(Q) S / den
    return out, den, None


def _linear_forward(core, q, k, v):
    if hasattr(core.feature_map, "check_width"):
        core.feature_map.check_width(q.shape[-1], "q")
    g = _Graph("forward", q, k, v)
    qg, kg, vg = _grid(q), _grid(k), _grid(v)
    core_ref = g.data(core)
    shards = q.numblocks[-2]
    parts = np.empty(q.numblocks[:-1], object)
    prefixes = {}
    for lead in _lead_blocks(q):
        states = [g.task(_kv_state, core_ref, kg[lead + (j, 0)], vg[lead + (j, 0)]) for j in range(shards)]
        if core.causal:                                        # exclusive scan over the shards
            prefix = [g.task(_zeros_state, states[0])]
            for j in range(1, shards):
                prefix.append(g.task(_add_tuples, prefix[-1], states[j - 1]))
            for j in range(shards):
                prefixes[lead + (j,)] = prefix[j]
                parts[lead + (j,)] = g.task(_linear_causal_forward_task, core_ref, qg[lead + (j, 0)],
                                            kg[lead + (j, 0)], vg[lead + (j, 0)], prefix[j])
        else:                                                  # one global sum
            total = _tree(g, states, _add_tuples)
            prefixes[lead] = total
            for j in range(shards):
                parts[lead + (j,)] = g.task(_linear_sum_forward_task, core_ref, qg[lead + (j, 0)], total)
    out = g.array(parts[..., None], q.chunks[:-1] + ((v.shape[-1],),), q.dtype, item=0)
    return out, parts, {"graph": g, "core": core_ref, "states": prefixes}


def _gc(fwd, dout):
    """``G = dO/den`` and ``c = −rowsum(dO ⊙ O)/den`` of one shard."""
    out, den = fwd[0], fwd[1]
    inv = _safe_inv(den)
    return dout * inv[..., None], -np.einsum("...nc,...nc->...n", dout, out) * inv


def _query_grad_state(core, q, fwd, dout):
    """``(φ(Q)ᵀG, φ(Q)ᵀc)`` of one shard: what the keys of the other shards need."""
    a, _ = _features(core, q, "q")
    g, c = _gc(fwd, dout)
    return np.swapaxes(a, -1, -2) @ g, np.einsum("...nf,...n->...f", a, c)


def _linear_causal_backward_task(core, q, k, v, fwd, prefix, suffix, dout):
    out, den, states = fwd
    s_prev, z_prev = prefix                                   # S_{<a}, z_{<a}
    r_next, rz_next = suffix                                  # R_{>a}, r_{>a}
    a, cache_a = _features(core, q, "q")
    b, cache_b = _features(core, k, "k")
    da_, db, dv = _scan_backward(_method(core), a, b, v, out, den, dout, states)   # the shard's own sums
    g, c = _gc(fwd, dout)
    da_ += g @ np.swapaxes(s_prev, -1, -2) + c[..., None] * z_prev[..., None, :]   # + G S_{<a}ᵀ + c z_{<a}ᵀ
    db += v @ np.swapaxes(r_next, -1, -2) + rz_next[..., None, :]                   # + V R_{>a}ᵀ + r_{>a}
    dv += b @ r_next                                                                # + φ(K) R_{>a}
    fm = core.feature_map
    return fm.backward(cache_a, da_), fm.backward(cache_b, db), dv


def _linear_sum_backward_task(core, q, k, v, fwd, total, grad_total, dout):
    s, z = total
    ds, dz = grad_total                                       # dS = φ(Q)ᵀG, dz = φ(Q)ᵀc over all shards
    a, cache_a = _features(core, q, "q")
    b, cache_b = _features(core, k, "k")
    g, c = _gc(fwd, dout)
    da_ = g @ np.swapaxes(s, -1, -2) + c[..., None] * z[..., None, :]    # dφ(Q) = G Sᵀ + c zᵀ
    db = v @ np.swapaxes(ds, -1, -2) + dz[..., None, :]                  # dφ(K) = V dSᵀ + 1 dzᵀ
    dv = b @ ds                                                          # dV = φ(K) dS
    fm = core.feature_map
    return fm.backward(cache_a, da_), fm.backward(cache_b, db), dv


def _linear_backward(core, cache, dout, causal):
    q, k, v = cache.q, cache.k, cache.v
    g = _Graph("backward", cache.extra["graph"], dout)
    qg, kg, vg, dg = _grid(q), _grid(k), _grid(v), _grid(dout)
    core_ref = cache.extra["core"]
    shards = q.numblocks[-2]
    res = np.empty(q.numblocks, object)
    for lead in _lead_blocks(q):
        grad_states = [g.task(_query_grad_state, core_ref, qg[lead + (j, 0)], cache.parts[lead + (j,)],
                              dg[lead + (j, 0)]) for j in range(shards)]
        if causal:                                             # reverse exclusive scan over the shards
            suffix = [None] * shards
            suffix[-1] = g.task(_zeros_state, grad_states[-1])
            for j in range(shards - 2, -1, -1):
                suffix[j] = g.task(_add_tuples, suffix[j + 1], grad_states[j + 1])
        else:
            grad_total = _tree(g, grad_states, _add_tuples)
        for j in range(shards):
            block = lead + (j, 0)
            if causal:
                res[block] = g.task(_linear_causal_backward_task, core_ref, qg[block], kg[block], vg[block],
                                    cache.parts[lead + (j,)], cache.extra["states"][lead + (j,)], suffix[j],
                                    dg[block])
            else:
                res[block] = g.task(_linear_sum_backward_task, core_ref, qg[block], kg[block], vg[block],
                                    cache.parts[lead + (j,)], cache.extra["states"][lead], grad_total, dg[block])
    return Grads(g.array(res, q.chunks, q.dtype, item=0), g.array(res, k.chunks, k.dtype, item=1),
                 g.array(res, v.chunks, v.dtype, item=2), {})


def _linear_causal_backward(core, cache, dout):
    return _linear_backward(core, cache, dout, causal=True)


def _linear_sum_backward(core, cache, dout):
    return _linear_backward(core, cache, dout, causal=False)

