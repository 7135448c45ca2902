"""Scale-out benchmark: DistributedAttention on a LocalCluster, strong scaling and out-of-core.

    python benchmarks/bench_distributed.py [--quick] [--repeat R] [--json FILE]

Strong scaling: the same sequence-sharded forward + backward on 1 and then 2 worker processes
(``threads_per_worker=1``; each worker's cores held to one thread), fp32, 8 heads,
d = Dv = 64, N = 2^20: local attention (window 64, halos) and causal linear attention
(elu + 1, the state scan). The inputs are drawn on the workers and kept there before the
clock starts; a timed run is the submission of the graph until every block of the output and
of the three gradients is on a worker. Beside them the single-process core on the same arrays
(one thread, and its own two threads), so that the table gives the speed-up from 1 to 2
workers (goal: 1.7x or more) and the overhead of the graph against the core on one thread.
The outputs and gradients are compared with the single-process core's (max relative error).

Out-of-core: sequence-sharded local attention forward + backward on 2 workers whose
``memory_limit`` together is below the size of q, k, v and dout; dask spills to disk. The
results are reduced to sums on the workers (nothing gathered) and compared with the
single-process core's.

``--quick``: N = 4096, 2 heads, d = 16, one round (a check that the script runs); the
out-of-core row then cannot go below the inputs' size (workers need more memory to start)
and says so.
"""
import argparse
import time

import numpy as np

import efficient_attention as ea
from efficient_attention import bench


def cores(window):
    local = ea.LocalAttention(window=window)
    local.threads = 1                                # one thread per task (the worker's one thread)
    return {"local (halo)": local,
            "linear causal, elu+1 (state scan)": ea.LinearAttention(ea.EluFeatureMap(), causal=True)}


def arrays(n, heads, d, shard, seed=0):
    """q, k, v, dout as dask arrays drawn block by block (fp32, one chunk of heads)."""
    import dask.array as da
    rng = da.random.default_rng(seed)
    chunks = (heads, shard, d)
    return [rng.standard_normal((heads, n, d), chunks=chunks, dtype=np.float32) for _ in range(4)]


def single_process(core, q, k, v, dout, threads, repeat):
    """Median time of the core's forward + backward in this process on ``threads`` threads."""
    import numba
    from threadpoolctl import threadpool_limits
    saved_numba, saved_threads = numba.get_num_threads(), getattr(core, "threads", None)
    numba.set_num_threads(threads)
    if hasattr(core, "threads"):
        core.threads = threads
    result = {}

    def run():
        out, cache = core.forward(q, k, v, check_finite=False)
        result["out"], result["grads"] = out, core.backward(cache, dout)
    try:
        with threadpool_limits(threads):
            t = bench.median_time(run, repeat=repeat, warmup=1)
    finally:
        numba.set_num_threads(saved_numba)
        if hasattr(core, "threads"):
            core.threads = saved_threads
    return t, result["out"], result["grads"]


def cluster(workers, memory_limit="auto"):
    from distributed import Client, LocalCluster
    c = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                     memory_limit=memory_limit, env={"NUMBA_NUM_THREADS": "1"})
    return c, Client(c, set_as_default=False)


def distributed_run(client, core, inputs, repeat):
    """Median time of forward + backward persisted on the cluster, and the gathered results."""
    from distributed import futures_of
    from efficient_attention.distributed import DistributedAttention
    q, k, v, dout = client.persist(inputs)
    client.gather(futures_of([q, k, v, dout]))       # the inputs on the workers before the clock
    dist = DistributedAttention(core)
    times, kept = [], None
    for r in range(repeat + 1):                       # round 0 warms the workers up (numba, BLAS)
        kept = None
        t0 = time.perf_counter()
        out, cache = dist.forward(q, k, v, check_finite=False)
        grads = dist.backward(cache, dout, check_finite=False)
        kept = client.persist([out, *grads[:3]])
        _wait(client, kept)
        if r:
            times.append(time.perf_counter() - t0)
    results = client.compute(kept, sync=True)
    return float(np.median(times)), results, (q, k, v, dout)


def _wait(client, collections):
    """Until every block of ``collections`` is computed and held on a worker (none gathered)."""
    from distributed import futures_of, wait
    with client.as_current():
        wait(futures_of(collections))


def max_rel(actual, expected):
    return max(float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-30))
               for a, e in zip(actual, expected))


def out_of_core(core, n, heads, d, shard, out_shard, memory_limit, reference_sums):
    """Forward + backward on 2 workers limited to ``memory_limit`` bytes each, on the inputs of
    the scaling runs cut into shards of ``out_shard`` rows; the sums of squares of the results
    computed on the workers (nothing large gathered)."""
    from efficient_attention.distributed import DistributedAttention
    c, client = cluster(2, memory_limit=memory_limit)
    try:
        q, k, v, dout = (x.rechunk((heads, out_shard, d)) for x in arrays(n, heads, d, shard))
        dist = DistributedAttention(core)
        t0 = time.perf_counter()
        out, cache = dist.forward(q, k, v, check_finite=False)
        grads = dist.backward(cache, dout, check_finite=False)
        sums = client.compute([_sum_squares(x) for x in (out, *grads[:3])], sync=True)
        elapsed = time.perf_counter() - t0
        spilled = sum(client.run(_spilled_to_disk).values())
    finally:
        client.close()
        c.close()
    err = max(abs(s - r) / max(abs(r), 1e-30) for s, r in zip(sums, reference_sums))
    return elapsed, err, spilled


