"""PyTorch adapter: fusedce's fused passes as ``torch.autograd.Function`` classes
on CPU tensors (float32, float64, float16 and bfloat16).

Drop-in for ``torch.nn.functional.cross_entropy`` and
``torch.nn.functional.linear_cross_entropy`` in a CPU training loop::

    import fusedce.torch as fce
    loss = fce.linear_cross_entropy(hidden, head.weight, target)
    loss.backward()

Tensors cross by DLPack without a copy: the inputs are read in place, and
the gradients are written by the fused pass straight into tensors
allocated here. With ``reduction="mean"`` or ``"sum"`` the forward pass
computes the gradient for an upstream gradient of 1 and ``backward`` scales
it; ``reduction="none"`` (whose weight gradient depends on the upstream
gradient per sample) and the statistics run a fused pass with the upstream
gradient in ``backward``. Saved results are freed by the first backward: a
second one raises unless ``retain_graph=True`` was asked for, as with
PyTorch's own chunked path. Requires ``torch`` (``pip install 'fusedce[torch]'``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch

from . import functional as F
from ._arrays import to_dlpack
from ._request import TokenStats, reject_gradient_keywords
from .options import LinearCrossEntropyOptions

__all__ = ["cross_entropy", "linear_cross_entropy", "token_stats", "linear_token_stats"]


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A numpy result as a tensor over the same memory (any dtype)."""
    return torch.from_dlpack(to_dlpack(np.asarray(a)))


