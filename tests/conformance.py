"""Shared helpers for the kernel / position conformance suite.

A kernel joins the suite by registering itself (``omninet.attention.register_kernel``). Kernels
whose state exposes ``dense_mask(nq, nk)`` (block-sparse layouts) are compared with eager under
that mask; kernels registered with ``exact=False`` (low-rank approximations) are compared with
eager only through ``state.make_exact(n)`` when they provide it.
"""

from __future__ import annotations

import torch

import omninet  # noqa: F401  (registers every kernel)
from omninet.attention import KERNELS
from omninet.config import AttentionConfig, BlockSparseConfig, LinformerConfig, ModelConfig, PositionConfig

ALL_KERNELS = sorted(KERNELS)
POSITIONS = ["learned", "relative", "rotary", "alibi"]


def small_config(kernel: str = "sdpa", *, arch: str = "encoder", position: str = "learned", **overrides) -> ModelConfig:
    """A tiny model whose sparse kernels run their sparse path at test sizes."""
    attention = AttentionConfig(
        kernel=kernel,
        block_sparse=BlockSparseConfig(block_size=16, sparsity_factor=0.5, min_seq_length=0),
        linformer=LinformerConfig(k=16, min_seq_length=0),
    )
    base = dict(arch=arch, vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, max_seq_length=128,
                dropout=0.0, position=PositionConfig(kind=position), attention=attention)
    base.update(overrides)
    return ModelConfig(**base)


def kernel_compatible(kernel: str, *, arch: str = "encoder", position: str = "learned") -> bool:
    try:
        small_config(kernel, arch=arch, position=position)
    except ValueError:
        return False
    return True


def make_state(kernel: str, *, causal: bool = False):
    spec = KERNELS[kernel]
    if spec.make_state is None:
        return None
    cfg = small_config(kernel, arch="decoder" if causal and spec.supports_causal else "encoder")
    return spec.make_state(cfg, 0, False)


def reference_mask(state, nq: int, nk: int, device="cpu"):
    """The dense bool mask (Nq, Nk) a layout-based kernel is equivalent to, or None."""
    if state is not None and hasattr(state, "dense_mask"):
        return state.dense_mask(nq, nk).to(device)
    return None


def qkv(b=2, h=4, nq=64, nk=64, d=16, *, seed=0, dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(b, h, n, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return make(nq), make(nk), make(nk)
