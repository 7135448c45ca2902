"""Every benchmark script runs with --quick, and every notebook runs as a script (small sizes)."""
import os
import pathlib
import subprocess
import sys

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


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(notebook):
    _run([str(notebook)])


def test_bench_linear_only_selects_and_rejects_unknown_names():
    script = ROOT / "benchmarks" / "bench_linear.py"
    out = _run([str(script), "--quick", "--only", "performer_causal (scan)"])
    assert "| performer_causal (scan) |" in out and "| performer |" not in out
    bad = subprocess.run([sys.executable, str(script), "--quick", "--only", "performer_causal"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown ['performer_causal']" in bad.stderr