def _maybe_tensor(a: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    return None if a is None else _tensor(a)


def _check_cpu(**tensors: Optional[torch.Tensor]) -> None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            raise ValueError(f"{name}: fusedce.torch runs on CPU tensors, got one on {t.device}")


def _no_grad_through(**tensors: Any) -> None:
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise NotImplementedError(f"{name}: fusedce.torch does not differentiate with respect to {name}")


def _per_sample(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """``grad`` (samples along axis 0, classes along axis 1) scaled by one
    upstream value per sample (shape ``(N, d1..dK)``, or 0-d)."""
    return grad * (upstream if upstream.dim() == 0 else upstream.unsqueeze(1))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, target: torch.Tensor, kw: Dict[str, Any]) -> torch.Tensor:
        ctx.reduction = kw["reduction"]
        if not ctx.needs_input_grad[0]:
            return _tensor(F.cross_entropy(input.detach(), target, **kw))
        grad = torch.empty_like(input, memory_format=torch.contiguous_format)
        loss, _ = F.cross_entropy(input.detach(), target, **kw, return_grad=True, grad_out=grad)
        ctx.save_for_backward(grad)
        return _tensor(loss)

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return _per_sample(grad, upstream).to(grad.dtype), None, None


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    size_average: None = None,
    ignore_index: int = -100,
    reduce: None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy`` computed by fusedce's fused pass
    (its signature; ``size_average``/``reduce`` are PyTorch's deprecated
    arguments and must stay None). ``input`` ``(C,)``, ``(N, C)`` or
    ``(N, C, d1..dK)`` of any float dtype; returns the loss in the input's
    dtype, differentiable with respect to ``input``."""
    if size_average is not None or reduce is not None:
        raise TypeError("size_average, reduce: deprecated in PyTorch; use reduction=")
    _check_cpu(input=input, target=target, weight=weight)
    _no_grad_through(target=target, weight=weight)
    kw = dict(weight=weight, ignore_index=ignore_index, reduction=reduction,
              label_smoothing=label_smoothing, softcap=softcap, z_loss=z_loss)
    return _CrossEntropy.apply(input, target, kw)


def _options(options: Any) -> Optional[LinearCrossEntropyOptions]:
    """fusedce's options, or PyTorch's converted field by field."""
    if options is None or isinstance(options, LinearCrossEntropyOptions):
        return options
    fields = ("batch_chunk_size", "chunking_method", "acc_policy", "acc_dtype", "allow_retain_graph")
    return LinearCrossEntropyOptions(**{f: getattr(options, f) for f in fields if hasattr(options, f)})


def _grads(g: Any) -> tuple:
    return _tensor(g.input), _tensor(g.linear_weight), _maybe_tensor(g.linear_bias)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                target: torch.Tensor, kw: Dict[str, Any]) -> torch.Tensor:
        x, w = input.detach(), weight.detach()
        b = None if bias is None else bias.detach()
        ctx.kw, ctx.none = kw, kw["reduction"] == "none"
        if not any(ctx.needs_input_grad[:3]):
            return _tensor(F.linear_cross_entropy(x, w, target, linear_bias=b, **kw))
        if ctx.none:  # the weight gradient needs each sample's upstream gradient
            ctx.save_for_backward(x, w, b, target)
            return _tensor(F.linear_cross_entropy(x, w, target, linear_bias=b, **kw))
        loss, g = F.linear_cross_entropy(x, w, target, linear_bias=b, **kw, return_grad=True)
        ctx.save_for_backward(*_grads(g))
        return _tensor(loss)

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple:
        if ctx.none:
            x, w, b, target = ctx.saved_tensors
            _, g = F.linear_cross_entropy(x, w, target, linear_bias=b, **ctx.kw, return_grad=True,
                                          grad_output=upstream.detach().double().numpy())
            dx, dw, db = _grads(g)
        else:
            dx, dw, db = (None if t is None else (t * upstream).to(t.dtype) for t in ctx.saved_tensors)
        return dx, dw, db, None, None


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    ignore_index: Optional[int] = None,
    label_smoothing: float = 0.0,
    options: Any = None,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """``torch.nn.functional.linear_cross_entropy`` by fusedce (chunked, never
    building the ``N x C`` logits): ``input`` ``(N, in_features)`` or
    ``(in_features,)``, ``linear_weight`` ``(C, in_features)`` (or
    K-dimensional), ``linear_bias`` ``(C,)``; all one float dtype.
    Differentiable with respect to ``input``, ``linear_weight`` and
    ``linear_bias``. ``options`` may be fusedce's or PyTorch's
    ``LinearCrossEntropyOptions``."""
    _check_cpu(input=input, linear_weight=linear_weight, linear_bias=linear_bias, target=target, weight=weight)
    _no_grad_through(target=target, weight=weight)
    kw = dict(weight=weight, reduction=reduction, ignore_index=ignore_index,
              label_smoothing=label_smoothing, options=_options(options), softcap=softcap, z_loss=z_loss)
    return _LinearCrossEntropy.apply(input, linear_weight, linear_bias, target, kw)


def _upstream(g: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    return None if g is None else g.detach().double().numpy()


def _stats_outputs(ctx: Any, s: TokenStats) -> tuple:
    out = tuple(_maybe_tensor(getattr(s, f)) for f in TokenStats._fields)
    ctx.mark_non_differentiable(*(t for f, t in zip(TokenStats._fields, out)
                                  if t is not None and f not in ("logprob", "entropy")))
    return out


def _stat_grads(grads: tuple) -> tuple:
    """The upstream gradients of ``logprob`` and ``entropy`` (None when absent)."""
    i, j = TokenStats._fields.index("logprob"), TokenStats._fields.index("entropy")
    return _upstream(grads[i]), _upstream(grads[j])


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, target: Optional[torch.Tensor], kw: Dict[str, Any]) -> tuple:
        ctx.kw = kw
        ctx.save_for_backward(input.detach(), target)
        return _stats_outputs(ctx, F.token_stats(input.detach(), target, **kw))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        x, target = ctx.saved_tensors
        gl, ge = _stat_grads(grads)
        if gl is None and ge is None:
            return None, None, None
        grad = torch.empty_like(x)
        F.token_stats(x, target, **ctx.kw, return_grad=True, grad_logprob=gl, grad_entropy=ge, grad_out=grad)
        return grad, None, None


def token_stats(input: torch.Tensor, target: Optional[torch.Tensor] = None, **kw: Any) -> TokenStats:
    """:func:`fusedce.token_stats` on tensors: a ``TokenStats`` of tensors
    (None for what was not asked for); ``logprob`` and ``entropy`` are
    differentiable with respect to ``input`` (through temperature and
    softcap). Keywords as :func:`fusedce.token_stats` (not ``return_grad``,
    ``grad_*`` or ``device``: autograd supplies those)."""
    _check_cpu(input=input, target=target)
    _no_grad_through(target=target)
    reject_gradient_keywords(kw, "fusedce.torch")
    return TokenStats(*_TokenStats.apply(input, target, kw))


class _LinearTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                target: Optional[torch.Tensor], kw: Dict[str, Any]) -> tuple:
        x, w = input.detach(), weight.detach()
        b = None if bias is None else bias.detach()
        ctx.kw = kw
        ctx.save_for_backward(x, w, b, target)
        return _stats_outputs(ctx, F.linear_token_stats(x, w, target, linear_bias=b, **kw))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        x, w, b, target = ctx.saved_tensors
        gl, ge = _stat_grads(grads)
        if gl is None and ge is None:
            return None, None, None, None, None
        _, g = F.linear_token_stats(x, w, target, linear_bias=b, **ctx.kw, return_grad=True,
                                    grad_logprob=gl, grad_entropy=ge)
        return (*_grads(g), None, None)


def linear_token_stats(input: torch.Tensor, linear_weight: torch.Tensor, target: Optional[torch.Tensor] = None,
                       *, linear_bias: Optional[torch.Tensor] = None, **kw: Any) -> TokenStats:
    """:func:`fusedce.linear_token_stats` on tensors: statistics straight
    from hidden states and a head, ``logprob`` and ``entropy``
    differentiable with respect to ``input``, ``linear_weight`` and
    ``linear_bias``. Keywords as :func:`fusedce.linear_token_stats`."""
    _check_cpu(input=input, linear_weight=linear_weight, linear_bias=linear_bias, target=target)
    _no_grad_through(target=target)
    reject_gradient_keywords(kw, "fusedce.torch")
    if "options" in kw:
        kw["options"] = _options(kw["options"])
    return TokenStats(*_LinearTokenStats.apply(input, linear_weight, linear_bias, target, kw))
