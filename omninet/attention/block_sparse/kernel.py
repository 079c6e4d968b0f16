"""The kernel entry: ``block_sparse_attention`` checks a call and picks its path.

Dense SDPA for cross-attention and for calls the layout keeps dense; the layout's weights
through the eager reference for ``need_weights``; FlexAttention where it applies (``flex``);
else the call's plans (one per batch row, its key padding folded in) run by the slab
executor (``executor``).
"""

from __future__ import annotations

import torch

from omninet.attention.block_sparse.executor import (
    _bias_needs_grad,
    _BlockSparseFunction,
    _Call,
    _forward,
    _traced_rows,
)
from omninet.attention.block_sparse.flex import _flex, _flex_ok
from omninet.attention.block_sparse.layout import BlockSparseLayout
from omninet.attention.block_sparse.padding import KeyPadding, _is_key_padding
from omninet.attention.block_sparse.plan import BACKWARD_BUDGETS, _budget
from omninet.attention.dense import eager_attention, sdpa_attention


def _as_4d(mask: torch.Tensor, nk: int) -> torch.Tensor:
    """A broadcastable bool mask as (B|1, H|1, Nq|1, Nk)."""
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    return mask.expand(*mask.shape[:3], nk)


def _sparse_attention(q, k, v, state: BlockSparseLayout, *, causal, mask, padding: KeyPadding | None,
                      pads: tuple | None, bias, scale, dropout_p):
    """Every query block against its slabs, plans per batch row. ``padding``: the key padding
    that ``mask`` is, with at least one padded row (``pads``, its ``row_padding``); else None."""
    B, nq, nk, bs = q.shape[0], q.shape[-2], k.shape[-2], state.block_size
    fused = q.device.type == "cpu" and not dropout_p
    tokens, bwd_blocks = _budget(q, bs, state.chunk_bytes)
    general = None if mask is None or padding is not None else _as_4d(mask, nk)
    if _bias_needs_grad(bias, q.device):
        plan = state.plan(nq, nk, causal, bwd_blocks, 0, False)
        out = _traced_rows(plan, general if padding is None else _as_4d(mask, nk), bias, scale, dropout_p, q, k, v)
        if padding is not None:  # the same zero rows as the slab path
            out = out * padding.alive_queries(nq, bs)[:, None, :, None].to(out.dtype)
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
    keys = None if padding is None else padding.keys
    call = _Call(plans, backward_plans, general, keys, bias, scale, dropout_p, seed, fused, state.chunk_bytes)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _BlockSparseFunction.apply(q, k, v, call)
    return _forward(call, q, k, v)[0]


def _check(q, k, v, state, mask, key_padding):
    if not isinstance(state, BlockSparseLayout):
        raise ValueError("block_sparse attention needs state=BlockSparseLayout(config.attention.block_sparse); "
                         "build it with KERNELS['block_sparse'].make_state(model_config, layer_idx, cross)")
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"block_sparse attention expects q (B, H, Nq, D) and k, v (B, H, Nk, D); "
                         f"got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if key_padding is not None and (mask is None or not _is_key_padding(mask, k.shape[-2])
                                    or key_padding.keys.shape != mask.reshape(-1, k.shape[-2]).shape):
        raise ValueError(f"key_padding describes the key-padding mask (B|1, 1, 1, Nk={k.shape[-2]}) passed as mask; "
                         f"got mask {None if mask is None else list(mask.shape)}, key_padding.keys "
                         f"{list(key_padding.keys.shape)}: pass mask and KeyPadding.of(mask), or no key_padding")


def _key_padding(mask, key_padding: KeyPadding | None, nk: int) -> KeyPadding | None:
    """The call's key padding: the one given, else ``mask`` read now when it is a key-padding mask."""
    if key_padding is not None or mask is None or not _is_key_padding(mask, nk):
        return key_padding
    return KeyPadding.of(mask)


def block_sparse_attention(q, k, v, *, mask=None, bias=None, causal=False, scale, dropout_p=0.0, need_weights=False,
                           state=None, key_padding: KeyPadding | None = None):
    """The registered kernel (signature: ``omninet.attention``). ``key_padding``, optional: the
    key-padding ``mask`` read once per forward (``KeyPadding.of(mask)``), so that no layer reads
    it again; without it a key-padding mask is read per call."""
    _check(q, k, v, state, mask, key_padding)
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
    padding = _key_padding(mask, key_padding, nk)
    pads = None if padding is None else padding.row_padding(q.shape[0], state.block_size)
    if padding is not None and pads is None:
        mask = padding = None  # an all-True key mask is no mask (FlexAttention and the batched slab path take it)
    if _flex_ok(q, mask, bias, dropout_p, state.config.backend):
        return _flex(q, k, v, state, causal=causal, scale=scale), None
    out = _sparse_attention(q, k, v, state, causal=causal, mask=mask, padding=padding, pads=pads, bias=bias,
                            scale=scale, dropout_p=dropout_p)
    return out, None
