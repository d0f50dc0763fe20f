"""The GPU path (WGSL through wgpu-py): the whole conformance corpus, GPU vs CPU
property tests, chunking under the binding limit, the resident module weight.

Skipped when no WebGPU adapter is found, unless FUSEDCE_REQUIRE_GPU=1 (CI sets
it, with Mesa's lavapipe installed): then a missing adapter fails the run.
"""

from __future__ import annotations

import os
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedce
from conformance import ERRORS, assert_close, cases, ce_args, lce_args, load
from fusedce.gpu import _linear

REQUIRED = os.environ.get("FUSEDCE_REQUIRE_GPU") == "1"


def _available() -> bool:
    try:
        return fusedce.gpu.is_available()
    except Exception:  # noqa: BLE001 - reported by test_adapter_is_present
        return False


AVAILABLE = _available()
needs_gpu = pytest.mark.skipif(not AVAILABLE and not REQUIRED, reason="no WebGPU adapter (set FUSEDCE_REQUIRE_GPU=1 to fail instead)")

# float32 on the device: the corpus's float32 bounds; float16/bfloat16 are
# converted on upload and judged with their own bounds. float64 falls back to
# the CPU (with a warning).
CE = cases("cross_entropy")
LCE = cases("linear_cross_entropy")


def test_adapter_is_present_when_required():
    if not REQUIRED:
        pytest.skip("FUSEDCE_REQUIRE_GPU is not set")
    info = fusedce.gpu.adapter_info()  # raises with the reason when there is none
    assert info["max_storage_buffer_binding_size"] > 0


@needs_gpu
def test_adapter_info():
    info = fusedce.gpu.adapter_info()
    assert "adapter_type" in info and "backend_type" in info
    assert isinstance(info["features"], list)


@needs_gpu
@pytest.mark.parametrize("case", CE, ids=[c["id"] for c in CE])
def test_cross_entropy_case_on_gpu(case):
    x, t, w, kw = ce_args(case)
    dtype = case["input"]["dtype"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float64 computed on the CPU
        if "error" in case:
            with pytest.raises(ERRORS[case["error"]]):
                fusedce.cross_entropy(x, t, w, **kw, device="gpu")
            return
        go = load(case["grad_output"]) if "grad_output" in case else None
        if "grad_input" in case:
            loss, grad = fusedce.cross_entropy(x, t, w, **kw, return_grad=True, grad_output=go, device="gpu")
            assert grad.dtype == x.dtype and grad.shape == x.shape
            assert_close("grad_input", grad, load(case["grad_input"]), dtype)
        else:
            loss = fusedce.cross_entropy(x, t, w, **kw, device="gpu")
    assert loss.dtype == x.dtype
    assert_close("loss", loss, load(case["loss"]), dtype)


@needs_gpu
@pytest.mark.parametrize("case", LCE, ids=[c["id"] for c in LCE])
def test_linear_cross_entropy_case_on_gpu(case):
    args, kw = lce_args(case)
    dtype = case["input"]["dtype"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if "error" in case:
            with pytest.raises(ERRORS[case["error"]]):
                fusedce.linear_cross_entropy(**args, **kw, device="gpu")
            return
        go = load(case["grad_output"]) if "grad_output" in case else None
        # chunks of 2 rows: several chunks per case
        opts = fusedce.LinearCrossEntropyOptions(batch_chunk_size=2)
        loss, g = fusedce.linear_cross_entropy(**args, **kw, return_grad=True, grad_output=go,
                                               options=opts, device="gpu")
    assert_close("loss", loss, load(case["loss"]), dtype)
    assert_close("grad_input", g.input, load(case["grad_input"]), dtype)
    assert_close("grad_linear_weight", g.linear_weight, load(case["grad_linear_weight"]), dtype)
    if "grad_linear_bias" in case:
        assert_close("grad_linear_bias", g.linear_bias, load(case["grad_linear_bias"]), dtype)


@st.composite
def ce_problems(draw):
    k = draw(st.integers(0, 2))
    n = draw(st.integers(1, 6))
    c = draw(st.sampled_from([1, 2, 7, 255, 256, 257, 1000]))
    sp = tuple(draw(st.lists(st.integers(1, 5), min_size=k, max_size=k)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16]))
    x = (rng.normal(size=(n, c) + sp) * draw(st.sampled_from([0.5, 10.0]))).astype(dtype)
    if draw(st.booleans()):
        t = rng.random(size=x.shape)
        t = (t / t.sum(axis=1, keepdims=True)).astype(dtype)
        ii = -100
    else:
        t = rng.integers(0, c, size=(n,) + sp)
        ii = draw(st.sampled_from([-100, 0]))
    w = rng.random(c) + 0.5 if draw(st.booleans()) else None
    red = draw(st.sampled_from(["none", "mean", "sum"]))
    ls = draw(st.sampled_from([0.0, 0.2]))
    return x, t, w, ii, red, ls


@needs_gpu
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ce_problems())
def test_gpu_matches_cpu(p):
    x, t, w, ii, red, ls = p
    lc, gc = fusedce.cross_entropy(x, t, w, ii, red, ls, return_grad=True)
    lg, gg = fusedce.cross_entropy(x, t, w, ii, red, ls, return_grad=True, device="gpu")
    tol = 1e-5 if x.dtype == np.float32 else 1e-2
    np.testing.assert_allclose(lg.astype(np.float64), lc.astype(np.float64), rtol=tol, atol=tol)
    # each gradient element is softmax * s - target * s: rounding is relative to s
    # (the largest class weight over the mean's denominator), not to the difference
    valid = t.size // x.shape[1] if t.dtype.kind == "f" else max(1, int(np.sum(t != ii)))
    s = (1.0 if w is None else float(w.max())) / (valid if red == "mean" else 1)
    scale = max(s, float(np.abs(gc.astype(np.float64)).max(initial=0)))
    np.testing.assert_allclose(gg.astype(np.float64), gc.astype(np.float64), rtol=tol, atol=tol * scale)


