"""Benchmark: Reformer LSH attention (chapter 2), forward and forward+backward against N.

Configuration (the one the project's LSH targets are set for): float32, D = 64,
8 heads, 4 hash rounds, chunks of 64, n_buckets = N/64, shared QK (Reformer),
N = 4096 ... 262144 (x4 steps).

Columns: hashing + sorting alone ("hash+sort"), the numba attention kernels
alone on that layout ("attn"), the whole forward and forward+backward
(medians; one run at N >= 65536, the kernels compiled at the first size),
the ratio of each to the previous row (N -> 4N; target <= 4.8x), the traced
peak memory of one forward+backward and its bytes per token, and, at the
smallest N, the error of the first head against the float64 dense oracle
masked with ``pattern()``.

Note: with n_buckets = N/64 the hashing alone costs R·N·D·N/128
multiply-adds, quadratic in N; the table separates it so the linear part is
visible. The reformer-pytorch LSH attention is timed side by side when it
can be imported.

Usage: python benchmarks/bench_lsh.py [--quick] [--json FILE] [--sizes 4096,16384]
"""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from efficient_attention.bench import (machine_header, markdown_table, median_time, rel_error,
                                       write_json)
from efficient_attention.dense import DenseAttention
from efficient_attention.lsh import LSHAttention


def _peer():
    try:
        import torch  # noqa: F401
        from reformer_pytorch import LSHAttention as PeerLSH  # noqa: F401
    except ImportError as exc:
        return None, f"reformer-pytorch not installed ({exc.__class__.__name__}: {exc}); peer column omitted"
    return PeerLSH, "reformer-pytorch LSHAttention (bucket_size=64, n_hashes=4), torch CPU"


def _peer_time(PeerLSH, q, v, repeat):
    import torch
    attn = PeerLSH(bucket_size=64, n_hashes=4, causal=False)
    qk = torch.from_numpy(q.copy()).requires_grad_(True)
    vv = torch.from_numpy(v.copy()).requires_grad_(True)

    def fwd():
        with torch.no_grad():
            attn(qk, vv)

    def fwd_bwd():
        out = attn(qk, vv)[0]
        out.sum().backward()
    return median_time(fwd, repeat, 1), median_time(fwd_bwd, repeat, 1)


