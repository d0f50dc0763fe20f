"""Turning what users pass into arrays the backends read (the array
protocol, dtypes, layout), each check with one message naming the argument."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BFLOAT16)


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


def check_float_dtype(arg: str, a: np.ndarray) -> None:
    """TypeError unless ``a`` holds float32, float64, float16 or bfloat16."""
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{arg}: unsupported dtype {a.dtype}; expected float32, float64, float16 or bfloat16"
        )


def readable(a: np.ndarray, dtype: Any = None) -> np.ndarray:
    """``a`` (of ``dtype``) as an aligned C-contiguous array: itself when it
    already is one, else one copy."""
    if (dtype is None or a.dtype == dtype) and a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.array(a, dtype=dtype, order="C", copy=True)


def check_writable(arg: str, a: np.ndarray) -> None:
    """ValueError unless the output ``a`` can be written in place."""
    if not (a.flags.c_contiguous and a.flags.aligned):
        raise ValueError(f"{arg}: expected an aligned C-contiguous array")
    if not a.flags.writeable:
        raise ValueError(f"{arg}: expected a writeable array")


def is_floating(a: np.ndarray) -> bool:
    return a.dtype in FLOAT_DTYPES or np.issubdtype(a.dtype, np.floating)


def shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
