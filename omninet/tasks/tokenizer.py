"""Byte-level tokenization shared by the byte-vocabulary tasks.

Layout of the byte vocabulary (``BYTE_VOCAB_SIZE = 260`` ids):

======  =====================================================
id      meaning
======  =====================================================
0       ``PAD``  padding (``attention_mask`` is False there)
1       ``BOS``  beginning of sequence (also usable as a CLS slot)
2       ``EOS``  end of a document (byte LM puts one between files)
3       ``SEP``  separator (the copy task puts one between the copies)
4..259  the bytes 0..255, shifted by ``NUM_SPECIAL = 4``
260     ``MASK`` a hidden byte; only in the masked vocabulary
======  =====================================================

Specials come first so that ``PAD = 0`` matches ``ModelConfig.pad_token_id``'s default.
``MASK`` comes last so that adding it moved no id: the masked-byte task uses the masked
vocabulary (``ByteTokenizer(mask=True)``, ``MASKED_VOCAB_SIZE = 261`` ids); every other byte
task keeps the 260 ids, and its tokenizer rejects 260 as outside its vocabulary.
Text is UTF-8 encoded; decoding replaces invalid sequences and drops specials by default.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = [
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "SEP_ID",
    "MASK_ID",
    "NUM_SPECIAL",
    "BYTE_VOCAB_SIZE",
    "MASKED_VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "ByteTokenizer",
]

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
SEP_ID = 3
NUM_SPECIAL = 4
BYTE_VOCAB_SIZE = 256 + NUM_SPECIAL
MASK_ID = BYTE_VOCAB_SIZE
MASKED_VOCAB_SIZE = BYTE_VOCAB_SIZE + 1
SPECIAL_TOKENS = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID, "<sep>": SEP_ID, "<mask>": MASK_ID}


class ByteTokenizer:
    """UTF-8 bytes <-> ids ``byte + NUM_SPECIAL``; see the module docstring for the layout.
    ``mask=True``: the masked vocabulary, which adds ``MASK_ID`` (``mask_id`` is None without)."""

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    sep_id = SEP_ID

    def __init__(self, *, mask: bool = False):
        self.vocab_size = MASKED_VOCAB_SIZE if mask else BYTE_VOCAB_SIZE
        self.mask_id = MASK_ID if mask else None

    def encode(self, text: str | bytes, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        ids = [b + NUM_SPECIAL for b in data]
        if add_bos:
            ids.insert(0, BOS_ID)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def encode_tensor(self, text: str | bytes) -> torch.Tensor:
        """Fast path for large corpora: ``[len(bytes)]`` int16 ids without a Python loop."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        if not data:
            return torch.empty(0, dtype=torch.int16)
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return raw.to(torch.int16) + NUM_SPECIAL

    def decode(self, ids: Iterable[int] | torch.Tensor, *, skip_special: bool = True) -> str:
        """Ids back to text. Specials are dropped (``skip_special``) or rendered as ``<pad>`` etc.;
        ids outside the vocabulary raise ValueError."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        names = {v: k for k, v in SPECIAL_TOKENS.items()}
        out = bytearray()
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ByteTokenizer.decode: id {i} is outside the byte vocabulary [0, {self.vocab_size})")
            if NUM_SPECIAL <= i < BYTE_VOCAB_SIZE:
                out.append(i - NUM_SPECIAL)
            elif not skip_special:
                out.extend(names[i].encode())
        return out.decode("utf-8", errors="replace")
