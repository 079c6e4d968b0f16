"""Hardware backends, precision and memory: passes applied to a built model.

Order of passes (torchtitan style; the model code never imports a vendor backend)::

    placement = resolve_device_config({"device": "auto", "precision": "auto", "memory_threshold": 0.9})
    model = placement.apply(model)                 # device, then precision (bf16/fp16 autocast hooks)
    plan = plan_mixed_precision(model, batch)      # precision='mixed': measured per-block sensitivity
    apply_precision(model, plan)
    monitor = MemoryMonitor(model, backend=placement.backend, plan=plan,
                            config=MonitorConfig(memory_threshold=0.9))
    int8 = quantize_int8(model)                    # CPU inference
    export_onnx(model, "model.onnx", seq_len=512)   # LPU toolchains

Backends: cpu, cuda, rocm, xpu, mps, tpu (torch_xla, lazy), npu (torch_npu, lazy). LPU has no
PyTorch device: ``device='lpu'`` is refused with a pointer to ``export_onnx``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from omninet.hardware import cpu, cuda, mps, npu, rocm, tpu, xpu  # noqa: F401  (register the backends)
from omninet.hardware.base import (
    BACKENDS,
    DTYPES,
    PRECISIONS,
    Backend,
    MemoryStats,
    available_backends,
    get_backend,
    register_backend,
)
from omninet.hardware.cpu import cpu_flags
from omninet.hardware.lpu import export_onnx, onnx_available
from omninet.hardware.memory import estimate_memory_mb, max_batch_size, memory_breakdown
from omninet.hardware.mixed import (
    MixedPrecisionPlan,
    apply_precision,
    low_precision_blocks,
    measure_sensitivity,
    named_blocks,
    plan_mixed_precision,
    remove_precision,
    set_block_precision,
)
from omninet.hardware.monitor import MemoryMonitor, MonitorConfig
from omninet.hardware.precision import PrecisionPolicy, resolve_precision, training_step
from omninet.hardware.quantize import int8_engine, quantize_int8

__all__ = [
    "BACKENDS", "DTYPES", "PRECISIONS", "Backend", "MemoryStats", "available_backends", "get_backend",
    "register_backend", "cpu_flags", "resolve_backend", "Placement", "resolve_device_config", "PrecisionPolicy",
    "resolve_precision", "training_step", "MixedPrecisionPlan", "plan_mixed_precision", "measure_sensitivity",
    "apply_precision", "remove_precision", "low_precision_blocks", "named_blocks", "set_block_precision",
    "MemoryMonitor", "MonitorConfig", "quantize_int8", "int8_engine", "estimate_memory_mb", "memory_breakdown",
    "max_batch_size", "export_onnx", "onnx_available",
]

DEVICE_CONFIG_KEYS = ("device", "precision", "memory_threshold")
_ALIASES = {"gpu": None, "xla": "tpu", "hip": "rocm"}  # 'gpu': whichever GPU backend is present


def _present() -> str:
    return ", ".join(f"{b.name} ({b.device_name()})" for b in available_backends())


def resolve_backend(device: str) -> tuple[Backend, int]:
    """'auto' | a backend name ('cpu', 'cuda', 'rocm', 'xpu', 'mps', 'tpu', 'npu', 'gpu') with an
    optional ':index' -> (backend, index). Absent devices raise ValueError listing those present."""
    if not isinstance(device, str):
        raise ValueError(f"device_config['device'] must be a string such as 'auto', 'cpu' or 'cuda:0', got {device!r}")
    if device == "auto":
        return available_backends()[0], 0
    name, _, idx = device.partition(":")
    if name == "lpu":
        raise ValueError("device 'lpu': LPUs have no PyTorch device; export the model with "
                         "omninet.hardware.export_onnx(model, path, seq_len=...) and compile it with the LPU toolchain")
    if not idx.isdigit() and idx:
        raise ValueError(f"device {device!r}: the index after ':' must be an integer, e.g. 'cuda:0'")
    name = _ALIASES.get(name, name)
    if name is None:  # 'gpu'
        gpus = [b for b in available_backends() if b.ray_resource == "GPU"]
        if not gpus:
            raise ValueError(f"device {device!r}: no GPU is present; available: {_present()}")
        backend = gpus[0]
    elif name not in BACKENDS:
        raise ValueError(f"device {device!r} is not a known backend ({', '.join(BACKENDS)}, or 'auto')")
    else:
        backend = get_backend(name)
        if not backend.is_available():
            raise ValueError(f"device {device!r} is not available here; available: {_present()}. Use 'auto' or one of those")
    index = int(idx or 0)
    if index >= backend.device_count():
        raise ValueError(f"device {device!r}: only {backend.device_count()} {backend.name} device(s) here (indices from 0)")
    return backend, index


@dataclass
class Placement:
    """Where and how a model runs: ``device``, the resolved ``precision`` name, the
    ``memory_threshold`` for the monitor, the ``backend`` and the precision ``policy``."""

    device: torch.device
    precision: str
    memory_threshold: float
    backend: Backend = field(default_factory=lambda: get_backend("cpu"))
    policy: PrecisionPolicy | None = None
    plan: MixedPrecisionPlan | None = None

    def apply(self, module: nn.Module, *, calibration: dict | None = None, error_budget: float = 1e-2) -> nn.Module:
        """Moves ``module`` to the device and applies the precision: bf16/fp16 put the whole
        module under autocast (hooks; fp32 master weights), 'mixed' measures a layer-wise plan
        on the ``calibration`` batch (required), 'int8' quantizes Linear layers in place."""
        module = module.to(self.device)
        policy = self.policy
        if policy is None or policy.name == "fp32":
            return module
        if policy.name in ("bf16", "fp16"):
            set_block_precision(module, policy.compute_dtype, self.device.type)
        elif policy.name == "mixed":
            if calibration is None:
                raise ValueError("precision='mixed' measures each block's sensitivity: call placement.apply(model, "
                                 "calibration={...model inputs...}), or use precision 'auto'/'bf16'")
            self.plan = plan_mixed_precision(module, calibration, dtype=policy.compute_dtype, error_budget=error_budget)
            self.plan.log()
            apply_precision(module, self.plan)
        elif policy.name == "int8":
            module = quantize_int8(module, inplace=True)
        return module

    def describe(self) -> dict:
        out = {"device": str(self.device), "device_name": self.backend.device_name(), "backend": self.backend.name,
               "ray_resource": self.backend.ray_resource, "memory_threshold": self.memory_threshold}
        out.update(self.policy.to_dict() if self.policy else {"precision": self.precision})
        return out


def resolve_device_config(device_config: dict, *, training: bool = False) -> Placement:
    """``{'device': 'auto'|name[:index], 'precision': 'fp32'|'bf16'|'fp16'|'mixed'|'int8'|'auto',
    'memory_threshold': fraction}`` -> Placement. Defaults: auto device, fp32, 0.9."""
    if not isinstance(device_config, dict):
        raise ValueError(f"device_config must be a dict, got {type(device_config).__name__}")
    unknown = sorted(set(device_config) - set(DEVICE_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"device_config: unknown key(s) {unknown}; valid keys are {list(DEVICE_CONFIG_KEYS)}")
    threshold = device_config.get("memory_threshold", 0.9)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"device_config['memory_threshold'] must be a fraction in (0, 1], got {threshold!r}")
    precision = device_config.get("precision", "fp32")
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"device_config['precision']={precision!r}; use one of {', '.join(map(repr, PRECISIONS))}")
    backend, index = resolve_backend(device_config.get("device", "auto"))
    policy = resolve_precision(precision, backend, training=training)
    return Placement(backend.torch_device(index), policy.name, float(threshold), backend, policy)
