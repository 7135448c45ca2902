"""Chapter 0 benchmark: the dense oracle, forward and forward+backward.

    python benchmarks/bench_dense.py [--quick] [--json FILE]

fp32, d = 64, 8 heads, N = 512 ... 4096: median times, GFLOP/s on the
useful FLOPs of ``cost()``, the fraction of this machine's fp32 GEMM peak
(measured in a subprocess without the OpenBLAS override variables), peak
traced memory, and, when PyTorch is installed, its
``scaled_dot_product_attention`` on the same inputs in the same run.
"""
import argparse

import numpy as np

import efficient_attention as ea
from efficient_attention import bench


def torch_peer():
    try:
        import torch
    except ImportError:
        return None

    def run(q, k, v, dout):
        tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
        out.backward(torch.from_numpy(dout))
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    sizes = [64, 128] if args.quick else [512, 1024, 2048, 4096]
    heads, d = (2, 16) if args.quick else (8, 64)
    peak = bench.gemm_peak()
    print(bench.machine_header(with_peak=True))
    peer = torch_peer()
    print(f"- peer: {'torch scaled_dot_product_attention' if peer else 'PyTorch not installed (no peer column)'}\n")
    rows = []
    for n in sizes:
        row = bench.bench_core(ea.DenseAttention(), n, d, heads=heads, repeat=3 if args.quick else 5,
                               peak=peak)
        if peer is not None:
            q, k, v, dout = bench.random_qkv((heads,), n, d)
            t = bench.median_time(lambda: peer(q, k, v, dout), 5)
            row["torch fwd+bwd ms"] = 1e3 * t
            row["ours / torch"] = row["fwd+bwd ms"] / row["torch fwd+bwd ms"]
        rows.append(row)
    cols = ["N", "fwd ms", "fwd+bwd ms", "fwd GFLOP/s", "fwd+bwd GFLOP/s", "% peak", "peak MB", "err out"]
    cols += ["torch fwd+bwd ms", "ours / torch"] if peer else []
    print(bench.markdown_table(rows, cols))
    if args.json:
        bench.write_json(args.json, {"gemm_peak": peak, "rows": rows})


if __name__ == "__main__":
    main()
