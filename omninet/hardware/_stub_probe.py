# TEMPORARY stand-in until the hardware-table branch lands (removed at merge).
from __future__ import annotations


def device_present(resource):
    from omninet.hardware.base import available_backends
    if resource is None:
        return True, "cpu"
    found = [b for b in available_backends() if b.ray_resource == resource]
    return (True, found[0].device_name()) if found else (False, f"no {resource} backend available")


def probe_capabilities(device="auto"):
    from omninet.hardware import resolve_backend, resolve_precision, cpu_flags
    backend, index = resolve_backend(device)
    native, refused = [], {}
    for p in ("fp32", "bf16", "fp16", "mixed", "int8"):
        try:
            resolve_precision(p, backend, training=p != "int8")
            native.append(p)
        except ValueError as exc:
            refused[p] = str(exc)
    return {"backend": backend.name, "device_name": backend.device_name(), "native_precisions": native,
            "refused": refused, "cpu_flags": cpu_flags()}
