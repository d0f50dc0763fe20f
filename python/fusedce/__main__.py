"""``python -m fusedce``: a short demonstration on a language-model-sized
shape that checks itself against a float64 reference and reports what it did.

Options: ``--tokens N --classes C --threads T`` (defaults 4096 x 32000)."""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

import fusedce


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reference(x: np.ndarray, t: np.ndarray, ls: float):
    """float64 per-row losses and gradients (unit upstream gradient per row)."""
    x = x.astype(np.float64)
    c = x.shape[1]
    m = x.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    logp = x - lse
    tgt = np.full_like(x, ls / c)
    tgt[np.arange(len(t)), t] += 1 - ls
    return -(tgt * logp).sum(axis=1), np.exp(logp) - tgt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusedce", description=__doc__)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    args = ap.parse_args(argv)
    if args.threads:
        fusedce.set_num_threads(args.threads)
    n, c, ls = args.tokens, args.classes, args.label_smoothing
    print(f"fusedce: {n} tokens x {c} classes, float32, label_smoothing={ls}; "
          f"{fusedce.get_num_threads()} threads, SIMD {fusedce.simd_level()}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c), dtype=np.float32) * 3
    t = rng.integers(0, c, size=n)
    t[::17] = -100  # some padding tokens, ignored
    rss0 = _peak_rss_mb()

    t0 = time.perf_counter()
    loss = fusedce.cross_entropy(x, t, label_smoothing=ls)
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss2, grad = fusedce.cross_entropy(x, t, label_smoothing=ls, return_grad=True)
    t_fb = time.perf_counter() - t0
    gb = x.nbytes / 1e9
    print(f"  mean loss            {float(loss):.6f}")
    print(f"  forward              {t_fwd * 1e3:8.1f} ms  ({gb / t_fwd:5.1f} GB/s of logits read)")
    print(f"  forward + gradient   {t_fb * 1e3:8.1f} ms  ({2 * gb / t_fb:5.1f} GB/s read + written)")

    # in place: the logits become their gradient, no N x C allocation
    xi = x.copy()
    rss_before_inplace = _peak_rss_mb()
    t0 = time.perf_counter()
    loss3, _ = fusedce.cross_entropy(xi, t, label_smoothing=ls, return_grad=True, grad_out=xi)
    t_ip = time.perf_counter() - t0
    grown = _peak_rss_mb() - rss_before_inplace
    print(f"  in place (grad_out=input) {t_ip * 1e3:6.1f} ms, peak RSS grew {grown:.1f} MB")

    # check a slice against float64
    rows = np.arange(0, n, max(1, n // 64))
    keep = t[rows] != -100
    r_loss, r_grad = _reference(x[rows][keep], t[rows][keep], ls)
    denom = float((t != -100).sum())
    ok = True
    ok &= bool(np.allclose(grad[rows][keep] * denom, r_grad, rtol=1e-4, atol=1e-6))
    ok &= bool((grad[rows][~keep] == 0).all())
    full_grad_check = bool(np.array_equal(xi, grad))
    ok &= bool(loss2 == loss and loss3 == loss and full_grad_check)
    per_row = fusedce.cross_entropy(x[rows][keep], t[rows][keep], label_smoothing=ls, reduction="none")
    ok &= bool(np.allclose(per_row, r_loss, rtol=1e-5))
    print(f"  check vs float64 on {keep.sum()} rows: {'OK' if ok else 'MISMATCH'}; "
          f"in-place gradient identical to separate buffer: {full_grad_check}")
    print(f"  peak RSS {_peak_rss_mb():.0f} MB (logits {x.nbytes / 1e6:.0f} MB, "
          f"gradient {grad.nbytes / 1e6:.0f} MB; RSS before the calls {rss0:.0f} MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
