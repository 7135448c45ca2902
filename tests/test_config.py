"""The settings module: every knob in one place, checked, overridable and resettable; and nothing
happens at import but definitions and registration."""
import subprocess
import sys
import threading

import numpy as np
import pytest

import efficient_attention as ea
from efficient_attention import config


def test_settings_lists_every_default():
    assert config.settings() == config.DEFAULTS
    assert set(config.DEFAULTS) >= {"THREADS", "LIMIT_BLAS_THREADS", "LOCAL_QUERY_BLOCK", "LOCAL_ROW_KERNELS",
                                    "FEATURE_ROW_KERNELS", "LINEAR_CHECKPOINT"}
    for name in config.DEFAULTS:                       # each is documented in the module's table
        assert name in config.__doc__, name


def test_override_checks_and_restores():
    with config.override(LOCAL_QUERY_BLOCK=8, LOCAL_ROW_KERNELS=False, THREADS=1):
        assert (config.LOCAL_QUERY_BLOCK, config.LOCAL_ROW_KERNELS, config.THREADS) == (8, False, 1)
    assert config.settings() == config.DEFAULTS
    with pytest.raises(ValueError, match="setting must be one of"):
        with config.override(NO_SUCH=1):
            pass
    with pytest.raises(ValueError, match="LOCAL_QUERY_BLOCK must be an integer >= 1"):
        with config.override(LOCAL_QUERY_BLOCK=0):
            pass
    with pytest.raises(TypeError, match="LOCAL_ROW_KERNELS must be True or False"):
        with config.override(LOCAL_ROW_KERNELS=1):
            pass
    assert config.settings() == config.DEFAULTS       # a refused override leaves nothing behind


def test_reset():
    config.LINEAR_NUMPY_BLOCK = 7
    config.reset()
    assert config.settings() == config.DEFAULTS


def test_a_setting_takes_effect_at_the_next_call():
    """The banded cores read their blocks and row-kernel switch at each call: the same result
    (to rounding) whatever the settings, through different code paths."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 300, 8)).astype(np.float32) for _ in range(3))
    core = ea.LocalAttention(20)
    ref = core(q, k, v)
    with config.override(LOCAL_QUERY_BLOCK=7, LOCAL_KEY_BLOCK=5, LOCAL_ROW_KERNELS=False, THREADS=1):
        other = core(q, k, v)
    assert not np.array_equal(other, ref)             # another path really ran
    np.testing.assert_allclose(other, ref, rtol=1e-5, atol=1e-6)


def test_blas_limit_can_be_turned_off():
    with config.override(LIMIT_BLAS_THREADS=False):
        with config.blas_threads_limited() as limit:
            assert limit is None                      # nothing done to BLAS


def _blas_threads():
    from threadpoolctl import threadpool_info
    return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_overlapping_blas_limits_restore_blas_threads_when_the_last_one_leaves():
    """Two holds that overlap (as from two threads of a threaded Dask scheduler) and leave in
    the order they came: BLAS stays at one thread until the second leaves, then has its own
    threads back, not one thread for the rest of the process."""
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        assert before and set(before.values()) == {2}
        first, second = config.blas_threads_limited(), config.blas_threads_limited()
        first.__enter__()
        assert set(_blas_threads().values()) == {1}
        second.__enter__()
        first.__exit__(None, None, None)
        assert set(_blas_threads().values()) == {1}      # the second still holds
        second.__exit__(None, None, None)
        assert _blas_threads() == before


def test_banded_calls_from_many_threads_give_blas_its_threads_back():
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 256, 16)).astype(np.float32)
    core = ea.LocalAttention(16)
    ref = core(q, q, q)
    outs = []

    def work():
        for _ in range(10):
            outs.append(core(q, q, q))

    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _blas_threads() == before
    assert len(outs) == 40 and all(np.array_equal(o, ref) for o in outs)


def test_import_starts_no_threads_and_loads_no_thread_controller():
    code = ("import sys, threading\n"
            "import efficient_attention as ea\n"
            "from efficient_attention import local\n"
            "assert threading.active_count() == 1, threading.enumerate()\n"
            "assert 'threadpoolctl' not in sys.modules\n"
            "assert not local._POOLS and not local._FORK_HOOK\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr
