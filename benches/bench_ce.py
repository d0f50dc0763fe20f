"""Side-by-side benchmark of fusedce.cross_entropy against PyTorch (CPU) and
numpy, in the same process, paired runs, medians and ratios.

    python benches/bench_ce.py [--reps 3] [--quick] [--out benches/out/ce.json]

PyTorch is optional (``pip install torch``, ideally in a separate venv with
fusedce installed too); without it only numpy is compared. Peak memory is
measured in fresh subprocesses (``--memory``) as the growth of peak RSS over
the inputs already resident.
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
except ImportError:  # noqa: S110
    torch = None

CASES = [
    # name, shape, dtype, forward+backward?
    ("fp32 (8192, 32000) fwd+bwd", (8192, 32000), "float32", True),
    ("fp32 (2048, 128256) fwd", (2048, 128256), "float32", False),
    ("fp32 (2048, 128256) fwd+bwd", (2048, 128256), "float32", True),
    ("fp32 (65536, 1000) fwd+bwd", (65536, 1000), "float32", True),
    ("fp32 seg (8, 21, 512, 512) fwd+bwd", (8, 21, 512, 512), "float32", True),
    ("bf16 (8192, 32000) fwd+bwd", (8192, 32000), "bfloat16", True),
]


def make(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= 3
    if dtype == "bfloat16":
        x = x.astype(ml_dtypes.bfloat16)
    t = rng.integers(0, shape[1], size=(shape[0],) + tuple(shape[2:]))
    return x, t


def run_fusedce(x, t, bwd):
    if bwd:
        return fusedce.cross_entropy(x, t, return_grad=True)
    return fusedce.cross_entropy(x, t)


def torch_inputs(x, t):
    if x.dtype == ml_dtypes.bfloat16:
        xt = torch.from_numpy(x.view(np.uint16).astype(np.int32) << 16).view(torch.float32).to(torch.bfloat16)
    else:
        xt = torch.from_numpy(x)
    return xt, torch.from_numpy(t)


def run_torch(xt, tt, bwd):
    if bwd:
        xg = xt.detach().requires_grad_(True)
        loss = F.cross_entropy(xg, tt)
        loss.backward()
        return loss, xg.grad
    with torch.no_grad():
        return F.cross_entropy(xt, tt)


def run_numpy(x, t, bwd):
    """A straightforward float32 numpy implementation (materialises N x C temporaries)."""
    x = x.astype(np.float32, copy=False)
    xm = np.moveaxis(x, 1, -1)
    m = xm.max(axis=-1, keepdims=True)
    e = np.exp(xm - m)
    s = e.sum(axis=-1, keepdims=True)
    lse = (m + np.log(s))[..., 0]
    picked = np.take_along_axis(xm, t[..., None], axis=-1)[..., 0]
    loss = (lse - picked).mean()
    if not bwd:
        return loss
    g = e / s
    np.put_along_axis(g, t[..., None], np.take_along_axis(g, t[..., None], axis=-1) - 1, axis=-1)
    g /= t.size
    return loss, np.moveaxis(g, -1, 1)


def timed(fn):
    # Let the other library's worker threads go idle first: OpenMP workers
    # spin-wait for a while after a parallel region and would otherwise steal
    # the cores from whichever call runs next.
    time.sleep(0.3)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def copy_bandwidth():
    """Bytes moved per second (read + write) by a large memcpy-like copy."""
    a = np.ones(256 * 1024 * 1024 // 4, np.float32)
    b = np.empty_like(a)
    best = min(timed(lambda: np.copyto(b, a)) for _ in range(5))  # noqa: B023
    return 2 * a.nbytes / best


def peak_rss_growth(lib, name, quick):
    code = f"""
import resource, sys
sys.argv = ['x']
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import bench_ce as b
case = [c for c in b.CASES if c[0] == {name!r}][0]
shape = tuple(max(2, s // 64) for s in case[1]) if {quick!r} else case[1]
x, t = b.make(shape, case[2])
if {lib!r} == 'torch':
    xt, tt = b.torch_inputs(x, t); del x
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1])
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
base = status('VmRSS:')
if {lib!r} == 'torch':
    out = b.run_torch(xt, tt, case[3])
elif {lib!r} == 'fusedce-inplace':
    out = b.fusedce.cross_entropy(x, t, return_grad=True, grad_out=x)
else:
    out = b.run_fusedce(x, t, case[3])
print((status('VmHWM:') - base) / 1024)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(r.stdout.strip()) if r.returncode == 0 else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small shapes, to check the script runs")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS growth in subprocesses")
    ap.add_argument("--numpy", action="store_true", help="also time the numpy implementation (slow)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cases = CASES
    if args.quick:
        cases = [(n, tuple(max(2, s // 64) for s in shape), d, b) for n, shape, d, b in CASES]
    bw = copy_bandwidth()
    info = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "threads": fusedce.get_num_threads(),
        "simd": fusedce.simd_level(),
        "torch": torch.__version__ if torch else None,
        "torch_threads": torch.get_num_threads() if torch else None,
        "copy_bandwidth_GBps": bw / 1e9,
    }
    print(json.dumps(info))
    results = []
    for name, shape, dtype, bwd in cases:
        x, t = make(shape, dtype)
        xt, tt = torch_inputs(x, t) if torch else (None, None)
        run_fusedce(x, t, bwd)  # warm up
        if torch:
            run_torch(xt, tt, bwd)
        ours, theirs = [], []
        for _ in range(args.reps):  # paired, interleaved
            ours.append(timed(lambda: run_fusedce(x, t, bwd)))
            if torch:
                theirs.append(timed(lambda: run_torch(xt, tt, bwd)))
        moved = x.nbytes * (2 if bwd else 1)
        row = {
            "case": name,
            "fusedce_s": statistics.median(ours),
            "torch_s": statistics.median(theirs) if theirs else None,
            "bandwidth_bound_s": moved / bw,
        }
        row["speedup_vs_torch"] = row["torch_s"] / row["fusedce_s"] if theirs else None
        row["fraction_of_bandwidth_bound"] = row["bandwidth_bound_s"] / row["fusedce_s"]
        if args.numpy and dtype == "float32":
            row["numpy_s"] = timed(lambda: run_numpy(x, t, bwd))
            row["speedup_vs_numpy"] = row["numpy_s"] / row["fusedce_s"]
        if args.memory:
            row["peak_rss_growth_MB"] = {
                "fusedce": peak_rss_growth("fusedce", name, args.quick),
                "fusedce grad_out=input": peak_rss_growth("fusedce-inplace", name, args.quick) if bwd else None,
                "torch": peak_rss_growth("torch", name, args.quick) if torch else None,
            }
        print(json.dumps(row), flush=True)
        results.append(row)
        del x, t, xt, tt
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
