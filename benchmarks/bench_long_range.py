"""A small Long Range Arena on the CPU: three tasks, a two-block model, two seeds, every variant.

    python benchmarks/bench_long_range.py --jobs 2            # the full run (docs/long_range.md)
    python benchmarks/bench_long_range.py --quick --json FILE # seconds (the test suite runs it)
    python benchmarks/bench_long_range.py --from-json FILE... # no training: tables and chart again

The tasks (``lra_tasks.py``: ListOps-mini, keyed retrieval, a local task) are generated offline
from a seed; the model (``lra_model.py``) is token + position embeddings, two pre-norm blocks
(multi-head attention with the variant's core on every head, or the variant's own layer; a
two-layer GELU MLP), mean pooling and a linear classifier, trained with the library's backward
passes, hand-written LayerNorm and MLP backward passes and Adam in NumPy, in float32.

Every (task, variant, seed) gets the same budget: ``--steps`` Adam steps of ``--batch``
sequences of the training set that the seed generates, then the accuracy on a test set that
is the same for every variant and seed (drawn from its own seed). The seed also draws the
model's parameters and the variant's random parts (patterns, features, hashes).

Outputs: ``--json`` (a list of records with the keys task, variant, n, seed, steps, batch,
accuracy, ms_per_step, peak_mb; ``error`` when a run failed), ``--markdown`` (the results
table, accuracy per task as the mean over seeds ± half their range, the average, speed and
memory relative to dense as in LRA's Table 2, and the comparison with the paper's tables and
its rank correlations) and ``--chart`` (speed against average accuracy, memory as point area,
every label in a column beside the axes). ``--jobs J`` runs J worker processes, one BLAS
thread each, seeds (then tasks) split between them, and merges their records. After training,
every run's step is timed again, all side by side in ``--timing-rounds`` interleaved rounds on
one thread, and those medians are the ``ms_per_step`` the tables use.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import efficient_attention as ea  # noqa: E402
from efficient_attention import bench  # noqa: E402
from lra_model import Adam, Model, build_attention  # noqa: E402
from lra_tasks import TASKS  # noqa: E402

KEYS = ("task", "variant", "n", "seed", "steps", "batch", "accuracy", "ms_per_step", "peak_mb")
TEST_SEED = 999_999                        # the test set: one per task, the same for every run
D, HEADS, LAYERS, LR = 32, 2, 2, 3e-3

#: LRA's set first (the variant standing for each of the paper's models), then the block-sparse
#: engine's softmax patterns, then the rest of the registry. Causal forms are left out: every
#: task here classifies a whole sequence.
LRA_NAMES = {
    "dense": "Transformer", "local": "Local Attention", "strided": "Sparse Trans.",
    "longformer": "Longformer", "bigbird": "BigBird", "linformer": "Linformer", "lsh": "Reformer",
    "sinkhorn": "Sinkhorn Trans.", "synth_dense": "Synthesizer", "linear_elu": "Linear Trans.",
    "performer": "Performer",
}

#: Tay et al. 2020, "Long Range Arena: A Benchmark for Efficient Transformers" (arXiv:2011.04006,
#: ICLR 2021). Table 1: test accuracy (%) on ListOps, Text, Retrieval, Image and Pathfinder (every
#: model fails Path-X); we average the five ourselves. Table 2: training steps per second and peak
#: memory per device (GB) on the byte-level text task at length 4K, batch 32; the ratios to the
#: Transformer are computed here. Sparse Trans. and Longformer have no Table 2 row.
LRA_TABLE1 = {  # model: (ListOps, Text, Retrieval, Image, Pathfinder)
    "Transformer": (36.37, 64.27, 57.46, 42.44, 71.40),
    "Local Attention": (15.82, 52.98, 53.39, 41.46, 66.63),
    "Sparse Trans.": (17.07, 63.58, 59.59, 44.24, 71.71),
    "Longformer": (35.63, 62.85, 56.89, 42.22, 69.71),
    "Linformer": (35.70, 53.94, 52.27, 38.56, 76.34),
    "Reformer": (37.27, 56.10, 53.40, 38.07, 68.50),
    "Sinkhorn Trans.": (33.67, 61.20, 53.83, 41.23, 67.45),
    "Synthesizer": (36.99, 61.68, 54.67, 41.61, 69.45),
    "BigBird": (36.05, 64.02, 59.29, 40.83, 74.87),
    "Linear Trans.": (16.13, 65.90, 53.09, 42.34, 75.30),
    "Performer": (18.01, 65.40, 53.82, 42.77, 77.05),
}
LRA_TABLE2_4K = {  # model: (steps per second, peak memory GB) at 4K
    "Transformer": (1.4, 9.48), "Local Attention": (7.4, 1.37), "Linformer": (7.7, 0.99),
    "Reformer": (1.1, 2.28), "Sinkhorn Trans.": (5.3, 1.48), "Synthesizer": (1.9, 6.99),
    "BigBird": (1.5, 2.88), "Linear Trans.": (7.8, 1.03), "Performer": (8.0, 1.06),
}

def default_variants(everything=True):
    """LRA's set, then the engine's softmax patterns, then (``everything``) the rest of the
    registry. Causal forms are left out: every task classifies a whole sequence."""
    reg = [n for n in ea.registry() if "causal" not in n]
    engine = [n for n in reg if n.startswith("engine_")]
    rest = [n for n in reg if n not in LRA_NAMES and n not in engine] if everything else []
    return [n for n in LRA_NAMES if n in reg] + engine + rest


# -- one run --------------------------------------------------------------------------------------

_DATA: dict = {}


def dataset(task, n, size, seed):
    """The task's sequences for ``(n, size, seed)``, generated once per process."""
    key = (task, n, size, seed)
    if key not in _DATA:
        _DATA[key] = TASKS[task].make(n, size, seed)
    return _DATA[key]


