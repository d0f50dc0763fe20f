"""Behaviour of the public API: determinism, inputs of every kind, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import ml_dtypes
import numpy as np
import pytest

import fusedce
from reference import cross_entropy_ref

RNG = np.random.default_rng(1234)


def _logits(shape, dtype=np.float32):
    return (RNG.normal(size=shape) * 4).astype(dtype)


@pytest.fixture
def restore_threads():
    n = fusedce.get_num_threads()
    yield
    fusedce.set_num_threads(n)


@pytest.mark.parametrize("shape,kw", [
    ((777, 3001), dict(label_smoothing=0.1, reduction="mean")),
    ((64, 50_000), dict(reduction="sum")),
    ((3, 21, 67, 45), dict(reduction="mean", label_smoothing=0.2)),
    ((5000, 7), dict(reduction="sum")),
])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_bitwise_identical_for_1_2_3_threads(shape, kw, dtype, restore_threads):
    x = _logits(shape, dtype)
    t = RNG.integers(0, shape[1], size=(shape[0],) + shape[2:])
    w = RNG.random(shape[1])
    outs = []
    for n in (1, 2, 3):
        fusedce.set_num_threads(n)
        assert fusedce.get_num_threads() == n
        loss, grad = fusedce.cross_entropy(x, t, w, return_grad=True, **kw)
        outs.append((np.atleast_1d(loss).view(np.uint8).copy(), grad.view(np.uint8).copy()))
    for a, b in zip(outs, outs[1:]):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("kw", [
    dict(),
    dict(label_smoothing=0.1, weight=True),
    dict(probs=True, label_smoothing=0.2),
    dict(z_loss=1e-3, ignore=True),
])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_a_long_row_split_across_threads_is_the_same_alone_or_in_a_batch(kw, dtype):
    """Rows longer than a piece (16384 classes) that are fewer than the
    threads are split across them by fixed pieces of classes; a row's loss
    and gradient bits must not depend on that, on the thread count, or on
    the rows around it."""
    n, c = 3, 70_001
    x = _logits((n, c), dtype)
    if kw.get("probs"):
        t = RNG.dirichlet(np.ones(c), size=n).astype(dtype)
    else:
        t = RNG.integers(0, c, size=n)
        if kw.get("ignore"):
            t[1] = -100
    opts = {k: v for k, v in kw.items() if k in ("label_smoothing", "z_loss")}
    if kw.get("weight"):
        opts["weight"] = RNG.random(c)

    def run(rows, threads):
        with fusedce.threads(threads):
            loss, grad = fusedce.cross_entropy(x[rows], t[rows], reduction="none",
                                               return_grad=True, **opts)
        return np.atleast_1d(loss).view(np.uint8), grad.view(np.uint8)

    batch = run(slice(None), 1)
    for r in range(n):
        for threads in (1, 2, 3):
            loss, grad = run(slice(r, r + 1), threads)
            np.testing.assert_array_equal(loss, batch[0].reshape(n, -1)[r])
            np.testing.assert_array_equal(grad, batch[1][r:r + 1])


def test_set_num_threads_rejects_bad_values():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n:"):
            fusedce.set_num_threads(bad)


def test_threads_context_is_per_thread_and_restored(restore_threads):
    fusedce.set_num_threads(2)
    seen = {}
    inside, leave = threading.Event(), threading.Event()

    def other():
        inside.wait()
        seen["other"] = fusedce.get_num_threads()  # while the main thread is in threads(1)
        leave.set()

    th = threading.Thread(target=other)
    th.start()
    with fusedce.threads(1):
        assert fusedce.get_num_threads() == 1
        with fusedce.threads(3):
            assert fusedce.get_num_threads() == 3
        assert fusedce.get_num_threads() == 1
        inside.set()
        leave.wait(10)
    th.join()
    assert seen["other"] == 2
    assert fusedce.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        with fusedce.threads(1):
            raise RuntimeError("inside")
    assert fusedce.get_num_threads() == 2
    for bad in (0, 2000, 1.5, True):
        with pytest.raises(ValueError, match="n:"):
            with fusedce.threads(bad):
                pass


def test_threads_context_gives_the_same_bits():
    x = _logits((301, 5003))
    t = RNG.integers(0, 5003, size=301)
    outs = []
    for n in (1, 2, 4):
        with fusedce.threads(n):
            loss, grad = fusedce.cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
            stats = fusedce.token_stats(x, t, top_k=3)
        outs.append((loss.tobytes(), grad.tobytes(), stats.entropy.tobytes(), stats.topk_ids.tobytes()))
    assert outs[0] == outs[1] == outs[2]


def _default_threads_in_child(preexec=None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "FUSEDCE_NUM_THREADS"}
    out = subprocess.run(
        [sys.executable, "-c", "import fusedce; print(fusedce.get_num_threads())"],
        env=env, preexec_fn=preexec, capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip())


def test_default_threads_follow_the_affinity_mask():
    assert _default_threads_in_child() == len(os.sched_getaffinity(0))
    assert _default_threads_in_child(lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})) == 1


def test_default_threads_follow_the_cgroup_cpu_quota():
    """A child in a cgroup (v1 cpu controller or v2) whose quota is one CPU
    defaults to one thread, whatever the host's core count."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 or more CPUs to tell a quota from the affinity mask")
    group = _make_cpu_cgroup(quota=100_000, period=100_000)
    if group is None:
        pytest.skip("cannot create a cgroup with a CPU quota here (not root, or no cpu controller)")
    try:
        procs = os.path.join(group, "cgroup.procs")
        assert _default_threads_in_child(lambda: open(procs, "w").write(str(os.getpid()))) == 1
    finally:
        os.rmdir(group)


