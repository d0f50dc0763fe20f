"""Latency and throughput of examples/scoring_service.py under uvicorn on
127.0.0.1, at several client concurrencies, with the server process's CPU
use beside them (above 100% means requests computed on several cores at
once: the GIL is released while fusedce computes).

    python benches/bench_service.py [--vocab 32000 --hidden 1024 --tokens 128 --requests 48]

Needs fusedce[service]. Prints a markdown table for benches/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

import fusedce

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "scoring_service.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(args, threads_per_request: int):
    port = free_port()
    proc = subprocess.Popen([sys.executable, EXAMPLE, "--port", str(port), "--vocab", str(args.vocab),
                             "--hidden", str(args.hidden), "--threads-per-request", str(threads_per_request)])
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("service did not start")


async def burst(url, bodies, concurrency):
    sem = asyncio.Semaphore(concurrency)
    lat = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(b):
            async with sem:
                t = time.perf_counter()
                r = await client.post("/score", json=b)
                lat.append(time.perf_counter() - t)
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0, np.array(lat)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=48)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(args.requests):
        h = rng.standard_normal((args.tokens, args.hidden)).astype("<f4")
        bodies.append({"tokens": rng.integers(0, args.vocab, args.tokens).tolist(),
                       "hidden_b64": base64.b64encode(h.tobytes()).decode(), "top_k": 5})
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, SIMD {fusedce.simd_level()}, "
          f"{time.strftime('%Y-%m-%d')}; head {args.vocab} x {args.hidden} float32, {args.tokens} tokens "
          f"per request, {args.requests} requests per row")
    print("| threads per request | concurrent clients | p50 ms | p99 ms | requests/s | server CPU use |")
    print("|---|---|---|---|---|---|")
    for tpr, levels in ((1, (1, 2, 4, 8)), (2, (1, 2))):
        proc, url = start(args, tpr)
        try:
            asyncio.run(burst(url, bodies[:4], 2))  # warm-up
            for c in levels:
                cpu0 = cpu_seconds(proc.pid)
                wall, lat = asyncio.run(burst(url, bodies, c))
                cpu = (cpu_seconds(proc.pid) - cpu0) / wall
                p50, p99 = np.percentile(lat * 1e3, [50, 99])
                print(f"| {tpr} | {c} | {p50:.1f} | {p99:.1f} | {len(bodies) / wall:.1f} | {cpu * 100:.0f}% |")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
