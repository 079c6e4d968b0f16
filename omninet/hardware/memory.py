"""Analytic peak-memory estimate and memory-aware batch size.

Dimensions: B batch, N tokens, T = B*N, C hidden, F feed-forward width, H heads, V vocabulary,
L layers, P parameters, s bytes per activation element (4 fp32, 2 bf16/fp16).

The estimate follows what PyTorch actually holds for this model (counted by walking
``Block.forward``; checked against measured peaks in tests/test_hardware_memory.py):

- inference (no_grad): parameters + the larger of the largest transient of one block (the FFN
  holds the residual, the norm output and two (T, F) tensors: ``(2C + 2F) T s``; eager
  attention adds its (B, H, N, N) score tensors) and the head phase (final states and the
  (T, V) logits) + the BLAS's packed copy of the (V, C) head weight.
- training (steady state with Adam): parameters, gradients and ``optimizer_states`` fp32
  copies (Adam: 2) + every tensor autograd saves, per block ``(9C + 2F) T s`` (block input,
  norm outputs, q/k/v, attention output before and after the head merge, residual, FFN
  input, (T, F) pre- and post-activation) + dropout masks (1 byte/element) + attention-kernel
  terms (what each layer saves, plus the largest one-layer backward transient) + the loss head
  (log-softmax output and its gradients, 3 (T, V) fp32 tensors).
- autocast keeps a low-precision copy of each weight it casts (2 bytes per Linear parameter).
- generation (``kv_tokens`` > 0, inference): the KV cache after that many decoder positions,
  ``omninet.model.kv_cache_bytes`` in the activation dtype: it grows with the length for dense
  layers and stops at sink + window blocks for ``sink_window`` layers (their ring buffer).

Each attention kernel states its own per-layer term with its registration (``KernelSpec.memory``
in ``omninet.attention``: dense SDPA is O(N); eager materializes scores; Linformer O(N k);
block-sparse a fraction of N^2; each dense at or below its ``min_seq_length``).
Parameters are counted exactly by building the model on the ``meta`` device (no memory).
"""

from __future__ import annotations

import torch
from torch import nn

from omninet.attention.registry import AttentionMemory, get_kernel
from omninet.config import ModelConfig
from omninet.hardware.base import INT8_PRECISIONS

__all__ = ["estimate_memory_mb", "memory_breakdown", "max_batch_size", "AttentionMemory", "count_parameters"]

MB = 2**20
_ELEM = {"fp32": 4, "bf16": 2, "fp16": 2, "mixed": 4, **{n: 4 for n in INT8_PRECISIONS}}  # activation bytes ('mixed': fp32 upper bound)


def _attention(config: ModelConfig, B: int, N: int, s: int, *, layer_idx: int, cross: bool = False) -> AttentionMemory:
    """The layer's kernel states its own cost (``KernelSpec.memory``); positions add theirs."""
    mem = get_kernel(config.attention.kernel).estimate(config, B, N, s, layer_idx=layer_idx, cross=cross)
    if config.position.kind in ("relative", "alibi"):  # an (H, N, N) additive bias per layer
        bias = config.num_heads * N * N * s
        mem = AttentionMemory(mem.transient + 2 * bias, mem.saved + bias, mem.backward)
    return mem


