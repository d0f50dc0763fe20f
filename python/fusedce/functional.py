"""The functional API: ``cross_entropy``, ``linear_cross_entropy``,
``token_stats`` and ``linear_token_stats``.

Each public function turns its arguments into one request
(:mod:`fusedce._request`, where every structural check lives) and hands it
to the backend the request names: the Rust core (:mod:`fusedce._cpu`) or
the WGSL shaders (:mod:`fusedce.gpu`).
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Optional, Tuple, Union, overload

import numpy as np

from . import _cpu
from ._request import (
    Device,
    LinearCrossEntropyGrads,
    TokenStats,
    cross_entropy_request,
    linear_request,
    linear_stats_request,
    token_stats_request,
)
from .options import LinearCrossEntropyOptions

Reduction = Literal["none", "mean", "sum"]

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "LinearCrossEntropyGrads",
    "Reduction",
    "Device",
    "token_stats",
    "linear_token_stats",
    "TokenStats",
]


@overload
def cross_entropy(input: Any, target: Any, weight: Any = ..., ignore_index: int = ...,
                  reduction: Reduction = ..., label_smoothing: float = ..., *,
                  return_grad: Literal[False] = ..., grad_output: Any = ..., grad_out: None = ...,
                  device: Device = ..., softcap: Optional[float] = ..., z_loss: float = ...) -> np.ndarray: ...
@overload
def cross_entropy(input: Any, target: Any, weight: Any = ..., ignore_index: int = ...,
                  reduction: Reduction = ..., label_smoothing: float = ..., *,
                  return_grad: Literal[True], grad_output: Any = ..., grad_out: Any = ...,
                  device: Device = ..., softcap: Optional[float] = ...,
                  z_loss: float = ...) -> Tuple[np.ndarray, np.ndarray]: ...
@overload
def cross_entropy(input: Any, target: Any, weight: Any = ..., ignore_index: int = ...,
                  reduction: Reduction = ..., label_smoothing: float = ..., *,
                  return_grad: bool, grad_output: Any = ..., grad_out: Any = ...,
                  device: Device = ..., softcap: Optional[float] = ...,
                  z_loss: float = ...) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]: ...


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
    grad_out: Any = None,
    device: Device = "cpu",
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
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
        ignore_index: an integer; class-index targets equal to it contribute
            no loss and no gradient, and do not count in the mean. It may lie outside
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
        grad_out: a preallocated aligned C-contiguous array of the input's
            shape and dtype for the gradient, sharing no memory with any
            input; ``grad_out=input`` overwrites the logits
            with their gradient, so no ``N x C`` memory is allocated at all.
            Needs ``return_grad=True``.
        device: ``"cpu"``, ``"gpu"`` (WGSL shaders through wgpu-py; see
            :mod:`fusedce.gpu`) or ``"auto"`` (the GPU for large problems when
            a hardware adapter is present).
        softcap: ``c > 0``: the loss sees ``c * tanh(input / c)`` (Gemma's
            logit soft-capping), and the gradient goes through the ``tanh``.
            None (the default) leaves the logits as they are, at no cost.
        z_loss: ``z >= 0``: adds ``z * logsumexp(input)**2`` to the loss of
            every sample that is not ignored (PaLM's auxiliary loss),
            unweighted, reduced with the loss (the same denominator).
            ``0.0`` (the default) adds nothing and costs nothing.

    Returns:
        ``loss`` (a numpy array of the input's dtype: 0-d for mean/sum), or
        ``(loss, grad_input)`` with ``return_grad=True``; ``grad_input`` has
        the input's shape and dtype.

    Raises:
        IndexError: a class index outside ``[0, C)`` that is not ``ignore_index``.
        ValueError: shapes or values that do not fit.
        TypeError: unsupported dtypes or objects (``ignore_index`` not an
            integer, ``label_smoothing`` not a number, ...).
        RuntimeError: ``device="gpu"`` and no WebGPU adapter (the message says why).
    Nothing is written to ``grad_out`` when an exception is raised.
    """
    req = cross_entropy_request(input, target, weight, ignore_index, reduction, label_smoothing,
                                return_grad, grad_output, grad_out, device, softcap, z_loss)
    if req.device == "gpu":
        from .gpu import _ce

        loss = _ce.cross_entropy(req)
    else:
        loss = _cpu.cross_entropy(req)
    if req.grad is None:
        return loss
    return loss, req.grad


@overload
def linear_cross_entropy(input: Any, linear_weight: Any, target: Any, *, linear_bias: Any = ...,
                         weight: Any = ..., reduction: Reduction = ..., ignore_index: Optional[int] = ...,
                         label_smoothing: float = ..., options: Optional[LinearCrossEntropyOptions] = ...,
                         return_grad: Literal[False] = ..., grad_output: Any = ...,
                         device: Device = ..., softcap: Optional[float] = ...,
                         z_loss: float = ...) -> np.ndarray: ...
