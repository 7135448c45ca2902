"""Benchmark of the block-sparse engine (``ea.BlockSparseAttention``) against its peers.

Targets (float32, d = 64, 8 heads; medians of interleaved rounds, ratios paired per round):

1. dense and causal forward+backward at N = 8192: at most 1.25x the time of PyTorch's
   ``scaled_dot_product_attention`` (its CPU flash kernel); the goal is to be faster;
2. Longformer (window 256 + 2 global tokens) and BigBird (blocks of 64, 3 random, 2 global) at
   N = 16384: forward at most 0.8x FlexAttention's compiled CPU forward on the same mask, and
   forward+backward time per attended key at most 1.3x ``LocalAttention``'s (window 256);
3. one head at N = 65536, dense forward+backward: peak RSS of a fresh interpreter under 1 GiB
   (an N x N float32 matrix alone would be 16 GiB).

Every table gives the fraction of the machine's float32 GEMM peak reached on useful FLOPs
(``core.cost``: the allowed pairs of the mask, not the masked entries of partial tiles): against
the peak read once at the start (``bench.gemm_peak``, a subprocess without the OpenBLAS
overrides) and against a 2048² GEMM timed in every round of this process (paired per round).
That peak is the BLAS NumPy links (OpenBLAS's ``sgemm``); the engine does its tile products
itself (``kernels/tilemm.py``), and where those run faster than that BLAS (1.4-1.5x on the
development machine's Emerald Rapids cores) the fraction can pass 100 %.

PyTorch (``pip install 'efficient_attention[bench]'``, e.g. ``torch==2.13.0``) is imported by this script only, never by
the library; without it the peer columns say so. Each round calls every contender once, in
order, so a shared machine's drift hits all alike; a ratio is the median over rounds of the
two times of one round (``harness.median_ratio``).

    python benchmarks/bench_blocksparse.py                 # everything (several minutes)
    python benchmarks/bench_blocksparse.py --quick         # small sizes, to try it
    python benchmarks/bench_blocksparse.py --only dense memory
    python benchmarks/bench_blocksparse.py --native-blas   # re-run without OPENBLAS_CORETYPE / _L2_SIZE
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

import efficient_attention as ea
from efficient_attention import bench, patterns

import harness  # benchmarks/harness.py: rounds, paired ratios, peak RSS

SECTIONS = ("dense", "sparse", "memory")


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _inputs(heads, n, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((heads, n, d)).astype(np.float32) for _ in range(4))


def _engine_calls(core, q, k, v, dout):
    """Forward and forward+backward of a core, without the finiteness checks (where the core's
    backward takes the keyword: the library is adding it everywhere)."""
    import inspect
    bwd_kw = {"check_finite": False} if "check_finite" in inspect.signature(core.backward).parameters else {}

    def fwd():
        core.forward(q, k, v, check_finite=False)

    def fwd_bwd():
        out, cache = core.forward(q, k, v, check_finite=False)
        core.backward(cache, dout, **bwd_kw)
    return fwd, fwd_bwd


def _gflops(flops, seconds):
    return flops / seconds / 1e9


_GEMM_N = 2048
_GEMM_AB = []


def _gemm():
    """A float32 2048² matmul, timed in every round beside the contenders: the fraction of the GEMM
    peak is also taken against it, paired per round (the peak read once at the start can catch a
    slow or a fast moment of a shared machine)."""
    if not _GEMM_AB:
        rng = np.random.default_rng(0)
        _GEMM_AB.extend(rng.standard_normal((2, _GEMM_N, _GEMM_N)).astype(np.float32))
    _GEMM_AB[0] @ _GEMM_AB[1]


def _gemm_fraction(flops, times, gemm_times):
    """Median over rounds of (useful GFLOP/s) / (GEMM GFLOP/s of the same round), in per cent."""
    return 100 * statistics.median((flops / t) / (2 * _GEMM_N ** 3 / g) for t, g in zip(times, gemm_times))


def _verdict(value, limit):
    return "met" if value <= limit else "NOT met"


def dense_section(n, heads, d, rounds, peak, torch):
    """Dense and causal forward+backward against scaled_dot_product_attention."""
    rows = []
    q, k, v, dout = _inputs(heads, n, d)
    for causal in (False, True):
        core = ea.BlockSparseAttention(causal=causal)
        fwd, fwd_bwd = _engine_calls(core, q, k, v, dout)
        fns = {"engine fwd": fwd, "engine fwd+bwd": fwd_bwd, "gemm": _gemm}
        if torch is not None:
            tq, tk, tv, tdo = (torch.from_numpy(a)[None] for a in (q, k, v, dout))
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def t_fwd(causal=causal):
                with torch.no_grad():
                    sdpa(tq, tk, tv, is_causal=causal)

            def t_fwd_bwd(causal=causal):
                a, b, c = (x.detach().requires_grad_() for x in (tq, tk, tv))
                sdpa(a, b, c, is_causal=causal).backward(tdo)
            fns.update({"sdpa fwd": t_fwd, "sdpa fwd+bwd": t_fwd_bwd})
        times = harness.interleaved_rounds(fns, repeat=rounds, warmup=1)
        f_cost = core.cost(n, d, d).scaled(heads).flops
        fb_cost = f_cost + core.cost(n, d, d, backward=True).scaled(heads).flops
        row = {"mask": "causal" if causal else "dense", "N": n,
               "engine fwd ms": 1e3 * statistics.median(times["engine fwd"]),
               "engine fwd+bwd ms": 1e3 * statistics.median(times["engine fwd+bwd"]),
               "engine % GEMM peak (fwd+bwd)": 100 * _gflops(fb_cost, statistics.median(times["engine fwd+bwd"]))
               / peak["float32"],
               "engine % GEMM in rounds": _gemm_fraction(fb_cost, times["engine fwd+bwd"], times["gemm"])}
        if torch is not None:
            ratio = harness.median_ratio(times["engine fwd+bwd"], times["sdpa fwd+bwd"])
            row.update({"sdpa fwd ms": 1e3 * statistics.median(times["sdpa fwd"]),
                        "sdpa fwd+bwd ms": 1e3 * statistics.median(times["sdpa fwd+bwd"]),
                        "fwd ratio": harness.median_ratio(times["engine fwd"], times["sdpa fwd"]),
                        "fwd+bwd ratio (target <= 1.25)": ratio, "target": _verdict(ratio, 1.25)})
        rows.append(row)
        print(f"  {row['mask']} N={n}: engine fwd+bwd {row['engine fwd+bwd ms']:.0f} ms", file=sys.stderr,
              flush=True)
    return rows


def sparse_masks(n):
    """The two masks of target 2: (name, pattern, torch mask_mod factory)."""
    g = [0, n // 2]
    longformer = patterns.longformer(n, 256, g)
    bigbird = patterns.bigbird(n, 64, 3, 2, seed=0)
    blocks = bigbird[::64, ::64].toarray()                      # the block pattern (64 x 64 blocks)

    def longformer_mod(torch):
        is_global = torch.zeros(n, dtype=torch.bool)
        is_global[g] = True
        return lambda b, h, qi, ki: ((qi - ki).abs() <= 256) | is_global[qi] | is_global[ki]

    def bigbird_mod(torch):
        t = torch.from_numpy(blocks)
        return lambda b, h, qi, ki: t[qi // 64, ki // 64]
    return [("Longformer (w 256, 2 global)", longformer, longformer_mod),
            ("BigBird (64, 3 random, 2 global)", bigbird, bigbird_mod)]


def sparse_section(n, heads, d, rounds, peak, torch):
    """Longformer and BigBird: forward against FlexAttention, per-key cost against LocalAttention."""
    rows = []
    q, k, v, dout = _inputs(heads, n, d, seed=1)
    local = ea.LocalAttention(window=256)
    l_fwd, l_fwd_bwd = _engine_calls(local, q, k, v, dout)
    local_pairs = local.cost(n, d, d).flops // (2 * (d + d))           # allowed pairs per head
    flex = None
    if torch is not None:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = (torch.compile(flex_attention), create_block_mask)
        except Exception as exc:                                        # pragma: no cover - depends on torch
            print(f"  FlexAttention unavailable: {exc}", file=sys.stderr)
    for name, pattern, mod in sparse_masks(n):
        t0 = time.perf_counter()
        mask = ea.BlockMask.from_pattern(pattern)
        build = time.perf_counter() - t0
        core = ea.BlockSparseAttention(mask)
        fwd, fwd_bwd = _engine_calls(core, q, k, v, dout)
        fns = {"engine fwd": fwd, "engine fwd+bwd": fwd_bwd, "local fwd+bwd": l_fwd_bwd, "gemm": _gemm}
        if flex is not None:
            compiled, create = flex
            bm = create(mod(torch), B=None, H=None, Q_LEN=n, KV_LEN=n, device="cpu")
            tq, tk, tv = (torch.from_numpy(a)[None] for a in (q, k, v))

            def f_fwd(bm=bm):
                with torch.no_grad():
                    compiled(tq, tk, tv, block_mask=bm)
            t0 = time.perf_counter()
            f_fwd()                                                     # compiles (tens of seconds)
            print(f"  FlexAttention compiled for {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                  flush=True)
            fns["flex fwd"] = f_fwd
        times = harness.interleaved_rounds(fns, repeat=rounds, warmup=1)
        pairs = mask.nnz
        f_cost = core.cost(n, d, d).scaled(heads).flops
        fb_cost = f_cost + core.cost(n, d, d, backward=True).scaled(heads).flops
        per_key = [(e / pairs) / (loc / local_pairs) for e, loc in zip(times["engine fwd+bwd"], times["local fwd+bwd"])]
        per_key_ratio = statistics.median(per_key)
        row = {"mask": name, "N": n, "density (tiles)": mask.density,
               "keys per query": pairs / n, "layout build s": build,
               "engine fwd ms": 1e3 * statistics.median(times["engine fwd"]),
               "engine fwd+bwd ms": 1e3 * statistics.median(times["engine fwd+bwd"]),
               "engine % GEMM peak (fwd+bwd)": 100 * _gflops(fb_cost, statistics.median(times["engine fwd+bwd"]))
               / peak["float32"],
               "engine % GEMM in rounds": _gemm_fraction(fb_cost, times["engine fwd+bwd"], times["gemm"]),
               "LocalAttention fwd+bwd ms": 1e3 * statistics.median(times["local fwd+bwd"]),
               "per-key fwd+bwd vs LocalAttention (target <= 1.3)": per_key_ratio,
               "per-key target": _verdict(per_key_ratio, 1.3)}
        if "flex fwd" in times:
            ratio = harness.median_ratio(times["engine fwd"], times["flex fwd"])
            row.update({"flex fwd ms": 1e3 * statistics.median(times["flex fwd"]),
                        "fwd vs flex (target <= 0.8)": ratio, "flex target": _verdict(ratio, 0.8)})
        rows.append(row)
        print(f"  {name}: engine fwd {row['engine fwd ms']:.0f} ms", file=sys.stderr, flush=True)
    return rows


_RSS_CODE = """
import numpy as np, efficient_attention as ea
n, d = {n}, {d}
rng = np.random.default_rng(0)
q, k, v, dout = (rng.standard_normal((1, n, d)).astype(np.float32) for _ in range(4))
core = ea.BlockSparseAttention()
out, cache = core.forward(q, k, v)
g = core.backward(cache, dout)
print(float(np.abs(out).sum()), float(np.abs(g.dq).sum()))
"""


def memory_section(n, d):
    """Peak RSS of a fresh interpreter running one head of dense forward+backward."""
    t0 = time.perf_counter()
    res = harness.peak_rss(_RSS_CODE.format(n=n, d=d))
    mb = res["peak_rss_mb"]
    inputs_mb = 4 * n * d * 4 / 2**20
    return [{"case": f"one head, dense fwd+bwd, N = {n}, d = {d}", "peak RSS MB": mb,
             "inputs MB": inputs_mb, "N x N float32 would be MB": 4 * n * n / 2**20,
             "target (< 1024 MB)": _verdict(mb, 1023.999), "wall s": time.perf_counter() - t0}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--n-dense", type=int, default=8192)
    p.add_argument("--n-sparse", type=int, default=16384)
    p.add_argument("--n-memory", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even when installed")
    p.add_argument("--quick", action="store_true",
                   help="N = 1024 / 2048 / 8192 and 2 rounds, to try the script (targets are not judged there)")
    p.add_argument("--native-blas", action="store_true",
                   help="re-run this script without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (OpenBLAS then "
                        "picks its kernel for this CPU)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.native_blas and ("OPENBLAS_CORETYPE" in os.environ or "OPENBLAS_L2_SIZE" in os.environ):
        import subprocess
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        return subprocess.call([sys.executable, __file__] + (argv if argv is not None else sys.argv[1:]), env=env)
    for name in ("heads", "d", "n_dense", "n_sparse", "n_memory", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.n_dense, args.n_sparse, args.n_memory, args.rounds = 1024, 2048, 8192, 2
    sections = args.only or SECTIONS
    torch = None if args.no_torch else _torch()
    peak = bench.gemm_peak()
    print("# Block-sparse engine: dense, causal, Longformer, BigBird; memory\n")
    print(bench.machine_header(with_peak=True))
    print(f"- float32, d = {args.d}, {args.heads} heads; medians of {args.rounds} interleaved rounds after one "
          "warm-up round; ratios are medians of per-round ratios")
    if torch is None:
        print(f"- PyTorch: {'left out (--no-torch)' if args.no_torch else 'not installed'}")
    else:
        print(f"- PyTorch: {torch.__version__}, {torch.get_num_threads()} threads")
    print("- the benchmark machine is shared with other users: expect noise of tens of per cent between runs\n")
    out = {}
    if "dense" in sections:
        out["dense"] = dense_section(args.n_dense, args.heads, args.d, args.rounds, peak, torch)
        print("## Dense and causal, forward+backward\n")
        print(bench.markdown_table(out["dense"]) + "\n")
    if "sparse" in sections:
        out["sparse"] = sparse_section(args.n_sparse, args.heads, args.d, args.rounds, peak, torch)
        print("## Longformer and BigBird\n")
        print(bench.markdown_table(out["sparse"]) + "\n")
    if "memory" in sections:
        out["memory"] = memory_section(args.n_memory, args.d)
        print("## Memory\n")
        print(bench.markdown_table(out["memory"]) + "\n")
    if args.json:
        bench.write_json(args.json, {"args": vars(args), "gemm_peak": peak, **out})
    return 0


if __name__ == "__main__":
    sys.exit(main())
