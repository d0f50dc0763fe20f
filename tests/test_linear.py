"""linear_cross_entropy: property tests against a float64 numpy reference,
chunk-size and thread-count invariance, options, the module, bad input."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedce
from reference import cross_entropy_ref

DTYPES = {
    "float32": (np.float32, 3e-5),
    "float64": (np.float64, 1e-10),
    "float16": (np.float16, 2e-2),
    "bfloat16": (ml_dtypes.bfloat16, 3e-2),
}


def linear_cross_entropy_ref(x, w, t, b=None, weight=None, ignore_index=None, reduction="mean",
                             label_smoothing=0.0, grad_output=None, softcap=None, z_loss=0.0):
    """(loss, dx, dw, db, dlogits) in float64, from the definition: logits built in full."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    c, out, d = w.shape[0], w.shape[1:-1], w.shape[-1]
    w2 = w.reshape(-1, d)
    xb = x[None] if x.ndim == 1 else x
    logits = xb @ w2.T
    if b is not None:
        logits = logits + np.asarray(b, np.float64).reshape(-1)
    logits = logits.reshape((xb.shape[0], c) + out)
    if x.ndim == 1:
        logits = logits[0]
    ii = -100 if ignore_index is None else ignore_index
    loss, dl = cross_entropy_ref(logits, t, weight, ii, reduction, label_smoothing, grad_output, softcap, z_loss)
    dl2 = dl.reshape(xb.shape[0], w2.shape[0])
    dx = (dl2 @ w2).reshape(x.shape)
    dw = (dl2.T @ xb).reshape(w.shape)
    db = dl2.sum(axis=0).reshape((c,) + out)
    return loss, dx, dw, db, dl


def magnitudes(x, w, dl_ref):
    """The size of the terms each gradient sums (|dL|·|W|, |dL|ᵀ·|X|): float32
    rounding error scales with these, not with the (possibly cancelled) result."""
    x = np.abs(np.asarray(x, np.float64))
    w = np.abs(np.asarray(w, np.float64))
    xb = x[None] if x.ndim == 1 else x
    w2 = w.reshape(-1, w.shape[-1])
    dl2 = np.abs(dl_ref).reshape(xb.shape[0], w2.shape[0])
    return float((dl2 @ w2).max(initial=0)), float((dl2.T @ xb).max(initial=0))


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    n = draw(st.sampled_from([0, 1, 2, 3, 7, 13, 31]))
    d = draw(st.sampled_from([1, 2, 5, 16, 37]))
    c = draw(st.sampled_from([1, 2, 3, 11, 64, 97]))
    k = draw(st.integers(0, 2)) if n > 0 else 0
    out = tuple(draw(st.lists(st.integers(1, 3), min_size=k, max_size=k)))
    unbatched = k == 0 and n == 1 and draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    np_dtype, tol = DTYPES[dtype]
    x = rng.normal(size=(d,) if unbatched else (n, d)).astype(np_dtype)
    w = (rng.normal(size=(c,) + out + (d,)) / math.sqrt(d) * draw(st.sampled_from([0.5, 4.0]))).astype(np_dtype)
    b = rng.normal(size=(c,) + out).astype(np_dtype) if draw(st.booleans()) else None
    logits_shape = ((c,) if unbatched else (n, c)) + out
    probs = draw(st.booleans())
    ignore_index = None
    if probs:
        t = rng.random(size=logits_shape)
        t = (t / t.sum(axis=0 if unbatched else 1, keepdims=True)).astype(np_dtype)
    else:
        tshape = () if unbatched else (n,) + out
        t = rng.integers(0, c, size=tshape)
        ignore_index = draw(st.sampled_from([None, -1, 0, c + 3]))
        if draw(st.booleans()) and t.size:
            t = np.where(rng.random(size=tshape) < 0.3, -100 if ignore_index is None else ignore_index, t)
    weight = rng.random(c) * 2 if draw(st.booleans()) else None
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    ls = draw(st.sampled_from([0.0, 0.1, 1.0]))
    loss_shape = () if unbatched else (n,) + out
    go = None
    if draw(st.booleans()):
        go = rng.normal(size=loss_shape) if reduction == "none" else float(rng.normal())
    rows = draw(st.integers(1, max(1, n)))
    acc = draw(st.sampled_from([None, "float64"])) if dtype != "float64" else None
    return dict(x=x, w=w, b=b, t=t, weight=weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=ls, grad_output=go, rows=rows, acc=acc, tol=tol,
                softcap=draw(st.sampled_from([None, None, 3.0])), z_loss=draw(st.sampled_from([0.0, 0.0, 0.01])))