def _make_cpu_cgroup(quota: int, period: int) -> str | None:
    name = f"fusedce-test-{os.getpid()}"
    for root, files in (("/sys/fs/cgroup/cpu", None), ("/sys/fs/cgroup", "cpu.max")):
        group = os.path.join(root, name)
        try:
            os.mkdir(group)
        except OSError:
            continue
        try:
            if files is None:
                with open(os.path.join(group, "cpu.cfs_period_us"), "w") as f:
                    f.write(str(period))
                with open(os.path.join(group, "cpu.cfs_quota_us"), "w") as f:
                    f.write(str(quota))
            else:
                with open(os.path.join(group, files), "w") as f:
                    f.write(f"{quota} {period}")
            return group
        except OSError:
            os.rmdir(group)
    return None


def test_fusedce_leaves_the_environment_alone():
    before = dict(os.environ)
    code = (
        "import os; before = dict(os.environ); import numpy as np, fusedce\n"
        "x = np.ones((4, 9), np.float32); t = np.arange(4)\n"
        "fusedce.cross_entropy(x, t); fusedce.token_stats(x, t)\n"
        "if fusedce.gpu.is_available(): fusedce.cross_entropy(x, t, device='gpu')\n"
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert dict(os.environ) == before


def test_large_row_against_reference():
    x = _logits((6, 32000))
    t = RNG.integers(0, 32000, size=6)
    loss, grad = fusedce.cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
    want_loss, want_grad = cross_entropy_ref(x, t, label_smoothing=0.1)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-8)


# ---- what can be passed --------------------------------------------------------

