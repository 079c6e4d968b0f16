"""The layout: which key blocks each query block of a layer sees (its pattern as a block mask).

``BlockSparseLayout`` is the kernel's per-layer state (``make_state``): the pattern drawn from
``BlockSparseConfig`` (``proportional``: own block, global blocks, local window, random blocks,
then a wider window, a fixed fraction of the blocks; ``sink_window``: the sink blocks and the
last ``window_blocks`` blocks, a fixed number, whose KV cache is bounded: ``cache_window``),
fixed per layer and seed and never redrawn per call; ``dense_mask`` and
``equivalent_mask``, the masks under which the eager reference equals the kernel; and the
caches of its plans (``plan``) and FlexAttention block masks (``block_mask``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from omninet.attention.block_sparse.flex import build_block_mask
from omninet.attention.block_sparse.padding import _alive_queries, _is_key_padding
from omninet.attention.block_sparse.plan import CHUNK_BYTES, _LRU, _Plan, build_plan
from omninet.attention.block_sparse.ring import CacheWindow
from omninet.config import BlockSparseConfig, ModelConfig


class BlockSparseLayout(nn.Module):
    """Per-layer state of the block-sparse kernel: the layout and its cached plans. Holds no
    parameters; the block size and pattern come from ``BlockSparseConfig``."""

    def __init__(self, config: BlockSparseConfig, *, layer_idx: int = 0, cross: bool = False, causal: bool = False):
        super().__init__()
        if config.pattern == "sink_window" and not (causal or cross):
            raise ValueError("BlockSparseConfig.pattern='sink_window' needs a causal layer (a decoder's self-attention); "
                             "use pattern='proportional' for non-causal layers")
        self.config, self.layer_idx, self.cross = config, layer_idx, cross
        self.causal = causal  # the layer's own causality: dense_mask's default
        self.window = config.pattern == "sink_window"
        self.block_size = config.block_size
        self.chunk_bytes = CHUNK_BYTES  # slab budget (bytes of key + value rows); tests shrink it
        self._rows: dict[tuple[int, bool], tuple[tuple[int, ...] | None, ...]] = {}
        self._plans = _LRU()
        self._block_masks = _LRU()

    def extra_repr(self) -> str:  # the knobs; the density they give at a length is ``density(n)``
        c = self.config
        if self.window:
            return (f"block_size={c.block_size}, sink_blocks={c.sink_blocks}, window_blocks={c.window_blocks}, "
                    f"layer={self.layer_idx}")
        return (f"block_size={c.block_size}, sparsity_factor={c.sparsity_factor:g}, min_seq_length={c.min_seq_length}, "
                f"local={c.local_blocks}, global={c.global_blocks}, random={c.random_blocks}, layer={self.layer_idx}")

    # ---- layout ---------------------------------------------------------------------------
    @property
    def cache_window(self) -> CacheWindow | None:
        """The bounded KV cache this layer's decoding needs (``sink_window`` self-attention), else None."""
        c = self.config
        if not self.window or self.cross:
            return None
        return CacheWindow(sink=c.sink_blocks * c.block_size, window_blocks=c.window_blocks, block_size=c.block_size)

    def density(self, n: int) -> float:
        """The fraction of the (N, N) scores a call with N keys computes at most, the one
        statement of the rule (the memory estimate and a kernel swap's record read it): 1.0
        where the kernel runs dense SDPA (cross-attention, or at or below ``dense_below``'s
        cut-over), else 1 - sparsity_factor, or the sink and window blocks' share of N keys."""
        c = self.config
        if self.cross or self.dense_below(n, self.causal):
            return 1.0
        if self.window:
            return min(1.0, (c.sink_blocks + c.window_blocks) * c.block_size / max(n, 1))
        return 1.0 - c.sparsity_factor

    def dense_below(self, nk: int, causal: bool) -> bool:
        """True when the whole call is dense attention (short input, or density 1.0). A
        ``sink_window`` layout is dense exactly while every row holds all blocks before it
        (at most sink + window blocks), so there is no cut-over: the pattern holds from the start."""
        if self.window:
            c = self.config
            return nk <= (c.sink_blocks + c.window_blocks) * self.block_size
        if self.config.sparsity_factor == 0.0:
            return True
        if causal:
            return nk <= self._prefix_blocks(causal) * self.block_size
        return nk <= self.config.min_seq_length

    def _prefix_blocks(self, causal: bool) -> int:
        """Leading query blocks that attend densely."""
        g = self.config.global_blocks
        return max(g, math.ceil(self.config.min_seq_length / self.block_size)) if causal else g

    def rows(self, nb: int, causal: bool) -> tuple[tuple[int, ...] | None, ...]:
        """Key blocks of each query block of an ``nb``-block sequence; None marks a dense row."""
        key = (nb, causal)
        if key not in self._rows:
            self._rows[key] = tuple(self._row(i, nb, causal) for i in range(nb))
        return self._rows[key]

    def _row(self, i: int, nb: int, causal: bool) -> tuple[int, ...] | None:
        c = self.config
        if self.window:  # causal by construction: the sinks, then the last window_blocks blocks up to i
            sinks = range(min(c.sink_blocks, i + 1))
            return tuple(sorted(set(sinks) | set(range(max(0, i - c.window_blocks + 1), i + 1))))
        if i < self._prefix_blocks(causal):
            return None
        span = i + 1 if causal else nb  # candidate blocks are [0, span)
        budget = min(span, max(1, math.ceil((1.0 - c.sparsity_factor) * span - 1e-9)))
        if budget >= span:
            return tuple(range(span))
        order = [i, *range(min(c.global_blocks, span))]
        for d in range(1, c.local_blocks + 1):
            order += [i - d, i + d]
        taken = {j for j in order if 0 <= j < span}
        pool = [j for j in range(span) if j not in taken]
        if c.random_blocks and pool:
            # numpy's SeedSequence hashes the whole key: one fixed draw per (seed, layer, row, length);
            # causal rows ignore the length so that a row never changes while a sequence grows.
            rng = np.random.default_rng([c.seed, self.layer_idx, i, 0 if causal else nb, int(causal)])
            order += rng.choice(pool, size=min(c.random_blocks, len(pool)), replace=False).tolist()
        for d in range(1, span):  # then widen the window
            order += [i - d, i + d]
        picked: list[int] = []
        for j in order:
            if 0 <= j < span and j not in picked:
                picked.append(j)
                if len(picked) == budget:
                    break
        return tuple(sorted(picked))

    def block_layout(self, nb: int, causal: bool) -> torch.Tensor:
        """(nb, nb) bool: query block i may see key block j (before elementwise causality)."""
        out = torch.zeros(nb, nb, dtype=torch.bool)
        for i, row in enumerate(self.rows(nb, causal)):
            if row is None:
                out[i, : (i + 1 if causal else nb)] = True
            else:
                out[i, list(row)] = True
        return out

    def dense_mask(self, nq: int, nk: int, *, causal: bool | None = None) -> torch.Tensor:
        """(Nq, Nk) bool: the pairs this kernel computes for a call with ``nq`` queries at
        positions ``nk - nq ..`` (causality included when ``causal``; None = the layer's own,
        from ``make_state``). The kernel equals the eager reference called with
        ``mask = user_mask & dense_mask(nq, nk, causal=causal)`` and the same ``causal``."""
        causal = self.causal if causal is None else causal
        if self.cross or self.dense_below(nk, causal):
            out = torch.ones(nq, nk, dtype=torch.bool)
        else:
            bs, nb = self.block_size, math.ceil(nk / self.block_size)
            blocks = self.block_layout(nb, causal)  # (nb, nb)
            q_pos = torch.arange(nk - nq, nk)
            out = blocks[q_pos[:, None] // bs, torch.arange(nk)[None, :] // bs]
        if causal:
            out &= torch.arange(nk - nq, nk)[:, None] >= torch.arange(nk)[None, :]
        return out

    def equivalent_mask(self, mask: torch.Tensor | None, nq: int, nk: int, *, causal: bool | None = None):
        """The bool mask, broadcastable to (B, H, Nq, Nk), under which the eager reference equals
        this kernel called with ``mask``: ``mask & dense_mask``; with a key-padding mask
        (B|1, 1, 1, Nk) on the sparse path, also minus the query blocks that are all padding
        (the kernel returns zeros there without computing them; see ``_row_padding``)."""
        causal = self.causal if causal is None else causal
        device = "cpu" if mask is None else mask.device
        dm = self.dense_mask(nq, nk, causal=causal).to(device)
        if mask is None:
            return dm
        out = mask & dm
        if self.cross or self.dense_below(nk, causal) or not _is_key_padding(mask, nk):
            return out
        rows = mask.reshape(-1, nk)  # (B|1, Nk)
        return out & _alive_queries(rows, nq, nk, self.block_size)[:, None, :, None]

    # ---- plans ----------------------------------------------------------------------------
    def plan(self, nq: int, nk: int, causal: bool, max_blocks: int, budget_tokens: int, backward: bool,
             pad: int | tuple[int, ...] | None = None) -> _Plan:
        """The cached plan of one batch row; ``pad`` is the row's key padding (``_row_padding``)."""
        key = (nq, nk, causal, max_blocks, budget_tokens, backward, pad)
        return self._plans.get_or(key, lambda: build_plan(self, *key))

    def block_mask(self, nq: int, nk: int, causal: bool, device):
        """FlexAttention ``BlockMask`` of this layout, built once per length and cached."""
        return self._block_masks.get_or((nq, nk, causal, str(device)),
                                        lambda: build_block_mask(self, nq, nk, causal, device))


def layer_is_causal(config: ModelConfig, layer_idx: int, cross: bool) -> bool:
    """Decoder self-attention layers (global numbering: encoder layers first) are causal."""
    if cross or config.arch == "encoder":
        return False
    return config.arch == "decoder" or layer_idx >= config.num_layers


def make_block_sparse_state(config: ModelConfig, layer_idx: int, cross: bool) -> BlockSparseLayout:
    return BlockSparseLayout(config.attention.block_sparse, layer_idx=layer_idx, cross=cross,
                             causal=layer_is_causal(config, layer_idx, cross))


def cache_window_of(state) -> CacheWindow | None:
    """The bounded cache a layer's kernel state asks for: a block-sparse layout's
    ``cache_window``, or that of the layout a composite state holds (``HybridState.sparse``)."""
    layout = state if isinstance(state, BlockSparseLayout) else getattr(state, "sparse", None)
    return layout.cache_window if isinstance(layout, BlockSparseLayout) else None