def _close(name, got, want, tol, mag=None):
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == np.shape(want), name
    want = np.asarray(want, np.float64)
    finite = want[np.isfinite(want)]
    if mag is None:
        mag = float(np.max(np.abs(finite), initial=0.0))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(mag, 1e-3), equal_nan=True, err_msg=name)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_float64_reference(p):
    kw = dict(weight=p["weight"], ignore_index=p["ignore_index"], reduction=p["reduction"],
              label_smoothing=p["label_smoothing"], softcap=p["softcap"], z_loss=p["z_loss"])
    x, w, b, t = p["x"], p["w"], p["b"], p["t"]
    want = linear_cross_entropy_ref(x, w, t, b, grad_output=p["grad_output"], **kw)
    opts = fusedce.LinearCrossEntropyOptions(batch_chunk_size=p["rows"], acc_dtype=p["acc"])
    loss, g = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, options=opts, return_grad=True,
                                           grad_output=p["grad_output"], **kw)
    tol = p["tol"] if p["acc"] is None else min(p["tol"], 3e-2)
    assert loss.dtype == x.dtype
    _close("loss", loss, want[0], tol)
    mx, mw = magnitudes(x, w, want[4])
    # A logit's gradient p·a - tw can cancel to 0 (one class, smoothing)
    # while its float32 terms are of the size of the class weights: the
    # rounding of those terms bounds the error, not the cancelled result.
    wmax = 1.0 if p["weight"] is None else max(1.0, float(np.max(p["weight"], initial=1.0)))
    go = 1.0 if p["grad_output"] is None else max(1.0, float(np.max(np.abs(p["grad_output"]), initial=1.0)))
    floor_x = wmax * go * float(np.max(np.abs(np.asarray(w, np.float64)), initial=0.0))
    floor_w = wmax * go * float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))
    _close("grad_input", g.input, want[1], tol, max(mx, floor_x, 1e-3 * tol))
    _close("grad_linear_weight", g.linear_weight, want[2], tol, max(mw, floor_w, 1e-3 * tol))
    if b is None:
        assert g.linear_bias is None
    else:
        _close("grad_linear_bias", g.linear_bias, want[3], tol)
    for got, of in ((g.input, x), (g.linear_weight, w)):
        assert got.dtype == of.dtype and got.shape == of.shape
    fwd = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, options=opts, **kw)
    np.testing.assert_array_equal(np.atleast_1d(fwd).view(np.uint8), np.atleast_1d(loss).view(np.uint8))


def _problem(n=203, d=48, c=517, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(dtype)
    w = (rng.normal(size=(c, d)) * 0.3).astype(dtype)
    b = rng.normal(size=c).astype(dtype)
    t = rng.integers(0, c, n)
    t[::5] = -100
    return x, w, b, t


def _run(x, w, b, t, rows, **kw):
    return fusedce.linear_cross_entropy(
        x, w, t, linear_bias=b, label_smoothing=0.1, return_grad=True,
        options=fusedce.LinearCrossEntropyOptions(batch_chunk_size=rows), **kw,
    )


def test_every_chunk_size_agrees_up_to_rounding():
    x, w, b, t = _problem()
    loss1, g1 = _run(x, w, b, t, x.shape[0])
    for rows in (1, 2, 7, 64, 202, 1000):
        loss, g = _run(x, w, b, t, rows)
        np.testing.assert_allclose(loss, loss1, rtol=1e-5)
        for a, e in zip(g, g1):
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * float(np.abs(e).max()))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_bitwise_identical_across_thread_counts(dtype):
    x, w, b, t = _problem(n=300, d=96, c=1500, dtype=dtype)
    before = fusedce.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            fusedce.set_num_threads(n)
            results.append(_run(x, w, b, t, 128, reduction="sum"))
    finally:
        fusedce.set_num_threads(before)
    (l0, g0) = results[0]
    for loss, g in results[1:]:
        assert loss.tobytes() == l0.tobytes()
        for a, e in zip(g, g0):
            assert a.tobytes() == e.tobytes()


