"""The benchmark scripts' harness, ``benchmarks/harness.py``: interleaved rounds, the glibc
allocator settings and the peak RSS of a fresh interpreter, none of which is in the library."""
import os
import pathlib
import statistics
import subprocess
import sys
import time

import pytest

from efficient_attention import bench

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))       # as when a script runs: `import harness`
try:
    import harness
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def _run(args, timeout=600):
    """``python args`` from the repository root with the C library's own default allocator."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("LD_PRELOAD", "GLIBC_TUNABLES"))}
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def test_the_library_keeps_none_of_it():
    """The process-wide helpers live in the harness only: the library's bench module (used
    by ``python -m efficient_attention``) has none of them."""
    for name in harness.__all__:
        assert callable(getattr(harness, name))
        assert not hasattr(bench, name), name


def test_interleaved_times_visits_keys_in_rounds():
    order = []
    slow = {("a", 0): 0.05, ("a", 2): 0.1}            # the warm-up call, and one of 3 timed calls

    def fn(key):
        seconds = slow.get((key, order.count(key)), 0.001 if key == "a" else 0.004)
        order.append(key)
        time.sleep(seconds)
    t = harness.interleaved_times({"a": lambda: fn("a"), "b": lambda: fn("b")}, repeat=3, warmup=1)
    assert order == ["a", "b"] * 4                    # 1 warm-up round + 3 timed rounds, in turn
    assert set(t) == {"a", "b"} and t["b"] >= 0.004
    # the warm-up is not timed, and the slow timed call is outvoted: a median, not a mean
    assert 0.001 <= t["a"] < 0.02


def test_interleaved_rounds_and_median_ratio_pair_the_rounds(monkeypatch):
    """interleaved_rounds keeps one time per timed round and key; median_ratio divides the
    times of one round by each other, so drift between rounds cancels where a ratio of
    medians would not. A scripted clock: each call advances it by its scripted duration."""
    clock = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])
    slowness = iter([1, 1, 1, 1, 1, 4, 4, 4])   # the machine slows down, once between the two calls of a round
    calls = []

    def fn(key):
        calls.append(key)
        clock[0] += next(slowness) * (2 if key == "big" else 1)
    t = harness.interleaved_rounds({"small": lambda: fn("small"), "big": lambda: fn("big")}, repeat=3, warmup=1)
    assert calls == ["small", "big"] * 4
    # timed rounds (small, big) at slowness (1, 1), (1, 4), (4, 4): the warm-up round is dropped
    assert t == {"small": [1.0, 1.0, 4.0], "big": [2.0, 8.0, 8.0]}
    # within-round ratios 2, 8, 2; the medians alone are 1 and 8
    assert harness.median_ratio(t["big"], t["small"]) == 2.0
    assert statistics.median(t["big"]) / statistics.median(t["small"]) == 8.0
    assert harness.median_ratio([2.0, 4.0, 30.0, 9.0], [1.0, 2.0, 3.0, 3.0]) == 2.5   # even count: mean of the middle two
    with pytest.raises(ValueError, match="equally long"):
        harness.median_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        harness.median_ratio([], [])
    slowness = iter([3, 3])
    assert harness.interleaved_times({"s": lambda: fn("small"), "b": lambda: fn("big")}, repeat=1, warmup=0) \
        == {"s": 3.0, "b": 6.0}


def test_interleaved_fwd_bwd_order_and_pairs():
    """Every size's forward, then every size's forward+backward, each on its own core and
    inputs; the result pairs (t_fwd, t_fwd_bwd) per size."""
    calls = []

    class Core:
        def __init__(self, n):
            self.n = n

        def forward(self, q, k, v):
            calls.append(("f", self.n, q))
            time.sleep(0.001)
            return None, self.n

        def backward(self, cache, dout):
            calls.append(("b", cache, dout))
            time.sleep(0.01)

    inputs = {n: (f"q{n}", None, None, f"d{n}") for n in (2, 8)}
    t = harness.interleaved_fwd_bwd({n: Core(n) for n in inputs}, inputs, repeat=2, warmup=1)
    one_round = [("f", 2, "q2"), ("f", 8, "q8"), ("f", 2, "q2"), ("b", 2, "d2"), ("f", 8, "q8"), ("b", 8, "d8")]
    assert calls == one_round * 3
    assert set(t) == {2, 8} and all(fb > f + 0.005 for f, fb in t.values())


def test_peak_rss_of_a_fresh_interpreter():
    res = harness.peak_rss("import numpy as np\nx = np.ones(64 * 2**20 // 8)\nprint('done', x.sum())")
    assert res["peak_rss_mb"] > 64 and "done" in res["stdout"] and "__PEAK" not in res["stdout"]
    with pytest.raises(RuntimeError, match="subprocess failed"):
        harness.peak_rss("raise SystemExit(3)")


_IMPORT_HARNESS = "import sys\nsys.path.insert(0, 'benchmarks')\nimport harness\n"

_FAULTS = _IMPORT_HARNESS + """
import resource
import numpy as np
ok = harness.retain_freed_memory() if sys.argv[1] == "retain" else None
a = np.ones(2 ** 24); del a                      # 128 MB, allocated, touched and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(2 ** 24); del a                      # the same again: fresh pages, or reused ones?
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(harness.allocator_line())
"""


_RELEASE = _IMPORT_HARNESS + """
import numpy as np
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
kept = harness.retain_freed_memory()
a = np.ones(2 ** 26); del a                      # 512 MB, touched and freed: kept in the heap
held = rss_mb()
released = harness.release_freed_memory()
print(kept, released, round(held), round(rss_mb()))
"""


def test_release_freed_memory_returns_the_kept_heap():
    """After retain_freed_memory a freed 512 MB array stays resident; release_freed_memory
    gives it back (glibc), or reports that it did nothing (other C libraries)."""
    kept, released, held, after = _run(["-c", _RELEASE]).split()
    if kept == "False":                                # not glibc: nothing kept, nothing released
        assert released == "False"
        return
    assert released == "True"
    assert float(held) > 400 and float(after) < float(held) - 400


def test_retain_freed_memory_reuses_large_blocks():
    """With ``retain_freed_memory`` a second 128 MB array reuses the first one's pages (no page
    faults); by default (glibc) it is fresh pages (at least one fault per 2 MB huge page)."""
    out = {mode: _run(["-c", _FAULTS, mode]).splitlines() for mode in ("default", "retain")}
    ok, retained = out["retain"][0].split()
    assert out["default"][1].startswith("- allocator: C library default")
    if ok == "False":                                  # not glibc: nothing may have changed
        assert out["retain"][1].startswith("- allocator: C library default")
        return
    assert ok == "True" and "keeps freed memory" in out["retain"][1]
    fresh = int(out["default"][0].split()[1])
    assert int(retained) < 16 and fresh >= 64
