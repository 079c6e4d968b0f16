"""Where a model runs: the typed ``DeviceConfig``, device-name resolution and the ``Placement``
(device + resolved precision policy) that applies them to a built model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from omninet.config import ConfigBase
from omninet.hardware.base import BACKENDS, INT8_PRECISIONS, PRECISIONS, Backend, available_backends, get_backend
from omninet.hardware.guard import attach_memory_guard
from omninet.hardware.mixed import MixedPrecisionPlan, apply_precision, plan_mixed_precision, set_block_precision
from omninet.hardware.precision import PrecisionPolicy, resolve_precision
from omninet.hardware.quantize import prepare_qat, quantize_int8

__all__ = ["DeviceConfig", "DEVICE_CONFIG_KEYS", "as_device_config", "resolve_backend", "Placement",
           "resolve_device_config"]


@dataclass(kw_only=True)
class DeviceConfig(ConfigBase):
    """Which device a model runs on and how: ``device`` 'auto' or a backend name with an optional
    ':index' ('cpu', 'cuda:1', 'gpu', ...), ``precision`` one of ``PRECISIONS`` ('auto': the
    device's fast native type), ``memory_threshold`` the fraction of the limiting memory above
    which the model's forward adapts (``omninet.hardware.guard``; None, the default: it never
    adapts, and estimates check against ``DEFAULT_MEMORY_FRACTION`` of capacity).
    Checked against this machine only by ``resolve_device_config``. Subclass it to add fields (keep ``validate`` calling ``super().validate()``)."""

    device: str = "auto"
    precision: str = "fp32"
    memory_threshold: float | None = None

    def __post_init__(self) -> None:
        # These three keep the wording users of the device_config dict have always seen, so
        # they are checked before ConfigBase's generic type checks.
        if not isinstance(self.device, str):
            raise ValueError(f"device_config['device'] must be a string such as 'auto', 'cpu' or 'cuda:0', got {self.device!r}")
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS:
            raise ValueError(f"device_config['precision']={self.precision!r}; use one of {', '.join(map(repr, PRECISIONS))}")
        t = self.memory_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1):
            raise ValueError(f"device_config['memory_threshold'] must be a fraction in (0, 1], got {t!r}; "
                             "use e.g. 0.85, or None to never adapt")
        super().__post_init__()

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, _where: str | None = None):
        where = _where or "device_config"
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a dict, got {type(data).__name__}")
        keys = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {keys}")
        return cls(**data)


DEFAULT_MEMORY_FRACTION = 0.9  # of capacity: what estimates are checked against without a memory_threshold
DEVICE_CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(DeviceConfig))
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
    ``memory_threshold`` for the monitor (None: none), the ``backend`` and the precision ``policy``."""

    device: torch.device
    precision: str
    memory_threshold: float | None
    backend: Backend = field(default_factory=lambda: get_backend("cpu"))
    policy: PrecisionPolicy | None = None
    plan: MixedPrecisionPlan | None = None

    def apply(self, module: nn.Module, *, calibration: dict | None = None, error_budget: float = 1e-2) -> nn.Module:
        """Moves ``module`` to the device and applies the precision: bf16/fp16 put the whole
        module under autocast (hooks; fp32 master weights), 'mixed' measures a layer-wise plan
        on the ``calibration`` batch (required), 'int8'/'int8_token'/'int8_weight' quantize Linear layers in place,
        'qat_int8' swaps Linear layers for fake-quantized ones (train, then ``convert_qat``).
        With a ``memory_threshold`` the forward then consults a memory monitor
        (``omninet.hardware.guard.attach_memory_guard``)."""
        module = self._apply_precision(module.to(self.device), calibration, error_budget)
        if self.memory_threshold is not None:
            attach_memory_guard(module, memory_threshold=self.memory_threshold, backend=self.backend, plan=self.plan,
                                low_dtype="native")
        return module

    def _apply_precision(self, module: nn.Module, calibration: dict | None, error_budget: float) -> nn.Module:
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
        elif policy.name in INT8_PRECISIONS:
            module = quantize_int8(module, policy.name, inplace=True)
        elif policy.name == "qat_int8":
            module = prepare_qat(module)
        return module

    def describe(self) -> dict:
        out = {"device": str(self.device), "device_name": self.backend.device_name(), "backend": self.backend.name,
               "ray_resource": self.backend.ray_resource, "memory_threshold": self.memory_threshold}
        out.update(self.policy.to_dict() if self.policy else {"precision": self.precision})
        return out


def as_device_config(device_config: DeviceConfig | dict | None) -> DeviceConfig:
    """A DeviceConfig (subclasses pass through), a dict of its fields, or None (the defaults)."""
    if device_config is None:
        return DeviceConfig()
    if isinstance(device_config, DeviceConfig):
        return device_config
    if not isinstance(device_config, dict):
        raise ValueError(f"device_config must be a DeviceConfig or a dict, got {type(device_config).__name__}")
    return DeviceConfig.from_dict(device_config)


def resolve_device_config(device_config: DeviceConfig | dict, *, training: bool = False) -> Placement:
    """A ``DeviceConfig`` (or a dict of its fields: ``{'device': 'auto'|name[:index], 'precision':
    'fp32'|'bf16'|'fp16'|'mixed'|'int8'|'qat_int8'|'auto', 'memory_threshold': fraction or None}``) ->
    Placement, checked against this machine. Defaults: auto device, fp32, no threshold."""
    cfg = as_device_config(device_config)
    backend, index = resolve_backend(cfg.device)
    policy = resolve_precision(cfg.precision, backend, training=training)
    return Placement(backend.torch_device(index), policy.name, cfg.memory_threshold, backend, policy)
