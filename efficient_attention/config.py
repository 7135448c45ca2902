"""Every setting of the library, in one place.

Settings are plain module attributes, read when a call needs them, so a change
takes effect at the next call::

    import efficient_attention as ea
    ea.config.THREADS = 1                 # the banded cores' worker threads
    with ea.config.override(LOCAL_QUERY_BLOCK=32, LOCAL_ROW_KERNELS=False):
        ...                               # restored on exit
    ea.config.reset()                     # every setting back to its default

``settings()`` lists them with their current values, ``DEFAULTS`` their defaults.
Nothing here is changed by the library itself.

=================================== ==============================================================
setting                             what it controls
=================================== ==============================================================
THREADS                             worker threads of the banded cores (local, strided); None:
                                    ``os.cpu_count()``
LIMIT_BLAS_THREADS                  while several threads of the library call BLAS (the banded
                                    cores' workers, the LSH kernels' prange), BLAS is held to one
                                    thread (``threadpoolctl``) and restored afterwards; False
                                    leaves BLAS alone (then set BLAS's threads yourself)
LOCAL_QUERY_BLOCK                   queries per block of the banded cores
LOCAL_KEY_BLOCK                     longest key range soft-maxed in one piece (longer: online
                                    softmax)
LOCAL_SCRATCH                       scalars of score scratch per step of the banded cores
LOCAL_MIN_SEGMENT                   shortest query segment of a banded work item
LOCAL_ROW_KERNELS                   float32 banded blocks: elementwise row work in numba (False:
                                    the NumPy lines beside the kernels)
FEATURE_ROW_BLOCK                   rows per block of the Performer feature map
FEATURE_ROW_KERNELS                 float32 feature maps through the numba row kernels (False: the
                                    NumPy lines)
LINEAR_NUMPY_BLOCK                  tokens per block of the NumPy causal linear attention
LINEAR_CHECKPOINT                   tokens between the causal scan's saved states (the backward
                                    recomputes each chunk from its state)
LINEAR_PARALLEL_MIN_WORK            smallest ``B·N·F·Dv`` for which the causal scan runs heads in
                                    parallel
LOWRANK_BLOCK_ELEMENTS              scores per query block of Linformer / compressed attention
LOWRANK_PROJ_BLOCK                  key positions per block of the projections ``E K``, ``F V``
SINKHORN_KERNEL_MIN_BLOCKS          fewest sort blocks for which the Sinkhorn kernel is used
SINKHORN_CHUNK                      scalars per chunk of the Sinkhorn NumPy path
LSH_HASH_BLOCK                      scalars per block of the LSH hashing products
PATTERN_CHUNK                       entries per chunk when a pattern builder writes its indices
ENGINE_TILES                        the tiles ``(b_q, b_k, cost)`` a block mask chooses from
                                    (``cost``: measured time per computed pair, relative)
ENGINE_BUILD_SCALARS                booleans (or pattern entries) handled at once while a block
                                    mask is built
ENGINE_PAIR_COST                    time per allowed pair on the row-CSR path relative to a
                                    computed pair of a tile (thin partial tiles go pair by pair)
ENGINE_FUSED_MIN_SLICES_PER_THREAD  (batch, head) slices per thread from which the engine's
                                    backward runs one fused pass per slice
ENGINE_MIN_TILED                    fraction of a pattern's pairs that must lie in tiles for
                                    ``SparseAttention`` to run on the block-sparse engine
=================================== ==============================================================

**Compile-time constants.** The numba kernels also have a few sizes that are
compiled into their machine code, and so are not settings: the row block of
the CSR kernels (``kernels/sparse.py``, ``ROWS``), the row chunk of the elu
kernels (``kernels/elu.py``, ``CHUNK``) and the prefetch distance of the causal
scan (``kernels/linear.py``, ``REVERSE_PREFETCH``). Changing them means editing
the source (numba recompiles it).

**numba options.** Every kernel takes its ``numba.njit`` keyword arguments from one of
:data:`JIT`, :data:`JIT_PARALLEL`, :data:`JIT_CONTRACT`, :data:`JIT_PLAIN`
below (one Python function per jit configuration: ``cache=True`` variants of
one function share a cache entry). fastmath flags never include ``nnan`` or
``ninf`` (masking needs infinities). These are read when the kernels are
compiled, at import.

**Where compiled kernels are kept.** numba compiles a kernel on its first call for each
argument type (about 0.3 s, 0.6 s with ``parallel=True``; the clustered chapters'
kernels take several seconds together) and, with ``cache=True``, writes the machine
code to disk so that the next process loads it in a fraction of that. numba looks for
a writable place in this order: ``NUMBA_CACHE_DIR`` when it is set, the ``__pycache__``
directory beside the kernels' source files, then the user's cache directory
(``$XDG_CACHE_HOME/numba`` or ``~/.cache/numba``). When none of them is writable (a
read-only install run by a user without a writable home: a container, a cluster
node), numba refuses to create a ``cache=True`` function at all, and importing the
package would fail with ``RuntimeError: cannot cache function ...: no locator
available``.

So this module asks numba once, at import, whether it can cache a function of this
directory (:func:`numba_can_cache`, numba's own search), and :data:`CACHE` is the
answer. When it is False, every kernel is compiled without a disk cache and one
:class:`KernelCacheWarning` says so: the package works, and each new process compiles
the kernels it uses again. To keep compiled kernels in such an install, set
``NUMBA_CACHE_DIR`` to a writable directory before the first import (it applies to
every numba user of the process; that is numba's own setting, and the package never
sets it for you).

The fallback is *no cache*, not a temporary directory: numba's cache directory is one
setting for the whole process (``numba.config.CACHE_DIR``), so a library that changed
it would move every other numba user's cache behind their back; a fresh random
directory per process would save nothing (no later process finds it); and a fixed
path in a shared ``/tmp`` would let another user of the machine plant files that
numba loads as code.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

__all__ = ["settings", "override", "reset", "DEFAULTS", "blas_threads_limited", "worker_threads",
           "FASTMATH", "CACHE", "JIT", "JIT_PARALLEL", "JIT_CONTRACT", "JIT_PLAIN",
           "KernelCacheWarning", "numba_can_cache", "choose_cache"]

# ---------------------------------------------------------------------------------------------
# settings (read at each call)
# ---------------------------------------------------------------------------------------------

#: the default of every setting (see the table above)
DEFAULTS = {
    "THREADS": None,
    "LIMIT_BLAS_THREADS": True,
    "LOCAL_QUERY_BLOCK": 64,
    "LOCAL_KEY_BLOCK": 2048,
    "LOCAL_SCRATCH": 1 << 21,
    "LOCAL_MIN_SEGMENT": 1024,
    "LOCAL_ROW_KERNELS": True,
    "FEATURE_ROW_BLOCK": 2048,
    "FEATURE_ROW_KERNELS": True,
    "LINEAR_NUMPY_BLOCK": 256,
    # the causal scan's forward saves the state (S, z) before each chunk of this many tokens
    # (F·Dv + F numbers per 512 tokens: an eighth of a row of 64 per token for F = Dv = 64), and
    # the backward runs both of its scans chunk by chunk, on rows in cache. A/B against two
    # whole-sequence scans in one process (elu + 1 features, float32, 8 heads, the kernels'
    # forward + backward, medians of 7-9 interleaved rounds), three runs: 0.75, 0.97 and 0.91x
    # the time at N = 65536, 1.00-1.03x at 4096 and 16384; chunks of 256 were within 2 % of 512,
    # chunks of 128, 1024 and 2048 slower
    "LINEAR_CHECKPOINT": 512,
    # below this many state updates (B·N·F·Dv) the scans run on one thread: waking the thread
    # pool costs up to ~10 ms on a busy machine, more than the whole small scan
    "LINEAR_PARALLEL_MIN_WORK": 1 << 24,
    # scores held per block of query rows (batch × rows × K elements); 2**19 float32 = 2 MB, so
    # that the softmax's elementwise passes stay in cache (Linformer K = 256, 8 heads, N = 65536:
    # forward+backward 3.9 s with 2**19 against 5.4 s with 2**22 and 5.9 s with 2**17)
    "LOWRANK_BLOCK_ELEMENTS": 2 ** 19,
    "LOWRANK_PROJ_BLOCK": 4096,
    # below this many sort blocks NumPy is as fast and the parallel kernel's thread start-up
    # dominates on a busy machine
    "SINKHORN_KERNEL_MIN_BLOCKS": 256,
    "SINKHORN_CHUNK": 1 << 22,
    "LSH_HASH_BLOCK": 1 << 21,
    "PATTERN_CHUNK": 1 << 24,
    # the block-sparse engine (blocksparse.py has the measurements behind these)
    "ENGINE_TILES": ((128, 128, 1.0), (128, 64, 1.0), (64, 64, 1.15)),
    "ENGINE_BUILD_SCALARS": 1 << 23,
    "ENGINE_PAIR_COST": 6.0,
    "ENGINE_FUSED_MIN_SLICES_PER_THREAD": 4,
    # SparseAttention runs on the engine when at least this fraction of its pattern's pairs fall
    # in tiles the engine computes as tiles. Measured: a window or BigBird's blocks run 3-4x
    # faster on the engine (forward+backward, N = 4096, 8 heads); a random pattern (a few keys
    # per tile) is all thin pairs, and the engine would add nothing
    "ENGINE_MIN_TILED": 0.5,
}

THREADS = DEFAULTS["THREADS"]
LIMIT_BLAS_THREADS = DEFAULTS["LIMIT_BLAS_THREADS"]
LOCAL_QUERY_BLOCK = DEFAULTS["LOCAL_QUERY_BLOCK"]
LOCAL_KEY_BLOCK = DEFAULTS["LOCAL_KEY_BLOCK"]
LOCAL_SCRATCH = DEFAULTS["LOCAL_SCRATCH"]
LOCAL_MIN_SEGMENT = DEFAULTS["LOCAL_MIN_SEGMENT"]
LOCAL_ROW_KERNELS = DEFAULTS["LOCAL_ROW_KERNELS"]
FEATURE_ROW_BLOCK = DEFAULTS["FEATURE_ROW_BLOCK"]
FEATURE_ROW_KERNELS = DEFAULTS["FEATURE_ROW_KERNELS"]
LINEAR_NUMPY_BLOCK = DEFAULTS["LINEAR_NUMPY_BLOCK"]
LINEAR_CHECKPOINT = DEFAULTS["LINEAR_CHECKPOINT"]
LINEAR_PARALLEL_MIN_WORK = DEFAULTS["LINEAR_PARALLEL_MIN_WORK"]
LOWRANK_BLOCK_ELEMENTS = DEFAULTS["LOWRANK_BLOCK_ELEMENTS"]
LOWRANK_PROJ_BLOCK = DEFAULTS["LOWRANK_PROJ_BLOCK"]
SINKHORN_KERNEL_MIN_BLOCKS = DEFAULTS["SINKHORN_KERNEL_MIN_BLOCKS"]
SINKHORN_CHUNK = DEFAULTS["SINKHORN_CHUNK"]
LSH_HASH_BLOCK = DEFAULTS["LSH_HASH_BLOCK"]
PATTERN_CHUNK = DEFAULTS["PATTERN_CHUNK"]
ENGINE_TILES = DEFAULTS["ENGINE_TILES"]
ENGINE_BUILD_SCALARS = DEFAULTS["ENGINE_BUILD_SCALARS"]
ENGINE_PAIR_COST = DEFAULTS["ENGINE_PAIR_COST"]
ENGINE_FUSED_MIN_SLICES_PER_THREAD = DEFAULTS["ENGINE_FUSED_MIN_SLICES_PER_THREAD"]
ENGINE_MIN_TILED = DEFAULTS["ENGINE_MIN_TILED"]


def settings() -> dict:
    """Every setting's current value, by name."""
    here = globals()
    return {name: here[name] for name in DEFAULTS}


