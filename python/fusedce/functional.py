"""The functional API: ``cross_entropy`` and ``linear_cross_entropy``."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, NamedTuple, Optional, Tuple, Union, overload

import numpy as np

from . import _native
from ._arrays import as_array, float_kind, is_floating, native_view, shape_str
from .options import LinearCrossEntropyOptions, weight_copy_limit

Reduction = Literal["none", "mean", "sum"]
_REDUCTIONS = ("none", "mean", "sum")


def _check_device(device: str) -> None:
    if device not in ("cpu", "gpu", "auto"):
        raise ValueError(f"device: expected 'cpu', 'gpu' or 'auto', got {device!r}")


def _on_gpu(device: str, dtype: np.dtype, work: float, threshold: float) -> bool:
    """Whether this call runs on the GPU; float64 never does (WGSL has no f64)."""
    if device == "cpu":
        return False
    from . import gpu

    try:
        chosen = gpu.use_gpu(device, work, threshold)
    except gpu.GpuUnavailable as exc:
        raise RuntimeError(f"device: 'gpu' was asked for, but {exc}") from None
    if chosen and dtype == np.float64:
        if device == "gpu":
            warnings.warn(
                "device='gpu': WGSL has no float64, so this float64 call is computed on the CPU",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    return chosen


def _gpu_targets(targets: "_Targets", ignore_index: int, classes: int, w: Optional[np.ndarray],
                 samples: int) -> Tuple[Optional[np.ndarray], float]:
    """int32 class per sample (-1 = ignored) and the mean's denominator, with the
    core's range check (IndexError) done here, before anything is uploaded."""
    if targets.index is None:
        return None, float(samples)
    t = targets.index.reshape(-1)
    keep = t != ignore_index
    bad = keep & ((t < 0) | (t >= classes))
    if bad.any():
        i = int(np.argmax(bad))
        raise IndexError(
            f"target: Target {int(t[i])} is out of bounds (at flat position {i}); expected a class "
            f"index in [0, {classes}) or ignore_index={ignore_index}"
        )
    y = np.where(keep, t, -1).astype(np.int32)
    wy = np.where(keep, 1.0 if w is None else w[np.where(keep, t, 0)], 0.0)
    return y, float(np.sum(wy, dtype=np.float64))


def _gpu_scale(reduction: str, g_scalar: Optional[float], g_array: Optional[np.ndarray], denom: float,
               samples: int) -> np.ndarray:
    if g_array is not None:
        return g_array.reshape(-1)
    g = 1.0 if g_scalar is None else g_scalar
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.float64(g) / np.float64(denom) if reduction == "mean" else np.float64(g)
    return np.full(samples, v, dtype=np.float64)


def _gpu_loss(per: np.ndarray, reduction: str, denom: float, loss_shape: tuple, dtype: np.dtype) -> np.ndarray:
    """The loss from the device's per-sample losses: reduced on the host in
    float64, in order (the mean divided by ``denom``)."""
    if reduction == "none":
        return per.reshape(loss_shape).astype(dtype, copy=False)
    total = float(np.sum(per.astype(np.float64)))
    if reduction == "mean":
        with np.errstate(divide="ignore", invalid="ignore"):
            total = float(np.float64(total) / np.float64(denom))
    return np.asarray(total, dtype=dtype)


def _check_common(reduction: str, label_smoothing: float) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction: {reduction} is not a valid value for reduction; expected 'none', 'mean' or 'sum'"
        )
    ls = float(label_smoothing)
    if not (0.0 <= ls <= 1.0):
        raise ValueError(f"label_smoothing: must be between 0.0 and 1.0, got {label_smoothing}")


def _weight_array(weight: Any, classes: int) -> Optional[np.ndarray]:
    if weight is None:
        return None
    w = as_array("weight", weight)
    if not is_floating(w) and not np.issubdtype(w.dtype, np.integer):
        raise TypeError(f"weight: expected a floating array, got dtype {w.dtype}")
    if w.shape != (classes,):
        raise ValueError(
            f"weight: expected shape ({classes},), one weight per class, got {shape_str(w.shape)}"
        )
    return np.ascontiguousarray(w, dtype=np.float64)


