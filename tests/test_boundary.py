"""The public API's boundary: a regression test for each defect found by
fuzzing (issue "One request, checked once"), and a bounded fuzz test: every
generated call either raises a documented exception (ValueError, TypeError,
IndexError) or returns a result that agrees with a float64 reference;
never a panic (``pyo3_runtime.PanicException`` is a BaseException)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedce
from reference import cross_entropy_ref

RNG = np.random.default_rng(7)
DOCUMENTED = (ValueError, TypeError, IndexError)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=300)


# ---- concurrency and memory ---------------------------------------------------------------

def test_calls_from_a_thread_with_a_small_stack():
    """The calling thread works in its own pool, so every kernel frame must
    fit a small thread stack (Python allows 32 KiB). A 128 KiB weight panel
    on the stack used to crash this at 192 KiB: in a subprocess, so that a
    crash fails the test instead of ending pytest."""
    r = _run_python("""
        import threading, numpy as np, fusedce
        threading.stack_size(64 * 1024)
        out = []
        def run():
            rng = np.random.default_rng(0)
            x, w = rng.normal(size=(64, 2048)).astype(np.float32), rng.normal(size=(3000, 2048)).astype(np.float32)
            t = rng.integers(0, 3000, 64)
            out.append(fusedce.linear_cross_entropy(x, w, t, return_grad=True)[0])
            out.append(fusedce.linear_token_stats(x, w, t, top_k=5).lse)
            out.append(fusedce.cross_entropy(rng.normal(size=(4, 200000)).astype(np.float32), t[:4], return_grad=True)[0])
        th = threading.Thread(target=run)
        th.start()
        th.join()
        assert len(out) == 3 and all(np.isfinite(v).all() for v in out), out
        print("ok")
        """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


def test_reading_an_array_another_thread_writes_in_place_never_panics():
    x = RNG.normal(size=(64, 2000)).astype(np.float32)
    t = RNG.integers(0, 2000, 64)
    failures: list = []
    stop = threading.Event()

    def writer():
        try:
            while not stop.is_set():
                fusedce.cross_entropy(x, t, return_grad=True, grad_out=x)
        except BaseException as e:  # noqa: BLE001 - a panic must be seen
            if not (isinstance(e, ValueError) and "overlaps" in str(e)):
                failures.append(e)

    def reader():
        try:
            for _ in range(300):
                try:
                    fusedce.cross_entropy(x, t)
                except ValueError as e:
                    assert "input: cannot be read: it overlaps" in str(e)
        except BaseException as e:  # noqa: BLE001
            failures.append(e)
        finally:
            stop.set()

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures, failures


def test_kdim_gradient_scratch_is_bounded_and_released():
    """C = 2**24 classes of a K-dim input once asked for C x 16 floats of
    scratch per thread (1 GiB here) and kept them; under an address-space
    limit that leaves room for the arrays only, the call now succeeds."""
    r = _run_python("""
        import resource, numpy as np, fusedce
        fusedce.set_num_threads(2)
        x = np.zeros((1, 1 << 24, 2), np.float32); g = np.empty_like(x)
        t = np.zeros((1, 2), np.int64)
        vm = int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmSize')][0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (600 << 20), resource.RLIM_INFINITY))
        loss, _ = fusedce.cross_entropy(x, t, return_grad=True, grad_out=g)
        assert abs(float(loss) - 24 * np.log(2)) < 1e-4 * 24, loss
        assert abs(float(g[0, 0, 0]) - (2.0 ** -24 - 1) / 2) < 1e-6
        rss = int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0]) >> 10
        assert rss < 700, rss  # arrays 256 MiB; no scratch kept
        print('ok')
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# ---- inputs that used to panic or be misread ------------------------------------------------

def test_linear_with_an_empty_spatial_axis_returns_nan_like_pytorch():
    args = (np.ones((2, 3), np.float32), np.ones((4, 0, 3), np.float32), np.zeros((2, 0), np.int64))
    assert np.isnan(fusedce.linear_cross_entropy(*args, linear_bias=np.ones((4, 0), np.float32)))
    loss, g = fusedce.linear_cross_entropy(*args, linear_bias=np.ones((4, 0), np.float32), return_grad=True)
    assert np.isnan(loss) and (g.input == 0).all() and g.linear_weight.shape == (4, 0, 3)


def _shared_views(n: int, c: int):
    buf = bytearray(n * c * 4 + 64)
    grad = np.frombuffer(buf, np.float32, count=n * c).reshape(n, c)
    return buf, grad


