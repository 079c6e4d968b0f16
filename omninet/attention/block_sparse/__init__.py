"""Block-sparse attention whose compute and memory shrink with the layout's density.

A call goes through these modules, one stage each:

- ``layout``: the per-layer pattern (``BlockSparseLayout``, the kernel's state): which key
  blocks each query block sees, and the masks under which the eager reference equals the kernel.
- ``padding``: ``KeyPadding``, a key-padding mask read once (each row's length, or its
  per-block classes), as the plans take it per batch row.
- ``plan``: per batch row, query blocks against slabs (runs of key blocks, views of k and v),
  grouped where their slabs slide together; cached per layer.
- ``executor``: a call's plans run slab by slab (the CPU flash kernel, else eager math), partial
  softmaxes merged by log-sum-exp; its autograd Function recomputes them in backward.
- ``flex``: the layout as a FlexAttention ``BlockMask`` (CUDA; no mask, bias or dropout).
- ``kernel``: ``block_sparse_attention``, the registered entry, which picks the path.
- ``costs``: the work and memory facts the registry keeps for the kernel.

How it computes, and where it pays on CPU: docs/kernels.md, "Block-sparse attention".
"""

from __future__ import annotations

from omninet.attention.block_sparse.costs import block_sparse_memory, block_sparse_work, describe_block_sparse
from omninet.attention.block_sparse.kernel import block_sparse_attention
from omninet.attention.block_sparse.layout import BlockSparseLayout, layer_is_causal, make_block_sparse_state
from omninet.attention.block_sparse.padding import KeyPadding, key_lengths
from omninet.attention.block_sparse.plan import BACKWARD_BUDGETS, CHUNK_BYTES
from omninet.attention.registry import register_kernel

__all__ = ["BlockSparseLayout", "block_sparse_attention", "make_block_sparse_state", "layer_is_causal", "KeyPadding",
           "key_lengths", "block_sparse_work", "block_sparse_memory", "CHUNK_BYTES", "BACKWARD_BUDGETS"]


register_kernel("block_sparse", make_state=make_block_sparse_state, work=block_sparse_work,
                memory=block_sparse_memory, describe=describe_block_sparse)(block_sparse_attention)
