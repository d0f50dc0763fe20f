"""Loading and judging the shared conformance corpus (tests/data, produced by
PyTorch in float64 from the stored inputs; see tests/data/README.md)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import ml_dtypes
import numpy as np

DATA = Path(__file__).parent / "data"
TOL = {
    "float32": (1e-5, 1e-6),
    "float64": (1e-10, 1e-10),
    "float16": (2e-2, 2e-2),
    "bfloat16": (2e-2, 2e-2),
}
ERRORS = {"IndexError": IndexError, "ValueError": ValueError, "RuntimeError": ValueError}


@lru_cache(maxsize=1)
def _corpus():
    cases = json.loads((DATA / "cases.json").read_text())["cases"]
    arrays = dict(np.load(DATA / "cases.npz"))
    return cases, arrays


def cases(fn: str) -> List[Dict[str, Any]]:
    return [c for c in _corpus()[0] if c["fn"] == fn]


def load(ref: Dict[str, str]) -> np.ndarray:
    a = _corpus()[1][ref["key"]]
    if ref["dtype"] == "bfloat16":
        return a.view(ml_dtypes.bfloat16)
    return a.astype(ref["dtype"], copy=False)


def assert_close(name: str, got: Any, want: np.ndarray, dtype: str) -> None:
    rtol, atol = TOL[dtype]
    got = np.asarray(got).astype(np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, equal_nan=True, err_msg=name)


def ce_args(case: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Dict[str, Any]]:
    """``(input, target, weight, kwargs)`` of a cross_entropy case."""
    kw = dict(case["kwargs"])
    kw.pop("weight", None)
    w = load(case["weight"]) if "weight" in case else None
    return load(case["input"]), load(case["target"]), w, kw


def lce_args(case: Dict[str, Any]) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """``(positional arguments by name, keyword arguments)`` of a linear_cross_entropy case."""
    kw = dict(case["kwargs"])
    kw.pop("weight", None)
    args = dict(input=load(case["input"]), linear_weight=load(case["linear_weight"]),
                target=load(case["target"]))
    if "linear_bias" in case:
        kw["linear_bias"] = load(case["linear_bias"])
    if "weight" in case:
        kw["weight"] = load(case["weight"])
    return args, kw
