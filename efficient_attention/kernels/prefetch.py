"""A software prefetch hint for numba kernels that walk memory backwards.

``prefetch_range(x, start, stop)`` asks the CPU to bring ``x[start:stop]`` (``x``
one-dimensional and contiguous; other layouts are a typing error) into its caches,
one hint per 64-byte line (LLVM's ``llvm.prefetch``: read, keep in all levels; an
x86 ``prefetcht0``). It is only a hint: it never faults, changes no value, and in
plain Python (``NUMBA_DISABLE_JIT=1``, or a kernel's ``py_func``) it does nothing.
The bounds are clamped to ``[0, len(x))`` (:func:`line_indices` lists the elements
that get a hint).

Why: the reverse scan of the causal linear-attention backward reads its rows
from the last token down while each row is read upwards (lines ``4t … 4t + 3``,
then ``4t − 4 …``), and on the development machine the hardware prefetchers did
not keep up with that pattern. Measured there (float32, 8 heads, F = Dv = 64,
interleaved in one process): with the rows 8 tokens ahead hinted, the backward
kernel took 0.86× the time at N = 65536 and 0.92× at N = 4096 in one run (caches
flushed between calls, two threads), and 0.80–0.89× at N = 4096 … 262144 in an A/B
of the whole ``causal_backward`` against the previous commit. The same hints in the
ascending scans changed nothing (within noise). Those figures are from the reverse scan
over whole sequences. It now runs chunk by chunk
(``config.LINEAR_CHECKPOINT``) on rows that the chunk's forward
scan has just read, except those of ``a``, which it alone reads, from memory: it hints
those only (A/B, 8 heads × 65536, elu + 1 features: the same time as hinting all five
arrays; without any hint, 1.12× and 1.19× the time in two runs).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..config import CACHE, JIT_PLAIN

__all__ = ["prefetch_range", "line_indices", "LINE_BYTES"]

#: the cache-line size the hints are spaced by
LINE_BYTES = 64


def prefetch_range(x, start, stop):
    """Hint that ``x[start:stop]`` will be read soon (no-op outside numba)."""
    return None


@intrinsic
def _prefetch(typingctx, arr, idx):
    """``llvm.prefetch(&arr[idx], read, locality 3, data)``; ``arr`` 1-D, ``idx`` in range."""
    if not isinstance(arr, types.Array) or arr.ndim != 1 or not isinstance(idx, types.Integer):
        return None
    sig = types.void(arr, types.intp)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(**JIT_PLAIN)
def _bounds(n, itemsize, start, stop):
    """``(lo, hi, step)``: ``[start, stop)`` clamped to ``[0, n)``, one element per line."""
    return max(start, 0), min(stop, n), max(1, LINE_BYTES // itemsize)


@njit(**JIT_PLAIN)
def line_indices(n, itemsize, start, stop):
    """The elements of a length-``n`` array of ``itemsize``-byte items that
    ``prefetch_range(x, start, stop)`` hints: one per line from the clamped start, and
    the last element (for a start that is not line-aligned)."""
    lo, hi, step = _bounds(n, itemsize, start, stop)
    if hi <= lo:
        return np.empty(0, np.int64)
    out = np.empty((hi - lo + step - 1) // step + 1, np.int64)
    k = 0
    for i in range(lo, hi, step):
        out[k] = i
        k += 1
    out[k] = hi - 1
    return out


@overload(prefetch_range, jit_options={"cache": CACHE})
def _prefetch_range_jit(x, start, stop):
    if not isinstance(x, types.Array) or x.ndim != 1 or x.layout not in ("C", "F"):
        return None

    def impl(x, start, stop):
        lo, hi, step = _bounds(x.shape[0], x.itemsize, start, stop)
        for i in range(lo, hi, step):
            _prefetch(x, i)
        if hi > lo:                                   # the last line, if x[start] is not line-aligned
            _prefetch(x, hi - 1)
        return None

    return impl
