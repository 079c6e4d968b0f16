"""Linformer attention (Wang et al. 2020): keys and values are projected along the sequence
to k rows by learned matrices, so attention costs O(N k) instead of O(N^2).

Dimensions: B batch, H heads, Nq queries, N keys, D head dim, k projected length,
n_max = ModelConfig.max_seq_length.

- ``E`` (k_max, n_max) projects keys and ``F`` values: K' = E[:k, :N] @ K, V' = F[:k, :N] @ V
  (B, H, k, D); out = softmax(Q K'^T * scale) V'. Any N <= n_max works (the first N
  columns); ``k = min(k_max, ceil(N / compression))`` when adaptive, and never more than N
  (a projection to more rows than keys adds nothing and would skew the softmax).
- Sharing (``LinformerConfig.sharing``): 'headwise' E and F per layer, shared by all heads;
  'kv' one matrix per layer for keys and values (F = E); 'layerwise' one matrix for keys
  and values of every Linformer layer of a model. Layerwise sharing is implemented by
  ``make_state``: the first Linformer layer of a model creates the projection and the
  later layers (built right after it, from the same config object) reuse that very module,
  so it appears in each layer's state and counts once in ``num_parameters``.
- Padding: key-padding masks (B|1, H|1, 1, N) zero the padded keys and values *before*
  projecting, so padded positions contribute nothing (their content never matters, and a
  padded sequence equals its unpadded self when k is the same); a projected key that no
  real key feeds (a row of E that only touches padding) is masked out of the softmax.
  Masks that differ per query cannot survive the projection and are rejected.
- Causal attention is impossible (projecting along the sequence mixes the future into the
  past): the kernel refuses ``causal=True`` and ModelConfig refuses linformer outside
  encoders. Cross-attention layers use dense SDPA (the spec's ``cross_fallback``).
- ``set_identity_()`` sets E = F = I, so that with k >= N the kernel equals dense attention
  (how the conformance suite checks this approximate kernel); ``make_exact(n)`` does the
  same after checking that k >= n (ValueError otherwise).
- ``mean_pool_(n)`` sets projected row j to the mean of keys j*s .. (j+1)*s - 1 (s = ceil(N / k)):
  how a Linformer layer starts from a trained dense one (the spec's ``from_dense`` hook, run by a
  derived trial's kernel swap), attending to k segment means until the fine-tune learns E/F.
- Sequences of at most ``min_seq_length`` keys use dense SDPA; a layer not listed in
  ``LinformerConfig.layers`` has state None and always uses dense SDPA.
- ``need_weights``: the effective (B, H, Nq, N) weights P @ F[:k, :N] (out = weights @ V).
- Search spaces: a searched ``model.attention.linformer.k`` range is clipped to the measured
  length (``fit_linformer_rank``, the spec's ``search_space`` rule): ranks above N all run as k = N.
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from omninet.attention.dense import eager_attention, sdpa_attention
from omninet.attention.registry import AttentionMemory, AttentionWork, get_kernel, register_kernel
from omninet.config import LinformerConfig, ModelConfig

__all__ = ["LinformerProjection", "linformer_attention", "linformer_layers", "make_linformer_state", "projected_length",
           "check_linformer_config", "linformer_memory", "linformer_work", "fit_linformer_rank", "linformer_from_dense"]


class LinformerProjection(nn.Module):
    """Learned sequence projections of one Linformer layer (or of all, when layerwise)."""

    def __init__(self, config: LinformerConfig, *, max_seq_length: int):
        super().__init__()
        self.config, self.max_seq_length = config, max_seq_length
        self.E = nn.Parameter(torch.empty(config.k, max_seq_length))  # (k_max, n_max)
        self.F = None if config.sharing in ("kv", "layerwise") else nn.Parameter(torch.empty(config.k, max_seq_length))
        for p in self.parameters():
            nn.init.xavier_normal_(p)  # a projection sums N rows: var = 2N / (k + n_max) <= 2

    def extra_repr(self) -> str:
        c = self.config
        return f"k={c.k}, n_max={self.max_seq_length}, sharing={c.sharing!r}, adaptive={c.adaptive}"

    def rank(self, n: int) -> int:
        """Projected length k for N = n keys."""
        return projected_length(self.config, n)

    @torch.no_grad()
    def set_identity_(self) -> "LinformerProjection":
        """E = F = I (rectangular): with k >= N the kernel then equals dense attention."""
        for p in self.parameters():
            p.copy_(torch.eye(*p.shape, dtype=p.dtype, device=p.device))
        return self

    @torch.no_grad()
    def mean_pool_(self, n: int) -> "LinformerProjection":
        """E (and F) such that projected row j is the mean of keys ``j*s .. min((j+1)*s, n) - 1``,
        ``s = ceil(n / k)`` at length n (rows past n follow the same rule on the continuation):
        the start of a projection added to a trained dense layer, which then attends to k
        segment means."""
        stride = math.ceil(n / self.rank(n))
        for p in self.parameters():
            w = torch.zeros_like(p)  # (k_max, n_max)
            for j in range(p.shape[0]):
                lo, hi = j * stride, min((j + 1) * stride, p.shape[1])
                if lo < hi:
                    w[j, lo:hi] = 1.0 / (hi - lo)
            p.copy_(w)
        return self

    def make_exact(self, n: int) -> "LinformerProjection":
        """Identity projections, after checking that inputs of ``n`` keys keep all n rows
        (k >= n): the kernel then equals dense attention for every length up to n."""
        if self.rank(n) < n:
            raise ValueError(f"Linformer with k={self.config.k} (adaptive={self.config.adaptive}) projects {n} keys "
                             f"to {self.rank(n)} rows, so it cannot equal dense attention; use k >= {n}")
        return self.set_identity_()

    def project(self, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
        """k, v (B, H, N, D); key_mask (B|1, H|1, 1, N) bool or None -> k', v' (B, H, kk, D),
        the value projection (kk, N) actually used, and a (B|1, H|1, 1, kk) bool mask of the
        projected keys that some real key feeds (None when all are): a projected row built
        from padded positions only (e.g. with identity projections) must not take softmax mass."""
        n = k.shape[-2]
        kk = self.rank(n)
        e = self.E[:kk, :n].to(k.dtype)  # (kk, N)
        f = e if self.F is None else self.F[:kk, :n].to(v.dtype)
        fed = None
        if key_mask is not None:
            keep = key_mask.transpose(-1, -2).to(k.dtype)  # (B|1, H|1, N, 1)
            k, v = k * keep, v * keep
            with torch.no_grad():
                fed = torch.matmul(e.abs(), keep).transpose(-1, -2) > 0  # (B|1, H|1, 1, kk)
            fed = None if bool(fed.all()) else fed
        return _along_sequence(e, k), _along_sequence(f, v), f, fed


def projected_length(config: LinformerConfig, n: int) -> int:
    """k for N = n keys: ``min(k, ceil(n / compression))`` when adaptive, never more than n."""
    k = min(config.k, math.ceil(n / config.compression)) if config.adaptive else config.k
    return max(1, min(k, n))


def _along_sequence(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p (kk, N) applied along the sequence of x (B, H, N, D) -> (B, H, kk, D), as one GEMM
    (kk, N) @ (N, H*D) per batch row; x.transpose(1, 2) is already (B, N, H, D) in memory for
    the model's fused qkv projection, so no copy is made there."""
    B, H, N, D = x.shape
    flat = x.transpose(1, 2).reshape(B, N, H * D)  # (B, N, H*D)
    return torch.matmul(p, flat).view(B, -1, H, D).transpose(1, 2)  # (B, H, kk, D)


