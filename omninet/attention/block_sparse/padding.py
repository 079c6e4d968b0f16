"""Key padding: which keys of each sequence are real, as the plans fold it in.

``KeyPadding`` is a key-padding mask (B|1, 1, 1, Nk), True = real key, read once: each row's
real length when all padding sits at the rows' ends, else (per call) the padding class of
every key block (all padding, part padding, all real). Plans take it per batch row
(``KeyPadding.row_padding``); rows with the same padding share one plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


_EMPTY, _MIXED, _FULL = 0, 1, 2  # a key block's padding class: all padding, part padding, all real


def _is_key_padding(mask: torch.Tensor, nk: int) -> bool:
    """A key-padding mask: one key row per sequence, (B|1, 1, 1, Nk) (or fewer leading dims)."""
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return len(shape) == 4 and shape[1] == 1 and shape[2] == 1 and shape[3] == nk


def key_lengths(mask: torch.Tensor) -> tuple[int, ...] | None:
    """Real length of each row of a key-padding mask (B|1, 1, 1, Nk) that is True on a prefix
    of every row (padding only at the end), else None. Reading it costs a device sync:
    ``KeyPadding.of`` reads it once, and the model passes that value to every layer."""
    rows = mask.reshape(-1, mask.shape[-1])  # (B|1, Nk)
    lengths = rows.sum(-1)
    prefix = torch.arange(rows.shape[-1], device=rows.device)[None, :] < lengths[:, None]
    return tuple(lengths.tolist()) if torch.equal(prefix, rows) else None


def _block_classes(rows: torch.Tensor, bs: int) -> torch.Tensor:
    """(B|1, nb) padding class of every key block of key rows (B|1, Nk)."""
    nk = rows.shape[-1]
    extra = -nk % bs
    real_any = F.pad(rows, (0, extra), value=False).view(rows.shape[0], -1, bs).any(-1)
    real_all = F.pad(rows, (0, extra), value=True).view(rows.shape[0], -1, bs).all(-1)
    return real_any.to(torch.int8) + real_all.to(torch.int8)  # _EMPTY, _MIXED or _FULL


def _row_padding(mask: torch.Tensor, B: int, nk: int, bs: int) -> tuple | None:
    """``KeyPadding.row_padding`` of a key-padding mask read on the spot."""
    return KeyPadding(mask.reshape(-1, nk), key_lengths(mask)).row_padding(B, bs)


def _alive_queries(rows: torch.Tensor, nq: int, nk: int, bs: int) -> torch.Tensor:
    """(B|1, Nq) bool: the query's block holds a real position (the others are zero rows)."""
    alive = _block_classes(rows, bs) != _EMPTY  # (B|1, nb)
    return alive[:, torch.arange(nk - nq, nk, device=rows.device) // bs]


@dataclass(frozen=True, eq=False)
class KeyPadding:
    """A key-padding mask read once (``KeyPadding.of(mask)``) and passed on as a value.

    ``keys``: (B|1, Nk) bool, True = real key (a view of the mask). ``lengths``: each row's
    real length when every row is True on a prefix (padding only at the end), else None."""

    keys: torch.Tensor
    lengths: tuple[int, ...] | None

    def __post_init__(self):
        if self.keys.dim() != 2 or self.keys.dtype != torch.bool:
            raise ValueError(f"KeyPadding.keys must be a (B|1, Nk) bool tensor, got {self.keys.dtype} "
                             f"{list(self.keys.shape)}; build it with KeyPadding.of(mask)")
        if self.lengths is not None and len(self.lengths) != self.keys.shape[0]:
            raise ValueError(f"KeyPadding has {len(self.lengths)} lengths for {self.keys.shape[0]} key rows")

    @classmethod
    def of(cls, mask: torch.Tensor) -> KeyPadding:
        """The key padding of ``mask`` (B|1, 1, 1, Nk) (or fewer leading dims). Reading the
        lengths costs a device sync: the model does it once per forward."""
        if not _is_key_padding(mask, mask.shape[-1]):
            raise ValueError(f"KeyPadding.of takes a key-padding mask (B|1, 1, 1, Nk); got {list(mask.shape)}")
        return cls(mask.reshape(-1, mask.shape[-1]), key_lengths(mask))

    def select(self, rows: torch.Tensor) -> KeyPadding:
        """The padding of batch rows ``rows`` (1-D long), as ``mask.index_select(0, rows)``."""
        if self.keys.shape[0] == 1:
            return self
        lengths = None if self.lengths is None else tuple(self.lengths[i] for i in rows.tolist())
        return KeyPadding(self.keys.index_select(0, rows), lengths)

    def row_padding(self, B: int, bs: int) -> tuple | None:
        """Per batch row, the key padding a plan folds in: None (no padding), the row's real
        length (padding only at its end: the common case), or the class of every key block
        (padding anywhere). None overall when no row is padded (an all-True mask is no mask)."""
        nk = self.keys.shape[-1]
        if self.lengths is not None:
            pads = tuple(None if n == nk else n for n in self.lengths)
        else:
            classes = _block_classes(self.keys, bs).tolist()
            pads = tuple(None if all(c == _FULL for c in row) else tuple(row) for row in classes)
        if all(p is None for p in pads):
            return None
        return pads * B if len(pads) == 1 else pads

    def alive_queries(self, nq: int, bs: int) -> torch.Tensor:
        """(B|1, Nq) bool: the query's block holds a real position (the others are zero rows)."""
        return _alive_queries(self.keys, nq, self.keys.shape[-1], bs)
