"""Numba kernels, one module per family, each beside a plain NumPy reference
of the same computation (the tests assert the two agree).

All kernels are ``@njit`` with the options of :mod:`efficient_attention.config`
(cached on disk where numba finds a writable place: see that module), take
contiguous float32/float64 arrays and int64 index arrays, and never validate: the public wrappers do
that before calling them (numba does not bounds-check). fastmath flags come
from :mod:`efficient_attention.config` and never include
``nnan``/``ninf`` (masking needs infinities).
"""
