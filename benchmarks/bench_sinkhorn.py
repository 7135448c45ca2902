"""Chapter 2 benchmark: Sparse Sinkhorn attention, forward and forward+backward.

    python benchmarks/bench_sinkhorn.py [--quick] [--json FILE] [--causal] [--sortcut K]
                                        [--blas-threads T] [--max-n N]

fp32, d = 64, 8 heads, block 64, N = 4096 ... 262144 (n_b = 64 ... 4096
blocks). Columns: median times; time per 1k tokens (flat while the cost is
linear in N); the time of the sort network alone (block sums, sort logits,
``n_iters`` Sinkhorn rounds) and of the sorted-block products ``P·K``,
``P·V`` — the two terms that grow like ``n_b²`` and ``n_b²·b·D``; the share
of the useful FLOPs in the ``n_b²`` term (from ``cost()``); peak traced
memory; and dense attention on the same inputs in the same run where it fits
(N <= 4096 with 8 heads: its N×N matrices take 0.5 GB each).
"""
import argparse
import contextlib
import time

import numpy as np

from efficient_attention import bench
from efficient_attention.dense import DenseAttention
from efficient_attention.sinkhorn import SinkhornAttention

DENSE_MAX_N = 4096


def _blas_limit(threads):
    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=threads, user_api="blas")


def time_core(core, q, k, v, dout, repeat, warmup, measure_peak=True):
    """Median fwd and fwd+bwd times (s) and the peak traced MB of one fwd+bwd."""
    times = []

    def fwd():
        core.forward(q, k, v)

    def fwd_bwd():
        t0 = time.perf_counter()
        _, cache = core.forward(q, k, v)
        core.backward(cache, dout)
        times.append(time.perf_counter() - t0)

    t_fwd = bench.median_time(fwd, repeat, warmup)
    for _ in range(warmup):
        fwd_bwd()
    times.clear()
    # the traced run counts as one timed sample (tracemalloc costs per allocation, not per FLOP)
    peak = bench.traced_peak(fwd_bwd) / 2**20 if measure_peak else float("nan")
    while len(times) < repeat:
        fwd_bwd()
    return t_fwd, float(np.median(times)), peak


def sort_terms(core, k, v, repeat):
    """Times (s) of the sort network (P from k) and of the products P·K, P·V alone."""
    p = core.sort_matrix(k)
    t_sort = bench.median_time(lambda: core.sort_matrix(k), repeat, 0)
    *batch, n, d = k.shape
    kb = k.reshape(*batch, core.n_blocks, -1)
    vb = v.reshape(*batch, core.n_blocks, -1)
    t_pk = bench.median_time(lambda: (p @ kb, p @ vb), repeat, 0)
    return t_sort, t_pk


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--sortcut", type=int, default=None)
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="limit BLAS threads (threadpoolctl); default: leave as configured")
    ap.add_argument("--max-n", type=int, default=262144)
    args = ap.parse_args(argv)
    if args.quick:
        sizes, heads, d, bs, n_iters = [64, 128, 256], 2, 16, 16, 8
    else:
        sizes, heads, d, bs, n_iters = [4096, 8192, 16384, 32768, 65536, 131072, 262144], 8, 64, 64, 8
        sizes = [n for n in sizes if n <= args.max_n]
    with _blas_limit(args.blas_threads):
        print(bench.machine_header())
        print(f"- SinkhornAttention(block_size={bs}, n_iters={n_iters}, causal={args.causal}, "
              f"sortcut={args.sortcut}), fp32, d = {d}, {heads} heads; dense attention where N <= "
              f"{DENSE_MAX_N if not args.quick else max(sizes)}\n")
        rows = []
        for n in sizes:
            nb = n // bs
            core = SinkhornAttention.init(bs, d, nb, seed=0, n_iters=n_iters, causal=args.causal,
                                          sortcut=args.sortcut)
            q, k, v, dout = bench.random_qkv((heads,), n, d)
            big = n >= 65536
            repeat, warmup = (1, 0) if big else (3, 1)
            t_fwd, t_fb, peak = time_core(core, q, k, v, dout, repeat, warmup)
            t_sort, t_pk = sort_terms(core, k, v, repeat)
            fwd_cost = core.cost(n, d, d)
            sorted_flops = 2 * nb * nb * bs * (d + d) + 2 * nb * d * nb
            row = {"N": n, "n_b": nb, "fwd ms": 1e3 * t_fwd, "fwd+bwd ms": 1e3 * t_fb,
                   "fwd+bwd ms / 1k tok": 1e3 * t_fb / (n / 1024),
                   "sort net ms": 1e3 * t_sort, "P·K, P·V ms": 1e3 * t_pk,
                   "n_b² FLOP share": sorted_flops / fwd_cost.flops,
                   "peak MB": peak}
            if n <= (DENSE_MAX_N if not args.quick else max(sizes)):
                dense = DenseAttention(causal=args.causal)
                d_fwd, d_fb, d_peak = time_core(dense, q, k, v, dout, 3, 1)
                row.update({"dense fwd ms": 1e3 * d_fwd, "dense fwd+bwd ms": 1e3 * d_fb,
                            "dense / ours (fwd+bwd)": d_fb / t_fb, "dense peak MB": d_peak})
            rows.append(row)
            print(f"  N = {n}: fwd {1e3 * t_fwd:.0f} ms, fwd+bwd {1e3 * t_fb:.0f} ms", flush=True)
    cols = ["N", "n_b", "fwd ms", "fwd+bwd ms", "fwd+bwd ms / 1k tok", "sort net ms", "P·K, P·V ms",
            "n_b² FLOP share", "peak MB", "dense fwd ms", "dense fwd+bwd ms", "dense / ours (fwd+bwd)",
            "dense peak MB"]
    print()
    print(bench.markdown_table(rows, cols))
    print("\n- peer: PyTorch sinkhorn-transformer is not a drop-in peer (different semantics, see PEERS.md); "
          "not timed")
    if args.json:
        bench.write_json(args.json, {"rows": rows, "blas_threads": args.blas_threads})


if __name__ == "__main__":
    main()
