"""Apple silicon GPUs through Metal (``torch.mps``). One device; no Ray accelerator resource
(a Mac node is scheduled by ``CPU``). MPS keeps no peak counter, so the peak is the largest
value seen by ``memory_stats`` since the last reset."""

from __future__ import annotations

import platform

import torch

from omninet.hardware.base import Backend, MemoryStats, register_backend


@register_backend
class MPSBackend(Backend):
    name = "mps"
    device_type = "mps"
    ray_resource = "CPU"
    priority = 20
    _peak = 0

    def is_available(self) -> bool:
        return bool(torch.backends.mps.is_available())

    def device_count(self) -> int:
        return 1 if self.is_available() else 0

    def device_name(self, index: int = 0) -> str:
        return f"Apple {platform.machine()} GPU (MPS)"

    def torch_device(self, index: int = 0) -> torch.device:
        return torch.device("mps")

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.float16, torch.bfloat16)  # bf16 needs macOS 14+; fp16 is the fast path

    def synchronize(self, index: int = 0) -> None:
        torch.mps.synchronize()

    def memory_stats(self, index: int = 0) -> MemoryStats:
        used = torch.mps.current_allocated_memory()
        MPSBackend._peak = max(MPSBackend._peak, used)
        return MemoryStats(in_use=used, peak=MPSBackend._peak, capacity=torch.mps.recommended_max_memory())

    def reset_peak_memory(self, index: int = 0) -> None:
        MPSBackend._peak = torch.mps.current_allocated_memory()

    def default_precision(self) -> str:
        return "fp16"
