"""Per-input head gating and the head-indexed pieces an attention layer calls in ``forward``:
the router, projections of the selected heads only, the kernel call on them, the head scale
and the online importance update. Split from ``omninet.heads`` so the model can use them
without importing heads (heads imports the model, never the other way); see that module's
docstring for the design.

Dimensions: B batch, N tokens, Nk keys, C hidden, H heads a layer still has (its
``head_ids``, original ids), k active heads per input, D head dim.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from omninet.positions import HeadBias

__all__ = ["HeadGate", "HeadRouter", "gather_qkv", "gather_out", "restrict_mask", "attend", "head_scale",
           "update_online_importance", "collect_aux_loss"]


# ---- gating -----------------------------------------------------------------------------
class HeadGate(NamedTuple):
    index: torch.Tensor | None  # (B, k) local ids of the selected heads, ascending; None: every head runs
    weight: torch.Tensor  # multiplies head outputs: (B, k|H, 1, 1) sequence gating, (B, H, N, 1) token gating
    aux: torch.Tensor | None  # load-balancing loss, already weighted (training only)


class HeadRouter(nn.Module):
    """A linear router C -> H over the mean-pooled sequence ('sequence') or each token
    ('token'). Selected heads are scaled by ``k * softmax(top-k logits)``: a uniform router
    reproduces the plain sum of the selected heads, so gating a trained model starts from
    its scale. The balance loss is Switch-style ``H * sum_i f_i * P_i`` (f_i: share of
    selections that go to head i, P_i: mean router probability), 1 when balanced."""

    def __init__(self, hidden: int, num_heads: int, *, active: int, gating: str, balance_weight: float, causal: bool):
        super().__init__()
        if not 1 <= active <= num_heads:
            raise ValueError(f"HeadsConfig.active_heads must be in [1, num_heads={num_heads}], got {active}")
        if causal and gating == "sequence":
            raise ValueError("HeadsConfig.gating='sequence' pools the whole sequence, which leaks future tokens into a "
                             "causal decoder; use gating='token' for arch='decoder' or 'encoder_decoder'")
        self.active, self.gating, self.balance_weight = active, gating, balance_weight
        self.proj = nn.Linear(hidden, num_heads, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> HeadGate:
        """x (B, N, C); mask the attention layer's bool mask (a (B, 1, 1, N) padding mask is
        honoured when pooling)."""
        H = self.proj.out_features
        k = min(self.active, H)  # pruning may leave fewer heads than active_heads
        feats = _masked_mean(x, mask) if self.gating == "sequence" else x  # (B, C) or (B, N, C)
        logits = self.proj(feats).float()  # (B, H) or (B, N, H)
        top, idx = logits.topk(k, dim=-1)  # (..., k)
        w = top.softmax(dim=-1) * k
        aux = self._balance(logits, idx) if self.training and self.balance_weight > 0 else None
        if self.gating == "token" or k == H:
            dense = torch.zeros_like(logits).scatter(-1, idx, w)  # (B, H) or (B, N, H)
            weight = dense[:, :, None, None] if dense.dim() == 2 else dense.transpose(1, 2).unsqueeze(-1)
            return HeadGate(None, weight, aux)
        idx, order = idx.sort(dim=-1)  # canonical order, so equal head sets compare equal
        return HeadGate(idx, w.gather(-1, order)[:, :, None, None], aux)

    def _balance(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        H = logits.shape[-1]
        probs = logits.reshape(-1, H).softmax(dim=-1)  # (T, H), T = B or B*N
        counts = F.one_hot(idx.reshape(-1), H).sum(0).to(probs.dtype)  # (H,)
        f = counts / idx.numel()
        return self.balance_weight * H * (f * probs.mean(0)).sum()

    @torch.no_grad()
    def prune(self, keep: torch.Tensor) -> None:
        """Keeps router outputs ``keep`` (local indices), mirroring ``Attention.prune``."""
        new = nn.Linear(self.proj.in_features, keep.numel(), bias=False,
                        device=self.proj.weight.device, dtype=self.proj.weight.dtype)
        new.weight.copy_(self.proj.weight.index_select(0, keep))
        self.proj = new


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, N, C) -> (B, C), skipping padding when ``mask`` is a (B, 1, 1, N) padding mask."""
    B, N, _ = x.shape
    if mask is None or mask.dim() != 4 or mask.shape[:3] != (B, 1, 1) or mask.shape[3] != N:
        return x.mean(dim=1)
    m = mask[:, 0, 0, :, None].to(x.dtype)  # (B, N, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def gather_qkv(qkv: nn.Module, x: torch.Tensor, index: torch.Tensor, num_heads: int, head_dim: int):
    """q, k, v (B, k, N, D) of the selected heads only. x (B, N, C); index (B, k) local ids.
    Gathers each sequence's rows of the fused (3*H*D, C) weight and applies them with one
    batched matmul, so the projection costs k/H of the dense one."""
    B, N, C = x.shape
    k, H, D = index.shape[1], num_heads, head_dim
    if not isinstance(qkv, nn.Linear):  # e.g. a quantized linear: no weight to gather, select after
        y = qkv(x).view(B, N, 3, H, D)
        y = y.gather(3, index[:, None, None, :, None].expand(B, N, 3, k, D))  # (B, N, 3, k, D)
        return y.permute(2, 0, 3, 1, 4)
    flat = index.reshape(-1)  # (B*k,)
    # index_select on the contiguous (3, H, D*C) view is the fast gather; then one (B, 3kD, C) copy
    w = qkv.weight.view(3, H, D * C).index_select(1, flat).view(3, B, k * D, C).transpose(0, 1).reshape(B, 3 * k * D, C)
    if qkv.bias is None:
        y = torch.bmm(x, w.transpose(1, 2))
    else:
        b = qkv.bias.view(3, H, D).index_select(1, flat).view(3, B, k * D).transpose(0, 1).reshape(B, 1, 3 * k * D)
        y = torch.baddbmm(b, x, w.transpose(1, 2))  # (B, N, 3*k*D)
    return y.view(B, N, 3, k, D).permute(2, 0, 3, 1, 4)  # (B, k, N, D) each


