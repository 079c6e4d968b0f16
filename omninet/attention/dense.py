"""Dense kernels: ``eager`` (the materialized reference) and ``sdpa`` (PyTorch's fused
``scaled_dot_product_attention``: flash / memory-efficient kernels where the device has them).

Dimensions: B batch, H heads, Nq queries, Nk keys, D head dim.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from omninet.attention.registry import AttentionMemory, AttentionWork, register_kernel
from omninet.config import ModelConfig


def causal_mask(nq: int, nk: int, device) -> torch.Tensor:
    """(Nq, Nk) bool, bottom-right aligned: query i sees keys j <= i + Nk - Nq."""
    q_pos = torch.arange(nk - nq, nk, device=device)
    return q_pos[:, None] >= torch.arange(nk, device=device)[None, :]


def positions(nq: int, nk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(nk - nq, nk, device=device), torch.arange(nk, device=device)


def combined_mask(q, k, mask, causal):
    """The visible-key mask as one bool tensor broadcastable to (B, H, Nq, Nk), or None."""
    nq, nk = q.shape[-2], k.shape[-2]
    if causal:
        cm = causal_mask(nq, nk, q.device)
        mask = cm if mask is None else mask & cm
    return mask


def scores_bytes(config: ModelConfig, B: int, N: int, density: float = 1.0) -> float:
    """One fp32 (B, H, N, N) score tensor (eager upcasts scores), times the fraction computed."""
    return B * config.num_heads * N * N * 4 * density


def eager_memory(config: ModelConfig, B: int, N: int, s: int, *, layer_idx: int, cross: bool) -> AttentionMemory:
    """Scores and softmax in fp32 at the peak; the weights (activation dtype) saved for backward;
    backward adds the fp32 gradient of the scores."""
    scores = scores_bytes(config, B, N)
    return AttentionMemory(transient=2 * scores, saved=scores * s / 4, backward=scores)


def sdpa_memory(config: ModelConfig, B: int, N: int, s: int, *, layer_idx: int, cross: bool) -> AttentionMemory:
    """Fused kernels never form scores; backward keeps the fp32 (B, H, N) log-sum-exp."""
    return AttentionMemory(transient=0.0, saved=B * config.num_heads * N * 4)


def dense_work(config: ModelConfig, N: int, *, layer_idx: int, cross: bool, kernel: str = "sdpa") -> AttentionWork:
    """Every query attends to all N keys (causal calls too: the cost counts the full square)."""
    return AttentionWork(kernel, float(N))


@register_kernel("eager", memory=eager_memory, work=partial(dense_work, kernel="eager"))
def eager_attention(q, k, v, *, mask=None, bias=None, causal=False, scale, dropout_p=0.0, need_weights=False, state=None,
                    key_padding=None):  # key_padding: read from mask
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (B, H, Nq, Nk)
    if bias is not None:
        scores = scores + bias(*positions(q.shape[-2], k.shape[-2], q.device)).float()
    visible = combined_mask(q, k, mask, causal)
    if visible is not None:
        # A large finite negative (not -inf) keeps fully masked rows finite in value and
        # gradient; those rows are zeroed below.
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    if visible is not None:
        weights = weights * visible.any(dim=-1, keepdim=True)
    weights = weights.to(q.dtype)
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    out = torch.matmul(dropped, v)  # (B, H, Nq, D)
    return out, (weights if need_weights else None)


@register_kernel("sdpa", forms_weights=False, memory=sdpa_memory, work=dense_work)
def sdpa_attention(q, k, v, *, mask=None, bias=None, causal=False, scale, dropout_p=0.0, need_weights=False, state=None,
                   key_padding=None):  # key_padding: read from mask
    nq, nk = q.shape[-2], k.shape[-2]
    if bias is None and mask is None and (not causal or nq == nk):
        # The fused kernels' own causal path (top-left aligned, which equals ours when Nq == Nk).
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)
        return out, None
    visible = combined_mask(q, k, mask, causal)
    has_key = None
    if visible is not None:
        # A row with no visible key would give NaN (and NaN gradients) in the fused kernels:
        # let it see every key, then zero its output, so every kernel agrees with eager.
        has_key = visible.any(dim=-1, keepdim=True)
        visible = visible | ~has_key
    if bias is not None:
        attn_mask = bias(*positions(nq, nk, q.device)).to(q.dtype)  # (H, Nq, Nk)
        if visible is not None:
            attn_mask = attn_mask.masked_fill(~visible, float("-inf"))
    else:
        attn_mask = visible
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if has_key is not None:
        out = out * has_key.to(out.dtype)
    return out, None
