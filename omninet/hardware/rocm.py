"""AMD GPUs through torch's HIP build: the same ``torch.cuda`` API and ``'cuda'`` device type,
distinguished by ``torch.version.hip``. Ray schedules them as ``GPU``."""

from __future__ import annotations

import torch

from omninet.hardware.base import register_backend
from omninet.hardware.cuda import _TorchCudaAPI


@register_backend
class ROCmBackend(_TorchCudaAPI):
    name = "rocm"
    priority = 50

    def is_available(self) -> bool:
        return self._runtime_ok() and getattr(torch.version, "hip", None) is not None

    def bf16_supported(self) -> bool:
        return bool(torch.cuda.is_bf16_supported())  # MI200 (gfx90a) and later

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16) if self.bf16_supported() else (torch.float32, torch.float16)

    def default_precision(self) -> str:
        return "bf16" if self.bf16_supported() else "fp16"
