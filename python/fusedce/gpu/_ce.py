"""``cross_entropy`` on the GPU: the CE shader over slabs of whole images.

Targets, per-sample scales and the reduction come from the core's target
plan (``fusedce._native.plan``): the same checks, errors and denominator as
the CPU path. The device computes per-sample losses (and the gradient in
place in its copy of the logits); the host reduces them in float64.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .. import _native
from .._request import CrossEntropyRequest
from ._context import Context, context, groups_for


def dispatch_ce(ctx: Context, enc: Any, bufs: list, samples: int, classes: int, spatial: int, probs: bool,
                eps: float, want_grad: bool, storage: str = "f32") -> None:
    """One CE dispatch over ``samples`` samples; ``bufs`` = [logits, targets,
    probabilities, class weights, scales, losses]."""
    gx, gy = groups_for(samples)
    u = ctx.uniform("ce", samples=samples, classes=classes, spatial=spatial, probs=int(probs), eps=eps,
                    want_grad=int(want_grad), groups_x=gx)
    ctx.dispatch(enc, "ce", [u, *bufs], (gx, gy), storage, rows=spatial == 1)


def _padded(a: np.ndarray) -> np.ndarray:
    """``a`` flattened, padded to a multiple of 4 bytes (16-bit storage)."""
    a = np.ascontiguousarray(a).reshape(-1)
    if a.nbytes % 4:
        a = np.concatenate([a, np.zeros(1, a.dtype)])
    return a


def cross_entropy(req: CrossEntropyRequest) -> np.ndarray:
    """The loss of ``req`` on the GPU; its gradient, if asked for, goes to
    ``req.grad`` (which may be ``req.input`` itself)."""
    p = req.problem
    plan = _native.plan(p)
    per = np.zeros(p.samples, np.float32)
    if p.samples and p.classes:
        _run(context(), req, plan, per)
    elif req.grad is not None:
        req.grad[...] = 0
    if req.loss is not None:
        req.loss[...] = per.reshape(req.loss.shape)
        return req.loss
    return np.asarray(plan.reduce(per), dtype=req.input.dtype)


def _run(ctx: Context, req: CrossEntropyRequest, plan: Any, losses: np.ndarray) -> None:
    """Per-sample losses into ``losses``, over slabs of whole images that each
    fit one storage binding; the gradient read back into ``req.grad``."""
    p, x = req.problem, req.input
    half = x.dtype == np.float16 and ctx.has_f16
    sdt = np.dtype(np.float16 if half else np.float32)
    img = p.classes * p.spatial
    if img * sdt.itemsize > ctx.max_binding:
        raise ValueError(
            f"input: one sample's {p.classes} x {p.spatial} logits ({img * sdt.itemsize} bytes) exceed the "
            f"adapter's max_storage_buffer_binding_size ({ctx.max_binding} bytes)"
        )
    per_slab = max(1, ctx.max_binding // (img * sdt.itemsize))
    xf, probs = x.reshape(-1), p.probs
    grad: Optional[np.ndarray] = None if req.grad is None else req.grad.reshape(-1)
    wbuf = ctx.buffer_from(np.ones(p.classes, np.float32) if p.weight is None else p.weight.astype(np.float32))
    dummy = ctx.buffer_from(np.zeros(2, sdt))
    for n0 in range(0, p.batch, per_slab):
        n1 = min(p.batch, n0 + per_slab)
        xs, ss = slice(n0 * img, n1 * img), slice(n0 * p.spatial, n1 * p.spatial)
        samples = (n1 - n0) * p.spatial
        xbuf = ctx.buffer_from(_padded(np.asarray(xf[xs], sdt)))
        tgt = plan.targets[ss] if plan.targets is not None else np.zeros(samples, np.int32)
        pbuf = dummy if probs is None else ctx.buffer_from(_padded(np.asarray(probs.reshape(-1)[xs], sdt)))
        lbuf = ctx.empty(samples * 4)
        enc = ctx.encoder()
        dispatch_ce(ctx, enc, [xbuf, ctx.buffer_from(tgt), pbuf, wbuf, ctx.buffer_from(plan.scale[ss]), lbuf],
                    samples, p.classes, p.spatial, probs is not None, p.label_smoothing, grad is not None,
                    "f16" if half else "f32")
        ctx.submit(enc)
        ctx.read_into(lbuf, losses[ss])
        if grad is not None:
            ctx.read_into(xbuf, grad[xs], sdt)
