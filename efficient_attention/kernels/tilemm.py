r"""Products of small tiles in registers, for the block-sparse engine's flash kernels.

``tile_matmul(a, b, c, accumulate)`` computes ``c = a @ b`` (or ``c += a @ b``) for the tiles of
:mod:`efficient_attention.kernels.blocksparse`: ``a (m, k)`` with any strides (a transposed view
such as ``p.T`` included), ``b (k, n)`` and ``c (m, n)`` with unit stride along their rows (a
``ValueError`` otherwise, unless ``n`` is narrower than a vector: then no vector is loaded). In
plain Python (a kernel's ``py_func``, ``NUMBA_DISABLE_JIT=1``) it is NumPy's ``@``; compiled, it is
a register-blocked loop that LLVM turns into the machine's widest vector FMAs:

* ``c`` is cut into panels of ``MR`` rows by ``NV`` vectors of ``W`` columns (``W`` lanes of the
  vector registers: 16 float32 with AVX-512, 8 with AVX);
* a panel's ``MR·NV`` accumulators stay in registers for the whole sum over ``k``: each step loads
  one row of ``b`` (``NV`` vector loads) and broadcasts ``MR`` entries of ``a`` into
  ``MR·NV`` fused multiply-adds (``llvm.fmuladd``);
* the panels that do not fill (rows left over from ``MR``, columns from ``W``) take narrower
  panels, and the last ``n mod W`` columns a scalar loop.

Why not BLAS: the engine's products are tiles of 64 to 128 rows and columns (``d = 64``), one
call per tile. On the development machine (OpenBLAS 0.3.30/0.3.31, the SkylakeX kernel on an
Emerald Rapids core, one thread) such a product through ``sgemm`` ran at 69–71 GFLOP/s, the same
product here at 101–105 GFLOP/s in the same run (``tile_matmul`` of 128×64 by 64×128 and 128×128
by 128×64, 3000 calls each; see ``benchmarks/bench_blocksparse.py`` for the engine's figures).
There is no packing and no cache blocking: meant for operands that fit in L1/L2, as the engine's
tiles do; large products belong to BLAS.

Each sum runs in a fixed order (``k`` ascending, one FMA per step, per entry of ``c``), so a
result does not depend on the thread count; it differs from BLAS's and NumPy's in the last bits.
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..config import JIT

__all__ = ["tile_matmul", "tile_matmul_compiled", "tile_matmul_reference", "VECTOR_BYTES", "MR", "NV"]


def _vector_registers() -> tuple[int, int]:
    """``(bytes, count)`` of the vector registers numba compiles for: AVX-512 64 × 32, AVX 32 × 16,
    NEON 16 × 32, else 16 × 16 (also when ``NUMBA_CPU_NAME`` or ``NUMBA_CPU_FEATURES`` ask numba to
    compile for another CPU than this one: wider vectors would then be split, and spill)."""
    if numba.config.CPU_NAME not in (None, "", "host") or numba.config.CPU_FEATURES:
        return 16, 16
    features = llvm.get_host_cpu_features()
    if features.get("avx512f"):
        return 64, 32
    if features.get("avx"):
        return 32, 16
    if features.get("neon") or features.get("asimd"):
        return 16, 32
    return 16, 16


#: bytes of one vector register (lanes: ``VECTOR_BYTES // itemsize``)
VECTOR_BYTES, _REGISTERS = _vector_registers()
#: rows of a panel
MR = 4
#: vectors per row of a panel: ``MR·NV`` accumulators, ``NV`` rows of ``b`` and a broadcast in registers
NV = 4 if _REGISTERS >= 32 else 2


def tile_matmul(a, b, c, accumulate):
    """``c[...] = a @ b``, or ``c += a @ b`` when ``accumulate`` (NumPy here; compiled, the
    register-blocked loop of the module notes)."""
    if accumulate:
        c += a @ b
    else:
        c[...] = a @ b


def tile_matmul_reference(a, b, c, accumulate):
    """NumPy: the same product, in float64, cast to ``c``'s dtype (for the tests)."""
    prod = a.astype(np.float64) @ b.astype(np.float64)
    c[...] = (prod + c if accumulate else prod).astype(c.dtype)


