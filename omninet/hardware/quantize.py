"""Int8 Linear layers for CPU inference: post-training (``quantize_int8``) or after
quantization-aware training (``prepare_qat`` -> train -> ``convert_qat``).

Post-training, three variants, each a precision name a trial or sweep can choose. Weights are
int8 with one scale per output channel (symmetric) in all three; they differ in activations:

=============  =========================================  ===========================================
precision      activations                                engine (``int8_engine(precision)``)
=============  =========================================  ===========================================
int8           int8 per call, one scale for the whole     ``torch.ao``: fbgemm's dynamic Linear with
               input (asymmetric): the fast one           7-bit activations (``reduce_range``: the
                                                          AVX2 kernel's int16 sums would overflow);
                                                          ``torch.ao-vnni``: 8 bits where the CPU has
                                                          AVX512-VNNI or AMX (int32 sums)
int8_token     int8 per call, one scale per token         ``torch``: ``Int8TokenLinear`` over
               (symmetric): keeps quality                 ``torch._int_mm`` (oneDNN); ``torchao``:
                                                          ``Int8DynamicActivationInt8WeightConfig``
int8_weight    fp32 (weights dequantized per call):       ``torch``: ``Int8WeightOnlyLinear``
               keeps quality, weights take 1/4 the        (``torch._weight_int8pack_mm`` for <= 2
               memory, no faster than fp32                tokens); ``torchao``: ``Int8WeightOnlyConfig``
=============  =========================================  ===========================================

Why three: on SmolLM2-135M (512 tokens of ``json/decoder.py``, AMD EPYC with AVX512-VNNI;
``benchmarks/int8_variants.py``, figures in docs/kernels.md) the NLL is 1.927 in fp32, 1.924
with int8 weights alone, 1.941 with per-token activations, but 2.58 with one activation scale
per call (8 bits; 3.20 with the 7 bits an AVX2 CPU gets): a real LM's few massive-activation
tokens set that one scale for all the others. ``int8`` also makes a token's output depend on
the other tokens of the call (the shared scale): in the tests a KV-cache step differs from the
full forward by 1e-2 (relative), the other variants by under 1e-4.

Engines: torchao 0.18 runs the same two kernels on CPU in eager mode (``torch._int_mm``; a
matmul on the int8 weight cast to the activations' dtype) behind a tensor subclass, and was
slower (1.13x-1.26x for ``int8_token``) or equal within the noise (0.91x-0.95x, quartiles
spanning 1, for ``int8_weight``) here, so the default engine is torch's own; ``OMNINET_INT8_ENGINE=torchao``
selects torchao for ``int8_token`` / ``int8_weight`` where the benchmark shows it faster
(``python benchmarks/int8_variants.py`` measures both when torchao is installed). torchao is
optional and imported only then.

Which layers: every ``nn.Linear`` except one whose weight is shared with another module (an LM
head tied to the embedding): quantizing it would keep an int8 copy beside the fp32 embedding
(more memory, not less) for ~10% of the forward's matmul work, and the logits are the layer the
loss is most sensitive to. Embeddings, norms and attention score products stay fp32. The new
layers are not ``nn.Linear`` subclasses, so code that reads a Linear's ``weight`` (head
gathering in ``omninet.gating``) takes its path for opaque modules.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings

import torch
import torch.ao.nn.qat.dynamic as nnqatd
import torch.ao.nn.quantized.dynamic as nnqd
import torch.nn.functional as F
from torch import nn

from torch.ao.quantization import (QConfig, default_dynamic_fake_quant, default_per_channel_weight_fake_quant,
                                   per_channel_dynamic_qconfig)

from omninet.hardware.base import INT8_PRECISIONS, lazy_import
from omninet.hardware.cpu import cpu_flags

__all__ = ["quantize_int8", "int8_engine", "int8_engines", "Int8TokenLinear", "Int8WeightOnlyLinear",
           "Int8DynamicLinearVNNI", "ENGINE_ENV", "prepare_qat", "convert_qat", "qat_modules"]

log = logging.getLogger("omninet.hardware")

ENGINE_ENV = "OMNINET_INT8_ENGINE"  # 'torch' (default) or 'torchao': the engine of int8_token / int8_weight
# int8_weight: torch._weight_int8pack_mm (a matrix-vector kernel) up to this many tokens, the cast
# int8 weight in one matmul above. Measured (AMD EPYC, AVX512-VNNI, one thread, a 4096x2048
# weight): 11 against 33 ms at 1 token, 31 against 50 at 2, 70 against 53 at 4.
PACK_MM_MAX_ROWS = 2


def _full_range_activations() -> bool:
    """fbgemm's int8 kernels sum u8*s8 pairs in int16 without VNNI (overflow with 8-bit
    activations), in int32 with AVX512-VNNI / AMX."""
    flags = cpu_flags()
    return bool(flags.get("avx512_vnni") or flags.get("amx_tile"))


def _check_precision(precision: str) -> None:
    if precision not in INT8_PRECISIONS:
        raise ValueError(f"int8 variant {precision!r} is not known; use one of {', '.join(map(repr, INT8_PRECISIONS))}")


def int8_engine(precision: str = "int8") -> str:
    """The engine ``quantize_int8(model, precision)`` uses here: 'torch.ao' / 'torch.ao-vnni'
    for 'int8'; 'torch' or 'torchao' (``OMNINET_INT8_ENGINE``) for 'int8_token' / 'int8_weight'.
    ValueError when ``OMNINET_INT8_ENGINE`` names an engine that is unknown or not installed."""
    _check_precision(precision)
    if precision == "int8":
        return "torch.ao-vnni" if _full_range_activations() else "torch.ao"
    engine = os.environ.get(ENGINE_ENV, "").strip().lower() or "torch"
    if engine not in ("torch", "torchao"):
        raise ValueError(f"{ENGINE_ENV}={engine!r} is not an int8 engine; use 'torch' or 'torchao', or unset it")
    if engine == "torchao" and lazy_import("torchao.quantization") is None:
        raise ValueError(f"{ENGINE_ENV}=torchao but torchao is not installed; pip install torchao, or unset {ENGINE_ENV}")
    return engine


def int8_engines() -> dict[str, str]:
    """{int8 precision: its engine here} (recorded by the capability probe)."""
    return {name: int8_engine(name) for name in INT8_PRECISIONS}


def _per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output channel: (int8 (N, K), fp32 scale (N,))."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8TokenLinear(nn.Module):
    """``y = x W^T + b`` with int8 weights (one scale per output channel) and int8 inputs
    quantized at every call with one scale per token (symmetric), multiplied in int32 by
    ``torch._int_mm`` and rescaled. The bias stays fp32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = _per_channel(linear.weight)
        self.register_buffer("weight_t", q.t().contiguous())  # (K, N): _int_mm's row-major right operand
        self.register_buffer("weight_scale", scale)  # (N,)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        scale = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 127  # (M, 1)
        q = torch.round(x2 / scale).to(torch.int8)  # |x / scale| <= 127 by construction
        y = torch._int_mm(q, self.weight_t) * (scale * self.weight_scale)  # (M, N) int32 -> fp32
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8WeightOnlyLinear(nn.Module):
    """``y = x W^T + b`` with W stored as int8 (one scale per output channel) and the matmul in
    the input's dtype: the int8 weight is cast per call and the output rescaled, or, for at
    most ``PACK_MM_MAX_ROWS`` tokens (decoding), ``torch._weight_int8pack_mm`` reads the int8
    weight directly. The bias stays fp32."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = _per_channel(linear.weight)
        self.register_buffer("weight_int8", q)  # (N, K)
        self.register_buffer("weight_scale", scale)  # (N,)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        scale = self.weight_scale.to(x.dtype)
        if x2.shape[0] <= PACK_MM_MAX_ROWS and x.dtype == torch.float32 and hasattr(torch, "_weight_int8pack_mm"):
            y = torch._weight_int8pack_mm(x2.contiguous(), self.weight_int8, scale)
        else:
            y = F.linear(x2, self.weight_int8.to(x.dtype)) * scale  # (x W_q^T) s = x (s W_q)^T
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8DynamicLinearVNNI(nnqd.Linear):
    """fbgemm's dynamic int8 Linear with 8-bit activations: only where its sums are int32
    (AVX512-VNNI, AMX); ``torch.ao``'s own keeps 7 bits (``reduce_range``) on every CPU."""

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False).to(x.dtype)


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (a tied LM head and its embedding)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def _quantizable(model: nn.Module) -> list[str]:
    shared = _shared_weights(model)
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and id(m.weight) not in shared]


