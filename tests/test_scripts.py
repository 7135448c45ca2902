"""Every benchmark script runs with --quick, and every notebook runs as a script (small sizes)."""
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHES = sorted((ROOT / "benchmarks").glob("bench_*.py"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.py"))


def _run(args, timeout=600, clean_malloc=False):
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("EA_FULL", None)
    if clean_malloc:                                   # the C library's own default allocator
        for key in [k for k in env if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "GLIBC_TUNABLES")]:
            del env[key]
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.mark.parametrize("script", BENCHES, ids=[p.name for p in BENCHES])
def test_benchmark_quick(script):
    out = _run([str(script), "--quick"])
    assert "|" in out                      # a Markdown table was printed


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(notebook):
    _run([str(notebook)])


def test_bench_linear_only_selects_and_rejects_unknown_names():
    script = ROOT / "benchmarks" / "bench_linear.py"
    out = _run([str(script), "--quick", "--only", "performer_causal (scan)"])
    assert "| performer_causal (scan) |" in out and "| performer |" not in out
    assert "| % peak | % GEMM in rounds |" in out                      # the GEMM timed beside the variant
    assert "| control: q + k + v (memory only) |" not in out
    assert "  - performer_causal (scan): worst " in out and "(fwd" in out and "128 → 512)" in out
    assert "- time linear in N (N→4N ≤ 4.4×), FAVOR+ (d = m = 64), the configuration the targets" in out
    assert "elu+1, a row beside" not in out                           # no elu+1 row selected
    ctl = _run([str(script), "--quick", "--only", "control"])
    assert "| control: q + k + v (memory only) | 512 |" in ctl and "| performer" not in ctl
    assert "## Targets" not in ctl and "(no rows)" not in ctl
    bad = subprocess.run([sys.executable, str(script), "--quick", "--only", "performer_causal"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown ['performer_causal']" in bad.stderr


_FAULTS = """
import resource, sys
import numpy as np
from efficient_attention import bench
ok = bench.retain_freed_memory() if sys.argv[1] == "retain" else None
a = np.ones(2 ** 24); del a                      # 128 MB, allocated, touched and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(2 ** 24); del a                      # the same again: fresh pages, or reused ones?
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(bench.allocator_line())
"""


_RELEASE = """
import sys
import numpy as np
from efficient_attention import bench
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
kept = bench.retain_freed_memory()
a = np.ones(2 ** 26); del a                      # 512 MB, touched and freed: kept in the heap
held = rss_mb()
released = bench.release_freed_memory()
print(kept, released, round(held), round(rss_mb()))
"""


def _bench_linear():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_linear
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_linear


def test_bench_linear_gemm_call_multiplies():
    bench_linear = _bench_linear()
    bench_linear.gemm_call()
    a, b, c = bench_linear._GEMM_ARRAYS
    assert c.shape == (bench_linear.GEMM_N,) * 2 and bench_linear.GEMM_FLOPS == 2 * bench_linear.GEMM_N ** 3
    np.testing.assert_allclose(c[:4, :4], a[:4].astype(np.float64) @ b[:, :4].astype(np.float64), rtol=1e-4, atol=1e-3)


def test_bench_linear_torch_peer_runs_in_its_own_process():
    """The PyTorch peer's rows come from a child interpreter: None without torch, its rows
    with torch, and a reason (not an exception) when the child fails."""
    import importlib.util
    bench_linear = _bench_linear()
    rows, reason = bench_linear.torch_rows_child([32, 64], 1, 8, 8, 100.0, 1)
    if importlib.util.find_spec("torch") is None:
        assert rows is None and reason is None
    else:
        assert reason is None
        assert [r["N"] for r in rows] == [32, 64] and all(r["fwd+bwd ms"] > 0 for r in rows)
    rows, reason = bench_linear.torch_rows_child([32], 1, "undefined_name", 8, 100.0, 1)
    assert rows == [] and "exit status 1" in reason


def test_bench_linear_torch_child_killed_keeps_the_sizes_done(monkeypatch, tmp_path, capsys):
    """A child killed mid-way (signal 9, the out-of-memory killer) gives the rows it printed
    and a reason; main() prints them and says so, in the table and in --json."""
    import json
    bench_linear = _bench_linear()
    row = {"variant": "torch cumsum (elu)", "N": 128, "fwd ms": 1.0, "fwd+bwd ms": 3.0}
    killed = subprocess.CompletedProcess([], -9, stdout=f"__ROW__ {json.dumps(row)}\n")
    unfinished = subprocess.CompletedProcess([], 0, stdout="")
    with monkeypatch.context() as m:               # subprocess.run itself: undone before main()
        m.setattr(bench_linear.subprocess, "run", lambda *a, **k: killed)
        rows, reason = bench_linear.torch_rows_child([128, 512], 1, 8, 8, 100.0, 1)
        assert rows == [row] and "signal 9" in reason
        m.setattr(bench_linear.subprocess, "run", lambda *a, **k: unfinished)
        assert bench_linear.torch_rows_child([128], 1, 8, 8, 100.0, 1) == ([], "the child ended without finishing")
    monkeypatch.setattr(bench_linear, "torch_rows_child", lambda *a: ([row], "the child failed (killed by signal 9)"))
    out_json = tmp_path / "t.json"
    assert bench_linear.main(["--quick", "--only", "torch", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "| torch cumsum (elu) | 128 |" in out and "PyTorch: stopped early, 1 of its sizes measured" in out
    saved = json.loads(out_json.read_text())
    assert saved["rows"] == [row] and saved["torch"].startswith("stopped early") and saved["rounds"] == 1


def test_release_freed_memory_returns_the_kept_heap():
    """After retain_freed_memory a freed 512 MB array stays resident; release_freed_memory
    gives it back (glibc), or reports that it did nothing (other C libraries)."""
    kept, released, held, after = _run(["-c", _RELEASE], clean_malloc=True).split()
    if kept == "False":                                # not glibc: nothing kept, nothing released
        assert released == "False"
        return
    assert released == "True"
    assert float(held) > 400 and float(after) < float(held) - 400


def test_retain_freed_memory_reuses_large_blocks():
    """With ``retain_freed_memory`` a second 128 MB array reuses the first one's pages (no page
    faults); by default (glibc) it is fresh pages (at least one fault per 2 MB huge page)."""
    out = {mode: _run(["-c", _FAULTS, mode], clean_malloc=True).splitlines() for mode in ("default", "retain")}
    ok, retained = out["retain"][0].split()
    assert out["default"][1].startswith("- allocator: C library default")
    if ok == "False":                                  # not glibc: nothing may have changed
        assert out["retain"][1].startswith("- allocator: C library default")
        return
    assert ok == "True" and "keeps freed memory" in out["retain"][1]
    fresh = int(out["default"][0].split()[1])
    assert int(retained) < 16 and fresh >= 64
