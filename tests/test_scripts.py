"""Every benchmark script runs with --quick, and every notebook runs as a script (small sizes)."""
import os
import pathlib
import platform
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHES = sorted((ROOT / "benchmarks").glob("bench_*.py"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.py"))


def _run(args, timeout=600):
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("EA_FULL", None)
    res = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout


@pytest.mark.parametrize("script", BENCHES, ids=[p.name for p in BENCHES])
def test_benchmark_quick(script):
    out = _run([str(script), "--quick"])
    assert "|" in out                      # a Markdown table was printed
    if script.name in ("bench_linear.py", "bench_lowrank.py"):   # harness.retain_freed_memory() first
        assert "- allocator: glibc keeps freed memory" in out or platform.libc_ver()[0] != "glibc"


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
    assert "- time linear in N (N→4N ≤ 4.4×), FAVOR+, the target configuration" in out
    assert "elu+1, a row beside" not in out                           # no elu+1 row selected
    ctl = _run([str(script), "--quick", "--only", "control"])
    assert "| control: q + k + v (memory only) | 512 |" in ctl and "| performer" not in ctl
    assert "## Targets" not in ctl and "(no rows)" not in ctl
    bad = subprocess.run([sys.executable, str(script), "--quick", "--only", "performer_causal"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown ['performer_causal']" in bad.stderr


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


def test_conformance_peers_example_runs_with_whatever_is_installed():
    """examples/conformance_peers.py: a row per run for each installed peer, a 'not installed'
    row otherwise (PyTorch and JAX are optional peers, never dependencies)."""
    import importlib.util
    out = _run([str(ROOT / "examples" / "conformance_peers.py"), "--quick", "--only", "torch", "jax",
                "--dtype", "float32", "--max-examples", "5"], timeout=900)
    assert out.startswith("| implementation |")
    for peer, name in (("torch", "PyTorch SDPA"), ("jax", "JAX dot_product_attention")):
        if importlib.util.find_spec(peer) is None:
            assert f"| {peer} | not installed" in out
        else:
            rows = [line for line in out.splitlines() if line.startswith(f"| {name} |")]
            assert rows and all("| passed |" in r or "| **failed** |" in r for r in rows)
