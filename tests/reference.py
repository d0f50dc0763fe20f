"""A float64 numpy reference of torch.nn.functional.cross_entropy and its
gradient, written from the definitions (for the property tests)."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def cross_entropy_ref(
    x: np.ndarray,
    target: np.ndarray,
    weight: Optional[np.ndarray] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    grad_output=None,
) -> Tuple[np.ndarray, np.ndarray]:
    """(loss, grad_input) in float64 for x of shape (C,), (N, C) or (N, C, d...)."""
    x = np.asarray(x, dtype=np.float64)
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
        onehot = np.eye(c)[ys]
        tw = (1 - eps) * onehot * w[ys][..., None] + eps / c * w
        tw = np.where(keep[..., None], tw, 0.0)  # an ignored sample has no target (NaN weights too)
        denom = float((w[ys] * keep).sum())
    with np.errstate(invalid="ignore"):
        per = -(tw * np.where(tw == 0, 0.0, logp)).sum(axis=-1) if not probs else -(tw * logp).sum(axis=-1)
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
        grad = (p * tw.sum(axis=-1, keepdims=True) - tw) * g[..., None]
    grad = np.where(keep[..., None], grad, 0.0)
    grad = np.moveaxis(grad, -1, 1)
    if unbatched:
        grad = grad[0]
        if reduction == "none":
            loss = loss[0]
    return np.asarray(loss), grad
