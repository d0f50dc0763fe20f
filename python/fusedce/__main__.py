"""``python -m fusedce``: a short demonstration on a language-model-sized
shape that checks itself against a float64 reference and reports what it did.

Part 1: cross_entropy over given logits. Part 2: linear_cross_entropy, the
logits of a language-model head computed chunk by chunk and never stored,
then the per-token statistics a scoring service wants from the same head
(linear_token_stats: log-probs, entropy, rank, top-5; perplexity), with a
check that a token's results do not depend on the batch around it.
Part 3 (when a WebGPU adapter exists): the same on the GPU path.

Options: ``--tokens N --classes C --hidden D --threads T`` (defaults 4096 x
32000, D = 1024 for part 2)."""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

import fusedce


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (Linux) in MiB, or NaN."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb() -> float:
    """Peak resident memory since start, or since the last _reset_peak()."""
    peak = _status_mb("VmHWM")
    if peak == peak:  # not NaN
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _reset_peak() -> bool:
    """Restarts the peak (Linux: /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--no-gpu", action="store_true", help="skip part 3")
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
    del x, xi, grad
    ok &= _linear_part(n, args.hidden, c, ls, t)
    if not args.no_gpu:
        ok &= _gpu_part(rng, c, ls)
    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


def _linear_part(n: int, d: int, c: int, ls: float, t: np.ndarray) -> bool:
    print(f"linear_cross_entropy: {n} tokens, hidden {d}, {c} classes, float32 "
          f"(the logits would take {n * c * 4 / 1e6:.0f} MB; they are never stored)")
    rng = np.random.default_rng(1)
    h = rng.standard_normal((n, d), dtype=np.float32)
    w = (rng.standard_normal((c, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    flops = 2.0 * n * d * c
    base = _rss_mb()
    reset = _reset_peak()
    t0 = time.perf_counter()
    per_token = fusedce.linear_cross_entropy(h, w, t, reduction="none", label_smoothing=ls)
    t_f = time.perf_counter() - t0
    t0 = time.perf_counter()
    loss, g = fusedce.linear_cross_entropy(h, w, t, label_smoothing=ls, return_grad=True)
    t_fb = time.perf_counter() - t0
    grown = _peak_rss_mb() - base
    print(f"  mean loss            {float(loss):.6f}")
    print(f"  per-token losses     {t_f:8.2f} s  ({flops / t_f / 1e9:5.1f} GFLOP/s)")
    print(f"  loss + gradients     {t_fb:8.2f} s  ({3 * flops / t_fb / 1e9:5.1f} GFLOP/s)")
    # float64 check of a few rows: their logits, loss and input gradient
    rows = np.arange(0, n, max(1, n // 16))
    rows = rows[t[rows] != -100]
    logits = h[rows].astype(np.float64) @ w.T.astype(np.float64)
    r_loss, r_dl = _reference(logits.astype(np.float32), t[rows], ls)
    denom = float((t != -100).sum())
    r_dx = (r_dl / denom) @ w.astype(np.float64)
    ok = bool(np.allclose(per_token[rows], r_loss, rtol=1e-4, atol=1e-5))
    ok &= bool(np.allclose(g.input[rows], r_dx, rtol=1e-3, atol=1e-3 * float(np.abs(r_dx).max())))
    ok &= bool(abs(float(per_token[t != -100].astype(np.float64).mean()) - float(loss)) <= 1e-5 * abs(float(loss)))
    print(f"  check vs float64 on {len(rows)} rows (loss and input gradient): {'OK' if ok else 'MISMATCH'}")
    gbytes = (g.input.nbytes + g.linear_weight.nbytes) / 2**20
    if reset:
        print(f"  peak memory beyond the inputs: {grown:.0f} MiB, of which the returned gradients "
              f"{gbytes:.0f} MiB (the logits alone would be {n * c * 4 / 2**20:.0f} MiB)")
    return ok and _stats_part(h, w, t)


def _stats_part(h: np.ndarray, w: np.ndarray, t: np.ndarray) -> bool:
    n, c = h.shape[0], w.shape[0]
    print(f"linear_token_stats: the same {n} tokens scored against the head (log-prob, entropy, "
          f"rank, top-5)")
    t0 = time.perf_counter()
    st = fusedce.linear_token_stats(h, w, t, top_k=5)
    t_s = time.perf_counter() - t0
    assert st.logprob is not None and st.entropy is not None and st.rank is not None
    real = t != -100
    ppl = float(np.exp(-st.logprob[real].astype(np.float64).mean()))
    print(f"  {t_s:8.2f} s; perplexity {ppl:.1f} (random targets and head: about {c} expected), mean entropy "
          f"{float(st.entropy.mean()):.3f}, target in the top-5 for {float((st.rank[real] < 5).mean()):.1%}")
    rows = np.arange(0, n, max(1, n // 16))
    z = h[rows].astype(np.float64) @ w.T.astype(np.float64)
    lse = np.logaddexp.reduce(z, axis=1)
    tr = np.where(real[rows], t[rows], 0)
    want_lp = np.where(real[rows], z[np.arange(len(rows)), tr] - lse, 0.0)
    want_rank = np.where(real[rows], (z > z[np.arange(len(rows)), tr][:, None]).sum(1), -1)
    close = bool(np.allclose(st.logprob[rows], want_lp, rtol=2e-5, atol=4e-6 * float(np.abs(lse).max())))
    close &= bool(np.array_equal(st.rank[rows], want_rank))
    alone = fusedce.linear_token_stats(h[rows[1]:rows[1] + 1], w, t[rows[1]:rows[1] + 1], top_k=5)
    same = all(np.array_equal(getattr(alone, f)[0], getattr(st, f)[rows[1]])
               for f in ("lse", "logprob", "entropy", "rank", "topk_ids", "topk_logprobs"))
    print(f"  check vs float64 on {len(rows)} rows (log-prob, rank): {'OK' if close else 'MISMATCH'}; "
          f"token {rows[1]} scored alone gives the same bits as in the batch: {same}")
    return close and same


def _gpu_part(rng: np.random.Generator, c: int, ls: float) -> bool:
    if not fusedce.gpu.is_available():
        print("GPU path: no WebGPU adapter here (pip install 'fusedce[gpu]'; on a machine without a GPU, "
              "apt-get install mesa-vulkan-drivers gives a software one); skipped")
        return True
    info = fusedce.gpu.adapter_info()
    n = 256
    print(f"GPU path on {info.get('device')} ({info.get('adapter_type')}, {info.get('backend_type')}): "
          f"{n} tokens x {c} classes")
    x = rng.standard_normal((n, c), dtype=np.float32) * 3
    t = rng.integers(0, c, size=n)
    t0 = time.perf_counter()
    lg, gg = fusedce.cross_entropy(x, t, label_smoothing=ls, return_grad=True, device="gpu")
    t_g = time.perf_counter() - t0
    lc, gc = fusedce.cross_entropy(x, t, label_smoothing=ls, return_grad=True)
    ok = bool(np.allclose(lg, lc, rtol=1e-5) and np.allclose(gg, gc, rtol=1e-4, atol=1e-7))
    print(f"  loss + gradient      {t_g * 1e3:8.1f} ms (first call: device and pipelines included); "
          f"matches the CPU path: {'OK' if ok else 'MISMATCH'}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
