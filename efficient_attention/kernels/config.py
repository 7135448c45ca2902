"""The one place numba options are set for every kernel."""

#: fastmath flags safe with -inf masking (no 'nnan', no 'ninf')
FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})

#: keyword arguments of every serial kernel
JIT = dict(cache=True, nogil=True, fastmath=set(FASTMATH))

#: keyword arguments of every parallel kernel (a distinct Python function per configuration:
#: cache=True variants of one function share a cache entry)
JIT_PARALLEL = dict(cache=True, nogil=True, parallel=True, fastmath=set(FASTMATH))
