"""The wgpu-py backend: device, pipelines and the two fused operations.

Everything here computes in float32 on the device. Inputs are validated and
targets encoded by the caller (``fusedce.functional``); this module only moves
buffers and dispatches. The adapter, device, shader modules, pipelines and
bind-group layouts are created once per process and cached.
"""

from __future__ import annotations

import math
import os
import threading
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

_LOCK = threading.Lock()
_CTX: Optional["Context"] = None
_FAILED: Optional[str] = None

WG_LIMIT = 65535


class GpuUnavailable(RuntimeError):
    """No WebGPU adapter could be opened (or wgpu-py is not installed)."""


def _shader(name: str) -> str:
    return resources.files("fusedce.gpu").joinpath("shaders", name).read_text()


class Context:
    def __init__(self) -> None:
        try:
            import wgpu  # noqa: F401
        except ImportError as exc:
            raise GpuUnavailable(
                "the GPU path needs wgpu-py: pip install 'fusedce[gpu]' (or pip install wgpu)"
            ) from exc
        import wgpu

        self.wgpu = wgpu
        os.environ.setdefault("XDG_RUNTIME_DIR", _runtime_dir())
        try:
            adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
        except Exception as exc:  # wgpu raises RuntimeError when there is none
            raise GpuUnavailable(f"no WebGPU adapter found: {exc}") from exc
        if adapter is None:
            raise GpuUnavailable("no WebGPU adapter found")
        lim = adapter.limits
        want = {
            "max-storage-buffer-binding-size": lim["max-storage-buffer-binding-size"],
            "max-buffer-size": lim["max-buffer-size"],
            "max-storage-buffers-per-shader-stage": min(8, lim["max-storage-buffers-per-shader-stage"]),
            "max-compute-workgroup-storage-size": lim["max-compute-workgroup-storage-size"],
        }
        self.adapter = adapter
        self.has_f16 = "shader-f16" in adapter.features and os.environ.get("FUSEDCE_GPU_NO_F16") != "1"
        self.device = adapter.request_device_sync(
            required_features=["shader-f16"] if self.has_f16 else [], required_limits=want
        )
        self.limits = dict(self.device.limits)
        self.max_binding = int(self.limits["max-storage-buffer-binding-size"])
        self.info = dict(adapter.info)
        self._pipelines: Dict[Tuple[str, ...], Any] = {}
        self._dummy = self.buffer_from(np.zeros(4, np.float32))

    # ---- buffers -----------------------------------------------------------------
    def buffer_from(self, a: np.ndarray, extra_usage: int = 0):
        wgpu = self.wgpu
        a = np.ascontiguousarray(a)
        data = a if a.nbytes >= 4 else np.zeros(4, np.uint8)
        return self.device.create_buffer_with_data(
            data=data.data.cast("B"),
            usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST | extra_usage,
        )

    def empty(self, nbytes: int):
        wgpu = self.wgpu
        return self.device.create_buffer(
            size=max(4, int(nbytes)),
            usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST,
        )

    def zeros(self, n: int):
        return self.buffer_from(np.zeros(max(1, n), np.float32))

    def uniform(self, values: List[Tuple[str, Any]]):
        arr = np.zeros(((len(values) + 3) // 4) * 4, dtype=np.uint32)
        for i, (kind, v) in enumerate(values):
            arr[i] = np.array(v, dtype=np.float32).view(np.uint32) if kind == "f" else np.uint32(v)
        return self.device.create_buffer_with_data(
            data=arr.data.cast("B"), usage=self.wgpu.BufferUsage.UNIFORM
        )

    def read(self, buf, n: int, dtype: Any = np.float32) -> np.ndarray:
        """The first ``n`` values of ``buf`` (of ``dtype``), as a new array."""
        out = np.empty(n, np.dtype(dtype))
        self.read_into(buf, out, dtype)
        return out

    def read_into(self, buf, out: np.ndarray, dtype: Any = np.float32) -> None:
        """``out[...] =`` the first ``out.size`` values of ``buf`` (stored as
        ``dtype``), converted to ``out``'s dtype in the same copy."""
        dtype = np.dtype(dtype)
        n = out.size
        if n == 0:
            return
        nbytes = (n * dtype.itemsize + 3) // 4 * 4
        mv = self.device.queue.read_buffer(buf, 0, nbytes)
        out[...] = np.frombuffer(mv, dtype=dtype, count=n).reshape(out.shape)

    # ---- pipelines ---------------------------------------------------------------
    def pipeline(self, name: str, storage: str = "f32", rows: bool = False):
        key: Tuple[str, ...] = (name, storage) if not rows else (name, storage, "rows")
        p = self._pipelines.get(key)
        if p is None:
            code = _shader(name + ".wgsl").replace("STORAGE", storage)
            if rows:
                # (N, C) logits: classes are adjacent; a constant stride lets
                # the compiler vectorise the loads
                code = code.replace("P.spatial", "1u")
            if storage == "f16":
                code = code.replace("//ENABLE", "enable f16;")
            module = self.device.create_shader_module(code=code)
            pipe = self.device.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": "main"})
            p = self._pipelines[key] = (pipe, pipe.get_bind_group_layout(0))
        return p

    def dispatch(self, encoder, name: str, buffers: List[Any], groups: Tuple[int, int], storage: str = "f32",
                 rows: bool = False):
        pipe, layout = self.pipeline(name, storage, rows)
        bg = self.device.create_bind_group(
            layout=layout,
            entries=[{"binding": i, "resource": {"buffer": b, "offset": 0, "size": b.size}}
                     for i, b in enumerate(buffers)],
        )
        cp = encoder.begin_compute_pass()
        cp.set_pipeline(pipe)
        cp.set_bind_group(0, bg)
        cp.dispatch_workgroups(int(groups[0]), int(groups[1]), 1)
        cp.end()

    def submit(self, encoder) -> None:
        self.device.queue.submit([encoder.finish()])

    def encoder(self):
        return self.device.create_command_encoder()


def _runtime_dir() -> str:
    d = os.path.join("/tmp", f"fusedce-xdg-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def context() -> Context:
    """The process's GPU context (raises GpuUnavailable)."""
    global _CTX, _FAILED
    with _LOCK:
        if _CTX is not None:
            return _CTX
        if _FAILED is not None:
            raise GpuUnavailable(_FAILED)
        try:
            _CTX = Context()
        except GpuUnavailable as exc:
            _FAILED = str(exc)
            raise
        return _CTX


def groups_for(count: int) -> Tuple[int, int]:
    """A 2-D grid of at least ``count`` workgroups, each side <= 65535."""
    if count <= WG_LIMIT:
        return max(1, count), 1
    gy = math.ceil(count / WG_LIMIT)
    return WG_LIMIT, gy


# ---- cross-entropy -----------------------------------------------------------------------

def _ce_dispatch(ctx: Context, enc, xbuf, tbuf, pbuf, wbuf, sbuf, lbuf, samples, classes, spatial,
                 probs, eps, want_grad, storage="f32"):
    gx, gy = groups_for(samples)
    u = ctx.uniform([("u", samples), ("u", classes), ("u", spatial), ("u", int(probs)),
                     ("f", eps), ("u", int(want_grad)), ("u", gx), ("u", 0)])
    ctx.dispatch(enc, "ce", [u, xbuf, tbuf, pbuf, wbuf, sbuf, lbuf], (gx, gy), storage, rows=spatial == 1)


def _padded(a: np.ndarray) -> np.ndarray:
    """``a`` flattened, padded to a multiple of 4 bytes (16-bit storage)."""
    a = np.ascontiguousarray(a).reshape(-1)
    if a.nbytes % 4:
        a = np.concatenate([a, np.zeros(1, a.dtype)])
    return a


def cross_entropy(x: np.ndarray, batch: int, classes: int, spatial: int, tgt: Optional[np.ndarray],
                  probs: Optional[np.ndarray], cw: np.ndarray, scale: np.ndarray, eps: float,
                  grad_out: Optional[np.ndarray]) -> np.ndarray:
    """Per-sample losses (float32, N*S) of the C-contiguous logits ``x`` laid
    out (batch, classes, spatial); with ``grad_out`` (a C-contiguous array of
    x's size, any float dtype, ``x`` itself allowed) their gradient is written
    there. On the device: float32, or float16 for a float16 input on an
    adapter with shader-f16 (stored and moved as f16, computed in f32).
    ``tgt``: int32 class per sample (-1 ignored); ``scale``: upstream
    gradient per sample."""
    ctx = context()
    half = x.dtype == np.float16 and ctx.has_f16
    sdt = np.dtype(np.float16 if half else np.float32)
    storage = "f16" if half else "f32"
    per_sample = classes * spatial * sdt.itemsize
    # samples per chunk: whole images (all spatial positions of a batch entry)
    # so that a chunk is one contiguous slab under the binding limit.
    img_bytes = per_sample
    if img_bytes > ctx.max_binding:
        raise ValueError(
            f"input: one sample's {classes} x {spatial} logits ({img_bytes} bytes) exceed the adapter's "
            f"max_storage_buffer_binding_size ({ctx.max_binding} bytes)"
        )
    imgs = max(1, ctx.max_binding // img_bytes)
    xf = x.reshape(-1)
    losses = np.empty(batch * spatial, np.float32)
    grad = None if grad_out is None else grad_out.reshape(-1)
    want_grad = grad is not None
    wbuf = ctx.buffer_from(cw.astype(np.float32))
    dummy = ctx.buffer_from(np.zeros(2, sdt))
    for n0 in range(0, batch, imgs):
        n1 = min(batch, n0 + imgs)
        xs = slice(n0 * classes * spatial, n1 * classes * spatial)
        ss = slice(n0 * spatial, n1 * spatial)
        samples = (n1 - n0) * spatial
        xbuf = ctx.buffer_from(_padded(np.asarray(xf[xs], sdt)))
        tbuf = ctx.buffer_from(tgt[ss]) if tgt is not None else ctx.buffer_from(np.zeros(samples, np.int32))
        pbuf = (ctx.buffer_from(_padded(np.asarray(probs.reshape(-1)[xs], sdt)))
                if probs is not None else dummy)
        sbuf = ctx.buffer_from(scale[ss].astype(np.float32))
        lbuf = ctx.empty(samples * 4)
        enc = ctx.encoder()
        _ce_dispatch(ctx, enc, xbuf, tbuf, pbuf, wbuf, sbuf, lbuf, samples, classes, spatial,
                     probs is not None, eps, want_grad, storage)
        ctx.submit(enc)
        ctx.read_into(lbuf, losses[ss])
        if grad is not None:
            ctx.read_into(xbuf, grad[xs], sdt)
    return losses


# ---- matmul and linear cross-entropy -------------------------------------------------------

def _matmul(ctx: Context, enc, m, n, k, a, a_off, a_rs, a_cs, b, b_off, b_rs, b_cs, c, c_off, c_rs,
            accumulate=False, bias=None, bias_off=0):
    if m == 0 or n == 0:
        return
    u = ctx.uniform([("u", m), ("u", n), ("u", k), ("u", int(accumulate)),
                     ("u", a_off), ("u", a_rs), ("u", a_cs), ("u", int(bias is not None)),
                     ("u", b_off), ("u", b_rs), ("u", b_cs), ("u", bias_off),
                     ("u", c_off), ("u", c_rs), ("u", 0), ("u", 0)])
    ctx.dispatch(enc, "matmul", [u, a, b, c, bias if bias is not None else ctx._dummy],
                 (math.ceil(n / 64), math.ceil(m / 64)))


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for 2-D float32 arrays on the GPU (for tests and benchmarks)."""
    ctx = context()
    m, k = a.shape
    n = b.shape[1]
    abuf, bbuf = ctx.buffer_from(a.astype(np.float32)), ctx.buffer_from(b.astype(np.float32))
    cbuf = ctx.empty(m * n * 4)
    enc = ctx.encoder()
    _matmul(ctx, enc, m, n, k, abuf, 0, k, 1, bbuf, 0, n, 1, cbuf, 0, n)
    ctx.submit(enc)
    return ctx.read(cbuf, m * n).reshape(m, n)


class ResidentWeight:
    """A linear weight (and bias) on the device, split into class blocks that
    each fit one storage binding; with gradient accumulators when asked."""

    def __init__(self, ctx: Context, w2: np.ndarray, bias: Optional[np.ndarray]) -> None:
        self.ctx = ctx
        self.rows, self.d = w2.shape  # rows = C * S
        block = max(1, ctx.max_binding // max(1, self.d * 4))
        self.blocks: List[Tuple[int, int, Any]] = []
        for j0 in range(0, self.rows, block):
            j1 = min(self.rows, j0 + block)
            self.blocks.append((j0, j1, ctx.buffer_from(np.asarray(w2[j0:j1], np.float32))))
        self.bias = None if bias is None else ctx.buffer_from(np.asarray(bias, np.float32).reshape(-1))
        self.key: Any = None


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


def linear_cross_entropy(x: np.ndarray, res: ResidentWeight, classes: int, spatial: int,
                         tgt: Optional[np.ndarray], probs: Optional[np.ndarray], cw: np.ndarray,
                         scale: np.ndarray, eps: float, rows: int, want_grad: bool,
                         out_dtype: Any = np.float32):
    """Per-sample losses (float32), and (dx (N, D), dw (C*S*D,), db (C*S,) or
    None) in ``out_dtype`` when ``want_grad``:
    chunks of ``rows`` rows; per chunk L = x_c·Wᵀ (+b) into one device buffer,
    CE in place, dX_c = dL·W, dW += dLᵀ·x_c, db += column sums of dL.

    Transfers: the input rows, targets and scales are uploaded once and copied
    into the chunk buffers on the device; losses and dX are copied into whole
    result buffers; everything is encoded into one submission (one per chunk
    with probability targets, which are uploaded chunk by chunk) and read back
    once at the end."""
    ctx = res.ctx
    n, d = x.shape
    cs = classes * spatial
    if cs * 4 > ctx.max_binding:
        raise ValueError(
            f"linear_weight: one row of logits ({cs} values) exceeds the adapter's "
            f"max_storage_buffer_binding_size ({ctx.max_binding} bytes)"
        )
    max_buffer = int(ctx.limits["max-buffer-size"])
    if n * max(d, spatial) * 4 > max_buffer:
        raise ValueError(
            f"input: {n} rows of {d} features exceed the adapter's max_buffer_size ({max_buffer} bytes); "
            "split the batch or use device='cpu'"
        )
    rows = max(1, min(rows, ctx.max_binding // (cs * 4), ctx.max_binding // max(1, d * 4), max(1, n)))
    samples_all = n * spatial
    xall = ctx.buffer_from(np.asarray(x, np.float32))
    tall = ctx.buffer_from(tgt if tgt is not None else np.zeros(max(1, samples_all), np.int32))
    sall = ctx.buffer_from(scale.astype(np.float32))
    lossall = ctx.empty(samples_all * 4)
    dxall = ctx.empty(n * d * 4) if want_grad else None
    wbuf = ctx.buffer_from(cw.astype(np.float32))
    dws = [ctx.zeros((j1 - j0) * d) for (j0, j1, _) in res.blocks] if want_grad else []
    db = ctx.zeros(cs) if (want_grad and res.bias is not None) else None
    lbuf = ctx.empty(rows * cs * 4)
    xbuf = ctx.empty(rows * d * 4)
    tbuf = ctx.empty(rows * spatial * 4)
    sbuf = ctx.empty(rows * spatial * 4)
    lossbuf = ctx.empty(rows * spatial * 4)
    dxbuf = ctx.empty(rows * d * 4) if want_grad else None
    enc = ctx.encoder()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        nr = r1 - r0
        samples = nr * spatial
        if d:
            enc.copy_buffer_to_buffer(xall, r0 * d * 4, xbuf, 0, nr * d * 4)
        enc.copy_buffer_to_buffer(tall, r0 * spatial * 4, tbuf, 0, samples * 4)
        enc.copy_buffer_to_buffer(sall, r0 * spatial * 4, sbuf, 0, samples * 4)
        for (j0, j1, wb) in res.blocks:
            # L[:, j0:j1] = x_c · W_blkᵀ (+ b)
            _matmul(ctx, enc, nr, j1 - j0, d, xbuf, 0, d, 1, wb, 0, 1, d, lbuf, j0, cs,
                    bias=res.bias, bias_off=j0)
        pbuf = (ctx.buffer_from(np.asarray(probs[r0 * cs:r1 * cs], np.float32))
                if probs is not None else ctx._dummy)
        _ce_dispatch(ctx, enc, lbuf, tbuf, pbuf, wbuf, sbuf, lossbuf, samples, classes, spatial,
                     probs is not None, eps, want_grad)
        enc.copy_buffer_to_buffer(lossbuf, 0, lossall, r0 * spatial * 4, samples * 4)
        if want_grad:
            for bi, (j0, j1, wb) in enumerate(res.blocks):
                # dX_c (+)= dL[:, j0:j1] · W_blk
                _matmul(ctx, enc, nr, d, j1 - j0, lbuf, j0, cs, 1, wb, 0, d, 1, dxbuf, 0, d,
                        accumulate=bi > 0)
                # dW_blk += dL[:, j0:j1]ᵀ · x_c
                _matmul(ctx, enc, j1 - j0, d, nr, lbuf, j0, 1, cs, xbuf, 0, d, 1, dws[bi], 0, d,
                        accumulate=True)
            if d:
                enc.copy_buffer_to_buffer(dxbuf, 0, dxall, r0 * d * 4, nr * d * 4)
            if db is not None:
                u = ctx.uniform([("u", nr), ("u", cs), ("u", 0), ("u", 0)])
                ctx.dispatch(enc, "colsum", [u, lbuf, db], groups_for(math.ceil(cs / 256)))
        if probs is not None:
            # the chunk's probabilities were uploaded for this chunk alone
            ctx.submit(enc)
            enc = ctx.encoder()
    ctx.submit(enc)
    losses = ctx.read(lossall, samples_all)
    if not want_grad:
        return losses, None
    dx = np.empty((n, d), out_dtype)
    ctx.read_into(dxall, dx)
    dw = np.empty(cs * d, out_dtype)
    for b, (j0, j1, _) in zip(dws, res.blocks):
        ctx.read_into(b, dw[j0 * d:j1 * d])
    dbv = None
    if db is not None:
        dbv = np.empty(cs, out_dtype)
        ctx.read_into(db, dbv)
    return losses, (dx, dw, dbv)


def resident_weight(w: np.ndarray, b: Optional[np.ndarray], cache: Optional[dict]) -> ResidentWeight:
    """The weight (and bias) on the device. With a ``cache`` dict (a module's),
    the upload is kept and reused while the arrays' bytes are unchanged."""
    ctx = context()
    w2 = w.reshape(-1, w.shape[-1])
    if cache is None:
        return ResidentWeight(ctx, w2, b)
    key = (checksum(w), None if b is None else checksum(b))
    res = cache.get("resident")
    if res is None or res.key != key:
        cache.pop("resident", None)
        res = ResidentWeight(ctx, w2, b)
        res.key = key
        cache["resident"] = res
        cache["uploads"] = cache.get("uploads", 0) + 1
    return res
