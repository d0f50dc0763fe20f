"""The GPU path: WGSL compute shaders run through wgpu-py, on any WebGPU
adapter (Vulkan, Metal, D3D12; Mesa's lavapipe in CI).

    >>> import fusedce
    >>> fusedce.gpu.is_available()
    True
    >>> fusedce.cross_entropy(logits, target, device="gpu")

What runs where:
- Arithmetic is float32 on the device. float16 logits (and probability
  targets) of ``cross_entropy`` stay float16 in device memory on adapters with
  ``shader-f16`` (half the bytes moved; ``FUSEDCE_GPU_NO_F16=1`` turns it off),
  else they are converted to float32 on upload; bfloat16, and the half inputs
  of ``linear_cross_entropy``, are converted to float32 on upload, and results
  rounded back to the input's dtype. float64: WGSL has no portable f64 (and
  Vulkan's exp/log have no f64 form), so ``device="gpu"`` computes float64 on
  the CPU and warns.
- Layout: ``_context`` (adapter, device, buffers, pipelines, uniforms packed
  by name from each shader's WGSL struct), ``_ce`` and ``_linear`` (one
  operation each, taking the same request as the CPU backend, with targets,
  scales and the reduction from the core's target plan), ``shaders/``.
- Transfers: ``linear_cross_entropy`` uploads the rows, targets and scales
  once, copies chunks on the device, submits once (once per chunk with
  probability targets) and reads losses and gradients back once.
  ``cross_entropy`` does one upload and one read-back per slab of logits that
  fits the adapter's ``max_storage_buffer_binding_size`` (one slab unless the
  logits are larger). Sums over samples (the reductions) are done on the host
  in float64, in order.
- ``device="auto"`` picks the GPU only for problems large enough to pay for
  the transfers (``AUTO_MIN_ELEMENTS`` logits, or ``AUTO_MIN_FLOPS`` for
  linear_cross_entropy) and only when an adapter other than a CPU emulation
  (lavapipe/llvmpipe) is present; else the CPU.
"""

from __future__ import annotations

from typing import Dict

from ._context import GpuUnavailable, context
from ._linear import ResidentWeight

AUTO_MIN_ELEMENTS = 1 << 24
AUTO_MIN_FLOPS = 1 << 34

__all__ = ["is_available", "adapter_info", "GpuUnavailable", "ResidentWeight"]


def is_available() -> bool:
    """True when wgpu-py is installed and a WebGPU adapter can be opened."""
    try:
        context()
        return True
    except GpuUnavailable:
        return False


def adapter_info() -> Dict[str, object]:
    """The adapter's description (vendor, device, adapter_type, backend_type,
    ...) and the limits that matter here. Raises GpuUnavailable without one."""
    ctx = context()
    info: Dict[str, object] = dict(ctx.info)
    info["max_storage_buffer_binding_size"] = ctx.max_binding
    info["max_buffer_size"] = int(ctx.limits["max-buffer-size"])
    info["features"] = sorted(str(f) for f in ctx.adapter.features)
    return info


def _is_software() -> bool:
    ctx = context()
    text = " ".join(str(v) for v in ctx.info.values()).lower()
    return "llvmpipe" in text or "lavapipe" in text or str(ctx.info.get("adapter_type", "")).lower() == "cpu"


def use_gpu(device: str, work: float, threshold: float) -> bool:
    """Resolves ``device`` ("cpu", "gpu", "auto") for a problem of ``work``."""
    if device == "cpu":
        return False
    if device == "gpu":
        context()  # raises GpuUnavailable with the reason
        return True
    if work < threshold:
        return False
    try:
        return not _is_software()
    except GpuUnavailable:
        return False
