"""The benchmark scripts' harness: what only ``benchmarks/`` needs, kept out of the library.

:mod:`efficient_attention.bench` times one variant, measures the GEMM peak and prints the
table, and changes nothing in the process that imports it. The chapter 3 and 4 scripts,
whose targets are growth factors from N to 4N at sizes of gigabytes, need more, and some
of it is what a library must never do:

* **allocator** (process-wide): :func:`retain_freed_memory` tells glibc's ``malloc`` to keep
  freed memory in the process, so that freed arrays are reused rather than returned to the
  kernel and faulted back in as fresh zeroed pages (see its docstring for why and what it
  costs); :func:`release_freed_memory` gives the kept memory back between configurations;
  :func:`allocator_line` says in a report's header which allocator a run used. The scripts
  call :func:`retain_freed_memory` first, unless ``--default-malloc``;
* **interleaved rounds**: :func:`interleaved_rounds` times every size of a variant once per
  round, in turn, so that no size finds its inputs in cache from its own last repetition;
  :func:`interleaved_times` and :func:`interleaved_fwd_bwd` take medians over the rounds
  (the pair ``efficient_attention.bench.bench_core(..., times=)`` takes), and
  :func:`median_ratio` divides two sizes' times round by round;
* **whole-process memory**: :func:`peak_rss` runs code in a fresh interpreter and reads its
  peak resident set size.

The scripts run as ``python benchmarks/bench_<chapter>.py``; their directory is then first
on ``sys.path``, and they import this module as ``harness``.
"""
from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time

__all__ = [
    "interleaved_rounds",
    "interleaved_times",
    "interleaved_fwd_bwd",
    "median_ratio",
    "retain_freed_memory",
    "release_freed_memory",
    "allocator_line",
    "peak_rss",
]


def interleaved_rounds(fns: dict, repeat: int = 5, warmup: int = 1) -> dict:
    """Wall times in seconds of each ``fns[key]()``, ``{key: [one per timed round]}``, timed
    in rounds that call every key once, in order (``warmup`` untimed rounds first).

    Meant for growth factors (time at 4N over time at N). Each call follows a call of
    another key, so no size finds its inputs still in cache from its own previous
    repetition: in back-to-back repetitions, the smallest sizes can, and look cheaper.
    Drift of a shared machine over a run also hits every key alike, and the times of one
    round were taken side by side (:func:`median_ratio` pairs them). Every key's inputs
    must be held at once.
    """
    keys = list(fns)
    times = {key: [] for key in keys}
    for r in range(max(0, warmup) + max(1, repeat)):
        for key in keys:
            t0 = time.perf_counter()
            fns[key]()
            if r >= warmup:
                times[key].append(time.perf_counter() - t0)
    return times


def interleaved_times(fns: dict, repeat: int = 5, warmup: int = 1) -> dict:
    """Median wall time in seconds of each ``fns[key]()`` over the rounds of
    :func:`interleaved_rounds`."""
    return {key: statistics.median(t) for key, t in interleaved_rounds(fns, repeat, warmup).items()}


def median_ratio(num, den) -> float:
    """Median over rounds of ``num[i] / den[i]``: a ratio of two times taken in the same
    round (:func:`interleaved_rounds`), side by side. A shared machine's speed drifts
    between rounds; a ratio of two medians can pair a fast round of one key with a slow
    round of the other, and this cannot."""
    if len(num) != len(den) or not len(num):
        raise ValueError(f"median_ratio needs two equally long, non-empty lists of times, "
                         f"got {len(num)} and {len(den)}")
    return statistics.median(a / b for a, b in zip(num, den))


def interleaved_fwd_bwd(cores: dict, inputs: dict, repeat: int = 5, warmup: int = 1) -> dict:
    """``{n: (t_fwd, t_fwd_bwd)}`` for ``cores[n]`` on ``inputs[n] = (q, k, v, dout)``: every
    size's forward, then every size's forward+backward, in the rounds of
    :func:`interleaved_times` (all inputs held at once). The pair is what
    ``efficient_attention.bench.bench_core(..., times=)`` takes."""
    def call(n, backward):
        q, k, v, dout = inputs[n]
        out, cache = cores[n].forward(q, k, v)
        if backward:
            cores[n].backward(cache, dout)

    fns = {(n, kind): (lambda n=n, b=kind == "fwd+bwd": call(n, b))
           for kind in ("fwd", "fwd+bwd") for n in inputs}
    t = interleaved_times(fns, repeat, warmup)
    return {n: (t[n, "fwd"], t[n, "fwd+bwd"]) for n in inputs}


#: the glibc allocator's state as set by this process (see :func:`retain_freed_memory`)
_ALLOCATOR = "default"


