"""A float64 numpy reference of torch.nn.functional.cross_entropy and its
gradient, written from the definitions (for the property tests)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np


def cross_entropy_ref(
    x: np.ndarray,
    target: np.ndarray,
    weight: Optional[np.ndarray] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    grad_output=None,
    softcap: Optional[float] = None,
    z_loss: float = 0.0,
) -> Tuple[np.ndarray, np.ndarray]:
    """(loss, grad_input) in float64 for x of shape (C,), (N, C) or (N, C, d...).
    With a softcap the loss sees ``c * tanh(x / c)`` and the gradient is
    multiplied by ``1 - tanh(x / c)**2``; a z-loss adds ``z * lse**2`` per kept
    sample and ``2 z lse p`` to its gradient."""
    x = np.asarray(x, dtype=np.float64)
    slope = 1.0
    if softcap is not None:
        slope = 1.0 - np.tanh(x / softcap) ** 2
        x = softcap * np.tanh(x / softcap)
    unbatched = x.ndim == 1
    if unbatched:
        x = x[None]
        target = np.asarray(target)[None]
    c = x.shape[1]
    xm = np.moveaxis(x, 1, -1)  # (N, d..., C)
    m = xm.max(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        lse = m + np.log(np.exp(xm - m).sum(axis=-1, keepdims=True))
        logp = xm - lse
    w = np.ones(c) if weight is None else np.asarray(weight, dtype=np.float64)
    eps = label_smoothing
    probs = target.shape == x.shape and np.asarray(target).dtype.kind not in "iub"
    if probs:
        t = np.moveaxis(np.asarray(target, dtype=np.float64), 1, -1)
        t = t * (1 - eps) + eps / c
        tw = t * w
        keep = np.ones(xm.shape[:-1], dtype=bool)
        denom = float(np.prod(xm.shape[:-1]))
    else:
        y = np.asarray(target).astype(np.int64)
        keep = y != ignore_index
        ys = np.where(keep, y, 0)
        onehot = (np.arange(c) == ys[..., None]).astype(np.float64)
        tw = (1 - eps) * onehot * w[ys][..., None] + eps / c * w
        tw = np.where(keep[..., None], tw, 0.0)  # an ignored sample has no target (NaN weights too)
        denom = float((w[ys] * keep).sum())
    with np.errstate(invalid="ignore"):
        per = -(tw * np.where(tw == 0, 0.0, logp)).sum(axis=-1) if not probs else -(tw * logp).sum(axis=-1)
        if z_loss:
            per = per + np.where(keep, z_loss * lse[..., 0] ** 2, 0.0)
    if reduction == "none":
        loss = per
        g = np.ones_like(per) if grad_output is None else np.broadcast_to(np.asarray(grad_output, np.float64), per.shape)
    else:
        total = per.sum()
        gs = 1.0 if grad_output is None else float(grad_output)
        with np.errstate(invalid="ignore", divide="ignore"):
            d = np.float64(denom)
            loss = np.array(total / d if reduction == "mean" else total)
            g = np.full(per.shape, np.float64(gs) / d if reduction == "mean" else gs)
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        grad = (p * (tw.sum(axis=-1, keepdims=True) + 2 * z_loss * lse) - tw) * g[..., None]
    grad = np.where(keep[..., None], grad, 0.0)
    grad = np.moveaxis(grad, -1, 1)
    if unbatched:
        grad = grad[0]
        if reduction == "none":
            loss = loss[0]
    return np.asarray(loss), grad * slope


def scores_ref(x: np.ndarray, temperature: float = 1.0, softcap: Optional[float] = None) -> np.ndarray:
    """The scores ``z`` of the logits, in float64."""
    z = np.asarray(x, dtype=np.float64)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    return z / temperature


def token_stats_ref(x, target=None, temperature=1.0, softcap=None, ignore_index=-100, top_k=0,
                    grad_logprob=None, grad_entropy=None) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """Every statistic of ``fusedce.token_stats`` and the gradient of
    ``sum(gl * logprob + ge * entropy)`` w.r.t. the logits, in float64, from
    the definitions (classes on axis 1; ``(C,)`` is one unbatched token)."""
    x = np.asarray(x, dtype=np.float64)
    unbatched = x.ndim == 1
    xb = x[None] if unbatched else x
    z = np.moveaxis(scores_ref(xb, temperature, softcap), 1, -1)  # (N, d..., C)
    shape, c = z.shape[:-1], z.shape[-1]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(z, axis=-1, keepdims=True)
        finite_m = np.where(np.isfinite(m), m, 0.0)
        lse = finite_m + np.log(np.exp(z - finite_m).sum(axis=-1, keepdims=True))
        p = np.exp(z - lse)
        pz = np.where(p > 0, p * z, 0.0)  # a masked class (z = -inf) contributes 0
        mean = pz.sum(axis=-1)
        # a row of -inf, or one holding +inf, has no softmax: its entropy is
        # NaN (as PyTorch's)
        entropy = np.where(np.isinf(lse[..., 0]), np.nan, lse[..., 0] - mean)
        out: Dict[str, np.ndarray] = {"lse": lse[..., 0], "entropy": entropy}
    # argmax, rank and top-k are those of the logits (the scores are an
    # increasing map of them, whose rounding can merge distinct logits)
    xr = np.moveaxis(xb, 1, -1)
    order = np.argsort(-np.where(np.isnan(xr), np.inf, xr), axis=-1, kind="stable")
    out["argmax"] = order[..., 0]
    out["topk_ids"] = order[..., :top_k]
    with np.errstate(invalid="ignore"):
        out["topk_logprobs"] = np.take_along_axis(z, order[..., :top_k], -1) - lse
    gl = np.zeros(shape) if grad_logprob is None else np.broadcast_to(np.asarray(grad_logprob, np.float64), shape)
    ge = np.zeros(shape) if grad_entropy is None else np.broadcast_to(np.asarray(grad_entropy, np.float64), shape)
    with np.errstate(invalid="ignore"):
        dz = np.where(p > 0, z - mean[..., None], 0.0)
        grad = -ge[..., None] * p * dz
    if target is not None:
        y = np.asarray(target).astype(np.int64).reshape(shape)
        keep = y != ignore_index
        ys = np.where(keep, y, 0)
        zy = np.take_along_axis(z, ys[..., None], -1)[..., 0]
        with np.errstate(invalid="ignore"):
            out["logprob"] = np.where(keep, zy - lse[..., 0], 0.0)
        xy = np.take_along_axis(xr, ys[..., None], -1)
        out["rank"] = np.where(keep, (xr > xy).sum(axis=-1), -1)
        onehot = np.zeros(z.shape)
        np.put_along_axis(onehot, ys[..., None], 1.0, -1)
        grad = grad + np.where(keep, gl, 0.0)[..., None] * (onehot - p)
    slope = (1.0 if softcap is None else 1.0 - np.tanh(xb / softcap) ** 2) / temperature
    grad = np.moveaxis(grad, -1, 1) * slope
    if unbatched:
        out = {k: v[0] for k, v in out.items()}
        grad = grad[0]
    return out, grad
