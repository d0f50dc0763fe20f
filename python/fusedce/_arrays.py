"""Turning what users pass into the buffers the native core reads."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float64): "float64",
    np.dtype(np.float16): "float16",
    BFLOAT16: "bfloat16",
}


def as_array(arg: str, obj: Any) -> np.ndarray:
    """A numpy view of ``obj`` without copying where possible.

    numpy arrays pass through; objects with ``__dlpack__`` (a PyTorch or JAX
    CPU tensor) are viewed through DLPack; anything else goes through
    ``np.asarray`` (``__array__``, Python lists and numbers).
    """
    if isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "__dlpack__") and not isinstance(obj, (list, tuple)):
        try:
            return np.from_dlpack(obj)
        except (TypeError, BufferError, RuntimeError, ValueError):
            pass  # e.g. bfloat16 tensors, which numpy's DLPack does not know
    try:
        return np.asarray(obj)
    except Exception as exc:  # noqa: BLE001 - report what the user passed
        raise TypeError(
            f"{arg}: expected an array (numpy, __array__ or __dlpack__), got {type(obj).__name__}: {exc}"
        ) from exc


def float_kind(arg: str, a: np.ndarray) -> str:
    """The dtype name of a supported floating array, or TypeError."""
    kind = FLOAT_DTYPES.get(a.dtype)
    if kind is None:
        raise TypeError(
            f"{arg}: unsupported dtype {a.dtype}; expected float32, float64, float16 or bfloat16"
        )
    return kind


def native_view(a: np.ndarray) -> np.ndarray:
    """The view the native module reads: 16-bit floats as their raw bits."""
    if a.dtype.itemsize == 2:
        return a.view(np.uint16)
    return a


def is_floating(a: np.ndarray) -> bool:
    return a.dtype in FLOAT_DTYPES or np.issubdtype(a.dtype, np.floating)


def shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
