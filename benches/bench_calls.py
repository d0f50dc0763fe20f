"""Per-call time of small calls (the fixed cost: argument handling, the
request, the FFI, thread dispatch), of single long rows on 1 and 2 threads
(a row split across the threads by fixed pieces of classes; the four
measurements of a row take turns, round by round), and of two
large calls, beside PyTorch eager, torch.compile and JAX jit where they
compute the same thing, for whichever fusedce build is importable (run it
once per build to compare builds).

    python benches/bench_calls.py [--reps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

import fusedce
from _common import F, header, jax, jnp, torch


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


def alternating(calls: Dict[str, Tuple[int, Callable[[], Any]]], reps: int,
                rounds: int = 11) -> Dict[str, float]:
    """For each of ``calls`` (a thread count and a call): the median over
    rounds of the mean time of ``reps`` back-to-back calls (s). The calls take
    turns within each round, so a slow spell of a shared machine falls on
    all of them alike rather than on whichever ran then."""
    times: Dict[str, list] = {k: [] for k in calls}
    for n, fn in calls.values():
        with fusedce.threads(n):
            fn()
    for _ in range(rounds):
        for k, (n, fn) in calls.items():
            with fusedce.threads(n):
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                times[k].append((time.perf_counter() - t0) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


def ce_peers(x: np.ndarray, t: np.ndarray) -> Dict[str, Optional[Callable[[], Any]]]:
    """The forward mean loss of logits ``x`` in each peer (None if absent)."""
    out: Dict[str, Optional[Callable[[], Any]]] = {"torch eager": None, "torch.compile": None, "JAX jit": None}
    if torch is not None:
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)
        compiled = torch.compile(lambda a, b: F.cross_entropy(a, b))
        out["torch eager"] = lambda: F.cross_entropy(xt, tt)
        out["torch.compile"] = lambda: compiled(xt, tt)
    if jax is not None:
        jx, jt = jax.device_put(x), jax.device_put(t.astype(np.int32))
        f = jax.jit(lambda a, b: jnp.mean(jax.nn.logsumexp(a, -1) - jnp.take_along_axis(a, b[:, None], -1)[:, 0]))
        out["JAX jit"] = lambda: jax.block_until_ready(f(jx, jt))
    return out


def lce_peers(h, w, t) -> Dict[str, Optional[Callable[[], Any]]]:
    out: Dict[str, Optional[Callable[[], Any]]] = {"torch eager": None, "torch.compile": None, "JAX jit": None}
    if torch is not None:
        ht, wt, tt = torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(t)
        compiled = torch.compile(lambda a, b: F.cross_entropy(a @ b.T, tt))
        out["torch eager"] = lambda: F.linear_cross_entropy(ht, wt, tt)
        out["torch.compile"] = lambda: compiled(ht, wt)
    if jax is not None:
        hj, wj, tj = jax.device_put(h), jax.device_put(w), jax.device_put(t.astype(np.int32))

        def loss(a, b):
            z = a @ b.T
            return jnp.mean(jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, tj[:, None], -1)[:, 0])
        f = jax.jit(loss)
        out["JAX jit"] = lambda: jax.block_until_ready(f(hj, wj))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--json")
    a = ap.parse_args()
    print(header())
    if torch is not None:
        torch.set_num_threads(fusedce.get_num_threads())
    rng = np.random.default_rng(0)
    res: Dict[str, Any] = {"machine": header(), "fusedce": fusedce.__file__}
    x = rng.normal(size=(8, 1000)).astype(np.float32)
    t = rng.integers(0, 1000, 8)
    h = rng.normal(size=(4, 64)).astype(np.float32)
    w = (rng.normal(size=(1000, 64)) / 8).astype(np.float32)
    t4 = t[:4]
    row = rng.normal(size=(1, 32000)).astype(np.float32)
    t1 = np.array([5])
    small = {
        "ce (8, 1000) fwd": (lambda: fusedce.cross_entropy(x, t), ce_peers(x, t), a.reps),
        "lce (4, 64) x (1000, 64) fwd": (lambda: fusedce.linear_cross_entropy(h, w, t4), lce_peers(h, w, t4), a.reps),
        "ce (1, 32000) fwd": (lambda: fusedce.cross_entropy(row, t1), ce_peers(row, t1), a.reps // 4),
    }
    res["ce (8, 1000) fwd+grad"] = per_call(lambda: fusedce.cross_entropy(x, t, return_grad=True), a.reps)
    res["lce (4, 64) x (1000, 64) fwd+grad"] = per_call(
        lambda: fusedce.linear_cross_entropy(h, w, t4, return_grad=True), a.reps)
    print("| call | fusedce µs | torch eager µs | torch.compile µs | JAX jit µs |")
    print("|---|---|---|---|---|")
    with torch.no_grad() if torch is not None else contextlib.nullcontext():
        for name, (ours, peers, reps) in small.items():
            res[name] = {"fusedce": per_call(ours, reps)}
            for peer, f in peers.items():
                res[name][peer] = None if f is None else per_call(f, reps)
            cells = " | ".join("" if v is None else f"{v * 1e6:.1f}" for v in res[name].values())
            print(f"| {name} | {cells} |")
    print("\n| one long row | threads | fwd µs | fwd+grad µs |\n|---|---|---|---|")
    for c in (128256, 256000):
        xr = rng.normal(size=(1, c)).astype(np.float32) * 3
        tr = np.array([c // 3])
        g = np.empty_like(xr)
        kinds = {"fwd": lambda: fusedce.cross_entropy(xr, tr),
                 "fwd+grad": lambda: fusedce.cross_entropy(xr, tr, return_grad=True, grad_out=g)}
        took = alternating({f"{n} {k}": (n, f) for n in (1, 2) for k, f in kinds.items()}, a.reps // 8)
        for n in (1, 2):
            fwd, both = took[f"{n} fwd"], took[f"{n} fwd+grad"]
            res[f"ce (1, {c}) on {n} threads"] = {"fwd": fwd, "fwd+grad": both}
            print(f"| (1, {c}) | {n} | {fwd * 1e6:.1f} | {both * 1e6:.1f} |")
        one, two = res[f"ce (1, {c}) on 1 threads"], res[f"ce (1, {c}) on 2 threads"]
        print(f"| (1, {c}) | 2 over 1 | {one['fwd'] / two['fwd']:.2f}x | {one['fwd+grad'] / two['fwd+grad']:.2f}x |")
    big = rng.normal(size=(8192, 32000)).astype(np.float32) * 3
    tb = rng.integers(0, 32000, 8192)
    g = np.empty_like(big)
    res["ce (8192, 32000) fwd"] = per_call(lambda: fusedce.cross_entropy(big, tb), 3, 3)
    res["ce (8192, 32000) fwd+grad (reused buffer)"] = per_call(
        lambda: fusedce.cross_entropy(big, tb, return_grad=True, grad_out=g), 3, 3)
    for k, v in res.items():
        if isinstance(v, float):
            print(f"{k:45s} {v * 1e6:12.1f} us")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
