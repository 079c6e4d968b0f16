"""The bounded KV cache of a sink + window layer: a ring buffer of the keys its next query sees.

Dimensions: B batch, Hk K/V heads, T tokens of a call, D head dim, S sink tokens, W window
tokens (``window_blocks * block_size``), cap = S + W slots.

A ``sink_window`` layout (``BlockSparseConfig.pattern``) lets the query at position p see the
first ``sink_blocks`` blocks and the blocks ``p // bs - w + 1 .. p // bs`` (the last ``w``
blocks, its own included), causally. So the keys a decode step needs are S sink positions plus
at most W recent ones, however long the sequence is. ``RingBuffer`` holds exactly those: slot t
for a sink position t, slot ``S + (t - S) mod W`` for a window position, so the block that
starts at position t reuses the slots of the block ``w`` blocks before it, which left the
window at that moment (it is evicted: its slots are marked empty, ``pos == -1``). Keys are
stored after their rotation (rotary positions stay true) and ``pos`` keeps each slot's true
position, for position biases (ALiBi, relative) and for the masks. The order of the slots does
not matter to attention; the mask ``visible`` does, and it is kept in place (an O(1) update per
token, never rebuilt from the sequence's length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheWindow:
    """What a sink + window layer's cache must keep: ``sink`` leading positions (whole blocks)
    and the last ``window_blocks`` blocks of ``block_size`` positions."""

    sink: int  # tokens: sink_blocks * block_size
    window_blocks: int
    block_size: int

    @property
    def window(self) -> int:
        """Tokens of the window part of the ring (W)."""
        return self.window_blocks * self.block_size

    @property
    def capacity(self) -> int:
        """Slots of the ring: S + W keys, the most a query ever sees."""
        return self.sink + self.window

    def start(self, p: int) -> int:
        """The first window position the query at position ``p`` sees (positions below it and at
        or past ``sink`` are outside its row)."""
        return max(self.sink, (p // self.block_size - self.window_blocks + 1) * self.block_size)

    def slot(self, t: int) -> int:
        """The ring slot of position ``t``."""
        return t if t < self.sink else self.sink + (t - self.sink) % self.window

    def visible(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(Nq, Nk) bool: query position i may see key position j under the layout (causal;
        a key position < 0 is an empty slot)."""
        start = ((q_pos // self.block_size - self.window_blocks + 1) * self.block_size).clamp(min=self.sink)
        q, k = q_pos[:, None], k_pos[None, :]
        return (k >= 0) & (k <= q) & ((k < self.sink) | (k >= start[:, None]))


@dataclass(frozen=True)
class RingKeys:
    """The keys one attention call sees through a ring: k, v (B, Hk, Nk, D), the bool ``mask``
    (1, 1, Nq, Nk) of the pairs the layout allows, and the true positions (Nq,), (Nk,) of the
    queries and keys (for position biases)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor


class RingBuffer:
    """One layer's cached keys and values under a ``CacheWindow``: (B, Hk, cap, D) buffers
    allocated once, ``pos`` (cap,) the true position each slot holds (-1: empty) and
    ``visible`` (1, 1, 1, cap) the slots the last written position's query sees."""

    def __init__(self, window: CacheWindow):
        self.window = window
        self.k: torch.Tensor | None = None  # (B, Hk, cap, D)
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None  # (cap,) long
        self.visible: torch.Tensor | None = None  # (1, 1, 1, cap) bool
        self.length = 0  # positions written so far (the next one is ``length``)

    def _allocate(self, k: torch.Tensor) -> None:
        B, Hk, _, D = k.shape
        cap = self.window.capacity
        self.k, self.v = k.new_zeros(B, Hk, cap, D), k.new_zeros(B, Hk, cap, D)
        self.pos = torch.full((cap,), -1, dtype=torch.long, device=k.device)
        self.visible = torch.zeros(1, 1, 1, cap, dtype=torch.bool, device=k.device)

    def attend(self, k: torch.Tensor, v: torch.Tensor) -> RingKeys:
        """Stores this call's k, v (B, Hk, T, D), the positions ``length ..``, and returns the
        keys its queries see. One token (a decode step): written first, then the ring itself
        with ``visible`` (no copy, no mask built). T > 1 after earlier calls: the ring as it was
        and the new keys side by side under the layout's mask for each query, then written."""
        n, t = self.length, k.shape[-2]
        if self.k is None:
            self._allocate(k)
        w = self.window
        if t == 1:
            self._write_one(k, v, n)
            return RingKeys(self.k, self.v, self.visible, torch.tensor([n], device=k.device), self.pos)
        new_pos = torch.arange(n, n + t, device=k.device)
        k_pos = torch.cat([self.pos, new_pos])  # (cap + T,)
        mask = w.visible(new_pos, k_pos)[None, None]  # (1, 1, T, cap + T): bounded by cap + T
        out = RingKeys(torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2), mask, new_pos, k_pos)
        self.write(k, v)
        return out

    def _write_one(self, k: torch.Tensor, v: torch.Tensor, t: int) -> None:
        w = self.window
        s = w.slot(t)
        if t >= w.sink and (t - w.sink) % w.block_size == 0:  # a block starts: the one w blocks back leaves
            self.pos[s : s + w.block_size] = -1
            self.visible[..., s : s + w.block_size] = False
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Under autograd an in-place write would invalidate the graph of earlier steps.
            index = torch.tensor([s], device=k.device)
            self.k, self.v = self.k.index_copy(2, index, k), self.v.index_copy(2, index, v)
        else:
            self.k[..., s : s + 1, :] = k
            self.v[..., s : s + 1, :] = v
        self.pos[s] = t
        self.visible[..., s] = True
        self.length = t + 1

    def write(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v (B, Hk, T, D) at positions ``length ..``: the ones the query at the last of
        them sees (sinks, and the window from ``start``); slots of positions that left the window
        are emptied. Evicted keys are never copied."""
        if self.k is None:
            self._allocate(k)
        n, t, w = self.length, k.shape[-2], self.window
        last = n + t - 1
        start = w.start(last)
        keep = [p for p in range(n, min(n + t, w.sink))] + list(range(max(n, start), n + t))
        if keep:
            slots = torch.tensor([w.slot(p) for p in keep], device=k.device)
            src = torch.tensor([p - n for p in keep], device=k.device)
            kk, vv = k.index_select(2, src), v.index_select(2, src)
            if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
                self.k, self.v = self.k.index_copy(2, slots, kk), self.v.index_copy(2, slots, vv)
            else:
                self.k.index_copy_(2, slots, kk)
                self.v.index_copy_(2, slots, vv)
            self.pos[slots] = torch.tensor(keep, device=k.device)
        self.length = n + t
        self._refresh(last)

    def _refresh(self, last: int) -> None:
        """Empties the slots the query at ``last`` does not see; ``visible`` marks the others."""
        w = self.window
        keep = (self.pos >= 0) & ((self.pos < w.sink) | (self.pos >= w.start(last)))
        self.pos.masked_fill_(~keep, -1)
        self.visible.copy_(keep.view(1, 1, 1, -1))

    def reorder(self, index: torch.Tensor) -> None:
        """Keeps batch rows ``index`` (positions are shared by the batch)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)

    def crop(self, length: int) -> None:
        """Forgets positions from ``length`` on. Only possible while the ring still holds every
        key the query at ``length - 1`` sees: a window block once evicted is gone."""
        if length >= self.length:
            return
        w = self.window
        if length > 0 and w.start(length - 1) < w.start(self.length - 1):
            raise ValueError(f"KVCache.crop({length}): a sink_window layer's ring buffer has evicted the blocks from "
                             f"position {w.start(length - 1)} that length {length} needs (it holds positions from "
                             f"{w.start(self.length - 1)}); crop to at least {self._min_crop()} or prefill again")
        self.pos.masked_fill_(self.pos >= length, -1)
        self.length = length
        if length:
            self._refresh(length - 1)
        else:
            self.visible.fill_(False)

    def _min_crop(self) -> int:
        """The shortest length ``crop`` can go back to (the first position whose window starts
        where the last one's does)."""
        w = self.window
        start = w.start(self.length - 1)
        if start == w.sink:
            return 1
        return start + (w.window_blocks - 1) * w.block_size + 1

    def filled(self) -> int:
        """Slots written at least once: min(length, capacity)."""
        return min(self.length, self.window.capacity)

    def nbytes(self) -> int:
        """Bytes of the keys and values in the slots written so far (all of them once the ring is
        full): what ``kv_cache_bytes`` states."""
        if self.k is None:
            return 0
        return 2 * self.k[..., : self.filled(), :].numel() * self.k.element_size()

    def allocated_bytes(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


class AtPositions:
    """A position bias ``bias(q_pos, k_pos) -> (H, Nq, Nk)`` evaluated at a ring call's true
    positions, whatever positions the kernel passes (kernels number the keys 0 .. Nk - 1)."""

    def __init__(self, bias, q_pos: torch.Tensor, k_pos: torch.Tensor):
        self.bias, self.q_pos, self.k_pos = bias, q_pos, k_pos

    def __call__(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return self.bias(self.q_pos, self.k_pos)
