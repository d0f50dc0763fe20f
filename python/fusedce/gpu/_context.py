"""The GPU context: adapter, device, buffers, pipelines and uniforms.

The adapter, device, shader modules, pipelines and bind-group layouts are
created once per process and cached. A shader's uniform struct is described
once, in its WGSL source: :meth:`Context.uniform` packs values by field name
against that declaration (unknown or missing fields are errors), so no
positional list has to mirror the WGSL by hand.
"""

from __future__ import annotations

import math
import os
import re
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

    def uniform(self, shader: str, **fields: Any):
        """A uniform buffer holding ``fields`` laid out as the first
        ``struct`` of ``shader``'s WGSL source (u32, i32 and f32 members)."""
        layout = _uniform_layout(shader)
        if set(fields) != {n for n, _ in layout if not n.startswith("_")}:
            raise KeyError(f"{shader}.wgsl uniform fields {[n for n, _ in layout]}, got {sorted(fields)}")
        arr = np.zeros(-(-len(layout) // 4) * 4, dtype=np.uint32)
        for i, (name, ty) in enumerate(layout):
            v = fields.get(name, 0)
            arr[i] = np.array(v, dtype=_WGSL_TYPES[ty]).view(np.uint32)
        return self.device.create_buffer_with_data(data=arr.data.cast("B"), usage=self.wgpu.BufferUsage.UNIFORM)

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


_WGSL_TYPES = {"u32": np.uint32, "i32": np.int32, "f32": np.float32}
_LAYOUTS: Dict[str, List[Tuple[str, str]]] = {}


def _uniform_layout(shader: str) -> List[Tuple[str, str]]:
    """``[(field, type), ...]`` of the first ``struct`` in ``shader``.wgsl."""
    layout = _LAYOUTS.get(shader)
    if layout is None:
        body = re.search(r"struct\s+\w+\s*\{([^}]*)\}", _shader(shader + ".wgsl"))
        assert body is not None, f"{shader}.wgsl declares no uniform struct"
        layout = re.findall(r"(\w+)\s*:\s*(u32|i32|f32)", re.sub(r"//[^\n]*", "", body.group(1)))
        _LAYOUTS[shader] = layout
    return layout


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