@needs_gpu
def test_large_dispatch_and_in_place():
    """More than 65535 samples: the 2-D dispatch; grad_out=input works on the GPU too."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(70_000, 3)).astype(np.float32)
    t = rng.integers(0, 3, 70_000)
    lc, gc = fusedce.cross_entropy(x, t, reduction="sum", return_grad=True)
    xi = x.copy()
    lg, gg = fusedce.cross_entropy(xi, t, reduction="sum", return_grad=True, grad_out=xi, device="gpu")
    assert gg is xi
    np.testing.assert_allclose(lg, lc, rtol=1e-5)
    np.testing.assert_allclose(gg, gc, rtol=1e-5, atol=1e-6)


@needs_gpu
def test_linear_on_gpu_matches_cpu_with_blocks(monkeypatch):
    """A tiny binding limit forces the weight into several class blocks and
    the rows into several chunks."""
    from fusedce.gpu import _context as _backend

    rng = np.random.default_rng(1)
    x = rng.normal(size=(37, 20)).astype(np.float32)
    w = (rng.normal(size=(130, 20)) * 0.3).astype(np.float32)
    b = rng.normal(size=130).astype(np.float32)
    t = rng.integers(0, 130, 37)
    lc, gc = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1, return_grad=True)
    ctx = _backend.context()
    monkeypatch.setattr(ctx, "max_binding", 130 * 4 * 3)  # 3 rows of logits; weight blocks of 19 classes
    lg, gg = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1, return_grad=True,
                                          device="gpu")
    np.testing.assert_allclose(lg, lc, rtol=1e-5)
    for a, e in zip(gg, gc):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * float(np.abs(e).max()))


@needs_gpu
def test_matmul_kernel():
    from fusedce.gpu import _context as _backend

    rng = np.random.default_rng(2)
    for m, k, n in ((1, 1, 1), (65, 17, 130), (64, 64, 64), (3, 200, 5)):
        a = rng.normal(size=(m, k)).astype(np.float32)
        b = rng.normal(size=(k, n)).astype(np.float32)
        np.testing.assert_allclose(_linear.matmul(a, b), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)


@needs_gpu
def test_module_keeps_its_weight_on_the_device():
    m = fusedce.LinearCrossEntropyLoss(16, 40, bias=True, seed=0, device="gpu")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    t = rng.integers(0, 40, 8)
    l1 = m(x, t)
    l2 = m(x, t)
    assert m._resident.uploads == 1 and l1 == l2
    cpu = fusedce.linear_cross_entropy(x, m.linear_weight, t, linear_bias=m.linear_bias)
    np.testing.assert_allclose(l1, cpu, rtol=1e-5)
    loss, g = m.value_and_grad(x, t)
    m.linear_weight -= 0.5 * g.linear_weight  # in place: noticed, uploaded again
    l3 = m(x, t)
    assert m._resident.uploads == 2 and l3 < l1
    np.testing.assert_allclose(
        l3, fusedce.linear_cross_entropy(x, m.linear_weight, t, linear_bias=m.linear_bias), rtol=1e-5)


def test_gpu_requested_without_adapter_is_a_clear_error(monkeypatch):
    from fusedce.gpu import _context as _backend

    monkeypatch.setattr(_backend, "_CTX", None)
    monkeypatch.setattr(_backend, "_FAILED", "no WebGPU adapter found: (simulated)")
    with pytest.raises(RuntimeError, match="device: 'gpu' was asked for, but no WebGPU adapter"):
        fusedce.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]), device="gpu")
    assert not fusedce.gpu.is_available()
    # auto quietly uses the CPU
    assert fusedce.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]), device="auto") > 0


@needs_gpu
def test_float64_on_gpu_warns_and_uses_cpu():
    x = np.random.default_rng(0).normal(size=(4, 5))
    t = np.array([0, 1, 2, 3])
    with pytest.warns(RuntimeWarning, match="float64"):
        lg = fusedce.cross_entropy(x, t, device="gpu")
    assert lg == fusedce.cross_entropy(x, t)


HALF_CE = [c for c in CE if c["input"]["dtype"] == "float16" and "error" not in c]


@needs_gpu
@pytest.mark.parametrize("case", HALF_CE, ids=[c["id"] for c in HALF_CE])
def test_float16_cases_without_shader_f16(case, monkeypatch):
    """Adapters without shader-f16: float16 is converted to float32 on upload."""
    from fusedce.gpu import _context as _backend

    ctx = _backend.context()
    monkeypatch.setattr(ctx, "has_f16", False)
    test_cross_entropy_case_on_gpu(case)


@needs_gpu
def test_float16_storage_is_used_when_the_adapter_has_it():
    from fusedce.gpu import _context as _backend

    ctx = _backend.context()
    if not ctx.has_f16:
        pytest.skip("adapter without shader-f16")
    x = np.random.default_rng(0).normal(size=(5, 9)).astype(np.float16)
    t = np.arange(5)
    lg, gg = fusedce.cross_entropy(x, t, return_grad=True, device="gpu")
    assert ("ce", "f16", "rows") in ctx._pipelines  # the (N, C) variant this call uses
    lc, gc = fusedce.cross_entropy(x, t, return_grad=True)
    np.testing.assert_allclose(gg.astype(np.float32), gc.astype(np.float32), rtol=2e-3, atol=1e-4)


@st.composite
def lce_problems(draw):
    n = draw(st.integers(0, 9))
    d = draw(st.sampled_from([1, 3, 17, 64]))
    c = draw(st.sampled_from([1, 2, 5, 63, 130]))
    k = draw(st.integers(0, 1)) if n > 0 else 0
    out = tuple(draw(st.lists(st.integers(1, 3), min_size=k, max_size=k)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float16, ml_dtypes.bfloat16]))
    x = rng.normal(size=(n, d)).astype(dtype)
    w = (rng.normal(size=(c,) + out + (d,)) / np.sqrt(d)).astype(dtype)
    b = rng.normal(size=(c,) + out).astype(dtype) if draw(st.booleans()) else None
    if draw(st.booleans()):
        t = rng.random(size=(n, c) + out)
        t = (t / t.sum(axis=1, keepdims=True)).astype(dtype)
    else:
        t = rng.integers(0, c, size=(n,) + out)
    cw = rng.random(c) + 0.5 if draw(st.booleans()) else None
    red = draw(st.sampled_from(["none", "mean", "sum"]))
    ls = draw(st.sampled_from([0.0, 0.3]))
    rows = draw(st.integers(1, max(1, n)))
    return x, w, b, t, cw, red, ls, rows


@needs_gpu
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lce_problems())
def test_linear_gpu_matches_cpu(p):
    x, w, b, t, cw, red, ls, rows = p
    kw = dict(linear_bias=b, weight=cw, reduction=red, label_smoothing=ls, return_grad=True,
              options=fusedce.LinearCrossEntropyOptions(batch_chunk_size=rows))
    lc, gc = fusedce.linear_cross_entropy(x, w, t, **kw)
    lg, gg = fusedce.linear_cross_entropy(x, w, t, **kw, device="gpu")
    tol = 2e-5 if x.dtype == np.float32 else 2e-2
    np.testing.assert_allclose(lg.astype(np.float64), lc.astype(np.float64), rtol=tol, atol=tol)
    for a, e in zip(gg, gc):
        if e is None:
            assert a is None
            continue
        assert a.dtype == e.dtype and a.shape == e.shape
        # the logit gradients p·Σtw - tw cancel to results far smaller than
        # their float32 terms (class weights times the inputs): the terms'
        # size bounds the two devices' difference, not the cancelled result
        terms = (1.0 if cw is None else float(cw.max())) * max(
            1.0, float(np.abs(x.astype(np.float64)).max(initial=0)), float(np.abs(w.astype(np.float64)).max(initial=0)))
        scale = max(1e-3, float(np.abs(e.astype(np.float64)).max(initial=0)), 1e-2 * terms)
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=tol, atol=tol * scale)


def test_weight_checksum_sees_every_byte():
    """The resident-weight fingerprint covers the tail that is not a whole
    8-byte word, and the shape and dtype."""
    from fusedce.gpu import _context as _backend

    a = np.arange(7, dtype=np.float16)  # 14 bytes: one word and a 6-byte tail
    base = _linear.checksum(a)
    for i in range(a.size):
        b = a.copy()
        b[i] += 1
        assert _linear.checksum(b) != base
    assert _linear.checksum(a.reshape(7, 1)) != base
    assert _linear.checksum(a.view(np.int16)) != base


@needs_gpu
def test_masked_vocabulary_entries_and_empty_shapes_match_the_cpu():
    """-inf logits (and a -inf bias) on non-target classes give the CPU's
    finite loss; empty spatial axes, in_features=0 and out_features=(0,)
    give the CPU's results instead of Python errors."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 7)).astype(np.float32)
    x[:, 3] = -np.inf
    t = np.array([0, 1, 2, 6])
    for kw in (dict(), dict(label_smoothing=0.2), dict(reduction="none")):
        lc, gc = fusedce.cross_entropy(x, t, return_grad=True, **kw)
        lg, gg = fusedce.cross_entropy(x, t, return_grad=True, device="gpu", **kw)
        np.testing.assert_allclose(lg, lc, rtol=1e-5)
        np.testing.assert_allclose(gg, gc, rtol=1e-5, atol=1e-7)
    h = rng.normal(size=(4, 5)).astype(np.float32)
    w = rng.normal(size=(7, 5)).astype(np.float32)
    b = np.zeros(7, np.float32)
    b[3] = -np.inf
    lc = fusedce.linear_cross_entropy(h, w, t, linear_bias=b)
    assert np.isfinite(lc)
    np.testing.assert_allclose(fusedce.linear_cross_entropy(h, w, t, linear_bias=b, device="gpu"), lc, rtol=1e-5)
    for args in (
        (np.zeros((2, 3, 0), np.float32), np.zeros((2, 0), np.int64)),
    ):
        for red in ("mean", "sum", "none"):
            want = fusedce.cross_entropy(*args, reduction=red, return_grad=True)
            got = fusedce.cross_entropy(*args, reduction=red, return_grad=True, device="gpu")
            np.testing.assert_array_equal(got[0], want[0])
            assert got[1].shape == want[1].shape
    for xs, ws, ts in (
        (np.zeros((3, 0), np.float32), np.zeros((4, 0), np.float32), np.array([0, 1, 3])),
        (np.ones((2, 3), np.float32), np.ones((4, 0, 3), np.float32), np.zeros((2, 0), np.int64)),
    ):
        want = fusedce.linear_cross_entropy(xs, ws, ts, return_grad=True)
        got = fusedce.linear_cross_entropy(xs, ws, ts, return_grad=True, device="gpu")
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        for a, e in zip(got[1], want[1]):
            assert (a is None) == (e is None)
            if e is not None:
                np.testing.assert_allclose(a, e, rtol=1e-6)
