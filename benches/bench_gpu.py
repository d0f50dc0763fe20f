"""The GPU path beside the CPU path, with achieved GB/s and GFLOP/s.
(No PyTorch-CUDA column yet: no GPU was available to write and check it on.)

On a machine without a GPU this runs on Mesa's lavapipe (a software Vulkan
adapter): small shapes, there to watch for regressions, not to compare speeds.

    python benches/bench_gpu.py            # small shapes (lavapipe)
    python benches/bench_gpu.py --large    # the anchor shapes (a real GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import fusedce

SMALL = {
    "ce": [(256, 1000), (64, 32000)],
    "lce": [(256, 256, 1000), (128, 512, 4096)],
}
LARGE = {
    "ce": [(8192, 32000), (2048, 128256)],
    "lce": [(4096, 2048, 32000)],
}


def timed(fn, repeats):
    fn()  # warm-up: pipelines, first dispatch
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--large", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args()
    shapes = LARGE if a.large else SMALL
    info = fusedce.gpu.adapter_info()
    print(json.dumps({k: info[k] for k in ("device", "adapter_type", "backend_type", "description")}))
    rng = np.random.default_rng(0)
    rows = []
    for n, c in shapes["ce"]:
        x = rng.standard_normal((n, c), dtype=np.float32)
        t = rng.integers(0, c, n)
        nbytes = 2 * x.nbytes  # logits read, gradient written
        for dev in ("cpu", "gpu"):
            s = timed(lambda: fusedce.cross_entropy(x, t, return_grad=True, device=dev), a.repeats)
            rows.append({"op": "cross_entropy fwd+bwd", "shape": [n, c], "device": dev, "seconds": s,
                         "GB/s": nbytes / s / 1e9})
            print(f"cross_entropy        {str((n, c)):22s} {dev}: {s * 1e3:9.2f} ms  {nbytes / s / 1e9:7.2f} GB/s")
    for n, d, c in shapes["lce"]:
        x = rng.standard_normal((n, d), dtype=np.float32)
        w = (rng.standard_normal((c, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
        t = rng.integers(0, c, n)
        flops = 6.0 * n * d * c
        for dev in ("cpu", "gpu"):
            s = timed(lambda: fusedce.linear_cross_entropy(x, w, t, return_grad=True, device=dev), a.repeats)
            rows.append({"op": "linear_cross_entropy fwd+bwd", "shape": [n, d, c], "device": dev,
                         "seconds": s, "GFLOP/s": flops / s / 1e9})
            print(f"linear_cross_entropy {str((n, d, c)):22s} {dev}: {s * 1e3:9.2f} ms  {flops / s / 1e9:7.2f} GFLOP/s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"adapter": info, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
