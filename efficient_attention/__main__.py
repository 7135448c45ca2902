"""The main command: time every registered variant and check it against the oracle.

``python -m efficient_attention`` (or ``efficient-attention``) runs, for every
registered attention core, a forward and a forward+backward pass on random
float32 inputs at N = 1024 and 4096 (d = 64), and prints one Markdown table:
median times, GFLOP/s on the useful FLOPs of ``cost()``, the fraction of this
machine's GEMM peak, peak traced memory, and the relative error of the output
and gradients against the float64 dense oracle (masked with the variant's
pattern where the variant is exact, unmasked where it approximates).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m efficient_attention",
        description="Time every registered efficient-attention variant (forward and backward) "
                    "and check it against the dense oracle.")
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096], metavar="N",
                   help="sequence lengths (default: 1024 4096)")
    p.add_argument("--d", type=int, default=64, help="query/key and value width (default: 64)")
    p.add_argument("--heads", type=int, default=2, help="independent heads per call (default: 2)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the median is shown")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help="only these registered variants (default: all; see --list)")
    p.add_argument("--list", action="store_true", help="list the registered variants and exit")
    p.add_argument("--no-peak", action="store_true", help="skip measuring the GEMM peak")
    p.add_argument("--blas-threads", type=int, metavar="T",
                   help="limit BLAS to T threads (threadpoolctl) while timing; on a busy machine one "
                        "thread avoids OpenBLAS's spin-waiting on small products")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import efficient_attention as ea
    from efficient_attention import bench

    variants = ea.registry()
    if args.list:
        print(bench.markdown_table([{"name": v.name, "chapter": v.chapter, "kind": v.kind,
                                     "class": v.cls.__name__, "config": v.config or "",
                                     "description": v.description} for v in variants.values()]))
        return 0
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            print(f"error: unknown variants {unknown}; registered: {sorted(variants)}", file=sys.stderr)
            return 2
        variants = {n: variants[n] for n in args.variants}
    for name, value in (("--d", args.d), ("--heads", args.heads), ("--repeat", args.repeat)):
        if value < 1:
            print(f"error: {name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if any(n < 1 for n in args.n):
        print(f"error: --n values must be >= 1, got {args.n}", file=sys.stderr)
        return 2

    if args.blas_threads is not None and args.blas_threads < 1:
        print(f"error: --blas-threads must be >= 1, got {args.blas_threads}", file=sys.stderr)
        return 2
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(limits=args.blas_threads, user_api="blas"):
            return _run(args, variants)
    return _run(args, variants)


def _run(args, variants) -> int:
    from efficient_attention import bench

    t_start = time.perf_counter()
    peak = None if args.no_peak else bench.gemm_peak()
    print("# efficient_attention: every registered variant, forward and backward\n")
    print(bench.machine_header(with_peak=peak is not None))
    if args.blas_threads is not None:
        print(f"- BLAS limited to {args.blas_threads} thread(s) while timing (--blas-threads)")
    print(f"- inputs: {args.dtype}, d = dv = {args.d}, {args.heads} heads, standard normal; "
          f"times are medians of {args.repeat} runs after a warm-up; errors are relative "
          "(Frobenius) against the float64 dense oracle on the first head: masked like the variant "
          "(exact variants), or the attention it approximates (approx.: the error is the "
          "approximation's)\n")
    rows = []
    for name, variant in variants.items():
        if variant.kind != "core":
            continue   # sequence layers have their own benchmark (benchmarks/)
        for n in args.n:
            core = variant.build(n=n, d=args.d, dv=args.d, seed=0)
            row = {"variant": name, **bench.bench_core(
                core, n, args.d, args.d, heads=args.heads, dtype=np.dtype(args.dtype),
                repeat=args.repeat, exact=variant.exact, peak=peak)}
            rows.append(row)
            print(f"  {name} N={n}: fwd+bwd {row['fwd+bwd ms']:.1f} ms", file=sys.stderr, flush=True)
    cols = ["variant", "N", "fwd ms", "fwd+bwd ms", "fwd GFLOP/s", "fwd+bwd GFLOP/s"]
    cols += (["% peak"] if peak else []) + ["peak MB", "err out", "err grad", "oracle"]
    print(bench.markdown_table(rows, cols))
    print(f"\n(total {time.perf_counter() - t_start:.1f} s)")
    if args.json:
        bench.write_json(args.json, {"args": vars(args), "gemm_peak": peak, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
