"""The small Long Range Arena (benchmarks/bench_long_range.py, lra_tasks.py, lra_model.py):
generators against independent evaluators, gradient checks of LayerNorm, the MLP, the block
and the whole model, the loss falling on a tiny batch, --quick's JSON, the chart's labels."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import efficient_attention as ea

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_long_range as blr  # noqa: E402
import lra_model as lm  # noqa: E402
import lra_tasks as lt  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))


# -- independent evaluators: read the tokens back, without the generators' trees ---------------

def eval_listops_tokens(row):
    """Evaluate a padded ListOps-mini token row with a stack (tokens: 0 pad, 1..10 digits,
    11..14 MAX MIN MED SM, 15 close)."""
    stack = []
    for tok in row:
        tok = int(tok)
        if tok == 0:
            break
        if 1 <= tok <= 10:
            stack.append(tok - 1)
        elif 11 <= tok <= 14:
            stack.append(("op", tok))
        else:                                              # ']': reduce to the last operator
            args = []
            while not isinstance(stack[-1], tuple):
                args.append(stack.pop())
            op = stack.pop()[1]
            args = np.array(args[::-1])
            if op == 11:
                val = args.max()
            elif op == 12:
                val = args.min()
            elif op == 13:
                val = np.sort(args)[(len(args) - 1) // 2]
            else:
                val = args.sum() % 10
            stack.append(int(val))
    assert len(stack) == 1, "one value left"
    return stack[0]


def listops_depth(row):
    depth = best = 0
    for tok in row:
        if 11 <= tok <= 14:
            depth += 1
            best = max(best, depth)
        elif tok == 15:
            depth -= 1
    return best


def eval_retrieval(row):
    n = len(row)
    key = int(row[-1]) - lt.R_QUERY0
    assert np.all(row[n - n // 4:] == row[-1])
    pairs = [(i, int(t) - lt.R_PAIR0) for i, t in enumerate(row) if lt.R_PAIR0 <= t < lt.R_QUERY0]
    assert len(pairs) == 4 and all(i < n // 4 for i, _ in pairs)
    assert sorted(p // 4 for _, p in pairs) == [0, 1, 2, 3]
    assert sorted(p % 4 for _, p in pairs) == [0, 1, 2, 3]          # the held classes: a permutation
    return next(p % 4 for _, p in pairs if p // 4 == key)


def eval_local(row):
    n = len(row)
    radius, clear = lt.local_limits(n)
    (p,) = np.flatnonzero(row == lt.L_MARKER)
    labels = [(abs(i - p), int(row[i]) - lt.L_LABEL0) for i in np.flatnonzero((row >= lt.L_LABEL0) & (row < lt.L_MARKER))]
    near = [c for dist, c in labels if dist <= clear]
    assert len(near) == 1 and min(d for d, _ in labels) <= radius
    return near[0]


@pytest.mark.parametrize("n", [64, 256])
def test_listops_labels_equal_an_independent_evaluator(n):
    tokens, labels = lt.listops(n, 300, seed=3)
    assert tokens.shape == (300, n) and tokens.dtype == np.int64
    for row, label in zip(tokens, labels):
        assert eval_listops_tokens(row) == label
        length = int((row != 0).sum())
        assert n // 8 <= length <= n and np.all(row[length:] == 0)      # padded at the end only
        assert 1 <= listops_depth(row) <= 5


def test_listops_tree_limits_and_operator_values():
    rng = np.random.default_rng(0)
    for _ in range(200):
        op, args = lt.listops_tree(rng, max_depth=3, max_args=4)
        assert op in lt.LISTOPS_OPS and 2 <= len(args) <= 4
    assert lt.listops_value("MED", [7, 1, 3, 9]) == 3                   # lower median of an even count
    assert lt.listops_value("SM", [7, 5, 9]) == 1
    assert lt.listops_value("MAX", [2, 8]) == 8 and lt.listops_value("MIN", [2, 8]) == 2


@pytest.mark.parametrize("task", list(lt.TASKS))
def test_generators_are_deterministic_and_seeds_differ(task):
    make = lt.TASKS[task].make
    a, b, c = make(64, 50, 1), make(64, 50, 1), make(64, 50, 2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].min() >= 0 and a[0].max() < lt.TASKS[task].vocab
    assert a[1].min() >= 0 and a[1].max() < lt.TASKS[task].classes


@pytest.mark.parametrize("task,evaluate", [("retrieval", eval_retrieval), ("local", eval_local)])
@pytest.mark.parametrize("n", [64, 512])
def test_marker_labels_equal_an_independent_evaluator(task, evaluate, n):
    tokens, labels = lt.TASKS[task].make(n, 200, seed=5)
    assert [evaluate(row) for row in tokens] == labels.tolist()


def test_class_balance_within_bounds():
    _, y = lt.listops(128, 1000, seed=0)
    assert np.bincount(y, minlength=10).tolist() == [100] * 10        # exactly balanced by construction
    for task in ("retrieval", "local"):
        _, y = lt.TASKS[task].make(64, 4000, seed=0)
        frac = np.bincount(y, minlength=4) / len(y)
        assert np.all(np.abs(frac - 0.25) < 0.03), frac                # about 9 standard errors wide


def test_retrieval_pairs_are_at_least_half_the_sequence_from_every_query():
    tokens, _ = lt.retrieval(256, 100, seed=0)
    for row in tokens:
        pairs = np.flatnonzero((row >= lt.R_PAIR0) & (row < lt.R_QUERY0))
        queries = np.flatnonzero(row >= lt.R_QUERY0)
        assert queries.min() - pairs.max() >= 256 // 2


# -- gradient checks in float64 ------------------------------------------------------------------

def test_layernorm_gradcheck():
    rng = np.random.default_rng(0)
    ln = lm.LayerNorm(1 + 0.3 * rng.standard_normal(8), 0.2 * rng.standard_normal(8))
    assert ea.gradcheck(ln, (rng.standard_normal((2, 5, 8)),)) < 1e-6


def test_layernorm_normalises_the_last_axis():
    rng = np.random.default_rng(1)
    y = lm.LayerNorm.init(d=16)(3 + 2 * rng.standard_normal((4, 16)))
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(y.std(-1), 1, rtol=1e-4)


def test_mlp_gradcheck_and_value():
    rng = np.random.default_rng(2)
    mlp = lm.MLP.init(d=8, seed=3, hidden=12)
    mlp.b1[:] = rng.standard_normal(12)
    x = rng.standard_normal((2, 5, 8))
    assert ea.gradcheck(mlp, (x,)) < 1e-6
    h = x @ mlp.w1 + mlp.b1
    from scipy.special import erf
    gelu_exact = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    np.testing.assert_allclose(mlp(x), gelu_exact @ mlp.w2 + mlp.b2, atol=5e-3)   # tanh form ≈ exact GELU


@pytest.mark.parametrize("name", ["dense", "local", "linformer", "synth_dense", "bigbird"])
def test_block_gradcheck(name):
    rng = np.random.default_rng(4)
    attn = lm.build_attention(ea.get_variant(name), 16, 8, 2, seed=0)
    block = lm.Block.init(attn, 8, seed=1, hidden=12)
    assert ea.gradcheck(block, (rng.standard_normal((2, 16, 8)),)) < 1e-6


def _model(name, n=16, d=8, dtype=np.float64, seed=0):
    v = ea.get_variant(name)
    attns = [lm.build_attention(v, n, d, 2, seed=seed + i) for i in range(2)]
    return lm.Model(attns, vocab=lt.R_VOCAB, n=n, d=d, classes=4, seed=seed, hidden=12, dtype=dtype)


@pytest.mark.parametrize("name", ["dense", "local"])
def test_model_gradients_against_central_differences(name):
    """Every parameter group of the two-block model in float64: directional derivatives of the
    loss against the backward pass."""
    model = _model(name)
    tokens, labels = lt.retrieval(16, 3, seed=0)
    _, grads = model.loss_and_grads(tokens, labels)
    rng = np.random.default_rng(0)
    worst = 0.0
    for key, p in model.params.items():
        u = rng.standard_normal(p.shape)
        h = 1e-5
        old = p.copy()
        vals = []
        for s in (1, -1, 2, -2):
            p[...] = old + s * h * u
            vals.append(model.loss_and_grads(tokens, labels)[0])
        p[...] = old
        fd = (8 * (vals[0] - vals[1]) - (vals[2] - vals[3])) / (12 * h)
        an = float(np.sum(grads[key] * u))
        worst = max(worst, abs(fd - an) / max(abs(fd), abs(an), 1e-8))
    assert worst < 1e-6, worst


@pytest.mark.parametrize("name", ["dense", "local"])
def test_loss_falls_on_a_tiny_batch(name):
    model = _model(name, n=32, d=16, dtype=np.float32)
    tokens, labels = lt.retrieval(32, 8, seed=1)
    opt = lm.Adam(model.params, lr=3e-3)
    first = model.loss_and_grads(tokens, labels)[0]
    for _ in range(60):
        loss, grads = model.loss_and_grads(tokens, labels)
        opt.step(model.params, grads)
    assert loss < 0.5 * first, (first, loss)


def test_model_computes_in_float32():
    model = _model("dense", dtype=np.float32)
    tokens, _ = lt.retrieval(16, 2, seed=0)
    logits, _ = model.forward(tokens)
    assert logits.dtype == np.float32 and all(p.dtype == np.float64 for p in model.params.values())


# -- the script --------------------------------------------------------------------------------

def test_quick_writes_well_formed_json(tmp_path):
    out, md, png = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_long_range.py"), "--quick",
                          "--json", str(out), "--markdown", str(md), "--chart", str(png)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    records = json.loads(out.read_text())
    assert isinstance(records, list) and len(records) == 3 * 3            # 3 tasks x 3 variants x 1 seed
    for r in records:
        assert set(blr.KEYS) <= set(r) and "error" not in r
        assert r["task"] in lt.TASKS and 0 <= r["accuracy"] <= 1
        assert r["ms_per_step"] > 0 and r["peak_mb"] > 0 and r["n"] == 64
    text = md.read_text()
    assert "| `dense` ¹ |" in text and "Spearman" in text and "/work" not in text and "/tmp" not in text
    assert png.stat().st_size > 1000


def _rows(k):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(k):
        name = list(blr.LRA_NAMES)[i] if i < len(blr.LRA_NAMES) else f"variant_{i}"
        rows.append({"variant": name, "avg": 25 + rng.random(), "speed": 1 + 0.01 * rng.random(),
                     "mb": 10 + rng.random(), "listops": (10.0, 0.5, 2)})
    return rows


def test_chart_labels_do_not_overlap_even_when_points_coincide(tmp_path):
    pytest.importorskip("matplotlib")
    boxes = blr.draw_chart(_rows(36), tmp_path / "c.png", "36 points within 1 % of each other")
    assert len(boxes) == 2 * 36 and blr.overlaps(boxes) == []            # 36 numbers, 36 names


def test_overlaps_finds_overlapping_boxes():
    from matplotlib.transforms import Bbox
    boxes = [Bbox([[0, 0], [10, 10]]), Bbox([[5, 5], [15, 15]]), Bbox([[20, 0], [30, 10]])]
    assert blr.overlaps(boxes) == [(0, 1)]


def test_summary_and_spearman():
    recs = []
    for v, accs, ms in (("dense", (0.5, 0.7), 100.0), ("local", (0.2, 0.2), 50.0)):
        for seed, acc in enumerate(accs):
            recs.append({"task": "listops", "variant": v, "n": 64, "seed": seed, "steps": 1, "batch": 1,
                         "accuracy": acc, "ms_per_step": ms, "peak_mb": ms / 10})
    rows = blr.summary(recs, ["listops"])
    dense, local = rows
    assert dense["listops"] == pytest.approx((60.0, 10.0, 2)) and dense["avg"] == pytest.approx(60.0)
    assert local["speed"] == pytest.approx(2.0) and local["memory"] == pytest.approx(0.5)
    rho, k = blr.spearman([1, 2, 3, 4], [10, 20, 40, 30])
    assert k == 4 and rho == pytest.approx(0.8)
    assert blr.spearman([1, None, 3], [1, 2, None]) == (None, 1)


def test_quick_with_two_workers_merges_their_records(tmp_path):
    """--jobs 2: the (seed, task) units split between two worker processes, the records merged
    in the order task, variant, seed."""
    out = tmp_path / "r.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_long_range.py"), "--quick",
                          "--jobs", "2", "--variants", "dense", "local", "--json", str(out)],
                         cwd=ROOT, env=dict(os.environ, MPLBACKEND="Agg"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    records = json.loads(out.read_text())
    assert [(r["task"], r["variant"]) for r in records] == [(t, v) for t in lt.TASKS for v in ("dense", "local")]
    assert "2 worker processes side by side" in res.stdout


def test_retime_times_every_run_again_and_keeps_the_training_times():
    recs = [blr.run(task, "dense", 32, 0, steps=2, batch=2, eval_size=4) for task in ("listops", "local")]
    trained = [r["ms_per_step"] for r in recs]
    blr.retime(recs, rounds=2)
    assert [r["train_ms_per_step"] for r in recs] == trained
    assert all(r["ms_per_step"] > 0 and r["timing_rounds"] == 2 for r in recs)
