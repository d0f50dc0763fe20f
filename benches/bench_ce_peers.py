"""cross_entropy forward and token statistics against PyTorch eager,
torch.compile and JAX jit, in one process, one run, beside the machine's
read bandwidth (numpy's max over the same logits, 2 threads not used by
numpy: a single-thread lower bound) and fusedce's own ns per logit.

    python benches/bench_ce_peers.py --shape 8192,32000 --shape 2048,128256

Best of --repeats after a warm-up (compilation) call; each call preceded by
0.3 s idle (PyTorch's OpenMP workers spin after an op).
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
try:
    import jax
    import jax.numpy as jnp
except ImportError:  # pragma: no cover
    jax = None


def best(f, repeats):
    f()
    out = []
    for _ in range(repeats):
        gc.collect()
        time.sleep(0.3)
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return min(out)


def three_stats_ref(lib, x, t):
    """lse, the target's log-prob and the entropy, in the library's ops."""
    if lib == "torch":
        logp = torch.log_softmax(x, -1)
        lse = torch.logsumexp(x, -1)
        return lse, logp.gather(1, t[:, None])[:, 0], -(logp.exp() * logp).sum(-1)
    logp = jax.nn.log_softmax(x, -1)
    lse = jax.nn.logsumexp(x, -1)
    return lse, jnp.take_along_axis(logp, t[:, None], 1)[:, 0], -(jnp.exp(logp) * logp).sum(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", default=[])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--plot", help="write a PNG of ns per logit against the class count (CE forward)")
    a = ap.parse_args()
    results = []
    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shape] or [(8192, 32000)]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
    print(f"# {cpu}, {os.cpu_count()} CPUs, fusedce SIMD {fusedce.simd_level()}, {fusedce.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}; torch {torch.__version__ if torch else 'absent'}, jax {jax.__version__ if jax else 'absent'}")
    print("| N, C | what | fusedce ms | ns/logit | torch eager | torch.compile | JAX jit | best peer / fusedce |")
    print("|---|---|---|---|---|---|---|---|")
    for n, c in shapes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, c), dtype=np.float32)
        t = rng.integers(0, c, n)
        rows = {
            "CE forward (mean)": (lambda: fusedce.cross_entropy(x, t),
                                  lambda tx, tt: F.cross_entropy(tx, tt),
                                  lambda jx, jt: jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(jx, -1), jt[:, None], 1))),
            "lse, logprob, entropy": (lambda: fusedce.token_stats(x, t, stats=("lse", "logprob", "entropy")),
                                      lambda tx, tt: three_stats_ref("torch", tx, tt),
                                      lambda jx, jt: three_stats_ref("jax", jx, jt)),
            "token_stats default (+argmax, rank)": (lambda: fusedce.token_stats(x, t), None, None),
        }
        read = best(lambda: x.max(), a.repeats)
        results.append(dict(c=c, what="read", fusedce=read / x.size * 1e9))
        print(f"| {n}, {c} | numpy x.max() (1 thread, reads the logits once) | {read * 1e3:.1f} | {read / x.size * 1e9:.3f} | | | | |")
        for name, (ours, tf, jf) in rows.items():
            f = best(ours, a.repeats)
            peers = []
            if torch is not None and tf is not None:
                tx, tt = torch.from_numpy(x), torch.from_numpy(t)
                with torch.no_grad():
                    eager = best(lambda: tf(tx, tt), a.repeats)
                    comp = torch.compile(tf)
                    compiled = best(lambda: comp(tx, tt), a.repeats)
                peers += [eager, compiled]
            else:
                peers += [None, None]
            if jax is not None and jf is not None:
                jx, jt = jnp.asarray(x), jnp.asarray(t)
                jj = jax.jit(jf)
                peers.append(best(lambda: jax.block_until_ready(jj(jx, jt)), a.repeats))
            else:
                peers.append(None)
            cells = " | ".join("" if p is None else f"{p * 1e3:.1f}" for p in peers)
            known = [p for p in peers if p is not None]
            results.append(dict(c=c, what=name, fusedce=f / x.size * 1e9,
                                **{k: None if p is None else p / x.size * 1e9
                                   for k, p in zip(("torch eager", "torch.compile", "JAX jit"), peers)}))
            ratio = f"{min(known) / f:.2f}" if known else ""
            print(f"| {n}, {c} | {name} | {f * 1e3:.1f} | {f / x.size * 1e9:.3f} | {cells} | {ratio} |")
    if a.plot:
        plot(results, a.plot, cpu)


def plot(results, path, cpu):
    """ns per logit of the CE forward against C, every library, with the
    single-thread read of the logits (numpy's max) as the memory line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ce = [r for r in results if r["what"] == "CE forward (mean)"]
    cs = [r["c"] for r in ce]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for lib in ("fusedce", "torch eager", "torch.compile", "JAX jit"):
        ys = [r.get(lib) for r in ce]
        if any(y is not None for y in ys):
            ax.plot(cs, ys, marker="o", label=lib)
    reads = [r["fusedce"] for r in results if r["what"] == "read"]
    ax.plot(cs, reads, "k--", label="one read of the logits (numpy max, 1 thread)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("classes C (N x C = 2^28 logits)")
    ax.set_ylabel("ns per logit (lower is better)")
    ax.set_title(f"cross_entropy forward, float32\n{cpu}, 2 threads")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
