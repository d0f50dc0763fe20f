"""Type stubs of the native module (built from rust/python)."""

from typing import Optional

import numpy as np

def cross_entropy(
    input: np.ndarray,
    dtype: str,
    batch: int,
    classes: int,
    spatial: int,
    target_index: Optional[np.ndarray],
    target_probs: Optional[np.ndarray],
    weight: Optional[np.ndarray],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    grad_output: Optional[float],
    grad_output_array: Optional[np.ndarray],
    grad_mode: str,
    grad_out: Optional[np.ndarray],
    losses: Optional[np.ndarray],
) -> float: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
def linear_cross_entropy(
    input: np.ndarray,
    linear_weight: np.ndarray,
    linear_bias: Optional[np.ndarray],
    dtype: str,
    batch: int,
    in_features: int,
    classes: int,
    spatial: int,
    target_index: Optional[np.ndarray],
    target_probs: Optional[np.ndarray],
    weight: Optional[np.ndarray],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    grad_output: Optional[float],
    grad_output_array: Optional[np.ndarray],
    chunk_rows: int,
    acc_f64: bool,
    max_weight_copy: int,
    grad_input: Optional[np.ndarray],
    grad_linear_weight: Optional[np.ndarray],
    grad_linear_bias: Optional[np.ndarray],
    losses: Optional[np.ndarray],
) -> float: ...
