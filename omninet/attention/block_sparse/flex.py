"""The FlexAttention path: the layout as a ``BlockMask`` for compiled ``flex_attention``.

Taken on CUDA when a call has no user mask, bias or dropout (on CPU only for inference with
``backend='flex'``: CPU FlexAttention has no backward); the block mask is built once per
layout and length.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

if TYPE_CHECKING:
    from omninet.attention.block_sparse.layout import BlockSparseLayout


_compiled_flex = None


def _flex_ok(q, mask, bias, dropout_p, backend: str) -> bool:
    """Whether the call takes FlexAttention (see the module docstring)."""
    if backend == "gather" or mask is not None or bias is not None or dropout_p > 0:
        return False
    if q.shape[-1] not in (16, 32, 64, 128, 256):
        return False
    if q.is_cuda:
        return True
    # CPU FlexAttention has no backward: only inference, and only when asked for explicitly.
    return backend == "flex" and not (torch.is_grad_enabled() and q.requires_grad)


def _flex(q, k, v, state: BlockSparseLayout, *, causal, scale):
    """Compiled FlexAttention over the layout's cached ``BlockMask`` (compiled once per process)."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = state.block_mask(q.shape[-2], k.shape[-2], causal, q.device)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)


def build_block_mask(layout: "BlockSparseLayout", nq: int, nk: int, causal: bool, device):
    """The FlexAttention ``BlockMask`` of ``layout`` for one (Nq, Nk, causal) call."""
    bs, offset = layout.block_size, nk - nq
    blocks = layout.block_layout(math.ceil(nk / bs), causal).to(device)  # (nb, nb)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = blocks[(q_idx + offset) // bs, kv_idx // bs]
        return keep & (kv_idx <= q_idx + offset) if causal else keep

    return create_block_mask(mask_mod, None, None, nq, nk, device=device)
