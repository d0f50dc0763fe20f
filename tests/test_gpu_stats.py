"""Token statistics on the GPU (WGSL through wgpu-py) against the float64
reference and the CPU path: shapes, K-dim inputs, temperature, softcap,
masked classes, ignore_index, top-k, gradients, the linear driver with class
blocks, the conformance cases. Skipped without an adapter unless
FUSEDCE_REQUIRE_GPU=1 (CI: lavapipe), as tests/test_gpu.py."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedce
from reference import token_stats_ref
from test_gpu import needs_gpu
from test_stats_conformance import _cases, _load

FLOATS = ("lse", "logprob", "entropy", "topk_logprobs")
INTS = ("argmax", "rank", "topk_ids")
#: float32 on the device: tanh, exp and log of the shader, reductions in a
#: different order than the CPU's
RTOL = 1e-4


def _check(got, want, scale):
    for name in FLOATS + INTS:
        g = getattr(got, name)
        if g is None or name not in want:
            continue
        if name in INTS:
            np.testing.assert_array_equal(g, want[name], err_msg=name)
        else:
            np.testing.assert_allclose(g, want[name], rtol=RTOL, atol=RTOL * scale, equal_nan=True, err_msg=name)


@st.composite
def gpu_problems(draw):
    k = draw(st.integers(0, 1))
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 600))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=k, max_size=k)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (n, c) + spatial
    x = rng.normal(size=shape) * draw(st.sampled_from([0.5, 4.0]))
    if draw(st.booleans()) and c > 1:
        x = np.where(rng.random(size=shape) < 0.2, -np.inf, x)
        x[:, 0] = 1.0  # no all-masked sample
    x = x.astype(draw(st.sampled_from([np.float32, ml_dtypes.bfloat16])))
    per_token = (n,) + spatial
    t = rng.integers(0, c, size=per_token)
    t = np.where(rng.random(size=per_token) < 0.2, -100, t)
    return dict(x=x, t=t, temperature=draw(st.sampled_from([1.0, 0.6])),
                softcap=draw(st.sampled_from([None, 3.0])), top_k=draw(st.integers(0, min(c, 8))),
                ge=float(rng.normal()), gl=rng.normal(size=per_token))


@needs_gpu
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gpu_problems())
def test_token_stats_on_gpu_match_the_reference(p):
    kw = dict(temperature=p["temperature"], softcap=p["softcap"], top_k=p["top_k"])
    want, want_grad = token_stats_ref(p["x"].astype(np.float64), p["t"], grad_logprob=p["gl"],
                                      grad_entropy=p["ge"], **kw)
    got, grad = fusedce.token_stats(p["x"], p["t"], return_grad=True, grad_logprob=p["gl"],
                                    grad_entropy=p["ge"], device="gpu", **kw)
    scale = 1.0 + float(np.max(np.abs(np.where(np.isfinite(want["lse"]), want["lse"], 0)), initial=0))
    _check(got, want, scale)
    gtol = RTOL if p["x"].dtype == np.float32 else 2e-2
    np.testing.assert_allclose(grad.astype(np.float64), want_grad, rtol=gtol, atol=gtol * scale * 3)


@needs_gpu
@pytest.mark.parametrize("case", _cases("token_stats"))
def test_token_stats_case_on_gpu(case):
    x, t = _load(case["input"]), _load(case["target"])
    if x.dtype == np.float64:
        pytest.skip("float64 runs on the CPU")
    gl, ge = _load(case["grad_logprob"]), _load(case["grad_entropy"])
    got, grad = fusedce.token_stats(x, t, **case["kwargs"], return_grad=True, grad_logprob=gl, grad_entropy=ge,
                                    device="gpu")
    lse = _load(case["lse"])
    scale = 1.0 + float(np.max(np.abs(np.where(np.isfinite(lse), lse, 0))))
    _check(got, {k: _load(case[k]) for k in FLOATS + INTS if k in case}, scale)
    gmag = 1.0 + float(np.max(np.abs(gl), initial=0.0)) + float(np.max(np.abs(ge), initial=0.0))
    gtol = RTOL if x.dtype == np.float32 else 2e-2
    np.testing.assert_allclose(grad.astype(np.float64), _load(case["grad_input"]), rtol=gtol, atol=gtol * gmag * scale)


@needs_gpu
@pytest.mark.parametrize("blocks", [False, True])
def test_linear_token_stats_on_gpu_match_the_cpu(blocks, monkeypatch):
    from fusedce.gpu import _context

    if blocks:  # the weight in class blocks of 64 rows (each block one binding)
        ctx = _context.context()
        monkeypatch.setattr(ctx, "max_binding", 64 * 24 * 4)
    rng = np.random.default_rng(4)
    n, d, c = 29, 24, 300
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(c, d)) * 0.4).astype(np.float32)
    b = (rng.normal(size=c) * 0.1).astype(np.float32)
    t = np.where(rng.random(n) < 0.2, -100, rng.integers(0, c, n))
    kw = dict(linear_bias=b, top_k=4, temperature=0.8, softcap=5.0, return_grad=True, grad_logprob=rng.normal(size=n),
              grad_entropy=0.3, options=fusedce.LinearCrossEntropyOptions(batch_chunk_size=7))
    if blocks:
        kw["linear_bias"] = None
    cpu, gcpu = fusedce.linear_token_stats(h, w, t, **kw)
    gpu, ggpu = fusedce.linear_token_stats(h, w, t, device="gpu", **kw)
    for name in FLOATS:
        np.testing.assert_allclose(getattr(gpu, name), getattr(cpu, name), rtol=RTOL, atol=RTOL * 10, err_msg=name)
    for name in INTS:
        np.testing.assert_array_equal(getattr(gpu, name), getattr(cpu, name), err_msg=name)
    for a, e in zip(ggpu, gcpu):
        if e is not None:
            np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-4)


@needs_gpu
def test_stats_without_target_on_gpu():
    x = np.random.default_rng(1).normal(size=(3, 40)).astype(np.float32)
    got = fusedce.token_stats(x, device="gpu", top_k=2)
    want = fusedce.token_stats(x, top_k=2)
    assert got.logprob is None and got.rank is None
    np.testing.assert_allclose(got.entropy, want.entropy, rtol=RTOL)
    np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
