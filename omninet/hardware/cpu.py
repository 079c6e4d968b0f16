"""Host CPU backend. Memory is the process's resident set against the host (or cgroup) limit;
the peak is Linux's ``VmHWM`` high-water mark, which ``reset_peak_memory`` resets by writing
``5`` to ``/proc/self/clear_refs`` (where that is not permitted, the peak is the largest value
seen by ``memory_stats`` since the reset)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import psutil
import torch

from omninet.hardware.base import Backend, MemoryStats, register_backend


# OMNINET_CPU_ISA=<level>: the features of a lesser x86 CPU that cpu_flags may report (it can
# only take features away). Each level is a CPU class the suite must pass on.
ISA_LEVELS = {
    "avx2": ("avx2",),  # e.g. AMD EPYC Zen 2/3, Intel Haswell..Comet Lake
    "avx512": ("avx2", "avx512", "avx512_vnni"),  # Intel Skylake-SP..Ice Lake: bf16 converted, not native
    "avx512_bf16": ("avx2", "avx512", "avx512_vnni", "avx512_bf16"),  # Intel Cooper Lake, AMD Zen 4/5
    "amx": ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_fp16"),  # Sapphire/Granite Rapids
}


def isa_level() -> tuple[str, ...] | None:
    """The features ``OMNINET_CPU_ISA`` allows, or None when it is unset (or empty)."""
    level = os.environ.get("OMNINET_CPU_ISA", "").strip().lower()
    if not level:
        return None
    if level not in ISA_LEVELS:
        raise ValueError(f"OMNINET_CPU_ISA={level!r} is not a CPU level; use one of {', '.join(ISA_LEVELS)}, or unset it")
    return ISA_LEVELS[level]


def cpu_flags() -> dict[str, bool]:
    """The ISA features PyTorch's CPU kernels dispatch on (torch.cpu._is_*_supported).

    ``OMNINET_CPU_ISA`` (``avx2``, ``avx512``, ``avx512_bf16`` or ``amx``; see ``ISA_LEVELS``)
    caps the answer to what a CPU of that level has, so that this machine is treated as that
    lesser CPU (native dtypes, the default precision, the sweep's probe), e.g.
    ``OMNINET_CPU_ISA=avx2 pytest`` runs the suite as an AVX2-only CPU would. It only removes
    features, and only from this answer: PyTorch's own kernels still use what the CPU has.
    Subprocesses and the Ray workers a driver starts inherit it with the environment; a cluster
    started elsewhere needs it set there. An unknown level is a ValueError."""
    probes = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
              "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
              "amx_fp16": "_is_amx_fp16_supported"}
    allowed = isa_level()
    out = {}
    for flag, fn in probes.items():
        probe = getattr(torch.cpu, fn, None)
        out[flag] = bool(probe()) if probe is not None and (allowed is None or flag in allowed) else False
    return out


def _status_kb(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def host_capacity() -> int:
    """Physical memory, or the cgroup v2 / v1 limit when a container sets a lower one."""
    total = psutil.virtual_memory().total
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


@register_backend
class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"
    ray_resource = "CPU"
    priority = 0
    _sampled_peak = 0

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def device_name(self, index: int = 0) -> str:
        try:
            m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
            if m:
                return m.group(1).strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()

    def torch_device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def native_bf16(self) -> bool:
        f = cpu_flags()
        return f["avx512_bf16"] or f["amx_tile"]

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        f = cpu_flags()
        dtypes = [torch.float32]
        if f["avx512_bf16"] or f["amx_tile"] or f["avx512"]:  # AVX512-F: oneDNN converts bf16 at vector speed
            dtypes.append(torch.bfloat16)
        if f["amx_fp16"]:
            dtypes.append(torch.float16)
        return tuple(dtypes)

    def native_dtypes(self) -> tuple[torch.dtype, ...]:
        """bf16 only with AVX512-BF16/AMX (plain AVX512 converts it), fp16 only with AMX-FP16."""
        f = cpu_flags()
        return tuple(d for d, ok in ((torch.float32, True), (torch.bfloat16, self.native_bf16()),
                                     (torch.float16, f["amx_fp16"])) if ok)

    def refuse_precision(self, precision: str) -> str | None:
        if precision == "fp16" and torch.float16 not in self.supported_dtypes():
            return ("fp16 on this CPU has no AMX-FP16 support: PyTorch falls back to scalar kernels (~100x slower); "
                    "use precision='bf16' (if the CPU has AVX512-BF16/AMX), 'int8' for inference, or 'fp32'")
        return super().refuse_precision(precision)

    def synchronize(self, index: int = 0) -> None:
        return None  # CPU ops are synchronous

    def memory_stats(self, index: int = 0) -> MemoryStats:
        rss = psutil.Process().memory_info().rss
        CPUBackend._sampled_peak = max(CPUBackend._sampled_peak, rss)
        hwm = _status_kb("VmHWM")
        peak = hwm if hwm is not None and CPUBackend._hwm_reset_works else CPUBackend._sampled_peak
        return MemoryStats(in_use=rss, peak=max(peak, rss), capacity=host_capacity())

    _hwm_reset_works = True

    def reset_peak_memory(self, index: int = 0) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            CPUBackend._hwm_reset_works = False
        CPUBackend._sampled_peak = psutil.Process().memory_info().rss

    def default_precision(self) -> str:
        return "bf16" if self.native_bf16() else "fp32"
