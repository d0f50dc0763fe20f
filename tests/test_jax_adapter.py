"""fusedce.jax under jit, grad and vmap, against jax.nn references and
jax.test_util.check_grads."""

from __future__ import annotations

import numpy as np
import pytest

from optional import need

jax = need("jax")
import fusedce.jax as fj  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

RNG = np.random.default_rng(11)


def ref_ce(x, t, reduction="mean", label_smoothing=0.0, ignore_index=-100):
    """Cross-entropy over axis 1 (or 0 for a 1-D input) from jax.nn."""
    axis = 0 if x.ndim == 1 else 1
    logp = jax.nn.log_softmax(x.astype(jnp.float32), axis=axis)
    c = x.shape[axis]
    valid = t != ignore_index
    nll = -jnp.take_along_axis(logp, jnp.expand_dims(jnp.where(valid, t, 0), axis), axis=axis).squeeze(axis)
    loss = (1 - label_smoothing) * nll - label_smoothing / c * logp.sum(axis)
    loss = jnp.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    return loss.sum() / (valid.sum() if reduction == "mean" else 1)


@pytest.mark.parametrize("kw", [dict(), dict(reduction="sum", label_smoothing=0.1),
                                dict(reduction="none", ignore_index=2)])
@pytest.mark.parametrize("shape", [(23, 40), (4, 9, 3, 5)])
def test_cross_entropy_under_jit_and_grad(shape, kw):
    x = jnp.asarray(RNG.normal(size=shape) * 3, jnp.float32)
    t = jnp.asarray(RNG.integers(0, shape[1], size=(shape[0],) + shape[2:]))
    f = jax.jit(lambda x: jnp.sum(fj.cross_entropy(x, t, **kw)))
    g = jax.jit(lambda x: jnp.sum(ref_ce(x, t, **kw)))
    np.testing.assert_allclose(f(x), g(x), rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=2e-5, atol=1e-6)
    up = jnp.asarray(RNG.random(fj.cross_entropy(x, t, **kw).shape) + 0.5, jnp.float32)
    _, vjp = jax.vjp(lambda x: fj.cross_entropy(x, t, **kw), x)
    _, vjp_ref = jax.vjp(lambda x: ref_ce(x, t, **kw), x)
    np.testing.assert_allclose(vjp(up)[0], vjp_ref(up)[0], rtol=2e-5, atol=1e-6)


def test_bfloat16_round_trip():
    x = jnp.asarray(RNG.normal(size=(16, 50)), jnp.bfloat16)
    t = jnp.asarray(RNG.integers(0, 50, size=16))
    loss, grad = jax.jit(jax.value_and_grad(lambda x: fj.cross_entropy(x, t)))(x)
    assert loss.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(loss), ref_ce(x, t), rtol=1e-2)
    np.testing.assert_allclose(np.float32(grad), jax.grad(lambda x: ref_ce(x, t))(x), atol=1e-3)


def test_vmap_over_problems():
    xs = jnp.asarray(RNG.normal(size=(3, 7, 12)), jnp.float32)
    ts = jnp.asarray(RNG.integers(0, 12, size=(3, 7)))
    f = jax.vmap(jax.value_and_grad(lambda x, t: fj.cross_entropy(x, t, label_smoothing=0.1)))
    losses, grads = jax.jit(f)(xs, ts)
    for i in range(3):
        want, gwant = jax.value_and_grad(lambda x: ref_ce(x, ts[i], label_smoothing=0.1))(xs[i])
        np.testing.assert_allclose(losses[i], want, rtol=2e-5)
        np.testing.assert_allclose(grads[i], gwant, rtol=2e-5, atol=1e-6)
    stats = jax.vmap(lambda x, t: fj.token_stats(x, t, top_k=2))(xs, ts)
    assert stats.topk_ids.shape == (3, 7, 2)
    np.testing.assert_array_equal(stats.argmax, jnp.argmax(xs, -1))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_matches_the_unfused_expression(reduction):
    x = jnp.asarray(RNG.normal(size=(30, 16)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(45, 16)) * 0.3, jnp.float32)
    b = jnp.asarray(RNG.normal(size=45) * 0.3, jnp.float32)
    t = jnp.asarray(RNG.integers(0, 45, size=30))
    up = jnp.asarray(RNG.random(30 if reduction == "none" else ()) + 0.5, jnp.float32)

    def ours(x, w, b):
        return jnp.sum(up * fj.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1))

    def ref(x, w, b):
        return jnp.sum(up * ref_ce(x @ w.T + b, t, reduction=reduction, label_smoothing=0.1))

    v, g = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(x, w, b)
    rv, rg = jax.value_and_grad(ref, argnums=(0, 1, 2))(x, w, b)
    np.testing.assert_allclose(v, rv, rtol=1e-5)
    for a, r in zip(g, rg):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-6)


def test_check_grads_in_float64():
    with jax.enable_x64(True):
        x = jnp.asarray(RNG.normal(size=(5, 7)))
        t = jnp.asarray(RNG.integers(0, 7, size=5))
        h = jnp.asarray(RNG.normal(size=(5, 3)))
        w = jnp.asarray(RNG.normal(size=(7, 3)) * 0.5)
        b = jnp.asarray(RNG.normal(size=7) * 0.5)
        for reduction in ("mean", "none"):
            check_grads(lambda x: fj.cross_entropy(x, t, reduction=reduction, label_smoothing=0.2, softcap=4.0),
                        (x,), order=1, modes=("rev",))
            check_grads(lambda h, w, b: fj.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction, z_loss=1e-2),
                        (h, w, b), order=1, modes=("rev",))

        def stats(x):
            s = fj.token_stats(x, t, temperature=0.8, softcap=5.0, top_k=2)
            return s.logprob + 0.3 * s.entropy

        def linear_stats(h, w, b):
            s = fj.linear_token_stats(h, w, t, linear_bias=b, temperature=1.2)
            return s.logprob - s.entropy

        check_grads(stats, (x,), order=1, modes=("rev",))
        check_grads(linear_stats, (h, w, b), order=1, modes=("rev",))


def test_statistics_match_jax_nn_and_constants_stay_constant():
    x = jnp.asarray(RNG.normal(size=(9, 30)) * 2, jnp.float32)
    t = jnp.asarray(RNG.integers(0, 30, size=9))
    s = jax.jit(lambda x: fj.token_stats(x, t, top_k=3))(x)
    logp = jax.nn.log_softmax(x)
    np.testing.assert_allclose(s.logprob, jnp.take_along_axis(logp, t[:, None], 1)[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.entropy, -(jnp.exp(logp) * logp).sum(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.lse, jax.nn.logsumexp(x, -1), rtol=1e-6)
    np.testing.assert_array_equal(s.topk_ids, jax.lax.top_k(x, 3)[1])
    assert float(jnp.abs(jax.grad(lambda x: fj.token_stats(x, t).lse.sum())(x)).max()) == 0.0
    with pytest.raises(TypeError, match="return_grad"):
        fj.token_stats(x, t, return_grad=True)


def test_the_numpy_api_under_jit_points_to_the_adapter():
    import fusedce

    with pytest.raises(TypeError, match="use fusedce.jax"):
        jax.jit(lambda x: fusedce.cross_entropy(x, np.arange(3)))(jnp.ones((3, 4)))
