"""Property tests against the float64 numpy reference: random shapes, dtypes,
strides, weights, ignore patterns, probability targets and label smoothing."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedce
from reference import cross_entropy_ref

DTYPES = {
    "float32": (np.float32, 2e-5, 2e-6),
    "float64": (np.float64, 1e-10, 1e-12),
    "float16": (np.float16, 2e-2, 2e-3),
    "bfloat16": (ml_dtypes.bfloat16, 3e-2, 4e-3),
}


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    k = draw(st.integers(0, 2))
    n = draw(st.integers(0, 9))
    c = draw(st.integers(1, 70))
    spatial = tuple(draw(st.lists(st.integers(1, 19), min_size=k, max_size=k)))
    unbatched = k == 0 and draw(st.booleans())
    shape = (c,) if unbatched else (n, c) + spatial
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    x64 = rng.normal(size=shape) * scale
    np_dtype, rtol, atol = DTYPES[dtype]
    x = x64.astype(np_dtype)
    if draw(st.booleans()) and x.ndim >= 2 and x.shape[0] > 1:
        # a non-contiguous view (every other sample of a larger array)
        big = np.repeat(x, 2, axis=0)
        x = big[::2]
    probs = draw(st.booleans())
    ignore_index = -100
    if probs:
        t = rng.random(size=shape)
        t = (t / t.sum(axis=0 if unbatched else 1, keepdims=True)).astype(np_dtype)
    else:
        tshape = () if unbatched else (n,) + spatial
        t = rng.integers(0, c, size=tshape)
        ignore_index = draw(st.sampled_from([-100, -1, 0, c - 1, c + 5]))
        if draw(st.booleans()) and t.size:
            t = np.where(rng.random(size=tshape) < 0.3, ignore_index, t)
        int_types = [np.int64, np.int32, np.int16] + ([np.uint8] if 0 <= ignore_index < 250 else [])
        t = np.asarray(t).astype(draw(st.sampled_from(int_types)))
    weight = rng.random(c) * 2 if draw(st.booleans()) else None
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    ls = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    loss_shape = () if unbatched else ((n,) + spatial)
    go = None
    if draw(st.booleans()):
        go = rng.normal(size=loss_shape) if reduction == "none" else float(rng.normal())
    softcap = draw(st.sampled_from([None, None, 2.0, 20.0]))
    z_loss = draw(st.sampled_from([0.0, 0.0, 1e-3, 0.5]))
    return dict(x=x, t=t, weight=weight, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=ls, grad_output=go, softcap=softcap, z_loss=z_loss, rtol=rtol, atol=atol)


def _close(got, want, rtol, atol, scale=1.0):
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, scale), equal_nan=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_float64_reference(p):
    x, t = p["x"], p["t"]
    x_ref = x.astype(np.float64)
    opts = dict(softcap=p["softcap"], z_loss=p["z_loss"])
    want_loss, want_grad = cross_entropy_ref(
        x_ref, t, p["weight"], p["ignore_index"], p["reduction"], p["label_smoothing"], p["grad_output"], **opts
    )
    loss, grad = fusedce.cross_entropy(
        x, t, p["weight"], p["ignore_index"], p["reduction"], p["label_smoothing"],
        return_grad=True, grad_output=p["grad_output"], **opts,
    )
    assert loss.dtype == x.dtype and grad.dtype == x.dtype and grad.shape == x.shape
    mag = float(np.nanmax(np.abs(want_loss))) if np.size(want_loss) and np.isfinite(want_loss).any() else 1.0
    # the loss is returned in the input's dtype: a float16 loss above 65504 is inf
    with np.errstate(over="ignore"):
        want_loss = np.asarray(want_loss).astype(x.dtype).astype(np.float64)
    _close(loss, want_loss, p["rtol"], p["atol"], mag)
    gmag = 1.0 if p["grad_output"] is None else float(np.max(np.abs(p["grad_output"]), initial=1.0))
    wmag = 1.0 if p["weight"] is None else 2.0
    _close(grad, want_grad, p["rtol"], p["atol"], gmag * wmag)
    fwd = fusedce.cross_entropy(x, t, p["weight"], p["ignore_index"], p["reduction"], p["label_smoothing"], **opts)
    np.testing.assert_array_equal(np.atleast_1d(fwd).view(np.uint8), np.atleast_1d(loss).view(np.uint8))


PIECE = 1 << 14  # classes per piece of a row (rust/core/src/kernels/rows.rs)


@st.composite
def long_rows(draw):
    """Rows of more than one piece whose pieces sit at very different
    heights, some of them wholly masked (-inf): each piece's sums are taken
    from its own maximum and moved to the row's when the pieces are joined."""
    n = draw(st.integers(1, 3))
    c = draw(st.integers(PIECE + 1, 4 * PIECE + 100))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pieces = -(-c // PIECE)
    offsets = np.repeat(rng.uniform(-60.0, 60.0, size=(n, pieces)), PIECE, axis=1)[:, :c]
    x = rng.normal(size=(n, c)) * draw(st.sampled_from([0.1, 3.0])) + offsets
    masked = draw(st.booleans())
    if masked:
        for r in range(n):
            p = rng.integers(0, pieces)
            x[r, p * PIECE:(p + 1) * PIECE] = -np.inf
            x[r, rng.random(c) < 0.01] = -np.inf
    x = x.astype(np.float32)
    probs = not masked and draw(st.booleans())  # a masked class with p = 0 gives NaN, as PyTorch
    if probs:
        t = rng.random(size=(n, c))
        t = (t / t.sum(axis=1, keepdims=True)).astype(np.float32)
    else:
        t = np.array([rng.choice(np.flatnonzero(np.isfinite(row))) for row in x])
    return dict(
        x=x, t=t,
        weight=rng.random(c) * 2 if draw(st.booleans()) else None,
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        z_loss=draw(st.sampled_from([0.0, 1e-3])),
        threads=draw(st.sampled_from([1, 2])),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(long_rows())
def test_long_rows_match_float64_reference(p):
    x, t = p["x"], p["t"]
    opts = dict(weight=p["weight"], label_smoothing=p["label_smoothing"], z_loss=p["z_loss"])
    want_loss, want_grad = cross_entropy_ref(x.astype(np.float64), t, reduction="none", **opts)
    with fusedce.threads(p["threads"]):
        loss, grad = fusedce.cross_entropy(x, t, reduction="none", return_grad=True, **opts)
    mag = float(np.max(np.abs(want_loss[np.isfinite(want_loss)]), initial=1.0))
    _close(loss, want_loss, 2e-5, 2e-6, mag)
    _close(grad, want_grad, 2e-5, 2e-6, 1.0 if p["weight"] is None else 2.0)
