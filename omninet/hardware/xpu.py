"""Intel GPUs (Data Center GPU Max, Arc) through ``torch.xpu`` (upstream since torch 2.4).
Ray schedules Intel GPUs as ``GPU``."""

from __future__ import annotations

import torch

from omninet.hardware.base import Backend, MemoryStats, register_backend


@register_backend
class XPUBackend(Backend):
    name = "xpu"
    device_type = "xpu"
    ray_resource = "GPU"
    priority = 30

    def is_available(self) -> bool:
        return hasattr(torch, "xpu") and bool(torch.xpu.is_available())

    def device_count(self) -> int:
        return torch.xpu.device_count() if self.is_available() else 0

    def device_name(self, index: int = 0) -> str:
        return torch.xpu.get_device_name(index)

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def synchronize(self, index: int = 0) -> None:
        torch.xpu.synchronize(index)

    def memory_stats(self, index: int = 0) -> MemoryStats:
        return MemoryStats(in_use=torch.xpu.memory_allocated(index), peak=torch.xpu.max_memory_allocated(index),
                           capacity=torch.xpu.get_device_properties(index).total_memory)

    def reset_peak_memory(self, index: int = 0) -> None:
        torch.xpu.reset_peak_memory_stats(index)

    def default_precision(self) -> str:
        return "bf16"