def run(sizes, heads, d, rounds, chunk, repeat_small, check_n=None):
    from efficient_attention.kernels import lsh as K
    rng = np.random.default_rng(0)
    PeerLSH, peer_note = _peer()
    rows = []
    prev = None
    for n in sizes:
        q = rng.standard_normal((heads, n, d)).astype(np.float32)
        v = rng.standard_normal((heads, n, d)).astype(np.float32)
        dout = rng.standard_normal((heads, n, d)).astype(np.float32)
        core = LSHAttention(max(2, n // chunk), n_hashes=rounds, chunk_size=chunk)
        huge = n >= 262144
        repeat, warmup = (1, 0) if n >= 65536 else (repeat_small, 1)
        if prev is None:                                           # compile outside the timings
            _, c = core.forward(q[:, :2 * chunk], None, v[:, :2 * chunk])
            core.backward(c, dout[:, :2 * chunk])
        state = {}

        def layout():
            state["lay"] = core._layout(q, None)
        t_hash = median_time(layout, repeat, warmup)
        # the attention kernels alone, on the layout just built (keys q/|q|, as forward does)
        khat = q / np.linalg.norm(q, axis=-1, keepdims=True)
        kw = dict(causal=False, shared=True, across=False, scale=d ** -0.5)

        def attn_fwd():
            state["out"], state["lse"] = K.bucket_forward(q, khat, v, state["lay"], **kw)

        def attn_bwd():
            K.bucket_backward(q, khat, v, dout, state["out"], state["lse"], state["lay"], **kw)
        t_afwd = median_time(attn_fwd, repeat, warmup)
        t_abwd = median_time(attn_bwd, repeat, warmup)
        del state["lay"]
        t_fwd = None if huge else median_time(lambda: core.forward(q, None, v), repeat, warmup)

        def fwd_bwd():
            out, cache = core.forward(q, None, v)
            core.backward(cache, dout)
        t_fb = median_time(fwd_bwd, repeat, warmup) if n < 65536 else None
        tracemalloc.start()
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        fwd_bwd()
        t_traced = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if t_fb is None:
            t_fb = t_traced                                        # one run at large N
        ms = lambda t: None if t is None else 1e3 * t  # noqa: E731
        row = {"N": n, "buckets": core.n_buckets, "hash+sort ms": ms(t_hash),
               "attn fwd ms": ms(t_afwd), "attn fwd+bwd ms": ms(t_afwd + t_abwd),
               "fwd ms": ms(t_fwd), "fwd+bwd ms": ms(t_fb),
               "peak MB": peak / 2 ** 20, "peak B/token": peak / n}
        if prev is not None:
            f = n / prev["N"]
            for col, name in (("attn fwd ms", "attn fwd x"), ("attn fwd+bwd ms", "attn fwd+bwd x"),
                              ("fwd ms", "fwd x"), ("fwd+bwd ms", f"fwd+bwd x (N x{f:g})"),
                              ("hash+sort ms", "hash x")):
                if row[col] is not None and prev[col] is not None:
                    row[name] = row[col] / prev[col]
        if check_n is not None and n == check_n:
            q0, v0 = q[0].astype(np.float64), v[0].astype(np.float64)
            out = core(q[:1], None, v[:1])[0]
            k0 = q0 / np.linalg.norm(q0, axis=-1, keepdims=True)
            ref = DenseAttention()(q0, k0, v0, mask=core.pattern(q[0]).toarray())
            row["err vs pattern oracle"] = rel_error(out, ref)
        peer_msg = ""
        if PeerLSH is not None:
            try:
                pf, pfb = _peer_time(PeerLSH, q, v, repeat)
            except (RuntimeError, MemoryError) as exc:   # its hashing holds B x R x N x C/2 scores
                row["peer fwd+bwd ms"] = None
                peer_msg = f", peer failed: {str(exc).splitlines()[0][:120]}"
            else:
                row["peer fwd ms"], row["peer fwd+bwd ms"] = 1e3 * pf, 1e3 * pfb
                row["speedup fwd+bwd"] = pfb / t_fb
                peer_msg = f", peer fwd {pf:.2f} s, fwd+bwd {pfb:.2f} s ({pfb / t_fb:.2f}x ours)"
        rows.append(row)
        prev = row
        print(f"  N={n}: hash+sort {t_hash:.2f} s, attention fwd {t_afwd:.2f} s, bwd {t_abwd:.2f} s, "
              f"fwd {t_fwd if t_fwd is None else round(t_fwd, 2)} s, fwd+bwd {t_fb:.2f} s, "
              f"peak {peak / 2**20:.0f} MB{peer_msg}", flush=True)
    return rows, peer_note


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--sizes", help="comma-separated N (default 4096,16384,65536,262144)")
    args = ap.parse_args(argv)
    if args.quick:
        sizes, heads, rounds, repeat = [256, 1024], 2, 2, 2
    else:
        sizes, heads, rounds, repeat = [4096, 16384, 65536, 262144], 8, 4, 3
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    d, chunk = 64, 64
    print("# LSH attention (Reformer, shared QK): float32, D = 64, "
          f"{heads} heads, {rounds} rounds, chunk {chunk}, n_buckets = N/{chunk}\n")
    print(machine_header())
    print("- the machine is shared with other jobs while this runs: times are medians of a busy box\n")
    rows, peer_note = run(sizes, heads, d, rounds, chunk, repeat, check_n=sizes[0])
    print()
    print("- peer: " + peer_note + "\n")
    cols = list(dict.fromkeys(c for r in rows for c in r))     # every column of any row
    cols = [c for c in cols if c != "err vs pattern oracle"] + \
        (["err vs pattern oracle"] if "err vs pattern oracle" in rows[0] else [])
    print(markdown_table(rows, cols))
    print("\n- attn = the numba bucket kernels alone on a prebuilt layout (the part that should be"
          " linear in N); hash+sort = angular hashing (R·N·D·C/2 multiply-adds, quadratic with"
          " C = N/64) plus the stable sort; fwd, fwd+bwd = the whole core. At N = 262144 the full"
          " forward alone is not re-run (fwd+bwd is); at N >= 65536 every number is a single run.")
    if args.json:
        write_json(args.json, {"rows": rows, "peer": peer_note, "heads": heads, "rounds": rounds,
                               "d": d, "chunk": chunk})


if __name__ == "__main__":
    main()
