"""A small long-range benchmark that trains every registered variant.

    python benchmarks/bench_long_range.py [--quick] [--n 1024 4096] [--steps 150]
                                    [--variants NAME ...] [--json FILE] [--chart PNG]

**Task (marker retrieval).** A sequence of N tokens: noise tokens drawn
uniformly from 16 symbols, one *label token* (one of C = 4 classes) at a
random position in the first half, and a *query token* at the last position.
The class is the label token's; the model must carry it from wherever it is
(at least N/2 positions away) to the last position. A variant that cannot
see that far (a local window) stays at chance (25 %); the task needs content-
based long-range retrieval, which every "efficient" variant claims to keep.

**Model.** Token embedding (V × D) plus a type embedding (query / label /
noise, like BERT's segment embeddings, so that "this is a label" is one
learnable direction shared by the classes) → one sequence layer with a residual
(``y = h + layer(h)``; for attention cores: ``MultiHeadAttention`` with the
variant's core on every head) → the last position's vector → linear
classifier. Trained with the library's own backward passes and Adam written
in NumPy (lr 5e-3, batch 16 by default), float32, fixed seeds (data, parameters and
variants): the same command gives the same numbers up to floating-point
summation order.

**Reported**: test accuracy on 512 fresh sequences, median training time per
step (forward + backward + Adam), peak traced memory of one step, and the
lecture's chart: speed on one axis, accuracy on the other, memory as the size
of each point (``--chart``).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import efficient_attention as ea
from efficient_attention import bench

N_CLASSES = 4
N_NOISE = 16
QUERY = 0                                   # token ids: 0 query, 1..C labels, C+1.. noise
VOCAB = 1 + N_CLASSES + N_NOISE
TYPE_OF = np.array([0] + [1] * N_CLASSES + [2] * N_NOISE)   # token id -> type: query, label, noise


COLUMNS = ["variant", "N", "steps", "batch", "accuracy", "ms/step", "peak MB", "first loss", "last loss",
           "error"]


def _budget_from(payload):
    """``(steps, batch)`` of an earlier --json run (rows written before these columns existed
    take them from the run's command line)."""
    words = str(payload.get("command", "")).split()
    batch = int(words[words.index("--batch") + 1]) if "--batch" in words else 16
    return payload.get("steps"), batch


def make_batch(rng, batch, n):
    """Tokens (B, N) and labels (B,) of the marker-retrieval task."""
    tokens = rng.integers(1 + N_CLASSES, VOCAB, size=(batch, n))
    labels = rng.integers(0, N_CLASSES, size=batch)
    pos = rng.integers(0, n // 2, size=batch)
    tokens[np.arange(batch), pos] = 1 + labels
    tokens[:, -1] = QUERY
    return tokens, labels


class Model:
    """Embedding -> residual sequence layer -> last position -> linear classifier."""

    def __init__(self, layer, d, seed):
        rng = np.random.default_rng(seed)
        self.layer = layer
        self.emb = rng.standard_normal((VOCAB, d))
        self.type_emb = rng.standard_normal((3, d))                 # query / label / noise, as BERT's segments
        self.w = rng.standard_normal((d, N_CLASSES)) / np.sqrt(d)
        self.b = np.zeros(N_CLASSES)

    @property
    def params(self):
        return {"emb": self.emb, "type_emb": self.type_emb, "w": self.w, "b": self.b,
                **{f"layer.{k}": v for k, v in self.layer.params.items()}}

    def logits(self, tokens):
        h = (self.emb[tokens] + self.type_emb[TYPE_OF[tokens]]).astype(np.float32)   # (B, N, D)
        y, cache = self.layer.forward(h)
        z = h[:, -1] + y[:, -1]                                     # residual, last position (B, D)
        return z @ self.w.astype(np.float32) + self.b, (tokens, h, cache, z)

    def loss_and_grads(self, tokens, labels):
        logits, (tokens, h, cache, z) = self.logits(tokens)
        logits = logits.astype(np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        batch = len(labels)
        loss = -np.mean(np.log(p[np.arange(batch), labels] + 1e-30))
        dlogits = p.copy()
        dlogits[np.arange(batch), labels] -= 1
        dlogits /= batch                                            # d(mean CE)/dlogits
        grads = {"w": z.astype(np.float64).T @ dlogits, "b": dlogits.sum(0)}
        dz = (dlogits @ self.w.T).astype(np.float32)                # (B, D)
        dy = np.zeros_like(h)
        dy[:, -1] = dz
        lg = self.layer.backward(cache, dy)
        dh = lg.dx
        dh[:, -1] += dz                                             # the residual path
        dh = dh.astype(np.float64)
        demb = np.zeros_like(self.emb)
        np.add.at(demb, tokens, dh)                                 # scatter into the embedding rows
        dtype_emb = np.zeros_like(self.type_emb)
        np.add.at(dtype_emb, TYPE_OF[tokens], dh)
        grads["emb"], grads["type_emb"] = demb, dtype_emb
        grads.update({f"layer.{k}": v for k, v in lg.params.items()})
        return loss, grads


class Adam:
    def __init__(self, params, lr=5e-3, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m = {k: np.zeros_like(v, dtype=np.float64) for k, v in params.items()}
        self.v = {k: np.zeros_like(v, dtype=np.float64) for k, v in params.items()}

    def step(self, params, grads):
        self.t += 1
        for k, p in params.items():
            g = np.asarray(grads[k], dtype=np.float64)
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            mhat = self.m[k] / (1 - self.b1 ** self.t)
            vhat = self.v[k] / (1 - self.b2 ** self.t)
            p -= (self.lr * mhat / (np.sqrt(vhat) + self.eps)).astype(p.dtype)   # in place: live arrays


def build_layer(variant, n, d, heads, seed):
    from efficient_attention.layers import MultiHeadAttention
    if variant.kind == "layer":
        return variant.build(n=n, d=d, seed=seed)
    dk = d // heads
    cores = [variant.build(n=n, d=dk, dv=dk, seed=seed + h) for h in range(heads)]
    return MultiHeadAttention.init(n=n, d=d, seed=seed, heads=heads, cores=cores)


def train_variant(variant, n, *, steps, d=32, heads=2, batch=16, lr=5e-3, seed=0, eval_size=512):
    layer = build_layer(variant, n, d, heads, seed)
    model = Model(layer, d, seed)
    opt = Adam(model.params, lr)
    data_rng = np.random.default_rng(1000 + seed)
    times, losses = [], []
    for _ in range(steps):
        tokens, labels = make_batch(data_rng, batch, n)
        t0 = time.perf_counter()
        loss, grads = model.loss_and_grads(tokens, labels)
        opt.step(model.params, grads)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    tokens, labels = make_batch(data_rng, batch, n)
    peak = bench.traced_peak(lambda: model.loss_and_grads(tokens, labels))
    test_rng = np.random.default_rng(123456)
    correct = 0
    for start in range(0, eval_size, batch):
        tokens, labels = make_batch(test_rng, min(batch, eval_size - start), n)
        correct += int(np.sum(np.argmax(model.logits(tokens)[0], 1) == labels))
    return {
        "accuracy": correct / eval_size,
        "ms/step": 1e3 * float(np.median(times[1:] if len(times) > 1 else times)),
        "peak MB": peak / 2**20,
        "first loss": float(np.mean(losses[:5])),
        "last loss": float(np.mean(losses[-10:])),
    }


def draw_chart(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.8), squeeze=False)
    best = {}                     # one point per (variant, N): the run with the largest budget
    for r in rows:
        if "accuracy" in r:
            key, budget = (r["variant"], r["N"]), (r.get("steps") or 0) * (r.get("batch") or 0)
            if key not in best or budget > best[key][0]:
                best[key] = (budget, r)
    for ax, n in zip(axes[0], sizes):
        rs = [r for (_, size), (_, r) in best.items() if size == n]
        if not rs:
            continue
        mem = np.array([r["peak MB"] for r in rs])
        area = 30 + 600 * mem / max(mem.max(), 1e-9)
        # sequences per second, so that rows trained with different batches compare
        speed = np.array([1e3 * (r.get("batch") or 1) / r["ms/step"] for r in rs])
        ax.scatter(speed, [100 * r["accuracy"] for r in rs], s=area, alpha=0.5)
        for r, x in zip(rs, speed):
            ax.annotate(r["variant"], (x, 100 * r["accuracy"]), fontsize=6, ha="center", va="bottom",
                        rotation=30)
        ax.set_xscale("log")
        ax.set_xlabel("speed (training sequences / s, log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.axhline(100 / N_CLASSES, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 105)                                         # the same scale on every panel
        ax.set_title(f"marker retrieval, N = {n} (point area ∝ peak memory)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 64, 30 steps, a few variants (seconds)")
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--variants", nargs="+", metavar="NAME")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--chart", metavar="PNG")
    p.add_argument("--markdown", metavar="FILE", help="also write the header and table as Markdown")
    p.add_argument("--batch", type=int, default=16, help="sequences per training step (default 16)")
    p.add_argument("--eval-size", type=int, default=512, help="test sequences (default 512)")
    p.add_argument("--blas-threads", type=int, metavar="T", help="limit BLAS to T threads (threadpoolctl)")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="no training: merge the rows of earlier --json runs into one table / chart")
    args = p.parse_args(argv)
    if args.blas_threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=args.blas_threads, user_api="blas")
    if args.from_json:
        import json
        rows, notes = [], []
        for path in args.from_json:
            payload = json.load(open(path))
            steps, batch = _budget_from(payload)
            rows += [{"steps": steps, "batch": batch, **r} for r in payload["rows"]]
            notes.append(f"- {path}: {payload.get('command', '?')}")
        table = bench.markdown_table(rows, COLUMNS)
        print("\n".join(notes) + "\n\n" + table)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write("Merged from:\n\n" + "\n".join(notes) + "\n\n" + table + "\n")
        if args.chart:
            draw_chart(rows, args.chart)
        return
    variants = ea.registry()
    names = args.variants or list(variants)
    if args.quick:
        sizes, steps = [64], 30
        names = args.variants or [n for n in ("dense", "local", "mha_dense") if n in variants]
    else:
        sizes, steps = args.n, args.steps
    header = (bench.machine_header() + f"\n- marker retrieval: C = {N_CLASSES} classes (chance "
              f"{100 / N_CLASSES:.0f} %), {steps} Adam steps of batch {args.batch}, d = 32, 2 heads, float32, "
              f"seeds fixed; accuracy on {args.eval_size} test sequences\n")
    print(header)
    rows = []
    for n in sizes:
        for name in names:
            row = {"variant": name, "N": n, "steps": steps, "batch": args.batch}
            try:
                row.update(train_variant(variants[name], n, steps=steps, batch=args.batch,
                                         eval_size=args.eval_size))
            except Exception as exc:              # report, do not hide: the row says what failed
                row["error"] = f"{type(exc).__name__}: {exc}"[:120]
            rows.append(row)
            if args.json:               # after every row, so a long run's partial results survive
                bench.write_json(args.json, {"rows": rows, "steps": steps, "command": " ".join(sys.argv)})
            print(f"  N={n} {name}: " + (f"acc {row['accuracy']:.3f}, {row['ms/step']:.1f} ms/step"
                                         if "accuracy" in row else row["error"]),
                  file=sys.stderr, flush=True)
    table = bench.markdown_table(rows, COLUMNS)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(f"Command: `python {' '.join(sys.argv)}`\n\n{header}\n{table}\n")
    if args.chart:
        draw_chart(rows, args.chart)
        print(f"\nchart: {args.chart}")


if __name__ == "__main__":
    main()
