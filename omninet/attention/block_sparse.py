"""Block-sparse attention whose compute and memory shrink with the layout's density.

Dimensions: B batch, H heads, Nq queries, Nk keys, D head dim, bs block size,
nb = ceil(Nk / bs) key blocks, nS sparse query blocks, kb key blocks per sparse query block.

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

Computation (CPU and GPU): global/prefix rows run dense SDPA on those rows only. The other
query blocks gather their kb key/value blocks into (B*H, nS, kb*bs, D) (rows with fewer
blocks are padded with a masked dummy block), and one fused SDPA call over
(B*H, nS, bs, D) queries computes them: no (Nq x Nk) score matrix ever exists, and the fused
CPU/GPU kernels provide a fused backward. On CUDA, with no user mask, bias or dropout, the
kernel uses compiled FlexAttention with a ``BlockMask`` built once per layout and length.

Masks: key-padding masks (B|1, H|1, 1, Nk) are gathered with the keys; general masks
(B|1, H|1, Nq, Nk) are gathered per (query, key) pair of the layout (the mask itself is then
Nq x Nk, the caller's choice). The lazy ``bias(q_pos, k_pos)`` is evaluated once per query
block for just its gathered keys. Cross-attention uses dense SDPA (a layout is defined over
one sequence). ``need_weights`` returns the (B, H, Nq, Nk) weights of exactly this layout,
materialized through the eager reference (debugging only).

``state.dense_mask(nq, nk, causal=None)`` is the (Nq, Nk) bool mask that this kernel is
equivalent to: ``block_sparse(q, k, v, mask=m) == eager(q, k, v, mask=m & dense_mask)``
(``causal`` defaults to the layer's own, known to ``make_state``).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from omninet.attention import register_kernel
from omninet.attention.dense import eager_attention, sdpa_attention
from omninet.config import BlockSparseConfig, ModelConfig

__all__ = ["BlockSparseLayout", "block_sparse_attention", "make_block_sparse_state"]

_CACHE_SIZE = 64  # plans per layer (decoding creates one per generated length)


@dataclass(frozen=True)
class _Plan:
    """How one (Nq, Nk, causal) call is computed. Tensors live on the call's device."""

    n_dense: int  # leading query rows computed densely (global / prefix rows)
    front: int  # dummy query rows before the sparse rows (aligns them to a block start)
    back: int  # dummy query rows after them (fills the last block)
    n_blocks: int  # nS
    kb: int
    n_key_blocks: int  # nb
    key_blocks: torch.Tensor  # (nS * kb,) long, block ids into the padded keys
    valid: torch.Tensor | None  # (nS, bs | 1, kb*bs) bool; None when every gathered pair is visible
    q_pos: torch.Tensor  # (nS, bs) long, absolute query positions (clamped into range)
    k_pos: torch.Tensor  # (nS, kb*bs) long, absolute key positions (clamped into range)


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

    # ---- plans ----------------------------------------------------------------------------
    def plan(self, nq: int, nk: int, causal: bool, device) -> _Plan:
        return self._plans.get_or((nq, nk, causal, str(device)), lambda: self._build_plan(nq, nk, causal, device))

    def _build_plan(self, nq: int, nk: int, causal: bool, device) -> _Plan:
        bs, nb, offset = self.block_size, math.ceil(nk / self.block_size), nk - nq
        n_dense = min(max(self._prefix_blocks(causal) * bs - offset, 0), nq)
        a0 = offset + n_dense  # absolute position of the first sparse query
        b0, front = divmod(a0, bs)
        n_blocks = math.ceil((front + nq - n_dense) / bs)
        back = n_blocks * bs - front - (nq - n_dense)
        rows = self.rows(nb, causal)[b0 : b0 + n_blocks]
        kb = max((len(r) for r in rows), default=1)
        ids = torch.tensor([list(r) + [r[0]] * (kb - len(r)) for r in rows], dtype=torch.long).view(-1, kb)
        block_ok = torch.tensor([[j < len(r) for j in range(kb)] for r in rows], dtype=torch.bool).view(-1, kb)
        within = torch.arange(bs)
        k_abs = (ids[:, :, None] * bs + within).reshape(len(rows), kb * bs)  # (nS, kb*bs)
        q_abs = (torch.arange(b0, b0 + n_blocks)[:, None] * bs + within)  # (nS, bs)
        valid = (block_ok[:, :, None].expand(-1, -1, bs).reshape(len(rows), kb * bs) & (k_abs < nk))[:, None, :]
        if causal:
            valid = valid & (k_abs[:, None, :] <= q_abs[:, :, None])  # (nS, bs, kb*bs)
        return _Plan(
            n_dense=n_dense, front=front, back=back, n_blocks=n_blocks, kb=kb, n_key_blocks=nb,
            key_blocks=ids.reshape(-1).to(device),
            valid=None if bool(valid.all()) else valid.to(device),
            q_pos=q_abs.clamp(max=nk - 1).to(device), k_pos=k_abs.clamp(max=nk - 1).to(device),
        )

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


