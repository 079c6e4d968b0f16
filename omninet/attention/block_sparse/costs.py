"""The cost facts the registry keeps for the kernel: a layer's work (keys per query of its own
layout), its memory (the slab path's working set is bounded by the chunk budget) and what a
kernel swap records of it; the density of a call is the layout's own rule
(``BlockSparseLayout.density``)."""

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
    if layout.density(N) == 1.0:  # the kernel runs dense SDPA
        return AttentionWork("sdpa", float(N))
    blocks = layout.block_layout(math.ceil(N / layout.block_size), layout.causal)  # (nb, nb)
    return AttentionWork("block_sparse", block_keys_per_query(blocks, layout.block_size, N, causal=layout.causal))


def block_sparse_memory(config: ModelConfig, B: int, N: int, s: int, *, layer_idx: int,
                        cross: bool) -> AttentionMemory:
    """Per layer: the slab path's working set is bounded by the chunk budget (forward: one
    budget; backward: ``BACKWARD_BUDGETS``), never more than the layout's fraction of the fp32
    (B, H, N, N) scores (``BlockSparseLayout.density``); backward keeps the (B, H, N)
    log-sum-exp, as fused SDPA does. Dense SDPA's cost where the kernel runs dense SDPA
    (density 1.0: cross-attention, sparsity 0, at or below the layout's cut-over)."""
    density = make_block_sparse_state(config, layer_idx, cross).density(N)
    if density == 1.0:
        return get_kernel("sdpa").memory(config, B, N, s, layer_idx=layer_idx, cross=cross)
    scores = scores_bytes(config, B, N, density)
    lse = B * config.num_heads * N * 4
    return AttentionMemory(transient=min(scores, CHUNK_BYTES), saved=lse,
                           backward=min(scores, BACKWARD_BUDGETS * CHUNK_BYTES))


def describe_block_sparse(config: ModelConfig, seq_length: int) -> str:
    """A kernel swap's record of the layout: its knobs and the density it computes at the
    task's length (of the model's last layer, a decoder's causal one)."""
    b = config.attention.block_sparse
    layout = make_block_sparse_state(config, config.total_layers - 1, False)
    knobs = f"{b.sink_blocks} sink + {b.window_blocks} window blocks" if layout.window else f"sparsity {b.sparsity_factor:g}"
    return f"block {b.block_size}, {knobs}, density {layout.density(seq_length):.3g} at {seq_length} tokens"