@overload
def linear_cross_entropy(input: Any, linear_weight: Any, target: Any, *, linear_bias: Any = ...,
                         weight: Any = ..., reduction: Reduction = ..., ignore_index: Optional[int] = ...,
                         label_smoothing: float = ..., options: Optional[LinearCrossEntropyOptions] = ...,
                         return_grad: Literal[True], grad_output: Any = ...,
                         device: Device = ..., softcap: Optional[float] = ...,
                         z_loss: float = ...) -> Tuple[np.ndarray, LinearCrossEntropyGrads]: ...
@overload
def linear_cross_entropy(input: Any, linear_weight: Any, target: Any, *, linear_bias: Any = ...,
                         weight: Any = ..., reduction: Reduction = ..., ignore_index: Optional[int] = ...,
                         label_smoothing: float = ..., options: Optional[LinearCrossEntropyOptions] = ...,
                         return_grad: bool, grad_output: Any = ...,
                         device: Device = ..., softcap: Optional[float] = ...,
                         z_loss: float = ...) -> Union[np.ndarray, Tuple[np.ndarray, LinearCrossEntropyGrads]]: ...


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
    device: Device = "cpu",
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
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
        softcap, z_loss: as for :func:`cross_entropy`, on the logits
            ``input @ linear_weight.T + linear_bias``.

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
    req = linear_request(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                         label_smoothing, options, return_grad, grad_output, device, softcap, z_loss)
    loss = run_linear(req)
    if req.grads is None:
        return loss
    return loss, req.grads


def run_linear(req: Any, resident: Any = None) -> np.ndarray:
    """Runs a linear request on its backend; ``resident`` is a module's
    device copy of its weight (:class:`fusedce.gpu.ResidentWeight`)."""
    if req.device == "gpu":
        from .gpu import _linear

        return _linear.linear_cross_entropy(req, resident)
    return _cpu.linear_cross_entropy(req)


@overload
def token_stats(input: Any, target: Any = ..., *, temperature: float = ..., softcap: Optional[float] = ...,
                ignore_index: int = ..., top_k: int = ..., stats: Optional[Iterable[str]] = ...,
                return_grad: Literal[False] = ..., grad_logprob: Any = ..., grad_entropy: Any = ...,
                grad_out: None = ..., device: Device = ...) -> TokenStats: ...
@overload
def token_stats(input: Any, target: Any = ..., *, temperature: float = ..., softcap: Optional[float] = ...,
                ignore_index: int = ..., top_k: int = ..., stats: Optional[Iterable[str]] = ...,
                return_grad: Literal[True], grad_logprob: Any = ..., grad_entropy: Any = ...,
                grad_out: Any = ..., device: Device = ...) -> Tuple[TokenStats, np.ndarray]: ...
@overload
def token_stats(input: Any, target: Any = ..., *, temperature: float = ..., softcap: Optional[float] = ...,
                ignore_index: int = ..., top_k: int = ..., stats: Optional[Iterable[str]] = ...,
                return_grad: bool, grad_logprob: Any = ..., grad_entropy: Any = ...,
                grad_out: Any = ..., device: Device = ...) -> Union[TokenStats, Tuple[TokenStats, np.ndarray]]: ...


def token_stats(
    input: Any,
    target: Any = None,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    top_k: int = 0,
    stats: Optional[Iterable[str]] = None,
    return_grad: bool = False,
    grad_logprob: Any = None,
    grad_entropy: Any = None,
    grad_out: Any = None,
    device: Device = "cpu",
) -> Union[TokenStats, Tuple[TokenStats, np.ndarray]]:
    """Per-token statistics of the softmax over classes, in one fused pass.

    With scores ``z`` (the logits, capped and divided by the temperature):
    ``lse = logsumexp(z)``; ``logprob = z[target] - lse``; ``entropy =
    lse - sum(softmax(z) * z)`` (a class with ``z = -inf`` contributes 0);
    ``argmax`` (the lowest index on ties; NaN counts as the largest);
    ``rank`` = the number of classes with ``z > z[target]``; the top-k.
    Every token's results depend on its own logits only (batch-invariant).

    Args:
        input: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dK)``;
            float32, float64, float16 or bfloat16.
        target: int class indices of the per-token shape ``()``, ``(N,)``
            or ``(N, d1, ..., dK)``, or None.
        temperature: ``T > 0``; the scores are ``z / T``.
        softcap: ``c > 0``: the scores are ``c * tanh(x / c) / T``; None: ``x / T``.
        ignore_index: tokens whose target equals it get ``logprob = 0``,
            ``rank = -1`` and no log-prob gradient (their other statistics
            are computed as usual).
        top_k: ``0 <= top_k <= C``; adds ``topk_ids`` and ``topk_logprobs``
            (trailing axis ``top_k``: the largest scores in descending order,
            ties to the lower class index, NaN first).
        stats: names of the statistics to compute (``"lse"``, ``"logprob"``,
            ``"entropy"``, ``"argmax"``, ``"rank"``, ``"topk_ids"``,
            ``"topk_logprobs"``); None: all but the top-k (``logprob`` and
            ``rank`` only with a target). The top-k comes with ``top_k > 0``.
        return_grad: also return the gradient of
            ``sum(grad_logprob * logprob + grad_entropy * entropy)``.
        grad_logprob, grad_entropy: per-token upstream gradients of the
            target's shape, or numbers (broadcast); None is zero. They need
            ``return_grad=True``; ``grad_logprob`` needs a target.
        grad_out: where the gradient goes, as for :func:`cross_entropy`
            (``grad_out=input`` writes it over the logits).
        device: ``"cpu"``, ``"gpu"`` (float32 on the device; float64 input
            runs on the CPU with a warning) or ``"auto"``.

    Returns:
        :class:`TokenStats` (float32 arrays for float16/bfloat16/float32
        input, float64 for float64; indices int64), or ``(stats, grad)``
        with ``grad`` of the input's shape and dtype.

    Raises:
        IndexError: a target outside ``[0, C)`` that is not ``ignore_index``.
        ValueError: ``temperature <= 0``, ``softcap <= 0``, ``top_k``
            outside ``[0, C]``, unknown statistics, shapes that do not fit,
            ``logprob``/``rank``/``grad_logprob`` without a target.
        TypeError: unsupported dtypes or objects.
    """
    req = token_stats_request(input, target, temperature, softcap, ignore_index, top_k, stats,
                              return_grad, grad_logprob, grad_entropy, grad_out, device)
    if req.device == "gpu":
        from .gpu import _stats

        _stats.token_stats(req)
    else:
        _cpu.token_stats(req)
    if req.grad is None:
        return req.out
    return req.out, req.grad


