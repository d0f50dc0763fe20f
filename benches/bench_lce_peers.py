"""linear_cross_entropy forward and forward+backward against the machine's
sgemm rate and the strongest peers, in one process, one run:

- numpy's BLAS on a (1024, D) @ (D, C) float32 product (the GEMM rate);
- fusedce (forward; forward + all gradients);
- PyTorch's F.linear_cross_entropy reference path (options=None) and its
  chunked path (LinearCrossEntropyOptions()), and torch.compile of the
  unfused expression cross_entropy(x @ W.T, t).

Rates are "useful" GFLOP/s: 2·N·D·C for the forward, 3× that with the
gradients. Best of --repeats after a warm-up call.

    python benches/bench_lce_peers.py --shape 2048,2048,32000 --shape 4096,2048,32000
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import numpy as np

import fusedce

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    torch = None


def best(f, repeats):
    f()
    times = []
    for _ in range(repeats):
        gc.collect()
        time.sleep(0.3)  # PyTorch's OpenMP workers spin after an op
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def sgemm_rate(d, c, repeats):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1024, d), dtype=np.float32)
    b = rng.standard_normal((d, c), dtype=np.float32)
    return 2 * 1024 * d * c / best(lambda: a @ b, repeats) / 1e9


def peers(x, w, t, repeats):
    xt, wt, tt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(t)
    out = {}

    def run(fn, grad):
        def go():
            a = xt.clone().requires_grad_(grad)
            b = wt.clone().requires_grad_(grad)
            loss = fn(a, b)
            if grad:
                loss.backward()
        return go

    ref = lambda a, b: F.linear_cross_entropy(a, b, tt)  # noqa: E731
    chunked = lambda a, b: F.linear_cross_entropy(a, b, tt, options=torch.nn.LinearCrossEntropyOptions())  # noqa: E731
    compiled = torch.compile(lambda a, b: F.cross_entropy(a @ b.T, tt))
    for name, fn in (("torch reference", ref), ("torch chunked", chunked), ("torch.compile unfused", compiled)):
        try:
            out[name] = (best(run(fn, False), repeats), best(run(fn, True), repeats))
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: failed ({type(e).__name__}: {str(e)[:120]})")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape] or [(2048, 2048, 32000)]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    print(f"# {cpu}, {os.cpu_count()} CPUs, fusedce SIMD {fusedce.simd_level()}, {fusedce.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__ if torch else 'absent'}")
    print("| N, D, C | what | forward s | GFLOP/s | fwd+bwd s | GFLOP/s | fwd+bwd / sgemm rate |")
    print("|---|---|---|---|---|---|---|")
    for n, d, c in shapes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, d), dtype=np.float32)
        w = (rng.standard_normal((c, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
        t = rng.integers(0, c, n)
        flop = 2 * n * d * c
        rate = sgemm_rate(d, c, args.repeats)
        rows = {"fusedce": (best(lambda: fusedce.linear_cross_entropy(x, w, t), args.repeats),
                            best(lambda: fusedce.linear_cross_entropy(x, w, t, return_grad=True), args.repeats))}
        if torch is not None:
            rows.update(peers(x, w, t, args.repeats))
        print(f"| {n}, {d}, {c} | numpy sgemm (1024, D) @ (D, C) | | {rate:.0f} | | | 1.00 |")
        for name, (f, fb) in rows.items():
            print(f"| {n}, {d}, {c} | {name} | {f:.3f} | {flop / f / 1e9:.0f} | {fb:.3f} | "
                  f"{3 * flop / fb / 1e9:.0f} | {3 * flop / fb / 1e9 / rate:.2f} |")


if __name__ == "__main__":
    main()
