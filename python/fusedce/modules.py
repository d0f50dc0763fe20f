"""``torch.nn``-style loss modules over numpy arrays."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

from .functional import Reduction, _check_common, _weight_array, cross_entropy


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
