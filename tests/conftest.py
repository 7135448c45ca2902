"""Test configuration: hypothesis profiles.

The default profile ``ea`` is derandomized (each test draws the same examples
on every run and machine), with no deadline (the first example of a numba path
pays the JIT compile) and no example database, so the README's test command
gives the same result every time, with or without ``CI`` set.

``HYPOTHESIS_PROFILE=fuzz`` opts in to exploratory runs: randomized, more
examples, and hypothesis prints the seed of a failing run
(``@reproduce_failure`` blob) so it can be replayed and turned into a test.
"""
import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ea", derandomize=True, database=None, max_examples=40, print_blob=True, **_COMMON)
settings.register_profile("fuzz", derandomize=False, max_examples=400, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ea"))
