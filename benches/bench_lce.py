"""linear_cross_entropy: fusedce beside PyTorch's F.linear_cross_entropy
(reference path, options=None, and chunked path, options=LinearCrossEntropyOptions()).

Timings: all libraries in this one process, interleaved, each call preceded by an
idle gap (PyTorch's OpenMP workers spin after an op and would slow whatever
runs next); medians. Memory: each (library, case) in a fresh subprocess; peak
resident memory (VmHWM, reset through /proc/self/clear_refs once the inputs
exist) minus the resident memory before the call, and minus the returned
gradients' bytes for forward+backward ("beyond inputs and gradients").

    python benches/bench_lce.py                 # timings and memory, every case
    python benches/bench_lce.py --only timing --case fp32
    python benches/bench_lce.py --torch-rows 128  # PyTorch's bf16 reference at fewer rows

Needs torch for the PyTorch columns (pip install torch, in a separate venv);
without it only fusedce is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

import fusedce

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - benchmarks without torch
    torch = None

CASES = {
    # name: (N, D, C, dtype, backward)
    "fp32": (4096, 2048, 32000, "float32", True),
    "bf16": (4096, 2048, 32000, "bfloat16", True),
    "bf16-fwd-128k": (8192, 4096, 128256, "bfloat16", False),
    "fp32-fwd-128k-32k": (32768, 1024, 128256, "float32", False),
}
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def make_inputs(n, d, c, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    w = rng.standard_normal((c, d), dtype=np.float32)
    w *= 1.0 / np.sqrt(d)
    t = rng.integers(0, c, n)
    npd = NP_DTYPES[dtype]
    return x.astype(npd, copy=False), w.astype(npd, copy=False), t


def to_torch(a):
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def runner(lib, x, w, t, backward):
    """A zero-argument callable doing one loss (and gradient) computation."""
    if lib == "fusedce":
        if backward:
            return lambda: fusedce.linear_cross_entropy(x, w, t, return_grad=True)
        return lambda: fusedce.linear_cross_entropy(x, w, t, reduction="none")
    xt, wt, tt = to_torch(x), to_torch(w), torch.from_numpy(t)
    opts = None if lib == "torch-reference" else torch.nn.LinearCrossEntropyOptions()
    if backward:
        xt.requires_grad_(True)
        wt.requires_grad_(True)

        def fb():
            xt.grad = None
            wt.grad = None
            loss = F.linear_cross_entropy(xt, wt, tt, options=opts)
            loss.backward()
            return loss, xt.grad, wt.grad
        return fb

    def f():
        with torch.no_grad():
            return F.linear_cross_entropy(xt, wt, tt, reduction="none", options=opts)
    return f


def libs():
    return ["fusedce"] + (["torch-reference", "torch-chunked"] if torch is not None else [])


# ---- memory: one fresh process per measurement ----------------------------------------

def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(lib, case, rows):
    n, d, c, dtype, backward = CASES[case]
    if rows:
        n = rows
    x, w, t = make_inputs(n, d, c, dtype)
    fn = runner(lib, x, w, t, backward)
    base = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    grad_bytes = (x.nbytes + w.nbytes) if backward else 0
    del out
    print(json.dumps({"peak_beyond_inputs_mb": (peak - base) / 1024,
                      "beyond_inputs_and_grads_mb": (peak - base) / 1024 - grad_bytes / 2**20,
                      "seconds": dt, "rows": n}))


def memory(case, rows_for, timeout):
    res = {}
    # PyTorch would need the 16 GB of logits (and as much again for log_softmax) for the
    # fp32 forward-only case at N=32768: more than this machine has. fusedce only.
    for lib in (["fusedce"] if case.startswith("fp32-fwd-128k") else libs()):
        rows = rows_for(lib, case)
        cmd = [sys.executable, __file__, "--child", lib, "--case", case, "--rows", str(rows or 0)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            res[lib] = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {
                "error": r.stderr[-500:]}
        except subprocess.TimeoutExpired:
            res[lib] = {"error": f"no result within {timeout} s", "rows": rows}
        print(f"  memory {case:18s} {lib:16s} {res[lib]}", flush=True)
    return res


# ---- timing: all libraries in this process ---------------------------------------------

def timing(case, repeats, rows_for):
    n, d, c, dtype, backward = CASES[case]
    out = {}
    inputs = {}
    for lib in libs():
        rows = rows_for(lib, case) or n
        if rows not in inputs:
            inputs[rows] = make_inputs(rows, d, c, dtype)
        x, w, t = inputs[rows]
        out[lib] = {"rows": rows, "times": [], "fn": runner(lib, x, w, t, backward)}
    for _ in range(repeats):
        for lib, o in out.items():
            time.sleep(0.3)
            t0 = time.perf_counter()
            o["fn"]()
            o["times"].append(time.perf_counter() - t0)
    res = {}
    for lib, o in out.items():
        med = statistics.median(o["times"])
        per_row = med / o["rows"]
        res[lib] = {"rows": o["rows"], "median_s": med, "times": o["times"],
                    "median_s_scaled_to_N": per_row * n}
        flops = 2 * n * d * c * (3 if backward else 1)
        res[lib]["gflops"] = flops / (per_row * n) / 1e9
        print(f"  time   {case:18s} {lib:16s} rows={o['rows']:6d} median {med:8.3f} s "
              f"(scaled to N={n}: {per_row * n:8.3f} s, {res[lib]['gflops']:.1f} GFLOP/s)", flush=True)
    base = res["fusedce"]["median_s_scaled_to_N"]
    for lib in res:
        if lib != "fusedce":
            res[lib]["fusedce_speedup"] = res[lib]["median_s_scaled_to_N"] / base
            print(f"         fusedce speed-up over {lib}: {res[lib]['fusedce_speedup']:.2f}x")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", action="append", choices=sorted(CASES))
    ap.add_argument("--only", choices=["timing", "memory"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-rows", type=int, default=0,
                    help="rows for PyTorch's bfloat16 reference path (its CPU bf16 GEMM can be very slow); "
                         "times are then scaled to N per row and marked")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--out")
    ap.add_argument("--child", choices=["fusedce", "torch-reference", "torch-chunked"])
    ap.add_argument("--rows", type=int, default=0)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.case[0], a.rows)
        return

    def rows_for(lib, case):
        if lib == "torch-reference" and CASES[case][3] == "bfloat16" and a.torch_rows:
            return a.torch_rows
        return 0

    cases = a.case or list(CASES)
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "fusedce_threads": fusedce.get_num_threads(), "simd": fusedce.simd_level(),
                    "torch": None if torch is None else torch.__version__,
                    "torch_threads": None if torch is None else torch.get_num_threads()},
        "cases": {},
    }
    print(json.dumps(report["machine"]))
    for case in cases:
        report["cases"][case] = {"shape": CASES[case]}
        if a.only in (None, "timing") and not case.startswith("fp32-fwd-128k"):
            report["cases"][case]["timing"] = timing(case, a.repeats, rows_for)
        if a.only in (None, "memory"):
            report["cases"][case]["memory"] = memory(case, rows_for, a.timeout)
    for c in report["cases"].values():
        for r in c.get("timing", {}).values():
            r.pop("fn", None)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