@overload
def linear_token_stats(input: Any, linear_weight: Any, target: Any = ..., *, linear_bias: Any = ...,
                       options: Optional[LinearCrossEntropyOptions] = ..., temperature: float = ...,
                       softcap: Optional[float] = ..., ignore_index: int = ..., top_k: int = ...,
                       stats: Optional[Iterable[str]] = ..., return_grad: Literal[False] = ...,
                       grad_logprob: Any = ..., grad_entropy: Any = ..., device: Device = ...) -> TokenStats: ...
@overload
def linear_token_stats(input: Any, linear_weight: Any, target: Any = ..., *, linear_bias: Any = ...,
                       options: Optional[LinearCrossEntropyOptions] = ..., temperature: float = ...,
                       softcap: Optional[float] = ..., ignore_index: int = ..., top_k: int = ...,
                       stats: Optional[Iterable[str]] = ..., return_grad: Literal[True],
                       grad_logprob: Any = ..., grad_entropy: Any = ...,
                       device: Device = ...) -> Tuple[TokenStats, LinearCrossEntropyGrads]: ...
@overload
def linear_token_stats(input: Any, linear_weight: Any, target: Any = ..., *, linear_bias: Any = ...,
                       options: Optional[LinearCrossEntropyOptions] = ..., temperature: float = ...,
                       softcap: Optional[float] = ..., ignore_index: int = ..., top_k: int = ...,
                       stats: Optional[Iterable[str]] = ..., return_grad: bool,
                       grad_logprob: Any = ..., grad_entropy: Any = ...,
                       device: Device = ...) -> Union[TokenStats, Tuple[TokenStats, LinearCrossEntropyGrads]]: ...


def linear_token_stats(
    input: Any,
    linear_weight: Any,
    target: Any = None,
    *,
    linear_bias: Any = None,
    options: Optional[LinearCrossEntropyOptions] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    top_k: int = 0,
    stats: Optional[Iterable[str]] = None,
    return_grad: bool = False,
    grad_logprob: Any = None,
    grad_entropy: Any = None,
    device: Device = "cpu",
) -> Union[TokenStats, Tuple[TokenStats, LinearCrossEntropyGrads]]:
    """:func:`token_stats` of the logits ``input @ linear_weight.T +
    linear_bias``, computed chunk by chunk (as :func:`linear_cross_entropy`):
    the ``N x C`` logits never exist.

    Args:
        input: hidden states ``(in_features,)`` or ``(N, in_features)``;
            float32, float64, float16 or bfloat16 (halves compute in float32).
        linear_weight: the head ``(C, in_features)``, the input's dtype.
        target: int class indices ``()`` or ``(N,)``, or None.
        linear_bias: ``(C,)`` or None.
        options: chunking and precision (:class:`LinearCrossEntropyOptions`).
        The other arguments: as for :func:`token_stats`.

    Returns:
        :class:`TokenStats`, or ``(stats, LinearCrossEntropyGrads)`` with the
        gradients of ``sum(grad_logprob * logprob + grad_entropy * entropy)``
        w.r.t. input, linear_weight and linear_bias (the input's dtype).

    Raises:
        As :func:`token_stats`, and :func:`linear_cross_entropy`'s shape errors.
    """
    req = linear_stats_request(input, linear_weight, target, linear_bias, options, temperature, softcap,
                               ignore_index, top_k, stats, return_grad, grad_logprob, grad_entropy, device)
    if req.device == "gpu":
        from .gpu import _stats

        _stats.linear_token_stats(req)
    else:
        _cpu.linear_token_stats(req)
    if req.grads is None:
        return req.out
    return req.out, req.grads

