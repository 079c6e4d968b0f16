"""The one interface every hardware backend implements, and the registry that finds them.

A backend answers, for one kind of device: is it here, how many, what is it called, which
``torch.device`` addresses it, which dtypes it computes in, how to synchronize, what its
memory looks like (in use, peak, capacity) and how to reset the peak, which Ray resource
schedules onto it, and which precision ``'auto'`` means on it.

Vendor modules (``torch_xla``, ``torch_npu``) are imported lazily, inside the methods that need
them, so ``import omninet`` never pulls them in; ``find_spec`` answers "is it installed" without
importing.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType

import torch

__all__ = ["Backend", "MemoryStats", "BACKENDS", "register_backend", "get_backend", "available_backends",
           "PRECISIONS", "INT8_PRECISIONS", "DTYPES", "lazy_import"]

# Precision names used everywhere in OmniNet (trial configs, sweeps, benchmark output).
# 'qat_int8': quantization-aware training (fake-quantized Linear layers), int8 for inference.
# INT8_PRECISIONS: post-training int8 variants for CPU inference (omninet.hardware.quantize):
# 'int8' dynamic per-tensor activations (fast), 'int8_token' per-token activations (keeps
# quality), 'int8_weight' weight-only (keeps quality, saves weight memory).
INT8_PRECISIONS = ("int8", "int8_token", "int8_weight")
PRECISIONS = ("fp32", "bf16", "fp16", "mixed", *INT8_PRECISIONS, "qat_int8", "auto")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class MemoryStats:
    """Bytes. ``in_use``: what this process holds now (accelerators: allocated tensors; host:
    resident set). ``peak``: the most held since the last ``reset_peak_memory``. ``capacity``:
    what one device (or this host / cgroup) offers."""

    in_use: int
    peak: int
    capacity: int

    @property
    def fraction(self) -> float:
        return self.in_use / self.capacity if self.capacity else 0.0

    def as_mb(self) -> dict[str, float]:
        return {k: getattr(self, k) / 2**20 for k in ("in_use", "peak", "capacity")}


def lazy_import(name: str) -> ModuleType | None:
    """Imports ``name`` only if it is installed; None otherwise (never raises ImportError)."""
    try:
        if importlib.util.find_spec(name.split(".")[0]) is None:
            return None
        return importlib.import_module(name)
    except (ImportError, ValueError):
        return None


class Backend(ABC):
    """One kind of device. Subclasses are stateless apart from caches; instances are cheap."""

    name: str = ""  # 'cpu', 'cuda', ...
    device_type: str = ""  # torch device type ('cuda' for ROCm too, 'xla' for TPU)
    ray_resource: str = "CPU"  # the Ray resource that schedules a worker onto this device
    priority: int = 0  # 'auto' picks the available backend with the highest priority

    @abstractmethod
    def is_available(self) -> bool: ...

    @abstractmethod
    def device_count(self) -> int: ...

    @abstractmethod
    def device_name(self, index: int = 0) -> str: ...

    def torch_device(self, index: int = 0) -> torch.device:
        return torch.device(self.device_type, index)

    @abstractmethod
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        """Floating dtypes this device computes in at full speed (no scalar fallbacks)."""

    def native_dtypes(self) -> tuple[torch.dtype, ...]:
        """Dtypes the hardware itself computes in (not converted on the fly); what the sweep's
        capability probe calls native. Accelerators: the same as ``supported_dtypes``."""
        return self.supported_dtypes()

    @abstractmethod
    def synchronize(self, index: int = 0) -> None: ...

    @abstractmethod
    def memory_stats(self, index: int = 0) -> MemoryStats: ...

    @abstractmethod
    def reset_peak_memory(self, index: int = 0) -> None: ...

    @abstractmethod
    def default_precision(self) -> str:
        """What ``precision='auto'`` resolves to: 'bf16', 'fp16' or 'fp32'."""

    def needs_grad_scaler(self, precision: str) -> bool:
        """fp16 has a narrow exponent range: gradients underflow without loss scaling."""
        return precision == "fp16"

    def refuse_precision(self, precision: str) -> str | None:
        """A one-line reason this device must not run ``precision``, or None if it may."""
        dtype = DTYPES.get(precision)
        if dtype is not None and dtype not in self.supported_dtypes():
            return (f"{precision} is not supported on {self.name} ({self.device_name()}); "
                    f"use one of {', '.join(n for n, d in DTYPES.items() if d in self.supported_dtypes())} or 'auto'")
        return None

    def describe(self) -> dict:
        """A JSON-able summary (for trial records and logs)."""
        out = {"backend": self.name, "available": self.is_available(), "ray_resource": self.ray_resource}
        if out["available"]:
            out.update(device=str(self.torch_device()), device_name=self.device_name(), device_count=self.device_count(),
                       default_precision=self.default_precision(),
                       dtypes=[str(d).replace("torch.", "") for d in self.supported_dtypes()])
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    if not cls.name or cls.name in BACKENDS:
        raise ValueError(f"backend {cls.__name__} needs a unique name, got {cls.name!r}")
    BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str) -> Backend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None


def available_backends() -> list[Backend]:
    """The backends present here, best first (the first one is what ``device='auto'`` picks)."""
    found = [cls() for cls in BACKENDS.values()]
    return sorted((b for b in found if b.is_available()), key=lambda b: -b.priority)
