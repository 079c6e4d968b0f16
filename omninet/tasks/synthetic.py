"""Synthetic long-range retrieval tasks: associative recall and copy.

Associative recall (classification). ``k1 v1 k2 v2 ... kn vn SEP q``: ``n = num_pairs``
distinct keys, each followed by its value, then a separator and a query key drawn from the
keys; the label is the query's value (``num_values`` classes). Length ``2 n + 2``. Own
vocabulary: ``PAD = 0``, ``SEP = 1``, keys ``2 .. 2+K-1``, values ``2+K .. 2+K+V-1`` with
``K = key_vocab``, ``V = num_values``. The answer lies ``2 (n - j) + 1`` tokens before the
query for pair ``j``, so distance grows with ``num_pairs``.

Copy (lm). ``s SEP s`` for a random string ``s`` of ``length`` symbols from the first
``alphabet_size`` characters of ``a-z A-Z 0-9``, in the byte vocabulary
(``omninet.tasks.tokenizer``): ``input_ids = x[:-1]`` (``2 * length`` tokens) and ``labels``
the next token, scored (not ``-100``) only where the target is in the second copy: the model
must reproduce ``s`` after seeing ``SEP``. ``sequence_accuracy`` counts exact copies.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass
from typing import ClassVar

from omninet.tasks.base import IGNORE_INDEX, GeneratedTask, TaskConfig, register_task
from omninet.tasks.tokenizer import SEP_ID, ByteTokenizer

__all__ = ["AssociativeRecallConfig", "AssociativeRecallTask", "CopyConfig", "CopyTask", "COPY_ALPHABET"]

COPY_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits


def _check_counts(where: str, cfg: TaskConfig) -> None:
    for key in ("num_train", "num_eval"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{where}.{key} must be >= 1, got {getattr(cfg, key)}")


@dataclass(kw_only=True)
class AssociativeRecallConfig(TaskConfig):
    """``num_pairs`` key-value pairs (distinct keys from ``key_vocab`` symbols), then a query."""

    task_name: ClassVar[str] = "associative_recall"
    num_pairs: int = 16
    key_vocab: int = 64
    num_values: int = 10
    num_train: int = 20_000
    num_eval: int = 2_000
    seed: int = 0

    def validate(self) -> None:
        where = "AssociativeRecallConfig"
        if self.num_pairs < 1:
            raise ValueError(f"{where}.num_pairs must be >= 1, got {self.num_pairs}")
        if self.key_vocab < self.num_pairs:
            raise ValueError(f"{where}.key_vocab={self.key_vocab} must be >= num_pairs={self.num_pairs} "
                             f"(keys in one sequence are distinct); raise key_vocab")
        if self.num_values < 2:
            raise ValueError(f"{where}.num_values must be >= 2 (it is the number of classes), got {self.num_values}")
        _check_counts(where, self)


@register_task
class AssociativeRecallTask(GeneratedTask):
    """Classify the value bound to the query key."""

    name = "associative_recall"
    kind = "classification"
    config_class = AssociativeRecallConfig
    unit: ClassVar[str] = "example"
    default_arch: ClassVar[str] = "encoder"
    causal: ClassVar[bool] = False
    SEP = 1
    FIRST_KEY = 2

    def __init__(self, config: AssociativeRecallConfig):
        super().__init__(config)
        self.first_value = self.FIRST_KEY + config.key_vocab
        self.vocab_size = self.first_value + config.num_values
        self.pad_id = 0
        self.num_classes = config.num_values
        self.max_length = 2 * config.num_pairs + 2

    def draw(self, rng: random.Random) -> tuple[list[int], int]:
        cfg = self.config
        keys = rng.sample(range(cfg.key_vocab), cfg.num_pairs)
        values = [rng.randrange(cfg.num_values) for _ in keys]
        ids: list[int] = []
        for k, v in zip(keys, values):
            ids += [self.FIRST_KEY + k, self.first_value + v]
        query = rng.randrange(cfg.num_pairs)
        ids += [self.SEP, self.FIRST_KEY + keys[query]]
        return ids, values[query]


@dataclass(kw_only=True)
class CopyConfig(TaskConfig):
    """Copy a random string of ``length`` symbols over an alphabet of ``alphabet_size``."""

    task_name: ClassVar[str] = "copy"
    length: int = 64
    alphabet_size: int = 16
    num_train: int = 20_000
    num_eval: int = 1_000
    seed: int = 0

    def validate(self) -> None:
        where = "CopyConfig"
        if self.length < 1:
            raise ValueError(f"{where}.length must be >= 1, got {self.length}")
        if not 2 <= self.alphabet_size <= len(COPY_ALPHABET):
            raise ValueError(f"{where}.alphabet_size must be in [2, {len(COPY_ALPHABET)}], got {self.alphabet_size}")
        _check_counts(where, self)
        if self.length * math.log(self.alphabet_size) < math.log(2 * self.num_eval):
            raise ValueError(f"{where}: only {self.alphabet_size}**{self.length} distinct strings exist, fewer than "
                             f"2 * num_eval = {2 * self.num_eval}; raise length or alphabet_size, or lower num_eval")


@register_task
class CopyTask(GeneratedTask):
    """Reproduce the string before ``SEP`` after it (byte vocabulary, shifted lm labels)."""

    name = "copy"
    kind = "lm"
    config_class = CopyConfig
    unit: ClassVar[str] = "token"
    default_arch: ClassVar[str] = "decoder"
    causal: ClassVar[bool] = True

    def __init__(self, config: CopyConfig):
        super().__init__(config)
        self.tokenizer = ByteTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.pad_id = self.tokenizer.pad_id
        self.num_classes = None
        self.max_length = 2 * config.length
        self.symbols = self.tokenizer.encode(COPY_ALPHABET[: config.alphabet_size])

    def draw(self, rng: random.Random) -> tuple[list[int], list[int]]:
        n = self.config.length
        s = [self.symbols[rng.randrange(len(self.symbols))] for _ in range(n)]
        x = s + [SEP_ID] + s  # [2n + 1]
        labels = [IGNORE_INDEX] * n + x[n + 1:]  # target of position i is x[i + 1]; scored in the copy only
        return x[:-1], labels
