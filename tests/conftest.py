"""Test configuration: hypothesis profiles, and the machine named at the end of the output.

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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def pytest_terminal_summary(terminalreporter):
    """The machine the run happened on, at the end of the output (``-q`` included): a failure
    that depends on the CPU or on the BLAS kernel it picks can then be read off a CI log."""
    import llvmlite.binding as llvm

    from efficient_attention.bench import machine_header
    from efficient_attention.kernels.tilemm import VECTOR_BYTES

    terminalreporter.section("machine")
    terminalreporter.write_line(f"- CPU: {_cpu_model()} (LLVM: {llvm.get_host_cpu_name()}); tile products "
                                f"compiled for {VECTOR_BYTES}-byte vectors")
    for line in machine_header().splitlines():
        terminalreporter.write_line(line)
