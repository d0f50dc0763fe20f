"""The token-statistics and softcap/z-loss conformance cases (tests/data/stats,
made by PyTorch in float64 from the stored inputs; see make_cases.py there)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import fusedce

DATA = Path(__file__).parent / "data" / "stats"
#: float32 outputs of half inputs keep float32 accuracy (the inputs are exact)
TOL = {"float32": 2e-5, "float64": 1e-10, "bfloat16": 2e-5}
GRAD_TOL = {"float32": 2e-5, "float64": 1e-10, "bfloat16": 1.6e-2}


@lru_cache(maxsize=1)
def _corpus():
    return json.loads((DATA / "cases.json").read_text())["cases"], dict(np.load(DATA / "cases.npz"))


def _load(ref):
    a = _corpus()[1][ref["key"]]
    return a.view(ml_dtypes.bfloat16) if ref["dtype"] == "bfloat16" else a


def _cases(fn):
    return [pytest.param(c, id=c["id"]) for c in _corpus()[0] if c["fn"] == fn]


def _close(name, got, want, tol, scale=1.0):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol * scale,
                               equal_nan=True, err_msg=name)


@pytest.mark.parametrize("case", _cases("token_stats"))
def test_token_stats_case(case):
    x, t = _load(case["input"]), _load(case["target"])
    dt = case["input"]["dtype"]
    gl, ge = _load(case["grad_logprob"]), _load(case["grad_entropy"])
    got, grad = fusedce.token_stats(x, t, **case["kwargs"], return_grad=True, grad_logprob=gl, grad_entropy=ge)
    scale = 1.0 + float(np.max(np.abs(np.where(np.isfinite(_load(case["lse"])), _load(case["lse"]), 0))))
    for name in ("lse", "logprob", "entropy", "topk_logprobs"):
        if name in case:
            _close(name, getattr(got, name), _load(case[name]), TOL[dt], scale)
    for name in ("argmax", "rank", "topk_ids"):
        if name in case:
            np.testing.assert_array_equal(getattr(got, name), _load(case[name]), err_msg=name)
    gmag = 1.0 + float(np.max(np.abs(gl), initial=0.0)) + float(np.max(np.abs(ge), initial=0.0))
    _close("grad_input", grad, _load(case["grad_input"]), GRAD_TOL[dt], gmag * scale)


@pytest.mark.parametrize("case", _cases("cross_entropy"))
def test_softcap_z_loss_case(case):
    x, t = _load(case["input"]), _load(case["target"])
    dt = case["input"]["dtype"]
    loss, grad = fusedce.cross_entropy(x, t, **case["kwargs"], return_grad=True)
    want = _load(case["loss"])
    _close("loss", loss, want, GRAD_TOL[dt], 1.0 + float(np.max(np.abs(want), initial=0.0)))
    _close("grad_input", grad, _load(case["grad_input"]), GRAD_TOL[dt])
