"""Chapter 1 benchmark: banded local / strided attention, speed and memory.

fp32, d = 64, 8 heads, window 256 (513 keys per query), N = 4096 … 65536, forward and
forward+backward; beside it, in the same run, dense masked NumPy attention (one head at a time,
where the N x N matrix fits) and a PyTorch-based local attention when one is installed.
GFLOP/s are on the useful FLOPs of ``core.cost()`` (exact count of the band's pairs), the
fraction is of this machine's fp32 GEMM peak (``bench.gemm_peak()``, measured in a subprocess
without the OpenBLAS override variables), and ``x(N/4->N)`` is the forward+backward time ratio
to a quarter of the length (linear time gives 4). One head at N = 2^20 is run forward+backward
in a subprocess to measure the whole-process peak RSS.

    python benchmarks/bench_patterns.py            # full sizes (minutes)
    python benchmarks/bench_patterns.py --quick    # tiny sizes (seconds)

Targets (the project's goals for the banded local core: a good share of the machine's compute,
time linear in N, a million tokens in bounded memory, and faster than a PyTorch peer):
fwd+bwd at N = 16384 >= 25% of the fp32 GEMM peak; N -> 4N costs <= 4.4x; peak RSS < 2 GB for
one head at N = 2^20 (fwd+bwd); >= 2x faster than a PyTorch peer (when one is installed).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

from efficient_attention import bench
from efficient_attention.dense import DenseAttention
from efficient_attention.local import LocalAttention, StridedAttention

RSS_CODE = r"""
import time, numpy as np
from efficient_attention.local import LocalAttention
n, d, window = {n}, {d}, {window}
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, n, d), dtype=np.float32) for _ in range(3))
core = LocalAttention(window)
t0 = time.perf_counter()
out, cache = core.forward(q, k, v)
t1 = time.perf_counter()
del out                                     # consumed by the next layer; backward needs only the cache
dout = rng.standard_normal((1, n, d), dtype=np.float32)
t2 = time.perf_counter()
grads = core.backward(cache, dout)
t3 = time.perf_counter()
print("times", t1 - t0, t3 - t2)
""" + "\n" + r"""
print("hwm", [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0])
"""

BASE_CODE = r"""
import efficient_attention.local
print("hwm", [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0])
"""


def measure_rss(n, d, window):
    """Peak RSS of one head's fwd+bwd in a fresh process. ``bench.peak_rss`` reads ru_maxrss,
    which on Linux starts from the *parent's* high-water mark across fork/exec; the child's own
    VmHWM (/proc/self/status, reset at exec) is reported beside it and used for the target."""
    def hwm(res):
        return int([ln for ln in res["stdout"].splitlines() if ln.startswith("hwm")][-1].split()[1]) / 1024
    res = bench.peak_rss(RSS_CODE.format(n=n, d=d, window=window))
    base = bench.peak_rss(BASE_CODE)
    times = [ln for ln in res["stdout"].splitlines() if ln.startswith("times")][-1]
    t_f, t_b = (float(x) for x in times.split()[1:])
    peak = hwm(res)
    return {"N": n, "heads": 1, "peak RSS MiB": peak, "peak RSS GB": peak * 2**20 / 1e9,
            "ru_maxrss MiB": res["peak_rss_mb"], "fwd s": t_f, "bwd s": t_b,
            "arrays MiB": 7 * n * d * 4 / 2**20, "baseline MiB": hwm(base)}


def torch_peer():
    """A PyTorch local-attention peer if importable, else None (and why)."""
    if importlib.util.find_spec("torch") is None:
        return None, "torch not installed"
    if importlib.util.find_spec("local_attention") is None:
        return None, "local-attention (lucidrains) not installed"
    import local_attention
    import torch
    return "local_attention", (f"local-attention {getattr(local_attention, '__version__', '')} on torch "
                               f"{torch.__version__}, {os.cpu_count()} threads (pip install torch==2.13.0 "
                               "local-attention)")


def peer_times(n, d, heads, window, causal, repeat):
    """lucidrains' ``local-attention`` (PyTorch) on the same inputs and the same band: with
    ``exact_windowsize=True``, ``look_backward=1`` and ``look_forward=1`` (0 when causal) a query
    attends to exactly the keys with ``|i - j| <= window_size`` (causal: ``0 <= i - j``), as ours;
    it computes the scores of 3 (causal: 2) whole buckets of ``window_size`` keys and masks them.
    Returns (forward s, forward+backward s, max |difference| of the outputs)."""
    import torch
    from local_attention import LocalAttention as TorchLocal
    torch.set_num_threads(os.cpu_count() or 1)
    q, k, v, g = bench.random_qkv((heads,), n, d)
    peer = TorchLocal(window_size=window, causal=causal, look_backward=1, look_forward=0 if causal else 1,
                      exact_windowsize=True, use_rotary_pos_emb=False, autopad=True)
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    tg = torch.from_numpy(g)

    def fwd():
        with torch.no_grad():
            return peer(tq, tk, tv)

    def fwd_bwd():
        tq.grad = tk.grad = tv.grad = None
        peer(tq, tk, tv).backward(tg)
    diff = float(np.abs(fwd().numpy() - LocalAttention(window, causal=causal)(q, k, v)).max())
    return bench.median_time(fwd, repeat, 1), bench.median_time(fwd_bwd, repeat, 1), diff


def dense_masked_row(core, n, d, heads, repeat):
    """Dense masked NumPy attention on the same inputs, one head at a time (so N x N fits)."""
    q, k, v, g = bench.random_qkv((heads,), n, d)
    mask = core.dense_mask(n, n)
    dense = DenseAttention(scale=core.scale)

    def fwd():
        for h in range(heads):
            dense.forward(q[h], k[h], v[h], mask=mask)

    def fwd_bwd():
        for h in range(heads):
            out, cache = dense.forward(q[h], k[h], v[h], mask=mask)
            dense.backward(cache, g[h])
    return bench.median_time(fwd, repeat, 0), bench.median_time(fwd_bwd, repeat, 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--dense-max", type=int, default=8192, help="largest N for the dense comparison")
    p.add_argument("--no-rss", action="store_true", help="skip the 2^20 RSS subprocess")
    p.add_argument("--rss-only", action="store_true", help="only the 2^20 RSS subprocess")
    p.add_argument("--sizes", type=int, nargs="+", metavar="N", help="override the sequence lengths")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these rows (local, local_causal, strided)")
    args = p.parse_args(argv)

    if args.quick:
        sizes, heads, d, window, stride, rss_n, repeat = [256, 1024], 2, 32, 16, 2, 1 << 14, 1
    else:
        sizes, heads, d, window, stride = [4096, 8192, 16384, 32768, 65536], 8, 64, 256, 4
        rss_n, repeat = 1 << 20, 5

    peak = None if args.quick else bench.gemm_peak()           # --quick: no peak (it takes seconds)
    print("# Banded local / strided attention (chapter 1)\n")
    print(bench.machine_header(with_peak=not args.quick))
    if args.quick:
        print("- --quick: GEMM peak not measured, no fraction of peak")
    else:
        print("- the GEMM peak is measured again after the timings; the fractions use the larger of "
              "the two (the machine is shared: a busy moment lowers a measurement, never raises it)")
    print(f"- fp32, d = {d}, {heads} heads, window {window} ({2 * window + 1} keys per query away "
          f"from the edges); strided: stride {stride}, window {window}")
    peer, why = torch_peer()
    print(f"- PyTorch peer: {why}" + ("" if peer else " (no peer row)"))
    print("- machine shared with other jobs while measuring; medians of "
          f"{repeat} runs (N <= 16384) / {max(1, repeat - 2)} run(s) above\n")

    if args.sizes:
        sizes = args.sizes
    rss = None
    if not args.no_rss:                     # first, while this process is small (see measure_rss)
        rss = measure_rss(rss_n, d, window)
    if args.rss_only:
        sizes = []

    cores = {
        "local": LocalAttention(window),
        "local_causal": LocalAttention(window, causal=True),
        f"strided r={stride}": StridedAttention(stride, window=window),
    }
    if args.only:
        cores = {name: core for name, core in cores.items() if name.split()[0] in args.only}
    rows = []
    t0 = time.perf_counter()
    for name, core in cores.items():
        prev = {}
        for n in sizes:
            rep = repeat if n <= 16384 else max(1, repeat - 2)
            row = bench.bench_core(core, n, d=d, heads=heads, repeat=rep, warmup=1 if n <= 16384 else 0,
                                   check=n <= 4096, peak=peak)
            row = {"variant": name, **row}
            nnz = core.cost(n, d).flops // (2 * (2 * d))
            row["keys/query"] = nnz / n
            row["x(N/4->N)"] = row["fwd+bwd ms"] / prev[n // 4] if n // 4 in prev else None
            prev[n] = row["fwd+bwd ms"]
            if peer and name in ("local", "local_causal"):
                tf, tfb, diff = peer_times(n, d, heads, window, name == "local_causal", rep)
                row["peer fwd+bwd ms"] = 1e3 * tfb
                row["peer / ours"] = 1e3 * tfb / row["fwd+bwd ms"]
                row["peer max|diff|"] = diff
            if n <= args.dense_max:
                tf, tfb = dense_masked_row(core, n, d, heads, 1)
                row["dense fwd+bwd ms"] = 1e3 * tfb
                row["speedup vs dense"] = 1e3 * tfb / row["fwd+bwd ms"]
            rows.append(row)
            print(f"  {name} N={n}: fwd+bwd {row['fwd+bwd ms']:.0f} ms", file=sys.stderr)
    if not args.quick:                                          # measure the peak again, after the timings
        bench._GEMM_CACHE.clear()
        again = bench.gemm_peak()
        best = max(peak["float32"], again["float32"])
        print(f"- GEMM peak float32: {peak['float32']:.1f} GFLOP/s before, {again['float32']:.1f} GFLOP/s "
              f"after the timings (kernel {again['kernel']}, {again['threads']} threads); fractions use "
              f"{best:.1f}\n")
        for row in rows:
            row["% peak"] = 100 * row["fwd+bwd GFLOP/s"] / best
        peak = {**again, "float32": best}
    cols = ["variant", "N", "keys/query", "fwd ms", "fwd+bwd ms", "fwd GFLOP/s", "fwd+bwd GFLOP/s",
            "% peak", "x(N/4->N)", "peak MB", "dense fwd+bwd ms", "speedup vs dense", "err out", "err grad"]
    if peer:
        cols += ["peer fwd+bwd ms", "peer / ours", "peer max|diff|"]
    print(bench.markdown_table(rows, cols))

    if rss is not None:
        print(f"\nOne head, N = {rss_n}, d = {d}, window {window}, fwd+bwd in a fresh process "
              "(the output is released before backward; q, k, v, dout, dq, dk, dv alive = "
              f"{rss['arrays MiB']:.0f} MiB; peak RSS = the child's VmHWM):\n")
        print(bench.markdown_table([rss]))

    # the project's targets (module docstring), judged on this run
    print("\nTargets" + (" (--quick: tiny sizes, NOT the sizes the targets are set for; shown only to exercise "
                          "the script):" if args.quick else ":"))
    at = [r for r in rows if r["variant"] == "local" and r["N"] == 16384]
    if at:
        print(f"- fwd+bwd at N = 16384 >= 25% of fp32 GEMM peak: {at[0]['% peak']:.1f}% "
              f"-> {'met' if at[0]['% peak'] >= 25 else 'NOT met'}")
    ratios = [r["x(N/4->N)"] for r in rows if r["x(N/4->N)"] is not None]
    if ratios:
        print(f"- N -> 4N costs <= 4.4x: worst {max(ratios):.2f}x -> "
              f"{'met' if max(ratios) <= 4.4 else 'NOT met'}")
    if rss is not None:
        gib = rss["peak RSS MiB"] / 1024
        print(f"- peak RSS < 2 GB at N = {rss_n}: {rss['peak RSS MiB']:.0f} MiB = {gib:.3f} GiB = "
              f"{rss['peak RSS GB']:.3f} GB (1e9 B) -> {'met' if gib < 2 else 'NOT met'} in GiB, "
              f"{'met' if rss['peak RSS GB'] < 2 else 'NOT met'} in 1e9 B; the seven N x d float32 arrays "
              f"alone are {rss['arrays MiB']:.0f} MiB, importing the package "
              f"{rss['baseline MiB']:.0f} MiB")
    peer_ratios = [r["peer / ours"] for r in rows if r.get("peer / ours") is not None]
    if peer_ratios:
        print(f"- >= 2x faster than the PyTorch peer (local-attention, same band) fwd+bwd: worst "
              f"{min(peer_ratios):.2f}x, best {max(peer_ratios):.2f}x -> "
              f"{'met' if min(peer_ratios) >= 2 else 'NOT met'}")
    else:
        print(f"- >= 2x faster than a PyTorch peer: not measured ({why})")
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    if args.json:
        bench.write_json(args.json, {"rows": rows, "rss": rss, "peak": peak, "peer": why})
    return 0


if __name__ == "__main__":
    sys.exit(main())