def _replace(model: nn.Module, names: list[str], make) -> None:
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, make(getattr(owner, child)))


def quantize_int8(model: nn.Module, precision: str = "int8", *, inplace: bool = False) -> nn.Module:
    """Returns ``model`` with its Linear layers in int8 (CPU, eval mode), as ``precision``
    ('int8', 'int8_token' or 'int8_weight'; see the module's table) says, through
    ``int8_engine(precision)``. A Linear tied to another module's weight stays fp32. The
    original is left untouched unless ``inplace``."""
    _check_precision(precision)
    engine = int8_engine(precision)
    params = list(model.parameters())
    if params and any(p.device.type != "cpu" for p in params):
        raise ValueError(f"precision={precision!r} (int8 inference) runs on CPU; move the model with model.to('cpu') first")
    if params and any(p.dtype != torch.float32 for p in params if p.is_floating_point()):
        raise ValueError(f"precision={precision!r} quantizes an fp32 model: remove low-precision casts first "
                         "(omninet.hardware.remove_precision)")
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    names = _quantizable(target)
    if engine == "torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_  # optional: torchao

        config = (Int8DynamicActivationInt8WeightConfig(set_inductor_config=False) if precision == "int8_token"
                  else Int8WeightOnlyConfig(set_inductor_config=False))
        wanted = set(names)
        quantize_(target, config, filter_fn=lambda m, fqn: fqn in wanted)
    elif precision == "int8_token":
        _replace(target, names, Int8TokenLinear)
    elif precision == "int8_weight":
        _replace(target, names, Int8WeightOnlyLinear)
    else:
        cls = Int8DynamicLinearVNNI if engine == "torch.ao-vnni" else nnqd.Linear

        def make(lin):
            lin.qconfig = per_channel_dynamic_qconfig
            with torch.no_grad():
                return cls.from_float(lin)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            _replace(target, names, make)
    log.info("precision %s: %d Linear layers in int8 (%s)", precision, len(names), engine)
    return target


# ---- quantization-aware training ---------------------------------------------------------
def _qat_qconfig():
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
