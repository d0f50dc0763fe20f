"""token_stats / linear_token_stats against the float64 reference
(tests/reference.py): every statistic and the gradient, over shapes, dtypes,
strides, temperatures, softcaps, masked classes, ties, ignore patterns,
top-k, K-dim inputs, chunk sizes and thread counts; the gradient also
against finite differences; batch invariance; errors."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedce
from reference import scores_ref, token_stats_ref

#: (numpy dtype, rtol, atol relative to the row's magnitude) of float outputs,
#: which are float32 for half inputs: their error is float32's, on the
#: stored (rounded) inputs
DTYPES = {
    "float32": (np.float32, 2e-5, 4e-6),
    "float64": (np.float64, 1e-10, 1e-12),
    "float16": (np.float16, 2e-5, 4e-6),
    "bfloat16": (ml_dtypes.bfloat16, 2e-5, 4e-6),
}
FLOATS = ("lse", "logprob", "entropy", "topk_logprobs")
INTS = ("argmax", "rank", "topk_ids")


@st.composite
def stat_problems(draw):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    k = draw(st.integers(0, 2))
    n = draw(st.integers(0, 7))
    c = draw(st.integers(1, 90))
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=k, max_size=k)))
    unbatched = k == 0 and draw(st.booleans())
    shape = (c,) if unbatched else (n, c) + spatial
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    x64 = rng.normal(size=shape) * scale
    if draw(st.booleans()):  # ties: few distinct values
        x64 = np.round(x64 / scale * 2) * scale / 2
    if draw(st.booleans()) and c > 1:  # masked vocabulary entries
        mask = rng.random(size=shape) < 0.3
        x64 = np.where(mask, -np.inf, x64)
    np_dtype, rtol, atol = DTYPES[dtype]
    x = x64.astype(np_dtype)
    if draw(st.booleans()) and x.ndim >= 2 and x.shape[0] > 1:
        x = np.repeat(x, 2, axis=0)[::2]  # a non-contiguous view
    per_token = () if unbatched else (n,) + spatial
    target = None
    ignore_index = -100
    if draw(st.booleans()):
        target = rng.integers(0, c, size=per_token)
        ignore_index = draw(st.sampled_from([-100, -1, 0, c + 3]))
        if draw(st.booleans()) and target.size:
            target = np.where(rng.random(size=per_token) < 0.3, ignore_index, target)
    temperature = draw(st.sampled_from([1.0, 0.5, 1.7]))
    softcap = draw(st.sampled_from([None, 1.5, 30.0]))
    top_k = draw(st.integers(0, c))
    gl = ge = None
    if draw(st.booleans()):
        ge = rng.normal(size=per_token) if draw(st.booleans()) else float(rng.normal())
        if target is not None:
            gl = rng.normal(size=per_token) if draw(st.booleans()) else float(rng.normal())
    return dict(x=x, target=target, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                top_k=top_k, gl=gl, ge=ge, rtol=rtol, atol=atol)


def _row_scale(x, temperature, softcap):
    """The magnitude of the statistics of each token: |lse| is at most
    max|z| + ln C."""
    z = scores_ref(x.astype(np.float64), temperature, softcap)
    finite = np.where(np.isfinite(z), np.abs(z), 0.0)
    return 1.0 + float(finite.max(initial=0.0)) + np.log(max(1, x.shape[0 if x.ndim == 1 else 1]))


def _check_stats(got, want, rtol, atol, scale):
    for name in FLOATS + INTS:
        g = getattr(got, name)
        if name not in want or g is None:
            continue
        w = want[name]
        assert g.shape == np.shape(w), name
        if name in INTS:
            assert g.dtype == np.int64
            np.testing.assert_array_equal(g, w, err_msg=name)
        else:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * scale, equal_nan=True, err_msg=name)


@settings(max_examples=int(os.environ.get("FUSEDCE_STATS_EXAMPLES", 250)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stat_problems())
def test_token_stats_match_float64_reference(p):
    x = p["x"]
    kw = dict(temperature=p["temperature"], softcap=p["softcap"], ignore_index=p["ignore_index"],
              top_k=p["top_k"])
    want, want_grad = token_stats_ref(x.astype(np.float64), p["target"], grad_logprob=p["gl"],
                                      grad_entropy=p["ge"], **kw)
    got, grad = fusedce.token_stats(x, p["target"], return_grad=True, grad_logprob=p["gl"],
                                    grad_entropy=p["ge"], **kw)
    out_dtype = np.float64 if x.dtype == np.float64 else np.float32
    assert got.lse.dtype == out_dtype and grad.dtype == x.dtype and grad.shape == x.shape
    assert (got.logprob is None) == (p["target"] is None)
    assert (got.topk_ids is None) == (p["top_k"] == 0)
    scale = _row_scale(x, p["temperature"], p["softcap"])
    _check_stats(got, want, p["rtol"], p["atol"], scale)
    ups = [0.0 if v is None else v for v in (p["gl"], p["ge"])]
    gmag = 1.0 + max(float(np.max(np.abs(v), initial=0.0)) for v in ups)
    grad_tol = {np.dtype(np.float16): 2e-3, np.dtype(ml_dtypes.bfloat16): 1.6e-2}.get(x.dtype, p["rtol"])
    np.testing.assert_allclose(grad.astype(np.float64), want_grad, rtol=grad_tol,
                               atol=max(grad_tol, p["atol"]) * gmag * scale, equal_nan=True)
    fwd = fusedce.token_stats(x, p["target"], **kw)
    for name in FLOATS + INTS:  # the forward pass computes the same bits
        a, b = getattr(fwd, name), getattr(got, name)
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))


def test_float32_statistics_keep_their_accuracy_up_to_a_quarter_million_classes():
    rng = np.random.default_rng(5)
    for c in (1000, 50_000, 256_000):
        x = (rng.normal(size=(2, c)) * 4).astype(np.float32)
        t = rng.integers(0, c, size=2)
        want, want_grad = token_stats_ref(x.astype(np.float64), t, top_k=5, grad_logprob=1.0, grad_entropy=0.5)
        got, grad = fusedce.token_stats(x, t, top_k=5, return_grad=True, grad_logprob=1.0, grad_entropy=0.5)
        mag = float(np.abs(want["lse"]).max())  # the row's magnitude
        for name in ("entropy", "lse", "logprob", "topk_logprobs"):
            np.testing.assert_allclose(getattr(got, name), want[name], rtol=2e-5, atol=4e-6 * mag, err_msg=name)
        np.testing.assert_array_equal(got.rank, want["rank"])
        np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=4e-6 * float(np.abs(want_grad).max()))


def test_gradients_match_finite_differences_in_float64():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 7)) * 2
    x[1, 4] = -np.inf
    t = np.array([2, 5, -100])
    gl, ge = rng.normal(size=3), rng.normal(size=3)
    kw = dict(temperature=0.8, softcap=2.5)
    _, grad = fusedce.token_stats(x, t, return_grad=True, grad_logprob=gl, grad_entropy=ge, **kw)

    def objective(v):
        s = fusedce.token_stats(v, t, **kw)
        return float(np.sum(gl * s.logprob + ge * s.entropy))

    h = 1e-6
    for i in range(3):
        for j in range(7):
            if not np.isfinite(x[i, j]):
                assert grad[i, j] == 0.0
                continue
            a, b = x.copy(), x.copy()
            a[i, j] += h
            b[i, j] -= h
            fd = (objective(a) - objective(b)) / (2 * h)
            assert abs(fd - grad[i, j]) < 1e-6, (i, j, fd, grad[i, j])


def test_reference_agrees_with_torch_where_installed():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 11)) * 3
    x[0, 3] = -np.inf
    t = np.array([1, 0, 10, 4, 4])
    want, grad = token_stats_ref(x, t, temperature=0.9, softcap=4.0, top_k=3, grad_logprob=1.0,
                                 grad_entropy=0.5)
    xt = torch.tensor(x, requires_grad=True)
    z = 4.0 * torch.tanh(xt / 4.0) / 0.9
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    ent = -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1)
    lp = logp.gather(1, torch.tensor(t)[:, None])[:, 0]
    (lp.sum() + 0.5 * ent.sum()).backward()
    np.testing.assert_allclose(want["lse"], torch.logsumexp(z, -1).detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(want["logprob"], lp.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(want["entropy"], ent.detach().numpy(), rtol=1e-10)
    np.testing.assert_array_equal(want["argmax"], torch.argmax(z, -1).numpy())
    np.testing.assert_array_equal(want["topk_ids"], torch.topk(z, 3, -1).indices.numpy())
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_a_tokens_results_do_not_depend_on_the_batch(softcap):
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(300, 517)) * 3).astype(np.float32)
    t = rng.integers(0, 517, size=300)
    kw = dict(softcap=softcap, temperature=0.7, top_k=5, return_grad=True, grad_logprob=1.0, grad_entropy=0.1)
    alone, galone = fusedce.token_stats(x[123], t[123], **kw)
    for threads in (1, 2):
        fusedce.set_num_threads(threads)
        for rows in (slice(None), slice(100, 130), slice(123, 124)):
            s, g = fusedce.token_stats(x[rows], t[rows], **kw)
            at = 123 - (rows.start or 0)
            for name in FLOATS + INTS:
                a, b = getattr(s, name)[at], getattr(alone, name)
                np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8))
            np.testing.assert_array_equal(g[at].view(np.uint8), galone.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float64])
def test_linear_token_stats_match_the_reference_for_any_chunk(dtype):
    rng = np.random.default_rng(2)
    n, d, c = 37, 24, 301
    h = rng.normal(size=(n, d)).astype(dtype)
    w = (rng.normal(size=(c, d)) * 0.3).astype(dtype)
    b = (rng.normal(size=c) * 0.1).astype(dtype)
    t = np.where(rng.random(n) < 0.2, -100, rng.integers(0, c, size=n))
    logits = h.astype(np.float64) @ w.astype(np.float64).T + b.astype(np.float64)
    kw = dict(temperature=1.2, softcap=6.0, top_k=4)
    want, dl = token_stats_ref(logits, t, grad_logprob=1.0, grad_entropy=0.3, **kw)
    tol = 2e-5 if dtype != np.float64 else 1e-10
    for chunk in (1, 5, 512):
        opts = fusedce.LinearCrossEntropyOptions(batch_chunk_size=chunk)
        got, grads = fusedce.linear_token_stats(h, w, t, linear_bias=b, options=opts, return_grad=True,
                                                grad_logprob=1.0, grad_entropy=0.3, **kw)
        _check_stats(got, want, tol, tol, 10.0)
        gtol = tol if dtype != ml_dtypes.bfloat16 else 1e-2
        np.testing.assert_allclose(grads.input.astype(np.float64), dl @ w.astype(np.float64),
                                   rtol=gtol, atol=gtol)
        np.testing.assert_allclose(grads.linear_weight.astype(np.float64), dl.T @ h.astype(np.float64),
                                   rtol=gtol, atol=gtol)
        np.testing.assert_allclose(grads.linear_bias.astype(np.float64), dl.sum(0), rtol=gtol, atol=gtol)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_linear_rows_do_not_depend_on_the_batch_or_chunk(dtype):
    """The issue's measurement: a row alone, and in chunks of 1, 8 and 512
    (bfloat16: the dot-product kernel where the CPU has it)."""
    rng = np.random.default_rng(0)
    n, d, c = 64, 257, 1000
    x = rng.standard_normal((n, d), dtype=np.float32).astype(dtype)
    w = (rng.standard_normal((c, d), dtype=np.float32) * 0.05).astype(dtype)
    t = rng.integers(0, c, n)

    def run(rows, chunk):
        o = fusedce.LinearCrossEntropyOptions(batch_chunk_size=chunk)
        loss, g = fusedce.linear_cross_entropy(x[rows], w, t[rows], reduction="none", return_grad=True, options=o)
        s, gs = fusedce.linear_token_stats(x[rows], w, t[rows], top_k=3, options=o, return_grad=True,
                                           grad_logprob=1.0, grad_entropy=0.5)
        return loss, g.input, s, gs.input

    for i in (0, 17, 63):
        alone = run([i], 1)
        for chunk in (1, 8, 512):
            got = run(list(range(n)), chunk)
            assert got[0][i] == alone[0][0]
            np.testing.assert_array_equal(got[1][i], alone[1][0])
            for name in FLOATS + INTS:
                np.testing.assert_array_equal(getattr(got[2], name)[i], getattr(alone[2], name)[0])
            np.testing.assert_array_equal(got[3][i], alone[3][0])


def test_stats_selects_the_work_and_outputs():
    x = np.random.default_rng(0).normal(size=(4, 9)).astype(np.float32)
    s = fusedce.token_stats(x, stats=["entropy"])
    assert s.entropy is not None and s.lse is None and s.argmax is None and s.topk_ids is None
    full = fusedce.token_stats(x)
    np.testing.assert_array_equal(s.entropy, full.entropy)
    assert full.logprob is None and full.rank is None  # no target
    s = fusedce.token_stats(x, np.arange(4), top_k=2, stats=("logprob",))
    assert s.logprob is not None and s.topk_ids.shape == (4, 2)
    s = fusedce.token_stats(x[0], np.int64(3))
    assert s.lse.shape == () and s.logprob.shape == () and s.rank.shape == ()


def test_nan_and_infinite_logits_order_as_numpy():
    x = np.array([[1.0, np.nan, 3.0, np.nan], [np.inf, 2.0, np.inf, -np.inf], [-np.inf] * 4], np.float32)
    s = fusedce.token_stats(x, np.array([0, 1, 2]), top_k=2)
    np.testing.assert_array_equal(s.argmax, [1, 0, 0])
    np.testing.assert_array_equal(s.topk_ids, [[1, 3], [0, 2], [0, 1]])
    np.testing.assert_array_equal(s.rank, [1, 2, 0])
    assert np.isnan(s.lse[0]) and s.lse[1] == np.inf and s.lse[2] == -np.inf
    # as torch.logsumexp / log_softmax: NaN wins over -inf and +inf; a finite
    # class of a row holding +inf has log-prob -inf; no softmax, no entropy
    one = fusedce.token_stats(np.array([[np.nan], [np.nan], [np.inf]], np.float32)[:, :1])
    assert np.isnan(one.lse[0]) and one.lse[2] == np.inf
    mixed = fusedce.token_stats(np.array([[np.nan, -np.inf], [np.inf, 1.0]], np.float32), np.array([1, 1]))
    assert np.isnan(mixed.lse[0]) and mixed.lse[1] == np.inf
    assert mixed.logprob[1] == -np.inf and np.isnan(mixed.entropy).all()


@pytest.mark.parametrize(
    "kwargs, exc, arg",
    [
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(top_k=10), ValueError, "top_k"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(stats=["nope"]), ValueError, "stats"),
        (dict(stats="lse"), TypeError, "stats"),
        (dict(stats=["topk_ids"]), ValueError, "top_k"),
        (dict(target=np.array([0, 9, 1])), IndexError, "target"),
        (dict(target=None, stats=["logprob"]), ValueError, "target"),
        (dict(target=None, return_grad=True, grad_logprob=1.0), ValueError, "target"),
        (dict(grad_entropy=1.0), ValueError, "grad_entropy"),
        (dict(grad_logprob=1.0), ValueError, "grad_logprob"),
        (dict(return_grad=True, grad_entropy=np.ones(4)), ValueError, "grad_entropy"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(device="tpu"), ValueError, "device"),
    ],
)
def test_errors_name_the_argument(kwargs, exc, arg):
    x = np.zeros((3, 9), np.float32)
    kwargs = {"target": np.array([0, 1, 2]), **kwargs}
    with pytest.raises(exc, match=arg):
        fusedce.token_stats(x, **kwargs)


@pytest.mark.parametrize("name", ["score_tokens.py", "policy_gradient.py"])
def test_examples_reach_what_they_state(name):
    import runpy
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / name
    mod = runpy.run_path(str(path), run_name="example")
    argv = ["--sequences", "2", "--length", "128", "--vocab", "5000"] if name == "score_tokens.py" else []
    assert mod["main"](argv) == 0


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gradient_in_place_equals_a_separate_buffer(dtype, softcap):
    rng = np.random.default_rng(12)
    x = (rng.normal(size=(6, 300)) * 4).astype(dtype)
    t = np.argmax(x.astype(np.float32), axis=1)  # targets with a large probability
    t[2] = -100
    kw = dict(softcap=softcap, return_grad=True, grad_logprob=1.0, grad_entropy=0.3)
    s, g = fusedce.token_stats(x, t, **kw)
    xi = x.copy()
    s2, g2 = fusedce.token_stats(xi, t, grad_out=xi, **kw)
    assert g2 is xi
    np.testing.assert_array_equal(g.view(np.uint8), g2.view(np.uint8))
    np.testing.assert_array_equal(s.logprob, s2.logprob)


def test_linear_token_stats_gradient_where_the_target_is_likely():
    """The linear driver writes each chunk's gradient over its logits: the
    target's own term must come from its logit, not the overwritten value."""
    rng = np.random.default_rng(13)
    h = rng.normal(size=(16, 8)).astype(np.float64)
    w = rng.normal(size=(20, 8)) * 2
    logits = h @ w.T
    t = np.argmax(logits, axis=1)
    want, dl = token_stats_ref(logits, t, grad_logprob=1.0, grad_entropy=0.2)
    _, g = fusedce.linear_token_stats(h, w, t, return_grad=True, grad_logprob=1.0, grad_entropy=0.2)
    np.testing.assert_allclose(g.input, dl @ w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.linear_weight, dl.T @ h, rtol=1e-10, atol=1e-12)
