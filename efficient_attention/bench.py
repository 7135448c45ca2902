"""Timing for the main command, and the building blocks the ``benchmarks/`` scripts share.

What it measures, and how:

* **time**: the median of ``repeat`` runs after ``warmup`` runs (the first
  numba call compiles, so it is never timed; :func:`bench_core` and :func:`bench_layer`
  warm up with forward+backward calls, which run every kernel either timing uses);
* **peak memory**: the peak of traced allocations during one forward +
  backward (``tracemalloc`` sees every NumPy buffer; kernels write into
  buffers their NumPy wrappers allocate);
* **GEMM peak**: float32/float64 ``numpy.matmul`` throughput measured in a
  subprocess started *without* ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE``
  (which some machines set to dodge old OpenBLAS bugs; without them OpenBLAS
  picks its native kernel, whose name is reported via threadpoolctl), once per
  process (:func:`gemm_peak`, ``refresh=True`` to measure again);
* **useful FLOPs** from ``core.cost()``, so that a run's fraction of the GEMM
  peak is comparable across variants;
* **error** of an exact variant against its float64 oracle (``err out``, ``err grad``):
  the core's own ``reference`` when it has one (added tokens), else dense attention
  masked with its ``dense_mask``; for a sequence layer, the same layer (same
  parameters) evaluated in float64. These are numerical errors: about 1e-7 in
  float32, 1e-15 in float64.
* **approximation gap** of an approximate variant (``gap out``, ``gap grad``): its
  distance from the exact softmax attention it stands in for (unmasked, or masked
  like its ``reference_mask``, e.g. causal), in float64. It measures the
  approximation on the benchmark's random inputs, not a numerical error, and is
  often of order 1 there: exact attention over standard-normal q and k spreads each
  query over hundreds of keys, so its output is small.

Results are rows of dicts, printed as a Markdown table and optionally
written as JSON.

Nothing here changes the process it runs in: no allocator settings, no thread limits
(``python -m efficient_attention --blas-threads`` limits BLAS for its own run and restores
it), and ``tracemalloc`` is stopped again when it was not running. What only the benchmark
scripts need (glibc allocator settings, interleaved rounds of timings, the peak RSS of a
fresh interpreter) is their harness, ``benchmarks/harness.py``.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Callable, Iterable

import numpy as np

__all__ = [
    "median_time",
    "traced_peak",
    "gemm_peak",
    "blas_info",
    "machine_header",
    "markdown_table",
    "write_json",
    "rel_error",
    "bench_core",
    "bench_layer",
    "random_qkv",
]


def median_time(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def traced_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of traced (NumPy / Python) allocations made while ``fn()`` runs."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return max(0, peak - base)


def _clean_env() -> dict:
    env = dict(os.environ)
    env.pop("OPENBLAS_CORETYPE", None)
    env.pop("OPENBLAS_L2_SIZE", None)
    return env


_GEMM_CODE = r"""
import json, time, statistics, numpy as np
from threadpoolctl import threadpool_info
out = {}
for name in ("float32", "float64"):
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n)).astype(name)
    b = np.random.default_rng(1).standard_normal((n, n)).astype(name)
    a @ b
    ts = []
    for _ in range(7):
        t0 = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t0)
    out[name] = 2 * n ** 3 / statistics.median(ts) / 1e9
info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
out["kernel"] = ", ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}" for i in info) or "unknown"
out["threads"] = max([i.get("num_threads", 0) for i in info] or [0])
print(json.dumps(out))
"""

_GEMM_CACHE: dict = {}


def gemm_peak(refresh: bool = False) -> dict:
    """``{'float32': GFLOP/s, 'float64': GFLOP/s, 'kernel': str, 'threads': int}``
    of a 2048² matmul, measured in a subprocess without the OpenBLAS override variables.

    The first call measures (a few seconds) and later calls return that reading;
    ``refresh=True`` measures again and keeps the new reading (e.g. after a long run on a
    shared machine, whose speed drifts).
    """
    if refresh:
        _GEMM_CACHE.clear()
    if not _GEMM_CACHE:
        res = subprocess.run([sys.executable, "-c", _GEMM_CODE], capture_output=True, text=True,
                             env=_clean_env(), timeout=600)
        if res.returncode != 0:
            raise RuntimeError(f"GEMM peak subprocess failed:\n{res.stderr[-2000:]}")
        _GEMM_CACHE.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return dict(_GEMM_CACHE)


def blas_info() -> str:
    """The BLAS this process uses (threadpoolctl), e.g. 'openblas 0.3.29 Haswell, 2 threads'."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return "unknown (threadpoolctl not installed)"
    info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}, "
                     f"{i.get('num_threads')} threads" for i in info) or "unknown"


