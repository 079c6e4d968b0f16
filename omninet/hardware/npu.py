"""Huawei Ascend NPUs through ``torch_npu`` (imported lazily; importing it registers the
``torch.npu`` namespace and the ``npu`` device type). Ray resource ``NPU``. bf16 on Ascend
910B and later; fp16 with loss scaling on 910A/310."""

from __future__ import annotations

import torch

from omninet.hardware.base import Backend, MemoryStats, lazy_import, register_backend


def _npu():
    if lazy_import("torch_npu") is None:
        return None
    return getattr(torch, "npu", None)


@register_backend
class NPUBackend(Backend):
    name = "npu"
    device_type = "npu"
    ray_resource = "NPU"
    priority = 40

    def is_available(self) -> bool:
        npu = _npu()
        return npu is not None and bool(npu.is_available())

    def device_count(self) -> int:
        return _npu().device_count() if self.is_available() else 0

    def device_name(self, index: int = 0) -> str:
        return _npu().get_device_name(index)

    def bf16_supported(self) -> bool:
        probe = getattr(_npu(), "is_bf16_supported", None)
        if probe is not None:
            return bool(probe())
        return "910B" in self.device_name() or "910_9" in self.device_name()

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16) if self.bf16_supported() else (torch.float32, torch.float16)

    def synchronize(self, index: int = 0) -> None:
        _npu().synchronize(index)

    def memory_stats(self, index: int = 0) -> MemoryStats:
        npu = _npu()
        return MemoryStats(in_use=npu.memory_allocated(index), peak=npu.max_memory_allocated(index),
                           capacity=npu.get_device_properties(index).total_memory)

    def reset_peak_memory(self, index: int = 0) -> None:
        _npu().reset_peak_memory_stats(index)

    def default_precision(self) -> str:
        return "bf16" if self.bf16_supported() else "fp16"
