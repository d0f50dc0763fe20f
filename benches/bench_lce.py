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

Peers beside PyTorch's two paths: torch.compile and JAX jit of the unfused
expression ``cross_entropy(x @ W.T, t)`` (they build the N x C logits). The
sgemm rate of this machine (numpy's BLAS, ``(1024, D) @ (D, C)``) is measured
in the same run, and every rate is also given as a fraction of it ("useful"
GFLOP/s: 2·N·D·C forward, 3x that with the gradients). ``--plot`` draws
GFLOP/s per case and library against the sgemm rate.

torch and jax are optional (in a separate venv); a missing one is noted and
its columns left empty.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

import fusedce
from _common import F, header, jax, jnp, sgemm_rate, to_torch, torch

CASES = {
    # name: (N, D, C, dtype, backward)
    "fp32-2k": (2048, 2048, 32000, "float32", True),
    "fp32": (4096, 2048, 32000, "float32", True),
    "fp32-2k-fwd": (2048, 2048, 32000, "float32", False),
    "fp32-fwd": (4096, 2048, 32000, "float32", False),
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


def runner(lib, x, w, t, backward):
    """A zero-argument callable doing one loss (and gradient) computation."""
    if lib == "fusedce":
        if backward:
            return lambda: fusedce.linear_cross_entropy(x, w, t, return_grad=True)
        return lambda: fusedce.linear_cross_entropy(x, w, t, reduction="none")
    if lib == "jax-jit-unfused":
        return jax_runner(x, w, t, backward)
    xt, wt, tt = to_torch(x), to_torch(w), torch.from_numpy(t)
    reduction = "mean" if backward else "none"
    if lib == "torch.compile-unfused":
        fn = torch.compile(lambda a, b: F.cross_entropy(a @ b.T, tt, reduction=reduction))
    else:
        opts = None if lib == "torch-reference" else torch.nn.LinearCrossEntropyOptions()

        def fn(a, b):
            return F.linear_cross_entropy(a, b, tt, reduction=reduction, options=opts)
    return torch_runner(xt, wt, fn, backward)


def torch_runner(xt, wt, fn, backward):
    """``fn(x, w)`` (and its backward) on PyTorch tensors."""
    if backward:
        xt.requires_grad_(True)
        wt.requires_grad_(True)

        def fb():
            xt.grad = None
            wt.grad = None
            loss = fn(xt, wt)
            loss.backward()
            return loss, xt.grad, wt.grad
        return fb

    def f():
        with torch.no_grad():
            return fn(xt, wt)
    return f


def jax_runner(x, w, t, backward):
    """JAX jit of the unfused expression (float32 logits from any input)."""
    def losses(a, b):
        z = jnp.dot(a, b.T, preferred_element_type=jnp.float32)
        return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, tj[:, None], axis=-1)[:, 0]

    xj, wj, tj = jax.device_put(x), jax.device_put(w), jax.device_put(t.astype(np.int32))
    if backward:
        f = jax.jit(jax.value_and_grad(lambda a, b: jnp.mean(losses(a, b)), argnums=(0, 1)))
    else:
        f = jax.jit(losses)
    return lambda: jax.block_until_ready(f(xj, wj))


def libs(with_unfused=True):
    out = ["fusedce"]
    if torch is not None:
        out += ["torch-reference", "torch-chunked"] + (["torch.compile-unfused"] if with_unfused else [])
    if jax is not None and with_unfused:
        out.append("jax-jit-unfused")
    return out


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
    for lib in (["fusedce"] if case.startswith("fp32-fwd-128k") else libs(with_unfused=False)):
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
    rate = sgemm_rate(d, c)
    print(f"  sgemm  {case:18s} numpy (1024, {d}) @ ({d}, {c}): {rate:.1f} GFLOP/s", flush=True)
    for lib in libs():
        rows = rows_for(lib, case) or n
        if rows not in inputs:
            inputs[rows] = make_inputs(rows, d, c, dtype)
        x, w, t = inputs[rows]
        out[lib] = {"rows": rows, "times": [], "fn": runner(lib, x, w, t, backward)}
    for lib, o in list(out.items()):  # warm-up (compilation), and drop a peer that cannot run
        try:
            o["fn"]()
        except Exception as e:  # noqa: BLE001
            print(f"  {lib} failed on {case}: {type(e).__name__}: {str(e)[:160]}", flush=True)
            del out[lib]
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
        res[lib]["of_sgemm"] = res[lib]["gflops"] / rate
        print(f"  time   {case:18s} {lib:22s} rows={o['rows']:6d} median {med:8.3f} s "
              f"(scaled to N={n}: {per_row * n:8.3f} s, {res[lib]['gflops']:.1f} GFLOP/s, "
              f"{res[lib]['of_sgemm']:.2f} of sgemm)", flush=True)
    res["sgemm_gflops"] = rate
    base = res["fusedce"]["median_s_scaled_to_N"]
    for lib in res:
        if lib not in ("fusedce", "sgemm_gflops"):
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
    ap.add_argument("--plot", help="a PNG of GFLOP/s per case against the sgemm rate")
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
    report = {"machine": header(), "cases": {}}
    print(report["machine"])
    for case in cases:
        report["cases"][case] = {"shape": CASES[case]}
        if a.only in (None, "timing") and not case.startswith("fp32-fwd-128k"):
            report["cases"][case]["timing"] = timing(case, a.repeats, rows_for)
        if a.only in (None, "memory"):
            report["cases"][case]["memory"] = memory(case, rows_for, a.timeout)
    for c in report["cases"].values():
        for r in c.get("timing", {}).values():
            if isinstance(r, dict):
                r.pop("fn", None)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    if a.plot:
        plot(report, a.plot)


def plot(report, path):
    """GFLOP/s of every library per case, with each case's sgemm rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(k, v["timing"]) for k, v in report["cases"].items() if "timing" in v]
    names = libs()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(names)
    for i, lib in enumerate(names):
        ys = [t.get(lib, {}).get("gflops", 0.0) for _, t in cases]
        ax.bar([j + i * width for j in range(len(cases))], ys, width, label=lib)
    for j, (_, t) in enumerate(cases):
        ax.hlines(t["sgemm_gflops"], j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="--",
                  label="numpy sgemm rate" if j == 0 else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{k}\n{report['cases'][k]['shape'][:3]}" for k, _ in cases], fontsize=7)
    ax.set_ylabel("useful GFLOP/s (higher is better)")
    ax.set_title(f"linear_cross_entropy\n{report['machine'][2:].split(';')[0]}", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
