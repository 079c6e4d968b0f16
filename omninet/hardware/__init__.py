"""Hardware backends, precision and memory: passes applied to a built model.

Order of passes (torchtitan style; the model code never imports a vendor backend)::

    placement = resolve_device_config(DeviceConfig(device="auto", precision="auto"))  # or a dict of its fields
    model = placement.apply(model)                 # device, then precision (bf16/fp16 autocast hooks)
    plan = plan_mixed_precision(model, batch)      # precision='mixed': measured per-block sensitivity
    apply_precision(model, plan)
    monitor = MemoryMonitor(model, backend=placement.backend, plan=plan,
                            config=MonitorConfig(memory_threshold=0.9))
    # or, with device_config['memory_threshold'] set, placement.apply(model) attaches a guard:
    # the forward then adapts itself (micro-batches, low-precision blocks; omninet.hardware.guard)
    int8 = quantize_int8(model, "int8_token")      # CPU inference (post-training): int8 | int8_token | int8_weight
    prepare_qat(model); train(model); convert_qat(model)   # precision='qat_int8': quantization-aware
    export_onnx(model, "model.onnx", seq_len=512)   # LPU toolchains

Backends: cpu, cuda, rocm, xpu, mps, tpu (torch_xla, lazy), npu (torch_npu, lazy). LPU has no
PyTorch device: ``device='lpu'`` is refused with a pointer to ``export_onnx``.
"""

from __future__ import annotations

from omninet.hardware import cpu, cuda, mps, npu, rocm, tpu, xpu  # noqa: F401  (register the backends)
from omninet.hardware.base import (
    BACKENDS,
    DTYPES,
    INT8_PRECISIONS,
    PRECISIONS,
    Backend,
    MemoryStats,
    available_backends,
    get_backend,
    register_backend,
)
from omninet.hardware.cpu import cpu_flags
from omninet.hardware.device import (
    DEFAULT_MEMORY_FRACTION,
    DEVICE_CONFIG_KEYS,
    DeviceConfig,
    Placement,
    as_device_config,
    resolve_backend,
    resolve_device_config,
)
from omninet.hardware.lpu import export_onnx, onnx_available
from omninet.hardware.memory import estimate_memory_mb, max_batch_size, memory_breakdown
from omninet.hardware.mixed import (
    MixedPrecisionPlan,
    apply_precision,
    eligible_blocks,
    low_precision_blocks,
    measure_sensitivity,
    named_blocks,
    plan_mixed_precision,
    remove_precision,
    set_block_precision,
)
from omninet.hardware.guard import MemoryGuard, accumulate, attach_memory_guard, detach_memory_guard
from omninet.hardware.monitor import MemoryMonitor, MonitorConfig, memory_pressure
from omninet.hardware.precision import PrecisionPolicy, resolve_precision, training_step
from omninet.hardware.probe import probe_capabilities
from omninet.hardware.quantize import (
    Int8TokenLinear,
    Int8WeightOnlyLinear,
    convert_qat,
    int8_engine,
    int8_engines,
    prepare_qat,
    qat_modules,
    quantize_int8,
)
from omninet.hardware.table import ACCELERATOR_RESOURCES, backends_for_resource, device_present

__all__ = [
    "BACKENDS", "DTYPES", "PRECISIONS", "INT8_PRECISIONS", "int8_engines", "Int8TokenLinear", "Int8WeightOnlyLinear", "Backend", "MemoryStats", "available_backends", "get_backend",
    "register_backend", "cpu_flags", "resolve_backend", "Placement", "resolve_device_config", "PrecisionPolicy",
    "resolve_precision", "training_step", "MixedPrecisionPlan", "plan_mixed_precision", "measure_sensitivity",
    "apply_precision", "remove_precision", "low_precision_blocks", "eligible_blocks", "named_blocks", "set_block_precision",
    "MemoryMonitor", "MonitorConfig", "quantize_int8", "prepare_qat", "convert_qat", "qat_modules", "int8_engine", "estimate_memory_mb", "memory_breakdown",
    "max_batch_size", "export_onnx", "onnx_available", "DeviceConfig", "DEVICE_CONFIG_KEYS", "as_device_config",
    "ACCELERATOR_RESOURCES", "backends_for_resource", "MemoryGuard", "attach_memory_guard", "detach_memory_guard",
    "accumulate", "memory_pressure", "DEFAULT_MEMORY_FRACTION", "device_present", "probe_capabilities", "describe_backends",
]


def describe_backends() -> list[dict]:
    """Every registered backend's ``describe()``, present or not (what ``omninet info`` lists)."""
    return [cls().describe() for cls in BACKENDS.values()]
