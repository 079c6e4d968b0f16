"""The OmniNet transformer: encoder, decoder (causal LM) and encoder-decoder.

Dimensions: B batch, N tokens, C hidden, H heads, Hk K/V heads (H with plain multi-head
attention, fewer with grouped K/V), D head dim (C = H * D unless the config sets it), V
vocabulary. Pre-norm blocks by default: x + Attn(LN(x)) [+ CrossAttn(LN(x), enc)] + FFN(LN(x));
the options pretrained families need (RMSNorm, post-norm, gated MLP, grouped K/V, bias-free
projections, embedding norm, token types, an MLM head transform) are config fields whose
defaults give that block (``omninet.interop`` maps checkpoints onto them).

Attention modules own projections, positions and the KV cache, and call a kernel looked up
by name (``omninet.attention``); the model is plain single-device PyTorch. Precision,
quantization and placement are passes applied afterwards (``omninet.hardware``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from omninet.attention import KeyPadding, get_kernel
from omninet import gating
from omninet.attention.block_sparse.layout import cache_window_of
from omninet.attention.block_sparse.ring import AtPositions, CacheWindow, RingBuffer
from omninet.config import ModelConfig
from omninet.positions import Alibi, LearnedPositions, RelativeBias, Rotary

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
}


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class KVCache:
    """Per-layer keys and values of decoder self-attention, plus the encoder's projected
    keys/values for cross-attention (computed once). Keyed by layer index, never by shape.

    Each layer's self-attention K/V live in a preallocated buffer (B, Hk, capacity, D) written
    in place: a step copies only its own tokens, and ``self_kv[layer]`` holds views of the
    tokens cached so far. The buffer is sized from ``capacity`` (tokens; e.g. prompt +
    max_new_tokens) and otherwise grows by doubling, so it moves O(log N) times, not every step.

    A layer whose layout is ``sink_window`` keeps a ``RingBuffer`` instead (``ring``): its sink
    keys and its window's, a fixed number of slots whatever the length, the oldest window block
    evicted when a new block starts (``omninet.attention.block_sparse.ring``)."""

    def __init__(self, capacity: int | None = None):
        if capacity is not None and capacity < 1:
            raise ValueError(f"KVCache(capacity=...) is a token count >= 1 (or None to grow by doubling), got {capacity}")
        self.capacity = capacity
        self.self_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # views (B, Hk, N, D) of the buffers
        self.cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (B, Hk, capacity, D) each
        self.rings: dict[int, RingBuffer] = {}  # sink_window layers: bounded, never in self_kv
        self.allocations = 0  # buffer (re)allocations so far, all layers

    def length(self, layer: int = 0) -> int:
        """Positions cached for ``layer`` so far (a ring's: all it has seen, not the keys it keeps)."""
        if layer in self.rings:
            return self.rings[layer].length
        kv = self.self_kv.get(layer)
        return 0 if kv is None else kv[0].shape[-2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, Hk, T, D) -> views (B, Hk, N_past + T, D) of everything cached for ``layer``."""
        n, t = self.length(layer), k.shape[-2]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Under autograd an in-place write would invalidate the graph of earlier steps.
            if n:
                pk, pv = self.self_kv[layer]
                k, v = torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2)
            self._buffers.pop(layer, None)
            self.self_kv[layer] = (k, v)
            return k, v
        kb, vb = self._reserve(layer, k, n + t)
        kb[..., n : n + t, :] = k
        vb[..., n : n + t, :] = v
        self.self_kv[layer] = (kb[..., : n + t, :], vb[..., : n + t, :])
        return self.self_kv[layer]

    def _reserve(self, layer, k, need):
        """The layer's buffers with room for ``need`` tokens, (re)allocated in k's dtype and device."""
        buf = self._buffers.get(layer)
        if buf is not None and buf[0].shape[-2] >= need and buf[0].dtype == k.dtype and buf[0].device == k.device:
            return buf
        B, Hk, _, D = k.shape
        old = buf[0].shape[-2] if buf is not None else 0
        cap = max(need, 2 * old, self.capacity or 0)
        kb = k.new_empty(B, Hk, cap, D)
        vb = k.new_empty(B, Hk, cap, D)
        n = self.length(layer)
        if n:  # carry the cached tokens over (also from a cache that concatenated under autograd)
            pk, pv = self.self_kv[layer]
            kb[..., :n, :], vb[..., :n, :] = pk, pv
        self._buffers[layer] = (kb, vb)
        self.allocations += 1
        return kb, vb

    def ring(self, layer: int, window: CacheWindow) -> RingBuffer:
        """The ring buffer of a ``sink_window`` layer (created empty on first use)."""
        if layer in self.self_kv:
            raise ValueError(f"KVCache: layer {layer} already holds a growing cache; a sink_window layer needs a fresh KVCache")
        ring = self.rings.get(layer)
        if ring is None:
            ring = self.rings[layer] = RingBuffer(window)
        return ring

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps only batch rows ``index`` (e.g. after dropping finished sequences)."""
        for ring in self.rings.values():
            ring.reorder(index)
        for store in (self._buffers, self.cross_kv):
            for layer, (k, v) in store.items():
                store[layer] = (k.index_select(0, index), v.index_select(0, index))
        for layer, (k, v) in self.self_kv.items():
            if layer in self._buffers:
                kb, vb = self._buffers[layer]
                self.self_kv[layer] = (kb[..., : k.shape[-2], :], vb[..., : k.shape[-2], :])
            else:
                self.self_kv[layer] = (k.index_select(0, index), v.index_select(0, index))

    def crop(self, length: int) -> None:
        """Forgets every self-attention position from ``length`` on (the buffers stay: the next
        append writes over them), e.g. to decode again from the same prompt. A ring buffer crops
        only while it still holds what ``length`` needs (``RingBuffer.crop``)."""
        for ring in self.rings.values():
            ring.crop(length)
        for layer, (k, v) in self.self_kv.items():
            self.self_kv[layer] = (k[..., :length, :], v[..., :length, :])

    def nbytes(self) -> int:
        """Bytes of the keys and values cached so far (self- and cross-attention), not counting
        a buffer's room for later tokens (``allocated_bytes``); a ring's slots written so far."""
        return sum(t.numel() * t.element_size() for store in (self.self_kv, self.cross_kv)
                   for kv in store.values() for t in kv) + sum(r.nbytes() for r in self.rings.values())

    def allocated_bytes(self) -> int:
        """Bytes the cache holds in memory: the self-attention buffers whole, plus cross-attention."""
        kv = [t for b in self._buffers.values() for t in b]
        kv += [t for layer, b in self.self_kv.items() if layer not in self._buffers for t in b]
        kv += [t for b in self.cross_kv.values() for t in b]
        return sum(t.numel() * t.element_size() for t in kv) + sum(r.allocated_bytes() for r in self.rings.values())


def kv_cache_bytes(config: ModelConfig, batch: int, tokens: int, dtype: torch.dtype = torch.float32, *,
                   memory_tokens: int = 0) -> int:
    """Bytes of the keys and values a ``KVCache`` holds after ``tokens`` decoder positions:
    2 (K and V) x B x N x D x bytes x Σ_layers Hk_layer, with Hk_layer the K/V heads a layer
    keeps after pruning (a K/V head goes only with its whole query group). A ``sink_window``
    layer keeps min(N, (sink_blocks + window_blocks) x block_size) positions (its ring buffer),
    the same at any length past that. Encoder-decoders add the cross-attention K/V of
    ``memory_tokens`` encoder positions (every K/V head)."""
    if config.arch == "encoder":
        return 0
    H, Hk, D = config.num_heads, config.kv_heads, config.head_dim
    group = H // Hk
    first = config.num_layers if config.arch == "encoder_decoder" else 0
    layers = range(first, config.total_layers)
    spec = get_kernel(config.attention.kernel)
    kept = 0
    for layer in layers:
        heads = len({h // group for h in set(range(H)) - set(config.heads.pruned_heads.get(layer, []))})  # K/V heads still read
        window = cache_window_of(spec.make_state(config, layer, False)) if spec.make_state else None
        kept += heads * (tokens if window is None else min(tokens, window.capacity))
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * batch * D * size * (kept + len(layers) * Hk * memory_tokens)


class Attention(nn.Module):
    """Multi-head attention with output projection. ``head_ids`` holds the original ids of
    the query heads this layer still has, ``kv_ids`` those of its K/V heads (physical pruning
    removes rows of qkv / columns of o). With grouped K/V, query head h reads K/V head
    h // (H / Hk); a K/V head is pruned only when its whole group of query heads is.
    The fused ``qkv`` weight holds rows [q (H*D); k (Hk*D); v (Hk*D)]."""

    def __init__(self, config: ModelConfig, *, layer_idx: int, cross: bool = False, causal: bool = False):
        super().__init__()
        C, H, Hk, D = config.hidden_size, config.num_heads, config.kv_heads, config.head_dim
        self.layer_idx, self.cross, self.causal = layer_idx, cross, causal
        self.total_heads, self.head_dim, self.group = H, D, H // Hk
        self.scale = config.attention_scale or 1.0 / math.sqrt(D)
        self.dropout = config.attention.dropout
        spec = get_kernel(config.attention.kernel).for_layer(cross)  # the kernel names its cross-attention fallback
        self.spec = spec
        self.kernel_state = spec.make_state(config, layer_idx, cross) if spec.make_state else None
        self.cache_window = cache_window_of(self.kernel_state)  # a sink_window layer's bounded cache, else None
        self.register_buffer("head_ids", torch.arange(H), persistent=False)
        self.register_buffer("kv_ids", torch.arange(Hk), persistent=False)
        self.register_buffer("kv_index", torch.arange(H) // self.group, persistent=False)  # query head -> local K/V head
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        if cross:
            self.q_proj = nn.Linear(C, H * D, bias=qkv_bias)
            self.kv_proj = nn.Linear(C, 2 * Hk * D, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(C, (H + 2 * Hk) * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=config.bias)
        hc = config.heads
        self.router = None if cross or hc.active_heads is None else gating.HeadRouter(
            C, H, active=hc.active_heads, gating=hc.gating, balance_weight=hc.balance_loss_weight, causal=causal)
        self.aux_loss: torch.Tensor | None = None  # the router's balance term from the last forward
        # Importance by original head id (omninet.heads): gradient-based, and the online EMA.
        self.register_buffer("importance", torch.zeros(H), persistent=False)
        self.register_buffer("online_importance", torch.zeros(H), persistent=False)
        self.track_importance, self.importance_decay, self.online_updates = hc.online_importance, hc.importance_decay, 0
        pruned = config.heads.pruned_heads.get(layer_idx, []) if not cross else []
        if pruned:
            self.prune(pruned)

    @property
    def num_heads(self) -> int:
        return self.head_ids.numel()

    @property
    def num_kv_heads(self) -> int:
        return self.kv_ids.numel()

    def forward(self, x, *, mask=None, key_padding=None, memory=None, bias=None, rotary=None, cache=None, head_mask=None,
                need_weights=False):
        """x (B, N, C); memory (B, M, C) the encoder output for cross-attention; key_padding the
        ``KeyPadding`` of ``mask`` when it is a key-padding mask (``kernel_mask``). With a
        sequence-level router only the selected heads (index (B, k)) are computed."""
        gate = self.router(x, mask) if self.router is not None else None
        index = None if gate is None else gate.index
        if mask is not None and cache is not None and self.cache_window is not None:
            raise ValueError("a sink_window layer's bounded KV cache takes unpadded sequences: pass no attention_mask "
                             "(or an all-True one) when decoding with a cache")
        q, k, v, seen = self._project(x, memory, rotary, cache, index)
        kernel, causal = self.spec, self.causal
        if seen is not None:  # a ring's keys: dense attention under the layout's mask (causality included), true positions
            kernel, mask, causal = get_kernel("sdpa"), seen.mask, False
            bias = None if bias is None else AtPositions(bias, seen.q_pos, seen.k_pos)
        kernel = get_kernel("eager") if need_weights and not kernel.forms_weights else kernel
        out, weights = gating.attend(
            kernel, q, k, v, index=index, head_ids=self.head_ids, total_heads=self.total_heads, mask=mask, bias=bias,
            key_padding=key_padding, causal=causal, scale=self.scale, dropout_p=self.dropout if self.training else 0.0,
            need_weights=need_weights, state=self.kernel_state,
        )  # out (B, H|k, N, D)
        scale = gating.head_scale(gate, head_mask, self.head_ids)
        if scale is not None:
            out = out * scale.to(out.dtype)
        self.aux_loss = None if gate is None else gate.aux
        if self.track_importance:
            gating.update_online_importance(self, out, index)
        return self._output(out, index), weights

    def _output(self, out, index):
        """out (B, H|k, N, D) -> (B, N, C) through the o_proj columns of the heads that ran."""
        B, _, N, _ = out.shape
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, H*D | k*D)
        if index is None:
            return self.o_proj(out)
        return gating.gather_out(self.o_proj, out, index, self.num_heads, self.head_dim)

    def _project(self, x, memory, rotary, cache, index):
        """q (B, H|k, N, D) and k, v (B, H|k, Nk, D); only the selected heads when ``index``.
        The cache holds the Hk K/V heads; they are repeated to their query heads after it.
        The fourth value is the ``RingKeys`` of a ring-buffer call (k, v are then its keys), else None."""
        B, N, _ = x.shape
        H, Hk, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self.cross:
            q = self.q_proj(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
            if cache is not None and self.layer_idx in cache.cross_kv:
                k, v = cache.cross_kv[self.layer_idx]
            else:
                M = memory.shape[1]
                k, v = self.kv_proj(memory).view(B, M, 2, Hk, D).permute(2, 0, 3, 1, 4)  # (B, Hk, M, D) each
                if cache is not None:
                    cache.cross_kv[self.layer_idx] = (k, v)
            return q, *self._repeat_kv(k, v), None
        if index is not None and Hk == H:
            q, k, v = gating.gather_qkv(self.qkv, x, index, H, D)  # (B, k, N, D) each: only those rows run
        else:
            y = self.qkv(x)  # (B, N, (H + 2Hk) * D)
            if Hk == H:
                q, k, v = y.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # (B, H, N, D) each
            else:
                q = y[..., : H * D].view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
                k, v = y[..., H * D :].view(B, N, 2, Hk, D).permute(2, 0, 3, 1, 4)  # (B, Hk, N, D) each
        if rotary is not None:
            offset = cache.length(self.layer_idx) if cache is not None else 0
            q, k = rotary(q, offset), rotary(k, offset)
        seen = None
        if cache is not None and self.cache_window is not None:
            ring = cache.ring(self.layer_idx, self.cache_window)
            if ring.length:  # later calls read the ring (the keys their queries may see) instead of every key
                seen = ring.attend(k, v)
                k, v = seen.k, seen.v
            else:  # the prompt runs through the layer's kernel on its own keys; the ring keeps what the next queries see
                ring.write(k, v)
        elif cache is not None:
            k, v = cache.append(self.layer_idx, k, v)
        if Hk == H:
            return q, k, v, seen
        if index is not None:  # grouped K/V under a router: every head projected, the selected ones kept
            k, v = self._repeat_kv(k, v)
            sel = index[:, :, None, None]
            take = lambda t: t.gather(1, sel.expand(-1, -1, *t.shape[2:]))  # noqa: E731
            return take(q), take(k), take(v), seen
        return q, *self._repeat_kv(k, v), seen

    def _repeat_kv(self, k, v):
        """(B, Hk, Nk, D) -> (B, H, Nk, D): each query head's K/V head (a copy only with grouped K/V)."""
        if self.num_kv_heads == self.num_heads:
            return k, v
        return k.index_select(1, self.kv_index), v.index_select(1, self.kv_index)

    @torch.no_grad()
    def prune(self, heads: list[int]) -> None:
        """Physically removes the query heads with original ids ``heads``: their q rows and
        output-projection columns are dropped, so parameters and FLOPs shrink. A K/V head's
        rows (and its cache) go only when no query head of its group is left."""
        present = self.head_ids.tolist()
        missing = [h for h in heads if h not in present]
        if missing:
            raise ValueError(f"layer {self.layer_idx}: heads {missing} are not present (present: {present})")
        keep = [i for i, h in enumerate(present) if h not in set(heads)]
        if not keep:
            raise ValueError(f"layer {self.layer_idx}: pruning {sorted(heads)} would remove every head; keep at least one")
        H, Hk, D = len(present), self.num_kv_heads, self.head_dim
        dev = self.head_ids.device
        idx = torch.tensor(keep, device=dev)
        kept_heads = self.head_ids.index_select(0, idx)
        kept_groups = sorted(set((kept_heads // self.group).tolist()))  # original K/V ids still read
        kv_idx = torch.tensor([self.kv_ids.tolist().index(g) for g in kept_groups], device=dev)
        rows = lambda ids: (ids[:, None] * D + torch.arange(D, device=dev)).reshape(-1)  # noqa: E731 (heads -> rows of an (n*D) slab)
        q_rows, kv_rows = rows(idx), rows(kv_idx)
        if self.cross:
            self.q_proj = _select_rows(self.q_proj, q_rows)
            self.kv_proj = _select_rows(self.kv_proj, torch.cat([kv_rows, kv_rows + Hk * D]))
        else:
            self.qkv = _select_rows(self.qkv, torch.cat([q_rows, H * D + kv_rows, (H + Hk) * D + kv_rows]))
        self.o_proj = _select_cols(self.o_proj, q_rows)
        if self.router is not None:
            self.router.prune(idx)
        self.head_ids = kept_heads
        self.kv_ids = self.kv_ids.index_select(0, kv_idx)
        self.kv_index = torch.tensor([kept_groups.index(g) for g in (kept_heads // self.group).tolist()], device=dev)


def _select_rows(lin: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, rows.numel(), bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
    new.weight.copy_(lin.weight.index_select(0, rows))
    if lin.bias is not None:
        new.bias.copy_(lin.bias.index_select(0, rows))
    return new


def _select_cols(lin: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    new = nn.Linear(cols.numel(), lin.out_features, bias=lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype)
    new.weight.copy_(lin.weight.index_select(1, cols))
    if lin.bias is not None:
        new.bias.copy_(lin.bias)
    return new


class FeedForward(nn.Module):
    """down(act(up(x))), or with ``mlp='gated'`` down(act(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        C, F_, bias = config.hidden_size, config.ff_dim, config.bias
        self.gate = nn.Linear(C, F_, bias=bias) if config.mlp == "gated" else None
        self.up = nn.Linear(C, F_, bias=bias)
        self.act = ACTIVATIONS[config.activation]()
        self.down = nn.Linear(F_, C, bias=bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.act(self.up(x)) if self.gate is None else self.act(self.gate(x)) * self.up(x)
        return self.drop(self.down(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, *, layer_idx: int, causal: bool, cross: bool):
        super().__init__()
        self.post_norm = config.norm_placement == "post"
        self.ln1 = make_norm(config)
        self.attn = Attention(config, layer_idx=layer_idx, causal=causal)
        self.ln_cross = make_norm(config) if cross else None
        self.cross_attn = Attention(config, layer_idx=layer_idx, cross=True) if cross else None
        self.ln2 = make_norm(config)
        self.ffn = FeedForward(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, *, mask=None, key_padding=None, memory=None, memory_mask=None, memory_padding=None, bias=None,
                rotary=None, cache=None, head_mask=None, need_weights=False):
        # pre-norm: x + f(norm(x)); post-norm: norm(x + f(x))
        pre = (lambda ln, t: t) if self.post_norm else (lambda ln, t: ln(t))  # noqa: E731
        post = (lambda ln, t: ln(t)) if self.post_norm else (lambda ln, t: t)  # noqa: E731
        a, w = self.attn(pre(self.ln1, x), mask=mask, key_padding=key_padding, bias=bias, rotary=rotary, cache=cache,
                         head_mask=head_mask, need_weights=need_weights)
        x = post(self.ln1, x + self.drop(a))
        if self.cross_attn is not None:
            c, _ = self.cross_attn(pre(self.ln_cross, x), mask=memory_mask, key_padding=memory_padding, memory=memory,
                                   cache=cache)
            x = post(self.ln_cross, x + self.drop(c))
        return post(self.ln2, x + self.ffn(pre(self.ln2, x))), w


class Stack(nn.Module):
    """A list of blocks sharing one position scheme, with a final norm. ``layer_offset``
    numbers decoder layers after encoder layers (for head masks and pruning)."""

    def __init__(self, config: ModelConfig, *, num_layers: int, causal: bool, cross: bool = False, layer_offset: int = 0):
        super().__init__()
        self.config = config
        kind = config.position.kind
        self.rotary = Rotary(config) if kind == "rotary" else None
        self.bias = {"relative": lambda: RelativeBias(config, causal=causal), "alibi": lambda: Alibi(config)}.get(kind, lambda: None)()
        self.blocks = nn.ModuleList(
            Block(config, layer_idx=layer_offset + i, causal=causal, cross=cross) for i in range(num_layers)
        )
        self.norm = make_norm(config) if config.final_norm else nn.Identity()
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, x, *, mask=None, key_padding=None, memory=None, memory_mask=None, memory_padding=None, cache=None,
                head_mask=None, need_weights=False):
        """x (B, N, C); key_padding, memory_padding: the ``KeyPadding`` of mask, memory_mask
        (``kernel_mask``), read once for every layer; head_mask (num_layers_of_this_stack, H) or
        None. Returns (B, N, C), weights."""
        all_weights = []
        for i, block in enumerate(self.blocks):
            kwargs = dict(mask=mask, key_padding=key_padding, memory=memory, memory_mask=memory_mask,
                          memory_padding=memory_padding, bias=self.bias, rotary=self.rotary, cache=cache,
                          head_mask=None if head_mask is None else head_mask[i], need_weights=need_weights)
            if self.gradient_checkpointing and self.training and cache is None:
                x, w = checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x, w = block(x, **kwargs)
            all_weights.append(w)
        return self.norm(x), (all_weights if need_weights else None)


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None  # final-norm output (B, N, C) of the last stack
    encoder_hidden_states: torch.Tensor | None = None
    attentions: list[torch.Tensor] | None = None  # per self-attention layer (B, H, N, N), when asked for
    cache: KVCache | None = None
    aux_loss: torch.Tensor | None = None  # head routers' weighted balance term (training); already in `loss`


class OmniNetModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, C, padding_idx=None)
        self.pos = LearnedPositions(config) if config.position.kind == "learned" else None
        self.token_types = nn.Embedding(config.type_vocab_size, C) if config.type_vocab_size else None
        self.embed_norm = make_norm(config) if config.embedding_norm else None
        self.drop = nn.Dropout(config.dropout)
        if config.arch == "encoder_decoder":
            self.encoder = Stack(config, num_layers=config.num_layers, causal=False)
            self.decoder = Stack(config, num_layers=config.num_decoder_layers or config.num_layers, causal=True,
                                 cross=True, layer_offset=config.num_layers)
        elif config.arch == "encoder":
            self.encoder, self.decoder = Stack(config, num_layers=config.num_layers, causal=False), None
        else:
            self.encoder, self.decoder = None, Stack(config, num_layers=config.num_layers, causal=True)
        self.pooler = self.head_transform = None
        if config.num_classes is not None:
            self.pooler = nn.Sequential(nn.Linear(C, C), nn.Tanh()) if config.pooler else None
            self.classifier = nn.Linear(C, config.num_classes)
            self.lm_head = None
        else:
            self.classifier = None
            if config.lm_head_transform:  # BERT: dense -> activation -> norm, then the (tied) decoder
                self.head_transform = nn.Sequential(nn.Linear(C, C), ACTIVATIONS[config.activation](), make_norm(config))
            self.lm_head = nn.Linear(C, config.vocab_size, bias=config.lm_head_bias)
        self.apply(self._init_weights)
        if self.lm_head is not None and config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # ---- inputs -------------------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor, offset: int = 0, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        _check_ids(input_ids, self.config.vocab_size, "input_ids")
        x = self.embed(input_ids)  # (B, N, C)
        if self.pos is not None:
            x = x + self.pos(input_ids.shape[1], offset)
        if self.token_types is not None:  # no ids: every token is of type 0, as in BERT
            if token_type_ids is None:
                x = x + self.token_types.weight[0]
            else:
                if token_type_ids.shape != input_ids.shape:
                    raise ValueError(f"token_type_ids must have the shape of input_ids {list(input_ids.shape)}, "
                                     f"got {list(token_type_ids.shape)}")
                x = x + self.token_types(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given, but this model has no token-type embeddings (type_vocab_size=0)")
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.drop(x)

    def _head_mask(self, head_mask):
        """Normalizes head_mask to (total_layers, H) or None."""
        if head_mask is None:
            return None
        L, H = self.config.total_layers, self.config.num_heads
        if head_mask.dim() == 1 and head_mask.shape[0] == H:
            return head_mask.expand(L, H)
        if head_mask.shape == (L, H):
            return head_mask
        raise ValueError(f"head_mask must have shape [num_heads={H}] or [num_layers={L}, num_heads={H}], got {list(head_mask.shape)}")

    # ---- forward ------------------------------------------------------------------------
    def encode(self, input_ids=None, *, attention_mask=None, inputs_embeds=None, head_mask=None, need_weights=False,
               token_type_ids=None):
        x = self.embed_tokens(input_ids, token_type_ids=token_type_ids) if inputs_embeds is None else self.drop(inputs_embeds)
        mask, padding = kernel_mask(attention_mask_4d(attention_mask, x, "attention_mask", num_heads=self.config.num_heads))
        hm = self._head_mask(head_mask)
        return self.encoder(x, mask=mask, key_padding=padding, head_mask=None if hm is None else hm[: len(self.encoder.blocks)],
                            need_weights=need_weights)

    def forward(self, input_ids=None, *, attention_mask=None, labels=None, decoder_input_ids=None,
                decoder_attention_mask=None, inputs_embeds=None, head_mask=None, cache: KVCache | None = None,
                use_cache: bool = False, output_attentions: bool = False, encoder_hidden_states=None,
                token_type_ids=None, logits_to_keep: int = 0) -> ModelOutput:
        """input_ids (B, N) long; attention_mask (B, N) bool, True = real token (or a bool mask
        broadcastable to (B, H, N, N)); labels: (B,) class ids with a classifier, else (B, N)
        target ids aligned with the logits (already shifted; -100 = ignore). ``logits_to_keep``
        n > 0 gives LM logits of the last n positions only, (B, n, V) (a prefill needs one);
        0 gives every position's."""
        cfg = self.config
        if input_ids is None and inputs_embeds is None and encoder_hidden_states is None:
            raise ValueError("pass input_ids (B, N) or inputs_embeds (B, N, C)")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0 = every position), got {logits_to_keep!r}")
        if logits_to_keep and labels is not None:
            raise ValueError("labels need every position's logits; pass logits_to_keep=0 with labels")
        if use_cache and cache is None:
            cache = KVCache()
        hm = self._head_mask(head_mask)
        enc_out = encoder_hidden_states
        attentions = None
        if cfg.arch == "decoder":
            x, mask, padding = self._decoder_inputs(input_ids, inputs_embeds, attention_mask, cache)
            h, attentions = self.decoder(x, mask=mask, key_padding=padding, cache=cache, head_mask=hm,
                                         need_weights=output_attentions)
        elif cfg.arch == "encoder":
            h, attentions = self.encode(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                        head_mask=hm, need_weights=output_attentions, token_type_ids=token_type_ids)
            enc_out = h
        else:
            if enc_out is None:
                enc_out, attentions = self.encode(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                                  head_mask=hm, need_weights=output_attentions)
            if decoder_input_ids is None:
                raise ValueError("encoder_decoder models need decoder_input_ids (B, T)")
            x, mask, padding = self._decoder_inputs(decoder_input_ids, None, decoder_attention_mask, cache)
            if attention_mask is not None and attention_mask.dim() != 2:
                raise ValueError("encoder_decoder models take a [B, N] padding attention_mask for the encoder")
            memory_mask, memory_padding = kernel_mask(attention_mask_4d(attention_mask, enc_out, "attention_mask"))
            h, dec_w = self.decoder(x, mask=mask, key_padding=padding, memory=enc_out, memory_mask=memory_mask,
                                    memory_padding=memory_padding, cache=cache,
                                    head_mask=None if hm is None else hm[cfg.num_layers :], need_weights=output_attentions)
            attentions = attentions + dec_w if output_attentions else None
        logits = self._head(h, attention_mask if cfg.arch == "encoder" else None, logits_to_keep)
        loss = self._loss(logits, labels) if labels is not None else None
        aux = gating.collect_aux_loss(self.attention_layers())  # head routers' balance term (training)
        if aux is not None and loss is not None:
            loss = loss + aux
        return ModelOutput(logits=logits, loss=loss, hidden_states=h, encoder_hidden_states=enc_out,
                           attentions=attentions, cache=cache, aux_loss=aux)

    def _decoder_inputs(self, input_ids, inputs_embeds, attention_mask, cache):
        offset = cache.length(self.decoder.blocks[0].attn.layer_idx) if cache is not None else 0
        x = self.embed_tokens(input_ids, offset) if inputs_embeds is None else self.drop(inputs_embeds)
        mask, padding = kernel_mask(attention_mask_4d(attention_mask, x, "attention_mask", total_keys=offset + x.shape[1],
                                                      num_heads=self.config.num_heads))
        return x, mask, padding

    def _head(self, h, attention_mask, logits_to_keep=0):
        if self.classifier is None:
            if logits_to_keep:
                h = h[:, -logits_to_keep:]  # (B, n, C)
            return self.lm_head(h if self.head_transform is None else self.head_transform(h))  # (B, N, V)
        pooled = pool(h, attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None,
                      self.config.pooling)
        if self.pooler is not None:
            pooled = self.pooler(pooled)
        return self.classifier(pooled)  # (B, num_classes)

    def _loss(self, logits, labels):
        if self.classifier is not None:
            if labels.shape != logits.shape[:1]:
                raise ValueError(f"labels must have shape [B={logits.shape[0]}] class ids, got {list(labels.shape)}")
            return F.cross_entropy(logits.float(), labels)
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels must have shape [B, N]={list(logits.shape[:2])} (targets aligned with logits), got {list(labels.shape)}")
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    # ---- generation ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, eos_token_id: int | None = None, attention_mask=None,
                 decoder_start_token_id: int | None = None, generator: torch.Generator | None = None,
                 ignore_eos: bool = False) -> torch.Tensor:
        """Autoregressive decoding with the KV cache. ``temperature=0`` is greedy. Decoder
        models continue ``input_ids`` (B, N; unpadded); encoder-decoder models encode
        ``input_ids`` and decode from ``decoder_start_token_id``. Returns the generated ids
        (B, N + new) for decoders, (B, 1 + new) for encoder-decoders; finished rows are
        padded with ``pad_token_id``. ``ignore_eos`` generates exactly ``max_new_tokens``
        (benchmarks). The prefill forms logits for the last position only, and the cache is
        allocated once for prompt + max_new_tokens."""
        cfg = self.config
        if cfg.arch == "encoder":
            raise ValueError("generate() needs arch='decoder' or 'encoder_decoder'; this model is an encoder")
        if max_new_tokens < 1 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError("generate(): max_new_tokens >= 1, temperature >= 0 and top_k >= 1 (or None) are required")
        eos = None if ignore_eos else (cfg.eos_token_id if eos_token_id is None else eos_token_id)
        prompt = 1 if cfg.arch == "encoder_decoder" else input_ids.shape[1]
        cache = KVCache(capacity=prompt + max_new_tokens)
        if cfg.arch == "encoder_decoder":
            start = decoder_start_token_id if decoder_start_token_id is not None else (cfg.bos_token_id or cfg.pad_token_id)
            enc, _ = self.encode(input_ids, attention_mask=attention_mask)
            seq = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
            step = lambda ids: self(decoder_input_ids=ids, attention_mask=attention_mask, encoder_hidden_states=enc,
                                    cache=cache, logits_to_keep=1)
        else:
            seq = input_ids
            step = lambda ids: self(ids, cache=cache, logits_to_keep=1)
        done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
        logits = step(seq).logits[:, -1]
        for i in range(max_new_tokens):
            nxt = sample(logits, temperature=temperature, top_k=top_k, generator=generator)
            nxt = torch.where(done, torch.full_like(nxt, cfg.pad_token_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            if eos is not None:
                done |= nxt == eos
                if bool(done.all()):
                    break
            if i < max_new_tokens - 1:
                logits = step(nxt[:, None]).logits[:, -1]
        return seq

    # ---- pruning ------------------------------------------------------------------------
    def attention_layers(self) -> list[Attention]:
        """Self-attention modules in global layer order (encoder first)."""
        stacks = [s for s in (self.encoder, self.decoder) if s is not None]
        return [b.attn for s in stacks for b in s.blocks]

    def prune_heads(self, heads: dict[int, list[int]]) -> None:
        """Physically removes heads (original ids) per layer and records them in the config."""
        self.config = prune_layer_heads(self.attention_layers(), self.config, heads)

    # ---- persistence --------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """config.json + model.safetensors, and the tokenizer files of the folder the model
        came from (an imported checkpoint's travel with it)."""
        from safetensors.torch import save_model

        from omninet.interop.hf import copy_tokenizer_files  # interop imports this module

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(self.config.to_json(indent=2))
        save_model(self, str(d / "model.safetensors"))
        if getattr(self, "source_dir", None) is not None:
            copy_tokenizer_files(self.source_dir, d)

    @classmethod
    def from_hf(cls, path, *, dtype: torch.dtype = torch.float32, max_seq_length: int | None = None) -> "OmniNetModel":
        """A Hugging Face folder (config.json + safetensors) or a GGUF file, with the same
        outputs as transformers' model of it (``omninet.interop``)."""
        from omninet.interop.hf import load_hf  # interop imports this module

        return load_hf(cls, path, dtype=dtype, max_seq_length=max_seq_length)

    def save_hf(self, directory, *, tokenizer_from=None):
        """A Hugging Face folder of this model that transformers loads with the same logits,
        for dense kernels; refuses what HF cannot express (``omninet.interop.hf.save_hf``)."""
        from omninet.interop.hf import save_hf  # interop imports this module

        return save_hf(self, directory, tokenizer_from=tokenizer_from)

    @classmethod
    def from_pretrained(cls, directory, *, device="cpu") -> "OmniNetModel":
        from safetensors.torch import load_model

        d = Path(directory)
        if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
            raise ValueError(f"{d} is not a saved OmniNet model: expected config.json and model.safetensors")
        model = cls(ModelConfig.from_dict(json.loads((d / "config.json").read_text())))
        load_model(model, str(d / "model.safetensors"), device=str(device))
        model.source_dir = d
        return model.to(device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


def check_prune_heads(heads, num_layers: int, num_heads: int, present: list[list[int]]) -> None:
    """ValueError (one line, naming ``heads`` and the fix) for a pruning request that names a
    layer or head that does not exist or would empty a layer. Nothing is changed."""
    if not isinstance(heads, dict):
        raise ValueError(f"prune_heads: heads must be a dict {{layer: [head ids]}}, got {type(heads).__name__}")
    for layer, ids in heads.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(f"prune_heads: layer {layer!r} out of range [0, {num_layers}); "
                             f"use layer indices 0..{num_layers - 1} as the keys of heads")
        if not isinstance(ids, (list, tuple)) or any(isinstance(h, bool) or not isinstance(h, int) for h in ids):
            raise ValueError(f"prune_heads: heads[{layer}] must be a list of int head ids, got {ids!r}")
        bad = [h for h in ids if not 0 <= h < num_heads]
        if bad:
            raise ValueError(f"prune_heads: head ids {bad} out of range [0, {num_heads}) in layer {layer}; "
                             f"use original head ids 0..{num_heads - 1}")
    for layer, ids in heads.items():  # check every layer before changing any
        if not set(present[layer]) - set(ids):
            raise ValueError(f"prune_heads: heads[{layer}]={sorted(set(ids))} would remove every head of layer {layer} "
                             f"(left: {present[layer]}); keep at least one")


def prune_layer_heads(layers: list["Attention"], config: ModelConfig, heads: dict[int, list[int]]) -> ModelConfig:
    """Removes heads (original ids) from ``layers`` (self-attention modules in global layer
    order) and returns ``config`` with them recorded in ``heads.pruned_heads``. Pruning a head
    that is already gone is a no-op; every check runs before anything changes."""
    check_prune_heads(heads, len(layers), config.num_heads, [a.head_ids.tolist() for a in layers])
    merged = {k: sorted(set(v)) for k, v in config.heads.pruned_heads.items()}
    for layer, ids in heads.items():
        new = [h for h in ids if h not in merged.get(layer, [])]
        if new:
            layers[layer].prune(new)
        merged[layer] = sorted(set(merged.get(layer, [])) | set(ids))
    return config.replace(heads=config.heads.replace(pruned_heads=merged))


def sample(logits: torch.Tensor, *, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def pool(h: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """h (B, N, C), mask (B, N) True = real -> (B, C)."""
    if how == "cls":
        return h[:, 0]
    if mask is None:
        return h.mean(1) if how == "mean" else h[:, -1]
    if how == "mean":
        m = mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)
    last = mask.long().cumsum(1).argmax(1)  # index of the last real token
    return h[torch.arange(h.shape[0], device=h.device), last]


def attention_mask_4d(mask, x, name: str, *, total_keys: int | None = None, num_heads: int = 1):
    """Validates a user mask and returns a bool mask broadcastable to (B, H, N, Nk), or None.
    (B, Nk) padding masks become (B, 1, 1, Nk)."""
    if mask is None:
        return None
    B, N = x.shape[:2]
    Nk = total_keys or N
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of bools (True = attend), got {type(mask).__name__}")
    if mask.device != x.device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {x.device}; move it with .to({str(x.device)!r})")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point:
            raise ValueError(f"{name} must be bool (True = attend) or 0/1 integers; got {mask.dtype}. Use mask.bool()")
        mask = mask.bool()
    if mask.dim() == 2:
        if mask.shape != (B, Nk):
            raise ValueError(f"{name} of shape {list(mask.shape)} must be [B={B}, N={Nk}] (True = real token)")
        if not bool(mask.any(dim=1).all()):
            raise ValueError(f"{name}: some sequence has no real token (an all-False row); drop it from the batch")
        return mask[:, None, None, :]
    m = mask if mask.dim() == 4 else mask[:, None] if mask.dim() == 3 else None
    ok = m is not None and m.shape[0] in (1, B) and m.shape[1] in (1, num_heads) and m.shape[2] in (1, N) and m.shape[3] == Nk
    if not ok:
        raise ValueError(f"{name} of shape {list(mask.shape)} does not broadcast to [B, H, N, Nk]={[B, num_heads, N, Nk]}; "
                         "pass a [B, N] padding mask or a [B|1, H|1, N|1, Nk] bool mask")
    return m


def kernel_mask(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, KeyPadding | None]:
    """The mask every layer's kernel gets, decided once per forward, and its key padding: None
    when it is all True (no padding: each kernel takes its no-mask path, SDPA its fused one),
    else the mask; a key-padding mask (B, 1, 1, Nk) also gives its ``KeyPadding`` (each row's
    length, read here once), which block-sparse layouts fold into their plans."""
    if mask is None or bool(mask.all()):
        return None, None
    return mask, key_padding_of(mask)


def key_padding_of(mask: torch.Tensor | None) -> KeyPadding | None:
    """``KeyPadding.of(mask)`` when ``mask`` is a key-padding mask (B|1, 1, 1, Nk), else None."""
    if mask is None or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    return KeyPadding.of(mask)


def _check_ids(ids, vocab: int, name: str) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"{name} must be an integer tensor [B, N] of token ids, got "
                         f"{type(ids).__name__ if not isinstance(ids, torch.Tensor) else ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape [B, N], got {list(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name} holds ids outside [0, vocab_size={vocab}); raise vocab_size or fix the tokenizer")
