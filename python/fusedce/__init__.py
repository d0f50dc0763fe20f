"""fusedce: fused softmax cross-entropy and linear cross-entropy (and their gradients) with PyTorch's
semantics, over numpy arrays, on a SIMD multithreaded Rust core.

    >>> import numpy as np, fusedce
    >>> logits = np.random.randn(4, 10).astype(np.float32)
    >>> loss, grad = fusedce.cross_entropy(logits, np.array([1, 2, 3, 4]), return_grad=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

from . import _native, gpu, shard
from ._arrays import to_dlpack
from ._request import LinearCrossEntropyGrads, TokenStats
from .functional import cross_entropy, linear_cross_entropy, linear_token_stats, token_stats
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss
from .options import LinearCrossEntropyOptions

try:
    __version__: str = version("fusedce")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "cross_entropy",
    "CrossEntropyLoss",
    "linear_cross_entropy",
    "LinearCrossEntropyGrads",
    "LinearCrossEntropyLoss",
    "LinearCrossEntropyOptions",
    "token_stats",
    "linear_token_stats",
    "TokenStats",
    "set_num_threads",
    "get_num_threads",
    "threads",
    "simd_level",
    "to_dlpack",
    "gpu",
    "shard",
]


def _thread_count(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n: expected an integer number of threads, got {n!r}")
    return max(-(2**127), min(n, 2**127 - 1))


def set_num_threads(n: int) -> None:
    """Use ``n`` worker threads (1 to 1024) in every later call, process-wide
    (default: ``FUSEDCE_NUM_THREADS``, else the CPUs this process may use:
    its affinity mask capped by its cgroup's CPU quota, as a container's
    ``--cpus`` sets it). Results are bitwise identical for any ``n``.
    Raises ValueError naming ``n`` otherwise."""
    _native.set_num_threads(_thread_count(n))


def get_num_threads() -> int:
    """The number of worker threads a call made now from this thread uses
    (the innermost :func:`threads` block's, else the process default)."""
    return _native.get_num_threads()


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run the calls made from this thread inside the block on ``n`` worker
    threads (1 to 1024), then restore the previous setting. Thread-local: a
    request served on another thread keeps its own count, and nothing
    process-wide changes. (Per OS thread: asyncio tasks sharing a thread
    share the setting.) Results are bitwise identical for any ``n``::

        with fusedce.threads(1):
            loss = fusedce.cross_entropy(logits, target)
    """
    previous = _native.set_call_threads(_thread_count(n))
    try:
        yield
    finally:
        _native.set_call_threads(previous)


def simd_level() -> str:
    """The SIMD instruction set the kernels use: "avx512+bf16", "avx512",
    "avx2+fma" or "scalar" (``FUSEDCE_SIMD=scalar|avx2|avx512`` caps it, read
    once at start). At "avx512+bf16" the logits of bfloat16 linear calls
    are bfloat16 dot products (bfloat16 subnormal inputs count as zero)."""
    return _native.simd_level()
