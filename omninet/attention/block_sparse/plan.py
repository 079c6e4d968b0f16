"""The plan of one call: which query blocks run against which key slabs, in which groups.

Dimensions: bs block size, nb key blocks, c query blocks of a group, r rows of a query block,
L keys of a slab.

A slab is a run of consecutive key blocks, a strided view of k and v (nothing is gathered);
consecutive query blocks whose slabs are the same up to a fixed shift form one group, one
kernel call per slab. ``build_plan`` folds a row's key padding in (``padding``), cuts sliding
windows at a row's length (``_clip_groups``) and runs wide windows in tiles (``_tile_groups``).
Plans are pure data (frozen dataclasses), cached per layer (``BlockSparseLayout.plan``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from omninet.attention.block_sparse.padding import _EMPTY, _MIXED

if TYPE_CHECKING:
    from omninet.attention.block_sparse.layout import BlockSparseLayout


# The working set, in bytes of temporaries, that one group of query blocks may hold at once
# (forward: its accumulator and one partial output; backward, BACKWARD_BUDGETS times this: its dq
# rows and one slab's dk, dv; a single slab's dk, dv stay within one budget). Slabs are views of k
# and v, so nothing else grows with N. Why 8 MB and 3: docs/kernels.md, "Why the tuning constants".
CHUNK_BYTES = 8 * 2**20
BACKWARD_BUDGETS = 3  # a backward group may hold 3 budgets (dq rows, dk, dv): 3x fewer kernel calls


def _budget(q: torch.Tensor, bs: int, budget: int) -> tuple[int, int]:
    """``budget`` bytes as token rows of (H, D) temporaries, and the key blocks one backward
    slab may span (its dk, dv and a block's dq rows within the budget)."""
    tokens = budget // (q.shape[1] * q.shape[3] * q.element_size())  # one token of one sequence, all heads
    return tokens, max(1, (tokens - bs) // (2 * bs))


_CACHE_SIZE = 256  # plans per layer (decoding creates one per generated length; padding one per row length)


class _LRU(OrderedDict):
    """At most ``_CACHE_SIZE`` entries (a layer's plans, its block masks), least recently used out first."""

    def get_or(self, key, build):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = build()
        if len(self) > _CACHE_SIZE:
            self.popitem(last=False)
        return value


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
    # a tiled window's edge: sub-block u of a tile reads keys from u * band on (> 0), or before u * -band (< 0)
    band: int = 0

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


def build_plan(layout: "BlockSparseLayout", nq: int, nk: int, causal: bool, max_blocks: int, budget_tokens: int,
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
    bs, nb, offset = layout.block_size, math.ceil(nk / layout.block_size), nk - nq
    end_key = pad if isinstance(pad, int) else nk  # keys at or past a row's length are padding
    classes = pad if isinstance(pad, tuple) else None
    rows, groups, dead = layout.rows(nb, causal), [], []
    for i in range(offset // bs, nb):
        q0 = max(i * bs, offset) - offset
        q1 = min((i + 1) * bs, nk) - offset
        if i * bs >= end_key or (classes is not None and classes[i] == _EMPTY):
            if dead and dead[-1][1] == q0:
                dead[-1] = (dead[-1][0], q1)
            else:
                dead.append((q0, q1))
            continue
        blocks = rows[i] or tuple(range(i + 1 if causal else nb))  # None: a dense row
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
        groups = _clip_groups(groups, end_key, layout.chunk_bytes // STAIR_FRACTION)
    groups = _tile_groups(groups, bs, layout.chunk_bytes)
    return _Plan(offset=offset, groups=tuple(groups), dead=tuple(dead))


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
# is cut into groups of fewer blocks (``_clip_groups``). Why 32: docs/kernels.md.
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
    mask over real keys only; groups cut so that it stays within ``max_elements``): its masked
    half costs less than the calls it saves (measured: docs/kernels.md)."""
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
# TILE_EXTRA of the window. Only windows of at least TILE_MIN_WINDOW blocks are tiled: a tile is
# three calls (its edges and middle), which at shorter windows cost more than the tile saves.
# Measured on one CPU: docs/kernels.md, "Why the tuning constants have their values".
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
