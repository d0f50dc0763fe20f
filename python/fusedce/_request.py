"""Requests: what one call asks for, checked once and frozen.

The public functions turn their arguments into one request; the CPU backend
(``_cpu``, the Rust core) and the GPU backend (``gpu``) take the same
request. Checks are split by owner, each in one place with one message:
structure (types, shapes, dtypes, the array protocol, where outputs go) is
checked here; values (the reduction's name, ``label_smoothing``'s range,
class indices, ``ignore_index`` with probabilities) are the core's, for both
backends (the GPU backend asks the core for its target plan first).
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Literal, NamedTuple, Optional, Tuple, Union, cast

import numpy as np

from ._arrays import (
    FLOAT64,
    INT64,
    as_array,
    check_float_dtype,
    check_writable,
    is_floating,
    output_array,
    readable,
    same_memory,
    shape_str,
)
from .options import LinearCrossEntropyOptions, weight_copy_limit

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
Device = Literal["cpu", "gpu", "auto"]
DEVICES = ("cpu", "gpu", "auto")


class Problem(NamedTuple):
    """The loss problem: shapes, targets and every option of the loss."""

    batch: int
    classes: int
    #: product of ``d1..dK`` (1 without them)
    spatial: int
    #: int64 class indices, or probabilities in the input's dtype (C-contiguous)
    target: np.ndarray
    #: float64 ``(C,)``, or None
    weight: Optional[np.ndarray]
    ignore_index: int
    reduction: str
    label_smoothing: float
    #: a number, or float64 of the loss's shape (``reduction='none'``)
    grad_output: Union[float, np.ndarray]
    loss_shape: Tuple[int, ...]
    #: ``c`` of ``c * tanh(x / c)`` applied to the logits, or None
    softcap: Optional[float]
    #: coefficient of ``lse**2`` added to each kept sample's loss
    z_loss: float

    @property
    def samples(self) -> int:
        return self.batch * self.spatial

    @property
    def probs(self) -> Optional[np.ndarray]:
        return None if self.target.dtype == INT64 else self.target


class CrossEntropyRequest(NamedTuple):
    problem: Problem
    #: the logits, aligned and C-contiguous
    input: np.ndarray
    #: None (loss only), ``input`` itself (in place) or a buffer of its shape
    grad: Optional[np.ndarray]
    #: the per-sample losses, for ``reduction='none'``
    loss: Optional[np.ndarray]
    #: "cpu" or "gpu"
    device: str


class LinearCrossEntropyGrads(NamedTuple):
    """Gradients of :func:`fusedce.linear_cross_entropy`'s loss, each of the
    shape and dtype of what it differentiates (``linear_bias`` is None
    without a bias)."""

    input: np.ndarray
    linear_weight: np.ndarray
    linear_bias: Optional[np.ndarray]


class LinearCrossEntropyRequest(NamedTuple):
    problem: Problem
    #: ``(N, in_features)``, aligned and C-contiguous
    input: np.ndarray
    #: ``(C, d1..dK, in_features)``, aligned and C-contiguous
    linear_weight: np.ndarray
    linear_bias: Optional[np.ndarray]
    in_features: int
    chunk_rows: int
    acc_f64: bool
    max_weight_copy: int
    grads: Optional[LinearCrossEntropyGrads]
    loss: Optional[np.ndarray]
    device: str


# ---- arguments --------------------------------------------------------------------------

def check_device(device: Any) -> Device:
    if not isinstance(device, str) or device not in DEVICES:
        raise ValueError(f"device: expected 'cpu', 'gpu' or 'auto', got {device!r}")
    return cast(Device, device)


def int_arg(arg: str, v: Any) -> int:
    """An integer argument in int64's range (TypeError for other types)."""
    if type(v) is int:  # the common case, without the slow ABC check
        if _INT64_MIN <= v <= _INT64_MAX:
            return v
    elif not isinstance(v, numbers.Integral):
        raise TypeError(f"{arg}: expected an integer, got {type(v).__name__} {v!r}")
    i = int(v)
    if not _INT64_MIN <= i <= _INT64_MAX:
        raise ValueError(f"{arg}: expected an integer in [-2**63, 2**63), got {i}")
    return i