class _Targets:
    """Class indices (int64) or probabilities (input dtype), told apart by
    PyTorch's rule: a target of the input's shape holds probabilities."""

    def __init__(self, target: Any, x: Any, ignore_index: int) -> None:
        # x: the logits, or anything with their .shape and .dtype
        t = as_array("target", target)
        self.index: Optional[np.ndarray] = None
        self.probs: Optional[np.ndarray] = None
        unbatched = len(x.shape) == 1
        index_shape = () if unbatched else (x.shape[0],) + tuple(x.shape[2:])
        if t.shape == tuple(x.shape) and is_floating(t):
            if ignore_index >= 0:
                raise ValueError(
                    f"ignore_index: is not supported for class-probability targets, got {ignore_index}"
                )
            self.probs = np.ascontiguousarray(t, dtype=x.dtype)
            return
        if is_floating(t):
            raise ValueError(
                f"target: expected class indices of shape {shape_str(index_shape)} (an integer array) "
                f"or class probabilities of the input's shape {shape_str(x.shape)}, "
                f"got a {t.dtype} array of shape {shape_str(t.shape)}"
            )
        if not np.issubdtype(t.dtype, np.integer):
            raise TypeError(
                f"target: expected an integer array of class indices or a floating array of "
                f"probabilities, got dtype {t.dtype}"
            )
        if t.shape != index_shape:
            if not unbatched and t.ndim >= 1 and t.shape[0] != x.shape[0]:
                raise ValueError(
                    f"target: Expected input batch_size ({x.shape[0]}) to match target batch_size "
                    f"({t.shape[0]}); expected shape {shape_str(index_shape)}, got {shape_str(t.shape)}"
                )
            raise ValueError(
                f"target: expected class indices of shape {shape_str(index_shape)} for input of shape "
                f"{shape_str(x.shape)}, got {shape_str(t.shape)}"
            )
        if t.dtype.kind == "u" and t.dtype.itemsize == 8 and t.size and int(t.max()) > np.iinfo(np.int64).max:
            raise IndexError(f"target: Target {int(t.max())} is out of bounds.")
        self.index = np.ascontiguousarray(t, dtype=np.int64)


def _grad_output(grad_output: Any, reduction: str, loss_shape: tuple) -> Tuple[Optional[float], Optional[np.ndarray]]:
    if grad_output is None:
        return 1.0, None
    g = as_array("grad_output", grad_output)
    if not (is_floating(g) or np.issubdtype(g.dtype, np.integer)):
        raise TypeError(f"grad_output: expected a floating array, got dtype {g.dtype}")
    if reduction != "none" or g.ndim == 0:
        if g.size != 1 or g.ndim != 0:
            raise ValueError(
                f"grad_output: expected a scalar (the loss is 0-d for reduction={reduction!r}), "
                f"got shape {shape_str(g.shape)}"
            )
        return float(g), None
    if g.shape != loss_shape:
        raise ValueError(
            f"grad_output: expected the loss's shape {shape_str(loss_shape)}, got {shape_str(g.shape)}"
        )
    return None, np.ascontiguousarray(g, dtype=np.float64)


def _grad_buffer(grad_out: Any, original_input: Any, x: np.ndarray) -> Tuple[str, Optional[np.ndarray]]:
    """('separate', buffer) or ('inplace', None)."""
    if grad_out is None:
        return "separate", np.empty(x.shape, dtype=x.dtype)
    if not isinstance(grad_out, np.ndarray):
        raise TypeError(f"grad_out: expected a numpy array, got {type(grad_out).__name__}")
    same = grad_out is original_input or (
        grad_out.shape == x.shape
        and grad_out.dtype == x.dtype
        and grad_out.strides == x.strides
        and grad_out.__array_interface__["data"][0] == x.__array_interface__["data"][0]
    )
    if same:
        if x is not original_input and x.__array_interface__["data"][0] != grad_out.__array_interface__["data"][0]:
            raise ValueError(
                "grad_out: in-place gradient (grad_out=input) needs the input to be a C-contiguous "
                "numpy array of a supported dtype; this input had to be converted"
            )
        if not x.flags.c_contiguous:
            raise ValueError("grad_out: in-place gradient (grad_out=input) needs a C-contiguous input")
        if not x.flags.writeable:
            raise ValueError("grad_out: in-place gradient (grad_out=input) needs a writeable input")
        return "inplace", None
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype:
        raise ValueError(
            f"grad_out: expected an array of shape {shape_str(x.shape)} and dtype {x.dtype}, "
            f"got shape {shape_str(grad_out.shape)} and dtype {grad_out.dtype}"
        )
    if not grad_out.flags.c_contiguous:
        raise ValueError("grad_out: expected a C-contiguous array")
    if not grad_out.flags.writeable:
        raise ValueError("grad_out: expected a writeable array")
    if np.shares_memory(grad_out, x):
        raise ValueError("grad_out: overlaps the input without being the input itself")
    return "separate", grad_out