def _sum_squares(x):
    """Σ x² in float64: a checksum without the cancellation of a plain sum."""
    return (x.astype(np.float64) ** 2).sum()


def _spilled_to_disk(dask_worker):
    """Bytes this worker has written to disk while spilling (its SpillBuffer's cumulative count)."""
    metrics = getattr(dask_worker.data, "cumulative_metrics", {})
    return int(sum(value for (label, unit), value in metrics.items() if label == "disk-write" and unit == "bytes"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (seconds)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds per configuration (median)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.quick:
        n, heads, d, shard, window, repeat = 4096, 2, 16, 512, 16, 1
    else:
        n, heads, d, shard, window, repeat = 2 ** 20, 8, 64, 2 ** 16, 64, args.repeat
    print(bench.machine_header())
    print(f"- N = {n}, {heads} heads, d = Dv = {d}, fp32; sequence shards of {shard} rows "
          f"({n // shard} shards); local window {window}; median of {repeat} round(s) after one warm-up")
    print("- workers: LocalCluster(threads_per_worker=1, processes=True), NUMBA_NUM_THREADS=1 in each; "
          "the machine is shared with other users, so times are noisy\n")
    rows = []
    record = {"n": n, "heads": heads, "d": d, "shard": shard, "window": window, "rows": rows}
    inputs_np = None
    ref = {}
    clusters = {w: cluster(w) for w in (1, 2)}
    try:
        for name, core in cores(window).items():
            inputs = arrays(n, heads, d, shard)
            if inputs_np is None:
                inputs_np = clusters[1][1].compute(inputs, sync=True)
            t1, out, g = single_process(core, *inputs_np, threads=1, repeat=repeat)
            t2, _, _ = single_process(core, *inputs_np, threads=2, repeat=repeat)
            ref[name] = (out, g.dq, g.dk, g.dv)
            rows.append({"variant": name, "run": "single process, 1 thread", "seconds": t1, "speed-up": 1.0,
                         "vs core on 1 thread": "—", "max rel. error": "—"})
            rows.append({"variant": name, "run": "single process, 2 threads", "seconds": t2,
                         "speed-up": t1 / t2, "vs core on 1 thread": "—", "max rel. error": "—"})
            times = {}
            for w in (1, 2):
                t, res, _ = distributed_run(clusters[w][1], core, inputs, repeat)
                times[w] = t
                rows.append({"variant": name, "run": f"DistributedAttention, {w} worker{'s' if w > 1 else ''}",
                             "seconds": t, "speed-up": times[1] / t,
                             "vs core on 1 thread": f"{t / t1:.2f}x",
                             "max rel. error": max_rel(res, ref[name])})
            record[name] = {"speedup_1_to_2_workers": times[1] / times[2], "overhead_1_worker": times[1] / t1 - 1}
    finally:
        for c, client in clusters.values():
            client.close()
            c.close()
    print(bench.markdown_table(rows))
    print()
    for name in cores(window):
        s = record[name]["speedup_1_to_2_workers"]
        print(f"- {name}: 1 -> 2 workers {s:.2f}x ({'met' if s >= 1.7 else 'NOT met'}: goal >= 1.7x); "
              f"1 worker against the core on one thread: {record[name]['overhead_1_worker'] * 100:+.0f} %")

    # ---------------------------------------------------------------- out-of-core
    core = cores(window)["local (halo)"]
    total = 4 * n * heads * d * 4                      # q, k, v, dout in fp32
    limit = 512 * 2 ** 20 if args.quick else int(0.4 * total)
    out_shard = shard if args.quick else 2 ** 14
    sums = [float(np.sum(x.astype(np.float64) ** 2)) for x in ref["local (halo)"]]
    elapsed, err, spilled = out_of_core(core, n, heads, d, shard, out_shard, limit, sums)
    below = 2 * limit < total
    print("\n## Out-of-core: local attention forward + backward on 2 workers with a memory limit\n")
    ooc = [{"q + k + v + dout (MB)": total / 2 ** 20, "memory_limit per worker (MB)": limit / 2 ** 20,
            "both workers (MB)": 2 * limit / 2 ** 20, "below the inputs": "yes" if below else "no (--quick)",
            "shards": f"{n // out_shard} x {out_shard} rows", "seconds": elapsed,
            "written to disk (MB)": spilled / 2 ** 20, "Σx² of out, dq, dk, dv: max rel. error": err}]
    print(bench.markdown_table(ooc))
    record["out_of_core"] = ooc[0]
    if args.json:
        bench.write_json(args.json, record)


if __name__ == "__main__":
    main()
