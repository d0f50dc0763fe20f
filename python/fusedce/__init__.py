"""fusedce: fused softmax cross-entropy and linear cross-entropy (and their gradients) with PyTorch's
semantics, over numpy arrays, on a SIMD multithreaded Rust core.

    >>> import numpy as np, fusedce
    >>> logits = np.random.randn(4, 10).astype(np.float32)
    >>> loss, grad = fusedce.cross_entropy(logits, np.array([1, 2, 3, 4]), return_grad=True)
"""

from __future__ import annotations

from . import _native, gpu
from ._request import LinearCrossEntropyGrads, TokenStats
from .functional import cross_entropy, linear_cross_entropy, linear_token_stats, token_stats
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss
from .options import LinearCrossEntropyOptions

__all__ = [
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
    "simd_level",
    "gpu",
]


def set_num_threads(n: int) -> None:
    """Use ``n`` worker threads (1 to 1024) from now on (default:
    ``FUSEDCE_NUM_THREADS``, else one per core). Results are bitwise
    identical for any ``n``. Raises ValueError naming ``n`` otherwise."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"n: expected an integer number of threads, got {n!r}")
    _native.set_num_threads(max(-(2**127), min(n, 2**127 - 1)))


def get_num_threads() -> int:
    """The number of worker threads."""
    return _native.get_num_threads()


def simd_level() -> str:
    """The SIMD instruction set the kernels use: "avx512", "avx2+fma" or
    "scalar" (``FUSEDCE_SIMD=scalar|avx2`` caps it, read once at start)."""
    return _native.simd_level()
