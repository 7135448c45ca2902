"""Test configuration: hypothesis profiles.

``CI`` set (as in .ci/run): hypothesis loads its own ``ci`` profile
(derandomized, no deadline, no database). Locally: ``dev``, with no deadline
because the first example of a numba path pays the JIT compile.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile("dev", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ea-ci", deadline=None, derandomize=True, database=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile("ea-ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