def count_parameters(config: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters inside the nn.Linear layers that int8 quantizes: all but one
    tied to another module's weight, an LM head sharing the embedding), exact: the model is
    built on the meta device, so no memory is used."""
    from omninet.model import OmniNetModel

    with torch.device("meta"):
        model = OmniNetModel(config)
    unique = {id(p): p for p in model.parameters()}
    holders: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        holders[id(p)] = holders.get(id(p), 0) + 1
    linear = {id(p): p for m in model.modules() if isinstance(m, nn.Linear) and holders[id(m.weight)] == 1
              for p in m.parameters()}
    return sum(p.numel() for p in unique.values()), sum(p.numel() for p in linear.values())


def memory_breakdown(config: ModelConfig, *, batch_size: int, seq_len: int, precision: str = "fp32",
                     training: bool = False, optimizer_states: int = 2, dropout_masks: bool | None = None,
                     kv_tokens: int = 0) -> dict[str, float]:
    """Bytes per component of the estimated peak (see the module docstring). ``kv_tokens``: a
    generation's cached positions (prompt + new tokens), whose KV cache is held beside the
    forward (``kv_cache``); 0 for a plain forward."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}; use ModelConfig.from_dict(d)")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if precision not in _ELEM:
        raise ValueError(f"precision must be one of {', '.join(_ELEM)} (resolve 'auto' first), got {precision!r}")
    if precision in INT8_PRECISIONS and training:
        raise ValueError(f"{precision} is inference-only; estimate training in 'fp32' or 'bf16'")
    if isinstance(kv_tokens, bool) or not isinstance(kv_tokens, int) or kv_tokens < 0 or (kv_tokens and training):
        raise ValueError(f"kv_tokens is the cached positions of an inference generation (an int >= 0, and 0 with "
                         f"training=True), got {kv_tokens!r}")
    B, N, C, F = batch_size, seq_len, config.hidden_size, config.ff_dim
    T, s = B * N, _ELEM[precision]
    ff_live = 3 if config.mlp == "gated" else 2  # (T, F) tensors alive in the MLP: up and act; gated: gate, up, product
    P, P_lin = count_parameters(config)
    dec_layers = (config.num_decoder_layers or config.num_layers) if config.arch == "encoder_decoder" else 0
    layers = config.num_layers + dec_layers
    out = {"parameters": (P - P_lin) * 4 + P_lin * (1 if precision in INT8_PRECISIONS else 4)}
    if precision in ("bf16", "fp16"):
        out["autocast_weight_copies"] = P_lin * 2
    head = (B * config.num_classes * 4) if config.num_classes else T * config.vocab_size * 4
    attn = [_attention(config, B, N, s, layer_idx=i) for i in range(layers)]  # self-attention, global numbering
    if not training:
        transient = max(a.transient for a in attn)  # one block runs at a time
        block = max((2 * C + ff_live * F) * T * s, 7 * C * T * s) + transient + C * T * 4  # + the fp32 residual
        out["activations"] = max(block, C * T * 4 + head)  # blocks free their transients before the head runs
        if not config.num_classes:
            out["gemm_packing"] = config.vocab_size * C * 4  # the BLAS packs the (V, C) head weight for the (T, V) GEMM
        if kv_tokens:
            from omninet.model import kv_cache_bytes  # the model imports the attention registry this module uses

            out["kv_cache"] = kv_cache_bytes(config, B, kv_tokens, torch.bfloat16 if s == 2 else torch.float32)
        return out
    drop = config.dropout > 0 if dropout_masks is None else dropout_masks
    per_block = (9 * C + ff_live * F) * T * s + (2 * T * C if drop else 0)
    cross = sum(6 * C * T * s + _attention(config, B, N, s, layer_idx=i, cross=True).saved + (T * C if drop else 0)
                for i in range(config.num_layers, layers))  # cross-attention in decoder blocks
    out["gradients"] = P * 4
    out["optimizer_states"] = optimizer_states * P * 4
    out["activations"] = (per_block * layers + sum(a.saved for a in attn) + cross + 4 * C * T * 4  # + embeddings, final norm
                          + max(a.backward for a in attn))  # one layer's backward runs at a time
    out["head"] = 3 * head if not config.num_classes else 3 * head + T * C * 4
    return out


def estimate_memory_mb(config: ModelConfig, *, batch_size: int, seq_len: int, precision: str = "fp32",
                       training: bool = False, optimizer_states: int = 2, dropout_masks: bool | None = None,
                       kv_tokens: int = 0) -> float:
    """Estimated peak memory (MiB) of one forward (``training=False``, no_grad) or one
    steady-state training step with an optimizer keeping ``optimizer_states`` fp32 tensors
    per parameter (Adam: 2, SGD with momentum: 1); with ``kv_tokens``, plus a generation's KV
    cache after that many positions."""
    return sum(memory_breakdown(config, batch_size=batch_size, seq_len=seq_len, precision=precision, training=training,
                                optimizer_states=optimizer_states, dropout_masks=dropout_masks,
                                kv_tokens=kv_tokens).values()) / MB


def max_batch_size(config: ModelConfig, *, seq_len: int, capacity_mb: float, memory_threshold: float = 0.9,
                   precision: str = "fp32", training: bool = False, limit: int = 1 << 16, **kwargs) -> int:
    """The largest batch whose estimate fits in ``memory_threshold * capacity_mb``; 0 when not
    even one sequence fits. (The estimate grows with the batch, so this is a binary search.)"""
    if not 0 < memory_threshold <= 1:
        raise ValueError(f"memory_threshold must be a fraction in (0, 1], got {memory_threshold!r}")
    if capacity_mb <= 0:
        raise ValueError(f"capacity_mb must be > 0, got {capacity_mb!r}")
    budget = memory_threshold * capacity_mb

    def fits(b: int) -> bool:
        return estimate_memory_mb(config, batch_size=b, seq_len=seq_len, precision=precision, training=training,
                                  **kwargs) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
