"""``LinearCrossEntropyOptions``: the fields and validation of
``torch.nn.LinearCrossEntropyOptions``, and how fusedce reads them.

fusedce always takes the fused, chunked path: with ``options=None`` too, the
``N x C`` logits are never built; only ``rows x C`` of them at a time. The
options choose how many rows a chunk holds and the precision the chunk is
computed in.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Literal, Optional

import numpy as np

from ._arrays import BFLOAT16, FLOAT32, FLOAT64

_VALID_ACC_POLICIES = ("auto", "accurate", "compact")
_ACC_DTYPES = {
    np.dtype(np.float16): "float16",
    BFLOAT16: "bfloat16",
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
}


def _acc_dtype(value: Any) -> Optional[np.dtype]:
    if value is None:
        return None
    try:
        dt = np.dtype(getattr(value, "name", value) if not isinstance(value, (np.dtype, type)) else value)
    except TypeError:
        dt = None
    if dt is None or dt not in _ACC_DTYPES:
        raise ValueError(
            "acc_dtype: must be one of {None, float16, bfloat16, float32, float64} "
            f"(numpy dtypes or their names), got {value!r}. Pass acc_dtype=None to let "
            "fusedce pick."
        )
    return dt


@dataclasses.dataclass(frozen=True)
class LinearCrossEntropyOptions:
    """How :func:`fusedce.linear_cross_entropy` chunks its rows.

    Same fields, defaults and validation as ``torch.nn.LinearCrossEntropyOptions``.
    In fusedce every call is chunked (``options=None`` behaves as
    ``LinearCrossEntropyOptions()``); per chunk of ``rows`` rows one buffer of
    ``rows x C x d1..dK`` logits in the compute dtype exists, and is turned
    into its gradient in place.

    Attributes:
        batch_chunk_size: rows per chunk, or None. With ``chunking_method="auto"``
            an explicit size wins; with ``None`` as the method, None means one
            chunk of all rows. If it and an explicit method give different
            sizes, ValueError (as PyTorch).
        chunking_method: ``"auto"`` (default): rows such that the logits chunk
            stays within a budget derived from this machine (a 256th of
            physical memory, between 16 and 64 MiB), but at least 512 rows
            (the GEMMs stream the weight once per chunk and need that many
            rows to run near full speed) as long as the chunk stays under a
            32nd of physical memory; between 1 and N rows.
            ``FUSEDCE_CHUNK_BYTES=<bytes>`` sets a hard budget instead.
            ``"aspect_ratio"`` / ``"aspect_ratio:N"``: PyTorch's rule,
            ``next_pow2(ceil(N / ceil(C / in_features))) // N``, capped at N.
            ``None``: :attr:`batch_chunk_size` (or one chunk).
        acc_policy: ``"auto"``, ``"accurate"`` or ``"compact"``; validated. The
            CPU path always computes as PyTorch's ``"accurate"`` policy does for
            CPU inputs: logits, their gradient and the weight gradient in the
            accumulation dtype (float32 for half inputs), so the policy does
            not change results here.
        acc_dtype: None (float32 for float16/bfloat16 inputs, else the input's
            dtype), or one of float16, bfloat16, float32, float64. ``float64``
            computes every chunk (GEMMs included) in float64. The computation
            never runs below float32: a half ``acc_dtype`` means float32, and
            float64 inputs always compute in float64.
        allow_retain_graph: validated and kept for compatibility; fusedce has
            no autograd graph, and gradients are returned, never consumed.
    """

    allow_retain_graph: bool = False
    batch_chunk_size: Optional[int] = None
    chunking_method: Optional[str] = "auto"
    acc_policy: Literal["accurate", "compact", "auto"] = "auto"
    acc_dtype: Any = None

    def __post_init__(self) -> None:
        if self.acc_policy not in _VALID_ACC_POLICIES:
            raise ValueError(
                f"acc_policy: invalid acc_policy: {self.acc_policy!r}; expected one of "
                f"{', '.join(map(repr, _VALID_ACC_POLICIES))}"
            )
        if self.chunking_method is not None and self.chunking_method != "auto":
            if not isinstance(self.chunking_method, str):
                raise ValueError(f"chunking_method: invalid chunking_method: {self.chunking_method!r}")
            name, sep, factor = self.chunking_method.partition(":")
            if not sep:
                factor = "1"
            if not (name == "aspect_ratio" and factor.isascii() and factor.isdecimal() and int(factor) > 0):
                raise ValueError(
                    f"chunking_method: invalid chunking_method: {self.chunking_method!r}; expected "
                    "'auto', 'aspect_ratio', 'aspect_ratio:N' (N >= 1) or None"
                )
        bcs = self.batch_chunk_size
        if not (bcs is None or (isinstance(bcs, (int, np.integer)) and not isinstance(bcs, bool) and bcs > 0)):
            raise ValueError(f"batch_chunk_size: must be positive int or None, got {bcs!r}")
        if not isinstance(self.allow_retain_graph, (bool, np.bool_)):
            raise ValueError(f"allow_retain_graph: expected a bool, got {self.allow_retain_graph!r}")
        object.__setattr__(self, "acc_dtype", _acc_dtype(self.acc_dtype))

    def chunk_rows(self, num_batches: int, in_features: int, num_classes: int, row_bytes: int) -> int:
        """Rows per chunk for these shapes (``row_bytes``: bytes of one row of
        logits in the compute dtype). Raises ValueError where PyTorch does."""
        n = max(1, num_batches)
        method = self.chunking_method
        if method == "auto" and self.batch_chunk_size is not None:
            method = None
        if method is None:
            return n if self.batch_chunk_size is None else min(int(self.batch_chunk_size), n)
        if method == "auto":
            return auto_rows(n, row_bytes)
        factor = int(method.split(":", 1)[1]) if ":" in method else 1
        inc = -(-num_classes // max(1, in_features))
        target = -(-n // max(1, inc))
        rows = max(1, min((1 << (target - 1).bit_length()) // factor, n))
        if self.batch_chunk_size is not None and int(self.batch_chunk_size) != rows:
            raise ValueError(
                f"batch_chunk_size: batch_chunk_size (={self.batch_chunk_size}) and chunking_method "
                f"('{method}') give different chunk sizes ({self.batch_chunk_size} vs {rows}); pass only one."
            )
        return rows

    def compute_dtype(self, input_dtype: np.dtype) -> np.dtype:
        """The dtype chunks are computed in for an input of ``input_dtype``."""
        # (`acc_dtype` is None by default, and numpy reads `dtype == None` as float64)
        if input_dtype == FLOAT64 or (self.acc_dtype is not None and self.acc_dtype == FLOAT64):
            return FLOAT64
        return FLOAT32


# Rows below which the GEMMs lose efficiency: the weight is streamed (and
# packed) once per chunk, so a chunk must hold enough rows to amortise it.
# Measured here (AVX2, D=4096, C=128256, forward): 128 rows ran at 103
# GFLOP/s, 256 at 125, 512 at 152.
EFFICIENT_ROWS = 512


def auto_rows(n: int, row_bytes: int) -> int:
    """``chunking_method="auto"``: as many rows as fit the chunk budget, but
    at least EFFICIENT_ROWS while that chunk stays under a 32nd of physical
    memory; between 1 and ``n``. ``FUSEDCE_CHUNK_BYTES`` sets a hard budget
    instead (no minimum)."""
    row_bytes = max(1, row_bytes)
    hard = _env_budget()
    if hard is not None:
        return max(1, min(n, hard // row_bytes))
    rows = max(_chunk_budget() // row_bytes, EFFICIENT_ROWS)
    cap = max(1, _physical_memory() // 32 // row_bytes)
    return max(1, min(n, rows, cap))


_MAX_BYTES = 2**62


def _env_bytes(name: str, minimum: int) -> Optional[int]:
    """The byte count in the environment variable ``name`` (None when unset);
    a value that is not an integer in ``[minimum, 2**62]`` is a ValueError
    naming the variable."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        v = int(raw.strip())
    except ValueError:
        v = None
    if v is None or not minimum <= v <= _MAX_BYTES:
        raise ValueError(f"{name}: expected a number of bytes between {minimum} and 2**62, got {raw!r}")
    return v


def _env_budget() -> Optional[int]:
    return _env_bytes("FUSEDCE_CHUNK_BYTES", 1)


@functools.lru_cache(maxsize=1)
def _physical_memory() -> int:
    """The machine's physical memory in bytes (read once: it does not change)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _chunk_budget() -> int:
    return int(min(64 << 20, max(16 << 20, _physical_memory() // 256)))


def weight_copy_limit() -> int:
    """Bytes up to which a weight that needs converting (half inputs, or
    ``acc_dtype=float64``) is converted once and kept for the call: a 16th of
    physical memory (``FUSEDCE_WEIGHT_COPY_BYTES`` overrides it). A larger
    weight is converted in blocks of classes inside every chunk: more
    conversion work (measured: 5-10% slower at (8192, 4096, 128256)), memory
    bounded by one 64 MiB block."""
    env = _env_bytes("FUSEDCE_WEIGHT_COPY_BYTES", 0)
    return _physical_memory() // 16 if env is None else env
