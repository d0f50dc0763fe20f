"""Type stubs of the native module (built from rust/python).

Each operation takes a request object built by the Python package
(``fusedce._request``), read attribute by attribute by the bindings."""

from typing import Any, Optional, Sequence, final

import numpy as np

from ._request import (
    CrossEntropyRequest,
    LinearCrossEntropyRequest,
    LinearTokenStatsRequest,
    Problem,
    StatsProblem,
    TokenStatsRequest,
)

__all__ = [
    "DlpackExport",
    "DlpackView",
    "TargetPlan",
    "check_options",
    "cross_entropy",
    "dlpack_view",
    "get_num_threads",
    "linear_cross_entropy",
    "linear_token_stats",
    "plan",
    "set_call_threads",
    "set_num_threads",
    "simd_level",
    "stats_plan",
    "token_stats",
]

def cross_entropy(request: CrossEntropyRequest) -> float: ...
def linear_cross_entropy(request: LinearCrossEntropyRequest) -> float: ...
def token_stats(request: TokenStatsRequest) -> None: ...
def linear_token_stats(request: LinearTokenStatsRequest) -> None: ...
def stats_plan(problem: StatsProblem, wants_grad: bool) -> Optional[np.ndarray]: ...

@final
class TargetPlan:
    """A validated problem as a backend without the core's kernels needs it."""

    @property
    def targets(self) -> Optional[np.ndarray]: ...
    @property
    def scale(self) -> np.ndarray: ...
    @property
    def denom(self) -> float: ...
    def reduce(self, losses: np.ndarray) -> float: ...

def plan(problem: Problem) -> TargetPlan: ...
def check_options(reduction: str, label_smoothing: float, softcap: Optional[float], z_loss: float) -> None: ...
def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def set_call_threads(n: Optional[int]) -> Optional[int]: ...
def simd_level() -> str: ...

@final
class DlpackView:
    """A DLPack producer's CPU tensor, kept alive, as ``__array_interface__``."""

    @property
    def dtype(self) -> str: ...
    @property
    def __array_interface__(self) -> dict[str, Any]: ...

def dlpack_view(arg: str, obj: Any) -> DlpackView: ...
@final
class DlpackExport:
    """A numpy array offered to DLPack consumers without a copy."""

    def __new__(
        cls,
        array: np.ndarray,
        data: int,
        shape: Sequence[int],
        strides: Sequence[int],
        code: int,
        bits: int,
        read_only: bool,
    ) -> DlpackExport: ...
    def __dlpack_device__(self) -> tuple[int, int]: ...
    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Optional[tuple[int, int]] = None,
        dl_device: Optional[tuple[int, int]] = None,
        copy: Optional[bool] = None,
    ) -> Any: ...
