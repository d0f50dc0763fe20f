"""cross_entropy forward and forward+backward: fusedce beside PyTorch eager,
torch.compile and JAX jit, in one process, with the machine's limits
measured in the same run (``_common.limits``: 2-thread read and copy
bandwidth, exp throughput).

    python benches/bench_ce.py [--reps 3] [--quick] [--memory] [--out benches/out/ce.json]
    python benches/bench_ce.py --sweep --plot benches/plots/ce_forward.png

Times are the best of ``--reps`` after a warm-up (compilation) call, each
call after 0.3 s idle. The memory bound is the logits read once (plus the
gradient written, for forward+backward) at the measured bandwidth; beside
it, the time numpy's exp takes for one exp per logit (fusedce's own exp is
shorter, so this is a reference, not a bound). ``--sweep`` times the forward over C = 1024 .. 131072 with
N x C = 2^28 and ``--plot`` draws ns per logit against C for every library,
with the bounds as lines. Peak memory (``--memory``) is measured in fresh
subprocesses as the growth of peak RSS over the inputs already resident.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np

import fusedce
from _common import F, best, header, jax, jnp, limits, to_torch, torch

CASES = [
    # name, shape, dtype, forward+backward?
    ("fp32 (8192, 32000) fwd", (8192, 32000), "float32", False),
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
    return to_torch(x), torch.from_numpy(t)


def run_torch(xt, tt, bwd, fn=None):
    fn = fn or F.cross_entropy
    if bwd:
        xg = xt.detach().requires_grad_(True)
        loss = fn(xg, tt)
        loss.backward()
        return loss, xg.grad
    with torch.no_grad():
        return fn(xt, tt)


def jax_loss(x, t):
    """The mean loss over every sample: lse over axis 1 minus the target's logit."""
    x = x.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=1)
    picked = jnp.take_along_axis(x, t[:, None], axis=1)[:, 0]
    return jnp.mean(lse - picked)


def peers(x, t, bwd):
    """name -> a zero-argument call of each peer that is importable."""
    out = {}
    if torch is not None:
        xt, tt = torch_inputs(x, t)
        compiled = torch.compile(lambda a, b: F.cross_entropy(a, b))
        out["torch eager"] = lambda: run_torch(xt, tt, bwd)
        out["torch.compile"] = lambda: run_torch(xt, tt, bwd, compiled)
    if jax is not None:
        jx, jt = jax.device_put(x), jax.device_put(t.astype(np.int32))
        f = jax.jit(jax.value_and_grad(jax_loss) if bwd else jax_loss)
        out["JAX jit"] = lambda: jax.block_until_ready(f(jx, jt))
    return out


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


def bound(x, bwd, lim):
    """The memory bound in seconds: the logits read once (and the gradient
    written, at the copy bandwidth) by 2 threads."""
    moved = x.nbytes * (2 if bwd else 1)
    bw = lim["copy_GBps"] if bwd else lim["read_GBps"]
    return moved / (bw * 1e9)


def exp_time(x, lim):
    """Seconds numpy's exp takes for one exp per logit on 2 threads (a
    reference rate: fusedce's own exp is shorter)."""
    return x.size / (lim["exp_Gps"] * 1e9)


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


def time_case(name, shape, dtype, bwd, reps, lim):
    x, t = make(shape, dtype)
    ours = best(lambda: run_fusedce(x, t, bwd), reps)
    row = {"case": name, "fusedce_s": ours}
    if bwd:
        g = np.empty_like(x)
        row["fusedce_grad_out_reused_s"] = best(
            lambda: fusedce.cross_entropy(x, t, return_grad=True, grad_out=g), reps)
    for peer, f in peers(x, t, bwd).items():
        try:
            row[f"{peer}_s"] = best(f, reps)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run this case is reported, not fatal
            print(f"# {peer} failed on {name}: {type(e).__name__}: {str(e)[:160]}")
    known = [v for k, v in row.items() if k.endswith("_s") and not k.startswith("fusedce")]
    row["best_peer_over_fusedce"] = min(known) / ours if known else None
    row["bound_s"] = bound(x, bwd, lim)
    row["numpy_exp_s"] = exp_time(x, lim)
    row["fusedce_over_bound"] = ours / row["bound_s"]
    return row


