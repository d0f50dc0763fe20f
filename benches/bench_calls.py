"""Per-call time of small calls (the fixed cost: argument handling, the
request, the FFI, thread dispatch) and two large calls, beside PyTorch, for
whichever fusedce build is importable (run it once per build to compare
builds; benches/RESULTS.md records before/after runs).

    python benches/bench_calls.py [--reps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

import fusedce

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - benchmarks without torch
    torch = None


def per_call(fn, reps: int, rounds: int = 5) -> float:
    """Median over rounds of the mean time of ``reps`` back-to-back calls (s)."""
    fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--json")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    res = {"machine": platform.processor() or platform.machine(), "simd": fusedce.simd_level(),
           "threads": fusedce.get_num_threads(), "fusedce": fusedce.__file__}
    x = rng.normal(size=(8, 1000)).astype(np.float32)
    t = rng.integers(0, 1000, 8)
    h = rng.normal(size=(4, 64)).astype(np.float32)
    w = (rng.normal(size=(1000, 64)) / 8).astype(np.float32)
    t4 = t[:4]
    row = rng.normal(size=(1, 32000)).astype(np.float32)
    t1 = np.array([5])
    res["ce (8, 1000) fwd"] = per_call(lambda: fusedce.cross_entropy(x, t), a.reps)
    res["ce (8, 1000) fwd+grad"] = per_call(lambda: fusedce.cross_entropy(x, t, return_grad=True), a.reps)
    res["lce (4, 64) x (1000, 64) fwd"] = per_call(lambda: fusedce.linear_cross_entropy(h, w, t4), a.reps)
    res["ce (1, 32000) fwd"] = per_call(lambda: fusedce.cross_entropy(row, t1), a.reps // 4)
    big = rng.normal(size=(8192, 32000)).astype(np.float32) * 3
    tb = rng.integers(0, 32000, 8192)
    g = np.empty_like(big)
    res["ce (8192, 32000) fwd"] = per_call(lambda: fusedce.cross_entropy(big, tb), 3, 3)
    res["ce (8192, 32000) fwd+grad (reused buffer)"] = per_call(
        lambda: fusedce.cross_entropy(big, tb, return_grad=True, grad_out=g), 3, 3)
    hx = rng.normal(size=(1024, 1024)).astype(np.float32)
    hw = (rng.normal(size=(32000, 1024)) / 32).astype(np.float32)
    ht = rng.integers(0, 32000, 1024)
    res["lce (1024, 1024, 32000) fwd+grad"] = per_call(
        lambda: fusedce.linear_cross_entropy(hx, hw, ht, return_grad=True), 1, 3)
    if torch is not None:
        torch.set_num_threads(fusedce.get_num_threads())
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)
        ht4, wt, tt4 = torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(t4)
        rt, rtt = torch.from_numpy(row), torch.from_numpy(t1)
        with torch.no_grad():
            res["torch ce (8, 1000) fwd"] = per_call(lambda: F.cross_entropy(xt, tt), a.reps)
            res["torch lce (4, 64) x (1000, 64) fwd"] = per_call(lambda: F.linear_cross_entropy(ht4, wt, tt4), a.reps)
            res["torch ce (1, 32000) fwd"] = per_call(lambda: F.cross_entropy(rt, rtt), a.reps // 4)

        def fb():
            xg = xt.detach().requires_grad_(True)
            F.cross_entropy(xg, tt).backward()
        res["torch ce (8, 1000) fwd+grad"] = per_call(fb, a.reps)
    for k, v in res.items():
        print(f"{k:45s} {v * 1e6:12.1f} us" if isinstance(v, float) else f"{k:45s} {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