def test_outputs_overlapping_any_input_through_another_base_are_refused():
    n, c = 6, 5
    x = RNG.normal(size=(n, c)).astype(np.float32)
    buf, grad = _shared_views(n, c)
    t = np.frombuffer(buf, np.int64, count=n)  # another object over the same bytes
    with pytest.raises(ValueError, match="overlaps"):
        fusedce.cross_entropy(x, t, return_grad=True, grad_out=grad)
    probs = np.frombuffer(buf, np.float32, count=n * c, offset=8).reshape(n, c)
    with pytest.raises(ValueError, match="grad_out: overlaps target"):
        fusedce.cross_entropy(x, probs, return_grad=True, grad_out=grad)


def test_targets_are_read_once():
    """The core keeps its validated copy of the targets: changing the
    caller's array after validation cannot make it index out of bounds
    (the copy is what the kernels read)."""
    x = RNG.normal(size=(4, 10)).astype(np.float32)
    t = np.array([1, 2, 3, 4])
    want = fusedce.cross_entropy(x, t, reduction="none")
    np.testing.assert_array_equal(fusedce.cross_entropy(x, t.copy(), reduction="none"), want)


def test_unaligned_c_contiguous_input_is_copied_once():
    raw = np.ndarray((4, 5), np.float32, bytearray(84), offset=1)
    raw[...] = RNG.normal(size=(4, 5))
    assert raw.flags.c_contiguous and not raw.flags.aligned
    t = np.array([0, 1, 2, 3])
    loss, grad = fusedce.cross_entropy(raw, t, return_grad=True)
    want_loss, want_grad = fusedce.cross_entropy(np.array(raw), t, return_grad=True)
    assert loss == want_loss
    np.testing.assert_array_equal(grad, want_grad)


# ---- NaN and infinity as PyTorch propagates them ---------------------------------------------

def test_nan_class_weight_on_an_untargeted_class_leaves_the_gradient_finite():
    x = RNG.normal(size=(3, 5)).astype(np.float32)
    w = np.ones(5)
    w[4] = np.nan
    loss, g = fusedce.cross_entropy(x, np.array([0, 1, 2]), w, return_grad=True)
    assert np.isfinite(loss) and np.isfinite(g).all()


def test_nan_in_an_ignored_row_gives_a_finite_loss_and_a_nan_gradient_row():
    x = RNG.normal(size=(3, 5)).astype(np.float32)
    x[1, 2] = np.nan
    for xs, t in ((x, np.array([0, -100, 2])), (x.T[None], np.array([[0, -100, 2]]))):
        loss, g = fusedce.cross_entropy(np.ascontiguousarray(xs), t, reduction="none", return_grad=True)
        assert np.isfinite(loss).all()
    loss, g = fusedce.cross_entropy(x, np.array([0, -100, 2]), return_grad=True)
    assert np.isfinite(loss) and np.isnan(g[1]).all() and np.isfinite(g[[0, 2]]).all()


def test_infinite_upstream_gradient_gives_infinities_not_nan():
    x = RNG.normal(size=(3, 5)).astype(np.float32)
    t = np.array([0, 1, -100])
    _, g = fusedce.cross_entropy(x, t, return_grad=True, grad_output=np.inf)
    assert (g[2] == 0).all()
    off = np.ones((2, 5), bool)
    off[0, 0] = off[1, 1] = False
    assert (g[:2][off] == np.inf).all()
    assert (g[0, 0] == -np.inf) and (g[1, 1] == -np.inf)


# ---- argument errors name the argument ---------------------------------------------------------

X4 = RNG.normal(size=(4, 10)).astype(np.float32)
T4 = np.array([0, 1, 2, 9])


