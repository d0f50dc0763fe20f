"""The partial/merge API (fusedce.shard) against the one-machine calls:
every shard split of the classes (shards of one class, shards holding no
target, uneven shards) and every option gives the one-machine losses,
statistics and gradients to float32 rounding; argmax, rank and top-k exactly
(the logits here are multiples of 1/4, so every product and every shard's
logit is exact and ties are common); merging is associative up to rounding
and its result does not depend on the order the shards are given in.

Tolerances: ``rtol = 1e-6`` on losses and statistics, with an absolute floor
of ``1e-6`` times the log-sum-exp's magnitude (a log-prob near 0 is a
difference of two numbers of that size); gradients to ``3e-6`` of their
largest magnitude."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedce
from fusedce import shard as sh

SETTINGS = settings(max_examples=40, deadline=None)


def close(got, want, scale=1.0, rtol=1e-6):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(scale, 1.0), equal_nan=True)


def close_grad(got, want, unit):
    """To ``3e-6`` of the gradient's largest magnitude, or of ``unit``, the
    size of the terms that cancel in it (a one-class softmax's gradient is
    ``g (1 - 1)``: 0 on one machine, a rounding away from it here)."""
    want = np.asarray(want, np.float64)
    top = np.nanmax(np.abs(want), initial=0.0, where=np.isfinite(want))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=3e-6 * max(top, unit), equal_nan=True)


@st.composite
def cuts(draw, c):
    """Shard boundaries ``[0, ..., c]``: any subset of the inner points."""
    inner = draw(st.lists(st.integers(1, max(c - 1, 1)), max_size=6, unique=True)) if c > 1 else []
    return [0] + sorted(inner) + [c]


@st.composite
def jobs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, c = draw(st.integers(1, 9)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    x = (rng.integers(-12, 13, (n, c)) / 4).astype(dtype)
    if draw(st.booleans()):  # masked classes: -inf logits in some rows
        x[rng.random((n, c)) < 0.3] = -np.inf
    kind = draw(st.sampled_from(["index", "probs"]))
    ignore = draw(st.sampled_from([-100, 0, c - 1]))
    t = rng.integers(0, c, n)
    t[rng.random(n) < 0.3] = ignore
    probs = rng.random((n, c)).astype(dtype)
    probs /= probs.sum(1, keepdims=True)
    return dict(
        x=x, cuts=draw(cuts(c)), target=t if kind == "index" else None, probs=probs if kind == "probs" else None,
        weight=(rng.random(c) * 2).astype(dtype) if draw(st.booleans()) else None,
        eps=draw(st.sampled_from([0.0, 0.1, 1.0])), z_loss=draw(st.sampled_from([0.0, 1e-3])),
        softcap=draw(st.sampled_from([None, 2.0, 30.0])), ignore=ignore,
        reduction=draw(st.sampled_from(["none", "mean", "sum"])),
    )


def shards(cuts):
    return list(zip(cuts[:-1], cuts[1:]))


def per_shard(job, a, b):
    kw = {"weight": None if job["weight"] is None else job["weight"][a:b]}
    kw["probs"] = None if job["probs"] is None else job["probs"][:, a:b]
    return kw


def loss_options(job):
    return sh.ShardOptions(job["x"].shape[1], ignore_index=job["ignore"], label_smoothing=job["eps"],
                           z_loss=job["z_loss"], softcap=job["softcap"])


def one_machine_loss(job, **kw):
    t = job["target"] if job["probs"] is None else job["probs"]
    return fusedce.cross_entropy(job["x"], t, weight=job["weight"], reduction=job["reduction"],
                                 ignore_index=job["ignore"] if job["probs"] is None else -100,
                                 label_smoothing=job["eps"], softcap=job["softcap"], z_loss=job["z_loss"], **kw)


@SETTINGS
@given(jobs())
def test_sharded_loss_and_gradient_equal_the_one_machine_call(job):
    x, opts = job["x"], loss_options(job)
    parts = [sh.partial(x[:, a:b], a, job["target"], options=opts, **per_shard(job, a, b)) for a, b in shards(job["cuts"])]
    merged = sh.merge_all(parts)
    terms = sh.loss_terms(merged, options=opts)
    want, grad = one_machine_loss(job, return_grad=True)
    lse = np.nanmax(np.abs(sh.finish_stats(merged, options=opts).lse[np.isfinite(merged.m)]), initial=1.0)
    close(sh.reduce_loss([terms], job["reduction"]), want, scale=lse * max(1, x.shape[0] if job["reduction"] == "sum" else 1))
    scale = {"none": 1.0, "sum": 1.0, "mean": 1.0 / terms.denominator if terms.denominator else np.nan}[job["reduction"]]
    got = np.concatenate([sh.loss_grad(x[:, a:b], a, merged, job["target"], options=opts, scale=scale, **per_shard(job, a, b))
                          for a, b in shards(job["cuts"])], axis=1)
    assert got.dtype == grad.dtype
    weights = 1.0 if job["weight"] is None else max(float(job["weight"].max()), 1.0)
    close_grad(got, grad, unit=abs(scale) * weights)


@st.composite
def stats_jobs(draw):
    job = draw(jobs())
    c = job["x"].shape[1]
    job.update(temperature=draw(st.sampled_from([1.0, 0.5, 3.0])), top_k=draw(st.integers(0, min(c, 5))),
               target=job["target"] if job["target"] is not None else job["x"].shape[0] * [0],
               gl=draw(st.sampled_from([0.0, 1.0, -0.5])), ge=draw(st.sampled_from([0.0, 0.7])))
    job["target"] = np.asarray(job["target"])
    return job


def stats_options(job):
    return sh.ShardOptions(job["x"].shape[1], ignore_index=job["ignore"], softcap=job["softcap"],
                           temperature=job["temperature"], top_k=job["top_k"], argmax=True)


@SETTINGS
@given(stats_jobs())
def test_sharded_statistics_and_gradient_equal_the_one_machine_call(job):
    x, t, opts = job["x"], job["target"], stats_options(job)
    parts = [sh.partial(x[:, a:b], a, t, options=opts) for a, b in shards(job["cuts"])]
    merged = sh.merge_all(parts)
    rank = sum(sh.rank_count(x[:, a:b], merged) for a, b in shards(job["cuts"]))
    got = sh.finish_stats(merged, options=opts, rank=rank)
    want, grad = fusedce.token_stats(x, t, temperature=job["temperature"], softcap=job["softcap"], top_k=job["top_k"],
                                     ignore_index=job["ignore"], return_grad=True, grad_logprob=job["gl"],
                                     grad_entropy=job["ge"])
    check_stats(got, want)
    g = np.concatenate([sh.stats_grad(x[:, a:b], a, merged, t, options=opts, grad_logprob=job["gl"], grad_entropy=job["ge"])
                        for a, b in shards(job["cuts"])], axis=1)
    z = x[np.isfinite(x)]
    close_grad(g, grad, unit=max(abs(job["gl"]), abs(job["ge"]) * (1 + np.abs(z).max(initial=0)) / job["temperature"]))


def check_stats(got, want):
    scale = np.nanmax(np.abs(np.where(np.isfinite(want.lse), want.lse, 0)), initial=1.0)
    for name in ("lse", "logprob", "entropy", "topk_logprobs"):
        w = getattr(want, name)
        if w is not None:
            g = getattr(got, name)
            assert g.dtype == w.dtype, name
            close(g, w, scale=scale)
    for name in ("argmax", "rank", "topk_ids"):
        w = getattr(want, name)
        if w is not None:
            np.testing.assert_array_equal(getattr(got, name), w, err_msg=name)


@st.composite
def linear_jobs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, c, d = draw(st.integers(1, 9)), draw(st.integers(1, 40)), draw(st.integers(1, 12))
    grid = lambda *shape: (rng.integers(-4, 5, shape) / 4).astype(np.float32)  # noqa: E731 - exact products
    t = rng.integers(0, c, n)
    t[rng.random(n) < 0.3] = -100
    return dict(x=grid(n, d), w=grid(c, d), b=grid(c) if draw(st.booleans()) else None, target=t,
                cuts=draw(cuts(c)), eps=draw(st.sampled_from([0.0, 0.2])), z_loss=draw(st.sampled_from([0.0, 1e-2])),
                softcap=draw(st.sampled_from([None, 3.0])), reduction=draw(st.sampled_from(["none", "mean", "sum"])),
                top_k=draw(st.integers(0, min(c, 4))))


@SETTINGS
@given(linear_jobs())
def test_sharded_linear_loss_statistics_and_gradients_equal_the_one_machine_call(job):
    x, w, b, t = job["x"], job["w"], job["b"], job["target"]
    c = w.shape[0]
    opts = sh.ShardOptions(c, label_smoothing=job["eps"], z_loss=job["z_loss"], softcap=job["softcap"])
    bias = (lambda lo, hi: None) if b is None else (lambda lo, hi: b[lo:hi])
    merged = sh.merge_all([sh.linear_partial(x, w[lo:hi], lo, t, options=opts, linear_bias=bias(lo, hi))
                           for lo, hi in shards(job["cuts"])])
    terms = sh.loss_terms(merged, options=opts)
    want, grads = fusedce.linear_cross_entropy(x, w, t, linear_bias=b, reduction=job["reduction"], label_smoothing=job["eps"],
                                               z_loss=job["z_loss"], softcap=job["softcap"], return_grad=True)
    close(sh.reduce_loss([terms], job["reduction"]), want, scale=10.0 * x.shape[0])
    scale = 1.0 / terms.denominator if job["reduction"] == "mean" and terms.denominator else 1.0
    parts = [sh.linear_loss_grad(x, w[lo:hi], lo, merged, t, options=opts, scale=scale, linear_bias=bias(lo, hi))
             for lo, hi in shards(job["cuts"])]
    if job["reduction"] == "mean" and not terms.denominator:
        return  # every target ignored: the one-machine gradient is 0/0
    close_grad(sum(p.dx for p in parts), grads.input, unit=scale * x.shape[0])
    close_grad(np.concatenate([p.dw for p in parts]), grads.linear_weight, unit=scale * x.shape[0])
    if b is not None:
        close_grad(np.concatenate([p.db for p in parts]), grads.linear_bias, unit=scale * x.shape[0])
    sopts = sh.ShardOptions(c, softcap=job["softcap"], top_k=job["top_k"], argmax=True)
    sparts = [sh.linear_partial(x, w[lo:hi], lo, t, options=sopts, linear_bias=bias(lo, hi)) for lo, hi in shards(job["cuts"])]
    smerged = sh.merge_all(sparts)
    rank = sum(sh.linear_rank_count(x, w[lo:hi], smerged, linear_bias=bias(lo, hi)) for lo, hi in shards(job["cuts"]))
    check_stats(sh.finish_stats(smerged, options=sopts, rank=rank),
                fusedce.linear_token_stats(x, w, t, linear_bias=b, softcap=job["softcap"], top_k=job["top_k"]))


def random_partials(seed, cuts, top_k=3):
    rng = np.random.default_rng(seed)
    n, c = 7, cuts[-1]
    x = (rng.normal(size=(n, c)) * 5).astype(np.float32)
    t = rng.integers(0, c, n)
    opts = sh.ShardOptions(c, label_smoothing=0.1, top_k=min(top_k, c), argmax=True)
    return [sh.partial(x[:, a:b], a, t, options=opts) for a, b in shards(cuts)], opts


@SETTINGS
@given(st.integers(0, 2**32 - 1), cuts(30).filter(lambda c: len(c) >= 4), st.randoms(use_true_random=False))
def test_merge_is_associative_and_its_order_is_fixed(seed, cut, rand):
    parts, opts = random_partials(seed, cut)
    a, b, c = parts[0], sh.merge_all(parts[1:-1]), parts[-1]
    left, right = sh.merge(sh.merge(a, b), c), sh.merge(a, sh.merge(b, c))
    for name in ("m", "s", "t", "smooth", "target_z"):
        np.testing.assert_allclose(getattr(left, name), getattr(right, name), rtol=1e-12, atol=1e-12, err_msg=name)
    close(sh.finish_stats(left, options=opts).lse, sh.finish_stats(right, options=opts).lse, rtol=1e-12)
    np.testing.assert_array_equal(left.top_ids, right.top_ids)
    shuffled = list(parts)
    rand.shuffle(shuffled)
    fixed, again = sh.merge_all(parts), sh.merge_all(shuffled)
    for name in sh.Partial._fields:
        np.testing.assert_array_equal(getattr(fixed, name), getattr(again, name), err_msg=name)


def test_fold_tree_pairs_neighbours_level_by_level():
    assert sh.fold_tree(list("abcde"), lambda p, q: f"({p}{q})") == "(((ab)(cd))e)"
    with pytest.raises(ValueError, match="items"):
        sh.fold_tree([], lambda p, q: p)


def test_a_linear_partial_holds_one_tile_at_a_time(monkeypatch):
    """Tiles of rows bound what a shard pass holds: with a tiny tile, the
    partial is the same (per-token results do not depend on the tiling)."""
    rng = np.random.default_rng(5)
    x, w = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(30, 8)).astype(np.float32)
    t = rng.integers(0, 30, 50)
    opts = sh.ShardOptions(30, top_k=2, argmax=True)
    whole = sh.linear_partial(x, w, 0, t, options=opts)
    monkeypatch.setattr(sh, "TILE_BYTES", 4 * 30 * 3)
    assert sh.tile_rows(30) == 3
    tiled = sh.linear_partial(x, w, 0, t, options=opts)
    for name in ("m", "s", "t", "top_ids", "target_x"):
        np.testing.assert_allclose(getattr(tiled, name), getattr(whole, name), rtol=1e-6, err_msg=name)


def test_errors_name_the_argument():
    opts = sh.ShardOptions(10)
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="lo"):
        sh.partial(x, 8, options=opts)
    with pytest.raises(ValueError, match="logits"):
        sh.partial(np.zeros((3, 0), np.float32), 0, options=opts)
    with pytest.raises(IndexError, match="target"):
        sh.partial(x, 0, np.array([0, 1, 10]), options=opts)
    with pytest.raises(TypeError, match="target"):
        sh.partial(x, 0, np.array([0.0, 1, 2]), options=opts)
    with pytest.raises(ValueError, match="weight"):
        sh.partial(x, 0, options=opts, weight=np.ones(5))
    with pytest.raises(ValueError, match="probs"):
        sh.partial(x, 0, np.array([0, 1, 2]), options=opts, probs=np.ones((3, 4)))
    with pytest.raises(TypeError, match="logits"):
        sh.partial(np.zeros((3, 4), np.int32), 0, options=opts)
    a, b = sh.partial(x, 0, options=opts), sh.partial(x, 6, options=opts)
    with pytest.raises(ValueError, match="adjacent"):
        sh.merge(a, b)
    with pytest.raises(ValueError, match="partial: covers"):
        sh.loss_terms(a, options=opts)
    with pytest.raises(ValueError, match="partial: covers"):
        sh.stats_grad(x, 0, a, options=opts)
    with pytest.raises(TypeError, match="merged"):
        sh.rank_count(x, "not a partial")
    with pytest.raises(ValueError, match="merged: a partial of 3 tokens, for 2 rows"):
        sh.loss_grad(x[:2], 0, a, options=opts)
    with pytest.raises(ValueError, match="temperature"):
        sh.loss_terms(sh.partial(np.zeros((3, 10), np.float32), 0, options=sh.ShardOptions(10, temperature=2.0)),
                      options=sh.ShardOptions(10, temperature=2.0))
    with pytest.raises(ValueError, match="reduction"):
        sh.reduce_loss([], "avg")
    with pytest.raises(ValueError, match="linear_weight"):
        sh.linear_partial(x, np.zeros((4, 5), np.float32), 0, options=opts)
    for kw, arg in [({"classes": 0}, "classes"), ({"label_smoothing": 2.0}, "label_smoothing"),
                    ({"softcap": -1.0}, "softcap"), ({"temperature": 0.0}, "temperature"),
                    ({"top_k": 11}, "top_k"), ({"z_loss": -1.0}, "z_loss")]:
        with pytest.raises(ValueError, match=arg):
            sh.ShardOptions(**{"classes": 10, **kw})


DOCUMENTED = (TypeError, ValueError, IndexError)


@st.composite
def malformed_calls(draw):
    """A shard call with valid or malformed parts (each part malformed one
    time in four): dtypes, shapes, shard ranges, targets, class weights,
    probabilities and options."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def part(valid, *bad):
        return valid if draw(st.integers(0, 3)) else draw(st.sampled_from(bad))

    n, width = draw(st.integers(0, 5)), draw(st.integers(1, 5))
    shape = part((n, width), (), (n,), (n, 0), (n, width, 2))
    x = rng.normal(size=shape).astype(part(np.float32, np.float16, np.int32, np.bool_, np.complex64))
    classes = part(10, 0, -3, 2.5, "10", width - 1)
    opts = dict(classes=classes, top_k=part(draw(st.integers(0, 3)), 11, -1),
                label_smoothing=part(draw(st.sampled_from([0.0, 0.5])), 2.0), softcap=part(None, 0.0, "1"))
    lo = part(draw(st.integers(0, 10 - width)), -1, 10, 1.5, "0")
    target = part(rng.integers(0, 10, n), None, rng.integers(-2, 12, n), rng.random(n), rng.integers(0, 2, n + 1), "t")
    weight = part(None, rng.random(width + 1), "w") if draw(st.booleans()) else rng.random(width)
    probs = None if draw(st.integers(0, 3)) else part(rng.random((n, width)), rng.random((n + 1, width)))
    target = None if probs is not None and draw(st.booleans()) else target
    return x, lo, target, weight, probs, opts, draw(st.sampled_from(["partial", "linear", "grad"]))


@settings(max_examples=300, deadline=None)
@given(malformed_calls())
def test_fuzz_shard_api_raises_documented_errors(call):
    x, lo, target, weight, probs, opts, what = call
    try:
        o = sh.ShardOptions(**opts)
        if what == "linear":
            p = sh.linear_partial(x, x, lo, target, options=o, weight=weight, probs=probs)
        else:
            p = sh.partial(x, lo, target, options=o, weight=weight, probs=probs)
        if what == "grad":
            whole = sh.partial(np.zeros((p.m.shape[0], o.classes), np.float32), 0, options=o)
            sh.loss_grad(x, lo, sh.merge_all([whole]), target, options=o, weight=weight, probs=probs)
            sh.finish_stats(p, options=o)
    except DOCUMENTED:
        return
    except BaseException as e:  # noqa: BLE001 - an undocumented error fails the test
        pytest.fail(f"undocumented {type(e).__name__}: {e}")