def float_arg(arg: str, v: Any) -> float:
    """A real-number argument (TypeError for strings, arrays, ...)."""
    if type(v) is float:  # the common case, without the slow ABC check
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{arg}: expected a float, got {type(v).__name__} {v!r}")
    return float(v)


def reduction_arg(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"reduction: expected 'none', 'mean' or 'sum', got {type(v).__name__} {v!r}")
    return v


def weight_arg(weight: Any, classes: int) -> Optional[np.ndarray]:
    if weight is None:
        return None
    w = as_array("weight", weight)
    if not is_floating(w) and not np.issubdtype(w.dtype, np.integer):
        raise TypeError(f"weight: expected a floating array, got dtype {w.dtype}")
    if w.shape != (classes,):
        raise ValueError(
            f"weight: expected shape ({classes},), one weight per class, got {shape_str(w.shape)}"
        )
    return readable(w, FLOAT64)


def _class_indices(t: np.ndarray) -> np.ndarray:
    """Integer class indices as int64 (a uint64 index beyond int64's range
    is out of bounds, as PyTorch says)."""
    if t.dtype.kind == "u" and t.dtype.itemsize == 8 and t.size and int(t.max()) > _INT64_MAX:
        raise IndexError(f"target: Target {int(t.max())} is out of bounds.")
    return readable(t, INT64)