@pytest.mark.parametrize("kw,exc,match", [
    (dict(ignore_index=2**64), ValueError, "ignore_index: expected an integer in"),
    (dict(ignore_index="a"), TypeError, "ignore_index: expected an integer"),
    (dict(ignore_index=None), TypeError, "ignore_index: expected an integer"),
    (dict(ignore_index=1.5), TypeError, "ignore_index: expected an integer"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing: expected a float"),
    (dict(label_smoothing=np.array([0.1, 0.2])), TypeError, "label_smoothing: expected a float"),
    (dict(reduction=None), TypeError, "reduction:"),
])
def test_argument_errors_name_the_argument(kw, exc, match):
    with pytest.raises(exc, match=match):
        fusedce.cross_entropy(X4, T4, **kw)


def test_more_argument_errors():
    with pytest.raises(ValueError, match="chunking_method"):
        fusedce.LinearCrossEntropyOptions(chunking_method="aspect_ratio:²")
    for bad in (2**64, 10**9, 1025):
        with pytest.raises(ValueError, match="n: expected a number of threads between 1 and 1024"):
            fusedce.set_num_threads(bad)
    with pytest.raises(ValueError, match="device"):
        fusedce.CrossEntropyLoss(device="tpu")
    with pytest.raises(ValueError, match="device"):
        fusedce.LinearCrossEntropyLoss(4, 3, device="tpu")
    with pytest.raises(ValueError, match="reduction"):
        fusedce.LinearCrossEntropyLoss(4, 3, reduction="avg")


def test_environment_variables_are_checked_and_named(monkeypatch):
    x, w, t = X4[:, :6], RNG.normal(size=(3, 6)).astype(np.float16), np.array([0, 1, 2, 0])
    monkeypatch.setenv("FUSEDCE_WEIGHT_COPY_BYTES", str(2**70))
    with pytest.raises(ValueError, match="FUSEDCE_WEIGHT_COPY_BYTES: expected a number of bytes"):
        fusedce.linear_cross_entropy(x.astype(np.float16), w, t)
    monkeypatch.setenv("FUSEDCE_WEIGHT_COPY_BYTES", "lots")
    with pytest.raises(ValueError, match="FUSEDCE_WEIGHT_COPY_BYTES"):
        fusedce.linear_cross_entropy(x.astype(np.float16), w, t)
    for var, val in (("FUSEDCE_SIMD", "sse9"), ("FUSEDCE_NUM_THREADS", "many")):
        r = _run_python("""
            import numpy as np, fusedce
            try:
                fusedce.cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 1]))
            except ValueError as e:
                print(e)
        """, **{var: val})
        assert r.stdout.startswith(f"{var}: expected"), r.stdout + r.stderr


# ---- the bounded fuzz test ------------------------------------------------------------------

DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16, np.int32, np.bool_, np.complex64]


