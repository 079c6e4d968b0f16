"""Int8 Linear layers for CPU inference: post-training (``quantize_int8``) or after
quantization-aware training (``prepare_qat`` -> train -> ``convert_qat``).

QAT (``torch.ao.quantization``): every ``nn.Linear`` becomes ``torch.ao.nn.qat.dynamic.Linear``,
whose forward multiplies by a fake-quantized weight (per-channel symmetric int8, the scheme the
int8 kernel then uses), and whose input is fake-quantized per batch (per-tensor, memoryless:
what dynamic quantization does at run time), so training sees the rounding it will meet.
Gradients pass straight through the rounding. ``convert_qat`` swaps each one (and any plain
Linear, e.g. one rebuilt by head pruning) for a dynamic int8 Linear with per-channel weights.

Post-training:

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

__all__ = ["quantize_int8", "int8_engine", "prepare_qat", "convert_qat", "qat_modules"]

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


# ---- quantization-aware training ---------------------------------------------------------
def _qat_qconfig():
    from torch.ao.quantization import QConfig, default_dynamic_fake_quant, default_per_channel_weight_fake_quant

    return QConfig(activation=default_dynamic_fake_quant, weight=default_per_channel_weight_fake_quant)


def _fake_quant_input(module, args):
    return (module.input_fake_quant(args[0]), *args[1:])


def _swap_linear(model: nn.Module, make) -> int:
    count = 0
    for name, child in list(model.named_children()):
        if type(child) in (nn.Linear, torch.ao.nn.qat.dynamic.Linear):
            setattr(model, name, make(child))
            count += 1
        else:
            count += _swap_linear(child, make)
    return count


def qat_modules(model: nn.Module) -> list[str]:
    """Names of the fake-quantized Linear layers (``prepare_qat``)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.ao.nn.qat.dynamic.Linear)]


def prepare_qat(model: nn.Module) -> nn.Module:
    """In place: every ``nn.Linear`` becomes a fake-quantized one (weights per-channel int8,
    inputs per batch). Parameters are kept (same tensors: optimizers and weight tying hold);
    the state dict gains the fake-quant observers' buffers. CPU, fp32 weights. Returns ``model``."""
    params = list(model.parameters())
    if params and any(p.device.type != "cpu" for p in params):
        raise ValueError("quantization-aware training converts to CPU int8 kernels: build the model on CPU "
                         "(device 'cpu') or use precision 'auto' on an accelerator")
    if params and any(p.dtype != torch.float32 for p in params if p.is_floating_point()):
        raise ValueError("prepare_qat needs an fp32 model: remove low-precision casts first (omninet.hardware.remove_precision)")
    import torch.ao.nn.qat.dynamic as nnqatd

    qconfig = _qat_qconfig()

    def make(lin):
        if isinstance(lin, nnqatd.Linear):
            return lin
        lin.qconfig = qconfig
        qat = nnqatd.Linear.from_float(lin)
        qat.input_fake_quant = qconfig.activation()
        qat.register_forward_pre_hook(_fake_quant_input)
        return qat

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        n = _swap_linear(model, make)
    if n == 0:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to train quantization-aware")
    log.info("quantization-aware training: %d Linear layers fake-quantized (per-channel int8 weights)", n)
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """In place, after training: each fake-quantized Linear (and any plain one) becomes a
    dynamic int8 Linear whose per-channel weights are the trained weights quantized with the
    same scheme training simulated. Puts the model in eval mode. Returns ``model``."""
    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import per_channel_dynamic_qconfig

    model.eval()

    def make(lin):
        lin.qconfig = per_channel_dynamic_qconfig  # per-channel symmetric int8 weights, as fake-quantized
        with torch.no_grad():
            return nnqd.Linear.from_float(lin)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        _swap_linear(model, make)
    return model
