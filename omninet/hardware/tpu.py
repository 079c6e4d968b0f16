"""Google TPUs through PyTorch/XLA (``torch_xla``, imported lazily: only when asked whether a
TPU is here and the package is installed). Device type ``xla``; Ray resource ``TPU``.
The peak is the runtime's ``peak_bytes_used`` (``xm.get_memory_info``, torch_xla >= 2.5) where
it reports one, else the largest ``bytes_used`` seen since the last reset."""

from __future__ import annotations

import torch

from omninet.hardware.base import Backend, MemoryStats, lazy_import, register_backend


def _xm():
    return lazy_import("torch_xla.core.xla_model")


def _runtime():
    return lazy_import("torch_xla.runtime")


PEAK_KEY = "peak_bytes_used"  # the key xm.get_memory_info uses for the runtime's high-water mark


@register_backend
class TPUBackend(Backend):
    name = "tpu"
    device_type = "xla"
    ray_resource = "TPU"
    priority = 40
    _peak = 0

    def is_available(self) -> bool:
        xr = _runtime()
        if xr is None:
            return False
        try:
            return xr.device_type() == "TPU"
        except RuntimeError:  # no PJRT device configured
            return False

    def device_count(self) -> int:
        return int(_runtime().addressable_device_count()) if self.is_available() else 0

    def device_name(self, index: int = 0) -> str:
        return f"{_runtime().device_type()}:{index}"

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16)  # the MXU is bf16; fp16 is not a native TPU type

    def synchronize(self, index: int = 0) -> None:
        _xm().wait_device_ops()

    def memory_stats(self, index: int = 0) -> MemoryStats:
        info = _xm().get_memory_info(self.torch_device(index))
        if "bytes_used" in info:  # torch_xla >= 2.5
            used, cap = int(info["bytes_used"]), int(info["bytes_limit"])
        else:  # older releases report kilobytes free/total
            cap = int(info["kb_total"]) * 1024
            used = cap - int(info["kb_free"]) * 1024
        TPUBackend._peak = max(TPUBackend._peak, used, int(info.get(PEAK_KEY, used)))
        return MemoryStats(in_use=used, peak=TPUBackend._peak, capacity=cap)

    def reset_peak_memory(self, index: int = 0) -> None:
        TPUBackend._peak = 0

    def default_precision(self) -> str:
        return "bf16"