def linformer_layers(config: ModelConfig, *, default_all: bool) -> list[int]:
    """Encoder layers that use Linformer: ``LinformerConfig.layers``, else every layer
    (``default_all``, the 'linformer' kernel) or the odd ones (the 'hybrid' kernel)."""
    layers = config.attention.linformer.layers
    if layers is None:
        return list(range(config.num_layers)) if default_all else list(range(1, config.num_layers, 2))
    bad = [i for i in layers if i >= config.num_layers]
    if bad:
        raise ValueError(f"LinformerConfig.layers {bad} out of range: the encoder has num_layers={config.num_layers}")
    return sorted(layers)


# id(model config) -> the layerwise-shared projection; weak, so a dropped model frees it.
_SHARED: "weakref.WeakValueDictionary[int, LinformerProjection]" = weakref.WeakValueDictionary()


def make_linformer_state(config: ModelConfig, layer_idx: int, cross: bool, *, default_all: bool = True):
    """The layer's ``LinformerProjection``, or None for layers that do not use Linformer."""
    layers = linformer_layers(config, default_all=default_all)
    if cross or layer_idx not in layers:
        return None
    lcfg = config.attention.linformer
    if lcfg.sharing != "layerwise":
        return LinformerProjection(lcfg, max_seq_length=config.max_seq_length)
    shared = _SHARED.get(id(config))
    if layer_idx == layers[0] or shared is None or shared.owner() is not config:
        shared = LinformerProjection(lcfg, max_seq_length=config.max_seq_length)
        shared.owner = weakref.ref(config)
        _SHARED[id(config)] = shared
    return shared


