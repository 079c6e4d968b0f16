"""Dynamic int8 quantization of Linear layers for CPU inference.

Weights are quantized to int8 once (per-tensor for ``torch.ao``); activations are quantized
per batch at run time; the int8 GEMMs use VNNI/AMX-INT8 through fbgemm/oneDNN. Embeddings,
norms and attention score products stay fp32. ``torchao`` is used when it is installed and
works; otherwise ``torch.ao.quantization.quantize_dynamic`` (deprecated upstream in favour of
torchao, still shipped with torch 2.13).
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from omninet.hardware.base import lazy_import

__all__ = ["quantize_int8", "int8_engine"]

log = logging.getLogger("omninet.hardware")


def int8_engine() -> str:
    """Which library ``quantize_int8`` will use: 'torchao' or 'torch.ao'."""
    torchao = lazy_import("torchao.quantization")
    return "torchao" if torchao is not None and hasattr(torchao, "quantize_") else "torch.ao"


def quantize_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Returns ``model`` with every ``nn.Linear`` dynamically quantized to int8 (CPU, eval
    mode). The original is left untouched unless ``inplace``."""
    params = list(model.parameters())
    if params and any(p.device.type != "cpu" for p in params):
        raise ValueError("int8 dynamic quantization runs on CPU; move the model with model.to('cpu') first")
    if params and any(p.dtype != torch.float32 for p in params if p.is_floating_point()):
        raise ValueError("quantize an fp32 model: remove low-precision casts first (omninet.hardware.remove_precision)")
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    if int8_engine() == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(target, Int8DynamicActivationInt8WeightConfig())
        return target
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(target, {nn.Linear}, dtype=torch.qint8, inplace=True)
