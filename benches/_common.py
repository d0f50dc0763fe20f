"""What every benchmark here shares: the machine line, the timers, the
optional peers (PyTorch, JAX; a printed note when one is missing) and the
machine's own limits, measured in the same run:

- read and copy bandwidth on 2 threads (numpy on halves of a 512 MiB array,
  one Python thread each: numpy releases the GIL in these loops);
- exp throughput on 2 threads (numpy's vectorised float32 ``exp`` over a
  block that stays in L1, so memory plays no part);
- the sgemm rate (numpy's BLAS on a ``(1024, D) @ (D, C)`` float32 product).

Benchmarks import it as ``_common`` (run them as ``python benches/x.py``).
"""

from __future__ import annotations

import gc
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional

import numpy as np

import fusedce


def _optional(name: str) -> Optional[Any]:
    try:
        return __import__(name)
    except ImportError:
        print(f"# note: {name} is not importable here; its columns are left empty")
        return None


torch = _optional("torch")
jax = _optional("jax")
if torch is not None:
    import torch.nn.functional as F  # noqa: N812
else:
    F = None
if jax is not None:
    import jax.numpy as jnp
else:
    jnp = None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header() -> str:
    """One line: CPU, SIMD level, threads, date and the peers' versions."""
    return (f"# {cpu_name()}, {os.cpu_count()} CPUs, fusedce {fusedce.__version__} SIMD "
            f"{fusedce.simd_level()}, {fusedce.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}; "
            f"torch {torch.__version__ if torch else 'absent'}"
            f"{f' ({torch.get_num_threads()} threads)' if torch else ''}, "
            f"jax {jax.__version__ if jax else 'absent'}")


def best(f: Callable[[], Any], repeats: int, idle: float = 0.3) -> float:
    """Best of ``repeats`` timed calls after one warm-up (compilation) call;
    each preceded by ``idle`` seconds, so that the OpenMP workers of the
    library timed before have stopped spinning."""
    f()
    times = []
    for _ in range(repeats):
        gc.collect()
        time.sleep(idle)
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def best_interleaved(fs: Dict[str, Callable[[], Any]], repeats: int, idle: float = 0.0) -> Dict[str, float]:
    """Best time of each of ``fs``, run round-robin so that a slow phase of
    a shared machine hits all of them alike."""
    for f in fs.values():
        f()
    ts: Dict[str, list] = {name: [] for name in fs}
    for _ in range(repeats):
        for name, f in fs.items():
            time.sleep(idle)
            t0 = time.perf_counter()
            f()
            ts[name].append(time.perf_counter() - t0)
    return {name: min(v) for name, v in ts.items()}


def _on_halves(fn: Callable[[slice], Any], n: int, threads: int = 2) -> None:
    step = -(-n // threads)
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(fn, [slice(i, min(n, i + step)) for i in range(0, n, step)]))


def bandwidth(threads: int = 2, mib: int = 512, repeats: int = 5) -> Dict[str, float]:
    """Read (``max``) and copy (``copyto``) bandwidth in GB/s on ``threads``
    threads over ``mib`` MiB (bytes read, or read plus written)."""
    a = np.ones(mib << 18, np.float32)
    b = np.empty_like(a)
    read = best(lambda: _on_halves(lambda s: a[s].max(), a.size, threads), repeats, idle=0.05)
    copy = best(lambda: _on_halves(lambda s: np.copyto(b[s], a[s]), a.size, threads), repeats, idle=0.05)
    return {"read_GBps": a.nbytes / read / 1e9, "copy_GBps": 2 * a.nbytes / copy / 1e9}


def exp_rate(threads: int = 2, repeats: int = 5) -> float:
    """float32 exponentials per second (billions) of numpy's vectorised
    ``exp`` on ``threads`` threads, each over its own 4096-value block
    (in L1) 4096 times."""
    blocks = [np.linspace(-80, 0, 4096, dtype=np.float32) for _ in range(threads)]
    outs = [np.empty_like(b) for b in blocks]

    def one(i: int) -> None:
        for _ in range(4096):
            np.exp(blocks[i], out=outs[i])

    def run() -> None:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(one, range(threads)))
    t = best(run, repeats, idle=0.05)
    return threads * 4096 * 4096 / t / 1e9


def sgemm_rate(d: int, c: int, repeats: int = 3) -> float:
    """GFLOP/s of numpy's BLAS on a ``(1024, d) @ (d, c)`` float32 product."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1024, d), dtype=np.float32)
    b = rng.standard_normal((d, c), dtype=np.float32)
    return 2 * 1024 * d * c / best(lambda: a @ b, repeats, idle=0.05) / 1e9


def limits(threads: int = 2) -> Dict[str, float]:
    """The machine's limits that bound a cross-entropy pass, printed."""
    out = dict(bandwidth(threads), exp_Gps=exp_rate(threads))
    print(f"# limits, {threads} threads: read {out['read_GBps']:.1f} GB/s, copy {out['copy_GBps']:.1f} GB/s "
          f"(read + write), numpy float32 exp {out['exp_Gps']:.2f} G/s")
    return out


def to_torch(a: np.ndarray) -> Any:
    """A PyTorch tensor over ``a`` (bfloat16 through its bits)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def to_jax(a: np.ndarray) -> Any:
    return jax.device_put(a)
