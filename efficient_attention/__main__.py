"""The main command: time every registered variant and check it against its oracle.

``python -m efficient_attention`` (or ``efficient-attention``) runs, for every
registered variant (``--list``), a forward and a forward+backward pass on random
float32 inputs (d = 64) at N = 1024 and 4096 for attention cores and N = 1024 for
sequence layers (``--n`` sets the sizes of both), and prints one Markdown table:
median times, GFLOP/s on the useful FLOPs of ``cost()``, the fraction of this
machine's GEMM peak, peak traced memory, and two kinds of comparison (a legend
under the table says the same):

* ``err vs oracle``: for variants that compute exactly what they define, the
  relative error of the output / the gradients against a float64 oracle: dense
  attention masked like the variant (attention cores), or the same layer evaluated
  in float64 (sequence layers). A numerical error: about 1e-7 in float32.
* ``approx. gap``: for approximations (LSH, Linformer, Performer, ...), the relative
  distance of the output / the gradients from the exact softmax attention they stand
  in for. A property of the approximation on these random inputs, not a numerical
  error; it is often of order 1.

Attention cores take ``--heads`` independent heads per call; sequence layers take
one sequence ``(1, N, D)`` with D = ``--d`` (multi-head layers split it into their
own heads). Progress goes to stderr: a line before the GEMM-peak measurement and
before each variant's first call (which compiles its numba kernels unless they are
cached), and one per variant and size.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

LEGEND = (
    "err vs oracle: relative (Frobenius) error of the output / the gradients against a float64 "
    "oracle, for variants that compute exactly what they define: dense attention masked like the "
    "variant ('masked', 'dense'), the core's own reference ('reference'), or the same layer in "
    "float64 ('layer in float64'); rounding gives about 1e-7 in float32.\n"
    "approx. gap: for approximations, the relative distance of the output / the gradients from the "
    "exact softmax attention they approximate ('full softmax', or 'masked softmax' for causal ones), "
    "in float64. It measures the approximation on these random inputs, not a numerical error: "
    "exact attention over standard-normal q and k spreads each query over hundreds of keys, so its "
    "output is small (about 1/20 of v's size at N = 1024) and gaps of order 1 are usual.")


def build_parser() -> argparse.ArgumentParser:
    from efficient_attention import __version__
    p = argparse.ArgumentParser(
        prog="python -m efficient_attention",
        description="Time every registered efficient-attention variant (forward and backward) "
                    "and check it against its oracle.")
    p.add_argument("--version", action="version", version=f"efficient_attention {__version__}")
    p.add_argument("--n", type=int, nargs="+", metavar="N",
                   help="sequence lengths of every variant (default: 1024 4096 for attention cores, "
                        "1024 for sequence layers, whose N x N token mixing would make N = 4096 the "
                        "slowest part of the default run; --n 1024 4096 times them there too)")
    p.add_argument("--d", type=int, default=64, help="query/key and value width; the model width of "
                                                     "sequence layers (default: 64)")
    p.add_argument("--heads", type=int, default=2, help="independent heads per call of an attention "
                                                        "core (default: 2)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the median is shown")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help="only these registered variants, cores or layers (default: all; see --list)")
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
        unknown = [n for n in dict.fromkeys(args.variants) if n not in variants]
        if unknown:
            print(f"error: unknown variants {unknown}; registered: {sorted(variants)} "
                  "(python -m efficient_attention --list)", file=sys.stderr)
            return 2
        variants = {n: variants[n] for n in args.variants}
    for name, value in (("--d", args.d), ("--heads", args.heads), ("--repeat", args.repeat)):
        if value < 1:
            print(f"error: {name} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.n is not None and any(n < 1 for n in args.n):
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


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


#: the default sizes (``--n`` not given) of each kind of variant
DEFAULT_SIZES = {"core": [1024, 4096], "layer": [1024]}


def _run(args, variants) -> int:
    from efficient_attention import bench

    sizes = {kind: list(args.n) if args.n else default for kind, default in DEFAULT_SIZES.items()}
    kinds = {v.kind for v in variants.values()}
    at = "; ".join(f"{'attention cores' if kind == 'core' else 'sequence layers'} at N = "
                   f"{', '.join(map(str, sizes[kind]))}" for kind in ("core", "layer") if kind in kinds)

    t_start = time.perf_counter()
    if args.no_peak:
        peak = None
    else:
        _say("measuring this machine's GEMM peak (a 2048² matmul in a subprocess, a few seconds) ...")
        peak = bench.gemm_peak()
    dtype = np.dtype(args.dtype)
    counts = {kind: sum(v.kind == kind for v in variants.values()) for kind in ("core", "layer")}
    _say(f"timing {len(variants)} variants ({counts['core']} attention cores, {counts['layer']} "
         f"sequence layers); {at}. A variant's first call compiles its numba kernels unless they "
         "are cached (seconds each, once)")
    print("# efficient_attention: every registered variant, forward and backward\n")
    print(bench.machine_header(with_peak=peak is not None))
    if args.blas_threads is not None:
        print(f"- BLAS limited to {args.blas_threads} thread(s) while timing (--blas-threads)")
    print(f"- inputs: {args.dtype}, standard normal; attention cores: d = dv = {args.d}, {args.heads} "
          f"heads per call; sequence layers: one sequence of width {args.d}, the registry's float64 "
          f"parameters (cast to {args.dtype} inside each call); {at}"
          f"{'' if args.n else ' (the default; --n sets the sizes of every variant)'}; times are "
          f"medians of {args.repeat} runs after a warm-up; errors on the first head (cores) or the "
          "whole sequence (layers)\n")
    rows, skipped = [], []
    for i, (name, variant) in enumerate(variants.items(), 1):
        _say(f"[{i}/{len(variants)}] {name} ({variant.kind}): first call (compiles its kernels if "
             "not cached) ...")
        for n in sizes[variant.kind]:
            try:
                obj = variant.build(n=n, d=args.d, dv=args.d, seed=0)
            except ValueError as exc:    # the configuration does not exist at this N (e.g. block size)
                skipped.append(f"{name} at N = {n}: {exc}")
                _say(f"  {name} N={n}: skipped ({exc})")
                continue
            if variant.kind == "core":
                result = bench.bench_core(obj, n, args.d, args.d, heads=args.heads, dtype=dtype,
                                          repeat=args.repeat, exact=variant.exact, peak=peak)
            else:
                result = bench.bench_layer(obj, n, args.d, batch=1, dtype=dtype, repeat=args.repeat,
                                           peak=peak)
            row = {"variant": name, "kind": variant.kind, **result}
            rows.append(row)
            _say(f"  {name} N={n}: fwd+bwd {row['fwd+bwd ms']:.1f} ms "
                 f"({time.perf_counter() - t_start:.0f} s elapsed)")
    cols = ["variant", "kind", "N", "fwd ms", "fwd+bwd ms", "fwd GFLOP/s", "fwd+bwd GFLOP/s"]
    cols += (["% peak"] if peak else []) + ["peak MB", "err vs oracle", "approx. gap", "oracle"]
    print(bench.markdown_table([_display(r) for r in rows], cols))
    print("\n" + "\n".join("- " + line for line in LEGEND.splitlines()))
    if skipped:
        print("\nSkipped (the variant's configuration does not exist at this size):")
        print("\n".join(f"- {s}" for s in skipped))
    print(f"\n(total {time.perf_counter() - t_start:.1f} s)")
    if args.json:
        bench.write_json(args.json, {"args": vars(args), "sizes": sizes, "gemm_peak": peak,
                                     "rows": rows, "skipped": skipped})
    return 0


def _display(row: dict) -> dict:
    """A row with the two comparison cells, 'output / gradients', for the table."""
    def pair(a, b):
        return None if a is None else f"{a:.3g} / {b:.3g}"
    return {**row, "err vs oracle": pair(row.get("err out"), row.get("err grad")),
            "approx. gap": pair(row.get("gap out"), row.get("gap grad"))}


if __name__ == "__main__":
    sys.exit(main())