def _glibc():
    """The C library through ctypes when it is glibc on Linux, else None."""
    import ctypes
    import ctypes.util
    if platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep freed memory in the process (``mallopt``: no ``mmap``
    for large blocks, no trimming of the heap). Returns False (and changes nothing) where
    the C library is not glibc.

    Why the benchmarks do this: by default glibc gives every block above its mmap threshold
    (which adapts, up to 32 MB) its own ``mmap`` and returns it to the kernel on ``free``; the
    next array of that size is fresh pages, which the kernel zeroes on first touch. Smaller
    blocks are reused from the heap.
    A benchmark that steps N across that threshold (8 heads × 4096 × 64 float32 = 8 MB,
    × 16384 = 32 MB) then charges the larger sizes for page zeroing that the smaller ones
    never pay: measured on the benchmark machine, non-causal FAVOR+ forward 4096 → 16384
    cost 4.5× by default and 3.95× with this call. jemalloc and tcmalloc (which PyTorch's
    CPU tuning guide recommends) also keep freed memory for reuse; users can get this
    from glibc without code by setting ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<bytes>``.
    The cost: the process keeps its peak heap size until it exits. It is process-wide,
    which is why the library itself never calls it. It covers the main arena (the main
    thread's allocations, which is where NumPy arrays of a single-threaded script come from).
    """
    global _ALLOCATOR
    libc = _glibc()
    if libc is None:
        return False
    try:
        m_trim_threshold, m_mmap_max = -1, -4
        # -1: never trim (man mallopt). mallopt takes an int, so a finite threshold is under
        # 2 GB, and the N = 262144 runs free more than that at once (the environment variable
        # MALLOC_TRIM_THRESHOLD_ takes a size_t)
        no_mmap = libc.mallopt(m_mmap_max, 0) == 1
        no_trim = no_mmap and libc.mallopt(m_trim_threshold, -1) == 1
    except (OSError, AttributeError):
        return False
    if no_trim:
        _ALLOCATOR = "glibc keeps freed memory (harness.retain_freed_memory: mallopt M_MMAP_MAX=0, " \
                     "M_TRIM_THRESHOLD=-1)"
    elif no_mmap:                                  # half done: say so rather than "default"
        _ALLOCATOR = "glibc with M_MMAP_MAX=0 only (mallopt M_TRIM_THRESHOLD=-1 was refused)"
    return no_trim


def release_freed_memory() -> bool:
    """Give the freed memory that :func:`retain_freed_memory` kept back to the kernel
    (glibc ``malloc_trim(0)``: the free top of the heap is cut off and free chunks inside it
    are returned page by page). The setting itself stays. Returns False where the C library
    is not glibc (nothing done).

    Benchmarks call it between configurations: the heap otherwise keeps its largest size
    until the process exits, and a run of several configurations (each with its own
    allocation pattern) can hold far more than any one of them uses at once. A full
    ``bench_linear.py`` run held 19 GB this way and was killed for memory on a 23 GB machine
    when its fresh-interpreter memory check started.
    """
    libc = _glibc()
    if libc is None:
        return False
    try:
        libc.malloc_trim(0)
    except AttributeError:
        return False
    return True


def allocator_line() -> str:
    """One Markdown line on the allocator's state (for benchmark headers)."""
    if _ALLOCATOR == "default":
        return ("- allocator: C library default (glibc: blocks above its mmap threshold, "
                "at most 32 MB, are fresh zeroed pages on every allocation)")
    return "- allocator: " + _ALLOCATOR


def peak_rss(code: str, *, timeout: float = 1800) -> dict:
    """Run ``code`` in a fresh Python and return ``{'peak_rss_mb', 'stdout'}``.

    The child's peak resident set size (``VmHWM`` of ``/proc/self/status``,
    Linux) is read at the end of ``code``, so it includes the interpreter,
    NumPy, numba and everything ``code`` allocated.
    """
    # VmHWM, not getrusage's ru_maxrss: on Linux a child's ru_maxrss starts from the peak of the
    # parent it was forked from, VmHWM belongs to the new address space made by exec
    wrapper = (code + "\nfor _line in open('/proc/self/status'):\n"
               "    if _line.startswith('VmHWM:'):\n"
               "        print('__PEAK_RSS_KB__', int(_line.split()[1]))\n")
    res = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"subprocess failed ({res.returncode}):\n{res.stderr[-2000:]}")
    lines = res.stdout.splitlines()
    kb = int([ln for ln in lines if ln.startswith("__PEAK_RSS_KB__")][-1].split()[1])
    return {"peak_rss_mb": kb / 1024, "stdout": "\n".join(ln for ln in lines if not ln.startswith("__PEAK"))}