def run(task, variant_name, n, seed, *, steps, batch, eval_size, lr=LR):
    """Train one (task, variant, seed) and return its record."""
    t = TASKS[task]
    rec = {"task": task, "variant": variant_name, "n": n, "seed": seed, "steps": steps, "batch": batch}
    try:
        tokens, labels = dataset(task, n, steps * batch, seed)
        test_tokens, test_labels = dataset(task, n, eval_size, TEST_SEED)
        variant = ea.get_variant(variant_name)
        attns = [build_attention(variant, n, D, HEADS, seed=1000 * seed + 100 * i) for i in range(LAYERS)]
        model = Model(attns, vocab=t.vocab, n=n, d=D, classes=t.classes, seed=seed)
        opt = Adam(model.params, lr)
        times, losses = [], []
        for s in range(steps):
            sl = slice(s * batch, (s + 1) * batch)
            t0 = time.perf_counter()
            loss, grads = model.loss_and_grads(tokens[sl], labels[sl])
            opt.step(model.params, grads)
            times.append(time.perf_counter() - t0)
            losses.append(loss)
        peak = bench.traced_peak(lambda: model.loss_and_grads(tokens[:batch], labels[:batch]))
        acc = float(np.mean(model.predict(test_tokens) == test_labels))
        rec.update(accuracy=acc, ms_per_step=1e3 * float(np.median(times[1:] if steps > 1 else times)),
                   peak_mb=peak / 2**20, first_loss=float(np.mean(losses[:5])),
                   last_loss=float(np.mean(losses[-10:])))
    except Exception as exc:                   # the record says what failed; nothing is hidden
        rec.update(accuracy=None, ms_per_step=None, peak_mb=None, error=f"{type(exc).__name__}: {exc}"[:200])
    return rec


def retime(records, rounds=5):
    """Time one training step of every run again, side by side, in this process on one thread.

    The runs train one after another for an hour on a machine whose load changes, so their own
    step times (kept as ``train_ms_per_step``) compare variants timed under different loads.
    Here every (task, variant, seed) gets a fresh model and ``rounds`` rounds in which each takes
    one step in turn (after one warm-up step each); ``ms_per_step`` becomes its median over the
    rounds, so every variant is timed under the same conditions."""
    import numba
    from threadpoolctl import threadpool_limits
    todo = [r for r in records if r.get("accuracy") is not None]
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"), ea.config.override(THREADS=1):
            steps = []
            for r in todo:
                t = TASKS[r["task"]]
                tokens, labels = dataset(r["task"], r["n"], r["batch"], r["seed"])
                variant = ea.get_variant(r["variant"])
                attns = [build_attention(variant, r["n"], D, HEADS, seed=1000 * r["seed"] + 100 * i)
                         for i in range(LAYERS)]
                model = Model(attns, vocab=t.vocab, n=r["n"], d=D, classes=t.classes, seed=r["seed"])
                opt = Adam(model.params, LR)

                def step(model=model, opt=opt, tokens=tokens, labels=labels):
                    _, grads = model.loss_and_grads(tokens, labels)
                    opt.step(model.params, grads)
                step()                                                  # warm-up (and compilation)
                steps.append(step)
            times = [[] for _ in todo]
            for _ in range(rounds):
                for i, step in enumerate(steps):
                    t0 = time.perf_counter()
                    step()
                    times[i].append(time.perf_counter() - t0)
    finally:
        numba.set_num_threads(threads)
    for r, ts in zip(todo, times):
        r.setdefault("train_ms_per_step", r["ms_per_step"])
        r["ms_per_step"] = 1e3 * float(np.median(ts))
        r["timing_rounds"] = rounds
    return records