def machine_header(with_peak: bool = False) -> str:
    """Markdown lines describing the machine, BLAS, threads (and optionally the GEMM peak)."""
    import numba
    lines = [
        f"- python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs",
        f"- BLAS (this process): {blas_info()}",
        f"- numba threads: {numba.get_num_threads()} (threading layer: {_threading_layer()})",
        "- OPENBLAS_CORETYPE=" + os.environ.get("OPENBLAS_CORETYPE", "(unset)")
        + ", OPENBLAS_L2_SIZE=" + os.environ.get("OPENBLAS_L2_SIZE", "(unset)"),
    ]
    if with_peak:
        peak = gemm_peak()
        lines.append(f"- GEMM peak (subprocess without the OpenBLAS overrides; kernel {peak['kernel']}, "
                     f"{peak['threads']} threads): float32 {peak['float32']:.1f} GFLOP/s, "
                     f"float64 {peak['float64']:.1f} GFLOP/s")
    return "\n".join(lines)


def _threading_layer() -> str:
    import numba
    try:
        return numba.threading_layer()
    except ValueError:
        return "not yet initialised"


def markdown_table(rows: list[dict], columns: Iterable[str] | None = None) -> str:
    """Rows of dicts as a Markdown table (floats formatted to 3 significant digits)."""
    if not rows:
        return "(no rows)"
    columns = list(columns) if columns is not None else list(rows[0])

    def fmt(x):
        if isinstance(x, float):
            if x != x:
                return "—"
            return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.0f}"
        return "—" if x is None else str(x)

    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def write_json(path: str, payload) -> None:
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, default=float)


def rel_error(actual, expected) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius; absolute when expected is 0)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    denom = np.linalg.norm(expected)
    diff = np.linalg.norm(actual - expected)
    return float(diff / denom) if denom > 0 else float(diff)


def random_qkv(batch_shape, n, d, dv=None, dtype=np.float32, seed=0):
    """Standard-normal ``q (..., N, D)``, ``k``, ``v`` and ``dout``."""
    dv = d if dv is None else dv
    rng = np.random.default_rng(seed)
    shapes = [(n, d), (n, d), (n, dv), (n, dv)]
    return tuple(rng.standard_normal(tuple(batch_shape) + s).astype(dtype) for s in shapes)


def bench_core(core, n: int, d: int = 64, dv: int | None = None, heads: int = 1,
               dtype=np.float32, repeat: int = 3, warmup: int = 1, check: bool = True,
               exact: bool | None = None, seed: int = 0, peak: dict | None = None,
               times: tuple | None = None) -> dict:
    """Time one attention core's forward and forward+backward on random inputs.

    Returns a row: forward / backward times (ms, medians), GFLOP/s on the
    useful FLOPs from ``core.cost``, peak traced memory (MB) and, on the first head
    (``check``), the output's and the gradients' relative distance from float64 dense
    attention. For an exact core (``exact`` not False) that is its numerical error,
    ``err out`` / ``err grad``, against dense attention masked by ``core.dense_mask``
    (or the core's own ``reference``); for an approximation (``exact=False``) it is
    the approximation gap, ``gap out`` / ``gap grad``, against the attention it
    approximates (``core.reference_mask``). ``oracle`` names the comparison.
    ``times=(t_fwd, t_fwd_bwd)`` in seconds (e.g. from the interleaved rounds of the
    benchmark scripts' harness, ``benchmarks/harness.py``) skips the timing.
    """
    dv = d if dv is None else dv
    q, k, v, dout = random_qkv((heads,), n, d, dv, dtype, seed)
    state = {}

    def fwd():
        state["out"], state["cache"] = core.forward(q, k, v)

    def fwd_bwd():
        out, cache = core.forward(q, k, v)
        state["grads"] = core.backward(cache, dout)

    row = _timed_row(fwd, fwd_bwd, n, core.cost(n, d, dv).scaled(heads),
                     core.cost(n, d, dv, backward=True).scaled(heads), dtype, repeat, warmup,
                     peak, times, check)
    if check:
        own = core.reference(q[:1], k[:1], v[:1], dout[:1])
        if own is not None:                                   # the core's own oracle
            ref, ref_grads, label = own[0][0], [g[0] for g in own[1:]], "reference"
        else:
            mask = core.dense_mask(n, n) if exact is not False else core.reference_mask(n, n)
            ref, ref_grads = _oracle(q[0], k[0], v[0], dout[0], mask, getattr(core, "scale", None))
            if exact is False:        # the approximation's gap from what it approximates
                label = "full softmax" if mask is None else "masked softmax"
            else:
                label = "dense" if mask is None else "masked"
        grads = state["grads"]
        err_out = rel_error(state["out"][0], ref)
        err_grad = max(rel_error(a[0], b) for a, b in zip((grads.dq, grads.dk, grads.dv), ref_grads[:3])
                       if a is not None)
        keys = ("gap out", "gap grad") if exact is False and own is None else ("err out", "err grad")
        row.update({keys[0]: err_out, keys[1]: err_grad, "oracle": label})
    return row


