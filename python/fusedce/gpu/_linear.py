"""The linear driver on the GPU (``run_chunks``), ``linear_cross_entropy``
on it, and the device copy of a weight.

Per chunk of rows: the logits chunk ``X_c·W_blkᵀ (+b)`` is written class
block by class block into one device buffer (the weight is split into
blocks that each fit one storage binding), a step — the CE shader, or the
statistics shader (``_stats``) — turns it into its gradient in place, then
``dX_c`` accumulates over the blocks and ``dW_blk``, ``db`` accumulate on
the device. The N x C logits never exist. Targets, scales and the reduction
come from the core's target plan.

Transfers: the rows, targets and scales are uploaded once and copied into
the chunk buffers on the device; everything is encoded into one submission
(one per chunk with probability targets, uploaded chunk by chunk) and read
back once at the end.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from .. import _native
from .._request import LinearCrossEntropyRequest
from ._ce import dispatch_ce
from ._context import Context, context, groups_for


def matmul_into(ctx: Context, enc: Any, dims: Tuple[int, int, int], a: Tuple[Any, int, int, int],
                b: Tuple[Any, int, int, int], c: Tuple[Any, int, int], accumulate: bool = False,
                bias: Optional[Tuple[Any, int]] = None) -> None:
    """``C[m, n] (+)= A[m, k] · B[k, n] (+ bias)`` over strided views: each
    operand is ``(buffer, offset, row stride, column stride)`` (C: unit
    column stride), offsets and strides in elements."""
    m, n, k = dims
    if m == 0 or n == 0:
        return
    u = ctx.uniform("matmul", m=m, n=n, k=k, accumulate=int(accumulate), a_off=a[1], a_rs=a[2], a_cs=a[3],
                    has_bias=int(bias is not None), b_off=b[1], b_rs=b[2], b_cs=b[3],
                    bias_off=0 if bias is None else bias[1], c_off=c[1], c_rs=c[2])
    ctx.dispatch(enc, "matmul", [u, a[0], b[0], c[0], ctx._dummy if bias is None else bias[0]],
                 (math.ceil(n / 64), math.ceil(m / 64)))


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for 2-D float32 arrays on the GPU (for tests and benchmarks)."""
    ctx = context()
    (m, k), n = a.shape, b.shape[1]
    abuf, bbuf = ctx.buffer_from(a.astype(np.float32)), ctx.buffer_from(b.astype(np.float32))
    cbuf = ctx.empty(m * n * 4)
    enc = ctx.encoder()
    matmul_into(ctx, enc, (m, n, k), (abuf, 0, k, 1), (bbuf, 0, n, 1), (cbuf, 0, n))
    ctx.submit(enc)
    return ctx.read(cbuf, m * n).reshape(m, n)


