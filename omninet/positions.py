"""Position schemes: learned absolute, T5 relative bias, rotary (RoPE), ALiBi.

Dimensions: B batch, H heads, N tokens, D head dim, C hidden.
Learned absolute positions are added to the embeddings; rotary rotates q and k inside
attention; relative and ALiBi are additive score biases, handed to kernels as a lazy
``bias(q_pos, k_pos) -> (H, Nq, Nk)`` so that sparse kernels compute only the blocks they use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from omninet.config import ModelConfig


class LearnedPositions(nn.Module):
    """A table of ``position.offset + max_seq_length`` rows; token i reads row offset + i
    (RoBERTa keeps its first padding_idx + 1 rows unused)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.max_len, self.offset = config.max_seq_length, config.position.offset
        self.table = nn.Embedding(self.offset + config.max_seq_length, config.hidden_size)

    def forward(self, n: int, offset: int = 0) -> torch.Tensor:  # (N, C)
        if offset + n > self.max_len:
            raise ValueError(
                f"sequence of {offset + n} tokens exceeds max_seq_length={self.max_len} of learned positions; "
                "raise max_seq_length, or use position.kind='rotary' or 'alibi', which extrapolate"
            )
        start = self.offset + offset
        return self.table(torch.arange(start, start + n, device=self.table.weight.device))


class Rotary(nn.Module):
    """RoPE (Su et al. 2021), rotate-half form. Works at any position (extrapolates)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.head_dim
        inv_freq = 1.0 / (config.position.rope_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        if config.position.rope_scaling is not None:
            inv_freq = scaled_inv_freq(inv_freq, config.position.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _cos_sin(self, end: int, device, dtype):
        if self._cache is None or self._cache[0] < end or self._cache[1].device != device:
            # Doubling: a decode step past the table's end must not rebuild an O(N) table per token.
            size = max(end, 256, 2 * self._cache[0] if self._cache is not None else 0)
            t = torch.arange(size, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq.to(device))  # (N, D/2)
            emb = torch.cat([freqs, freqs], dim=-1)  # (N, D)
            self._cache = (size, emb.cos(), emb.sin())
        _, cos, sin = self._cache
        return cos.to(dtype), sin.to(dtype)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x (B, H, N, D) whose tokens sit at positions offset .. offset+N-1."""
        n = x.shape[-2]
        cos, sin = self._cos_sin(offset + n, x.device, x.dtype)
        cos, sin = cos[offset : offset + n], sin[offset : offset + n]
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def scaled_inv_freq(inv_freq: torch.Tensor, scaling) -> torch.Tensor:
    """Rotary frequencies (D/2,) under a ``RopeScalingConfig``, as transformers computes them
    (``_compute_linear_scaling_rope_parameters``, ``_compute_llama3_parameters``)."""
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)  # long waves: interpolated
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * out / scaling.factor + smooth * out
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, out)


class RelativeBias(nn.Module):
    """T5's bucketed relative position bias, one scalar per (head, bucket), shared by every
    layer of a stack as in T5."""

    def __init__(self, config: ModelConfig, *, causal: bool):
        super().__init__()
        self.causal = causal
        self.num_buckets = config.position.num_buckets
        self.max_distance = config.position.max_distance
        self.table = nn.Embedding(self.num_buckets, config.num_heads)

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        """rel = k_pos - q_pos -> bucket ids (T5's ``_relative_position_bucket``)."""
        n = self.num_buckets
        out = torch.zeros_like(rel)
        if self.causal:
            rel = -torch.clamp(rel, max=0)
        else:
            n //= 2
            out = out + (rel > 0).long() * n
            rel = rel.abs()
        exact = n // 2
        is_small = rel < exact
        large = exact + (
            torch.log(rel.float().clamp(min=1) / exact) / math.log(self.max_distance / exact) * (n - exact)
        ).long()
        large = large.clamp(max=n - 1)
        return out + torch.where(is_small, rel, large)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:  # (H, Nq, Nk)
        rel = k_pos[None, :] - q_pos[:, None]
        return self.table(self.bucket(rel)).permute(2, 0, 1)


class Alibi(nn.Module):
    """ALiBi (Press et al. 2022): bias -m_h * |i - j| with head slopes m_h a geometric series.
    Needs no parameters and extrapolates to any length."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("slopes", self.make_slopes(config.num_heads), persistent=False)

    @staticmethod
    def make_slopes(h: int) -> torch.Tensor:
        def pow2(n):
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            return [start * start**i for i in range(n)]

        if math.log2(h).is_integer():
            s = pow2(h)
        else:  # the paper's recipe for head counts that are not powers of two
            p = 2 ** math.floor(math.log2(h))
            s = pow2(p) + pow2(2 * p)[0::2][: h - p]
        return torch.tensor(s, dtype=torch.float32)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:  # (H, Nq, Nk)
        dist = (q_pos[:, None] - k_pos[None, :]).abs().float()
        return -self.slopes[:, None, None] * dist[None]


class HeadBias:
    """A stack-level bias restricted to the heads a (possibly pruned) layer still has."""

    def __init__(self, source: nn.Module, heads: torch.Tensor | None):
        self.source, self.heads = source, heads

    def __call__(self, q_pos, k_pos):
        b = self.source(q_pos, k_pos)
        return b if self.heads is None else b.index_select(0, self.heads)