def _set(name: str, value) -> None:
    if name not in DEFAULTS:
        raise ValueError(f"setting must be one of {sorted(DEFAULTS)}, got {name!r}")
    default = DEFAULTS[name]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    elif name == "THREADS":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"THREADS must be None or an integer >= 1, got {value!r}")
    elif name == "ENGINE_TILES":
        ok = isinstance(value, tuple) and len(value) > 0 and all(
            isinstance(t, tuple) and len(t) == 3 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                        for x in t[:2]) and float(t[2]) > 0 for t in value)
        if not ok:
            raise ValueError(f"ENGINE_TILES must be a non-empty tuple of (b_q, b_k, cost) with b_q, b_k "
                             f"integers >= 1 and cost > 0, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0 (inf allowed), got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    globals()[name] = value


@contextlib.contextmanager
def override(**values):
    """Set some settings for the duration of a ``with`` block (checked; restored on exit)."""
    before = settings()
    try:
        for name, value in values.items():
            _set(name, value)
        yield
    finally:
        globals().update(before)


def reset() -> None:
    """Every setting back to its default."""
    globals().update(DEFAULTS)


def worker_threads(threads=None) -> int:
    """The number of worker threads a call uses: ``threads``, else :data:`THREADS`, else
    ``os.cpu_count()``."""
    threads = THREADS if threads is None else threads
    return max(1, (os.cpu_count() or 1) if threads is None else int(threads))


_BLAS_CONTROLLER = []
_BLAS_LOCK = threading.Lock()
_BLAS_HOLD = {"holders": 0, "limiter": None}


class _BlasHold:
    """One holder of the one-thread BLAS limit, shared by every thread that holds it: the
    first to enter sets the limit, the last to leave restores what was there before. (One
    limit per holder, each restoring what it saw on entry, lets two threads that overlap
    leave BLAS at one thread for good: B saves A's limit, A restores the original, B then
    restores A's limit.)"""

    def __enter__(self):
        with _BLAS_LOCK:
            if _BLAS_HOLD["holders"] == 0:
                if not _BLAS_CONTROLLER:
                    import scipy.linalg.cython_blas  # noqa: F401  numba's np.dot calls scipy's own OpenBLAS:
                    from threadpoolctl import ThreadpoolController  # load it before the controller looks
                    _BLAS_CONTROLLER.append(ThreadpoolController())
                _BLAS_HOLD["limiter"] = _BLAS_CONTROLLER[0].limit(limits=1, user_api="blas")
            _BLAS_HOLD["holders"] += 1
        return self

    def __exit__(self, *exc):
        with _BLAS_LOCK:
            _BLAS_HOLD["holders"] -= 1
            if _BLAS_HOLD["holders"] == 0:
                _BLAS_HOLD["limiter"].restore_original_limits()
                _BLAS_HOLD["limiter"] = None
        return False


def blas_threads_limited():
    """A context manager holding BLAS to one thread while the library's own threads call it
    (nested BLAS threads would oversubscribe the cores), restoring BLAS's threads on exit.
    Calls that overlap, from several threads of the caller (a threaded Dask scheduler, say),
    share one hold: BLAS's threads come back when the last of them leaves. With
    :data:`LIMIT_BLAS_THREADS` False it does nothing (and gives None). ``threadpoolctl`` is
    loaded on first use, not at import."""
    if not LIMIT_BLAS_THREADS:
        return contextlib.nullcontext()
    return _BlasHold()


# ---------------------------------------------------------------------------------------------
# numba options (read when the kernels are compiled)
# ---------------------------------------------------------------------------------------------

#: fastmath flags safe with -inf masking (no 'nnan', no 'ninf')
FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})


