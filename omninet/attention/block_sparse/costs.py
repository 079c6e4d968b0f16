"""The cost facts the registry keeps for the kernel: a layer's work (keys per query of its own
layout) and its memory (the slab path's working set is bounded by the chunk budget)."""

from __future__ import annotations

import math

from omninet.attention.block_sparse.layout import make_block_sparse_state
from omninet.attention.block_sparse.plan import BACKWARD_BUDGETS, CHUNK_BYTES
from omninet.attention.dense import scores_bytes
from omninet.attention.registry import AttentionMemory, AttentionWork, block_keys_per_query, get_kernel
from omninet.config import ModelConfig


def block_sparse_work(config: ModelConfig, N: int, *, layer_idx: int, cross: bool) -> AttentionWork:
    """Keys per query of the layer's own layout (the pairs of ``dense_mask``), or dense SDPA's N."""
    layout = make_block_sparse_state(config, layer_idx, cross)
    if cross or layout.dense_below(N, layout.causal):
        return AttentionWork("sdpa", float(N))
    blocks = layout.block_layout(math.ceil(N / layout.block_size), layout.causal)  # (nb, nb)
    return AttentionWork("block_sparse", block_keys_per_query(blocks, layout.block_size, N, causal=layout.causal))


def block_sparse_memory(config: ModelConfig, B: int, N: int, s: int, *, layer_idx: int,
                        cross: bool) -> AttentionMemory:
    """Per layer: the slab path's working set is bounded by the chunk budget (forward: one
    budget; backward: ``BACKWARD_BUDGETS``), never more than the layout's fraction of the fp32
    (B, H, N, N) scores; backward keeps the (B, H, N) log-sum-exp, as fused SDPA does. Dense
    SDPA's cost where the kernel runs dense SDPA (cross-attention, density 1.0,
    N <= min_seq_length; a sink + window layout up to its sink + window blocks)."""
    layout = make_block_sparse_state(config, layer_idx, cross)
    if cross or layout.dense_below(N, layout.causal):
        return get_kernel("sdpa").memory(config, B, N, s, layer_idx=layer_idx, cross=cross)
    scores = scores_bytes(config, B, N, layout.density(N))
    lse = B * config.num_heads * N * 4
    return AttentionMemory(transient=min(scores, CHUNK_BYTES), saved=lse,
                           backward=min(scores, BACKWARD_BUDGETS * CHUNK_BYTES))
