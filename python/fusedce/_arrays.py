"""Turning what users pass into arrays the backends read (the array
protocol, dtypes, layout), each check with one message naming the argument."""

from __future__ import annotations

from typing import Any, Optional

import ml_dtypes
import numpy as np

from . import _native

# dtype objects: comparing an array's dtype with one is faster than with a
# scalar type (and never compare one with None: numpy reads None as float64)
FLOAT32, FLOAT64, INT64 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = (FLOAT32, FLOAT64, np.dtype(np.float16), BFLOAT16)


def as_array(arg: str, obj: Any) -> np.ndarray:
    """A numpy view of ``obj`` without copying where possible.

    numpy arrays pass through; objects with ``__dlpack__`` (a PyTorch or JAX
    CPU tensor, bfloat16 included) are viewed through DLPack by the bindings
    (strides and read-only producers honoured, no copy); anything else goes
    through ``np.asarray`` (``__array__``, Python lists and numbers).
    """
    view = _zero_copy_view(arg, obj)
    if view is not None:
        return view
    try:
        return np.asarray(obj)
    except Exception as exc:  # noqa: BLE001 - report what the user passed
        hint = " (inside jax.jit, grad or vmap, use fusedce.jax)" if type(obj).__name__.endswith("Tracer") else ""
        raise TypeError(
            f"{arg}: expected an array (numpy, __array__ or __dlpack__), got {type(obj).__name__}{hint}: {exc}"
        ) from exc


def output_array(arg: str, obj: Any) -> np.ndarray:
    """The memory of an output the caller provides, viewed without a copy: a
    numpy array, or a DLPack producer (a PyTorch tensor, bfloat16 included);
    a TypeError naming ``arg`` for anything else."""
    view = _zero_copy_view(arg, obj)
    if view is not None:
        return view
    raise TypeError(f"{arg}: expected a numpy array or a DLPack tensor, got {type(obj).__name__}")


def _zero_copy_view(arg: str, obj: Any) -> Optional[np.ndarray]:
    """``obj`` itself (a numpy array) or its DLPack view; None for objects
    that can only be converted."""
    if isinstance(obj, np.ndarray):
        return obj
    if hasattr(obj, "__dlpack__") and hasattr(obj, "__dlpack_device__"):
        return from_dlpack(arg, obj)
    return None


def same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same memory."""
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype
    )


def from_dlpack(arg: str, obj: Any) -> np.ndarray:
    """A numpy view of a DLPack producer's CPU memory (any dtype fusedce
    reads; bfloat16 as ``ml_dtypes.bfloat16``), keeping the producer's
    tensor alive as long as the view."""
    try:
        view = _native.dlpack_view(arg, obj)
    except (RuntimeError, BufferError) as exc:  # the producer refused (a tensor that requires grad, say)
        raise TypeError(f"{arg}: could not be read through DLPack: {exc}") from exc
    a = np.asarray(view)
    if view.dtype == "bfloat16":
        a = a.view(BFLOAT16)
    if type(obj).__module__.partition(".")[0] in ("jax", "jaxlib"):
        a.flags.writeable = False  # JAX arrays are immutable; its legacy capsules do not say so
    return a


_DLPACK_CODES = {"f": 2, "i": 0, "u": 1, "b": 6}


def to_dlpack(a: np.ndarray) -> Any:
    """An object with ``__dlpack__`` over ``a``'s memory, any dtype
    (bfloat16 included, which numpy's own ``__dlpack__`` refuses)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"array: expected a numpy array, got {type(a).__name__}")
    if a.dtype == BFLOAT16:
        code = 4
    elif a.dtype.kind in _DLPACK_CODES and a.dtype.byteorder in "=|<":
        code = _DLPACK_CODES[a.dtype.kind]
    else:
        raise TypeError(f"array: dtype {a.dtype} has no DLPack type")
    data, read_only = a.__array_interface__["data"]
    return _native.DlpackExport(a, data, a.shape, a.strides, code, a.dtype.itemsize * 8, read_only)


def check_float_dtype(arg: str, a: np.ndarray) -> None:
    """TypeError unless ``a`` holds float32, float64, float16 or bfloat16."""
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{arg}: unsupported dtype {a.dtype}; expected float32, float64, float16 or bfloat16"
        )


def readable(a: np.ndarray, dtype: Any = None) -> np.ndarray:
    """``a`` (of ``dtype``) as an aligned C-contiguous array: itself when it
    already is one, else one copy."""
    flags = a.flags
    if (dtype is None or a.dtype == dtype) and flags.c_contiguous and flags.aligned:
        return a
    return np.array(a, dtype=dtype, order="C", copy=True)


def check_writable(arg: str, a: np.ndarray) -> None:
    """ValueError unless the output ``a`` can be written in place."""
    if not (a.flags.c_contiguous and a.flags.aligned):
        raise ValueError(f"{arg}: expected an aligned C-contiguous array")
    if not a.flags.writeable:
        raise ValueError(f"{arg}: expected a writeable array")


def is_floating(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" or a.dtype == BFLOAT16


def shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