# -- tables ----------------------------------------------------------------------------------------

def _by_variant(records):
    out: dict = {}
    for r in records:
        out.setdefault(r["variant"], []).append(r)
    return out


def summary(records, tasks):
    """Per variant: accuracy per task (mean, half range over seeds), average, ms, MB, relative to dense."""
    rows = []
    for name, recs in _by_variant(records).items():
        ok = [r for r in recs if r.get("accuracy") is not None]
        row = {"variant": name, "errors": [r["error"] for r in recs if r.get("error")]}
        for task in tasks:
            accs = [100 * r["accuracy"] for r in ok if r["task"] == task]
            row[task] = (float(np.mean(accs)), (max(accs) - min(accs)) / 2, len(accs)) if accs else None
        means = [row[t][0] for t in tasks if row[t] is not None]
        row["avg"] = float(np.mean(means)) if len(means) == len(tasks) else None
        row["ms"] = float(np.median([r["ms_per_step"] for r in ok])) if ok else None
        row["mb"] = float(np.median([r["peak_mb"] for r in ok])) if ok else None
        rows.append(row)
    dense = next((r for r in rows if r["variant"] == "dense" and r["ms"]), None)
    for row in rows:
        row["speed"] = dense["ms"] / row["ms"] if dense and row["ms"] else None
        row["memory"] = row["mb"] / dense["mb"] if dense and row["mb"] else None
    return rows


def _acc(cell):
    if cell is None:
        return "—"
    mean, half, k = cell
    return f"{mean:.1f} ± {half:.1f}" if k > 1 else f"{mean:.1f}"


def _num(x, fmt):
    return "—" if x is None else format(x, fmt)


TASK_TITLES = {"listops": "ListOps-mini", "retrieval": "retrieval", "local": "local"}