def test_reduction_none_and_grad_output():
    x, w, b, t = _problem(n=17, d=9, c=31)
    go = np.random.default_rng(1).normal(size=17)
    loss, g = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none", return_grad=True,
                                           grad_output=go)
    want = linear_cross_entropy_ref(x, w, t, b, reduction="none", grad_output=go)
    assert loss.shape == (17,)
    _close("loss", loss, want[0], 3e-5)
    _close("dx", g.input, want[1], 3e-5)
    _close("dw", g.linear_weight, want[2], 3e-5)
    _close("db", g.linear_bias, want[3], 3e-5)


def test_inputs_are_not_modified_and_strided_inputs_work():
    x, w, b, t = _problem(n=40, d=12, c=50)
    big = np.repeat(x, 2, axis=0)
    xs = big[::2]
    copies = [a.copy() for a in (big, w, b, t)]
    loss, g = fusedce.linear_cross_entropy(xs, w, t, linear_bias=b, return_grad=True)
    want = linear_cross_entropy_ref(x, w, t, b)
    _close("loss", loss, want[0], 3e-5)
    _close("dx", g.input, want[1], 3e-5)
    for a, c in zip((big, w, b, t), copies):
        np.testing.assert_array_equal(a, c)


# ---- options ---------------------------------------------------------------------------

def test_options_defaults_and_validation():
    o = fusedce.LinearCrossEntropyOptions()
    assert (o.allow_retain_graph, o.batch_chunk_size, o.chunking_method, o.acc_policy, o.acc_dtype) == (
        False, None, "auto", "auto", None)
    with pytest.raises(ValueError, match="acc_policy"):
        fusedce.LinearCrossEntropyOptions(acc_policy="fast")
    for bad in ("aspect", "aspect_ratio:0", "aspect_ratio:x", "auto:2"):
        with pytest.raises(ValueError, match="chunking_method"):
            fusedce.LinearCrossEntropyOptions(chunking_method=bad)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_chunk_size"):
            fusedce.LinearCrossEntropyOptions(batch_chunk_size=bad)
    with pytest.raises(ValueError, match="acc_dtype"):
        fusedce.LinearCrossEntropyOptions(acc_dtype=np.int32)
    assert fusedce.LinearCrossEntropyOptions(acc_dtype="float64").acc_dtype == np.float64
    assert fusedce.LinearCrossEntropyOptions(acc_dtype=ml_dtypes.bfloat16).acc_dtype == np.dtype(ml_dtypes.bfloat16)
    with pytest.raises(Exception):
        o.batch_chunk_size = 3  # frozen


def test_chunk_rows_rules():
    O = fusedce.LinearCrossEntropyOptions
    # PyTorch's aspect ratio: next_pow2(ceil(N / ceil(C / D))) // factor
    assert O(chunking_method="aspect_ratio").chunk_rows(4096, 2048, 32000, 128000) == 256
    assert O(chunking_method="aspect_ratio:4").chunk_rows(4096, 2048, 32000, 128000) == 64
    assert O(chunking_method="aspect_ratio").chunk_rows(10, 4096, 8, 32) == 10
    assert O(chunking_method=None).chunk_rows(100, 8, 8, 32) == 100
    assert O(chunking_method=None, batch_chunk_size=7).chunk_rows(100, 8, 8, 32) == 7
    assert O(batch_chunk_size=7).chunk_rows(100, 8, 8, 32) == 7
    assert O(batch_chunk_size=256, chunking_method="aspect_ratio").chunk_rows(4096, 2048, 32000, 128000) == 256
    with pytest.raises(ValueError, match="give different chunk sizes"):
        O(batch_chunk_size=100, chunking_method="aspect_ratio").chunk_rows(4096, 2048, 32000, 128000)
    # auto: the budget, but at least 512 rows unless memory forbids; 1..N rows
    from fusedce import options

    phys = options._physical_memory()
    rows = O().chunk_rows(32768, 1024, 128256, 128256 * 4)
    assert rows * 128256 * 4 <= phys // 32 and (rows >= 512 or 512 * 128256 * 4 > phys // 32)
    assert O().chunk_rows(32768, 2048, 1000, 4000) * 4000 <= 64 << 20
    assert O().chunk_rows(5, 8, 10, 40) == 5
    assert O().chunk_rows(5, 8, 10, 1 << 40) == 1


