"""Where numba keeps the compiled kernels: a read-only install with no writable home imports
and runs (kernels compiled without a disk cache, one warning); a writable location keeps
the cache on; every kernel takes its ``cache`` option from ``efficient_attention/config.py``."""
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from efficient_attention import config

PKG = Path(__file__).resolve().parents[1] / "efficient_attention"

#: run in a fresh interpreter on a copy of the package; argv: the copy's parent, the mode
CHILD = r'''
import os, sys, warnings
parent, mode = sys.argv[1], sys.argv[2]
pkg = os.path.join(parent, "efficient_attention")
if mode == "read-only":
    # the sandbox is what the test says: neither the package nor the home directory writable
    for where in (os.path.join(pkg, "kernels"), os.environ["HOME"]):
        try:
            open(os.path.join(where, "probe"), "w").close()
        except PermissionError:
            pass
        else:
            raise SystemExit(f"SETUP: {where} is writable by this process: nothing would be tested")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import efficient_attention as ea
    from efficient_attention import config
    from efficient_attention.kernels import band
assert os.path.dirname(ea.__file__) == pkg, (ea.__file__, pkg)
ours = [str(w.message) for w in caught if issubclass(w.category, config.KernelCacheWarning)]
print("WARNINGS", len(ours))
for message in ours:
    print("MESSAGE", message)
print("CACHE", config.CACHE)

import numpy as np
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((2, 48, 8)).astype(np.float32) for _ in range(3))
core = ea.LocalAttention(window=5)
out, cache = core.forward(q, k, v)
grads = core.backward(cache, np.ones_like(out))
ref = ea.DenseAttention()(*(a.astype(np.float64) for a in (q, k, v)), mask=core.dense_mask(48, 48))
err = float(np.abs(out - ref).max())
assert err < 1e-5, err
assert len(band.softmax_rows.signatures) >= 1      # a numba kernel really compiled and ran
assert np.all(np.isfinite(grads.dq))
print("FORWARD OK", err)
'''