def _dense_rows(q, k, v, *, n, offset, causal, mask, bias, scale, dropout_p):
    """Rows [0, n) of the queries (absolute positions offset..offset+n-1) against every
    visible key, by dense SDPA on those rows only."""
    nk = offset + n if causal else k.shape[-2]  # causal rows never see later keys
    k, v = k[:, :, :nk], v[:, :, :nk]
    if mask is not None:
        mask = mask[:, :, :n, :nk] if mask.shape[2] > 1 else mask[..., :nk]
    shift = offset - (nk - n)  # sdpa_attention places query i at nk - n + i
    if bias is not None and shift:
        bias = (lambda b, s: (lambda qp, kp: b(qp + s, kp)))(bias, shift)
    return sdpa_attention(q[:, :, :n], k, v, mask=mask, bias=bias, causal=causal, scale=scale, dropout_p=dropout_p)[0]


def _gathered_mask(plan: _Plan, mask, bias, *, B, H, nq, nk, dtype):
    """SDPA's attn_mask for the gathered blocks, broadcastable to (B*H, nS, bs, kb*bs), and
    has_key (B*H, nS, bs, 1) for rows left without any visible key (None when impossible)."""
    visible, has_key = plan.valid, None  # (nS, bs|1, kb*bs)
    if mask is not None:
        if mask.shape[2] == 1:  # key padding: gather along keys only
            m = mask[:, :, 0][:, :, plan.k_pos][:, :, :, None, :]  # (Bm, Hm, nS, 1, kb*bs)
        else:
            q_idx = (plan.q_pos - (nk - nq)).clamp(min=0)  # (nS, bs) rows of the user mask
            m = mask[:, :, q_idx[:, :, None], plan.k_pos[:, None, :]]  # (Bm, Hm, nS, bs, kb*bs)
        visible = m if visible is None else m & visible
        has_key = visible.any(dim=-1, keepdim=True)
        visible = visible | ~has_key  # such a row sees its keys; its output is zeroed below
    if bias is not None:
        blocks = [bias(plan.q_pos[i], plan.k_pos[i]) for i in range(plan.n_blocks)]  # each (H, bs, kb*bs)
        attn = torch.stack(blocks, dim=1).to(dtype)[None]  # (1, H, nS, bs, kb*bs)
        if visible is not None:
            attn = attn.masked_fill(~visible, float("-inf"))
    else:
        attn = visible
    fold = lambda x: None if x is None else x.expand(B, H, *x.shape[-3:]).reshape(B * H, *x.shape[-3:])
    if attn is not None and attn.dim() == 3:
        return attn, fold(has_key)  # (nS, bs|1, kb*bs) broadcasts over B*H
    return fold(attn), fold(has_key)


_SCRATCH = threading.local()


def _gather_blocks(src: torch.Tensor, rows: torch.Tensor, scratch: str | None) -> torch.Tensor:
    """src[rows] for a 2-D src. Without autograd the copy goes into a per-thread scratch buffer
    reused across calls and layers (it is consumed by the SDPA call right after): a fresh
    tensor of this size costs more in page faults than the copy itself (~5x on this CPU)."""
    if scratch is None:
        return src.index_select(0, rows)
    numel = rows.numel() * src.shape[1]
    buf = getattr(_SCRATCH, scratch, None)
    if buf is None or buf.numel() < numel or buf.dtype != src.dtype or buf.device != src.device:
        buf = torch.empty(numel, dtype=src.dtype, device=src.device)
        setattr(_SCRATCH, scratch, buf)
    return torch.index_select(src, 0, rows, out=buf[:numel].view(rows.numel(), src.shape[1]))


