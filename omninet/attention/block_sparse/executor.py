"""The slab executor: a call's plans run slab by slab, and its autograd Function.

Dimensions: B batch, H heads, Nq queries, Nk keys, D head dim, c query blocks of a group,
r rows of a query block, L keys of a slab.

On CPU each slab is one call of the fused flash kernel, which returns its log-sum-exp;
elsewhere, or with dropout, eager math per slab. A query block's partial softmaxes over its
slabs are merged by log-sum-exp. ``_BlockSparseFunction`` saves only q, k, v, the output and
the log-sum-exp and recomputes each slab's probabilities in backward, as flash attention does.
Extra memory is bounded by the layer's chunk budget (``plan.CHUNK_BYTES``). A bias that needs
gradients takes ``_traced_rows`` instead (eager attention per query block under autograd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from omninet.attention.block_sparse.plan import (
    _CACHE_SIZE,
    BACKWARD_BUDGETS,
    STAIR_FRACTION,
    _budget,
    _Group,
    _Plan,
    _shift,
    _Slab,
)
from omninet.attention.dense import eager_attention


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


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
# call instead of one per slab and row, no log-sum-exp merges. Longer rows stay slabs (the copy
# outgrows the calls it saves), and so does the backward. Measured: docs/kernels.md.
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
    # gathered calls: a quarter budget (the working set stays flat in N)
    budget = _budget(q, 1, call.chunk_bytes)[0] // 4
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
    units where both sides are (N, H, D)-ordered runs (dst from ``_grad_buffer``, src the flash
    kernel's own layout), faster than one strided pass per shift (docs/kernels.md); the passes
    remain where a stride does not fit."""
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