def bench_layer(layer, n: int, d: int = 64, batch: int = 1, dtype=np.float32, repeat: int = 3,
                warmup: int = 1, check: bool = True, seed: int = 0, peak: dict | None = None) -> dict:
    """Time one sequence layer's forward and forward+backward on a random ``x``
    ``(batch, N, D)`` and ``dy``, as :func:`bench_core` times a core.

    GFLOP/s are on ``layer.cost``. With ``check``, ``err out`` / ``err grad`` are the
    relative errors of ``y`` and of the gradients (``dx`` and every parameter's) against
    the same layer with the same parameters evaluated in float64 on the same ``x`` and
    ``dy`` (``oracle``: ``"layer in float64"``): a layer computes exactly what it
    defines, so its float64 run is its oracle. In a float64 run that comparison would be
    with itself, and the row has no error (``oracle``: ``"none in float64"``).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n, d)).astype(dtype)
    dy = rng.standard_normal((batch, n, d)).astype(dtype)
    state = {}

    def fwd():
        state["y"] = layer(x)

    def fwd_bwd():
        y, cache = layer.forward(x)
        state["y"], state["grads"] = y, layer.backward(cache, dy)

    row = _timed_row(fwd, fwd_bwd, n, layer.cost(n, d).scaled(batch),
                     layer.cost(n, d, backward=True).scaled(batch), dtype, repeat, warmup, peak,
                     None, check)
    if check and np.dtype(dtype) == np.float64:
        row["oracle"] = "none in float64"
    elif check:
        y_ref, cache = layer.forward(x.astype(np.float64))
        g_ref, g = layer.backward(cache, dy.astype(np.float64)), state["grads"]
        errs = [rel_error(g.dx, g_ref.dx)] + [rel_error(g.params[p], g_ref.params[p]) for p in g_ref.params]
        row.update({"err out": rel_error(state["y"], y_ref), "err grad": max(errs),
                    "oracle": "layer in float64"})
    return row


def _timed_row(fwd, fwd_bwd, n, fwd_cost, bwd_cost, dtype, repeat, warmup, peak, times, check) -> dict:
    """The timing columns of :func:`bench_core` and :func:`bench_layer` (``fwd_bwd`` has run
    once when it returns, so the caller's state holds its outputs)."""
    if times is None:
        for _ in range(warmup):       # forward and backward: the first calls compile their kernels
            fwd_bwd()
        t_fwd = median_time(fwd, repeat, 0)
        t_fb = median_time(fwd_bwd, repeat, 0)
    else:
        t_fwd, t_fb = times
        if check:
            fwd_bwd()                                         # the outputs compared by the caller
            fwd()
    row = {
        "N": n,
        "fwd ms": 1e3 * t_fwd,
        "fwd+bwd ms": 1e3 * t_fb,
        "fwd GFLOP/s": fwd_cost.flops / t_fwd / 1e9,
        "fwd+bwd GFLOP/s": (fwd_cost.flops + bwd_cost.flops) / t_fb / 1e9,
        "peak MB": traced_peak(fwd_bwd) / 2**20,
    }
    if peak is not None:
        row["% peak"] = 100 * row["fwd+bwd GFLOP/s"] / peak[np.dtype(dtype).name]
    return row


_ORACLE_CACHE: dict = {}


def _oracle(q, k, v, dout, mask, scale):
    """Float64 dense output and gradients on one head, cached by inputs, mask and scale
    (many variants share the unmasked oracle)."""
    import hashlib
    from .dense import DenseAttention
    h = hashlib.sha1()
    for a in (q, k, v, dout) + (() if mask is None else (np.asarray(mask),)):
        h.update(np.ascontiguousarray(a).tobytes())
    key = (h.hexdigest(), q.shape, k.shape, v.shape, None if mask is None else np.shape(mask), scale)
    if key not in _ORACLE_CACHE:
        if len(_ORACLE_CACHE) > 8:
            _ORACLE_CACHE.clear()
        oracle = DenseAttention(scale=scale)
        q0, k0, v0, g0 = (np.asarray(a, np.float64) for a in (q, k, v, dout))
        ref, cache = oracle.forward(q0, k0, v0, mask=mask)
        _ORACLE_CACHE[key] = (ref, oracle.backward(cache, g0))
    return _ORACLE_CACHE[key]