class KernelCacheWarning(UserWarning):
    """numba found no writable place to cache compiled kernels: they are compiled
    without a disk cache (set ``NUMBA_CACHE_DIR`` to a writable directory to keep them)."""


def _kernel_probe():
    """An empty function that numba sees as defined in ``kernels/__init__.py``: numba locates
    its cache exactly as it locates every kernel's (they all live in ``kernels/``)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "__init__.py")
    namespace: dict = {}
    exec(compile("def probe():\n    pass\n", path, "exec"), namespace)  # noqa: S102 - a fixed source
    return namespace["probe"]


def numba_can_cache() -> tuple[bool, str]:
    """``(True, '')`` when numba finds a writable cache location for a function of the
    ``kernels/`` directory (every kernel lives there), else ``(False, numba's reason)``.

    It runs numba's own search (:class:`numba.core.caching.FunctionCache`, what
    ``njit(cache=True)`` does for each function), so it follows ``NUMBA_CACHE_DIR``,
    the in-tree ``__pycache__`` and the user-wide directory exactly as numba does,
    including numba's own write test (it creates the directory if missing and a
    temporary file in it). Under ``NUMBA_DISABLE_JIT=1`` nothing is compiled and the
    answer is ``(True, '')``.
    """
    import numba
    if numba.config.DISABLE_JIT:
        return True, ""
    from numba.core.caching import FunctionCache
    try:
        FunctionCache(_kernel_probe())
    except RuntimeError as exc:       # "cannot cache function ...: no locator available ..."
        return False, str(exc)
    return True, ""


def choose_cache(can_cache: tuple[bool, str]) -> bool:
    """The ``cache`` option of every kernel, given :func:`numba_can_cache`'s answer:
    True when numba can cache; else False, with one :class:`KernelCacheWarning`."""
    ok, reason = can_cache
    if not ok:
        warnings.warn(
            "efficient_attention: numba has no writable place to cache compiled kernels "
            f"({reason}); the kernels are compiled without a disk cache, so every new process "
            "compiles them again (seconds). Set NUMBA_CACHE_DIR to a writable directory to keep "
            "them.", KernelCacheWarning, stacklevel=2)
    return ok


#: whether kernels are cached on disk (False only when numba finds no writable location)
CACHE = choose_cache(numba_can_cache())

#: keyword arguments of every serial kernel
JIT = dict(cache=CACHE, nogil=True, fastmath=set(FASTMATH))

#: keyword arguments of every parallel kernel (a distinct Python function per configuration:
#: cache=True variants of one function share a cache entry)
JIT_PARALLEL = dict(cache=CACHE, nogil=True, parallel=True, fastmath=set(FASTMATH))

#: the vectorisable exp (:mod:`~efficient_attention.kernels.fastexp`): contraction only,
#: reassociation would undo its rounding trick
JIT_CONTRACT = dict(cache=CACHE, nogil=True, fastmath={"contract"})

#: small integer helpers with no floating point to speed up (no fastmath)
JIT_PLAIN = dict(cache=CACHE, nogil=True)
