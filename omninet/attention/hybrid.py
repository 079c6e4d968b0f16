"""The 'hybrid' kernel: what the model card's two flags mean together
(``use_sparse_attention=True, use_linformer=True``, the seed's default).

Per attention layer and per call:

1. Sequences of at most ``block_sparse.min_seq_length`` tokens (default 1024): dense SDPA,
   because the fused dense kernel wins on short inputs. (Causal layers: the block-sparse
   kernel's dense prefix rows, which is the same thing and keeps KV-cached decoding exact.)
2. Linformer layers (encoder self-attention only; ``linformer.layers``, by default the odd
   layers 1, 3, ...; only with positions 'learned', 'rotary' or 'none'), for non-causal calls
   of more than ``linformer.min_seq_length`` and at most ``max_seq_length`` keys: Linformer
   low-rank attention, the long-range mixing layers.
3. Every other call: block-sparse attention (local window + global blocks + optional random
   blocks at ``block_sparse.sparsity_factor``), the local layers. Decoders and causal calls
   always take this path; cross-attention uses dense SDPA.

So the seed's default is dense SDPA up to 1024 tokens and O(N) beyond it (half the layers
local block-sparse, half Linformer); ``attention_weights`` (``output_attentions=True``)
are those of each layer's path (``need_weights``; block-sparse weights are zero outside
the layout, Linformer's are the effective P @ F).

The state (``HybridState``) holds the layer's ``BlockSparseLayout`` and, for Linformer
layers, its ``LinformerProjection``. ``state.dense_mask(nq, nk, causal=...)`` is the mask the
kernel is equivalent to on block-sparse calls and all True on Linformer calls, where
``state.set_identity_()`` (then k >= N) makes the call equal dense attention;
``state.make_exact(n)`` does the same and checks that k >= n.
"""

from __future__ import annotations

import torch
from torch import nn

from omninet.attention.block_sparse import BlockSparseLayout, block_sparse_attention, make_block_sparse_state
from omninet.attention.linformer import (LinformerProjection, check_linformer_call, check_linformer_layers,
                                         describe_linformer, linformer_core, linformer_from_dense, linformer_layers,
                                         linformer_memory, linformer_work, make_linformer_state)
from omninet.attention.registry import AttentionMemory, AttentionWork, get_kernel, register_kernel
from omninet.config import ModelConfig

__all__ = ["HybridState", "hybrid_attention"]

_LINFORMER_POSITIONS = ("learned", "rotary", "none")


class HybridState(nn.Module):
    def __init__(self, sparse: BlockSparseLayout, linformer: LinformerProjection | None, *, min_seq_length: int):
        super().__init__()
        self.sparse, self.linformer = sparse, linformer
        self.linformer_min_seq_length = min_seq_length

    def uses_linformer(self, nk: int, causal: bool) -> bool:
        lin = self.linformer
        return lin is not None and not causal and self.linformer_min_seq_length < nk <= lin.max_seq_length

    def dense_mask(self, nq: int, nk: int, *, causal: bool | None = None) -> torch.Tensor:
        causal = self.sparse.causal if causal is None else causal
        if self.uses_linformer(nk, causal):
            return torch.ones(nq, nk, dtype=torch.bool)
        return self.sparse.dense_mask(nq, nk, causal=causal)

    def set_identity_(self) -> "HybridState":
        if self.linformer is not None:
            self.linformer.set_identity_()
        return self

    def make_exact(self, n: int) -> "HybridState":
        """After this, calls with at most ``n`` keys equal eager under ``dense_mask``."""
        if self.linformer is not None:
            self.linformer.make_exact(n)
        return self


def make_hybrid_state(config: ModelConfig, layer_idx: int, cross: bool) -> HybridState:
    sparse = make_block_sparse_state(config, layer_idx, cross)
    encoder_layer = config.arch != "decoder" and layer_idx < config.num_layers
    linformer = None
    if encoder_layer and not cross and config.position.kind in _LINFORMER_POSITIONS:
        linformer = make_linformer_state(config, layer_idx, cross, default_all=False)
    return HybridState(sparse, linformer, min_seq_length=config.attention.linformer.min_seq_length)


def _linformer_layer(config: ModelConfig, layer_idx: int, cross: bool) -> bool:
    """Whether ``make_hybrid_state`` gives this layer a Linformer projection."""
    encoder_layer = config.arch != "decoder" and layer_idx < config.num_layers
    return (encoder_layer and not cross and config.position.kind in _LINFORMER_POSITIONS
            and layer_idx in linformer_layers(config, default_all=False))


def _linformer_call(config: ModelConfig, N: int, *, layer_idx: int, cross: bool) -> bool:
    """The path ``hybrid_attention`` takes for N keys: Linformer on its layers past
    ``linformer.min_seq_length`` (non-causal by construction), else block-sparse (which is dense
    SDPA at or below ``block_sparse.min_seq_length`` and for cross-attention)."""
    return _linformer_layer(config, layer_idx, cross) and config.attention.linformer.min_seq_length < N <= config.max_seq_length


def hybrid_memory(config: ModelConfig, B: int, N: int, s: int, *, layer_idx: int, cross: bool) -> AttentionMemory:
    """Per layer, the memory of the path the layer takes for N keys (``_linformer_call``)."""
    if _linformer_call(config, N, layer_idx=layer_idx, cross=cross):
        return linformer_memory(config, B, N, s, layer_idx=layer_idx, cross=cross, default_all=False)
    return get_kernel("block_sparse").estimate(config, B, N, s, layer_idx=layer_idx, cross=cross)


def hybrid_work(config: ModelConfig, N: int, *, layer_idx: int, cross: bool) -> AttentionWork:
    """Per layer, the work of the path the layer takes for N keys (``_linformer_call``)."""
    if _linformer_call(config, N, layer_idx=layer_idx, cross=cross):
        return linformer_work(config, N, layer_idx=layer_idx, cross=cross, default_all=False)
    return get_kernel("block_sparse").attention_work(config, N, layer_idx=layer_idx, cross=cross)


def hybrid_from_dense(state: HybridState, *, seq_length: int) -> str | None:
    """The kernel swap's start: the Linformer layers' E/F as Linformer's own (block-sparse has no weights)."""
    return linformer_from_dense(state.linformer, seq_length=seq_length)


def describe_hybrid(config: ModelConfig, seq_length: int) -> str:
    return (f"block-sparse {get_kernel('block_sparse').describe(config, seq_length)}; "
            f"Linformer {describe_linformer(config, seq_length)}")


@register_kernel("hybrid", make_state=make_hybrid_state, exact=False, memory=hybrid_memory, work=hybrid_work,
                 check_config=check_linformer_layers, from_dense=hybrid_from_dense, describe=describe_hybrid)
def hybrid_attention(q, k, v, *, mask=None, bias=None, causal=False, scale, dropout_p=0.0, need_weights=False,
                     state=None, key_padding=None):
    if not isinstance(state, HybridState):
        raise ValueError("hybrid attention needs state=HybridState; build it with "
                         "KERNELS['hybrid'].make_state(model_config, layer_idx, cross)")
    if state.uses_linformer(k.shape[-2], causal):
        check_linformer_call(q, k, mask=mask, bias=bias, causal=causal, state=state.linformer)
        return linformer_core(q, k, v, mask=mask, scale=scale, dropout_p=dropout_p, need_weights=need_weights,
                              state=state.linformer)
    return block_sparse_attention(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, dropout_p=dropout_p,
                                  need_weights=need_weights, state=state.sparse, key_padding=key_padding)
