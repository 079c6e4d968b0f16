"""The one table of accelerators: which Ray resource schedules onto which backends.

Derived from the registered backends (``Backend.ray_resource``), so a sweep pool's resource
('GPU', 'TPU', 'NPU') and the presence check on a worker node cannot disagree with the
backends: a 'GPU' pool is present on a node with CUDA, ROCm or an Intel XPU.
"""

from __future__ import annotations

from omninet.hardware import cpu, cuda, mps, npu, rocm, tpu, xpu  # noqa: F401  (register the backends first)
from omninet.hardware.base import BACKENDS, Backend

__all__ = ["ACCELERATOR_RESOURCES", "accelerator_resources", "backends_for_resource", "device_present"]


def accelerator_resources() -> tuple[str, ...]:
    """Ray resource names of the registered accelerator backends (every one but 'CPU')."""
    return tuple(dict.fromkeys(cls.ray_resource for cls in BACKENDS.values() if cls.ray_resource != "CPU"))


ACCELERATOR_RESOURCES: tuple[str, ...] = accelerator_resources()  # ('GPU', 'NPU', 'TPU') with the built-in backends


def backends_for_resource(resource: str) -> list[Backend]:
    """Every registered backend that Ray schedules with ``resource``, best first (present or not)."""
    found = [cls() for cls in BACKENDS.values() if cls.ray_resource == resource]
    return sorted(found, key=lambda b: -b.priority)


def device_present(resource: str | None) -> tuple[bool, str]:
    """Whether this node has a device for a pool needing ``resource`` (None: a CPU pool):
    (True, the device's name), or (False, a one-line reason)."""
    if resource is None:
        return True, "cpu"
    backends = backends_for_resource(resource)
    if not backends:
        known = ", ".join(accelerator_resources())
        return False, f"unknown accelerator {resource!r}; known Ray resources: {known} (or none for CPU)"
    for backend in backends:
        try:
            if backend.is_available() and backend.device_count() > 0:
                return True, backend.device_name()
        except Exception:  # a half-installed vendor stack means 'not here', not a crash on the worker
            continue
    return False, f"no {resource} device here: none of the {resource} backends ({', '.join(b.name for b in backends)}) is available"