class DeviceWeight:
    """A linear weight ``(C·S, D)`` (and bias) on the device, in class blocks
    that each fit one storage binding."""

    def __init__(self, ctx: Context, w2: np.ndarray, bias: Optional[np.ndarray]) -> None:
        self.rows, self.d = w2.shape
        block = max(1, ctx.max_binding // max(1, self.d * 4))
        self.blocks: List[Tuple[int, int, Any]] = [
            (j0, min(self.rows, j0 + block), ctx.buffer_from(np.asarray(w2[j0:j0 + block], np.float32)))
            for j0 in range(0, self.rows, block)
        ]
        self.bias = None if bias is None else ctx.buffer_from(np.asarray(bias, np.float32).reshape(-1))


def checksum(a: np.ndarray) -> Tuple[int, int, Tuple[int, ...], str]:
    """A cheap fingerprint of an array's bytes (two 64-bit folds of its
    8-byte words, the odd tail bytes folded in), to notice in-place updates
    of a resident weight. Reads the array once; copies nothing when it is
    C-contiguous."""
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    body = flat.size - flat.size % 8
    words = flat[:body].view(np.uint64)
    tail = int.from_bytes(flat[body:].tobytes(), "little")
    xor = int(np.bitwise_xor.reduce(words)) if words.size else 0
    total = int(np.add.reduce(words, dtype=np.uint64)) if words.size else 0
    return xor ^ tail, total + tail, a.shape, str(a.dtype)


class ResidentWeight:
    """A module's weight and bias kept on the device between calls and
    uploaded again only when their bytes changed (a checksum per call, at
    memory speed on the host). ``uploads`` counts the uploads."""

    def __init__(self) -> None:
        self.uploads = 0
        self._key: Any = None
        self._weight: Optional[DeviceWeight] = None

    def get(self, ctx: Context, w: np.ndarray, b: Optional[np.ndarray]) -> DeviceWeight:
        key = (checksum(w), None if b is None else checksum(b))
        if self._weight is None or key != self._key:
            self._weight = None
            self._weight = DeviceWeight(ctx, w.reshape(-1, w.shape[-1]), b)
            self._key = key
            self.uploads += 1
        return self._weight


def linear_cross_entropy(req: LinearCrossEntropyRequest, resident: Optional[ResidentWeight] = None) -> np.ndarray:
    """The loss of ``req`` on the GPU; its gradients, if asked for, go to
    ``req.grads``. ``resident``: a module's device copy of its weight."""
    p = req.problem
    plan = _native.plan(p)
    per = np.zeros(p.samples, np.float32)
    if p.batch and p.classes * p.spatial:
        ce: List[_CeBuffers] = []

        def step(ctx: Context, enc: Any, logits: Any, r0: int, r1: int) -> None:
            if not ce:
                ce.append(_CeBuffers(ctx, req, plan, _chunk_rows(ctx, req)))
            ce[0].dispatch(ctx, enc, req, logits, r0, r1)

        def finish(ctx: Context) -> None:
            ctx.read_into(ce[0].lossall, per)

        run_chunks(req, resident, step, finish)
    else:
        zero_grads(req)
    if req.loss is not None:
        req.loss[...] = per.reshape(req.loss.shape)
        return req.loss
    return np.asarray(plan.reduce(per), dtype=req.input.dtype)


def zero_grads(req: Any) -> None:
    """The gradients of a call with no rows or no classes."""
    for g in req.grads or ():
        if g is not None:
            g[...] = 0


class _CeBuffers:
    """The loss step's device buffers: targets, scales and losses of every
    sample, and those of one chunk."""

    def __init__(self, ctx: Context, req: LinearCrossEntropyRequest, plan: Any, rows: int) -> None:
        p, sp = req.problem, req.problem.spatial
        tgt = plan.targets if plan.targets is not None else np.zeros(max(1, p.samples), np.int32)
        self.tall, self.sall = ctx.buffer_from(tgt), ctx.buffer_from(plan.scale)
        self.lossall = ctx.empty(p.samples * 4)
        w = np.ones(p.classes, np.float32) if p.weight is None else p.weight.astype(np.float32)
        self.cw = ctx.buffer_from(w)
        self.t, self.s, self.loss = (ctx.empty(rows * sp * 4) for _ in range(3))

    def dispatch(self, ctx: Context, enc: Any, req: LinearCrossEntropyRequest, logits: Any, r0: int, r1: int) -> None:
        """The CE shader in place over the chunk's logits (losses copied out)."""
        p = req.problem
        sp, cs, samples = p.spatial, p.classes * p.spatial, (r1 - r0) * p.spatial
        enc.copy_buffer_to_buffer(self.tall, r0 * sp * 4, self.t, 0, samples * 4)
        enc.copy_buffer_to_buffer(self.sall, r0 * sp * 4, self.s, 0, samples * 4)
        probs = p.probs
        pbuf = ctx._dummy if probs is None else ctx.buffer_from(
            np.asarray(probs.reshape(-1)[r0 * cs:r1 * cs], np.float32))
        dispatch_ce(ctx, enc, [logits, self.t, pbuf, self.cw, self.s, self.loss], samples, p.classes, sp,
                    probs is not None, p.label_smoothing, req.grads is not None)
        enc.copy_buffer_to_buffer(self.loss, 0, self.lossall, r0 * sp * 4, samples * 4)


class _Chunks:
    """The device buffers of the linear part of one call: the rows, the
    gradients, and the per-chunk buffers the products work in."""

    def __init__(self, ctx: Context, req: Any, dev: DeviceWeight, rows: int):
        p, n, d = req.problem, req.input.shape[0], req.in_features
        cs, grad = p.classes * p.spatial, req.grads is not None
        self.xall = ctx.buffer_from(np.asarray(req.input, np.float32))
        self.dxall = ctx.empty(n * d * 4) if grad else None
        self.dws = [ctx.zeros((j1 - j0) * d) for (j0, j1, _) in dev.blocks] if grad else []
        self.db = ctx.zeros(cs) if grad and dev.bias is not None else None
        self.logits, self.x = ctx.empty(rows * cs * 4), ctx.empty(rows * d * 4)
        self.dx = ctx.empty(rows * d * 4) if grad else None


def _chunk_rows(ctx: Context, req: Any) -> int:
    p, n, d = req.problem, req.input.shape[0], req.in_features
    cs = p.classes * p.spatial
    if cs * 4 > ctx.max_binding:
        raise ValueError(
            f"linear_weight: one row of logits ({cs} values) exceeds the adapter's "
            f"max_storage_buffer_binding_size ({ctx.max_binding} bytes)"
        )
    max_buffer = int(ctx.limits["max-buffer-size"])
    if n * max(d, p.spatial) * 4 > max_buffer:
        raise ValueError(
            f"input: {n} rows of {d} features exceed the adapter's max_buffer_size ({max_buffer} bytes); "
            "split the batch or use device='cpu'"
        )
    return max(1, min(req.chunk_rows, ctx.max_binding // (cs * 4), ctx.max_binding // max(1, d * 4), n))


def run_chunks(req: Any, resident: Optional[ResidentWeight], step: Callable[..., Any],
               finish: Callable[..., None]) -> None:
    """The linear driver on the device: per chunk of rows the logits, then
    ``step(ctx, encoder, logits, r0, r1)`` (which turns them into their
    gradient in place when ``req.grads`` is given), then the backward; after
    the submission ``finish(ctx)`` and the gradients read back."""
    p, n, d = req.problem, req.input.shape[0], req.in_features
    cs = p.classes * p.spatial
    if not (n and cs):
        zero_grads(req)
        return
    ctx = context()
    dev = resident.get(ctx, req.linear_weight, req.linear_bias) if resident is not None else \
        DeviceWeight(ctx, req.linear_weight.reshape(cs, -1), req.linear_bias)
    rows = _chunk_rows(ctx, req)
    bufs = _Chunks(ctx, req, dev, rows)
    probs = getattr(p, "probs", None)
    enc = ctx.encoder()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        _logits_chunk(ctx, enc, req, dev, bufs, r0, r1)
        step(ctx, enc, bufs.logits, r0, r1)
        if req.grads is not None:
            _backward_chunk(ctx, enc, dev, bufs, r1 - r0, r0, d, cs)
        if probs is not None:  # this chunk's probabilities were uploaded for it alone
            ctx.submit(enc)
            enc = ctx.encoder()
    ctx.submit(enc)
    finish(ctx)
    if req.grads is not None:
        _read_grads(ctx, req, dev, bufs)


def _logits_chunk(ctx: Context, enc: Any, req: Any, dev: DeviceWeight, bufs: _Chunks, r0: int, r1: int) -> None:
    """``L = x_c · Wᵀ (+ b)`` for rows ``r0..r1``, class block by class block."""
    d, nr, cs = req.in_features, r1 - r0, req.problem.classes * req.problem.spatial
    if d:
        enc.copy_buffer_to_buffer(bufs.xall, r0 * d * 4, bufs.x, 0, nr * d * 4)
    for (j0, j1, wb) in dev.blocks:
        matmul_into(ctx, enc, (nr, j1 - j0, d), (bufs.x, 0, d, 1), (wb, 0, 1, d), (bufs.logits, j0, cs),
                    bias=None if dev.bias is None else (dev.bias, j0))


def _backward_chunk(ctx: Context, enc: Any, dev: DeviceWeight, bufs: _Chunks, nr: int, r0: int, d: int,
                    cs: int) -> None:
    """``dX_c = dL · W``, ``dW += dLᵀ · X_c``, ``db += Σ dL`` from the chunk's logits gradient."""
    for bi, (j0, j1, wb) in enumerate(dev.blocks):
        matmul_into(ctx, enc, (nr, d, j1 - j0), (bufs.logits, j0, cs, 1), (wb, 0, d, 1), (bufs.dx, 0, d),
                    accumulate=bi > 0)
        matmul_into(ctx, enc, (j1 - j0, d, nr), (bufs.logits, j0, 1, cs), (bufs.x, 0, d, 1), (bufs.dws[bi], 0, d),
                    accumulate=True)
    if d:
        enc.copy_buffer_to_buffer(bufs.dx, 0, bufs.dxall, r0 * d * 4, nr * d * 4)
    if bufs.db is not None:
        u = ctx.uniform("colsum", rows=nr, cols=cs)
        ctx.dispatch(enc, "colsum", [u, bufs.logits, bufs.db], groups_for(math.ceil(cs / 256)))


def _read_grads(ctx: Context, req: Any, dev: DeviceWeight, bufs: _Chunks) -> None:
    """The gradients read back straight into the request's output arrays."""
    assert req.grads is not None
    gx, gw, gb = req.grads
    ctx.read_into(bufs.dxall, gx.reshape(req.input.shape))
    flat = gw.reshape(-1)
    for b, (j0, j1, _) in zip(bufs.dws, dev.blocks):
        ctx.read_into(b, flat[j0 * req.in_features:j1 * req.in_features])
    if gb is not None and bufs.db is not None:
        ctx.read_into(bufs.db, gb.reshape(-1))