def print_rows(rows):
    cols = ["fusedce", "fusedce_grad_out_reused", "torch eager", "torch.compile", "JAX jit"]
    print("| case | " + " | ".join(f"{c} ms" for c in cols) + " | best peer / fusedce | memory bound ms | fusedce / bound | numpy exp per logit ms |")
    print("|---|" + "---|" * (len(cols) + 4))
    for r in rows:
        cells = ["" if r.get(f"{c}_s") is None else f"{r[f'{c}_s'] * 1e3:.1f}" for c in cols]
        ratio = "" if r["best_peer_over_fusedce"] is None else f"{r['best_peer_over_fusedce']:.2f}"
        print(f"| {r['case']} | " + " | ".join(cells) + f" | {ratio} | {r['bound_s'] * 1e3:.1f} | "
              f"{r['fusedce_over_bound']:.2f} | {r['numpy_exp_s'] * 1e3:.1f} |")


def sweep(reps, lim):
    """The forward at C = 1024 .. 131072 (N x C = 2^28), ns per logit."""
    rows = []
    for c in [1024, 4096, 16384, 32000, 65536, 131072]:
        n = (1 << 28) // c
        r = time_case(f"fp32 ({n}, {c}) fwd", (n, c), "float32", False, reps, lim)
        r["c"] = c
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def plot(rows, lim, path):
    """ns per logit of the CE forward against C, every library, with the
    read-bandwidth and exp-throughput bounds as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from _common import cpu_name

    cs = [r["c"] for r in rows]
    ns = 1e9 / (1 << 28)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lib in ("fusedce", "torch eager", "torch.compile", "JAX jit"):
        ys = [None if r.get(f"{lib}_s") is None else r[f"{lib}_s"] * ns for r in rows]
        if any(y is not None for y in ys):
            ax.plot(cs, ys, marker="o", label=lib)
    ax.axhline(4 / lim["read_GBps"], color="k", ls="--",
               label=f"one read of the logits at {lim['read_GBps']:.0f} GB/s (2 threads)")
    ax.axhline(1 / lim["exp_Gps"], color="gray", ls=":",
               label=f"one exp per logit at {lim['exp_Gps']:.1f} G/s (numpy, 2 threads)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("classes C (N x C = 2^28 logits)")
    ax.set_ylabel("ns per logit (lower is better)")
    ax.set_title(f"cross_entropy forward, float32\n{cpu_name()}, {fusedce.get_num_threads()} threads")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small shapes, to check the script runs")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS growth in subprocesses")
    ap.add_argument("--numpy", action="store_true", help="also time the numpy implementation (slow)")
    ap.add_argument("--sweep", action="store_true", help="the forward over C = 1024 .. 131072 instead of the cases")
    ap.add_argument("--plot", help="with --sweep: a PNG of ns per logit against C")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    print(header())
    lim = limits()
    if args.sweep:
        rows = sweep(args.reps, lim)
        print_rows(rows)
        if args.plot:
            plot(rows, lim, args.plot)
        return
    cases = CASES
    if args.quick:
        cases = [(n, tuple(max(2, s // 64) for s in shape), d, b) for n, shape, d, b in CASES]
    results = []
    for name, shape, dtype, bwd in cases:
        row = time_case(name, shape, dtype, bwd, args.reps, lim)
        if args.numpy and dtype == "float32":
            x, t = make(shape, dtype)
            row["numpy_s"] = best(lambda: run_numpy(x, t, bwd), 1)  # noqa: B023
        if args.memory:
            row["peak_rss_growth_MB"] = {
                "fusedce": peak_rss_growth("fusedce", name, args.quick),
                "fusedce grad_out=input": peak_rss_growth("fusedce-inplace", name, args.quick) if bwd else None,
                "torch": peak_rss_growth("torch", name, args.quick) if torch else None,
            }
        print(json.dumps(row), flush=True)
        results.append(row)
    print_rows(results)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"machine": header(), "limits": lim, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
