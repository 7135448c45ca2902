"""Sequence layers benchmark (chapters 0, 1, 5, 6): every layer beside dense multi-head attention.

    python benchmarks/bench_layers.py [--quick] [--json FILE] [--n N ...]

fp32, D = 256, 8 heads (head width 32), one sequence, N = 1024 and 4096:
median forward and forward+backward times of every sequence layer, the
ratio of its forward+backward time to dense multi-head attention's measured
in the same run, and the peak traced memory of one forward+backward.
The sparse multi-head layers use the lecture's head sets (Longformer:
local / dilated / global heads; BigBird: random / local / dilated / global
heads); the synthesizers, the token-mixing MLP and gMLP have N-dependent
parameters and are built for each N. When PyTorch is installed, its
``nn.MultiheadAttention`` (no bias) is timed on the same input as a peer.
"""
import argparse
import sys
import time

import numpy as np

from efficient_attention import bench
from efficient_attention.layers import MultiHeadAttention, bigbird_heads, longformer_heads
from efficient_attention.mixers import FourierMixer, GatedMLP, TokenMixingMLP
from efficient_attention.synthesizer import DenseSynthesizer, FactorizedRandomSynthesizer, RandomSynthesizer

F32 = np.float32


def layers(n, d, heads, window, per_row):
    """(name, description, builder) for every layer, float32 parameters."""
    dk = d // heads
    return [
        ("mha_dense", "MHA, dense heads (batched)",
         lambda: MultiHeadAttention.init(n, d, 0, heads=heads, dk=dk, dtype=F32)),
        ("mha_longformer", f"MHA, local/dilated/global heads, window {window}",
         lambda: MultiHeadAttention.init(n, d, 0, heads=heads, dk=dk, dtype=F32, cores=longformer_heads(
             n, heads, window=window, dilation=2, global_indices=(0,)))),
        ("mha_bigbird", f"MHA, random/local/dilated/global heads, {per_row} random keys",
         lambda: MultiHeadAttention.init(n, d, 0, heads=heads, dk=dk, dtype=F32, cores=bigbird_heads(
             n, heads, window=window, dilation=2, global_indices=(0,), per_row=per_row))),
        ("synth_dense", "dense Synthesizer, Dh = D",
         lambda: DenseSynthesizer.init(n, d, 0, dtype=F32)),
        ("synth_dense_causal", "dense Synthesizer, causal",
         lambda: DenseSynthesizer.init(n, d, 0, causal=True, dtype=F32)),
        ("synth_random", "random Synthesizer",
         lambda: RandomSynthesizer.init(n, d, 0, dtype=F32)),
        ("synth_factorized", "factorized random Synthesizer, K = 8",
         lambda: FactorizedRandomSynthesizer.init(n, d, 0, k=8, dtype=F32)),
        ("fnet", "FNet (Re fft2)", lambda: FourierMixer()),
        ("mixer_token_mlp", "MLP-Mixer token MLP, Dh = N/2",
         lambda: TokenMixingMLP.init(n, d, 0, dtype=F32)),
        ("gmlp", "gMLP block, F = D", lambda: GatedMLP.init(n, d, 0, dtype=F32)),
    ]


def torch_peer(d, heads):
    try:
        import torch
    except ImportError:
        return None
    mha = torch.nn.MultiheadAttention(d, heads, bias=False, batch_first=True)

    def run(x, dy):
        tx = torch.from_numpy(x).requires_grad_()
        y, _ = mha(tx, tx, tx, need_weights=False)
        y.backward(torch.from_numpy(dy))
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--n", type=int, nargs="+", metavar="N", help="sequence lengths (default 1024 4096)")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--blas-threads", type=int, default=None, metavar="T",
                   help="limit BLAS to T threads (threadpoolctl); on a busy shared machine 1 avoids "
                        "OpenBLAS threads spinning against other jobs")
    args = p.parse_args(argv)
    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(args.blas_threads, user_api="blas"):
            return run(args)
    return run(args)


def run(args):
    if args.quick:
        sizes, d, heads, window, per_row, repeat = [64], 32, 8, 8, 8, 3
    else:
        sizes, d, heads, window, per_row, repeat = [1024, 4096], 256, 8, 64, 64, 3
    sizes = args.n or sizes
    repeat = args.repeat or repeat
    t0 = time.perf_counter()
    print("# Sequence layers: forward and forward+backward, fp32\n")
    print(bench.machine_header(with_peak=False))
    peer = torch_peer(d, heads)
    print(f"- one sequence, D = {d}, {heads} heads of {d // heads}; times are medians of {repeat} runs "
          f"after a warm-up; 'x dense' = fwd+bwd time / dense MHA's, same run")
    if args.blas_threads is not None:
        print(f"- BLAS limited to {args.blas_threads} thread(s) for this run (--blas-threads)")
    print(f"- peer: {'torch nn.MultiheadAttention (no bias)' if peer else 'PyTorch not installed (no peer row)'}")
    print("- the machine is shared with other jobs: expect noise of tens of percent\n")
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, d)).astype(F32)
        dy = rng.standard_normal((n, d)).astype(F32)
        dense_fb = None
        for name, desc, build in layers(n, d, heads, window, per_row):
            layer = build()
            state = {}

            def fwd():
                state["y"] = layer(x)

            def fwd_bwd():
                y, cache = layer.forward(x)
                state["g"] = layer.backward(cache, dy)

            t_f = bench.median_time(fwd, repeat, 1)
            t_fb = bench.median_time(fwd_bwd, repeat, 1)
            if name == "mha_dense":
                dense_fb = t_fb
            rows.append({"layer": name, "N": n, "fwd ms": 1e3 * t_f, "fwd+bwd ms": 1e3 * t_fb,
                         "x dense": t_fb / dense_fb, "peak MB": bench.traced_peak(fwd_bwd) / 2**20,
                         "what": desc})
            print(f"  {name} N={n}: fwd+bwd {1e3 * t_fb:.1f} ms", flush=True, file=sys.stderr)
        if peer is not None:
            t = bench.median_time(lambda: peer(x, dy), repeat, 1)
            rows.append({"layer": "torch MHA", "N": n, "fwd+bwd ms": 1e3 * t, "x dense": t / dense_fb,
                         "what": "peer"})
    print(bench.markdown_table(rows, ["layer", "N", "fwd ms", "fwd+bwd ms", "x dense", "peak MB", "what"]))
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")
    if args.json:
        bench.write_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
