"""What this node can run natively: the capability probe the sweep controller runs on each
pool's node before sampling, to prune precisions the node would refuse or emulate.

Every answer comes from the same place the trial looks: ``resolve_device_config`` for the
device, ``resolve_precision`` for what is refused (so the probe and the trial cannot
disagree), the backend's ``native_dtypes`` for what is native.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from omninet.hardware.base import DTYPES, INT8_PRECISIONS
from omninet.hardware.cpu import cpu_flags, isa_level
from omninet.hardware.device import resolve_backend
from omninet.hardware.precision import resolve_precision
from omninet.hardware.quantize import int8_engines

__all__ = ["probe_capabilities", "CPU_FLAGS"]

# The ISA features that decide precision speed on a CPU (names as in /proc/cpuinfo).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
             "amx_fp16")
_PROBED = ("fp32", "bf16", "fp16", "mixed", *INT8_PRECISIONS, "qat_int8")
_TORCH_NAMES = {"avx512": "avx512f"}  # torch.cpu probe name -> /proc/cpuinfo name
# /proc/cpuinfo name -> the cpu_flags feature whose ISA level brings it (OMNINET_CPU_ISA caps both)
_LEVEL_OF = {"avx2": "avx2", "avx512f": "avx512", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
             "avx512_fp16": "amx_tile", "amx_tile": "amx_tile", "amx_bf16": "amx_tile", "amx_int8": "amx_tile",
             "amx_fp16": "amx_fp16"}


def _host_cpu_flags() -> dict[str, bool]:
    """CPU_FLAGS from /proc/cpuinfo, capped by ``OMNINET_CPU_ISA``; elsewhere, what torch's own
    ISA probes report."""
    try:
        m = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        m = None
    if m:
        present, allowed = set(m.group(1).split()), isa_level()
        return {f: f in present and (allowed is None or _LEVEL_OF[f] in allowed) for f in CPU_FLAGS}
    torch_view = {_TORCH_NAMES.get(k, k): v for k, v in cpu_flags().items()}
    return {f: bool(torch_view.get(f, False)) for f in CPU_FLAGS}


def _int8_engines(backend) -> dict[str, str]:
    """{int8 variant: the engine its inference would use here}, without the variants that have
    none ('int8' needs a quantized engine such as fbgemm/onednn/x86; 'int8_token' needs
    torch._int_mm on CPU); empty off CPU."""
    if backend.name != "cpu":
        return {}
    try:
        engines = int8_engines()
    except ValueError:  # OMNINET_INT8_ENGINE names an engine that is not here: the trial refuses, in one line
        return {}
    if not [e for e in torch.backends.quantized.supported_engines if e != "none"]:
        engines.pop("int8")
    if not hasattr(torch, "_int_mm"):
        engines.pop("int8_token")
    return engines


def probe_capabilities(device: str = "auto") -> dict:
    """A JSON-able summary of what ``device`` runs natively: ``native_precisions`` (fast for
    training and inference; int8 and qat_int8 for int8 inference, where an int8 engine exists), ``refused``
    (precision -> the one-line reason the trial would raise), memory, CPU model and flags."""
    backend, index = resolve_backend(device)
    refused: dict[str, str] = {}
    for name in _PROBED:
        try:
            resolve_precision(name, backend, training=name not in INT8_PRECISIONS)
        except ValueError as exc:
            refused[name] = str(exc)
    engines = _int8_engines(backend)
    for name in INT8_PRECISIONS + ("qat_int8",):
        if engines.get(name if name != "qat_int8" else "int8") is None and name not in refused:
            refused[name] = f"precision={name!r}: no int8 engine for it in this torch build; use 'fp32'"
    native_low = {n for n in ("bf16", "fp16") if n not in refused and DTYPES[n] in backend.native_dtypes()}
    native = ({"fp32"} - set(refused)) | native_low
    if native_low and "mixed" not in refused:
        native.add("mixed")
    native |= set(engines) | ({"qat_int8"} if "int8" in engines else set())
    return {
        "backend": backend.name,
        "device": str(backend.torch_device(index)),
        "device_name": backend.device_name(index),
        "native_precisions": [n for n in _PROBED if n in native],
        "refused": refused,
        "int8_engine": engines.get("int8"),
        "int8_engines": engines,
        "memory_capacity_mb": round(backend.memory_stats(index).capacity / 2**20, 1),
        "cpu_model": resolve_backend("cpu")[0].device_name(),
        "cpu_flags": _host_cpu_flags(),
        "torch": torch.__version__,
    }