def results_table(rows, tasks):
    """Accuracy per task (mean ± half the range over seeds), the average, speed and memory × dense."""
    head = ["variant", *(f"{TASK_TITLES.get(t, t)} (%)" for t in tasks), "avg (%)", "speed (×)", "memory (×)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = f"`{r['variant']}`" + (" ¹" if r["variant"] in LRA_NAMES else "")
        cells = [name, *(_acc(r[t]) for t in tasks), _num(r["avg"], ".1f"), _num(r["speed"], ".2f"),
                 _num(r["memory"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spearman(a, b):
    """Spearman's rank correlation (ties get their mean rank) and the number of pairs."""
    from scipy.stats import spearmanr
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(pairs) < 3:
        return None, len(pairs)
    rho = spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic
    return float(rho), len(pairs)


def paper_table(rows):
    """Our ListOps-mini, average, speed and memory beside LRA's Tables 1 and 2, and rank correlations."""
    by = {r["variant"]: r for r in rows}
    head = ["variant (LRA model)", "ListOps LRA", "ListOps-mini", "avg LRA", "avg ours", "speed LRA",
            "speed ours", "memory LRA", "memory ours"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cols = {k: ([], []) for k in ("listops", "avg", "speed", "memory")}
    t_steps, t_mem = LRA_TABLE2_4K["Transformer"]
    for name, model in LRA_NAMES.items():
        r = by.get(name)
        if r is None:
            continue
        lo, avg = LRA_TABLE1[model][0], float(np.mean(LRA_TABLE1[model]))
        sp, mem = LRA_TABLE2_4K.get(model, (None, None))
        sp = sp / t_steps if sp else None
        mem = mem / t_mem if mem else None
        ours = r["listops"][0] if r.get("listops") else None
        for key, paper, mine in (("listops", lo, ours), ("avg", avg, r["avg"]), ("speed", sp, r["speed"]),
                                 ("memory", mem, r["memory"])):
            cols[key][0].append(paper)
            cols[key][1].append(mine)
        lines.append("| " + " | ".join([f"`{name}` ({model})", f"{lo:.1f}", _num(ours, ".1f"), f"{avg:.1f}",
                                        _num(r["avg"], ".1f"), _num(sp, ".2f"), _num(r["speed"], ".2f"),
                                        _num(mem, ".2f"), _num(r["memory"], ".2f")]) + " |")
    corr = {}
    for key, (paper, mine) in cols.items():
        corr[key] = spearman(paper, mine)
    text = ("Accuracies in %; LRA's average is the mean of its five task columns; speed and memory are "
            "ratios to dense (to the Transformer: LRA's Table 2 at 4K).\n\n" + "\n".join(lines)
            + "\n\nSpearman rank correlation of the two orderings:\n\n")
    text += "| column | ρ | variants |\n|---|---|---|\n"
    for key, label in (("listops", "ListOps (LRA) vs ListOps-mini"), ("avg", "average accuracy"),
                       ("speed", "speed relative to dense"), ("memory", "memory relative to dense")):
        rho, k = corr[key]
        text += f"| {label} | {_num(rho, '+.2f')} | {k} |\n"
    return text, corr


# -- the chart -----------------------------------------------------------------------------------

def draw_chart(rows, path, title):
    """LRA's Figure 3 style: speed (× dense, log) against average accuracy, point area ∝ peak memory.

    Each point carries a number (moved to the nearest free spot, with a thin line, when another
    number is in the way); the numbered names stand in a column beside the axes, in the order of
    the points from top to bottom. Returns every label's bounding box (display units, the numbers
    first), for the overlap check."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.text import Text
    pts = [r for r in rows if r["avg"] is not None and r["speed"] is not None]
    pts.sort(key=lambda r: (-r["avg"], -r["speed"]))
    fig, ax = plt.subplots(figsize=(9.5, 6.2))
    fig.subplots_adjust(left=0.08, right=0.66, top=0.92, bottom=0.1)
    mb = np.array([r["mb"] for r in pts])
    area = 20 + 900 * mb / mb.max()
    x = np.array([r["speed"] for r in pts])
    y = np.array([r["avg"] for r in pts])
    lra = np.array([r["variant"] in LRA_NAMES for r in pts])
    ax.scatter(x[lra], y[lra], s=area[lra], alpha=0.45, color="tab:blue", edgecolor="k", lw=0.5,
               label="LRA's set")
    ax.scatter(x[~lra], y[~lra], s=area[~lra], alpha=0.45, color="tab:orange", edgecolor="k", lw=0.5,
               label="the engine and the rest of the registry")
    ax.set_xscale("log")
    ax.set_xlim(x.min() / 1.3, x.max() * 1.3)                       # fixed before the numbers are placed
    ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16, 32) if x.min() / 1.3 <= t <= x.max() * 1.3]
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda t, _: f"{t:g}×"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(y.min() - 0.06 * (np.ptp(y) + 10), y.max() + 0.06 * (np.ptp(y) + 10))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts, placed = [], []
    offsets = [(0, 0)] + [(r * np.cos(a), r * np.sin(a)) for r in (11, 17, 24, 32)
                          for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)]
    for i, (xi, yi) in enumerate(zip(x, y), 1):     # the number on its point, else the nearest free spot
        for dx, dy in offsets:
            t = ax.annotate(str(i), (xi, yi), xytext=(dx, dy), textcoords="offset points", fontsize=6.5,
                            ha="center", va="center", bbox=dict(boxstyle="round,pad=0.1", fc="white",
                                                                ec="none", alpha=0.75),
                            arrowprops=None if (dx, dy) == (0, 0) else dict(arrowstyle="-", lw=0.4))
            t.update_positions(renderer)
            box = Text.get_window_extent(t, renderer)                 # the text, without its line
            if not overlaps(placed + [box]) or (dx, dy) == offsets[-1]:
                break                                                # (the last try stays: the check reports it)
            t.remove()
        placed.append(box)
        texts.append(t)
    ax.set_xlabel("speed: training steps per second relative to dense (log scale)")
    ax.set_ylabel("average accuracy over the three tasks (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=7, markerscale=0.4)
    ax.grid(alpha=0.3)
    step = min(0.027, 0.96 / max(len(pts), 1))
    for i, r in enumerate(pts, 1):
        texts.append(fig.text(0.68, 0.95 - i * step, f"{i:>2}  {r['variant']}  ({r['avg']:.0f} %, "
                              f"{r['speed']:.2f}×, {r['mb']:.0f} MB)", fontsize=7, family="monospace",
                              va="top"))
    fig.text(0.68, 0.955, "  #  variant  (avg, speed, peak memory)", fontsize=7, family="monospace",
             va="bottom", weight="bold")
    fig.canvas.draw()
    for t in texts[:len(pts)]:
        t.update_positions(renderer)
    boxes = [Text.get_window_extent(t, renderer) for t in texts]   # the numbers, then the names
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return boxes


def overlaps(boxes):
    """Pairs of boxes that overlap (by more than a pixel)."""
    bad = []
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            if min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1:
                bad.append((i, j))
    return bad


# -- main --------------------------------------------------------------------------------------

def _jobs(args, variants, seeds):
    """Split the runs over worker processes (one BLAS thread each) and merge their records."""
    units = [(s, t) for s in seeds for t in args.tasks]                  # seed-major: balanced halves
    shards = [units[i::args.jobs] for i in range(args.jobs)]
    tmp = tempfile.mkdtemp(prefix="lra_")
    procs = []
    for i, shard in enumerate(shards):
        out = os.path.join(tmp, f"shard{i}.json")
        tasks = sorted({t for _, t in shard}, key=args.tasks.index)
        shard_seeds = sorted({s for s, _ in shard})
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--n", str(args.n), "--steps",
               str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr), "--eval-size", str(args.eval_size),
               "--blas-threads", "1", "--json", out, "--only", json.dumps(shard),
               "--tasks", *tasks, "--seeds", *map(str, shard_seeds), "--variants", *variants]
        env = dict(os.environ, NUMBA_NUM_THREADS="1")                 # one core per worker
        procs.append((subprocess.Popen(cmd, env=env), out))
        print(f"worker {i}: {len(shard)} (seed, task) units, records in {out}", file=sys.stderr, flush=True)
    records = []
    for p, out in procs:
        if p.wait() != 0:
            print(f"worker {out} exited with status {p.returncode}", file=sys.stderr)
        if os.path.exists(out):
            records += json.load(open(out))
    order = {(t, v, s): i for i, (t, v, s) in enumerate((t, v, s) for t in args.tasks for v in variants
                                                            for s in seeds)}
    records.sort(key=lambda r: order.get((r["task"], r["variant"], r["seed"]), len(order)))
    return records


def write_outputs(records, args, header):
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    rows = summary(records, tasks)
    table = results_table(rows, tasks)
    paper, corr = paper_table(rows)
    errors = [f"- `{r['variant']}` on {r['task']} (seed {r['seed']}): {r['error']}" for r in records
              if r.get("error")]
    dense = next((r for r in rows if r["variant"] == "dense" and r["ms"]), None)
    ref = (f"; dense: {dense['ms']:.0f} ms a step, {dense['mb']:.0f} MB peak traced memory" if dense else "")
    text = (header + "\n\n" + table + "\n\nAccuracy: mean over the seeds ± half their range; speed: dense's "
            "median time per training step over the variant's (> 1 is faster); memory: the variant's peak "
            f"traced memory of one step over dense's{ref}. ¹ the variant standing for one of LRA's models.\n")
    if errors:
        text += "\nRuns that failed:\n\n" + "\n".join(errors) + "\n"
    text += "\n### Beside the paper\n\n" + paper
    print(text)
    if args.json:
        bench.write_json(args.json, records)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(text)
    if args.chart:
        n = sorted({r["n"] for r in records})
        budget = sorted({(r["steps"], r["batch"]) for r in records})
        title = (f"{len(tasks)} tasks, N = {', '.join(map(str, n))}, "
                 f"{' / '.join(f'{s} steps × {b}' for s, b in budget)}, 2 blocks, mean of "
                 f"{len({r['seed'] for r in records})} seeds; point area ∝ peak memory")
        boxes = draw_chart(rows, args.chart, title)
        bad = overlaps(boxes)
        if bad:
            raise RuntimeError(f"chart labels overlap: {bad}")
    return rows, corr


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 64, 6 steps, 3 variants, 1 seed (seconds)")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=300, help="Adam steps per run (default 300)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    p.add_argument("--lr", type=float, default=LR, help=f"Adam's learning rate (default {LR:g})")
    p.add_argument("--eval-size", type=int, default=512, help="test sequences per task (default 512)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help="default: every non-causal variant (LRA's set, the engine, the rest)")
    p.add_argument("--lra-set", action="store_true", help="only LRA's set and the engine's patterns")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one BLAS thread each)")
    p.add_argument("--only", help=argparse.SUPPRESS)           # a worker's [(seed, task), ...]
    p.add_argument("--json", metavar="FILE", help="the records (default with --jobs: docs/lra_results.json)")
    p.add_argument("--markdown", metavar="FILE")
    p.add_argument("--chart", metavar="PNG")
    p.add_argument("--blas-threads", type=int, metavar="T", help="limit BLAS to T threads (threadpoolctl)")
    p.add_argument("--from-json", nargs="+", metavar="FILE", help="no training: tables and chart from records")
    p.add_argument("--timing-rounds", type=int, default=5, metavar="R",
                   help="after training, time every run's step again in R interleaved rounds (default 5; 0: "
                        "keep the training's own step times); with --from-json only when given")
    args = p.parse_args(argv)
    if args.blas_threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=args.blas_threads, user_api="blas")
        ea.config.THREADS = args.blas_threads                         # the banded cores' threads too
    if args.quick:
        args.n, args.steps, args.batch, args.eval_size, args.seeds = 64, 6, 4, 32, [0]
        args.variants = args.variants or ["dense", "local", "linear_elu"]
    variants = args.variants or default_variants(not args.lra_set)
    for name in variants:
        ea.get_variant(name)                                         # unknown names fail here
    budget = (f"N = {args.n}, {args.steps} Adam steps (lr {args.lr:g}) of batch {args.batch} per run, "
              f"d = {D}, {HEADS} heads, {LAYERS} pre-norm blocks, float32, seeds {args.seeds}, "
              f"{args.eval_size} test sequences per task")
    if args.from_json:
        records = [r for path in args.from_json for r in json.load(open(path))]
        budgets = sorted({(r["n"], r["steps"], r["batch"]) for r in records})
        header = (bench.machine_header() + "\n- records: " + ", ".join(f"`{pathlib.Path(q).name}`"
                                                                  for q in args.from_json)
                  + "; " + "; ".join(f"N = {n}, {st} Adam steps of batch {b} per run" for n, st, b in budgets)
                  + f", seeds {sorted({r['seed'] for r in records})}, d = {D}, {HEADS} heads, {LAYERS} "
                  f"pre-norm blocks, float32")
        if "--timing-rounds" in (argv if argv is not None else sys.argv) and args.timing_rounds > 0:
            retime(records, args.timing_rounds)
        rounds = sorted({r["timing_rounds"] for r in records if "timing_rounds" in r})
        header += ("\n- step times: every run's step timed again after training, "
                   f"{', '.join(map(str, rounds))} rounds side by side in one process on one thread (the medians)"
                   if rounds else "\n- step times: the medians over the training steps")
        write_outputs(records, args, header)
        return 0
    t_start = time.perf_counter()
    if args.jobs > 1:
        records = _jobs(args, variants, args.seeds)
    else:
        units = ([tuple(u) for u in json.loads(args.only)] if args.only else
                 [(s, t) for s in args.seeds for t in args.tasks])
        records = []
        for name in variants:                  # variant-major: a run cut short loses whole variants
            for seed, task in units:
                rec = run(task, name, args.n, seed, steps=args.steps, batch=args.batch,
                          eval_size=args.eval_size, lr=args.lr)
                records.append(rec)
                if args.json:                  # after every run: a long run's records survive
                    bench.write_json(args.json, records)
                print(f"  {task} {name} seed {seed}: " +
                      (f"acc {rec['accuracy']:.3f}, {rec['ms_per_step']:.1f} ms/step, loss "
                       f"{rec['first_loss']:.2f} -> {rec['last_loss']:.2f}" if rec.get("error") is None
                       else rec["error"]), file=sys.stderr, flush=True)
        if args.only:                          # a worker: the parent merges and writes the rest
            return 0
    if args.quick:
        args.timing_rounds = min(args.timing_rounds, 2)
    if args.timing_rounds > 0:
        retime(records, args.timing_rounds)
    wall = time.perf_counter() - t_start
    workers = (f"{args.jobs} worker processes side by side, one BLAS and one numba thread each" if args.jobs > 1
               else "one process")
    timing = (f"step times: every run's step again after training, {args.timing_rounds} rounds side by side "
              "in one process on one thread (the medians)" if args.timing_rounds > 0
              else "step times: the medians over the training steps")
    header = (bench.machine_header() + f"\n- {budget}\n- {timing}\n- wall time of the run: {wall / 60:.1f} min "
              f"({workers})")
    write_outputs(records, args, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
