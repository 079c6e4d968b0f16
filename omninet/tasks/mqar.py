"""Multi-query associative recall (MQAR), as in Zoology (Arora et al. 2023, "Zoology: measuring
and improving recall in efficient language models", ``zoology/data/associative_recall.py``).

Every example is exactly ``seq_length`` tokens (P = ``num_pairs``, Q = ``num_queries``):

* positions ``0 .. 2P-1``: P pairs ``k v``, distinct keys, each value drawn independently
  (Zoology draws values without replacement too; here a value may repeat, so ``value_vocab``
  may be smaller than ``num_pairs``);
* the rest, ``seq_length - 2P`` tokens, is cut into ``S = (seq_length - 2P) // 2`` two-token
  slots, ``FILL FILL`` by default. Q distinct pairs (every pair by default, in random order) are
  queried, each in its own slot ``g``: the key at position ``q = 2P + 2g`` and, after it, the
  value (causal form) or ``MASK`` (non-causal form). An odd last position is ``FILL``.
* Slots are chosen without replacement with weights ``(g + 1) ** (power_a - 1)``
  (``distance='power'``, Zoology's law over slots: with ``power_a < 1`` most queries come soon
  after the pairs, a few far away) or equally (``distance='uniform'``).

Labels (kind 'lm', unit 'query': one scored position per query, ``-100`` everywhere else):

* ``causal=True`` (decoder): the label is at the query key's position ``q`` and is the key's
  value, which is also the next input token, so the labels are shifted like any causal lm's
  and a causal model cannot read the value it predicts. (Zoology leaves noise after the query
  key instead of the value; a causal model never sees that position, so it is the same task.)
* ``causal=False`` (encoder): the token after the query key is ``MASK`` and the label is at that
  ``MASK`` position ``q + 1`` (as masked bytes label the hidden position itself); a bidirectional
  model can read the key before it and the pairs, but nowhere the value.

Vocabulary: ``PAD = 0``, ``FILL = 1``, ``MASK = 2`` (reserved in both forms so that ids do not
depend on ``causal``), keys ``3 .. 3+K-1``, values ``3+K .. 3+K+V-1`` with ``K = key_vocab``,
``V = value_vocab``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar, Literal

from omninet.tasks.base import IGNORE_INDEX, GeneratedTask, TaskConfig, register_task

__all__ = ["MQARConfig", "MQARTask"]


@dataclass(kw_only=True)
class MQARConfig(TaskConfig):
    """``num_pairs`` key-value pairs, then ``num_queries`` (``None``: all) queries placed by
    ``distance`` in a sequence of exactly ``seq_length`` tokens; see the module docstring."""

    task_name: ClassVar[str] = "mqar"
    seq_length: int = 256
    num_pairs: int = 16
    num_queries: int | None = None
    key_vocab: int = 256
    value_vocab: int = 256
    distance: Literal["uniform", "power"] = "power"
    power_a: float = 0.01
    causal: bool = True
    num_train: int = 20_000
    num_eval: int = 2_000
    seed: int = 0

    def validate(self) -> None:
        where = "MQARConfig"
        if self.num_pairs < 1:
            raise ValueError(f"{where}.num_pairs must be >= 1, got {self.num_pairs}")
        if self.key_vocab < self.num_pairs:
            raise ValueError(f"{where}.key_vocab={self.key_vocab} must be >= num_pairs={self.num_pairs} "
                             f"(keys in one sequence are distinct); raise key_vocab or lower num_pairs")
        if self.value_vocab < 2:
            raise ValueError(f"{where}.value_vocab must be >= 2, got {self.value_vocab}")
        if self.num_queries is not None and not 1 <= self.num_queries <= self.num_pairs:
            raise ValueError(f"{where}.num_queries must be in [1, num_pairs={self.num_pairs}] (each pair is queried "
                             f"at most once) or null for all pairs; got {self.num_queries}")
        queries = self.num_pairs if self.num_queries is None else self.num_queries
        if (self.seq_length - 2 * self.num_pairs) // 2 < queries:
            raise ValueError(f"{where}.seq_length={self.seq_length} leaves no room for {queries} queries after "
                             f"{self.num_pairs} pairs (2 tokens each); use seq_length >= "
                             f"{2 * self.num_pairs + 2 * queries}, or fewer pairs or queries")
        if not (math.isfinite(self.power_a) and self.power_a > 0):
            raise ValueError(f"{where}.power_a must be a finite number > 0 (Zoology uses 0.01; 1 is uniform), "
                             f"got {self.power_a}")
        for key in ("num_train", "num_eval"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}.{key} must be >= 1, got {getattr(self, key)}")


@register_task
class MQARTask(GeneratedTask):
    """Recall the value bound to each query key; one score per query."""

    name = "mqar"
    kind = "lm"
    config_class = MQARConfig
    unit: ClassVar[str] = "query"
    # the default config's; an instance follows its config's ``causal``
    default_arch: ClassVar[str] = "decoder"
    causal: ClassVar[bool] = True
    PAD, FILL, MASK, FIRST_KEY = 0, 1, 2, 3

    def __init__(self, config: MQARConfig):
        super().__init__(config)
        self.causal = config.causal
        self.default_arch = "decoder" if config.causal else "encoder"
        self.first_value = self.FIRST_KEY + config.key_vocab
        self.vocab_size = self.first_value + config.value_vocab
        self.pad_id = self.PAD
        self.num_classes = None
        self.max_length = config.seq_length
        self.num_queries = config.num_pairs if config.num_queries is None else config.num_queries
        self.slots = (config.seq_length - 2 * config.num_pairs) // 2
        # Efraimidis-Spirakis: the k largest log(u) / w are a weighted draw of k slots without
        # replacement (what Zoology's np.random.choice(replace=False, p=...) draws)
        a = config.power_a if config.distance == "power" else 1.0
        self._slot_weights = [(g + 1) ** (a - 1) for g in range(self.slots)]

    def draw(self, rng: random.Random) -> tuple[list[int], list[int]]:
        cfg = self.config
        keys = [self.FIRST_KEY + k for k in rng.sample(range(cfg.key_vocab), cfg.num_pairs)]
        values = [self.first_value + rng.randrange(cfg.value_vocab) for _ in keys]
        queried = rng.sample(range(cfg.num_pairs), self.num_queries)
        order = sorted(range(self.slots), key=lambda g: math.log(1.0 - rng.random()) / self._slot_weights[g])
        slots = order[-self.num_queries:]
        ids = [t for kv in zip(keys, values) for t in kv] + [self.FILL] * (cfg.seq_length - 2 * cfg.num_pairs)
        labels = [IGNORE_INDEX] * cfg.seq_length
        for j, g in zip(queried, slots):
            q = 2 * cfg.num_pairs + 2 * g
            ids[q] = keys[j]
            ids[q + 1] = values[j] if cfg.causal else self.MASK
            labels[q if cfg.causal else q + 1] = values[j]
        return ids, labels
