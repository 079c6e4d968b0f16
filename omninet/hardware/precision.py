"""Precision policy: what ``precision='auto'|'fp32'|'bf16'|'fp16'|'mixed'|'int8'|...`` means on a
backend, and the training step that honours it.

Decision table for ``'auto'`` (``Backend.default_precision``):

============================  =========================================
backend                       auto
============================  =========================================
CUDA sm80+ (Ampere, Hopper)   bf16
CUDA sm70/sm75                fp16 + GradScaler
CUDA < sm70                   fp32
ROCm MI200+ / other ROCm      bf16 / fp16 + GradScaler
TPU, XPU                      bf16
NPU 910B+ / 910A              bf16 / fp16 + GradScaler
MPS                           fp16 + GradScaler
CPU with AVX512-BF16 or AMX   bf16
other CPUs                    fp32
============================  =========================================

fp16 on a CPU without AMX-FP16 is refused (scalar fallback kernels, ~100x slower).
Low precision always runs under ``torch.autocast``: parameters stay fp32 (the master
weights), matmuls run in the low dtype, so weights and activations always agree in dtype.
``mixed`` is the layer-wise plan of ``omninet.hardware.mixed`` (autocast per block);
``int8``, ``int8_token`` and ``int8_weight`` quantize Linear layers to int8 for CPU inference
after training (dynamic per-tensor activations, dynamic per-token activations, weight-only;
``omninet.hardware.quantize``);
``qat_int8`` trains in fp32 with fake-quantized Linear layers (per-channel int8 weights,
``omninet.hardware.quantize.prepare_qat``) and converts them to int8 for inference (CPU).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from omninet.hardware.base import DTYPES, INT8_PRECISIONS, PRECISIONS, Backend

__all__ = ["PrecisionPolicy", "resolve_precision", "training_step"]

_INT8_WHAT = {"int8": "int8 Linear layers, dynamic per-tensor activations",
              "int8_token": "int8 Linear layers, dynamic per-token activations",
              "int8_weight": "int8 weight-only Linear layers"}


@dataclass(frozen=True)
class PrecisionPolicy:
    """A resolved precision. ``compute_dtype``: the dtype matmuls run in (for 'mixed', the
    dtype of its low-precision blocks; for 'fp32'/'int8', float32). ``grad_scaler``: whether
    training needs loss scaling (fp16). ``reason``: why, for logs and trial records."""

    name: str
    compute_dtype: torch.dtype
    device_type: str
    grad_scaler: bool
    reason: str

    @property
    def low_precision(self) -> bool:
        return self.compute_dtype != torch.float32

    def autocast(self):
        """The context a whole forward runs in: autocast for uniform bf16/fp16, nothing for
        fp32 and int8, nothing for 'mixed' (its blocks enter autocast themselves)."""
        if self.name in ("bf16", "fp16"):
            return torch.autocast(self.device_type, dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def make_grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.grad_scaler else None

    def to_dict(self) -> dict:
        return {"precision": self.name, "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
                "grad_scaler": self.grad_scaler, "reason": self.reason}


def resolve_precision(requested: str, backend: Backend, *, training: bool = False,
                      mixed_dtype: str | None = None) -> PrecisionPolicy:
    """Turns a requested precision into a policy for ``backend``; ValueError (one line, with
    the fix) when the device cannot run it. ``mixed_dtype`` picks the low dtype of 'mixed'
    (default: the backend's auto precision)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision={requested!r} is not known; use one of {', '.join(map(repr, PRECISIONS))}")
    dev = backend.device_type
    if requested == "auto":
        name = backend.default_precision()
        why = f"auto on {backend.name} ({backend.device_name()}): {_auto_reason(backend, name)}"
        return PrecisionPolicy(name, DTYPES[name], dev, training and backend.needs_grad_scaler(name), why)
    if requested in INT8_PRECISIONS:
        if backend.name != "cpu":
            raise ValueError(f"precision={requested!r} (int8 Linear layers) runs on CPU only, not {backend.name}; "
                             "use device='cpu' or precision 'auto'")
        if training:
            raise ValueError(f"precision={requested!r} is for inference; train in 'fp32'/'bf16'/'auto' and quantize afterwards")
        return PrecisionPolicy(requested, torch.float32, dev, False, f"{_INT8_WHAT[requested]} (CPU inference)")
    if requested == "qat_int8":
        if backend.name != "cpu":
            raise ValueError(f"precision='qat_int8' converts to int8 kernels that run on CPU only, not {backend.name}; "
                             "use device='cpu' or precision 'auto'")
        return PrecisionPolicy("qat_int8", torch.float32, dev, False,
                               "quantization-aware training (fake-quantized Linear, per-channel int8 weights), "
                               "int8 inference (CPU)")
    if requested == "mixed":
        low = mixed_dtype or backend.default_precision()
        if low not in ("bf16", "fp16"):
            raise ValueError(f"precision='mixed' needs a low-precision dtype but {backend.name} ({backend.device_name()}) "
                             f"runs only fp32 at full speed; use precision='fp32'")
        _refuse(backend, low)
        return PrecisionPolicy("mixed", DTYPES[low], dev, training and backend.needs_grad_scaler(low),
                               f"layer-wise: sensitive layers fp32, the rest {low}")
    _refuse(backend, requested)
    return PrecisionPolicy(requested, DTYPES[requested], dev, training and backend.needs_grad_scaler(requested),
                           f"requested {requested}")


def _refuse(backend: Backend, precision: str) -> None:
    reason = backend.refuse_precision(precision)
    if reason is not None:
        raise ValueError(f"precision={precision!r}: {reason}")


def _auto_reason(backend: Backend, name: str) -> str:
    if name == "fp32":
        return "no fast low-precision math on this device"
    if backend.needs_grad_scaler(name):
        return f"{name} is the fast native type (training uses loss scaling)"
    return f"{name} is the fast native type"


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, *, policy: PrecisionPolicy,
                  scaler: torch.amp.GradScaler | None = None, grad_clip: float | None = None) -> float:
    """One optimizer step under ``policy``: autocast forward, fp32 master weights (parameters
    are never cast), GradScaler when the policy needs it. ``batch`` holds the model's keyword
    arguments including ``labels``. Returns the loss."""
    if policy.grad_scaler and scaler is None:
        raise ValueError(f"precision {policy.name!r} needs loss scaling; pass scaler=policy.make_grad_scaler()")
    with policy.autocast():
        loss = model(**batch).loss
    if loss is None:
        raise ValueError("the batch has no 'labels', so the model returned no loss to train on")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip true gradients, not scaled ones
    else:
        loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