def test_chunk_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("FUSEDCE_CHUNK_BYTES", str(10 * 4000))
    assert fusedce.LinearCrossEntropyOptions().chunk_rows(100, 8, 1000, 4000) == 10
    x, w, b, t = _problem(n=50, d=6, c=1000)
    # 10 rows per chunk: the same result as one chunk, up to rounding
    got = fusedce.linear_cross_entropy(x, w, t, linear_bias=b)
    monkeypatch.delenv("FUSEDCE_CHUNK_BYTES")
    np.testing.assert_allclose(got, fusedce.linear_cross_entropy(x, w, t, linear_bias=b), rtol=1e-6)


def test_acc_dtype_float64_is_more_accurate_for_float32():
    x, w, b, t = _problem(n=64, d=300, c=200, seed=3)
    want = linear_cross_entropy_ref(x, w, t, b, reduction="sum")
    l32 = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum")
    l64 = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum",
                                       options=fusedce.LinearCrossEntropyOptions(acc_dtype=np.float64))
    assert l64.dtype == np.float32
    assert abs(float(l64) - float(want[0])) <= abs(float(l32) - float(want[0])) + 1e-6 * abs(float(want[0]))


def test_compute_dtype_is_float32_unless_asked_for():
    """float64 accumulation only for float64 inputs or ``acc_dtype=float64``
    (numpy reads ``dtype == None`` as float64: the default ``acc_dtype=None``
    must not turn it on)."""
    opts = fusedce.LinearCrossEntropyOptions()
    f32, f64, bf16 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)
    assert opts.compute_dtype(f32) == f32 and opts.compute_dtype(bf16) == f32
    assert opts.compute_dtype(f64) == f64
    assert fusedce.LinearCrossEntropyOptions(acc_dtype=np.float64).compute_dtype(f32) == f64


# ---- errors ----------------------------------------------------------------------------

