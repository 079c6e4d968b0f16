"""Block-sparse attention whose compute and memory shrink with the layout's density.

Dimensions: B batch, H heads, Nq queries, Nk keys, D head dim, bs block size,
nb = ceil(Nk / bs) key blocks, c query blocks of a group, r rows of a query block (bs, or
fewer at the edges), L keys of a slab.

Layout (fixed per layer and seed, built once per length and cached; never redrawn per call).
Blocks are numbered by absolute position (block i holds positions [i*bs, (i+1)*bs)).

- Non-causal (encoders): query block i keeps ``budget = ceil((1 - sparsity_factor) * nb)``
  key blocks, picked in this order until the budget is met: itself, the ``global_blocks``
  leading blocks, ``local_blocks`` neighbours on each side (nearest first),
  ``random_blocks`` random blocks (BigBird style, drawn from ``seed``, the layer and the row),
  then the nearest remaining blocks (a wider window). The ``global_blocks`` leading *query*
  blocks attend to every key ("global rows").
- Causal (decoders): row i chooses among the blocks j <= i and keeps
  ``ceil((1 - sparsity_factor) * (i + 1))`` of them, in the same order. A row's blocks
  depend only on i (not on the length), so cached decoding equals recomputation. Rows
  i < max(global_blocks, ceil(min_seq_length / bs)) are dense causal rows ("prefix rows"),
  which is how sequences of at most ``min_seq_length`` tokens get plain dense attention.
- Non-causal sequences of at most ``min_seq_length`` keys use dense SDPA. At density 1.0
  every row keeps every block and the kernel is dense SDPA.
- Every query row sees at least one key (its own block comes first).

Computation (CPU and GPU): every query block (global and prefix rows too: their keys are
all blocks) is computed against its key blocks as *slabs*: maximal runs of consecutive key
blocks, cut at the chunk budget (``layout.chunk_bytes``, default ``CHUNK_BYTES``). A slab is a
strided view of k and v, so nothing is gathered or copied; consecutive query blocks whose
slabs are the same up to a fixed shift (a sliding window: shift bs; a global block: shift 0)
form one group and one kernel call per slab over (c, H, bs, D) (blocks first, so that the
kernel's outputs come back in the (N, H, D) order of the output and of dq, dk, dv). A query
block's partial softmaxes over its slabs are merged by log-sum-exp. A slab with no mask of its
own whose keys every block of the group reads (a global block; a one-block group) is one call
for all the batch rows that share a plan, (n, H, c * bs, D), still views. A sliding window's
dk, dv (its blocks' windows overlap) are summed by one ``index_add_``. A wide sliding window
(at least ``TILE_MIN_WINDOW`` blocks) runs in tiles of up to ``TILE_ROWS`` query rows (several
blocks) against the union of their windows, the tile's two edges masked per block (at most 15%
more pairs), since the CPU flash kernel's 16-row units cost it twice a dense tile's per pair. On CPU each slab is the fused flash
kernel (``_scaled_dot_product_flash_attention_for_cpu``, which returns the log-sum-exp); a
causal row's own block uses its top-left ``is_causal`` (square and aligned), so causal rows
need no mask. Elsewhere, or with dropout, each slab is eager math (dropout masks drawn from
a per-call seed, slab by slab). Training runs a custom ``autograd.Function`` that saves only
q, k, v, the output and the log-sum-exp and recomputes each slab's probabilities in
backward, as flash attention does; its per-slab dk, dv temporaries are what the budget
bounds. Extra memory beyond the O(N) output and log-sum-exp (and dq, dk, dv) is therefore
bounded by the budget and the same on every call (no persistent buffers). A bias that needs
gradients (learned relative positions) takes a traced per-block path (eager attention per
query block under autograd, which saves its scores). On CUDA, with no user mask, bias or
dropout, the kernel uses compiled FlexAttention with a ``BlockMask`` built once per layout
and length.

Masks. A key-padding mask (B|1, 1, 1, Nk), the [B, N] mask that the trial runner and the
server always pass, is folded into the plans per batch row (rows with the same padding share
one cached plan): key blocks that are all padding are left out, query blocks that are all
padding are zero rows with no kernel call, slabs end at the row's real length (end padding needs
no key mask; ``key_lengths``, which the model computes once at its entry; the sliding windows
that the length cuts stay one group, an exact sliding head plus one shared slab read from a
staircase of starts, see ``_clip_groups``), and a block that is only partly padding (a hole,
left padding) is a slab of its own under the key mask. No key past a row's length is read. An
all-True mask is no mask. General masks (B|1, H|1, Nq, Nk) are sliced per slab (the mask
itself is Nq x Nk, the caller's choice) with one query block per group, as are calls with a
bias. The lazy ``bias(q_pos, k_pos)`` is evaluated per slab (and sequence) for just its keys.
Cross-attention uses dense SDPA (a layout is defined over one sequence). ``need_weights``
returns the (B, H, Nq, Nk) weights of exactly this layout, materialized through the eager
reference (debugging only).

``state.dense_mask(nq, nk, causal=None)`` is the (Nq, Nk) bool mask that this kernel is
equivalent to: ``block_sparse(q, k, v, mask=m) == eager(q, k, v, mask=m & dense_mask)``
(``causal`` defaults to the layer's own, known to ``make_state``); with a mask,
``state.equivalent_mask(m, nq, nk)`` is the whole equivalent (it also drops the all-padding
query blocks, whose rows are zero).

Where sparsity pays on CPU (issue 25's padding suite, ``benchmarks/attention_kernels.py --suite
padding``: fp32, B=2, H=4, D=16, median of 21 interleaved runs after a warm-up, against SDPA
with the same mask; Intel Xeon with AVX512-BF16, no AMX, one pinned thread, quiet, load 0.9-1.7;
``benchmarks/results/attention_kernels_padding_1t.json``):
- Forward, N=1024 and 4096, block 16-128, sparsity 0.5-0.9: 0.14-0.98x SDPA's time, at most
  0.53x at sparsity >= 0.75 with a mask; an all-True or 25%-padded mask costs at most 1.08x the
  kernel's own unmasked time (an all-True cell, the unmasked computation itself: the noise; 1.17x
  for the padded rows before the staircase slabs of ``_clip_groups``).
- Forward+backward: N=1024: block 16 0.98x at 50% (1.20x before the tiles of ``_tile_groups``),
  0.56x at 85%; block 64 0.80x, 0.44x; with 25% padding on half the rows 0.38-0.79x. N=256:
  block 16 1.90x at 50%, 1.27x at 85%; block 64 1.56x, 1.00x (0.92x padded).
  Where sparsity cannot win on CPU: below 512 tokens at block 16-64 (N=256 is at best parity, at
  85% with block 64; an earlier A/B had N=512 at 0.66-1.21x). At N=256 only 46-62% of a
  forward+backward call is inside the flash kernel's own calls (``in_kernel_fraction`` in the
  suite; 67-84% at N=1024): the rest is Python, views, log-sum-exp merges and gradient sums,
  ~1-2 ms a call, and the calls themselves are no cheaper than dense: a (head, block) work unit of
  16 query rows costs the CPU flash kernel 3.0 ns a score pair forward and 6.1 backward, against
  1.6 and 2.9 for dense SDPA's own tiles (tiles only pay for windows of at least
  ``TILE_MIN_WINDOW`` blocks), and a call ~20-30 us beyond its pairs, while 50% sparsity with a
  global row and column still computes 53% of the pairs. Dense SDPA runs instead for
  N <= ``min_seq_length`` (default 1024, which covers all of these; it gives up the 0.38-0.98x at
  N=1024); do not set it below 512.
- Two threads (``--threads 2``, same machine, load 1.0-1.9): SDPA gains 1.01-2.78x from the second
  thread, block-sparse 0.79-2.69x, and 70 of the 88 ratios stay within 20% of their one-thread
  value (forward 29 of 36 at N=1024 and 30 of 36 at N=4096; forward+backward 6 of 8 at N=256 and
  5 of 8 at N=1024, the worst 1.40x). What does not split is ours but serial: only the flash calls
  (46-97% of a call, least at short N and small blocks) use the second thread, the Python between
  them does not.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omninet.attention.dense import eager_attention, sdpa_attention
from omninet.attention.registry import AttentionWork, block_keys_per_query, register_kernel
from omninet.config import BlockSparseConfig, ModelConfig

__all__ = ["BlockSparseLayout", "block_sparse_attention", "make_block_sparse_state"]

_CACHE_SIZE = 256  # plans per layer (decoding creates one per generated length; padding one per row length)


@dataclass(frozen=True)
class _Slab:
    """Keys [k0, k1) of a group's first query block; block i of the group uses them shifted by
    ``i * step`` (0: a shared global block, bs: a sliding window). Always a view of k and v."""

    k0: int
    k1: int
    step: int = 0
    diag: bool = False  # the query block's own causal block, square and aligned: the kernel's top-left is_causal
    masked: bool = False  # its own causal block with unaligned queries (cached decoding): an explicit position mask
    pad: bool = False  # one key block that is part padding (a hole, not a row's end): the key mask applies here only
    stair: int = 0  # > 0: a shared slab that block i of the group reads from key i * stair on (``_clip_groups``)
    band: int = 0  # a tiled window's edge: sub-block u of a tile reads keys from u * band on (> 0), or before u * -band (< 0)

    @property
    def own_mask(self) -> bool:
        """Whether the slab's calls take a mask of their own (not the fused kernel's is_causal)."""
        return self.masked or self.pad or bool(self.stair) or bool(self.band)


@dataclass(frozen=True)
class _Group:
    """``c`` consecutive query blocks of ``r`` rows from query row ``q0`` (query coordinates;
    c > 1 only for whole blocks), computed together, one kernel call per slab."""

    q0: int
    c: int
    r: int
    slabs: tuple[_Slab, ...]


@dataclass(frozen=True)
class _Plan:
    """How one (Nq, Nk, causal, budget) call is computed. A group's slabs are merged by
    log-sum-exp; nothing is gathered."""

    offset: int  # Nk - Nq: absolute position of query 0
    groups: tuple[_Group, ...]
    dead: tuple[tuple[int, int], ...] = ()  # query rows [a, b) of blocks that are all padding: zeros, no work


def _batchable(group: _Group, row: _Group, bs: int, budget_tokens: int, backward: bool) -> bool:
    """Whether one-block group ``row`` extends ``group`` (same slabs, each shifted by a fixed
    step) within ``budget_tokens`` token rows of temporaries: per block, the forward holds its
    accumulator and one partial output (2 bs), the backward its dq rows and one slab's dk, dv."""
    per_block = bs + 2 * max(s.k1 - s.k0 for s in row.slabs) if backward else 2 * bs
    if (group.c + 1) * per_block > budget_tokens or row.r != bs or group.r != bs or row.q0 != group.q0 + group.c * bs:
        return False
    if len(row.slabs) != len(group.slabs):
        return False
    for g, s in zip(group.slabs, row.slabs):
        step = s.k0 - (g.k0 + (group.c - 1) * g.step) if group.c > 1 else s.k0 - g.k0
        if (s.k1 - s.k0, s.diag, s.masked, s.pad) != (g.k1 - g.k0, g.diag, g.masked, g.pad) or step < 0 or (
                group.c > 1 and step != g.step):
            return False
    return True