def _sparse_rows(q, k, v, plan: _Plan, *, bs, mask, bias, scale, dropout_p):
    """Query rows [n_dense, Nq) by gathered blocks: one fused SDPA over (B*H, nS, bs, D)."""
    B, H, nq, D = q.shape
    nk = k.shape[-2]
    qs = q[:, :, plan.n_dense :]
    if plan.front or plan.back:
        qs = F.pad(qs, (0, 0, plan.front, plan.back))
    qs = qs.reshape(B * H, plan.n_blocks, bs, D)  # (B*H, nS, bs, D)
    pad = plan.n_key_blocks * bs - nk
    if pad:
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    shape = (B * H, plan.n_blocks, plan.kb * bs, D)
    # Rows of a 2-D (B*H*nb, bs*D) view are whole blocks: index_select copies them with memcpy.
    rows = (torch.arange(B * H, device=k.device)[:, None] * plan.n_key_blocks + plan.key_blocks[None, :]).reshape(-1)
    reuse = not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
    kg, vg = (_gather_blocks(t.reshape(B * H * plan.n_key_blocks, bs * D), rows, name if reuse else None).view(shape)
              for t, name in ((k, "k"), (v, "v")))  # (B*H, nS, kb*bs, D) each
    attn_mask, has_key = _gathered_mask(plan, mask, bias, B=B, H=H, nq=nq, nk=nk, dtype=q.dtype)
    out = F.scaled_dot_product_attention(qs, kg, vg, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if has_key is not None:
        out = out * has_key.to(out.dtype)
    out = out.view(B, H, plan.n_blocks * bs, D)
    return out[:, :, plan.front : plan.front + nq - plan.n_dense]  # (B, H, Nq - n_dense, D)


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


@register_kernel("block_sparse", make_state=make_block_sparse_state,
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
        layout = state.dense_mask(nq, nk, causal=causal).to(q.device)
        return eager_attention(q, k, v, mask=layout if mask is None else mask & layout, bias=bias, causal=causal,
                               scale=scale, dropout_p=dropout_p, need_weights=True)
    if dense:
        return sdpa_attention(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, dropout_p=dropout_p)
    if _flex_ok(q, mask, bias, dropout_p, state.config.backend):
        return _flex(q, k, v, state, causal=causal, scale=scale), None
    plan = state.plan(nq, nk, causal, q.device)
    mask = None if mask is None else _as_4d(mask, nk)
    parts = []
    if plan.n_dense:
        parts.append(_dense_rows(q, k, v, n=plan.n_dense, offset=nk - nq, causal=causal, mask=mask, bias=bias,
                                 scale=scale, dropout_p=dropout_p))
    if plan.n_dense < nq:
        parts.append(_sparse_rows(q, k, v, plan, bs=state.block_size, mask=mask, bias=bias, scale=scale,
                                  dropout_p=dropout_p))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # (B, H, Nq, D)
    return out, None


def block_sparse_memory(config: ModelConfig, B: int, N: int, s: int, *, layer_idx: int, cross: bool):
    """Per layer: a ``1 - sparsity_factor`` fraction of the fp32 (B, H, N, N) scores at the peak
    and of the weights saved for backward; dense SDPA's cost where the kernel runs dense SDPA
    (cross-attention, density 1.0, N <= min_seq_length)."""
    # Local imports: this estimate leaves the kernel's own imports above as they are.
    from omninet.attention.dense import scores_bytes
    from omninet.attention.registry import AttentionMemory, get_kernel

    bcfg = config.attention.block_sparse
    if cross or bcfg.sparsity_factor == 0.0 or N <= bcfg.min_seq_length:
        return get_kernel("sdpa").memory(config, B, N, s, layer_idx=layer_idx, cross=cross)
    scores = scores_bytes(config, B, N, 1 - bcfg.sparsity_factor)
    return AttentionMemory(transient=2 * scores, saved=scores * s / 4)
