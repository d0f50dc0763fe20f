"""``token_stats`` and ``linear_token_stats`` on the GPU: the statistics
shader (``shaders/stats.wgsl``, one workgroup per sample) over slabs of whole
images, or over each chunk of logits of the linear driver (``_linear``).

Targets come from the core's validation (``fusedce._native.stats_plan``):
the same checks and errors as the CPU path. The device computes in float32
(half inputs are widened on upload; float64 runs on the CPU). NaN logits are
not ordered on the device as on the CPU (WGSL may assume no NaN).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import numpy as np

from .. import _native
from .._request import LinearTokenStatsRequest, StatsProblem, TokenStats, TokenStatsRequest
from ._context import Context, context, groups_for


class StatsBuffers:
    """The device outputs of ``samples`` samples, and their targets and
    upstream gradients."""

    def __init__(self, ctx: Context, p: StatsProblem, targets: Optional[np.ndarray], samples: int,
                 s0: int = 0) -> None:
        tgt = np.full(samples, -1, np.int32) if targets is None else targets[s0:s0 + samples]
        self.samples = samples
        self.tgt = ctx.buffer_from(np.ascontiguousarray(tgt, np.int32))
        self.up = ctx.buffer_from(_upstream(p, s0, samples))
        self.f = ctx.empty(samples * 3 * 4)
        self.i = ctx.empty(samples * 2 * 4)
        self.topv = ctx.empty(max(1, samples * p.top_k) * 4)
        self.topi = ctx.empty(max(1, samples * p.top_k) * 4)

    def read_into(self, ctx: Context, out: TokenStats, s0: int) -> None:
        """Copies the samples' results into the request's outputs."""
        n, k = self.samples, out.topk_ids.shape[-1] if out.topk_ids is not None else 0
        f = ctx.read(self.f, n * 3).reshape(n, 3)
        i = ctx.read(self.i, n * 2, np.int32).reshape(n, 2)
        for col, arr in enumerate((out.lse, out.logprob, out.entropy)):
            if arr is not None:
                arr.reshape(-1)[s0:s0 + n] = f[:, col]
        for col, arr in enumerate((out.argmax, out.rank)):
            if arr is not None:
                arr.reshape(-1)[s0:s0 + n] = i[:, col]
        if out.topk_ids is not None and out.topk_logprobs is not None:
            out.topk_ids.reshape(-1, k)[s0:s0 + n] = ctx.read(self.topi, n * k, np.int32).reshape(n, k)
            out.topk_logprobs.reshape(-1, k)[s0:s0 + n] = ctx.read(self.topv, n * k).reshape(n, k)


def _upstream(p: StatsProblem, s0: int, samples: int) -> np.ndarray:
    """``(gl, ge)`` per sample, float32."""
    up = np.zeros((samples, 2), np.float32)
    for col, g in enumerate((p.grad_logprob, p.grad_entropy)):
        if g is not None:
            up[:, col] = np.asarray(g, np.float64).reshape(-1)[s0:s0 + samples] if np.ndim(g) else g
    return up


def dispatch_stats(ctx: Context, enc: Any, logits: Any, bufs: StatsBuffers, p: StatsProblem, spatial: int,
                   want_grad: bool) -> None:
    """The statistics shader over ``bufs.samples`` samples of ``logits``."""
    gx, gy = groups_for(bufs.samples)
    u = ctx.uniform("stats", samples=bufs.samples, classes=p.classes, spatial=spatial, groups_x=gx,
                    temperature=p.temperature, softcap=p.softcap or 0.0, top_k=p.top_k,
                    want_grad=int(want_grad))
    ctx.dispatch(enc, "stats", [u, logits, bufs.tgt, bufs.up, bufs.f, bufs.i, bufs.topv, bufs.topi], (gx, gy),
                 rows=spatial == 1)


def token_stats(req: TokenStatsRequest) -> None:
    """The statistics of ``req`` on the GPU into ``req.out``; the gradient,
    if asked for, into ``req.grad``."""
    p, x = req.problem, req.input
    targets = _native.stats_plan(p, req.grad is not None)
    samples = p.batch * p.spatial
    if not samples:
        return
    ctx = context()
    img = p.classes * p.spatial
    if img * 4 > ctx.max_binding:
        raise ValueError(
            f"input: one sample's {p.classes} x {p.spatial} logits ({img * 4} bytes) exceed the "
            f"adapter's max_storage_buffer_binding_size ({ctx.max_binding} bytes)"
        )
    per_slab = max(1, ctx.max_binding // (img * 4))
    xf = x.reshape(-1)
    grad = None if req.grad is None else req.grad.reshape(-1)
    for n0 in range(0, p.batch, per_slab):
        n1 = min(p.batch, n0 + per_slab)
        xs, s0 = slice(n0 * img, n1 * img), n0 * p.spatial
        xbuf = ctx.buffer_from(np.asarray(xf[xs], np.float32))
        bufs = StatsBuffers(ctx, p, targets, (n1 - n0) * p.spatial, s0)
        enc = ctx.encoder()
        dispatch_stats(ctx, enc, xbuf, bufs, p, p.spatial, grad is not None)
        ctx.submit(enc)
        bufs.read_into(ctx, req.out, s0)
        if grad is not None:
            ctx.read_into(xbuf, grad[xs])


def linear_token_stats(req: LinearTokenStatsRequest, resident: Any = None) -> None:
    """The statistics of ``req``'s logits on the GPU into ``req.out``; the
    gradients, if asked for, into ``req.grads``."""
    from ._linear import run_chunks

    p = req.problem
    targets = _native.stats_plan(p, req.grads is not None)
    chunks: List[Tuple[StatsBuffers, int]] = []

    def step(ctx: Context, enc: Any, logits: Any, r0: int, r1: int) -> None:
        bufs = StatsBuffers(ctx, p, targets, r1 - r0, r0)
        dispatch_stats(ctx, enc, logits, bufs, p, 1, req.grads is not None)
        chunks.append((bufs, r0))

    def finish(ctx: Context) -> None:
        for bufs, r0 in chunks:
            bufs.read_into(ctx, req.out, r0)

    run_chunks(req, resident, step, finish)
