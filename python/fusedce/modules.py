"""``torch.nn``-style loss modules over numpy arrays."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import numpy as np

from . import _native
from ._arrays import check_float_dtype
from ._request import (
    LinearCrossEntropyGrads,
    check_device,
    float_arg,
    int_arg,
    linear_request,
    optional_float_arg,
    reduction_arg,
    weight_arg,
)
from .functional import Device, Reduction, cross_entropy, run_linear
from .options import LinearCrossEntropyOptions


class _LossOptions(NamedTuple):
    reduction: Reduction
    label_smoothing: float
    softcap: Optional[float]
    z_loss: float


def _loss_options(reduction: Any, label_smoothing: Any, softcap: Any, z_loss: Any) -> _LossOptions:
    """The options every loss module takes, checked at construction (their
    values by the core, as on every call)."""
    opts = _LossOptions(
        reduction_arg(reduction),  # type: ignore[arg-type]
        float_arg("label_smoothing", label_smoothing),
        optional_float_arg("softcap", softcap),
        float_arg("z_loss", z_loss),
    )
    _native.check_options(*opts)
    return opts


class CrossEntropyLoss:
    """Callable module with ``torch.nn.CrossEntropyLoss``'s options.

    ``loss_fn(input, target)`` returns the loss; ``loss_fn.value_and_grad(input,
    target)`` returns ``(loss, grad_input)`` from the same fused pass (shapes as
    :func:`fusedce.cross_entropy`).
    """

    def __init__(
        self,
        weight: Any = None,
        ignore_index: int = -100,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
        *,
        softcap: Optional[float] = None,
        z_loss: float = 0.0,
        device: Device = "cpu",
    ) -> None:
        self.reduction, self.label_smoothing, self.softcap, self.z_loss = _loss_options(
            reduction, label_smoothing, softcap, z_loss
        )
        self.weight: Optional[np.ndarray] = (
            None if weight is None else weight_arg(weight, int(np.shape(weight)[0]) if np.ndim(weight) == 1 else -1)
        )
        self.ignore_index = int_arg("ignore_index", ignore_index)
        self.device = check_device(device)

    def __call__(self, input: Any, target: Any) -> np.ndarray:
        """Loss of ``input`` (``(C,)``, ``(N, C)`` or ``(N, C, d1..dK)``) against ``target``."""
        return cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            device=self.device, softcap=self.softcap, z_loss=self.z_loss,
        )

    def value_and_grad(
        self,
        input: Any,
        target: Any,
        *,
        grad_output: Any = None,
        grad_out: Optional[np.ndarray] = None,
    ) -> Tuple[np.ndarray, np.ndarray]:
        """``(loss, d loss / d input)``; ``grad_out=input`` writes the gradient in place."""
        return cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            return_grad=True, grad_output=grad_output, grad_out=grad_out, device=self.device,
            softcap=self.softcap, z_loss=self.z_loss,
        )

    def __repr__(self) -> str:
        return (
            f"CrossEntropyLoss(weight={'None' if self.weight is None else f'<{self.weight.shape[0]} classes>'}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, softcap={self.softcap}, z_loss={self.z_loss})"
        )


class LinearCrossEntropyLoss:
    """``torch.nn.LinearCrossEntropyLoss`` over numpy: a linear head (held here)
    followed by cross-entropy, computed by :func:`fusedce.linear_cross_entropy`.

    Attributes:
        linear_weight: ``(num_classes, *out_features, in_features)``, initialised
            as ``torch.nn.Linear`` does: uniform in ``[-1/sqrt(in_features),
            1/sqrt(in_features)]``.
        linear_bias: ``(num_classes, *out_features)`` (same bound) or None.

    Both are plain numpy arrays: update them in place (``m.linear_weight -= lr
    * grads.linear_weight``) or assign new arrays of the same shape and dtype.

    With ``device="gpu"`` the weight and bias stay on the device between calls
    and are uploaded again only when their bytes changed (a 64-bit checksum of
    each is compared per call, at memory speed on the host), so an inference
    service pays for the head's upload once.

    ``loss_fn(input, target)`` returns the loss; ``loss_fn.value_and_grad(input,
    target)`` returns ``(loss, LinearCrossEntropyGrads(input, linear_weight,
    linear_bias))``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: Tuple[int, ...] = (),
        bias: bool = False,
        dtype: Any = np.float32,
        reduction: Reduction = "mean",
        weight: Any = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options: Optional[LinearCrossEntropyOptions] = None,
        seed: Optional[int] = None,
        device: Device = "cpu",
        softcap: Optional[float] = None,
        z_loss: float = 0.0,
    ) -> None:
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
        out_features = tuple(int(d) for d in out_features)
        if any(d < 0 for d in out_features):
            raise ValueError(f"out_features: expected non-negative sizes, got {out_features}")
        dt = np.dtype(dtype)
        check_float_dtype("dtype", np.empty(0, dtype=dt))
        self.reduction, self.label_smoothing, self.softcap, self.z_loss = _loss_options(
            reduction, label_smoothing, softcap, z_loss
        )
        if options is not None and not isinstance(options, LinearCrossEntropyOptions):
            raise TypeError(f"options: expected LinearCrossEntropyOptions or None, got {type(options).__name__}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.out_features = out_features
        self.weight = weight_arg(weight, self.num_classes)
        self.ignore_index = None if ignore_index is None else int_arg("ignore_index", ignore_index)
        self.options = options
        self.device = check_device(device)
        # the device copy of the weight and bias (device="gpu"/"auto"), made
        # on first use and kept while their bytes are unchanged
        self._resident: Optional[Any] = None
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(in_features) if in_features > 0 else 0.0
        shape = (self.num_classes, *out_features)
        self.linear_weight: np.ndarray = rng.uniform(-bound, bound, size=shape + (self.in_features,)).astype(dt)
        self.linear_bias: Optional[np.ndarray] = (
            rng.uniform(-bound, bound, size=shape).astype(dt) if bias else None
        )

    def _run(self, input: Any, target: Any, return_grad: bool, grad_output: Any) -> Any:
        req = linear_request(
            input, self.linear_weight, target, self.linear_bias, self.weight, self.reduction,
            self.ignore_index, self.label_smoothing, self.options, return_grad, grad_output, self.device,
            self.softcap, self.z_loss,
        )
        if req.device == "gpu" and self._resident is None:
            from .gpu import ResidentWeight

            self._resident = ResidentWeight()
        loss = run_linear(req, self._resident)
        return loss if req.grads is None else (loss, req.grads)

    def __call__(self, input: Any, target: Any) -> np.ndarray:
        """Loss of ``input`` (``(in_features,)`` or ``(N, in_features)``) against ``target``."""
        return self._run(input, target, False, None)

    def value_and_grad(
        self, input: Any, target: Any, *, grad_output: Any = None
    ) -> Tuple[np.ndarray, LinearCrossEntropyGrads]:
        """``(loss, LinearCrossEntropyGrads(input, linear_weight, linear_bias))``
        from one fused pass; gradients have the shapes of what they differentiate."""
        return self._run(input, target, True, grad_output)

    def __repr__(self) -> str:
        return (
            f"LinearCrossEntropyLoss(in_features={self.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear_bias is not None}, "
            f"dtype={self.linear_weight.dtype}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
            f"softcap={self.softcap}, z_loss={self.z_loss}, options={self.options})"
        )