@overload
def cross_entropy(input: Any, target: Any, weight: Any = ..., ignore_index: int = ...,
                  reduction: Reduction = ..., label_smoothing: float = ..., *,
                  return_grad: Literal[False] = ..., grad_output: Any = ..., grad_out: None = ...,
                  device: str = ...) -> np.ndarray: ...
@overload
def cross_entropy(input: Any, target: Any, weight: Any = ..., ignore_index: int = ...,
                  reduction: Reduction = ..., label_smoothing: float = ..., *,
                  return_grad: Literal[True], grad_output: Any = ..., grad_out: Optional[np.ndarray] = ...,
                  device: str = ...) -> Tuple[np.ndarray, np.ndarray]: ...


def cross_entropy(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    *,
    return_grad: bool = False,
    grad_output: Any = None,
    grad_out: Optional[np.ndarray] = None,
    device: str = "cpu",
) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Softmax cross-entropy with ``torch.nn.functional.cross_entropy``'s semantics,
    and its gradient from the same fused pass.

    Args:
        input: logits of shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``;
            float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``).
            Half inputs accumulate in float32. A numpy array, anything with
            ``__dlpack__`` (viewed without a copy) or ``__array__``, or a list.
            A non-C-contiguous input is copied once.
        target: class indices of shape ``()``, ``(N,)`` or ``(N, d1, ..., dK)``
            (any integer dtype), or class probabilities of the input's shape
            (a floating array): PyTorch's rule tells them apart.
        weight: per-class weights of shape ``(C,)``, or None.
        ignore_index: class-index targets equal to it contribute no loss and no
            gradient, and do not count in the mean. It may lie outside
            ``[0, C)``. Must be negative for probability targets.
        reduction: ``"none"`` (per-sample losses of shape ``(N, d1, ..., dK)``,
            or ``()`` unbatched), ``"mean"`` (divided by the summed target
            weights, or by the number of samples for probability targets) or
            ``"sum"``.
        label_smoothing: in ``[0, 1]``; mixes the target with the uniform
            distribution over classes.
        return_grad: also return the gradient of the loss w.r.t. ``input``.
        grad_output: upstream gradient: a scalar for mean/sum (default 1), an
            array of the loss's shape for ``"none"`` (default all ones).
        grad_out: a preallocated C-contiguous array of the input's shape and
            dtype for the gradient; ``grad_out=input`` overwrites the logits
            with their gradient, so no ``N x C`` memory is allocated at all.
            Needs ``return_grad=True``.
        device: ``"cpu"``, ``"gpu"`` (WGSL shaders through wgpu-py; see
            :mod:`fusedce.gpu`) or ``"auto"`` (the GPU for large problems when
            a hardware adapter is present).

    Returns:
        ``loss`` (a numpy array of the input's dtype: 0-d for mean/sum), or
        ``(loss, grad_input)`` with ``return_grad=True``; ``grad_input`` has
        the input's shape and dtype.

    Raises:
        IndexError: a class index outside ``[0, C)`` that is not ``ignore_index``.
        ValueError: shapes or values that do not fit.
        TypeError: unsupported dtypes or objects.
        RuntimeError: ``device="gpu"`` and no WebGPU adapter (the message says why).
    Nothing is written to ``grad_out`` when an exception is raised.
    """
    _check_device(device)
    _check_common(reduction, label_smoothing)
    if grad_out is not None and not return_grad:
        raise ValueError("grad_out: given without return_grad=True")
    original = input
    x = as_array("input", input)
    kind = float_kind("input", x)
    if x.ndim == 0:
        raise ValueError("input: expected shape (C,), (N, C) or (N, C, d1, ..., dK), got a 0-d array")
    x = np.ascontiguousarray(x)
    if x.ndim == 1:
        batch, classes, spatial = 1, x.shape[0], 1
        loss_shape: tuple = ()
    else:
        batch, classes = x.shape[0], x.shape[1]
        spatial = math.prod(x.shape[2:])
        loss_shape = (batch,) + x.shape[2:]
    if classes == 0:
        raise ValueError(f"input: expected at least one class, got shape {shape_str(x.shape)}")
    ignore_index = int(ignore_index)
    targets = _Targets(target, x, ignore_index)
    w = _weight_array(weight, classes)
    g_scalar, g_array = _grad_output(grad_output, reduction, loss_shape)

    if return_grad:
        mode, grad = _grad_buffer(grad_out, original, x)
    else:
        mode, grad = "none", None
    if _on_gpu(device, x.dtype, x.size, _gpu_threshold("elements")):
        from .gpu import _backend

        samples = batch * spatial
        y, denom = _gpu_targets(targets, ignore_index, classes, w, samples)
        out = x if mode == "inplace" else grad
        per = _backend.cross_entropy(
            x, batch, classes, spatial, y, targets.probs,
            np.ones(classes) if w is None else w, _gpu_scale(reduction, g_scalar, g_array, denom, samples),
            float(label_smoothing), out,
        )
        loss = _gpu_loss(per, reduction, denom, loss_shape, x.dtype)
        if out is None:
            return loss
        return loss, out
    losses = np.empty(loss_shape, dtype=x.dtype) if reduction == "none" else None
    value = _native.cross_entropy(
        native_view(x), kind, batch, classes, spatial,
        targets.index,
        None if targets.probs is None else native_view(targets.probs),
        w, ignore_index, reduction, float(label_smoothing),
        g_scalar, g_array, mode,
        None if grad is None else native_view(grad),
        None if losses is None else native_view(losses),
    )
    loss = losses if losses is not None else np.asarray(value, dtype=x.dtype)
    if not return_grad:
        return loss
    out = x if mode == "inplace" else grad
    assert out is not None  # return_grad: _grad_buffer gave a buffer
    return loss, out


class LinearCrossEntropyGrads(NamedTuple):
    """Gradients of :func:`linear_cross_entropy`'s loss, each of the shape and
    dtype of what it differentiates (``linear_bias`` is None without a bias)."""

    input: np.ndarray
    linear_weight: np.ndarray
    linear_bias: Optional[np.ndarray]


def _same_dtype(arg: str, a: np.ndarray, dtype: np.dtype) -> None:
    if a.dtype != dtype:
        raise TypeError(
            f"{arg}: expected dtype {dtype} (the input's), got {a.dtype}; convert it once "
            f"yourself (fusedce does not silently copy a weight-sized array)"
        )


@overload
def linear_cross_entropy(input: Any, linear_weight: Any, target: Any, *, linear_bias: Any = ...,
                         weight: Any = ..., reduction: Reduction = ..., ignore_index: Optional[int] = ...,
                         label_smoothing: float = ..., options: Optional[LinearCrossEntropyOptions] = ...,
                         return_grad: Literal[False] = ..., grad_output: Any = ...,
                         device: str = ...) -> np.ndarray: ...
@overload
def linear_cross_entropy(input: Any, linear_weight: Any, target: Any, *, linear_bias: Any = ...,
                         weight: Any = ..., reduction: Reduction = ..., ignore_index: Optional[int] = ...,
                         label_smoothing: float = ..., options: Optional[LinearCrossEntropyOptions] = ...,
                         return_grad: Literal[True], grad_output: Any = ...,
                         device: str = ...) -> Tuple[np.ndarray, LinearCrossEntropyGrads]: ...


def linear_cross_entropy(
    input: Any,
    linear_weight: Any,
    target: Any,
    *,
    linear_bias: Any = None,
    weight: Any = None,
    reduction: Reduction = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options: Optional[LinearCrossEntropyOptions] = None,
    return_grad: bool = False,
    grad_output: Any = None,
    device: str = "cpu",
    _gpu_cache: Optional[dict] = None,
) -> Union[np.ndarray, Tuple[np.ndarray, LinearCrossEntropyGrads]]:
    """``cross_entropy(input @ linear_weight.T + linear_bias, target)`` with the
    semantics of ``torch.nn.functional.linear_cross_entropy``, fused and chunked:
    the ``N x C`` logits never exist, only ``rows x C`` of them at a time (see
    :class:`LinearCrossEntropyOptions`; ``options=None`` is chunked too).

    Args:
        input: ``(in_features,)`` or ``(N, in_features)``; float32, float64,
            float16 or bfloat16. Half inputs compute in float32.
        linear_weight: ``(C, in_features)``, or ``(C, d1, ..., dK, in_features)``
            for a K-dimensional loss (needs a batched input); the input's dtype.
        target: class indices of shape ``()``, ``(N,)`` or ``(N, d1, ..., dK)``,
            or class probabilities of the logits' shape ``(C,)``, ``(N, C)`` or
            ``(N, C, d1, ..., dK)`` (PyTorch's rule: same shape as the logits).
        linear_bias: ``(C,)`` or ``(C, d1, ..., dK)``, or None.
        weight: per-class weights ``(C,)``, or None.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``, as in :func:`cross_entropy`.
        ignore_index: None (meaning -100 for class indices); must be None for
            probability targets.
        label_smoothing: in ``[0, 1]``.
        options: chunking and precision, or None for the defaults.
        return_grad: also return the gradients of the loss w.r.t. input,
            linear_weight and linear_bias.
        grad_output: upstream gradient (a scalar for mean/sum, the loss's shape
            for ``"none"``; default ones).
        device: ``"cpu"``, ``"gpu"`` or ``"auto"``, as for :func:`cross_entropy`.

    Returns:
        ``loss`` (the input's dtype; 0-d for mean/sum, ``()``/``(N,)``/
        ``(N, d1..dK)`` for ``"none"``), or ``(loss, LinearCrossEntropyGrads)``.

    Memory beyond the inputs and the returned arrays: one logits chunk; for
    half inputs also a float32 copy of ``linear_weight`` (when it is under a
    16th of physical memory; a larger weight is converted in 64 MiB blocks of
    classes inside every chunk) and, with gradients, a float32 accumulator of
    its gradient.

    Raises:
        IndexError: a class index out of range.
        ValueError: shapes or values that do not fit (PyTorch's RuntimeErrors).
        TypeError: unsupported or mismatched dtypes.
    """
    _check_device(device)
    _check_common(reduction, label_smoothing)
    if options is None:
        options = _DEFAULT_OPTIONS
    elif not isinstance(options, LinearCrossEntropyOptions):
        raise TypeError(
            f"options: expected a fusedce.LinearCrossEntropyOptions or None, got {type(options).__name__}"
        )
    x = as_array("input", input)
    kind = float_kind("input", x)
    if x.ndim < 1 or x.ndim > 2:
        raise ValueError(f"input: expected input with dimensionality 1 or 2, got {x.ndim}")
    w = as_array("linear_weight", linear_weight)
    if w.ndim < 2:
        raise ValueError(f"linear_weight: expected linear_weight with dimensionality at least 2, got {w.ndim}")
    in_features = x.shape[-1]
    if in_features != w.shape[-1]:
        raise ValueError(
            "linear_weight: expected equal input and linear_weight last dimensions (in_features), "
            f"got {in_features} and {w.shape[-1]}, respectively"
        )
    _same_dtype("linear_weight", w, x.dtype)
    classes = w.shape[0]
    out_features = tuple(w.shape[1:-1])
    b = None
    if linear_bias is not None:
        b = as_array("linear_bias", linear_bias)
        if b.shape != (classes, *out_features):
            raise ValueError(
                f"linear_bias: expected linear_bias shape {(classes, *out_features)}, got {tuple(b.shape)}"
            )
        _same_dtype("linear_bias", b, x.dtype)
    unbatched = x.ndim == 1
    if out_features and unbatched:
        raise ValueError(
            f"input: K-dimensional loss defined by linear_weight shape {tuple(w.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched input with shape {tuple(x.shape)}"
        )
    if classes == 0:
        raise ValueError(f"linear_weight: expected at least one class, got shape {shape_str(w.shape)}")
    batch = 1 if unbatched else x.shape[0]
    logits_shape = ((classes,) if unbatched else (batch, classes)) + out_features
    t_arr = as_array("target", target)
    is_probs = t_arr.shape == logits_shape
    if is_probs and ignore_index is not None:
        raise ValueError("ignore_index: ignore_index cannot be specified when target contains probabilities")
    ii = -100 if ignore_index is None else int(ignore_index)
    targets = _Targets(t_arr, _Shape(logits_shape, x.dtype), ii)
    cw = _weight_array(weight, classes)
    spatial = math.prod(out_features)
    loss_shape: tuple = () if unbatched else (batch,) + out_features
    g_scalar, g_array = _grad_output(grad_output, reduction, loss_shape)

    g_dtype = options.compute_dtype(x.dtype)
    rows = options.chunk_rows(batch, in_features, classes, classes * spatial * g_dtype.itemsize)

    flops = 2.0 * batch * in_features * classes * spatial * (3 if return_grad else 1)
    if _on_gpu(device, x.dtype, flops, _gpu_threshold("flops")):
        from .gpu import _backend

        samples = batch * spatial
        y, denom = _gpu_targets(targets, ii, classes, cw, samples)
        res = _backend.resident_weight(w, b, _gpu_cache)
        per, gr = _backend.linear_cross_entropy(
            x.reshape(batch, in_features), res, classes, spatial, y,
            None if targets.probs is None else targets.probs.reshape(-1),
            np.ones(classes) if cw is None else cw, _gpu_scale(reduction, g_scalar, g_array, denom, samples),
            float(label_smoothing), rows, return_grad, x.dtype,
        )
        loss = _gpu_loss(per, reduction, denom, loss_shape, x.dtype)
        if gr is None:
            return loss
        dx, dw, db = gr
        return loss, LinearCrossEntropyGrads(
            dx.reshape(x.shape), dw.reshape(w.shape), None if db is None or b is None else db.reshape(b.shape)
        )

    xc = np.ascontiguousarray(x)
    wc = np.ascontiguousarray(w)
    bc = None if b is None else np.ascontiguousarray(b)
    losses = np.empty(loss_shape, dtype=x.dtype) if reduction == "none" else None
    grads = None
    if return_grad:
        grads = LinearCrossEntropyGrads(
            np.empty(x.shape, dtype=x.dtype),
            np.empty(w.shape, dtype=x.dtype),
            None if b is None else np.empty(b.shape, dtype=x.dtype),
        )
    value = _native.linear_cross_entropy(
        native_view(xc), native_view(wc), None if bc is None else native_view(bc),
        kind, batch, in_features, classes, spatial,
        targets.index, None if targets.probs is None else native_view(targets.probs),
        cw, ii, reduction, float(label_smoothing),
        g_scalar, g_array, rows, g_dtype == np.float64 and x.dtype != np.float64, weight_copy_limit(),
        None if grads is None else native_view(grads.input),
        None if grads is None else native_view(grads.linear_weight),
        None if grads is None or grads.linear_bias is None else native_view(grads.linear_bias),
        None if losses is None else native_view(losses),
    )
    loss = losses if losses is not None else np.asarray(value, dtype=x.dtype)
    if grads is None:
        return loss
    return loss, grads


class _Shape(NamedTuple):
    shape: tuple
    dtype: np.dtype


_DEFAULT_OPTIONS = LinearCrossEntropyOptions()


def _gpu_threshold(kind: str) -> float:
    from . import gpu

    return gpu.AUTO_MIN_ELEMENTS if kind == "elements" else gpu.AUTO_MIN_FLOPS