class DlpackOnly:
    """An object that offers only the DLPack protocol (as a CPU torch/JAX tensor does)."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kw):
        return self._a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class ArrayOnly:
    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


def test_dlpack_array_protocol_and_lists_give_the_same_result():
    x = _logits((4, 9))
    t = np.array([0, 3, 8, 2])
    want = fusedce.cross_entropy(x, t)
    assert fusedce.cross_entropy(DlpackOnly(x), DlpackOnly(t)) == want
    assert fusedce.cross_entropy(ArrayOnly(x), ArrayOnly(t)) == want
    got = fusedce.cross_entropy(x.tolist(), t.tolist())  # lists become float64
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_non_contiguous_and_read_only_inputs():
    big = _logits((8, 40))
    x = big[::2, ::2]  # strided both ways
    t = np.array([0, 5, 19, 3])
    want_loss, want_grad = cross_entropy_ref(x, t)
    loss, grad = fusedce.cross_entropy(x, t, return_grad=True)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    ro = np.ascontiguousarray(x)
    ro.flags.writeable = False
    loss2, grad2 = fusedce.cross_entropy(ro, t, return_grad=True)
    np.testing.assert_array_equal(grad2, grad)
    with pytest.raises(ValueError, match="writeable"):
        fusedce.cross_entropy(ro, t, return_grad=True, grad_out=ro)
    with pytest.raises(ValueError, match="C-contiguous|converted"):
        fusedce.cross_entropy(x, t, return_grad=True, grad_out=x)


def test_grad_out_in_place_and_preallocated():
    x = _logits((16, 100))
    t = RNG.integers(0, 100, size=16)
    loss, grad = fusedce.cross_entropy(x, t, return_grad=True)
    buf = np.full_like(x, 7.0)
    _, g = fusedce.cross_entropy(x, t, return_grad=True, grad_out=buf)
    assert g is buf
    np.testing.assert_array_equal(buf, grad)
    xi = x.copy()
    loss_i, gi = fusedce.cross_entropy(xi, t, return_grad=True, grad_out=xi)
    assert gi is xi and loss_i == loss
    np.testing.assert_array_equal(xi, grad)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((16, 101), np.float32), "grad_out: expected an array of shape"),
    (np.zeros((16, 100), np.float64), "grad_out: expected an array of shape"),
    (np.zeros((100, 16), np.float32).T, "C-contiguous"),
])
def test_grad_out_validation(bad, match):
    x = _logits((16, 100))
    t = RNG.integers(0, 100, size=16)
    with pytest.raises(ValueError, match=match):
        fusedce.cross_entropy(x, t, return_grad=True, grad_out=bad)


def test_grad_out_overlapping_input_is_refused():
    x = _logits((8, 10))
    with pytest.raises(ValueError, match="overlaps"):
        fusedce.cross_entropy(x[:4], np.zeros(4, int), return_grad=True,
                              grad_out=x.reshape(-1)[5:45].reshape(4, 10))


def test_nothing_is_written_when_an_error_is_raised():
    x = _logits((4, 10))
    buf = np.full_like(x, 3.0)
    with pytest.raises(IndexError, match="Target 10 is out of bounds"):
        fusedce.cross_entropy(x, np.array([1, 2, 10, 3]), return_grad=True, grad_out=buf)
    assert (buf == 3.0).all()
    xi = x.copy()
    with pytest.raises(IndexError):
        fusedce.cross_entropy(xi, np.array([1, -2, 0, 3]), return_grad=True, grad_out=xi)
    np.testing.assert_array_equal(xi, x)


# ---- errors ----------------------------------------------------------------------

@pytest.mark.parametrize("call,exc,match", [
    (lambda x, t: fusedce.cross_entropy(x.astype(np.int32), t), TypeError, "input: unsupported dtype int32"),
    (lambda x, t: fusedce.cross_entropy(x.astype(np.complex64), t), TypeError, "input"),
    (lambda x, t: fusedce.cross_entropy(x, t.astype(np.float32)), ValueError, "target: expected class indices"),
    (lambda x, t: fusedce.cross_entropy(x, t.astype(bool)), TypeError, "target"),
    (lambda x, t: fusedce.cross_entropy(x, t[:3]), ValueError, "batch_size"),
    (lambda x, t: fusedce.cross_entropy(x, t[:, None]), ValueError, "target"),
    (lambda x, t: fusedce.cross_entropy(x[0, 0], t), ValueError, "input: expected shape"),
    (lambda x, t: fusedce.cross_entropy(x, t, weight=np.ones(11)), ValueError, r"weight: expected shape \(10,\)"),
    (lambda x, t: fusedce.cross_entropy(x, t, weight=np.ones((10, 1))), ValueError, "weight"),
    (lambda x, t: fusedce.cross_entropy(x, t, reduction="avg"), ValueError, "avg is not a valid value"),
    (lambda x, t: fusedce.cross_entropy(x, t, label_smoothing=-0.1), ValueError, "label_smoothing"),
    (lambda x, t: fusedce.cross_entropy(x, t, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda x, t: fusedce.cross_entropy(x, np.full_like(x, 0.1), ignore_index=1), ValueError, "ignore_index"),
    (lambda x, t: fusedce.cross_entropy(x, t, reduction="none", grad_output=np.ones(5), return_grad=True),
     ValueError, "grad_output: expected the loss's shape"),
    (lambda x, t: fusedce.cross_entropy(x, t, grad_output=np.ones(4), return_grad=True), ValueError, "grad_output: expected a scalar"),
    (lambda x, t: fusedce.cross_entropy(x, t, grad_out=np.empty_like(x)), ValueError, "return_grad"),
    (lambda x, t: fusedce.cross_entropy(x, t, device="tpu"), ValueError, "device"),
    (lambda x, t: fusedce.cross_entropy(object(), t), TypeError, "input"),
    (lambda x, t: fusedce.cross_entropy(np.zeros((4, 0), np.float32), t), ValueError, "at least one class"),
    (lambda x, t: fusedce.cross_entropy(x, np.array([0, 1, 2, 2**40])), IndexError, "out of bounds"),
    (lambda x, t: fusedce.cross_entropy(x, np.array([0, 1, 2, 2**63], dtype=np.uint64)), IndexError, "out of bounds"),
])
def test_errors_name_the_argument(call, exc, match):
    x = _logits((4, 10))
    t = np.array([0, 1, 2, 9])
    with pytest.raises(exc, match=match):
        call(x, t)


def test_nan_and_inf_logits_propagate_like_pytorch():
    x = _logits((3, 10))
    x[0, 4] = np.nan
    x[1, 2] = np.inf
    x[2, 1] = -np.inf
    t = np.array([1, 3, 5])
    loss, grad = fusedce.cross_entropy(x, t, reduction="none", return_grad=True)
    assert np.isnan(loss[0]) and np.isnan(grad[0]).all()
    assert np.isnan(loss[1]) and np.isnan(grad[1]).any()
    want_loss, want_grad = cross_entropy_ref(x[2:], t[2:], reduction="none")
    np.testing.assert_allclose(loss[2:], want_loss, rtol=1e-5)
    np.testing.assert_allclose(grad[2:], want_grad, rtol=1e-5, atol=1e-7)
    assert grad[2, 1] == 0.0


def test_empty_batch():
    x = np.zeros((0, 5), np.float32)
    t = np.zeros((0,), np.int64)
    loss, grad = fusedce.cross_entropy(x, t, return_grad=True)
    assert np.isnan(loss) and grad.shape == (0, 5)
    assert fusedce.cross_entropy(x, t, reduction="sum") == 0
    assert fusedce.cross_entropy(x, t, reduction="none").shape == (0,)
    assert fusedce.cross_entropy(np.zeros((0, 5, 3), np.float32), np.zeros((0, 3), int), reduction="none").shape == (0, 3)


def test_concurrent_calls_from_python_threads():
    x = _logits((257, 1000))
    t = RNG.integers(0, 1000, size=257)
    want_loss, want_grad = fusedce.cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
    errors = []

    def work():
        try:
            for _ in range(20):
                loss, grad = fusedce.cross_entropy(x, t, return_grad=True, label_smoothing=0.1)
                assert loss == want_loss
                np.testing.assert_array_equal(grad, want_grad)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors


def test_module_matches_functional():
    x = _logits((6, 12, 5))
    t = RNG.integers(0, 12, size=(6, 5))
    w = RNG.random(12)
    mod = fusedce.CrossEntropyLoss(weight=w, ignore_index=3, reduction="sum", label_smoothing=0.05)
    loss = mod(x, t)
    assert loss == fusedce.cross_entropy(x, t, w, 3, "sum", 0.05)
    loss2, grad = mod.value_and_grad(x, t)
    assert loss2 == loss
    _, want = fusedce.cross_entropy(x, t, w, 3, "sum", 0.05, return_grad=True)
    np.testing.assert_array_equal(grad, want)
    assert "CrossEntropyLoss(" in repr(mod)
    with pytest.raises(ValueError, match="reduction"):
        fusedce.CrossEntropyLoss(reduction="avg")


def test_softcap_and_z_loss_options_of_the_modules():
    x = np.random.default_rng(4).normal(size=(6, 11)).astype(np.float32) * 5
    t = np.array([0, 3, -100, 10, 2, 2])
    m = fusedce.CrossEntropyLoss(softcap=2.0, z_loss=0.1)
    loss, grad = m.value_and_grad(x, t)
    want, wgrad = fusedce.cross_entropy(x, t, softcap=2.0, z_loss=0.1, return_grad=True)
    assert loss == want and np.array_equal(grad, wgrad)
    assert loss != fusedce.cross_entropy(x, t)
    for kw, arg in ((dict(softcap=0.0), "softcap"), (dict(softcap=-1.0), "softcap"),
                    (dict(z_loss=-0.1), "z_loss"), (dict(z_loss=float("nan")), "z_loss")):
        with pytest.raises(ValueError, match=arg):
            fusedce.CrossEntropyLoss(**kw)
        with pytest.raises(ValueError, match=arg):
            fusedce.cross_entropy(x, t, **kw)
        with pytest.raises(ValueError, match=arg):
            fusedce.LinearCrossEntropyLoss(4, 3, **kw)
    lm = fusedce.LinearCrossEntropyLoss(11, 5, softcap=1.5, z_loss=1e-2, seed=0)
    got = lm(x, np.array([0, 1, 2, 3, 4, 0]))
    want = fusedce.linear_cross_entropy(x, lm.linear_weight, np.array([0, 1, 2, 3, 4, 0]), softcap=1.5, z_loss=1e-2)
    assert got == want



def test_version_comes_from_the_package_metadata():
    from importlib.metadata import metadata, version

    assert fusedce.__version__ == version("fusedce")
    meta = metadata("fusedce")
    assert meta["License-Expression"] == "MIT OR Apache-2.0"
    assert meta["Requires-Python"] == ">=3.9"
    cargo = open(os.path.join(os.path.dirname(__file__), "..", "Cargo.toml")).read()
    assert f'version = "{fusedce.__version__}"' in cargo
