"""The main command and its timing, ``efficient_attention.bench``."""
import json
import subprocess
import sys

import numpy as np
import pytest

import efficient_attention as ea
from efficient_attention import bench
from efficient_attention.__main__ import main


def test_main_runs_table_and_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["--n", "32", "64", "--d", "8", "--heads", "1", "--repeat", "1",
                 "--variants", "dense", "dense_causal", "--no-peak", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "| variant | kind | N |" in text and "BLAS" in text and "numba threads" in text
    assert "err vs oracle" in text and "approx. gap" in text and "err out" not in text
    rows = json.loads(path.read_text())["rows"]
    assert [(r["variant"], r["N"]) for r in rows] == [("dense", 32), ("dense", 64),
                                                      ("dense_causal", 32), ("dense_causal", 64)]
    for r in rows:
        assert r["fwd ms"] > 0 and r["fwd+bwd ms"] > 0 and r["peak MB"] > 0
        assert r["err out"] < 1e-5 and r["err grad"] < 1e-5          # float32 vs the float64 oracle
        assert "gap out" not in r                                   # exact: no approximation gap
    assert rows[2]["oracle"] == "masked"
    # progress on stderr: a line before each variant's first (compiling) call, one per size
    assert "[1/2] dense (core): first call" in captured.err and "[2/2] dense_causal" in captured.err
    assert "dense_causal N=64: fwd+bwd" in captured.err


def _table_rows(text):
    """The Markdown table of the main command as dicts (column name -> cell)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_main_times_layers_and_cores_alike():
    """The user's report: --list shows the sequence layers, and --variants fnet mha_dense
    printed "(no rows)". Every listed variant is timed; layers against their float64 run."""
    res = subprocess.run([sys.executable, "-m", "efficient_attention", "--variants", "fnet", "mha_dense",
                          "--n", "256", "--no-peak", "--repeat", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    rows = _table_rows(res.stdout)
    assert [(r["variant"], r["kind"], r["N"]) for r in rows] == [("fnet", "layer", "256"),
                                                               ("mha_dense", "layer", "256")]
    for r in rows:
        out_err, grad_err = (float(x) for x in r["err vs oracle"].split(" / "))
        assert 0 < out_err < 1e-5 and 0 < grad_err < 1e-5        # float32 against the float64 layer
        assert r["approx. gap"] == "—" and r["oracle"] == "layer in float64"
        assert float(r["fwd+bwd ms"]) > 0 and float(r["fwd GFLOP/s"]) > 0
    assert "(no rows)" not in res.stdout and "Skipped" not in res.stdout
    assert "[1/2] fnet (layer): first call" in res.stderr


def test_main_every_listed_variant_gets_a_row(tmp_path):
    """Every registered variant, core or layer, comes out with a row at a small size
    (or a stated reason in 'skipped', which no variant needs at N = 32)."""
    path = tmp_path / "all.json"
    assert main(["--n", "32", "--d", "8", "--heads", "1", "--repeat", "1", "--no-peak",
                 "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert [r["variant"] for r in result["rows"]] == list(ea.registry()) and result["skipped"] == []
    assert any(r["oracle"] == "reference" for r in result["rows"])      # added tokens: their own oracle
    for r in result["rows"]:
        variant = ea.get_variant(r["variant"])
        if variant.kind == "core" and not variant.exact and r["oracle"] != "reference":
            assert "err out" not in r and r["gap out"] >= 0 and r["gap grad"] >= 0
            assert r["oracle"] in ("full softmax", "masked softmax")
        else:
            assert r["err out"] < 1e-4 and r["err grad"] < 1e-4, r
            assert "gap out" not in r


def test_main_legend_and_approximation_gap(capsys):
    """An approximation's distance from exact softmax is shown as a gap, apart from the
    numerical errors, and the legend under the table says what each column means."""
    assert main(["--n", "64", "--d", "8", "--heads", "1", "--repeat", "1", "--no-peak",
                 "--variants", "performer", "dense"]) == 0
    text = capsys.readouterr().out
    rows = {r["variant"]: r for r in _table_rows(text)}
    assert rows["performer"]["err vs oracle"] == "—" and rows["performer"]["oracle"] == "full softmax"
    gap_out, gap_grad = (float(x) for x in rows["performer"]["approx. gap"].split(" / "))
    assert gap_out > 1e-3 and gap_grad > 1e-3             # an approximation, not exact softmax
    assert rows["dense"]["approx. gap"] == "—" and float(rows["dense"]["err vs oracle"].split(" / ")[0]) < 1e-5
    assert "- err vs oracle:" in text and "- approx. gap:" in text and "not a numerical error" in text


def test_main_skips_a_configuration_that_does_not_exist_with_its_reason(capsys, monkeypatch):
    """A variant that cannot be built at a size is listed under 'Skipped' with the reason."""
    import efficient_attention.core as core_module

    def refuse(self, n, d, dv=None, seed=0):
        raise ValueError(f"n must be a multiple of 64, got {n}")
    monkeypatch.setattr(core_module.Variant, "build", refuse)
    assert main(["--n", "32", "--d", "8", "--heads", "1", "--repeat", "1", "--no-peak",
                 "--variants", "dense"]) == 0
    out = capsys.readouterr().out
    assert "Skipped" in out and "dense at N = 32: n must be a multiple of 64, got 32" in out


def test_main_default_sizes_per_kind_and_n_sets_both(tmp_path, monkeypatch):
    """Without --n, cores and layers run at their own default sizes (the header says which);
    --n sets the sizes of every variant."""
    import efficient_attention.__main__ as main_module
    monkeypatch.setattr(main_module, "DEFAULT_SIZES", {"core": [16, 32], "layer": [16]})
    path = tmp_path / "d.json"
    args = ["--d", "8", "--heads", "1", "--repeat", "1", "--no-peak", "--variants", "dense", "fnet"]
    assert main(args + ["--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["variant"], r["N"]) for r in rows] == [("dense", 16), ("dense", 32), ("fnet", 16)]
    assert main(args + ["--n", "24", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["variant"], r["N"]) for r in rows] == [("dense", 24), ("fnet", 24)]
    assert main_module.build_parser().parse_args([]).n is None


def test_main_says_before_the_gemm_probe(capsys, monkeypatch):
    """The GEMM-peak probe takes seconds: a line on stderr comes before it starts."""
    seen = []

    def fake_peak():
        seen.append(capsys.readouterr().err)           # what was on stderr when the probe started
        return {"float32": 100.0, "float64": 50.0, "kernel": "fake", "threads": 1}
    monkeypatch.setattr(bench, "gemm_peak", fake_peak)
    assert main(["--n", "16", "--d", "4", "--heads", "1", "--repeat", "1", "--variants", "dense"]) == 0
    assert seen and "measuring this machine's GEMM peak" in seen[0]
    assert "| % peak |" in capsys.readouterr().out


def test_main_list_and_errors(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "dense_causal" in listed and "| layer |" in listed
    assert main(["--variants", "nope"]) == 2
    assert "unknown variants ['nope']" in capsys.readouterr().err
    assert main(["--variants", "dense", "nope", "fnet"]) == 2           # one unknown name is enough
    assert "['nope']" in capsys.readouterr().err
    assert main(["--d", "0"]) == 2
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--version" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"efficient_attention {ea.__version__}"


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "efficient_attention", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--json" in res.stdout


def test_harness_pieces():
    calls = []
    t = bench.median_time(lambda: calls.append(1), repeat=3, warmup=2)
    assert len(calls) == 5 and t >= 0
    assert bench.traced_peak(lambda: np.ones(2**20)) >= 8 * 2**20
    assert bench.rel_error([1.0, 1.0], [1.0, 0.0]) == 1.0
    table = bench.markdown_table([{"a": 1, "b": 0.123456}, {"a": 2, "b": None}])
    assert table.splitlines()[0] == "| a | b |" and "0.123" in table and "—" in table
    row = bench.bench_core(ea.DenseAttention(), 16, 4, heads=2, repeat=1)
    assert row["err out"] < 1e-5 and row["oracle"] == "dense"
    approx = bench.bench_core(ea.get_variant("linear_elu").build(16, 4), 16, 4, repeat=1, exact=False)
    assert "err out" not in approx and approx["gap out"] > 1e-3 and approx["oracle"] == "full softmax"
    layer = ea.get_variant("mha_dense").build(16, 8)
    lrow = bench.bench_layer(layer, 16, 8, repeat=1)
    assert lrow["err out"] < 1e-5 and lrow["err grad"] < 1e-5 and lrow["oracle"] == "layer in float64"
    assert bench.bench_layer(layer, 16, 8, repeat=1, dtype=np.float64)["oracle"] == "none in float64"
    given = bench.bench_core(ea.DenseAttention(), 16, 4, heads=2, times=(0.5, 2.0))
    assert given["fwd ms"] == 500 and given["fwd+bwd ms"] == 2000 and given["err out"] < 1e-5


def test_gemm_peak_subprocess():
    peak = bench.gemm_peak()
    assert peak["float32"] > 0 and peak["float64"] > 0 and isinstance(peak["kernel"], str)
    assert bench.gemm_peak() == peak                       # measured once per process


def test_gemm_peak_refresh_measures_again(monkeypatch):
    """gemm_peak() keeps its first reading; refresh=True measures again and keeps the new one.
    The probe is a subprocess started without the OpenBLAS override variables."""
    monkeypatch.setattr(bench, "_GEMM_CACHE", {})          # this test's readings stay in this test
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    readings, envs = iter([10.0, 20.0]), []

    def probe(args, **kwargs):
        envs.append(kwargs["env"])
        value = next(readings)
        out = json.dumps({"float32": value, "float64": value / 2, "kernel": "fake", "threads": 1})
        return subprocess.CompletedProcess(args, 0, stdout=out + "\n", stderr="")
    monkeypatch.setattr(bench.subprocess, "run", probe)
    assert bench.gemm_peak()["float32"] == 10.0
    assert bench.gemm_peak()["float32"] == 10.0 and len(envs) == 1          # the kept reading
    assert bench.gemm_peak(refresh=True)["float32"] == 20.0 and len(envs) == 2
    assert bench.gemm_peak() == {"float32": 20.0, "float64": 10.0, "kernel": "fake", "threads": 1}
    assert all("OPENBLAS_CORETYPE" not in env for env in envs)
