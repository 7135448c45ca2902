"""Chapter 3 benchmark: Linformer and memory-compressed attention at long N.

float32, d = dv = 64, 8 heads, forward and forward+backward (median times),
peak traced memory of one forward+backward, and the growth factor of time
and memory from N/4 to N (linear cost: at most 4.4x). Rows:

* ``linformer``: K = 256 projected keys (E, F of shape (256, N), float32);
* ``compressed c=3``: the paper's convolution, K = N/3 compressed keys, so
  its attention is quadratic in N (c times cheaper than dense): it is run at
  the smaller lengths only, and its growth factor shows it;
* ``compressed c=N/256``: the same layer with the window widened with N so
  that K = 256 stays fixed (linear, for comparison with Linformer);
* ``dense``: the oracle, where its N x N matrices fit (N <= 4096 here);
* a PyTorch Linformer, when ``torch`` and ``linformer`` are importable.

    python benchmarks/bench_lowrank.py [--quick] [--json FILE]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import harness
from efficient_attention import bench
from efficient_attention.dense import DenseAttention
from efficient_attention.lowrank import CompressedAttention, LinformerAttention


def _peers() -> str:
    try:
        import torch  # noqa: F401
    except ImportError:
        return "PyTorch is not installed: no PyTorch Linformer row."
    try:
        import linformer  # noqa: F401
    except ImportError:
        return "PyTorch is installed but the `linformer` package is not: no PyTorch Linformer row."
    return "PyTorch Linformer available but not benchmarked by this script (see the notes)."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--blas-threads", type=int, default=None,
                   help="limit BLAS threads (threadpoolctl); default: BLAS's own choice")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed rounds (median; each round times every size of a variant once, "
                        "after one warm-up round); default 3")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave the C allocator as it is (default: harness.retain_freed_memory(), so that "
                        "arrays of 32 MB or more are not fresh zeroed pages on every call)")
    args = p.parse_args(argv)
    if not args.default_malloc:
        harness.retain_freed_memory()
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=args.blas_threads, user_api="blas")

    if args.quick:
        d, heads, kp, c = 16, 2, 32, 3
        lin_ns = [256, 1024]
        comp_ns = [256, 1024]
        dense_max = 1024
    else:
        d, heads, kp, c = 64, 8, 256, 3
        lin_ns = [4096, 16384, 65536, 262144]
        comp_ns = [2048, 4096, 8192]
        dense_max = 4096

    dtype = np.float32
    print("# Chapter 3: no N x N matrix — Linformer and memory-compressed attention\n")
    print(bench.machine_header())
    print(harness.allocator_line())
    print(f"- inputs: float32, d = dv = {d}, {heads} heads, standard normal; parameters float32; "
          + f"times are medians of {args.repeat} rounds after a warm-up round; " +
          "a round times every size of a variant once, in turn (forward at each size, then "
          "forward+backward at each), so no call finds its inputs in cache from its own last "
          "repetition; " +
          "peak MB = traced NumPy allocations of one forward + backward (inputs excluded); "
          "x4N = ratio to the row with N/4 (linear cost: <= 4.4)")
    print(f"- {_peers()}\n")

    configs = [
        ("linformer K=%d" % kp, lin_ns, lambda n: LinformerAttention.init(n, kp, 0, dtype=dtype), lambda n: kp),
        ("compressed c=%d" % c, comp_ns, lambda n: CompressedAttention.init(d, d, c, 0, dtype=dtype),
         lambda n: -(-n // c)),
        ("compressed c=N/%d" % kp, lin_ns,
         lambda n: CompressedAttention.init(d, d, max(1, n // kp), 0, dtype=dtype),
         lambda n: -(-n // max(1, n // kp))),
        ("dense", [n for n in sorted(set(lin_ns + comp_ns)) if n <= dense_max], lambda n: DenseAttention(),
         lambda n: n),
    ]
    rows = []
    for label, ns, build, keys in configs:
        cores = {n: build(n) for n in ns}
        inputs = {n: bench.random_qkv((heads,), n, d, d, dtype, 0) for n in ns}   # every size's, at once
        times = harness.interleaved_fwd_bwd(cores, inputs, args.repeat)
        del inputs
        by_n = {}
        for n in ns:
            row = bench.bench_core(cores[n], n, d, d, heads=heads, dtype=dtype, check=False, times=times[n])
            row = {"variant": label, "K": keys(n), **row}
            prev = by_n.get(n // 4)
            row["time x4N"] = row["fwd+bwd ms"] / prev["fwd+bwd ms"] if prev else None
            row["mem x4N"] = row["peak MB"] / prev["peak MB"] if prev else None
            by_n[n] = row
            rows.append(row)
            print(f"  done: {label} N={n} ({row['fwd+bwd ms']:.0f} ms fwd+bwd)", file=sys.stderr, flush=True)
        harness.release_freed_memory()                # the next configuration starts from a lean heap
    cols = ["variant", "N", "K", "fwd ms", "fwd+bwd ms", "fwd+bwd GFLOP/s", "peak MB", "time x4N", "mem x4N"]
    print(bench.markdown_table(rows, cols))
    if args.json:
        bench.write_json(args.json, {"rows": rows, "machine": bench.machine_header()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