def gather_out(o_proj: nn.Module, out: torch.Tensor, index: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """out (B, N, k*D) of the selected heads -> (B, N, C) through their o_proj columns only."""
    B, N, _ = out.shape
    k, H, D = index.shape[1], num_heads, head_dim
    if not isinstance(o_proj, nn.Linear):  # scatter into the full input and run the module as is
        full = out.new_zeros(B, N, H, D).scatter(2, index[:, None, :, None].expand(B, N, k, D), out.view(B, N, k, D))
        return o_proj(full.view(B, N, H * D))
    C = o_proj.out_features
    w = o_proj.weight.t().view(H, D, C).index_select(0, index.reshape(-1)).view(B, k * D, C)  # one copy
    return torch.bmm(out, w) if o_proj.bias is None else torch.baddbmm(o_proj.bias, out, w)


def restrict_mask(mask, head_ids: torch.Tensor, total_heads: int, index: torch.Tensor | None):
    """A mask with a head axis (B|1, H_total, Nq|1, Nk) restricted to the layer's remaining
    heads, and to each sequence's selected heads when ``index`` (B, k) is given."""
    if mask is None or mask.dim() != 4 or mask.shape[1] == 1 or mask.shape[1] != total_heads:
        return mask
    if head_ids.numel() != total_heads:
        mask = mask.index_select(1, head_ids)  # (B|1, H, Nq|1, Nk)
    if index is None:
        return mask
    B = index.shape[0]
    mask = mask.expand(B, *mask.shape[1:])
    return mask[torch.arange(B, device=index.device)[:, None], index]  # (B, k, Nq|1, Nk)


def attend(kernel, q, k, v, *, index, head_ids, total_heads, mask, bias, key_padding=None, **kw):
    """Calls an attention kernel on the heads that run. ``index`` (B, k) or None (every
    remaining head). ``key_padding``: ``KeyPadding.of(mask)`` for a key-padding mask, read once
    per forward (its rows follow the mask's). Kernels take a bias ``(H, Nq, Nk)`` shared by the
    batch, but gated sequences select different heads; so with a position bias the batch is
    split into groups of sequences that selected the same head set, and each group gets its own
    restricted bias. Without a bias the whole batch is one call."""
    mask = restrict_mask(mask, head_ids, total_heads, index)
    if index is None or bias is None:
        heads = None if head_ids.numel() == total_heads else head_ids
        return kernel.fn(q, k, v, mask=mask, bias=None if bias is None else HeadBias(bias, heads),
                         key_padding=key_padding, **kw)
    sets, group = torch.unique(index, dim=0, return_inverse=True)  # (G, k), (B,)
    out = weights = None
    for g in range(sets.shape[0]):
        rows = (group == g).nonzero().squeeze(1)
        m = mask if mask is None or mask.shape[0] == 1 else mask.index_select(0, rows)
        kp = None if key_padding is None else key_padding.select(rows)
        o, w = kernel.fn(q[rows], k[rows], v[rows], mask=m, bias=HeadBias(bias, head_ids[sets[g]]), key_padding=kp, **kw)
        out = (o.new_zeros(q.shape[0], *o.shape[1:]) if out is None else out).index_copy(0, rows, o)
        if w is not None:
            weights = (w.new_zeros(q.shape[0], *w.shape[1:]) if weights is None else weights).index_copy(0, rows, w)
    return out, weights


def head_scale(gate: HeadGate | None, head_mask: torch.Tensor | None, head_ids: torch.Tensor):
    """The factor multiplying the head outputs (B|1, H|k, N|1, 1), or None. head_mask (H_total,)."""
    scale = None if gate is None else gate.weight
    if head_mask is not None:
        hm = head_mask.index_select(0, head_ids)  # (H,)
        hm = hm[gate.index][:, :, None, None] if gate is not None and gate.index is not None else hm.view(1, -1, 1, 1)
        scale = hm if scale is None else scale * hm
    return scale


@torch.no_grad()
def update_online_importance(attn: nn.Module, out: torch.Tensor, index: torch.Tensor | None) -> None:
    """EMA of each head's contribution (``attn``: an ``omninet.model.Attention``): mean token norm of its (gated) output times the
    Frobenius norm of its o_proj column block, an upper bound of ||W_o,h o_h|| that costs
    O(B*H*N*D) against the attention's O(B*H*N^2*D). out (B, H|k, N, D)."""
    B, H, D = out.shape[0], attn.num_heads, attn.head_dim
    w = attn.o_proj.weight if isinstance(attn.o_proj, nn.Linear) else None
    w_norm = w.float().view(-1, H, D).norm(dim=(0, 2)) if w is not None else out.new_ones(H, dtype=torch.float32)
    norms = out.float().norm(dim=-1).mean(dim=2)  # (B, H|k)
    if index is None:
        contrib = (norms * w_norm).mean(0)  # (H,)
    else:  # unselected heads contribute 0 for that sequence
        contrib = torch.zeros(H, device=out.device).index_add_(0, index.reshape(-1), (norms * w_norm[index]).reshape(-1)) / B
    ema = attn.online_importance
    full = torch.zeros_like(ema).index_copy_(0, attn.head_ids, contrib)  # by original id
    if attn.online_updates == 0:
        ema.copy_(full)
    else:
        ema.mul_(attn.importance_decay).add_(full, alpha=1 - attn.importance_decay)
    attn.online_updates += 1


def collect_aux_loss(layers: Iterable[nn.Module]) -> torch.Tensor | None:
    """Sum of the routers' load-balancing terms from the last forward (training only)."""
    terms = [a.aux_loss for a in layers if getattr(a, "aux_loss", None) is not None]
    return torch.stack(terms).sum() if terms else None
