"""NVIDIA GPUs through torch's CUDA build (``torch.version.hip is None``)."""

from __future__ import annotations

import torch

from omninet.hardware.base import Backend, MemoryStats, register_backend


class _TorchCudaAPI(Backend):
    """Shared by CUDA and ROCm: both are driven through ``torch.cuda``."""

    device_type = "cuda"
    ray_resource = "GPU"

    def _runtime_ok(self) -> bool:
        return bool(torch.cuda.is_available())

    def device_count(self) -> int:
        return torch.cuda.device_count() if self.is_available() else 0

    def device_name(self, index: int = 0) -> str:
        return torch.cuda.get_device_name(index)

    def synchronize(self, index: int = 0) -> None:
        torch.cuda.synchronize(index)

    def memory_stats(self, index: int = 0) -> MemoryStats:
        return MemoryStats(in_use=torch.cuda.memory_allocated(index), peak=torch.cuda.max_memory_allocated(index),
                           capacity=torch.cuda.get_device_properties(index).total_memory)

    def reset_peak_memory(self, index: int = 0) -> None:
        torch.cuda.reset_peak_memory_stats(index)


@register_backend
class CUDABackend(_TorchCudaAPI):
    name = "cuda"
    priority = 50

    def is_available(self) -> bool:
        return self._runtime_ok() and getattr(torch.version, "hip", None) is None

    def compute_capability(self, index: int = 0) -> tuple[int, int]:
        return tuple(torch.cuda.get_device_capability(index))

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        if self.compute_capability() >= (8, 0):  # Ampere+: bf16 tensor cores
            return (torch.float32, torch.bfloat16, torch.float16)
        return (torch.float32, torch.float16)  # pre-Ampere bf16 is emulated

    def default_precision(self) -> str:
        major, _ = self.compute_capability()
        if major >= 8:
            return "bf16"
        return "fp16" if major >= 7 else "fp32"  # Volta/Turing tensor cores are fp16; older: fp32
