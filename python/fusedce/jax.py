"""JAX adapter: fusedce's fused passes as ``jax.custom_vjp`` functions over
``jax.pure_callback``, usable under ``jax.jit``, ``jax.grad`` and
``jax.vmap`` on the CPU backend::

    import fusedce.jax as fj
    loss, grads = jax.value_and_grad(lambda h, w: fj.linear_cross_entropy(h, w, target))(h, w)

The callback runs fusedce on the host (the GIL released while the core
computes); under ``vmap`` it is called once per batch element
(``vmap_method="sequential"``). With ``reduction="mean"``/``"sum"`` the
forward pass computes the gradient for an upstream gradient of 1 and the
backward pass scales it; ``reduction="none"`` (for the linear loss) and the
statistics run a fused pass with the upstream gradient in the backward
pass. Options (``reduction``, ``ignore_index``, ``top_k``, ...) are static
Python values. For the statistics, ``logprob`` and ``entropy`` are
differentiable; ``lse`` and ``topk_logprobs`` are treated as constants
(``stop_gradient``); index outputs are integers (int32 unless
``jax_enable_x64``). Requires ``jax`` (``pip install 'fusedce[jax]'``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional, cast

import jax
import jax.numpy as jnp
import numpy as np

from . import functional as F
from ._request import STAT_NAMES, TokenStats, _stat_flags, reject_gradient_keywords
from .options import LinearCrossEntropyOptions

__all__ = ["cross_entropy", "linear_cross_entropy", "token_stats", "linear_token_stats"]


def _spec(shape: tuple, dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jax.dtypes.canonicalize_dtype(dtype))


def _call(host: Callable[..., Any], specs: Any, *args: Any) -> Any:
    """``host`` (numpy in, numpy out) on the host; its results are cast to
    the dtypes of ``specs`` (int64 indices are int32 without x64)."""

    def cast(*a: Any) -> Any:
        return jax.tree_util.tree_map(lambda r, s: np.asarray(r, dtype=s.dtype), host(*a), specs)

    return jax.pure_callback(cast, specs, *args, vmap_method="sequential")


def _zero_cotangent(a: Any) -> Any:
    """The cotangent of a non-differentiable argument."""
    if a is None:
        return None
    if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_:
        return np.zeros(a.shape, dtype=jax.dtypes.float0)
    return jnp.zeros_like(a)


def _loss_shape(x_shape: tuple, reduction: str, linear: bool) -> tuple:
    if reduction != "none":
        return ()
    if linear:
        return x_shape[:-1]
    return () if len(x_shape) == 1 else (x_shape[0],) + tuple(x_shape[2:])


def _per_sample(grad: Any, upstream: Any) -> Any:
    """``grad`` (samples on axis 0, classes on axis 1) times one upstream
    value per sample (or a 0-d one), in ``grad``'s dtype."""
    scale = upstream if upstream.ndim == 0 else jnp.expand_dims(upstream, 1)
    return (grad * scale).astype(grad.dtype)


# ---- cross_entropy ----------------------------------------------------------------------------

def _ce_host(opts: tuple, with_grad: bool) -> Callable[..., Any]:
    ignore_index, reduction, label_smoothing, softcap, z_loss = opts

    def host(x: np.ndarray, target: np.ndarray, weight: Optional[np.ndarray]) -> Any:
        out = F.cross_entropy(x, target, weight, ignore_index, reduction, label_smoothing,
                              softcap=softcap, z_loss=z_loss, return_grad=with_grad)
        return tuple(out) if with_grad else out

    return host


def _ce_specs(x: Any, opts: tuple, with_grad: bool) -> Any:
    loss = _spec(_loss_shape(x.shape, opts[1], linear=False), x.dtype)
    return (loss, _spec(x.shape, x.dtype)) if with_grad else loss


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ce(x: Any, target: Any, weight: Any, opts: tuple) -> Any:
    return _call(_ce_host(opts, False), _ce_specs(x, opts, False), x, target, weight)


def _ce_fwd(x: Any, target: Any, weight: Any, opts: tuple) -> Any:
    loss, grad = _call(_ce_host(opts, True), _ce_specs(x, opts, True), x, target, weight)
    return loss, (grad, target, weight)


def _ce_bwd(opts: tuple, res: tuple, upstream: Any) -> tuple:
    grad, target, weight = res
    return _per_sample(grad, upstream), _zero_cotangent(target), _zero_cotangent(weight)


_ce.defvjp(_ce_fwd, _ce_bwd)