def _sandbox(tmp_path):
    """A copy of the package (no caches) in ``tmp_path/site``; returns the ``site`` directory."""
    site = tmp_path / "site"
    shutil.copytree(PKG, site / "efficient_attention",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
    return site


def _env(home, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "NUMBA_DISABLE_JIT", "PYTHONPATH")}
    env.update(HOME=str(home), PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def _run_child(site, mode, env, prefix=()):
    res = subprocess.run([*prefix, sys.executable, "-c", CHILD, str(site), mode], cwd=site, env=env,
                         capture_output=True, text=True, timeout=600)
    assert "SETUP:" not in res.stdout + res.stderr, res.stdout + res.stderr
    assert res.returncode == 0, f"child failed ({res.returncode}):\n{res.stdout}\n{res.stderr[-3000:]}"
    return res.stdout


def _chmod_tree(path, writable):
    for root, dirs, files in os.walk(path):
        for name in dirs + files + [""]:
            p = os.path.join(root, name) if name else root
            mode = os.stat(p).st_mode
            os.chmod(p, (mode | 0o200) if writable else (mode & ~0o222))


def _unprivileged():
    """The command prefix that makes the child obey file permissions. A non-root user
    already does; root ignores them through the capabilities CAP_DAC_OVERRIDE (and
    CAP_DAC_READ_SEARCH, CAP_FOWNER), which ``setpriv`` drops from the child's bounding set:
    the child stays root (it can still run the interpreter installed under /root) but is
    refused writes to files whose write bits are cleared, as any user is."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:       # test_no_cache_location_even_for_root covers the fallback as root
        pytest.skip("running as root without setpriv: cannot run a child that obeys file permissions")
    caps = "-dac_override,-dac_read_search,-fowner"
    return (setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}")


def test_read_only_install_without_writable_home_imports_and_runs(tmp_path):
    """The user's report: package directory read-only (chmod -R a-w), HOME not writable,
    NUMBA_CACHE_DIR unset. Before the fallback, the import failed with numba's
    'cannot cache function ...: no locator available'."""
    site = _sandbox(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    _chmod_tree(site, writable=False)
    _chmod_tree(home, writable=False)
    try:
        out = _run_child(site, "read-only", _env(home), prefix=_unprivileged())
    finally:
        _chmod_tree(site, writable=True)
        _chmod_tree(home, writable=True)
    assert "WARNINGS 1\n" in out                       # exactly one warning, ...
    assert "NUMBA_CACHE_DIR" in out                    # ... saying what to do
    assert "CACHE False" in out and "FORWARD OK" in out


def test_no_cache_location_even_for_root(tmp_path):
    """The same fallback where no process can create numba's cache directories, root
    included: the package's ``kernels/__pycache__`` and the home directory are regular
    files, so numba's own search (makedirs) fails for every candidate."""
    site = _sandbox(tmp_path)
    (site / "efficient_attention" / "kernels" / "__pycache__").write_text("not a directory")
    home = tmp_path / "home-is-a-file"
    home.write_text("not a directory")
    out = _run_child(site, "blocked", _env(home))
    assert "WARNINGS 1\n" in out and "no locator available" in out
    assert "CACHE False" in out and "FORWARD OK" in out


def test_writable_cache_dir_keeps_the_cache(tmp_path):
    """With a writable NUMBA_CACHE_DIR (numba's first choice) the kernels are cached on
    disk and nothing is said: the fallback is not taken where it is not needed."""
    site = _sandbox(tmp_path)
    cache_dir = tmp_path / "numba-cache"
    out = _run_child(site, "writable", _env(tmp_path, NUMBA_CACHE_DIR=str(cache_dir)))
    assert "WARNINGS 0\n" in out and "CACHE True" in out and "FORWARD OK" in out
    written = [p.name for p in cache_dir.rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert any(name.startswith("band.softmax_rows") for name in written), written


def test_choose_cache_warns_once_and_only_when_numba_cannot_cache():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert config.choose_cache((True, "")) is True
        assert caught == []
        assert config.choose_cache((False, "cannot cache function 'f': no locator available")) is False
    assert len(caught) == 1 and caught[0].category is config.KernelCacheWarning
    assert issubclass(config.KernelCacheWarning, UserWarning)        # not an error under -W error::RuntimeWarning
    message = str(caught[0].message)
    assert "no locator available" in message and "NUMBA_CACHE_DIR" in message


def test_numba_can_cache_follows_numba(monkeypatch, tmp_path):
    """numba_can_cache asks numba: a writable NUMBA_CACHE_DIR is found; with every
    locator refusing, numba's own error comes back as the reason."""
    import numba
    import numba.core.caching as caching
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "c"))
    assert config.numba_can_cache() == (True, "")
    assert (tmp_path / "c").is_dir()                     # numba's own write test ran there

    class Refuses:
        @classmethod
        def from_function(cls, py_func, py_file):
            return None
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")
    monkeypatch.setattr(impl, "_locator_classes", [Refuses])
    monkeypatch.setattr(numba.config, "CACHE_LOCATOR_CLASSES", "", raising=False)
    ok, reason = config.numba_can_cache()
    assert not ok and "no locator available" in reason


def test_every_kernel_takes_cache_from_config():
    """No kernel module hard-codes ``cache=True``: config decides for all of them."""
    offenders = []
    for path in sorted((PKG / "kernels").glob("*.py")):
        if path.name == "config.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"""cache\s*=\s*True|["']cache["']\s*:\s*True""", code):
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert offenders == []
    assert config.JIT["cache"] is config.CACHE and config.JIT_PARALLEL["cache"] is config.CACHE
    assert config.JIT_CONTRACT["cache"] is config.CACHE and config.JIT_PLAIN["cache"] is config.CACHE