def _extend(group: _Group, row: _Group) -> _Group:
    slabs = group.slabs if group.c > 1 else tuple(
        _Slab(g.k0, g.k1, s.k0 - g.k0, g.diag, g.masked, g.pad) for g, s in zip(group.slabs, row.slabs))
    return _Group(group.q0, group.c + 1, group.r, slabs)


# A staircase slab's additive mask holds at most chunk_bytes / STAIR_FRACTION elements (the
# default budget: 2^18, 1 MB in fp32) as (c * r, L) for a shared call, else (c, 1, 1, L) broadcast
# over a block's rows; a group whose staircase would pass it (c blocks, L = (c - 1) * step keys)
# is cut into groups of fewer blocks (``_clip_groups``).
STAIR_FRACTION = 32


def _shift(g: _Group, j: int, c: int) -> _Group:
    """Blocks [j, j + c) of group ``g`` as a group of their own (its slabs shifted by their step)."""
    slabs = tuple(replace(s, k0=s.k0 + j * s.step, k1=s.k1 + j * s.step) for s in g.slabs)
    return _Group(g.q0 + j * g.r, c, g.r, slabs)


def _clip_groups(groups: list[_Group], end_key: int, max_elements: int) -> list[_Group]:
    """An end-padded row's groups with every slab that crosses the row's length ``end_key``
    ending there, so that no key past it is read. Where the group's blocks read the same keys
    (one block, or keys shared by the group) the slab is cut. A sliding window's blocks
    (block i reads [k0 + i * step, end_key)) would each be a group of its own, one call per
    block and slab; instead they stay one group with two slabs: the window's first ``m``
    keys, sliding and exact (``m``: the last block's share), and the rest, [k0 + m, end_key),
    shared by the group and read by block i from its key i * step on (``stair``, an additive
    mask over real keys only; groups cut so that it stays within ``max_elements``).
    Measured (N=1024, block 16, 50%, 25% end padding on one of two rows, forward): the row's
    last 15 blocks took 15 groups and 40 kernel calls a pass (8 unpadded) and cost 1.17x the
    unpadded call; the staircase's masked half costs less than the calls it saves."""
    out = []
    for group in groups:
        steps = [s.step for s in group.slabs if s.pad and s.step > 0]
        c = group.c
        if steps and group.c > 1:  # the most blocks whose (c, L = (c - 1) * step) staircase stays within the cap
            c = max(1, math.isqrt(max_elements // max(steps)))  # c * (c - 1) * step < c^2 * step <= max_elements
        for j in range(0, group.c, c):
            g = group if c >= group.c else _shift(group, j, min(c, group.c - j))
            slabs = []
            for s in g.slabs:
                if not s.pad:
                    slabs.append(s)
                elif g.c == 1 or s.step == 0:
                    slabs.append(replace(s, k1=min(s.k1, end_key), pad=False))
                else:
                    m = end_key - (s.k0 + (g.c - 1) * s.step)  # keys the last block reads
                    slabs += [_Slab(s.k0, s.k0 + m, s.step), _Slab(s.k0 + m, end_key, stair=s.step)]
            out.append(_Group(g.q0, g.c, g.r, tuple(slabs)))
    return out


# Sliding windows in tiles: t consecutive blocks of a sliding group read as one query tile of
# t * bs rows against the union of their windows, t - 1 more key blocks (computed and masked:
# the tile's two edges, ``band``), up to TILE_ROWS rows and while the masked pairs stay within
# TILE_EXTRA of the window.
# Measured (CPU flash kernel, one thread, H=4, D=16, fwd+bwd of 64 blocks of 16 rows against
# 31-block windows): 23.8 ms as 16-row blocks, 19.2 in 32-row tiles, 14.7 in 64-row tiles; 32-row
# blocks against 15-block windows 13.1 -> 11.9 ms in 64-row tiles; 64-row blocks gain nothing
# (11.2 -> 12.3 ms), nor do windows of 3 blocks.
# Only windows of at least TILE_MIN_WINDOW blocks are tiled: a tile is three calls (its edges and
# middle), which at shorter windows cost more than the tile saves (N=256, block 16, 50%, 7-block
# windows: 2.0 -> 3.0x SDPA's fwd+bwd time; N=1024, block 16, 85%, 10 blocks: 0.57 -> 0.63x; N=1024,
# block 32, 50%, 15 blocks: 0.95 -> 0.99x; while N=1024, block 16, 50%, 31 blocks: 1.12 -> 0.98x and
# N=4096, block 16, 50%: 1.01 -> 0.70x; one pinned thread, CPU time, same process).
TILE_ROWS = 64
TILE_EXTRA = 0.15
TILE_MIN_WINDOW = 24


def _tile_groups(groups: list[_Group], bs: int, chunk_bytes: int) -> list[_Group]:
    """Sliding groups of whole blocks as groups of tiles (see ``TILE_ROWS``); the blocks left
    over at a group's end stay a group of blocks. A window [k0, k1) of t blocks' tile is three
    slabs: its left edge [k0, k0 + (t - 1) bs), which sub-block u reads from key u * bs on; the
    middle, which every sub-block reads (no mask); and the right edge [k1, k1 + (t - 1) bs), which
    sub-block u reads up to key u * bs. The edges' masks are (t * bs, (t - 1) * bs), whatever N.
    Only plain slabs (no causal, padding or staircase mask of their own) are tiled; a shared slab
    stays shared. Tiles stay where the flash kernel's own (query split x key split) buffer, which
    grows with a call's rows, stays within a quarter of the budget (as in ``_shared``)."""
    out = []
    for g in groups:
        sliding = [s for s in g.slabs if s.step]
        if (g.r != bs or g.c < 2 or not sliding
                or any(s.step not in (0, bs) or s.diag or s.own_mask for s in g.slabs)):
            out.append(g)
            continue
        window = min(s.k1 - s.k0 for s in sliding) / bs  # blocks
        if window < TILE_MIN_WINDOW:
            out.append(g)
            continue
        t = 1
        keys = min(max(s.k1 - s.k0 for s in sliding) + bs, 512)
        while (2 * t * bs <= TILE_ROWS and 2 * t <= g.c and (2 * t - 1) / window <= TILE_EXTRA
               and 2 * t * bs * keys * 4 * torch.get_num_threads() <= chunk_bytes // 4):
            t *= 2
        if t == 1:
            out.append(g)
            continue
        tiles, edge, step = g.c // t, (t - 1) * bs, t * bs
        slabs = []
        for s in g.slabs:
            slabs += [_Slab(s.k0, s.k0 + edge, step, band=bs), _Slab(s.k0 + edge, s.k1, step),
                      _Slab(s.k1, s.k1 + edge, step, band=-bs)] if s.step else [s]
        out.append(_Group(g.q0, tiles, t * g.r, tuple(slabs)))
        if g.c % t:
            out.append(_shift(g, tiles * t, g.c % t))
    return out


def _pieces(a: int, b: int, max_blocks: int, classes: tuple[int, ...] | None):
    """Blocks [a, b) as slabs (j0, j1, mixed) of at most ``max_blocks`` blocks; a block that is
    only partly padding (``classes[j] == _MIXED``) is a slab of its own."""
    j = a
    while j < b:
        if classes is not None and classes[j] == _MIXED:
            yield j, j + 1, True
            j += 1
            continue
        e = min(j + max_blocks, b)
        if classes is not None:
            e = next((t for t in range(j, e) if classes[t] == _MIXED), e)
        yield j, e, False
        j = e


def _runs(blocks) -> list[tuple[int, int]]:
    """Sorted block ids as maximal runs [a, b) of consecutive ids."""
    runs: list[list[int]] = []
    for j in blocks:
        if runs and runs[-1][1] == j:
            runs[-1][1] = j + 1
        else:
            runs.append([j, j + 1])
    return [(a, b) for a, b in runs]


class _LRU(OrderedDict):
    def get_or(self, key, build):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = build()
        if len(self) > _CACHE_SIZE:
            self.popitem(last=False)
        return value


class BlockSparseLayout(nn.Module):
    """Per-layer state of the block-sparse kernel: the layout and its cached plans. Holds no
    parameters; the block size and pattern come from ``BlockSparseConfig``."""

    def __init__(self, config: BlockSparseConfig, *, layer_idx: int = 0, cross: bool = False, causal: bool = False):
        super().__init__()
        self.config, self.layer_idx, self.cross = config, layer_idx, cross
        self.causal = causal  # the layer's own causality: dense_mask's default
        self.block_size = config.block_size
        self.chunk_bytes = CHUNK_BYTES  # slab budget (bytes of key + value rows); tests shrink it
        self._rows: dict[tuple[int, bool], tuple[tuple[int, ...] | None, ...]] = {}
        self._plans = _LRU()
        self._block_masks = _LRU()

    def extra_repr(self) -> str:
        c = self.config
        return (f"block_size={c.block_size}, density={1 - c.sparsity_factor:g}, local={c.local_blocks}, "
                f"global={c.global_blocks}, random={c.random_blocks}, layer={self.layer_idx}")

    # ---- layout ---------------------------------------------------------------------------
    def dense_below(self, nk: int, causal: bool) -> bool:
        """True when the whole call is dense attention (short input, or density 1.0)."""
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
        return self._plans.get_or(key, lambda: self._build_plan(*key))

    def _build_plan(self, nq: int, nk: int, causal: bool, max_blocks: int, budget_tokens: int,
                    backward: bool, pad: int | tuple[int, ...] | None = None) -> _Plan:
        """Every query block (global and prefix rows included: their keys are simply all
        blocks) against slabs of at most ``max_blocks`` key blocks; consecutive blocks whose
        slabs are the same up to a shift form one group, as many as ``budget_tokens`` token
        rows of temporaries allow (0: one block per group).

        Padding folded in (``pad``: the row's real length, or per-block classes): key blocks
        that are all padding are left out of every row, query blocks that are all padding are
        ``dead`` (zeros, no call), slabs end at the row's length (so a length needs no key
        mask; a sliding window across it is first planned whole, marked ``pad``, and then cut
        by ``_clip_groups`` into slabs that end there), and a key block that is only partly
        padding (a hole) is a slab of its own that applies the key mask (``pad``)."""
        bs, nb, offset = self.block_size, math.ceil(nk / self.block_size), nk - nq
        end_key = pad if isinstance(pad, int) else nk  # keys at or past a row's length are padding
        classes = pad if isinstance(pad, tuple) else None
        layout, groups, dead = self.rows(nb, causal), [], []
        for i in range(offset // bs, nb):
            q0 = max(i * bs, offset) - offset
            q1 = min((i + 1) * bs, nk) - offset
            if i * bs >= end_key or (classes is not None and classes[i] == _EMPTY):
                if dead and dead[-1][1] == q0:
                    dead[-1] = (dead[-1][0], q1)
                else:
                    dead.append((q0, q1))
                continue
            blocks = layout[i] or tuple(range(i + 1 if causal else nb))  # None: a dense row
            if classes is not None:
                blocks = [j for j in blocks if classes[j] != _EMPTY]
            slabs = []
            for a, b in _runs(blocks):
                diag = causal and b == i + 1  # causal rows end with their own block (all j <= i)
                end = i if diag else b
                # A slab across a row's length keeps its full extent under the key mask (``pad``),
                # so that the blocks of a sliding window stay one group; ``_clip_groups`` cuts it
                # at the length wherever that costs no group.
                slabs += [_Slab(j0 * bs, min(j1 * bs, nk), pad=mixed or min(j1 * bs, nk) > end_key)
                          for j0, j1, mixed in _pieces(a, end, max_blocks, classes) if j0 * bs < end_key]
                if diag:
                    aligned = i * bs >= offset
                    mixed = classes is not None and classes[i] == _MIXED
                    slabs.append(_Slab(i * bs, min((i + 1) * bs, nk, end_key), diag=aligned and not mixed,
                                       masked=not aligned or mixed, pad=mixed))
            row = _Group(q0, 1, q1 - q0, tuple(slabs))
            if groups and _batchable(groups[-1], row, bs, budget_tokens, backward):
                groups[-1] = _extend(groups[-1], row)
            else:
                groups.append(row)
        if isinstance(pad, int):
            groups = _clip_groups(groups, end_key, self.chunk_bytes // STAIR_FRACTION)
        groups = _tile_groups(groups, bs, self.chunk_bytes)
        return _Plan(offset=offset, groups=tuple(groups), dead=tuple(dead))

    def block_mask(self, nq: int, nk: int, causal: bool, device):
        """FlexAttention ``BlockMask`` of this layout, built once per length and cached."""
        return self._block_masks.get_or((nq, nk, causal, str(device)), lambda: self._build_block_mask(nq, nk, causal, device))

    def _build_block_mask(self, nq, nk, causal, device):
        from torch.nn.attention.flex_attention import create_block_mask

        bs, offset = self.block_size, nk - nq
        blocks = self.block_layout(math.ceil(nk / bs), causal).to(device)  # (nb, nb)

        def mask_mod(b, h, q_idx, kv_idx):
            keep = blocks[(q_idx + offset) // bs, kv_idx // bs]
            return keep & (kv_idx <= q_idx + offset) if causal else keep

        return create_block_mask(mask_mod, None, None, nq, nk, device=device)


# ---- the kernel ---------------------------------------------------------------------------
def _as_4d(mask: torch.Tensor, nk: int) -> torch.Tensor:
    """A broadcastable bool mask as (B|1, H|1, Nq|1, Nk)."""
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return mask.expand(*mask.shape[:3], nk)


# ---- key padding --------------------------------------------------------------------------
_EMPTY, _MIXED, _FULL = 0, 1, 2  # a key block's padding class: all padding, part padding, all real


def _is_key_padding(mask: torch.Tensor, nk: int) -> bool:
    """A key-padding mask: one key row per sequence, (B|1, 1, 1, Nk) (or fewer leading dims)."""
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return len(shape) == 4 and shape[1] == 1 and shape[2] == 1 and shape[3] == nk


def key_lengths(mask: torch.Tensor) -> tuple[int, ...] | None:
    """Real length of each row of a key-padding mask (B|1, 1, 1, Nk) that is True on a prefix
    of every row (padding only at the end), else None. Stored on the mask (with its version),
    so the model computes it once per forward (``OmniNetModel`` calls this at its entry) and
    every layer reads it."""
    cached = mask.__dict__.get("_omninet_key_lengths")
    if cached is not None and cached[0] == mask._version:
        return cached[1]
    rows = mask.reshape(-1, mask.shape[-1])  # (B|1, Nk)
    lengths = rows.sum(-1)
    prefix = torch.arange(rows.shape[-1], device=rows.device)[None, :] < lengths[:, None]
    out = tuple(lengths.tolist()) if torch.equal(prefix, rows) else None
    mask._omninet_key_lengths = (mask._version, out)
    return out


def _block_classes(rows: torch.Tensor, bs: int) -> torch.Tensor:
    """(B|1, nb) padding class of every key block of key rows (B|1, Nk)."""
    nk = rows.shape[-1]
    extra = -nk % bs
    real_any = F.pad(rows, (0, extra), value=False).view(rows.shape[0], -1, bs).any(-1)
    real_all = F.pad(rows, (0, extra), value=True).view(rows.shape[0], -1, bs).all(-1)
    return real_any.to(torch.int8) + real_all.to(torch.int8)  # _EMPTY, _MIXED or _FULL


def _row_padding(mask: torch.Tensor, B: int, nk: int, bs: int) -> tuple | None:
    """Per batch row, the key padding a plan folds in: None (no padding), the row's real length
    (padding only at its end: the common case, from ``key_lengths``), or the class of every key
    block (padding anywhere). None overall when no row is padded (an all-True mask is no mask)."""
    lengths = key_lengths(mask)
    if lengths is not None:
        pads = tuple(None if n == nk else n for n in lengths)
    else:
        classes = _block_classes(mask.reshape(-1, nk), bs).tolist()
        pads = tuple(None if all(c == _FULL for c in row) else tuple(row) for row in classes)
    if all(p is None for p in pads):
        return None
    return pads * B if len(pads) == 1 else pads


def _alive_queries(rows: torch.Tensor, nq: int, nk: int, bs: int) -> torch.Tensor:
    """(B|1, Nq) bool: the query's block holds a real position (the others are zero rows)."""
    alive = _block_classes(rows, bs) != _EMPTY  # (B|1, nb)
    return alive[:, torch.arange(nk - nq, nk, device=rows.device) // bs]


# Working-set budget: the bytes of temporaries one group of query blocks may hold at once
# (forward: its accumulator and one partial output; backward, BACKWARD_BUDGETS times this: its
# dq rows and one slab's dk, dv; a single slab's dk, dv stay within one budget). Slabs are views of k and v, so nothing else grows with N. 8 MB: within this CPU's L2 +
# its share of L3, and within the +8 MB over SDPA that the forward may use.
CHUNK_BYTES = 8 * 2**20
BACKWARD_BUDGETS = 3  # a backward group may hold 3 budgets (dq rows, dk, dv): 3x fewer kernel calls
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _budget(q: torch.Tensor, bs: int, budget: int) -> tuple[int, int]:
    """``budget`` bytes as token rows of (H, D) temporaries, and the key blocks one backward
    slab may span (its dk, dv and a block's dq rows within the budget)."""
    tokens = budget // (q.shape[1] * q.shape[3] * q.element_size())  # one token of one sequence, all heads
    return tokens, max(1, (tokens - bs) // (2 * bs))


def _view(t: torch.Tensor, b: int, start: int, c: int, r: int, step: int) -> torch.Tensor:
    """(c, H, r, D) strided view of rows ``start + i * step + [0, r)`` of t[b] (B, H, N, D), or
    (c, H, r) of a (B, H, N) tensor; the c windows may overlap (keys of a sliding window).
    Blocks lead (the flash kernel's batch dim), heads second: its outputs are then laid out
    (c, r, H, D), which is (N, H, D) order, the order of ``out`` and of dq, dk, dv
    (``_grad_buffer``), so merges and gradient adds run over contiguous rows."""
    st = t.stride()
    size, stride = (c, t.shape[1], r, *t.shape[3:]), (step * st[2], st[1], st[2], *st[3:])
    return t.as_strided(size, stride, t.storage_offset() + b * st[0] + start * st[2])


def _blocks_first(t: torch.Tensor, c: int) -> torch.Tensor:
    """A shared slab's (1, H, c * r, D) (or (1, H, c * r)) result as (c, H, r, D) (or (c, H, r)), a view."""
    return t[0].unflatten(1, (c, -1)).transpose(0, 1)


def _grad_buffer(t: torch.Tensor) -> torch.Tensor:
    """Zeros shaped like t (B, H, N, D), stored (B, N, H, D) whatever t's strides: a slab's
    gradient rows (``_view`` order) are then contiguous runs of it (see ``_add_block_windows``)."""
    B, H, N, D = t.shape
    return t.new_zeros(B, N, H, D).transpose(1, 2)


def _rows_view(t: torch.Tensor, b: int, n: int, start: int, c: int, r: int, step: int) -> torch.Tensor:
    """``_view`` of the n batch rows b .. b + n - 1 at once: (n, H, c, r, D), or (n, H, c, r)."""
    st = t.stride()
    size, stride = (n, t.shape[1], c, r, *t.shape[3:]), (st[0], st[1], step * st[2], st[2], *st[3:])
    return t.as_strided(size, stride, t.storage_offset() + b * st[0] + start * st[2])


@dataclass
class _Call:
    """What every slab of one call shares (forward and the recomputing backward alike)."""

    plans: tuple[_Plan, ...]  # per batch row (rows with the same padding share one cached plan)
    backward_plans: tuple[_Plan, ...]  # the fused backward may cut slabs and groups finer than the forward
    mask: torch.Tensor | None  # a general mask (B|1, H|1, Nq|1, Nk) bool, sliced per slab; None with key padding
    keys: torch.Tensor | None  # key padding (B|1, Nk) bool, read only on slabs of part-padding blocks (pad)
    bias: object  # bias(q_pos, k_pos) -> (H, r, L), or None
    scale: float
    dropout_p: float
    seed: int  # dropout: slab s of the call draws its mask from Generator(seed + s), forward and backward
    fused: bool  # the CPU flash kernel (no dropout); otherwise eager math per slab
    chunk_bytes: int  # the layer's working-set budget (``BlockSparseLayout.chunk_bytes``)


def _slab_mask(call: _Call, plan: _Plan, g: _Group, slab: _Slab, b: int, dtype, device):
    """Additive mask (c|1, H|1, r|1, L) for a group's slab, or None; and has_key
    (c|1, H|1, r|1) marking rows that see a key of the slab (None: every row does). The fused
    kernel applies a diagonal slab's causality itself (is_causal); eager math gets it here.
    A general mask or a bias comes with one-block groups; key padding (``slab.pad``) is a
    strided view of the row's key mask under each block's keys."""
    explicit_causal = slab.masked or (slab.diag and not call.fused)
    if slab.stair:  # block i reads the slab from key i * stair on: (1, 1, c * r, L) shared, else (c, 1, r, L)
        L = slab.k1 - slab.k0
        visible = torch.arange(L, device=device)[None, :] >= (torch.arange(g.c, device=device) * slab.stair)[:, None]
        am = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))  # (c, L)
        if g.c * g.r * L <= call.chunk_bytes // STAIR_FRACTION and _shared(call, g, slab, None):
            am = am.repeat_interleave(g.r, dim=0)[None, None]
        else:  # one row of the mask per block, broadcast over its rows (no copy)
            am = am[:, None, None, :].expand(g.c, 1, g.r, L)
        return am, visible.any(-1)[:, None, None].expand(g.c, 1, g.r)
    if slab.band:  # (1, 1, r, L) and rows with a key (1, 1, r): a tile's edge (see ``_tile_groups``)
        bound = torch.arange(g.r, device=device) // abs(slab.band) * abs(slab.band)  # each row's sub-block start
        k = torch.arange(slab.k1 - slab.k0, device=device)[None, :]
        visible = k >= bound[:, None] if slab.band > 0 else k < bound[:, None]
        am = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        return am[None, None], visible.any(-1)[None, None]
    if call.mask is None and call.bias is None and not explicit_causal and not slab.pad:
        return None, None
    offset, visible, am, L = plan.offset, None, None, slab.k1 - slab.k0
    q_pos = torch.arange(g.q0 + offset, g.q0 + g.r + offset, device=device)
    k_pos = torch.arange(slab.k0, slab.k1, device=device)
    if call.mask is not None:
        m = call.mask[b if call.mask.shape[0] > 1 else 0]  # (H|1, Nq|1, Nk)
        visible = (m[:, g.q0 : g.q0 + g.r] if m.shape[1] > 1 else m)[None, :, :, slab.k0 : slab.k1]
    if slab.pad:
        keys = call.keys[b if call.keys.shape[0] > 1 else 0]  # (Nk,)
        st = keys.stride(0)
        kv = keys.as_strided((g.c, 1, 1, L), (slab.step * st, 0, 0, st), keys.storage_offset() + slab.k0 * st)
        visible = kv if visible is None else visible & kv
    if explicit_causal:
        causal = k_pos[None, :] <= q_pos[:, None]  # (r, L); the same for every block of a group (step bs)
        visible = causal if visible is None else visible & causal
    if call.bias is not None:
        am = call.bias(q_pos, k_pos).to(dtype)[None]  # (1, H, r, L)
    has_key = None
    if visible is not None:
        has_key = visible.any(dim=-1)
        am = torch.zeros(visible.shape, dtype=dtype, device=device) if am is None else am
        am = am.masked_fill(~visible, float("-inf"))
    return am, has_key


def _dropout_keep(call: _Call, index: int, shape, device, dtype) -> torch.Tensor:
    """The dropout keep mask of slab ``index``, scaled by 1 / (1 - p): the same in both passes."""
    g = torch.Generator(device=device).manual_seed(call.seed + index)
    keep = torch.rand(shape, generator=g, device=device, dtype=dtype) >= call.dropout_p
    return keep / (1.0 - call.dropout_p)


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the eager path: float32, or float64 for float64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _eager_scores(qs, ks, am, scale):
    s = torch.matmul(qs, ks.transpose(-1, -2)).to(_acc(qs)) * scale  # (c, H, r, L)
    return s if am is None else s + am


def _slab_forward(call: _Call, index, qs, ks, vs, am, slab):
    """(out (c, H, r, D), lse (c, H, r) float) of one slab."""
    if call.fused:
        return _FLASH(qs, ks, vs, 0.0, slab.diag, attn_mask=am, scale=call.scale)
    s = _eager_scores(qs, ks, am, call.scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse.isinf(), 0.0)[..., None])
    if call.dropout_p:
        p = p * _dropout_keep(call, index, p.shape, p.device, p.dtype)
    return torch.matmul(p.to(vs.dtype), vs), lse


def _merge(o1, l1, o2, l2, out=None):
    """Two partial softmaxes of the same rows as one (into ``out``, else o1): o1 + (o2 - o1) * w
    with w = e^l2 / (e^l1 + e^l2) = sigmoid(l2 - l1) (NaN when neither saw a key: both are 0)."""
    w = torch.sigmoid(l2 - l1).nan_to_num_(0.0)[..., None].to(o1.dtype)
    return torch.lerp(o1, o2, w, out=o1 if out is None else out), torch.logaddexp(l1, l2)


def _group_runs(call: _Call, plans: tuple[_Plan, ...]) -> list[tuple[int, int, _Plan, _Group]]:
    """(b0, n, plan, group): every row's groups, the rows that have the same group (the same
    query blocks against the same slabs: the same plan, or padding that leaves the group as it
    is) in runs of consecutive rows, computed together where a slab allows it
    (``_row_batched``). Off the fused path one row per run, in row order (eager slabs draw their
    dropout per row and slab, in the same order in both passes)."""
    if not call.fused:
        return [(b, 1, plan, g) for b, plan in enumerate(plans) for g in plan.groups]
    if all(p is plans[0] for p in plans):
        return [(0, len(plans), plans[0], g) for g in plans[0].groups]
    rows: dict[_Group, list[int]] = {}
    for b, plan in enumerate(plans):
        for g in plan.groups:
            rows.setdefault(g, []).append(b)
    runs = []
    for g, bs in rows.items():
        start = bs[0]
        for prev, b in zip(bs, [*bs[1:], None]):
            if b != prev + 1:
                runs.append((start, prev - start + 1, plans[start], g))
                start = b
    return runs


# Forward only: a group whose blocks read at most this many key blocks each is gathered: its
# slabs (and its batch rows with the same plan) copied into one run of keys per block, one kernel
# call instead of one per slab and row, no log-sum-exp merges. Measured (issue 25, one thread,
# B=2, H=4, D=16, forward, A/B in one process, load 5.8): as slabs against gathered, N=256 block 16
# 85% 1.52 vs 1.19x SDPA's CPU time, block 64 50% 1.58 vs 1.34x; N=512 block 64 85% 0.79 vs 0.69x.
# Rows of 33 blocks (N=1024, block 16) took 1.7x as long gathered: the copy (2 D floats per key
# and block) outgrows the calls it saves. The backward keeps the slab path: with row-batched
# shared slabs, gathering it measured 1.49 -> 1.61x (N=256, block 64, 50%, fwd+bwd, model strides).
GATHER_MAX_BLOCKS = 4


def _gathered(call: _Call, g: _Group, n: int, per_block: int, budget: int) -> bool:
    """Whether group ``g`` of ``n`` rows runs as gathered calls (see ``_gathered_calls``): the
    fused kernel, no per-slab mask, more than one slab or row to fold into one call, short rows
    (``GATHER_MAX_BLOCKS``), and one block's copies within the budget."""
    if not call.fused or call.mask is not None or call.bias is not None or (len(g.slabs) == 1 and n == 1):
        return False
    if any(s.diag or s.own_mask for s in g.slabs):  # is_causal / a mask of their own
        return False
    return sum(s.k1 - s.k0 for s in g.slabs) <= GATHER_MAX_BLOCKS * g.r and per_block <= budget


def _gathered_calls(b0: int, n: int, g: _Group, per_block: int, budget: int):
    """(b, m, group): rows [b, b + m) x blocks of ``group`` per call, within ``budget`` token rows
    of temporaries (``per_block`` per block and row); a group cut into fewer blocks is the same
    slabs shifted by its step."""
    if g.c * per_block <= budget:
        m = min(n, budget // (g.c * per_block))
        for b in range(b0, b0 + n, m):
            yield b, min(m, b0 + n - b), g
        return
    cb = budget // per_block
    for b in range(b0, b0 + n):
        for j in range(0, g.c, cb):
            yield b, 1, _shift(g, j, min(cb, g.c - j))


def _gather_keys(t: torch.Tensor, b: int, m: int, g: _Group) -> torch.Tensor:
    """(m * H, c, L, D): every block's slabs of k or v (rows b .. b + m - 1) as one run of keys,
    copied (a view where the group has one slab and one row)."""
    parts = [_rows_view(t, b, m, s.k0, g.c, s.k1 - s.k0, s.step) for s in g.slabs]  # (m, H, c, L_s, D)
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3)
    return out.reshape(m * t.shape[1], g.c, out.shape[3], t.shape[3])


def _forward(call: _Call, q, k, v):
    """out (B, H, Nq, D) (stored as (B, Nq, H, D), like SDPA's) and lse (B, H, Nq) float."""
    B, H, nq, D = q.shape
    out = q.new_empty(B, nq, H, D).transpose(1, 2)
    lse = torch.empty(B, H, nq, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=q.device)
    budget = _budget(q, 1, call.chunk_bytes)[0] // 4  # gathered calls: a quarter budget (the working set stays flat in N)
    index = 0
    for b0, n, plan, g in _group_runs(call, call.plans):
        per_block = 2 * g.r + 2 * sum(s.k1 - s.k0 for s in g.slabs)  # q and output rows, gathered k, v
        if not _gathered(call, g, n, per_block, budget):
            # Rows together only where every slab allows it (nothing to stack; at N=1024 stacking the
            # sliding slabs' partials cost what the saved calls gain), within a quarter budget.
            rowwise = all(_row_batched(call, g, s) for s in g.slabs)
            m = _rows_per_call(call, q, n, 4 * 3 * g.c * g.r) if rowwise else 1  # 3: accumulator, partial, merge
            for b in range(b0, b0 + n, m):
                index = _group_forward(call, plan, g, b, min(m, b0 + n - b), index, q, k, v, out, lse)
            continue
        for b, m, sub in _gathered_calls(b0, n, g, per_block, budget):
            qg = _rows_view(q, b, m, sub.q0, sub.c, sub.r, sub.r).reshape(m * H, sub.c, sub.r, D)
            o, l = _FLASH(qg, _gather_keys(k, b, m, sub), _gather_keys(v, b, m, sub), 0.0, False,
                          scale=call.scale)[:2]  # (m * H, c, r, D), (m * H, c, r)
            _rows_view(out, b, m, sub.q0, sub.c, sub.r, sub.r).copy_(o.view(m, H, sub.c, sub.r, D))
            _rows_view(lse, b, m, sub.q0, sub.c, sub.r, sub.r).copy_(l.view(m, H, sub.c, sub.r))
    for b, plan in enumerate(call.plans):
        for a, e in plan.dead:  # query blocks that are all padding: zero rows that saw no key
            out[b, :, a:e] = 0
            lse[b, :, a:e] = float("-inf")
    return out, lse


def _group_forward(call: _Call, plan: _Plan, g: _Group, b0: int, n: int, index: int, q, k, v, out, lse) -> int:
    """One group of the n rows b0 .. b0 + n - 1 (one plan; n > 1 only where ``_row_batched``
    allows every slab: one call for the n rows), slab by slab, merged by log-sum-exp; returns the
    next slab index."""
    dest, acc = _rows_span(out, b0, n, g), None  # (n, c, H, r, D)
    for i, slab in enumerate(g.slabs):
        if _row_batched(call, g, slab):  # (n, H, c * r, D) against (n, H, L, D)
            L = slab.k1 - slab.k0
            o, l = _slab_forward(call, index, _span(q, b0, n, g.q0, g.c * g.r), _span(k, b0, n, slab.k0, L),
                                 _span(v, b0, n, slab.k0, L), None, slab)
            o, l = (t.unflatten(2, (g.c, g.r)).transpose(1, 2) for t in (o, l))  # (n, c, H, r, D), (n, c, H, r)
            index += n
        else:
            o, l = (t[None] for t in _slab_forward_row(call, plan, g, slab, b0, index, q, k, v))
            index += 1
        acc = (o, l) if acc is None else _merge(*acc, o, l, out=dest if i == len(g.slabs) - 1 else None)
        del o, l  # (a partial output held past its merge would be one more chunk of memory)
    if len(g.slabs) == 1:
        dest.copy_(acc[0])
    _rows_span(lse, b0, n, g).copy_(acc[1])
    return index


def _slab_forward_row(call: _Call, plan: _Plan, g: _Group, slab: _Slab, b: int, index: int, q, k, v):
    """One slab of a group for row ``b``: (out (c, H, r, D), lse (c, H, r))."""
    am, has_key = _slab_mask(call, plan, g, slab, b, q.dtype, q.device)
    if _shared(call, g, slab, am):  # keys shared by the group: one (c * r)-row call per head
        ks, vs = (_view(t, b, slab.k0, 1, slab.k1 - slab.k0, 0) for t in (k, v))  # (1, H, L, D)
        o, l = _slab_forward(call, index, _view(q, b, g.q0, 1, g.c * g.r, 0), ks, vs, am, slab)
        o, l = _blocks_first(o, g.c), _blocks_first(l, g.c)  # (1, H, c * r, D) -> (c, H, r, D)
    else:
        ks, vs = (_view(t, b, slab.k0, g.c, slab.k1 - slab.k0, slab.step) for t in (k, v))  # (c, H, L, D)
        o, l = _slab_forward(call, index, _view(q, b, g.q0, g.c, g.r, g.r), ks, vs, am, slab)
    if has_key is not None:  # the fused kernel reports lse 0 (not -inf) for a row with no key
        l = l.masked_fill(~has_key, float("-inf"))
    return o, l


def _row_batched(call: _Call, g: _Group, slab: _Slab) -> bool:
    """Whether a slab runs as one call for all the rows of a run (the fused kernel, no mask of
    its own, and one (c * r)-row query span per row: a one-block group, or keys the group's
    blocks share, see ``_shared``): (n, H, rows, D) is a plain view of q, k and v, so batch rows
    cost no copy, and the call has n times the work units (N=256, block 16, B=2: 12 -> 8 calls
    a pass)."""
    if not call.fused or call.mask is not None or call.bias is not None or slab.own_mask:
        return False
    return g.c == 1 or _shared(call, g, slab, None)


def _rows_per_call(call: _Call, q, n: int, rows: int) -> int:
    """How many batch rows one row-batched call may take: ``rows`` token rows of temporaries
    each, within one budget."""
    return max(1, min(n, _budget(q, 1, call.chunk_bytes)[0] // max(1, rows)))


def _span(t: torch.Tensor, b: int, n: int, start: int, rows: int) -> torch.Tensor:
    """(n, H, rows, D) (or (n, H, rows)) view of rows ``start + [0, rows)`` of t[b : b + n]."""
    st = t.stride()
    return t.as_strided((n, t.shape[1], rows, *t.shape[3:]), st, t.storage_offset() + b * st[0] + start * st[2])


def _rows_span(t: torch.Tensor, b: int, n: int, g: _Group) -> torch.Tensor:
    """(n, c, H, r, D) (or (n, c, H, r)): ``_view`` of a group's query rows in rows b .. b + n - 1."""
    st = t.stride()
    size, stride = (n, g.c, t.shape[1], g.r, *t.shape[3:]), (st[0], g.r * st[2], st[1], st[2], *st[3:])
    return t.as_strided(size, stride, t.storage_offset() + b * st[0] + g.q0 * st[2])


def _shared(call: _Call, g: _Group, slab: _Slab, am) -> bool:
    """Whether the group's blocks all read the slab's keys (a global block) with no per-block
    mask: computed as one call of c * r query rows per head, c times fewer kernel work units
    (at block 16 each unit costs the CPU flash kernel ~2-4 us beyond its arithmetic). Not where
    the flash kernel's own (query split x key split) buffer, which grows with the rows of a
    call (a split of up to 256 rows by 512 keys, fp32), would pass a quarter of the budget."""
    if g.c == 1 or slab.step != 0 or (am is not None and am.shape[0] != 1):
        return False
    return min(g.c * g.r, 256) * min(slab.k1 - slab.k0, 512) * 4 * torch.get_num_threads() <= call.chunk_bytes // 4


def _backward(call: _Call, q, k, v, out, lse, grad_out):
    """Flash-style backward over ``call.backward_plans``: each slab's probabilities are recomputed
    from q, k and the saved lse (any cut of the keys will do: lse and out are the whole row's).
    Dead query blocks contribute nothing (their dq rows stay zero)."""
    dq, dk, dv = _grad_buffer(q), _grad_buffer(k), _grad_buffer(v)
    lse = lse.masked_fill(lse.isinf(), 0.0)  # rows with no key: every probability is exp(-inf) = 0
    index = 0
    for b0, n, plan, g in _group_runs(call, call.backward_plans):
        index = _group_backward(call, plan, g, b0, n, index, q, k, v, out, lse, grad_out, dq, dk, dv)
    return dq, dk, dv


def _group_backward(call: _Call, plan: _Plan, g: _Group, b0: int, n: int, index: int, q, k, v, out, lse,
                    grad_out, dq, dk, dv) -> int:
    """One group of the n rows b0 .. b0 + n - 1, slab by slab (adds into dq, dk, dv); returns
    the next slab index. A slab that ``_row_batched`` allows is one call for up to a budget of
    rows (no merge in backward, so nothing is stacked), the others one call per row."""
    for slab in g.slabs:
        if not _row_batched(call, g, slab):
            for b in range(b0, b0 + n):
                index = _slab_backward_row(call, plan, g, slab, b, index, q, k, v, out, lse, grad_out, dq, dk, dv)
            continue
        L, rows = slab.k1 - slab.k0, g.c * g.r
        m = _rows_per_call(call, q, n, (rows + 2 * L) // BACKWARD_BUDGETS)  # dq rows, dk and dv: 3 budgets
        for b in range(b0, b0 + n, m):
            e = min(m, b0 + n - b)
            qn, gn, on, dqn = (_span(t, b, e, g.q0, rows) for t in (q, grad_out, out, dq))  # (e, H, rows, D)
            gq, gk, gv = _FLASH_BWD(gn, qn, _span(k, b, e, slab.k0, L), _span(v, b, e, slab.k0, L), on,
                                    _span(lse, b, e, g.q0, rows), 0.0, slab.diag, scale=call.scale)
            dqn += gq
            del gq
            _span(dk, b, e, slab.k0, L).add_(gk)  # a shared slab: the kernel summed the c blocks already
            _span(dv, b, e, slab.k0, L).add_(gv)
            del gk, gv
        index += n
    return index


def _slab_backward_row(call: _Call, plan: _Plan, g: _Group, slab: _Slab, b: int, index: int, q, k, v, out, lse,
                       grad_out, dq, dk, dv) -> int:
    """One slab of a group for row ``b`` (adds into dq, dk, dv); returns the next slab index."""
    am, _ = _slab_mask(call, plan, g, slab, b, q.dtype, q.device)
    c, r, L = g.c, g.r, slab.k1 - slab.k0
    if _shared(call, g, slab, am):  # see _forward: (1, H, c * r, D) against (1, H, L, D)
        c, r = 1, g.c * g.r
    q0, step = g.q0, (r if c == g.c else 0)
    qs, gs, os_, ls, dqs = (_view(t, b, q0, c, r, step) for t in (q, grad_out, out, lse, dq))  # (c, H, r, D)
    ks, vs = (_view(t, b, slab.k0, c, L, slab.step) for t in (k, v))
    if call.fused:
        gq, gk, gv = _FLASH_BWD(gs, qs, ks, vs, os_, ls, 0.0, slab.diag, attn_mask=am, scale=call.scale)
    else:
        delta = (gs.to(_acc(gs)) * os_).sum(-1, keepdim=True)  # (c, H, r, 1)
        gq, gk, gv = _slab_backward_eager(call, index, qs, ks, vs, am, gs, ls, delta)
    dqs += gq
    del gq
    _add_block_windows(dk, b, slab, c, gk)
    _add_block_windows(dv, b, slab, c, gv)
    return index + 1


def _window_index(c: int, w: int, device, stride: int = 1) -> torch.Tensor:
    """(c * w,) long: unit j of block i of a sliding window lands on unit i * stride + j."""
    key = (c, w, stride, str(device))
    if key not in _WINDOW_INDEX:
        if len(_WINDOW_INDEX) > _CACHE_SIZE:
            _WINDOW_INDEX.clear()
        _WINDOW_INDEX[key] = (torch.arange(c, device=device)[:, None] * stride
                              + torch.arange(w, device=device)).reshape(-1)
    return _WINDOW_INDEX[key]


_WINDOW_INDEX: dict = {}


def _add_block_windows(dst: torch.Tensor, b: int, slab: _Slab, c: int, src: torch.Tensor) -> None:
    """dst[b, :, k0 + j * step + [0, L)] += src[j] for every block j of a group (src (c, H, L, D),
    ``_view`` order). A sliding window (0 < step < L) is one ``index_add_`` of gcd(L, step)-row
    units where both sides are (N, H, D)-ordered runs (dst from ``_grad_buffer``, src
    the flash kernel's own layout): N=1024, block 16, 31-block windows, 0.38 ms against 0.63 ms
    for 31 strided passes (the passes remain where a stride does not fit)."""
    k0, L, step = slab.k0, slab.k1 - slab.k0, slab.step
    if c == 1:
        dst[b, :, k0 : k0 + L] += src[0]
    elif step == 0:  # one shared slab (global keys)
        dst[b, :, k0 : k0 + L] += src.sum(0)
    elif step >= L:
        _view(dst, b, k0, c, L, step).add_(src)
    else:
        H, D, g = src.shape[1], src.shape[3], math.gcd(L, step)
        if dst.stride()[1:] == (D, H * D, 1) and src.stride() == (L * H * D, D, H * D, 1):
            # units of g = gcd(L, step) rows; block j's unit u lands on unit j * (step / g) + u
            # (g = step for a plain window; a tiled one, step t * bs, may need g = bs)
            w, stride, unit = L // g, step // g, g * H * D  # unit: floats of g rows
            rows = dst.as_strided(((c - 1) * stride + w, unit), (unit, 1),
                                  dst.storage_offset() + b * dst.stride(0) + k0 * H * D)
            rows.index_add_(0, _window_index(c, w, dst.device, stride),
                            src.as_strided((c * w, unit), (unit, 1), src.storage_offset()))
        elif L % step == 0:
            for t in range(0, L, step):
                _view(dst, b, k0 + t, c, step, step).add_(src[:, :, t : t + step])
        else:
            for j in range(c):
                dst[b, :, k0 + j * step : k0 + j * step + L] += src[j]


def _slab_backward_eager(call: _Call, index, qs, ks, vs, am, gs, ls, delta):
    f = _acc(qs)
    p = torch.exp(_eager_scores(qs, ks, am, call.scale) - ls[..., None])  # (c, H, r, L)
    dp = torch.matmul(gs.to(f), vs.to(f).transpose(-1, -2))
    pd = p
    if call.dropout_p:
        keep = _dropout_keep(call, index, p.shape, p.device, p.dtype)
        pd, dp = p * keep, dp * keep
    ds = p * (dp - delta) * call.scale
    gq = torch.matmul(ds, ks.to(f)).to(qs.dtype)
    gk = torch.matmul(ds.transpose(-1, -2), qs.to(f)).to(ks.dtype)
    gv = torch.matmul(pd.transpose(-1, -2), gs.to(f)).to(vs.dtype)
    return gq, gk, gv


class _BlockSparseFunction(torch.autograd.Function):
    """Saves q, k, v, the output and the log-sum-exp (and the plans); the backward recomputes
    each slab's probabilities, as flash attention does."""

    @staticmethod
    def forward(ctx, q, k, v, call: _Call):
        out, lse = _forward(call, q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (*_backward(ctx.call, q, k, v, out, lse, grad_out), None)


def _bias_needs_grad(bias, device) -> bool:
    if bias is None or not torch.is_grad_enabled():
        return False
    p = torch.zeros(1, dtype=torch.long, device=device)
    return bias(p, p).requires_grad


def _traced_rows(plan: _Plan, mask, bias, scale, dropout_p, q, k, v):
    """A bias that needs gradients (learned relative positions): per query block, eager
    attention on its concatenated slabs under autograd (saves each block's scores). ``plan``
    is the unpadded one-block-per-group plan; ``mask`` (B|1, H|1, Nq|1, Nk) or None."""
    outs, offset = [], plan.offset
    for g in plan.groups:
        qs = q[:, :, g.q0 : g.q0 + g.r]
        ks = torch.cat([k[:, :, s.k0 : s.k1] for s in g.slabs], dim=2)
        vs = torch.cat([v[:, :, s.k0 : s.k1] for s in g.slabs], dim=2)
        q_pos = torch.arange(g.q0 + offset, g.q0 + g.r + offset, device=q.device)
        k_pos = torch.cat([torch.arange(s.k0, s.k1, device=q.device) for s in g.slabs])
        visible = k_pos[None, :] <= q_pos[:, None] if any(s.diag or s.masked for s in g.slabs) else None
        if mask is not None:
            m = mask[:, :, g.q0 : g.q0 + g.r] if mask.shape[2] > 1 else mask
            visible = m[..., k_pos] if visible is None else m[..., k_pos] & visible
        outs.append(eager_attention(qs, ks, vs, mask=visible, bias=lambda *_: bias(q_pos, k_pos), scale=scale,
                                    dropout_p=dropout_p)[0])
    return torch.cat(outs, dim=2)


def _sparse_attention(q, k, v, state: BlockSparseLayout, *, causal, mask, bias, scale, dropout_p):
    """Every query block against its slabs, plans per batch row (see the module docstring)."""
    B, nq, nk, bs = q.shape[0], q.shape[-2], k.shape[-2], state.block_size
    fused = q.device.type == "cpu" and not dropout_p
    tokens, bwd_blocks = _budget(q, bs, state.chunk_bytes)
    padding = mask is not None and _is_key_padding(mask, nk)
    pads = _row_padding(mask, B, nk, bs) if padding else None
    if padding and pads is None:
        mask, padding = None, False  # an all-True key mask is no mask
    general = None if mask is None or padding else _as_4d(mask, nk)
    if _bias_needs_grad(bias, q.device):
        plan = state.plan(nq, nk, causal, bwd_blocks, 0, False)
        out = _traced_rows(plan, general if not padding else _as_4d(mask, nk), bias, scale, dropout_p, q, k, v)
        if padding:  # the same zero rows as the slab path
            out = out * _alive_queries(mask.reshape(-1, nk), nq, nk, bs)[:, None, :, None].to(out.dtype)
        return out
    batched = fused and general is None and bias is None
    # One block per group where a slab needs its own mask; eager math (dropout, other devices)
    # materializes a slab's scores and draws its dropout per slab, so its slabs are cut at the
    # budget and both passes share one plan. The fused forward streams a slab's keys itself
    # (its temporaries do not grow with the slab), so its slabs are whole runs of key blocks;
    # the backward's dk, dv do grow with a slab: cut at the budget, groups within
    # BACKWARD_BUDGETS budgets.
    rows = pads or (None,) * B
    plans = tuple(state.plan(nq, nk, causal, 1 << 30 if fused else bwd_blocks, tokens if batched else 0, False, p)
                  for p in rows)
    backward_plans = tuple(state.plan(nq, nk, causal, bwd_blocks, BACKWARD_BUDGETS * tokens if batched else 0, True, p)
                           for p in rows) if fused else plans
    seed = int(torch.randint(0, 2**62, (), device="cpu")) if dropout_p else 0  # from the global generator
    keys = mask.reshape(-1, nk) if padding else None
    call = _Call(plans, backward_plans, general, keys, bias, scale, dropout_p, seed, fused, state.chunk_bytes)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _BlockSparseFunction.apply(q, k, v, call)
    return _forward(call, q, k, v)[0]


_compiled_flex = None


def _flex_ok(q, mask, bias, dropout_p, backend: str) -> bool:
    if backend == "gather" or mask is not None or bias is not None or dropout_p > 0:
        return False
    if q.shape[-1] not in (16, 32, 64, 128, 256):
        return False
    if q.is_cuda:
        return True
    # CPU FlexAttention has no backward: only inference, and only when asked for explicitly.
    return backend == "flex" and not (torch.is_grad_enabled() and q.requires_grad)


def _flex(q, k, v, state: BlockSparseLayout, *, causal, scale):
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    block_mask = state.block_mask(q.shape[-2], k.shape[-2], causal, q.device)
    return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)


def _check(q, k, v, state):
    if not isinstance(state, BlockSparseLayout):
        raise ValueError("block_sparse attention needs state=BlockSparseLayout(config.attention.block_sparse); "
                         "build it with KERNELS['block_sparse'].make_state(model_config, layer_idx, cross)")
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"block_sparse attention expects q (B, H, Nq, D) and k, v (B, H, Nk, D); "
                         f"got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")


def layer_is_causal(config: ModelConfig, layer_idx: int, cross: bool) -> bool:
    """Decoder self-attention layers (global numbering: encoder layers first) are causal."""
    if cross or config.arch == "encoder":
        return False
    return config.arch == "decoder" or layer_idx >= config.num_layers


def make_block_sparse_state(config: ModelConfig, layer_idx: int, cross: bool) -> BlockSparseLayout:
    return BlockSparseLayout(config.attention.block_sparse, layer_idx=layer_idx, cross=cross,
                             causal=layer_is_causal(config, layer_idx, cross))


def block_sparse_work(config: ModelConfig, N: int, *, layer_idx: int, cross: bool) -> AttentionWork:
    """Keys per query of the layer's own layout (the pairs of ``dense_mask``), or dense SDPA's N."""
    layout = make_block_sparse_state(config, layer_idx, cross)
    if cross or layout.dense_below(N, layout.causal):
        return AttentionWork("sdpa", float(N))
    blocks = layout.block_layout(math.ceil(N / layout.block_size), layout.causal)  # (nb, nb)
    return AttentionWork("block_sparse", block_keys_per_query(blocks, layout.block_size, N, causal=layout.causal))


@register_kernel("block_sparse", make_state=make_block_sparse_state, work=block_sparse_work,
                 memory=lambda *args, **kw: block_sparse_memory(*args, **kw))  # defined at the end of the file
def block_sparse_attention(q, k, v, *, mask=None, bias=None, causal=False, scale, dropout_p=0.0, need_weights=False,
                           state=None):
    _check(q, k, v, state)
    nq, nk = q.shape[-2], k.shape[-2]
    dense = state.cross or state.dense_below(nk, causal)
    if not dense and nq > nk:
        raise ValueError(f"block_sparse self-attention needs Nq <= Nk (queries are the last Nq positions); "
                         f"got Nq={nq}, Nk={nk}")
    if need_weights:  # debugging path: the same layout through the materializing reference
        equivalent = state.equivalent_mask(mask, nq, nk, causal=causal).to(q.device)
        return eager_attention(q, k, v, mask=equivalent, bias=bias, causal=causal, scale=scale, dropout_p=dropout_p,
                               need_weights=True)
    if dense:
        return sdpa_attention(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, dropout_p=dropout_p)
    if mask is not None and _is_key_padding(mask, nk) and _row_padding(mask, q.shape[0], nk, state.block_size) is None:
        mask = None  # an all-True key mask is no mask (FlexAttention and the batched slab path take it)
    if _flex_ok(q, mask, bias, dropout_p, state.config.backend):
        return _flex(q, k, v, state, causal=causal, scale=scale), None
    out = _sparse_attention(q, k, v, state, causal=causal, mask=mask, bias=bias, scale=scale, dropout_p=dropout_p)
    return out, None


def block_sparse_memory(config: ModelConfig, B: int, N: int, s: int, *, layer_idx: int, cross: bool):
    """Per layer: the slab path's working set is bounded by the chunk budget (forward: one
    budget; backward: ``BACKWARD_BUDGETS``), never more than the layout's fraction of the fp32
    (B, H, N, N) scores; backward keeps the (B, H, N) log-sum-exp, as fused SDPA does. Dense
    SDPA's cost where the kernel runs dense SDPA (cross-attention, density 1.0,
    N <= min_seq_length)."""
    from omninet.attention.dense import scores_bytes
    from omninet.attention.registry import AttentionMemory, get_kernel

    bcfg = config.attention.block_sparse
    if cross or bcfg.sparsity_factor == 0.0 or N <= bcfg.min_seq_length:
        return get_kernel("sdpa").memory(config, B, N, s, layer_idx=layer_idx, cross=cross)
    scores = scores_bytes(config, B, N, 1 - bcfg.sparsity_factor)
    lse = B * config.num_heads * N * 4
    return AttentionMemory(transient=min(scores, CHUNK_BYTES), saved=lse,
                           backward=min(scores, BACKWARD_BUDGETS * CHUNK_BYTES))