def test_bad_input_is_reported():
    x, w, b, t = _problem(n=6, d=4, c=5)
    with pytest.raises(TypeError, match="linear_weight: expected dtype float32"):
        fusedce.linear_cross_entropy(x, w.astype(np.float64), t)
    with pytest.raises(TypeError, match="linear_bias: expected dtype float32"):
        fusedce.linear_cross_entropy(x, w, t, linear_bias=b.astype(np.float16))
    with pytest.raises(TypeError, match="input: unsupported dtype"):
        fusedce.linear_cross_entropy(x.astype(np.int32), w, t)
    with pytest.raises(ValueError, match="linear_weight: expected linear_weight with dimensionality at least 2"):
        fusedce.linear_cross_entropy(x, w[0], t)
    with pytest.raises(IndexError, match="out of bounds"):
        fusedce.linear_cross_entropy(x, w, np.array([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="target"):
        fusedce.linear_cross_entropy(x, w, t[:3])
    with pytest.raises(ValueError, match="reduction"):
        fusedce.linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        fusedce.linear_cross_entropy(x, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight"):
        fusedce.linear_cross_entropy(x, w, t, weight=np.ones(4))
    with pytest.raises(TypeError, match="options"):
        fusedce.linear_cross_entropy(x, w, t, options={"batch_chunk_size": 2})
    with pytest.raises(ValueError, match="grad_output"):
        fusedce.linear_cross_entropy(x, w, t, return_grad=True, grad_output=np.ones(6))
    with pytest.raises(ValueError, match="device"):
        fusedce.linear_cross_entropy(x, w, t, device="tpu")


def test_empty_batch():
    x = np.zeros((0, 4), np.float32)
    w = np.ones((3, 4), np.float32)
    loss, g = fusedce.linear_cross_entropy(x, w, np.zeros(0, np.int64), reduction="sum", return_grad=True)
    assert float(loss) == 0.0 and g.input.shape == (0, 4)
    np.testing.assert_array_equal(g.linear_weight, 0)
    assert np.isnan(fusedce.linear_cross_entropy(x, w, np.zeros(0, np.int64)))


# ---- the module ------------------------------------------------------------------------

def test_module_initialisation_matches_torch_linear_bounds():
    m = fusedce.LinearCrossEntropyLoss(64, 10, out_features=(2,), bias=True, seed=0)
    assert m.linear_weight.shape == (10, 2, 64) and m.linear_bias.shape == (10, 2)
    assert m.linear_weight.dtype == np.float32
    bound = 1 / 8
    assert np.abs(m.linear_weight).max() <= bound and np.abs(m.linear_bias).max() <= bound
    assert np.abs(m.linear_weight).max() > 0.9 * bound  # uniform over the whole range
    m2 = fusedce.LinearCrossEntropyLoss(64, 10, out_features=(2,), bias=True, seed=0)
    np.testing.assert_array_equal(m.linear_weight, m2.linear_weight)
    assert fusedce.LinearCrossEntropyLoss(4, 3).linear_bias is None
    with pytest.raises(ValueError, match="weight"):
        fusedce.LinearCrossEntropyLoss(4, 3, weight=np.ones(2))
    with pytest.raises(TypeError):
        fusedce.LinearCrossEntropyLoss(4, 3, dtype=np.int32)


def test_module_value_and_grad_matches_functional():
    m = fusedce.LinearCrossEntropyLoss(8, 5, bias=True, label_smoothing=0.2, seed=1,
                                       dtype=ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 8)).astype(ml_dtypes.bfloat16)
    t = rng.integers(0, 5, 9)
    loss, g = m.value_and_grad(x, t)
    want = fusedce.linear_cross_entropy(x, m.linear_weight, t, linear_bias=m.linear_bias,
                                        label_smoothing=0.2, return_grad=True)
    assert loss.tobytes() == want[0].tobytes() and m(x, t).tobytes() == loss.tobytes()
    for a, e in zip(g, want[1]):
        assert a.tobytes() == e.tobytes()
    assert "LinearCrossEntropyLoss(in_features=8" in repr(m)


def test_module_trains():
    """A few steps of gradient descent on separable data lower the loss."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 6)) * 3
    y = rng.integers(0, 4, 256)
    x = (centers[y] + rng.normal(size=(256, 6))).astype(np.float32)
    m = fusedce.LinearCrossEntropyLoss(6, 4, bias=True, seed=0)
    first = float(m(x, y))
    for _ in range(50):
        loss, g = m.value_and_grad(x, y)
        m.linear_weight -= 0.5 * g.linear_weight
        m.linear_bias -= 0.5 * g.linear_bias
    assert float(loss) < 0.3 * first


def test_training_example_reaches_its_stated_accuracy():
    import runpy
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "train_classifier.py"
    mod = runpy.run_path(str(path), run_name="example")
    assert mod["main"](["--epochs", "3"]) == 0


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, "f32-acc64"])
def test_weight_converted_in_blocks_matches_whole_copy(dtype, monkeypatch):
    """A weight too large to copy whole (FUSEDCE_WEIGHT_COPY_BYTES=0 here) is
    converted block by block of classes (16 MiB each: 3 blocks here)."""
    opts = None
    if dtype == "f32-acc64":
        dtype, opts = np.float32, fusedce.LinearCrossEntropyOptions(acc_dtype=np.float64)
    rng = np.random.default_rng(5)
    n, d, c = 6, 128, 40_000  # float32 copy 20 MB (float64: 41 MB)
    x = rng.normal(size=(n, d)).astype(dtype)
    w = (rng.normal(size=(c, d)) / np.sqrt(d)).astype(dtype)
    b = rng.normal(size=c).astype(dtype)
    t = rng.integers(0, c, n)
    kw = dict(linear_bias=b, label_smoothing=0.1, return_grad=True, options=opts)
    whole = fusedce.linear_cross_entropy(x, w, t, **kw)
    monkeypatch.setenv("FUSEDCE_WEIGHT_COPY_BYTES", "0")
    blocks = fusedce.linear_cross_entropy(x, w, t, **kw)
    np.testing.assert_allclose(float(blocks[0]), float(whole[0]), rtol=1e-6)
    for a, e in zip(blocks[1], whole[1]):
        np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=1e-2,
                                   atol=1e-2 * float(np.abs(e.astype(np.float64)).max()))