def check_linformer_call(q, k, *, mask, bias, causal, state: LinformerProjection) -> None:
    if causal:
        raise ValueError("Linformer cannot be causal (projecting keys along the sequence mixes future tokens into "
                         "the past); use it in encoder self-attention, or the 'block_sparse' kernel for decoders")
    if bias is not None:
        raise ValueError("Linformer projects keys along the sequence, so per-pair position biases cannot apply; "
                         "use position.kind 'learned', 'rotary' or 'none'")
    if mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1:
        raise ValueError(f"Linformer accepts key-padding masks [B, 1, 1, N] only (a per-query mask cannot survive "
                         f"the projection); got a mask of shape {list(mask.shape)}")
    if k.shape[-2] > state.max_seq_length:
        raise ValueError(f"Linformer: {k.shape[-2]} keys exceed the projection length max_seq_length="
                         f"{state.max_seq_length}; raise ModelConfig.max_seq_length")


def linformer_core(q, k, v, *, mask, scale, dropout_p, need_weights, state: LinformerProjection):
    """The projected computation (no dispatch): q (B, H, Nq, D), k, v (B, H, N, D)."""
    key_mask = None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    kp, vp, f, fed = state.project(k, v, key_mask)  # (B, H, kk, D); fed (B|1, H|1, 1, kk) or None
    if need_weights:
        scores = torch.matmul(q, kp.transpose(-1, -2)).float() * scale  # (B, H, Nq, kk)
        if fed is not None:
            scores = scores.masked_fill(~fed, float("-inf"))
        p = scores.softmax(-1).to(q.dtype)
        p_drop = F.dropout(p, p=dropout_p) if dropout_p > 0 else p
        weights = torch.matmul(p, f)  # (B, H, Nq, N): out = weights @ (V * keep)
        if key_mask is not None:
            weights = weights * key_mask.to(weights.dtype)
        return torch.matmul(p_drop, vp), weights
    return F.scaled_dot_product_attention(q, kp, vp, attn_mask=fed, dropout_p=dropout_p, scale=scale), None


def check_linformer_layers(config: ModelConfig) -> None:
    layers = config.attention.linformer.layers
    if layers is not None and max(layers, default=0) >= config.num_layers:
        raise ValueError(f"LinformerConfig.layers {layers} names layers out of range for num_layers={config.num_layers}")


def check_linformer_config(config: ModelConfig) -> None:
    """Linformer fits encoders with positions that are not per-pair biases."""
    check_linformer_layers(config)
    if config.arch != "encoder":
        raise ValueError("Linformer cannot be causal (projecting keys along the sequence mixes future tokens into the past); "
                         "use attention.kernel='linformer' only with arch='encoder', or pick 'block_sparse' for decoders")
    if config.position.kind not in ("learned", "rotary", "none"):
        raise ValueError(f"Linformer projects keys along the sequence, so per-pair position biases ({config.position.kind!r}) "
                         "cannot apply; use position.kind 'learned' or 'rotary'")


