"""Key padding: which keys of each sequence are real, as the plans fold it in.

A key-padding mask (B|1, 1, 1, Nk), True = real key, is read per batch row: its real length
when the padding is only at the row's end (``key_lengths``), else the padding class of every
key block (all padding, part padding, all real). Rows with the same padding share one plan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
