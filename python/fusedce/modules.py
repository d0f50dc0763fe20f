"""``torch.nn``-style loss modules over numpy arrays."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from ._arrays import float_kind
from .functional import (
    LinearCrossEntropyGrads,
    Reduction,
    _check_common,
    _weight_array,
    cross_entropy,
    linear_cross_entropy,
)
from .options import LinearCrossEntropyOptions


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
        device: str = "cpu",
    ) -> None:
        _check_common(reduction, label_smoothing)
        self.weight: Optional[np.ndarray] = (
            None if weight is None else _weight_array(weight, int(np.shape(weight)[0]) if np.ndim(weight) == 1 else -1)
        )
        self.ignore_index = int(ignore_index)
        self.reduction: Reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.device = device

    def __call__(self, input: Any, target: Any) -> np.ndarray:
        """Loss of ``input`` (``(C,)``, ``(N, C)`` or ``(N, C, d1..dK)``) against ``target``."""
        return cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            device=self.device,
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
        )

    def __repr__(self) -> str:
        return (
            f"CrossEntropyLoss(weight={'None' if self.weight is None else f'<{self.weight.shape[0]} classes>'}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing})"
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
        device: str = "cpu",
    ) -> None:
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {v!r}")
        out_features = tuple(int(d) for d in out_features)
        if any(d < 0 for d in out_features):
            raise ValueError(f"out_features: expected non-negative sizes, got {out_features}")
        dt = np.dtype(dtype)
        float_kind("dtype", np.empty(0, dtype=dt))
        _check_common(reduction, label_smoothing)
        if weight is not None and np.shape(weight) != (num_classes,):
            raise ValueError(f"weight: expected weight shape to be {(num_classes,)}, got {np.shape(weight)}")
        if options is not None and not isinstance(options, LinearCrossEntropyOptions):
            raise TypeError(f"options: expected LinearCrossEntropyOptions or None, got {type(options).__name__}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.out_features = out_features
        self.reduction: Reduction = reduction
        self.weight = None if weight is None else _weight_array(weight, num_classes)
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.options = options
        self.device = device
        # device copies of the weight and bias (device="gpu"/"auto"), kept
        # while their bytes are unchanged (checked by a checksum per call)
        self._gpu_cache: dict = {}
        rng = np.random.default_rng(seed)
        bound = 1.0 / np.sqrt(in_features) if in_features > 0 else 0.0
        shape = (self.num_classes, *out_features)
        self.linear_weight: np.ndarray = rng.uniform(-bound, bound, size=shape + (self.in_features,)).astype(dt)
        self.linear_bias: Optional[np.ndarray] = (
            rng.uniform(-bound, bound, size=shape).astype(dt) if bias else None
        )

    def _kwargs(self) -> dict:
        return dict(
            linear_bias=self.linear_bias, weight=self.weight, reduction=self.reduction,
            ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            options=self.options, device=self.device, _gpu_cache=self._gpu_cache,
        )

    def __call__(self, input: Any, target: Any) -> np.ndarray:
        """Loss of ``input`` (``(in_features,)`` or ``(N, in_features)``) against ``target``."""
        return linear_cross_entropy(input, self.linear_weight, target, **self._kwargs())

    def value_and_grad(
        self, input: Any, target: Any, *, grad_output: Any = None
    ) -> Tuple[np.ndarray, LinearCrossEntropyGrads]:
        """``(loss, LinearCrossEntropyGrads(input, linear_weight, linear_bias))``
        from one fused pass; gradients have the shapes of what they differentiate."""
        return linear_cross_entropy(
            input, self.linear_weight, target, return_grad=True, grad_output=grad_output, **self._kwargs()
        )

    def __repr__(self) -> str:
        return (
            f"LinearCrossEntropyLoss(in_features={self.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear_bias is not None}, "
            f"dtype={self.linear_weight.dtype}, reduction={self.reduction!r}, "
            f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, options={self.options})"
        )
