"""Per-token statistics: fusedce.token_stats / linear_token_stats beside
fusedce's own losses on the same inputs, and beside PyTorch eager,
torch.compile and JAX jit computing the same statistics, in one process,
interleaved, best of ``--reps``; with the machine's own limit beside them
(one read of the logits by numpy, ``x.max()``, and ``_common.limits``: the
2-thread read and copy bandwidth and exp throughput). Peak memory of each fusedce
call is measured in a fresh subprocess as the growth of peak RSS.

    python benches/bench_stats.py [--reps 5] [--out benches/out/stats.json]

The peers compute, from logits ``z`` (or ``h @ W.T``): ``lse``,
``log_softmax`` gathered at the target, the entropy, the argmax, the target's
rank and (where asked) ``topk(50)``, forward only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

import fusedce
from _common import best, best_interleaved, header, limits

N, C = 8192, 32000
LN, LD, LC = 1024, 1024, 32000


def torch_peers(x, t, k):
    try:
        import torch
    except ImportError:
        return {}

    def stats(z, t):
        logp = torch.log_softmax(z, -1)
        lse = torch.logsumexp(z, -1)
        p = logp.exp()
        ent = -(p * logp).sum(-1)
        lp = logp.gather(1, t[:, None])[:, 0]
        zt = z.gather(1, t[:, None])
        rank = (z > zt).sum(-1)
        out = (lse, lp, ent, z.argmax(-1), rank)
        return out + tuple(torch.topk(logp, k, -1)) if k else out

    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    compiled = torch.compile(stats)
    with torch.no_grad():
        compiled(xt, tt)  # compile outside the timing
        return {"torch eager": lambda: stats(xt, tt), "torch.compile": lambda: compiled(xt, tt)}


def jax_peer(x, t, k):
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return {}

    def stats(z, t):
        logp = jax.nn.log_softmax(z, -1)
        lse = jax.nn.logsumexp(z, -1)
        ent = -(jnp.exp(logp) * logp).sum(-1)
        lp = jnp.take_along_axis(logp, t[:, None], 1)[:, 0]
        zt = jnp.take_along_axis(z, t[:, None], 1)
        rank = (z > zt).sum(-1)
        out = (lse, lp, ent, z.argmax(-1), rank)
        return out + tuple(jax.lax.top_k(logp, k)) if k else out

    f = jax.jit(stats)
    zj, tj = jax.device_put(x), jax.device_put(t.astype(np.int32))
    jax.block_until_ready(f(zj, tj))
    return {"jax jit": lambda: jax.block_until_ready(f(zj, tj))}


def peak_rss_growth(setup: str, call: str) -> float:
    """MiB by which the peak RSS of a fresh process grows during ``call``,
    over its RSS after ``setup`` (the peak is reset in between through
    /proc/self/clear_refs, so the setup's own temporaries do not count)."""
    prog = f"""
import numpy as np, fusedce
rng = np.random.default_rng(0)
{setup}
def kib(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1])
fusedce.token_stats(np.zeros((2, 3), np.float32))  # the pool and the module are up
with open('/proc/self/clear_refs', 'w') as fh:
    fh.write('5')
before = kib('VmRSS')
{call}
print((kib('VmHWM') - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ce = rows["fusedce cross_entropy fwd"]
    names = [n for n in rows if not n.startswith("fusedce linear")]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1))
    ratios = [rows[n] / ce for n in names]
    colors = ["tab:blue" if n.startswith("fusedce") else "tab:gray" for n in names]
    ax.barh(names[::-1], ratios[::-1], color=colors[::-1])
    ax.set_xscale("log")
    ax.set_xlabel("time / fusedce cross_entropy forward (log scale; lower is faster)")
    ax.set_title(f"token statistics, ({N}, {C}) fp32, {fusedce.simd_level()}, "
                 f"{fusedce.get_num_threads()} threads", fontsize=10)
    for i, r in enumerate(ratios[::-1]):
        ax.text(r, i, f" {r:.2f}x", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="a PNG of the times relative to cross_entropy's forward")
    args = ap.parse_args()
    print(header())
    lim = limits()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C), dtype=np.float32) * 3
    t = rng.integers(0, C, N)
    rows = {}
    rows.update(best_interleaved({
        "numpy x.max() (one read of the logits)": lambda: x.max(),
        "fusedce cross_entropy fwd": lambda: fusedce.cross_entropy(x, t),
        "fusedce token_stats (default stats)": lambda: fusedce.token_stats(x, t),
        "fusedce token_stats top_k=50": lambda: fusedce.token_stats(x, t, top_k=50),
    }, args.reps))
    h = rng.standard_normal((LN, LD), dtype=np.float32)
    w = rng.standard_normal((LC, LD), dtype=np.float32) * 0.03
    lt = rng.integers(0, LC, LN)
    lin = {
        "fusedce linear_cross_entropy fwd": lambda: fusedce.linear_cross_entropy(h, w, lt),
        "fusedce linear_token_stats fwd": lambda: fusedce.linear_token_stats(h, w, lt),
        "fusedce linear_cross_entropy fwd+grad": lambda: fusedce.linear_cross_entropy(h, w, lt, return_grad=True),
        "fusedce linear_token_stats fwd+grad": lambda: fusedce.linear_token_stats(
            h, w, lt, return_grad=True, grad_logprob=1.0, grad_entropy=0.1),
    }
    rows.update(best_interleaved(lin, max(2, args.reps // 2)))
    # the peers last: their thread pools may keep spinning after a call
    for k in (0, 50):
        for name, f in {**torch_peers(x, t, k), **jax_peer(x, t, k)}.items():
            rows[f"{name} stats{' top_k=50' if k else ''}"] = best(f, args.reps)
    logits = "x = rng.standard_normal((8192, 32000), dtype=np.float32); t = rng.integers(0, 32000, 8192)"
    head = ("h = rng.standard_normal((1024, 1024), dtype=np.float32); "
            "w = rng.standard_normal((32000, 1024), dtype=np.float32) * 0.03; t = rng.integers(0, 32000, 1024)")
    mem = {
        "token_stats (8192, 32000) fp32, top_k=50": peak_rss_growth(logits, "fusedce.token_stats(x, t, top_k=50)"),
        "token_stats with its gradient written over the logits (grad_out=x)": peak_rss_growth(
            logits, "fusedce.token_stats(x, t, return_grad=True, grad_logprob=1.0, grad_out=x)"),
        "linear_token_stats (1024, 1024) x (32000, 1024) fp32, with gradients": peak_rss_growth(
            head, "fusedce.linear_token_stats(h, w, t, return_grad=True, grad_logprob=1.0)"),
        "linear_cross_entropy, same shapes, with gradients": peak_rss_growth(
            head, "fusedce.linear_cross_entropy(h, w, t, return_grad=True)"),
        "linear_token_stats (8192, 1024) x (32000, 1024) fp32 fwd (N x C = 1000 MiB)": peak_rss_growth(
            head.replace("(1024, 1024)", "(8192, 1024)").replace("0, 32000, 1024)", "0, 32000, 8192)"),
            "fusedce.linear_token_stats(h, w, t)"),
    }
    ce = rows["fusedce cross_entropy fwd"]
    lce = rows["fusedce linear_cross_entropy fwd"]
    print(f"logits ({N}, {C}) float32 = {x.nbytes / 2**20:.0f} MiB; linear ({LN}, {LD}) x ({LC}, {LD})")
    for name, s in rows.items():
        base = lce if name.startswith("fusedce linear") and "fwd+grad" not in name else ce
        if "fwd+grad" in name:
            base = rows["fusedce linear_cross_entropy fwd+grad"]
        print(f"  {name:55s} {s * 1e3:9.1f} ms   {s / base:6.2f}x")
    for name, mib in mem.items():
        print(f"  peak RSS growth, {name}: {mib:.0f} MiB")
    if args.plot:
        plot(rows, args.plot)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"machine": header(), "limits": lim, "seconds": rows, "peak_rss_growth_mib": mem},
                      fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