def _projects(config: ModelConfig, N: int, *, layer_idx: int, cross: bool, default_all: bool) -> bool:
    """Whether the layer runs the projected computation for N keys (else dense SDPA)."""
    return (not cross and N > config.attention.linformer.min_seq_length
            and layer_idx in linformer_layers(config, default_all=default_all))


def linformer_work(config: ModelConfig, N: int, *, layer_idx: int, cross: bool, default_all: bool = True) -> AttentionWork:
    """A query attends to the k projected keys; E and F project keys and values along N
    ((k, N) @ (N, hidden) each). Dense SDPA's work on layers or lengths that do not project."""
    if not _projects(config, N, layer_idx=layer_idx, cross=cross, default_all=default_all):
        return get_kernel("sdpa").attention_work(config, N, layer_idx=layer_idx, cross=cross)
    k = projected_length(config.attention.linformer, N)
    return AttentionWork("linformer", float(k), 2.0 * k * N * config.hidden_size)


def fit_linformer_rank(param, seq_length: int):
    """A searched ``model.attention.linformer.k`` range clipped to the measured length (a rank
    above N runs as k = N: ``projected_length``), with a note; other parameters unchanged."""
    if param.path != "model.attention.linformer.k" or param.kind == "categorical" or param.high <= seq_length:
        return param, None
    if param.low >= seq_length:
        raise ValueError(f"low {param.low} is above the measured length {seq_length}; Linformer's rank cannot exceed "
                         "the sequence length")
    return (dataclasses.replace(param, high=seq_length),
            f"clipped {param.path} high {param.high:g} -> {seq_length} (the measured length)")


def linformer_from_dense(state: LinformerProjection | None, *, seq_length: int) -> str | None:
    """The kernel swap's start for a Linformer layer: E/F as a strided mean pool at the task's length."""
    if state is None:
        return None
    state.mean_pool_(seq_length)
    return "E/F start as a strided mean pool"


def describe_linformer(config: ModelConfig, seq_length: int) -> str:
    return f"k {projected_length(config.attention.linformer, seq_length)} at {seq_length} tokens"


def linformer_memory(config: ModelConfig, B: int, N: int, s: int, *, layer_idx: int, cross: bool,
                     default_all: bool = True):
    """Per layer: the (B, H, N, k) scores in fp32 (and their low-precision copy saved for backward)
    plus the projected K', V'; dense SDPA's cost on layers or lengths that do not project."""
    if not _projects(config, N, layer_idx=layer_idx, cross=cross, default_all=default_all):
        return get_kernel("sdpa").memory(config, B, N, s, layer_idx=layer_idx, cross=cross)
    k, H, C = projected_length(config.attention.linformer, N), config.num_heads, config.hidden_size
    return AttentionMemory(transient=2 * B * H * N * k * 4 + 2 * B * k * C * s,
                           saved=B * H * N * k * s + 2 * B * k * C * s)


@register_kernel("linformer", make_state=make_linformer_state, supports_causal=False, supports_bias=False, exact=False,
                 memory=linformer_memory, supports_cross=False, cross_fallback="sdpa",
                 check_config=check_linformer_config, work=linformer_work, search_space=fit_linformer_rank,
                 from_dense=linformer_from_dense, describe=describe_linformer)
def linformer_attention(q, k, v, *, mask=None, bias=None, causal=False, scale, dropout_p=0.0, need_weights=False,
                        state=None, key_padding=None):  # key_padding: read from mask
    if state is None or k.shape[-2] <= state.config.min_seq_length:
        if causal and state is not None:
            check_linformer_call(q, k, mask=mask, bias=bias, causal=causal, state=state)
        dense = eager_attention if need_weights else sdpa_attention
        return dense(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, dropout_p=dropout_p,
                     need_weights=need_weights)
    if not isinstance(state, LinformerProjection):
        raise ValueError("linformer attention needs state=LinformerProjection; build it with "
                         "KERNELS['linformer'].make_state(model_config, layer_idx, cross)")
    check_linformer_call(q, k, mask=mask, bias=bias, causal=causal, state=state)
    return linformer_core(q, k, v, mask=mask, scale=scale, dropout_p=dropout_p, need_weights=need_weights, state=state)
