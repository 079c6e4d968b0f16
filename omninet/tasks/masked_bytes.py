"""Masked-byte modelling for encoders on the byte LM's local corpus.

The corpus, its train/eval file split and its streams are ``ByteLMTask``'s (``omninet.tasks.
byte_lm``: the standard library's sources by default). Each split's stream is cut into
non-overlapping windows of ``max_length`` tokens; in each window, over its B byte positions
(``EOS`` between files is never masked or scored):

* exactly ``k = round(mask_rate * B)`` positions are masked (at least 1, at most B - 1);
* ``mask_span = 1``: they are a uniform random k-subset (independent positions);
  ``mask_span > 1``: they form ``m = round(k / mask_span)`` spans (at least 1, at most the
  unmasked bytes + 1) as in T5's ``random_spans_noise_mask``: the span lengths are a uniformly
  random composition of k into m positive parts (close to geometric, mean exactly k / m), and
  the unmasked runs between them one of B - k into m - 1 positive inner runs and two outer runs
  that may be empty. A span may straddle an ``EOS``, which stays visible;
* ``replace='mask'``: every masked position reads ``MASK``; ``'bert'``: BERT's 80/10/10, so a
  masked position reads ``MASK`` with probability 0.8, a uniformly random byte with 0.1 (which
  may be the original) and the original byte with 0.1; all k are scored either way.

The draw is seeded by ``'masked_bytes/<split>/<seed>/<window index>'``, so a window's mask is
fixed by the split, the seed and the window alone. ``labels`` is the original byte at the masked
positions, ``-100`` elsewhere (not shifted: the target of the output at a position is the byte
hidden there). Vocabulary: the masked byte vocabulary (``omninet.tasks.tokenizer``: 260 byte
ids plus ``MASK_ID = 260``, ``vocab_size = 261``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from omninet.tasks.base import IGNORE_INDEX, TaskSplit, register_task
from omninet.tasks.byte_lm import ByteLMConfig, ByteLMTask
from omninet.tasks.tokenizer import MASK_ID, NUM_SPECIAL, ByteTokenizer

__all__ = ["MaskedBytesConfig", "MaskedBytesTask", "mask_positions"]

BERT_MASK, BERT_RANDOM = 0.8, 0.1  # BERT's split of masked positions; the rest keep their byte


@dataclass(kw_only=True)
class MaskedBytesConfig(ByteLMConfig):
    """``ByteLMConfig``'s corpus fields plus the masking: ``mask_rate`` of a window's bytes in
    spans of mean length ``mask_span``, shown as ``MASK`` (``replace='mask'``) or by BERT's rule."""

    task_name: ClassVar[str] = "masked_bytes"
    mask_rate: float = 0.15
    mask_span: float = 1.0
    replace: Literal["mask", "bert"] = "mask"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        where = "MaskedBytesConfig"
        if not 0.0 < self.mask_rate < 1.0:
            raise ValueError(f"{where}.mask_rate must be in (0, 1) (the fraction of a window's bytes to mask), "
                             f"got {self.mask_rate}")
        if not self.mask_span >= 1.0:
            raise ValueError(f"{where}.mask_span must be >= 1 (mean span length; 1 masks independent positions), "
                             f"got {self.mask_span}")
        if self.max_length < 2:
            raise ValueError(f"{where}.max_length must be >= 2 (a window needs a masked and a visible byte), "
                             f"got {self.max_length}")


def _composition(rng: random.Random, total: int, parts: int) -> list[int]:
    """A uniformly random split of ``total`` into ``parts`` positive integers."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total])]


def mask_positions(rng: random.Random, length: int, rate: float, span: float) -> list[int]:
    """Sorted indices in ``range(length)`` to mask: ``k = round(rate * length)`` of them (at
    least 1, at most ``length - 1``), independent for ``span == 1`` or in T5-style spans of mean
    ``span`` (see the module docstring). ``length >= 2``."""
    k = min(max(1, round(rate * length)), length - 1)
    if span == 1.0:
        return sorted(rng.sample(range(length), k))
    m = min(max(1, round(k / span)), length - k + 1)
    masked = _composition(rng, k, m)
    gaps = _composition(rng, length - k + 2, m + 1)  # [m + 1] positive; the two outer runs lose one below
    gaps[0] -= 1
    gaps[-1] -= 1
    out, pos = [], 0
    for gap, run in zip(gaps, masked):
        pos += gap
        out.extend(range(pos, pos + run))
        pos += run
    return out


@register_task
class MaskedBytesTask(ByteLMTask):
    """Recover the masked bytes of a window (bidirectional; labels at the masked positions)."""

    name = "masked_bytes"
    kind = "lm"
    config_class = MaskedBytesConfig
    unit: ClassVar[str] = "token"
    default_arch: ClassVar[str] = "encoder"
    causal: ClassVar[bool] = False

    def __init__(self, config: MaskedBytesConfig):
        super().__init__(config)
        self.tokenizer = ByteTokenizer(mask=True)
        self.vocab_size = self.tokenizer.vocab_size
        self.mask_id = MASK_ID


    MASK_TEXT = "<mask>"

    def encode(self, text: str) -> list[int]:
        """Text -> ids, with each literal ``<mask>`` as ``MASK_ID`` (what a served model fills)."""
        ids: list[int] = []
        for i, part in enumerate(text.split(self.MASK_TEXT)):
            if i:
                ids.append(MASK_ID)
            ids += self.tokenizer.encode(part)
        return ids
    def _make_split(self, name: str) -> TaskSplit:
        stream = self._read_stream(name)  # [T]
        n, cfg = self.max_length, self.config
        windows = stream.numel() // n
        if windows < 1:
            raise ValueError(f"MaskedBytesConfig: the {name} split has only {stream.numel()} tokens, fewer than "
                             f"max_length = {n}; raise max_bytes or lower max_length")

        def make(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            ids = stream[i * n: i * n + n].clone()  # [N]
            labels = torch.full_like(ids, IGNORE_INDEX)  # [N]
            byte_pos = (ids >= NUM_SPECIAL).nonzero().flatten().tolist()  # positions that hold a byte
            if len(byte_pos) < 2:
                return ids, labels  # nothing to hide behind a visible byte (not in a real corpus)
            rng = random.Random(f"{self.name}/{name}/{cfg.seed}/{i}")
            pos = torch.tensor([byte_pos[j] for j in mask_positions(rng, len(byte_pos), cfg.mask_rate, cfg.mask_span)])
            labels[pos] = ids[pos]
            if cfg.replace == "mask":
                ids[pos] = MASK_ID
            else:
                for p in pos.tolist():
                    u = rng.random()
                    if u < BERT_MASK:
                        ids[p] = MASK_ID
                    elif u < BERT_MASK + BERT_RANDOM:
                        ids[p] = NUM_SPECIAL + rng.randrange(256)
            return ids, labels

        return TaskSplit(name, windows, make, vocab_size=self.vocab_size)

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {**super().describe(), "mask_rate": cfg.mask_rate, "mask_span": cfg.mask_span, "replace": cfg.replace}