@st.composite
def calls(draw):
    """A call with valid or malformed parts: dtypes, shapes, strides,
    aliasing between outputs and inputs, target values, options."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dt = draw(st.sampled_from(DTYPES))
    nd = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=nd, max_size=nd)))
    x = (rng.normal(size=shape) * draw(st.sampled_from([1.0, 50.0]))).astype(dt)
    if draw(st.booleans()) and x.ndim >= 1 and x.size:
        x = np.flip(x, axis=-1)  # negative strides
    if draw(st.booleans()) and x.size and np.issubdtype(x.dtype, np.floating):
        x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    c = x.shape[1] if x.ndim >= 2 else (x.shape[0] if x.ndim == 1 else 1)
    kind = draw(st.sampled_from(["index", "index-bad", "probs", "float-wrong", "wrong-shape"]))
    tshape = () if x.ndim <= 1 else (x.shape[0],) + x.shape[2:]
    if kind == "index":
        t = rng.integers(-1, max(c, 1), size=tshape)
    elif kind == "index-bad":
        t = rng.integers(-300, 300, size=tshape)
    elif kind == "probs":
        t = rng.random(size=x.shape).astype(np.float32)
    elif kind == "float-wrong":
        t = rng.random(size=tshape)
    else:
        t = rng.integers(0, 3, size=tshape + (2,))
    kw = dict(
        weight=draw(st.sampled_from([None, rng.random(c), rng.random(c + 1), np.full(c, np.nan)])),
        ignore_index=draw(st.sampled_from([-100, -1, 0, 2**40, 1.5, "x"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none", "avg"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.3, 1.0, -0.1, 2.0, "0.1"])),
    )
    grad = draw(st.sampled_from(["none", "fresh", "inplace", "alias-view", "wrong"]))
    return x, t, kw, grad


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_fuzz_public_api_raises_documented_errors_or_agrees_with_reference(call):
    x, t, kw, grad = call
    extra: dict = {}
    if grad != "none":
        extra["return_grad"] = True
        if grad == "inplace":
            extra["grad_out"] = x
        elif grad == "alias-view" and x.size > 1:
            extra["grad_out"] = x.reshape(-1)[::-1].reshape(x.shape)
        elif grad == "wrong":
            extra["grad_out"] = np.zeros((3, 3), np.float32)
    x_ref = np.array(x, dtype=np.float64) if np.issubdtype(x.dtype, np.floating) or x.dtype == ml_dtypes.bfloat16 \
        else None
    try:
        out = fusedce.cross_entropy(x, t, **kw, **extra)
    except DOCUMENTED:
        return
    except BaseException as e:  # noqa: BLE001 - a panic or an undocumented error fails the test
        pytest.fail(f"undocumented {type(e).__name__}: {e}")
    assert x_ref is not None
    loss = out[0] if extra.get("return_grad") else out
    want, _ = cross_entropy_ref(x_ref, t, kw["weight"], kw["ignore_index"], kw["reduction"],
                                float(kw["label_smoothing"]))
    tol = 1e-5 if x.dtype in (np.float32, np.float64) else 2e-2
    np.testing.assert_allclose(np.asarray(loss, np.float64), want, rtol=tol,
                               atol=tol * max(1.0, float(np.nanmax(np.abs(want), initial=1.0))) if np.size(want) else tol,
                               equal_nan=True)


@st.composite
def stats_calls(draw):
    """A token_stats / linear_token_stats call with valid or malformed parts."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.integers(0, 3)):  # mostly well-formed logits
        shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
        dt = draw(st.sampled_from([np.float32, np.float64, np.float16, ml_dtypes.bfloat16]))
        x = (rng.normal(size=shape) * draw(st.sampled_from([1.0, 50.0]))).astype(dt)
        if draw(st.booleans()):
            x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        t = np.zeros(0, np.float32)
        grad = draw(st.sampled_from(["none", "fresh"]))
    else:
        x, t, _, grad = draw(calls())
    classes = x.shape[0] if x.ndim == 1 else (x.shape[1] if x.ndim >= 2 else 1)

    def pick(valid, bad):  # mostly valid, so that calls also reach the comparison
        return draw(st.sampled_from(bad)) if draw(st.integers(0, 5)) == 0 else draw(st.sampled_from(valid))

    kw = dict(
        temperature=pick([1.0, 0.5, 2.0], [0.0, -1.0, float("nan"), float("inf"), "x"]),
        softcap=pick([None, 2.0, 30.0], [0.0, -1.0, float("nan"), [1.0]]),
        top_k=pick([0, 1, classes], [-1, 10**12, 1.5, classes + 1]),
        stats=pick([None, ["lse"], ["logprob", "rank"], ["entropy", "argmax"]], [["topk_ids"], ["bad"], "lse", [1]]),
        ignore_index=pick([-100, -1, 0], [2**40, "x"]),
    )
    floating = x.dtype.kind == "f" or x.dtype == ml_dtypes.bfloat16
    if floating and x.ndim >= 1 and x.size and draw(st.integers(0, 3)):
        # mostly a well-formed call: class indices of the per-token shape
        c = x.shape[0] if x.ndim == 1 else x.shape[1]
        tshape = () if x.ndim == 1 else (x.shape[0],) + x.shape[2:]
        t = np.where(rng.random(size=tshape) < 0.2, -100, rng.integers(0, c, size=tshape))
        t = draw(st.sampled_from([None, t, t]))
    elif t.dtype.kind == "f":
        t = draw(st.sampled_from([None, t]))
    per_token = t.shape if isinstance(t, np.ndarray) else ()
    if grad != "none":
        kw["return_grad"] = True
        kw["grad_logprob"] = pick([None, 1.0, rng.normal(size=per_token)], [np.ones(7), "x"])
        kw["grad_entropy"] = pick([None, -0.5, rng.normal(size=per_token)], [np.ones((2, 2, 2))])
    linear = draw(st.booleans())
    return x, t, kw, linear, rng


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stats_calls())
def test_fuzz_token_stats_raise_documented_errors_or_agree_with_reference(call):
    from reference import token_stats_ref

    x, t, kw, linear, rng = call
    try:
        if linear:
            d = x.shape[-1] if x.ndim else 1
            w = rng.normal(size=(int(rng.integers(1, 6)), d)).astype(x.dtype)
            out = fusedce.linear_token_stats(x, w, t, **kw)
        else:
            out = fusedce.token_stats(x, t, **kw)
    except DOCUMENTED:
        return
    except BaseException as e:  # noqa: BLE001 - a panic or an undocumented error fails the test
        pytest.fail(f"undocumented {type(e).__name__}: {e}")
    stats = out[0] if kw.get("return_grad") else out
    logits = x.astype(np.float64) @ w.astype(np.float64).T if linear else x.astype(np.float64)
    want, _ = token_stats_ref(logits, t, kw["temperature"], kw["softcap"], kw["ignore_index"], kw["top_k"])
    tol = 1e-4 if x.dtype != np.float64 else 1e-9
    for name in ("lse", "entropy", "logprob"):
        got = getattr(stats, name)
        if got is not None:
            mag = max(1.0, float(np.nanmax(np.abs(np.where(np.isfinite(want[name]), want[name], 0)), initial=1.0)))
            np.testing.assert_allclose(got, want[name], rtol=tol, atol=tol * mag, equal_nan=True)
