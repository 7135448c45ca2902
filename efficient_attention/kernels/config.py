"""The one place numba options are set for every kernel.

Every kernel takes its ``@njit`` keyword arguments from one of the dictionaries below
(one Python function per jit configuration: ``cache=True`` variants of one function
share a cache entry).

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

import warnings

__all__ = ["FASTMATH", "CACHE", "JIT", "JIT_PARALLEL", "JIT_CONTRACT", "JIT_PLAIN",
           "KernelCacheWarning", "numba_can_cache", "choose_cache"]

#: fastmath flags safe with -inf masking (no 'nnan', no 'ninf')
FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})


class KernelCacheWarning(UserWarning):
    """numba found no writable place to cache compiled kernels: they are compiled
    without a disk cache (set ``NUMBA_CACHE_DIR`` to a writable directory to keep them)."""


def _probe():
    """A function of this directory: numba locates its cache as it locates every kernel's."""


def numba_can_cache() -> tuple[bool, str]:
    """``(True, '')`` when numba finds a writable cache location for a function of this
    directory (every kernel lives here), else ``(False, numba's reason)``.

    It runs numba's own search (:class:`numba.core.caching.FunctionCache`, what
    ``@njit(cache=True)`` does for each function), so it follows ``NUMBA_CACHE_DIR``,
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
        FunctionCache(_probe)
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