def _panel(rows: int, vectors: int):
    """An intrinsic ``panel(a, a_off, a_rs, a_ks, b, b_off, ldb, c, c_off, ldc, k, accumulate)``:
    the ``rows × vectors·W`` block of ``c`` at element ``c_off`` (row stride ``ldc``) gets
    ``Σ_κ a[a_off + r·a_rs + κ·a_ks] · b[b_off + κ·ldb + j]`` for ``κ < k``, added to its old
    contents when ``accumulate`` (offsets and strides in elements from each array's data pointer)."""

    @intrinsic
    def panel(typingctx, a, a_off, a_rs, a_ks, b, b_off, ldb, c, c_off, ldc, k, accumulate):
        if not all(isinstance(x, types.Array) and x.dtype in (types.float32, types.float64)
                   and x.dtype == c.dtype for x in (a, b, c)):
            return None
        dtype = c.dtype
        lanes = VECTOR_BYTES // (4 if dtype == types.float32 else 8)
        sig = types.void(a, a_off, a_rs, a_ks, b, b_off, ldb, c, c_off, ldc, k, accumulate)

        def codegen(context, builder, signature, args):
            st = signature.args
            intp = context.get_value_type(types.intp)
            vty = ir.VectorType(context.get_value_type(dtype), lanes)
            i32 = ir.IntType(32)

            def data(i):
                return context.make_array(st[i])(context, builder, args[i]).data

            def index(i):
                return context.cast(builder, args[i], st[i], types.intp)

            def const(x):
                return ir.Constant(intp, x)

            def vector_at(base, idx):
                return builder.bitcast(builder.gep(base, [idx]), vty.as_pointer())

            ap, bp, cp = data(0), data(4), data(7)
            a_off_, a_rs_, a_ks_, b_off_, ldb_, c_off_, ldc_, k_ = (index(i) for i in (1, 2, 3, 5, 6, 8, 9, 10))
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty] * 3),
                "llvm.fmuladd.v%d%s" % (lanes, "f32" if dtype == types.float32 else "f64"))
            acc = [[cgutils.alloca_once(builder, vty) for _ in range(vectors)] for _ in range(rows)]
            c_at = [[vector_at(cp, builder.add(c_off_, builder.add(builder.mul(ldc_, const(r)), const(v * lanes))))
                     for v in range(vectors)] for r in range(rows)]
            with builder.if_else(context.cast(builder, args[11], st[11], types.boolean)) as (old, zero):
                with old:
                    for r in range(rows):
                        for v in range(vectors):
                            builder.store(builder.load(c_at[r][v], align=1), acc[r][v])
                with zero:
                    for r in range(rows):
                        for v in range(vectors):
                            builder.store(ir.Constant(vty, None), acc[r][v])
            undef = ir.Constant(vty, ir.Undefined)
            splat = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
            with cgutils.for_range(builder, k_) as loop:
                kk = loop.index
                b_row = builder.add(b_off_, builder.mul(kk, ldb_))
                bv = [builder.load(vector_at(bp, builder.add(b_row, const(v * lanes))), align=1)
                      for v in range(vectors)]
                a_col = builder.add(a_off_, builder.mul(kk, a_ks_))
                for r in range(rows):
                    x = builder.load(builder.gep(ap, [builder.add(a_col, builder.mul(a_rs_, const(r)))]))
                    xv = builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(i32, 0)), undef, splat)
                    for v in range(vectors):
                        builder.store(builder.call(fma, [xv, bv[v], builder.load(acc[r][v])]), acc[r][v])
            for r in range(rows):
                for v in range(vectors):
                    builder.store(builder.load(acc[r][v]), c_at[r][v], align=1)
            return context.get_dummy_value()

        return sig, codegen

    return panel


_panel_wide, _panel_narrow = _panel(MR, NV), _panel(MR, 1)
_row_wide, _row_narrow = _panel(1, NV), _panel(1, 1)


@njit(**JIT)
def _scalar_columns(a, b, c, i0, i1, j0, accumulate):
    """``c[i0:i1, j0:]`` (+)= ``(a @ b)[i0:i1, j0:]`` entry by entry (the columns after the last vector)."""
    for i in range(i0, i1):
        for j in range(j0, c.shape[1]):
            total = 0.0
            for kk in range(a.shape[1]):
                total += a[i, kk] * b[kk, j]
            c[i, j] = c[i, j] + total if accumulate else total


@njit(**JIT)
def _panel_of(rows, wide, a, a_off, a_rs, a_ks, b, b_off, ldb, c, c_off, ldc, k, accumulate):
    """The panel of ``rows`` (``MR`` or 1) by ``NV`` vectors (``wide``) or one."""
    if rows == MR:
        if wide:
            _panel_wide(a, a_off, a_rs, a_ks, b, b_off, ldb, c, c_off, ldc, k, accumulate)
        else:
            _panel_narrow(a, a_off, a_rs, a_ks, b, b_off, ldb, c, c_off, ldc, k, accumulate)
    elif wide:
        _row_wide(a, a_off, a_rs, a_ks, b, b_off, ldb, c, c_off, ldc, k, accumulate)
    else:
        _row_narrow(a, a_off, a_rs, a_ks, b, b_off, ldb, c, c_off, ldc, k, accumulate)


@overload(tile_matmul, jit_options=dict(JIT))
def _tile_matmul_overload(a, b, c, accumulate):
    if not isinstance(c, types.Array) or c.dtype not in (types.float32, types.float64):
        return None
    lanes = VECTOR_BYTES // (4 if c.dtype == types.float32 else 8)
    wide = NV * lanes

    def impl(a, b, c, accumulate):
        m, n = c.shape
        kd = a.shape[1]
        if m == 0 or n == 0:
            return
        if kd == 0:                                    # (b is not read)
            if not accumulate:
                c[:, :] = 0.0
            return
        isz = c.itemsize
        if n >= lanes and (b.strides[1] != isz or c.strides[1] != isz):   # (vector loads and stores)
            raise ValueError("tile_matmul: b and c need unit stride along their rows")
        a_rs, a_ks = a.strides[0] // isz, a.strides[1] // isz
        ldb, ldc = b.strides[0] // isz, c.strides[0] // isz
        i = 0
        while i < m:                                   # strips of MR rows, then single rows
            rows = MR if i + MR <= m else 1
            j = 0
            while j + lanes <= n:                      # panels of NV vectors, then of one
                step = wide if j + wide <= n else lanes
                _panel_of(rows, step == wide, a, i * a_rs, a_rs, a_ks, b, j, ldb, c, i * ldc + j, ldc, kd, accumulate)
                j += step
            if j < n:
                _scalar_columns(a, b, c, i, i + rows, j, accumulate)
            i += rows

    return impl


@njit(**JIT)
def tile_matmul_compiled(a, b, c, accumulate):
    """:func:`tile_matmul` compiled, callable from Python (the tests compare it with the reference)."""
    tile_matmul(a, b, c, accumulate)