def _target(target: Any, logits_shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Class indices (int64) or probabilities (``dtype``), told apart by
    PyTorch's rule: a floating target of the logits' shape holds probabilities."""
    t = as_array("target", target)
    unbatched = len(logits_shape) == 1
    index_shape = () if unbatched else (logits_shape[0],) + tuple(logits_shape[2:])
    if t.dtype == INT64 and t.shape == index_shape:  # the common case, with no more checks to make
        return readable(t)
    if t.shape == tuple(logits_shape) and is_floating(t):
        return readable(t, dtype)
    if is_floating(t):
        raise ValueError(
            f"target: expected class indices of shape {shape_str(index_shape)} (an integer array) "
            f"or class probabilities of the input's shape {shape_str(logits_shape)}, "
            f"got a {t.dtype} array of shape {shape_str(t.shape)}"
        )
    if t.dtype.kind not in "iu":
        raise TypeError(
            f"target: expected an integer array of class indices or a floating array of "
            f"probabilities, got dtype {t.dtype}"
        )
    if t.shape != index_shape:
        if not unbatched and t.ndim >= 1 and t.shape[0] != logits_shape[0]:
            raise ValueError(
                f"target: Expected input batch_size ({logits_shape[0]}) to match target batch_size "
                f"({t.shape[0]}); expected shape {shape_str(index_shape)}, got {shape_str(t.shape)}"
            )
        raise ValueError(
            f"target: expected class indices of shape {shape_str(index_shape)} for input of shape "
            f"{shape_str(logits_shape)}, got {shape_str(t.shape)}"
        )
    return _class_indices(t)


def _grad_output(grad_output: Any, reduction: str, loss_shape: tuple) -> Union[float, np.ndarray]:
    if grad_output is None:
        return 1.0
    g = as_array("grad_output", grad_output)
    if not (is_floating(g) or np.issubdtype(g.dtype, np.integer)):
        raise TypeError(f"grad_output: expected a floating array, got dtype {g.dtype}")
    if reduction != "none" or g.ndim == 0:
        if g.ndim != 0:
            raise ValueError(
                f"grad_output: expected a scalar (the loss is 0-d for reduction={reduction!r}), "
                f"got shape {shape_str(g.shape)}"
            )
        return float(g)
    if g.shape != loss_shape:
        raise ValueError(
            f"grad_output: expected the loss's shape {shape_str(loss_shape)}, got {shape_str(g.shape)}"
        )
    return readable(g, FLOAT64)


def optional_float_arg(arg: str, v: Any) -> Optional[float]:
    return None if v is None else float_arg(arg, v)


def problem(batch: int, classes: int, spatial: int, logits_shape: tuple, dtype: np.dtype, target: Any,
            weight: Any, ignore_index: Any, reduction: Any, label_smoothing: Any, grad_output: Any,
            loss_shape: tuple, softcap: Any, z_loss: Any) -> Problem:
    reduction = reduction_arg(reduction)
    return Problem(
        batch, classes, spatial, _target(target, logits_shape, dtype), weight_arg(weight, classes),
        int_arg("ignore_index", ignore_index), reduction, float_arg("label_smoothing", label_smoothing),
        _grad_output(grad_output, reduction, loss_shape), loss_shape,
        optional_float_arg("softcap", softcap), float_arg("z_loss", z_loss),
    )


def resolve_device(device: str, dtype: np.dtype, work: float, work_kind: Literal["elements", "flops"],
                   cpu_only: Optional[str] = None) -> str:
    """"cpu" or "gpu" for this call. ``work``: the call's logits
    (``"elements"``) or multiply-adds (``"flops"``), against the GPU
    backend's threshold for ``device="auto"``. float64 never runs on the GPU
    (WGSL has no f64), nor does a call using a feature the shaders lack
    (``cpu_only`` names it): with ``device="gpu"`` both warn and run on the CPU."""
    if device == "cpu":
        return "cpu"  # before the GPU backend is imported: a CPU call never pays for it
    from . import gpu

    threshold = gpu.AUTO_MIN_ELEMENTS if work_kind == "elements" else gpu.AUTO_MIN_FLOPS
    try:
        chosen = gpu.use_gpu(device, work, threshold)
    except gpu.GpuUnavailable as exc:
        raise RuntimeError(f"device: 'gpu' was asked for, but {exc}") from None
    if chosen and cpu_only is None and dtype == np.float64:
        cpu_only = "float64 (WGSL has no float64)"
    if chosen and cpu_only is not None:
        if device == "gpu":
            warnings.warn(
                f"device='gpu': the GPU path does not support {cpu_only} yet; "
                "this call is computed on the CPU",
                RuntimeWarning,
                stacklevel=4,
            )
        return "cpu"
    return "gpu" if chosen else "cpu"


def _loss_cpu_only(prob: Problem) -> Optional[str]:
    """The loss option the GPU shaders lack, if this problem uses one."""
    if prob.softcap is not None:
        return "softcap"
    if prob.z_loss != 0.0:
        return "z_loss"
    return None


# ---- cross_entropy ------------------------------------------------------------------------

def _grad_buffer(grad_out: Any, original: Any, x: np.ndarray) -> np.ndarray:
    """Where the gradient goes: a new buffer, ``x`` itself (in place) or ``grad_out``."""
    if grad_out is None:
        return np.empty(x.shape, dtype=x.dtype)
    if grad_out is original:
        if not (x is original or same_memory(x, output_array("grad_out", original))):
            raise ValueError(
                "grad_out: in-place gradient (grad_out=input) needs the input to be an aligned "
                "C-contiguous array (numpy or DLPack) of a supported dtype; this input had to be converted"
            )
        check_writable("grad_out", x)
        return x
    grad_out = output_array("grad_out", grad_out)
    if grad_out.shape != x.shape or grad_out.dtype != x.dtype:
        raise ValueError(
            f"grad_out: expected an array of shape {shape_str(x.shape)} and dtype {x.dtype}, "
            f"got shape {shape_str(grad_out.shape)} and dtype {grad_out.dtype}"
        )
    check_writable("grad_out", grad_out)
    return grad_out


def cross_entropy_request(input: Any, target: Any, weight: Any, ignore_index: Any, reduction: Any,
                          label_smoothing: Any, return_grad: bool, grad_output: Any, grad_out: Any,
                          device: Any, softcap: Any = None, z_loss: Any = 0.0) -> CrossEntropyRequest:
    device = check_device(device)
    if grad_out is not None and not return_grad:
        raise ValueError("grad_out: given without return_grad=True")
    x, (batch, classes, spatial), loss_shape = _logits(input)
    prob = problem(batch, classes, spatial, x.shape, x.dtype, target, weight, ignore_index, reduction,
                   label_smoothing, grad_output, loss_shape, softcap, z_loss)
    grad = _grad_buffer(grad_out, input, x) if return_grad else None
    loss = np.empty(loss_shape, dtype=x.dtype) if prob.reduction == "none" else None
    dev = resolve_device(device, x.dtype, x.size, "elements", _loss_cpu_only(prob))
    return CrossEntropyRequest(prob, x, grad, loss, dev)


def _logits(input: Any) -> Tuple[np.ndarray, Tuple[int, int, int], Tuple[int, ...]]:
    """Logits ``(C,)``, ``(N, C)`` or ``(N, C, d1..dK)`` (aligned, C-contiguous),
    their ``(batch, classes, spatial)`` and the per-sample shape."""
    x = as_array("input", input)
    check_float_dtype("input", x)
    if x.ndim == 0:
        raise ValueError("input: expected shape (C,), (N, C) or (N, C, d1, ..., dK), got a 0-d array")
    x = readable(x)
    shape = x.shape
    if len(shape) == 1:
        return x, (1, shape[0], 1), ()
    if len(shape) == 2:
        return x, (shape[0], shape[1], 1), (shape[0],)
    return x, (shape[0], shape[1], math.prod(shape[2:])), (shape[0],) + shape[2:]


# ---- linear_cross_entropy -------------------------------------------------------------------

def _same_dtype(arg: str, a: np.ndarray, dtype: np.dtype) -> None:
    if a.dtype != dtype:
        raise TypeError(
            f"{arg}: expected dtype {dtype} (the input's), got {a.dtype}; convert it once "
            f"yourself (fusedce does not silently copy a weight-sized array)"
        )


def _linear_shapes(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray]) -> Tuple[int, tuple]:
    """Checks the shapes as PyTorch does (its messages); returns the batch
    size and the logits' shape."""
    if x.ndim < 1 or x.ndim > 2:
        raise ValueError(f"input: expected input with dimensionality 1 or 2, got {x.ndim}")
    if w.ndim < 2:
        raise ValueError(f"linear_weight: expected linear_weight with dimensionality at least 2, got {w.ndim}")
    in_features = x.shape[-1]
    if in_features != w.shape[-1]:
        raise ValueError(
            "linear_weight: expected equal input and linear_weight last dimensions (in_features), "
            f"got {in_features} and {w.shape[-1]}, respectively"
        )
    classes, out_features = w.shape[0], tuple(w.shape[1:-1])
    if b is not None and b.shape != (classes, *out_features):
        raise ValueError(
            f"linear_bias: expected linear_bias shape {(classes, *out_features)}, got {tuple(b.shape)}"
        )
    if out_features and x.ndim == 1:
        raise ValueError(
            f"input: K-dimensional loss defined by linear_weight shape {tuple(w.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched input with shape {tuple(x.shape)}"
        )
    if x.ndim == 1:
        return 1, (classes,)
    return x.shape[0], (x.shape[0], classes) + out_features


def _options(options: Any) -> LinearCrossEntropyOptions:
    if options is None:
        return _DEFAULT_OPTIONS
    if not isinstance(options, LinearCrossEntropyOptions):
        raise TypeError(
            f"options: expected a fusedce.LinearCrossEntropyOptions or None, got {type(options).__name__}"
        )
    return options


class LinearPart(NamedTuple):
    """The checked linear part of a linear call (fields as the requests')."""

    input: np.ndarray
    linear_weight: np.ndarray
    linear_bias: Optional[np.ndarray]
    in_features: int
    chunk_rows: int
    acc_f64: bool
    max_weight_copy: int
    grads: Optional[LinearCrossEntropyGrads]
    batch: int
    logits_shape: tuple
    #: the per-sample shape: ``()`` unbatched, ``(N,)`` or ``(N, d1..dK)``
    sample_shape: tuple
    flops: float


def _linear_part(input: Any, linear_weight: Any, linear_bias: Any, options: Any,
                 return_grad: bool) -> LinearPart:
    options = _options(options)
    x = as_array("input", input)
    check_float_dtype("input", x)
    w = as_array("linear_weight", linear_weight)
    _same_dtype("linear_weight", w, x.dtype)
    b = None if linear_bias is None else as_array("linear_bias", linear_bias)
    if b is not None:
        _same_dtype("linear_bias", b, x.dtype)
    batch, logits_shape = _linear_shapes(x, w, b)
    classes, d = w.shape[0], x.shape[-1]
    spatial = math.prod(w.shape[1:-1])
    g_dtype = options.compute_dtype(x.dtype)
    rows = options.chunk_rows(batch, d, classes, classes * spatial * g_dtype.itemsize)
    grads = None
    if return_grad:
        grads = LinearCrossEntropyGrads(
            np.empty(x.shape, x.dtype), np.empty(w.shape, x.dtype), None if b is None else np.empty(b.shape, x.dtype)
        )
    return LinearPart(
        readable(x).reshape(batch, d), readable(w), None if b is None else readable(b), d, rows,
        bool(g_dtype == np.float64 and x.dtype != np.float64),
        weight_copy_limit() if g_dtype != x.dtype else 0,  # only a converted weight is copied
        grads,
        batch, logits_shape, () if x.ndim == 1 else (batch,) + tuple(w.shape[1:-1]),
        2.0 * batch * d * classes * spatial * (3 if return_grad else 1),
    )


def linear_request(input: Any, linear_weight: Any, target: Any, linear_bias: Any, weight: Any,
                   reduction: Any, ignore_index: Any, label_smoothing: Any, options: Any,
                   return_grad: bool, grad_output: Any, device: Any, softcap: Any = None,
                   z_loss: Any = 0.0) -> LinearCrossEntropyRequest:
    device = check_device(device)
    lin = _linear_part(input, linear_weight, linear_bias, options, return_grad)
    w, dtype = lin.linear_weight, lin.input.dtype
    t = as_array("target", target)
    if t.shape == lin.logits_shape and ignore_index is not None:
        raise ValueError("ignore_index: ignore_index cannot be specified when target contains probabilities")
    prob = problem(lin.batch, w.shape[0], math.prod(w.shape[1:-1]), lin.logits_shape, dtype, t, weight,
                   -100 if ignore_index is None else ignore_index, reduction, label_smoothing,
                   grad_output, lin.sample_shape, softcap, z_loss)
    return LinearCrossEntropyRequest(
        prob, *lin[:8],
        np.empty(lin.sample_shape, dtype) if prob.reduction == "none" else None,
        resolve_device(device, dtype, lin.flops, "flops", _loss_cpu_only(prob)),
    )


_DEFAULT_OPTIONS = LinearCrossEntropyOptions()


# ---- token statistics --------------------------------------------------------------------

STAT_NAMES = ("lse", "logprob", "entropy", "argmax", "rank", "topk_ids", "topk_logprobs")


class TokenStats(NamedTuple):
    """Per-token statistics (:func:`fusedce.token_stats`): arrays of the
    target's shape (the per-token loss shape), the top-k with a trailing axis
    of length ``top_k``; None for what was not asked for. Float arrays are
    float32 (float64 for float64 input); indices are int64."""

    lse: Optional[np.ndarray]
    logprob: Optional[np.ndarray]
    entropy: Optional[np.ndarray]
    argmax: Optional[np.ndarray]
    rank: Optional[np.ndarray]
    topk_ids: Optional[np.ndarray]
    topk_logprobs: Optional[np.ndarray]


class StatsProblem(NamedTuple):
    """What a statistics call computes (the statistics as flags)."""

    batch: int
    classes: int
    spatial: int
    #: int64 class indices of the per-token shape, or None
    target: Optional[np.ndarray]
    ignore_index: int
    temperature: float
    softcap: Optional[float]
    top_k: int
    lse: bool
    logprob: bool
    entropy: bool
    argmax: bool
    rank: bool
    #: None (zero), a number, or float64 of the per-token shape
    grad_logprob: Union[None, float, np.ndarray]
    grad_entropy: Union[None, float, np.ndarray]


class TokenStatsRequest(NamedTuple):
    problem: StatsProblem
    #: the logits, aligned and C-contiguous
    input: np.ndarray
    #: None, ``input`` itself (in place) or a buffer of its shape
    grad: Optional[np.ndarray]
    out: TokenStats
    device: str


class LinearTokenStatsRequest(NamedTuple):
    problem: StatsProblem
    input: np.ndarray
    linear_weight: np.ndarray
    linear_bias: Optional[np.ndarray]
    in_features: int
    chunk_rows: int
    acc_f64: bool
    max_weight_copy: int
    grads: Optional[LinearCrossEntropyGrads]
    out: TokenStats
    device: str


GRADIENT_KEYWORDS = ("return_grad", "grad_logprob", "grad_entropy", "grad_out", "grad_output", "device")


def reject_gradient_keywords(kw: dict, adapter: str) -> None:
    """TypeError for a keyword an adapter supplies itself (its framework
    passes the upstream gradients; it runs on the CPU)."""
    for k in GRADIENT_KEYWORDS:
        if k in kw:
            raise TypeError(f"{k}: not an argument of the {adapter} functions (the framework supplies the gradients)")


def _stat_flags(stats: Any, has_target: bool, top_k: int) -> Tuple[bool, bool, bool, bool, bool]:
    """``(lse, logprob, entropy, argmax, rank)`` asked for by ``stats``."""
    if stats is None:
        return (True, has_target, True, True, has_target)
    if isinstance(stats, str) or not all(isinstance(n, str) for n in stats):
        raise TypeError(f"stats: expected a collection of names from {STAT_NAMES}, got {stats!r}")
    names = set(stats)
    unknown = names - set(STAT_NAMES)
    if unknown:
        raise ValueError(f"stats: unknown statistics {sorted(unknown)}; expected names from {STAT_NAMES}")
    if names & {"topk_ids", "topk_logprobs"} and top_k == 0:
        raise ValueError("top_k: the top-k statistics need top_k > 0")
    lse, logprob, entropy, argmax, rank = (n in names for n in STAT_NAMES[:5])
    return lse, logprob, entropy, argmax, rank


def _upstream(arg: str, g: Any, shape: tuple) -> Union[None, float, np.ndarray]:
    """A per-token upstream gradient: None, a number, or float64 of ``shape``."""
    if g is None:
        return None
    a = as_array(arg, g)
    if not (is_floating(a) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{arg}: expected a number or a floating array, got dtype {a.dtype}")
    if a.ndim == 0:
        return float(a)
    if a.shape != shape:
        raise ValueError(f"{arg}: expected a scalar or the target's shape {shape_str(shape)}, got {shape_str(a.shape)}")
    return readable(a, FLOAT64)


def _stats_target(target: Any, shape: tuple) -> Optional[np.ndarray]:
    if target is None:
        return None
    t = as_array("target", target)
    if not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"target: expected an integer array of class indices, got dtype {t.dtype}")
    if t.shape != shape:
        raise ValueError(f"target: expected class indices of shape {shape_str(shape)}, got {shape_str(t.shape)}")
    return _class_indices(t)


def stats_problem(dims: Tuple[int, int, int], shape: tuple, target: Any, temperature: Any, softcap: Any,
                  ignore_index: Any, top_k: Any, stats: Any, return_grad: bool, grad_logprob: Any,
                  grad_entropy: Any) -> StatsProblem:
    """The checked statistics problem over logits of ``dims`` = ``(batch,
    classes, spatial)``, whose per-token shape is ``shape``."""
    for arg, g in (("grad_logprob", grad_logprob), ("grad_entropy", grad_entropy)):
        if g is not None and not return_grad:
            raise ValueError(f"{arg}: an upstream gradient is given without return_grad=True")
    t = _stats_target(target, shape)
    k = int_arg("top_k", top_k)
    if not 0 <= k <= dims[1]:
        # checked here too (the core checks it) because it sizes the outputs
        raise ValueError(f"top_k: expected a value in [0, {dims[1]}] (the number of classes), got {k}")
    lse, logprob, entropy, argmax, rank = _stat_flags(stats, t is not None, k)
    return StatsProblem(
        dims[0], dims[1], dims[2], t, int_arg("ignore_index", ignore_index), float_arg("temperature", temperature),
        optional_float_arg("softcap", softcap), k, lse, logprob, entropy, argmax, rank,
        _upstream("grad_logprob", grad_logprob, shape), _upstream("grad_entropy", grad_entropy, shape),
    )


def stats_outputs(p: StatsProblem, shape: tuple, dtype: np.dtype) -> TokenStats:
    """New output arrays for what ``p`` asks for (float64 for float64 input)."""
    f = np.float64 if dtype == np.float64 else np.float32

    def new(on: bool, dt: Any, extra: tuple = ()) -> Optional[np.ndarray]:
        return np.empty(shape + extra, dt) if on else None

    top = p.top_k > 0
    return TokenStats(
        new(p.lse, f), new(p.logprob, f), new(p.entropy, f), new(p.argmax, np.int64), new(p.rank, np.int64),
        new(top, np.int64, (p.top_k,)), new(top, f, (p.top_k,)),
    )




def token_stats_request(input: Any, target: Any, temperature: Any, softcap: Any, ignore_index: Any,
                        top_k: Any, stats: Any, return_grad: bool, grad_logprob: Any, grad_entropy: Any,
                        grad_out: Any, device: Any) -> TokenStatsRequest:
    device = check_device(device)
    if grad_out is not None and not return_grad:
        raise ValueError("grad_out: given without return_grad=True")
    x, dims, shape = _logits(input)
    p = stats_problem(dims, shape, target, temperature, softcap, ignore_index, top_k, stats, return_grad,
                      grad_logprob, grad_entropy)
    grad = _grad_buffer(grad_out, input, x) if return_grad else None
    dev = resolve_device(device, x.dtype, x.size, "elements")
    return TokenStatsRequest(p, x, grad, stats_outputs(p, shape, x.dtype), dev)


def linear_stats_request(input: Any, linear_weight: Any, target: Any, linear_bias: Any, options: Any,
                         temperature: Any, softcap: Any, ignore_index: Any, top_k: Any, stats: Any,
                         return_grad: bool, grad_logprob: Any, grad_entropy: Any,
                         device: Any) -> LinearTokenStatsRequest:
    device = check_device(device)
    w = as_array("linear_weight", linear_weight)
    if w.ndim != 2:
        raise ValueError(f"linear_weight: expected shape (C, in_features), got {shape_str(w.shape)}")
    lin = _linear_part(input, w, linear_bias, options, return_grad)
    dtype, shape = lin.input.dtype, lin.sample_shape
    p = stats_problem((lin.batch, w.shape[0], 1), shape, target, temperature, softcap, ignore_index, top_k,
                      stats, return_grad, grad_logprob, grad_entropy)
    dev = resolve_device(device, dtype, lin.flops, "flops")
    return LinearTokenStatsRequest(p, *lin[:8], stats_outputs(p, shape, dtype), dev)
