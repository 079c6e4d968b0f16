"""A pretrained checkpoint converted once into an OmniNet folder: what ``omninet import-hf``
and a sweep's ``base: {hf: PATH}`` do."""

from __future__ import annotations

from pathlib import Path

import torch

from omninet.model import OmniNetModel

__all__ = ["import_checkpoint"]


def import_checkpoint(src, dst, *, dtype: torch.dtype = torch.float32) -> Path:
    """Converts an HF folder or GGUF file into an OmniNet folder (``save_pretrained``), with its
    tokenizer files (a GGUF file's vocabulary written as tokenizer.json)."""
    model = OmniNetModel.from_hf(src, dtype=dtype)
    out = Path(dst)
    model.save_pretrained(out)
    tok = getattr(model, "gguf_tokenizer", None)
    if tok is not None:
        tok.save(str(out / "tokenizer.json"))
    return out
