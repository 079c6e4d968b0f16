"""Hardware placement (minimal core version; the backends issue extends it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Placement:
    device: torch.device
    precision: str
    memory_threshold: float

    def apply(self, module: torch.nn.Module) -> torch.nn.Module:
        return module.to(self.device)


def _best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device_config(device_config: dict) -> Placement:
    device = device_config.get("device", "auto")
    precision = device_config.get("precision", "fp32")
    threshold = device_config.get("memory_threshold", 0.9)
    if precision not in ("auto", "fp32"):
        raise ValueError(f"device_config['precision']={precision!r} is not supported yet; use 'fp32' or 'auto'")
    if not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"device_config['memory_threshold'] must be a fraction in (0, 1], got {threshold!r}")
    if device == "auto":
        dev = _best_device()
    else:
        try:
            dev = torch.device(device)
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:
            raise ValueError(f"device_config['device']={device!r} is not available here ({exc}); use 'auto' or 'cpu'") from None
    return Placement(dev, "fp32", float(threshold))
