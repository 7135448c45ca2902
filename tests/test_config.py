"""The settings module: every knob in one place, checked, overridable and resettable; and nothing
happens at import but definitions and registration."""
import subprocess
import sys

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