def cross_entropy(input: Any, target: Any, weight: Any = None, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, *,
                  softcap: Optional[float] = None, z_loss: float = 0.0) -> Any:
    """:func:`fusedce.cross_entropy` as a JAX function: ``input`` ``(C,)``,
    ``(N, C)`` or ``(N, C, d1..dK)``, class indices or probabilities as
    ``target``; the loss in the input's dtype, differentiable with respect
    to ``input``."""
    opts = (int(ignore_index), str(reduction), float(label_smoothing),
            None if softcap is None else float(softcap), float(z_loss))
    return _ce(input, target, weight, opts)


# ---- linear_cross_entropy ---------------------------------------------------------------------

def _lce_host(opts: tuple, with_grad: bool, upstream: bool = False) -> Callable[..., Any]:
    weight_kw = dict(opts)

    def host(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray], target: np.ndarray,
             weight: Optional[np.ndarray], *g: np.ndarray) -> Any:
        out = F.linear_cross_entropy(
            x, w, target, linear_bias=b, weight=weight, **weight_kw, return_grad=with_grad,
            grad_output=np.asarray(g[0], np.float64) if upstream else None)
        if not with_grad:
            return out
        loss, grads = out
        return loss, (grads.input, grads.linear_weight, grads.linear_bias)

    return host


def _lce_specs(x: Any, w: Any, b: Any, opts: tuple, with_grad: bool) -> Any:
    loss = _spec(_loss_shape(x.shape, dict(opts)["reduction"], linear=True), x.dtype)
    if not with_grad:
        return loss
    grads = (_spec(x.shape, x.dtype), _spec(w.shape, w.dtype), None if b is None else _spec(b.shape, b.dtype))
    return loss, grads


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lce(x: Any, w: Any, b: Any, target: Any, weight: Any, opts: tuple) -> Any:
    return _call(_lce_host(opts, False), _lce_specs(x, w, b, opts, False), x, w, b, target, weight)


def _lce_fwd(x: Any, w: Any, b: Any, target: Any, weight: Any, opts: tuple) -> Any:
    if dict(opts)["reduction"] == "none":  # the weight gradient needs each sample's upstream gradient
        loss = _call(_lce_host(opts, False), _lce_specs(x, w, b, opts, False), x, w, b, target, weight)
        return loss, (None, (x, w, b, target, weight))
    loss, grads = _call(_lce_host(opts, True), _lce_specs(x, w, b, opts, True), x, w, b, target, weight)
    return loss, (grads, (None, None, b, target, weight))


def _lce_bwd(opts: tuple, res: tuple, upstream: Any) -> tuple:
    grads, (x, w, b, target, weight) = res
    if grads is None:
        specs = _lce_specs(x, w, b, opts, True)
        _, grads = _call(_lce_host(opts, True, upstream=True), specs, x, w, b, target, weight, upstream)
        scaled = grads
    else:
        scaled = tuple(None if g is None else (g * upstream).astype(g.dtype) for g in grads)
    return (*scaled, _zero_cotangent(target), _zero_cotangent(weight))


_lce.defvjp(_lce_fwd, _lce_bwd)


def linear_cross_entropy(input: Any, linear_weight: Any, target: Any, *, linear_bias: Any = None,
                         weight: Any = None, reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, options: Optional[LinearCrossEntropyOptions] = None,
                         softcap: Optional[float] = None, z_loss: float = 0.0) -> Any:
    """:func:`fusedce.linear_cross_entropy` as a JAX function (chunked, never
    building the ``N x C`` logits), differentiable with respect to
    ``input``, ``linear_weight`` and ``linear_bias``."""
    opts = (("reduction", str(reduction)), ("ignore_index", ignore_index),
            ("label_smoothing", float(label_smoothing)), ("options", options),
            ("softcap", None if softcap is None else float(softcap)), ("z_loss", float(z_loss)))
    return _lce(input, linear_weight, linear_bias, target, weight, opts)


# ---- token_stats ------------------------------------------------------------------------------

_DIFFERENTIABLE = ("logprob", "entropy")


def _stats_specs(shape: tuple, dtype: Any, has_target: bool, kw: Dict[str, Any]) -> TokenStats:
    k = int(kw.get("top_k", 0))
    flags = dict(zip(STAT_NAMES[:5], _stat_flags(kw.get("stats"), has_target, k)))
    f = jnp.float64 if dtype == jnp.float64 else jnp.float32
    kinds = dict(lse=f, logprob=f, entropy=f, argmax=np.int64, rank=np.int64)
    specs = {n: _spec(shape, kinds[n]) if flags[n] else None for n in kinds}
    specs["topk_ids"] = _spec(shape + (k,), np.int64) if k else None
    specs["topk_logprobs"] = _spec(shape + (k,), f) if k else None
    return TokenStats(**cast(Dict[str, Any], specs))  # pure_callback's result spec


