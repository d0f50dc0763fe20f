"""fusedce.dask on a LocalCluster: the same job on 1 and 2 worker processes
(one thread each), beside the one-machine call on 1 and 2 threads in the
same run; and a head larger than a worker's memory limit, sharded over two.

    python benches/bench_dask.py [--tokens 4096] [--out benches/out/dask.json]

Jobs (float32, D = 1024, V = 32000, row blocks of 1024 tokens, class shards
of 8000):
  * score: ``linear_token_stats`` (log-prob and entropy), one product;
  * train: ``linear_cross_entropy`` with ``dX``, ``dW``: four products
    (the logits in the forward pass, again in the backward, ``dX``, ``dW``).
Wall time is the best of ``--reps`` after a warm-up, data already on the
workers. Peak memory per worker is its process's peak RSS over the job (``VmHWM``,
reset before it), beside its RSS before it (Python, numpy, Dask, fusedce,
the inputs it holds). numpy's 2-thread sgemm rate is measured beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import fusedce
from _common import header, sgemm_rate

D, V, ROWS, SHARD = 1024, 32000, 1024, 8000
BIG_V, BIG_N, BIG_SHARD, BIG_LIMIT = 262144, 512, 16384, 768 << 20


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        line = next(v for v in f if v.startswith(field + ":"))
    return int(line.split()[1]) << 10


def reset_peak() -> int:
    """Resets this process's peak RSS to its RSS (Linux ``clear_refs`` 5); returns the RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def peak_rss() -> int:
    return status_bytes("VmHWM")


def jobs(fdask, x, w, t):
    return {
        "score": lambda: fdask.linear_token_stats(x, w, t, stats=["logprob", "entropy"])[1:3],
        "train": lambda: fdask.linear_cross_entropy(x, w, t, return_grad=True)[1][:2],
    }


def one_machine(x, w, t, threads, reps):
    calls = {
        "score": lambda: fusedce.linear_token_stats(x, w, t, stats=["logprob", "entropy"]),
        "train": lambda: fusedce.linear_cross_entropy(x, w, t, return_grad=True),
    }
    out = {}
    with fusedce.threads(threads):
        for name, f in calls.items():
            f()
            out[name] = min(timed(f) for _ in range(reps))
    return out


def timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def on_cluster(workers, x, w, t, reps):
    import dask.array as da
    from dask.distributed import Client, LocalCluster

    import fusedce.dask as fdask

    out = {}
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        xd = da.from_delayed(client.scatter(x, broadcast=True), x.shape, dtype=x.dtype).rechunk((ROWS, D)).persist()
        wd = da.from_delayed(client.scatter(w, broadcast=True), w.shape, dtype=w.dtype).rechunk((SHARD, D)).persist()
        td = da.from_array(t, chunks=ROWS).persist()
        for name, make in jobs(fdask, xd, wd, td).items():
            client.compute(make(), sync=True)  # warm-up
            before = client.run(reset_peak)
            best = min(timed(lambda: client.compute(make(), sync=True)) for _ in range(reps))
            peaks = client.run(peak_rss)
            out[name] = {"seconds": best, "rss_before_mb": sorted(v / 1e6 for v in before.values()),
                         "peak_rss_mb": sorted(v / 1e6 for v in peaks.values())}
    return out


def big_head():
    """A 1 GiB head made shard by shard on two workers limited to 768 MiB each."""
    import dask.array as da
    from dask.distributed import Client, LocalCluster

    import fusedce.dask as fdask

    rng = np.random.default_rng(0)
    x = rng.normal(size=(BIG_N, D)).astype(np.float32)
    t = rng.integers(0, BIG_V, BIG_N)

    def head(block_info=None):
        lo = block_info[None]["array-location"][0][0]
        return (np.random.default_rng(lo).normal(size=(BIG_SHARD, D)) * 0.03).astype(np.float32)

    with LocalCluster(n_workers=2, threads_per_worker=1, memory_limit=BIG_LIMIT, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        w = da.map_blocks(head, chunks=((BIG_SHARD,) * (BIG_V // BIG_SHARD), (D,)), dtype=np.float32)
        client.run(reset_peak)
        t0 = time.perf_counter()
        loss = client.compute(fdask.linear_cross_entropy(x, w, t), sync=True)
        seconds = time.perf_counter() - t0
        peaks = client.run(peak_rss)
    return {"head_mb": w.nbytes / 1e6, "limit_mb": BIG_LIMIT / 1e6, "seconds": seconds, "loss": float(loss),
            "peak_rss_mb": sorted(v / 1e6 for v in peaks.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(header())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.tokens, D)).astype(np.float32)
    w = (rng.normal(size=(V, D)) * 0.03).astype(np.float32)
    t = rng.integers(0, V, args.tokens)
    gflop = {"score": 2 * args.tokens * D * V / 1e9, "train": 8 * args.tokens * D * V / 1e9}
    print(f"(N, D, V) = ({args.tokens}, {D}, {V}), row blocks {ROWS}, class shards {SHARD}")
    res: dict = {"sgemm_gflops": sgemm_rate(D, V)}
    print(f"numpy sgemm (2 threads): {res['sgemm_gflops']:.0f} GFLOP/s")
    for threads in (1, 2):
        res[f"one_machine_{threads}t"] = one_machine(x, w, t, threads, args.reps)
    for workers in (1, 2):
        res[f"dask_{workers}w"] = on_cluster(workers, x, w, t, args.reps)
    print(f"{'job':<6} {'one machine 1t':>15} {'2t':>8} {'dask 1 worker':>14} {'2 workers':>10} {'2w/1w':>6} "
          f"{'2w GFLOP/s':>11} {'peak RSS per worker (MB), 1w | 2w':>36}")
    for job in ("score", "train"):
        d1, d2 = res["dask_1w"][job], res["dask_2w"][job]
        print(f"{job:<6} {res['one_machine_1t'][job]:>14.2f}s {res['one_machine_2t'][job]:>7.2f}s {d1['seconds']:>13.2f}s "
              f"{d2['seconds']:>9.2f}s {d1['seconds'] / d2['seconds']:>5.2f}x {gflop[job] / d2['seconds']:>11.0f} "
              f"{d1['peak_rss_mb'][0]:>12.0f} | {d2['peak_rss_mb'][0]:.0f}, {d2['peak_rss_mb'][1]:.0f} "
              f"(before {d2['rss_before_mb'][0]:.0f}, {d2['rss_before_mb'][1]:.0f})")
    res["big_head"] = big_head()
    b = res["big_head"]
    print(f"head {b['head_mb']:.0f} MB over 2 workers limited to {b['limit_mb']:.0f} MB each: {b['seconds']:.1f} s, "
          f"peak RSS {b['peak_rss_mb'][0]:.0f} and {b['peak_rss_mb'][1]:.0f} MB, loss {b['loss']:.4f}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