def _stats_grad_host(run: Callable[..., Any]) -> Callable[..., Any]:
    def host(*args: Any) -> Any:
        *inputs, gl, ge = args
        return run(*inputs, grad_logprob=None if gl is None else np.asarray(gl, np.float64),
                   grad_entropy=None if ge is None else np.asarray(ge, np.float64))

    return host


def _upstream_of(cot: TokenStats) -> tuple:
    return tuple(getattr(cot, n) for n in _DIFFERENTIABLE)


def _constant_but_differentiable(s: TokenStats) -> TokenStats:
    return TokenStats(*(v if n in _DIFFERENTIABLE or v is None else jax.lax.stop_gradient(v)
                        for n, v in zip(TokenStats._fields, s)))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ts(x: Any, target: Any, kw: tuple) -> TokenStats:
    opts = dict(kw)
    specs = _stats_specs(x.shape[:1] + x.shape[2:] if x.ndim > 1 else (), x.dtype, target is not None, opts)
    return _call(lambda x, t: F.token_stats(x, t, **opts), specs, x, target)


def _ts_fwd(x: Any, target: Any, kw: tuple) -> Any:
    return _ts(x, target, kw), (x, target)


def _ts_bwd(kw: tuple, res: tuple, cot: TokenStats) -> tuple:
    x, target = res
    opts = dict(kw)

    def run(x: np.ndarray, t: np.ndarray, **g: Any) -> np.ndarray:
        return F.token_stats(x, t, **opts, return_grad=True, **g)[1]

    grad = _call(_stats_grad_host(run), _spec(x.shape, x.dtype), x, target, *_upstream_of(cot))
    return grad, _zero_cotangent(target)


_ts.defvjp(_ts_fwd, _ts_bwd)


def _stats_kw(kw: Dict[str, Any]) -> tuple:
    reject_gradient_keywords(kw, "fusedce.jax")
    if kw.get("stats") is not None:
        kw["stats"] = tuple(kw["stats"])
    return tuple(sorted(kw.items()))


def token_stats(input: Any, target: Any = None, **kw: Any) -> TokenStats:
    """:func:`fusedce.token_stats` as a JAX function: a ``TokenStats`` of
    arrays (None for what was not asked for); ``logprob`` and ``entropy``
    are differentiable with respect to ``input``. Keywords (static) as
    :func:`fusedce.token_stats`."""
    return _constant_but_differentiable(_ts(input, target, _stats_kw(kw)))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lts(x: Any, w: Any, b: Any, target: Any, kw: tuple) -> TokenStats:
    opts = dict(kw)
    specs = _stats_specs(x.shape[:-1], x.dtype, target is not None, opts)
    return _call(lambda x, w, b, t: F.linear_token_stats(x, w, t, linear_bias=b, **opts), specs, x, w, b, target)


def _lts_fwd(x: Any, w: Any, b: Any, target: Any, kw: tuple) -> Any:
    return _lts(x, w, b, target, kw), (x, w, b, target)


def _lts_bwd(kw: tuple, res: tuple, cot: TokenStats) -> tuple:
    x, w, b, target = res
    opts = dict(kw)

    def run(x: np.ndarray, w: np.ndarray, b: Optional[np.ndarray], t: np.ndarray, **g: Any) -> tuple:
        grads = F.linear_token_stats(x, w, t, linear_bias=b, **opts, return_grad=True, **g)[1]
        return grads.input, grads.linear_weight, grads.linear_bias

    specs = (_spec(x.shape, x.dtype), _spec(w.shape, w.dtype), None if b is None else _spec(b.shape, b.dtype))
    grads = _call(_stats_grad_host(run), specs, x, w, b, target, *_upstream_of(cot))
    return (*grads, _zero_cotangent(target))


_lts.defvjp(_lts_fwd, _lts_bwd)


def linear_token_stats(input: Any, linear_weight: Any, target: Any = None, *, linear_bias: Any = None,
                       **kw: Any) -> TokenStats:
    """:func:`fusedce.linear_token_stats` as a JAX function; ``logprob`` and
    ``entropy`` are differentiable with respect to ``input``,
    ``linear_weight`` and ``linear_bias``."""
    return _constant_but_differentiable(_lts(input, linear_weight, linear_bias, target, _stats_kw(kw)))
