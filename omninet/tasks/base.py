"""The task interface: a validated config, deterministic splits, padded batches, metrics.

A task is built from a plain dict (``build_task({"name": "listops", "preset": "quickstart"})``)
so that trial and sweep configs can carry it through YAML. Every task exposes

* ``name``, ``kind`` (``'classification'`` or ``'lm'``), ``vocab_size``, ``pad_id``,
  ``num_classes`` (``None`` for lm) and ``max_length`` (longest ``input_ids`` row it yields);
* ``unit``, what it scores once (``'example'``, ``'token'`` or ``'query'``, see
  ``omninet.scores``), ``causal`` (next-token prediction: the model must not look ahead) and
  ``default_arch`` (``'encoder'`` or ``'decoder'``, the architecture it is meant for);
* ``split('train' | 'eval')``: a ``torch.utils.data.Dataset`` of examples
  ``{'input_ids': LongTensor[N], 'labels': LongTensor[] or LongTensor[N]}``; the two splits
  come from disjoint generation seeds (or a deterministic hash split of the data) and share
  no example;
* ``batches(split, batch_size, *, seed, shuffle, drop_last, pad_to)``: one pass over a split
  as dict batches, see ``Task.collate`` for the exact tensors;
* ``metrics(logits, batch)`` for one batch, or ``new_meter()`` to accumulate over many (its
  ``scores()`` are the per-unit ``omninet.scores.UnitScores``; ``eval_rows_hash(rows)`` names
  the first ``rows`` eval rows they came from);
* ``majority_baseline`` (classification): accuracy on ``eval`` of always predicting the most
  common label of ``train``.

Labels for ``lm`` tasks are already aligned with the output: ``labels[b, i]`` is the target for
the model's output at position ``i``, ``-100`` where nothing is scored. For a causal task that is
the token after ``input_ids[b, i]`` (shifted); for a masked one (``causal = False``) it is the
token hidden at position ``i`` itself. The model must not shift them again.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from omninet.config import ConfigBase
from omninet.scores import UNITS, UnitScores, eval_hash

__all__ = [
    "IGNORE_INDEX",
    "SPLITS",
    "TaskConfig",
    "Task",
    "TaskSplit",
    "GeneratedTask",
    "UnitMeter",
    "ClassificationMeter",
    "LMMeter",
    "TokenMeter",
    "TASKS",
    "register_task",
    "build_task",
]

IGNORE_INDEX = -100
SPLITS = ("train", "eval")
# The majority label is the mode of at most this many train examples (enough to pin the mode of
# any of our label distributions; the accuracy of that label is then measured on all of eval).
BASELINE_TRAIN_EXAMPLES = 5000
# (unit, default_arch, causal) of a task that does not declare its own: a task whose kind comes
# from its config (Parquet) or one written before tasks declared them (ListOps).
KIND_DEFAULTS: dict[str, tuple[str, str, bool]] = {"classification": ("example", "encoder", False),
                                                   "lm": ("token", "decoder", True)}


@dataclass(kw_only=True)
class TaskConfig(ConfigBase):
    """Fields every task shares. ``padding='longest'`` pads each batch to its longest row;
    ``'max_length'`` pads every batch to the task's ``max_length`` so that shapes (and so
    latency and memory) do not depend on which examples were drawn."""

    task_name: ClassVar[str] = ""
    padding: Literal["longest", "max_length"] = "longest"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, _where: str | None = None):
        where = _where or cls.__name__
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        if cls is TaskConfig:  # the base type of a trial's task section: the task's name picks the config class
            name = data.get("name")
            if name not in TASKS:
                raise ValueError(f"task name must be one of {', '.join(map(repr, sorted(TASKS)))}; got {name!r}")
            config_class = TASKS[name].config_class
            return config_class.from_dict(data, _where=_where or f"task config ({name})")
        name = data.pop("name", cls.task_name)
        if name != cls.task_name:
            raise ValueError(f"{where}: name is {name!r} but this config is for task {cls.task_name!r}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{where}: missing required key(s) {', '.join(map(repr, missing))}")
        return super().from_dict(data, _where=where)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.task_name, **super().to_dict()}


def _compact_dtype(vocab_size: int, signed: bool) -> torch.dtype:
    """Smallest integer dtype that holds ids below ``vocab_size`` (and -100 when ``signed``)."""
    if vocab_size <= 256 and not signed:
        return torch.uint8
    return torch.int16 if vocab_size <= 2**15 else torch.int32


class TaskSplit(torch.utils.data.Dataset):
    """One split: ``length`` examples made on demand by ``make(i) -> (ids, label)`` and cached
    in the smallest integer dtype for ``vocab_size`` (LRA ListOps' 96k x ~1000 tokens is ~0.1 GB
    as uint8, ~0.8 GB as Python lists), so a lazily generated split costs only what is read.
    ``label`` is an ``int`` (classification) or a sequence as long as ``ids`` (lm, shifted)."""

    def __init__(self, name: str, length: int, make: Callable[[int], tuple[Sequence[int], Any]], *, vocab_size: int):
        self.name = name
        self._length = length
        self._make = make
        self._ids_dtype = _compact_dtype(vocab_size, signed=False)
        self._labels_dtype = _compact_dtype(vocab_size, signed=True)
        self._cache: dict[int, tuple[torch.Tensor, int | torch.Tensor]] = {}

    def __len__(self) -> int:
        return self._length

    def _get(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        if not -self._length <= index < self._length:
            raise IndexError(f"{self.name} split has {self._length} examples; index {index} is out of range")
        index %= self._length
        if index not in self._cache:
            ids, label = self._make(index)
            ids = torch.as_tensor(ids, dtype=self._ids_dtype)  # [N]; a view when already compact
            label = int(label) if isinstance(label, int) else torch.as_tensor(label, dtype=self._labels_dtype)
            self._cache[index] = (ids, label)
        return self._cache[index]

    def raw(self, index: int) -> tuple[list[int], int | list[int]]:
        """``(ids, label)`` of example ``index`` as Python ints."""
        ids, label = self._get(index)
        return ids.tolist(), label if isinstance(label, int) else label.tolist()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, label = self._get(index)
        return {"input_ids": ids.long(), "labels": torch.as_tensor(label).long()}


class _Columns:
    """Columns appended to per batch as CPU tensors and concatenated into numpy arrays only when read."""

    def __init__(self, *dtypes: type) -> None:
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self._arrays = tuple(np.zeros(0, dtype) for dtype in dtypes)

    def append(self, *columns: torch.Tensor) -> None:
        self._pending.append(tuple(t.cpu() for t in columns))

    def read(self) -> tuple[np.ndarray, ...]:
        if self._pending:
            parts = [self._arrays, *(tuple(t.numpy() for t in p) for p in self._pending)]
            self._arrays = tuple(np.concatenate(column) for column in zip(*parts))
            self._pending = []
        return self._arrays


class UnitMeter:
    """The per-unit record both meters keep: for each scored ``unit`` (one of
    ``omninet.scores.UNITS``), in eval order, whether the argmax was right, its cross-entropy
    (nats) and the eval row it belongs to (rows counted across ``update`` calls in the order they
    came), and per row its right and scored units. Each batch adds a few small CPU tensors."""

    def __init__(self, unit: str) -> None:
        if unit not in UNITS:
            raise ValueError(f"meter unit must be one of {', '.join(map(repr, UNITS))}; got {unit!r}")
        self.unit = unit
        self.rows = 0  # eval rows seen, scored or not
        self._units = _Columns(bool, np.float32, np.int32)  # correct, loss, row: [U] each
        self._row_totals = _Columns(np.int64, np.int64)  # right, units: [R] each

    def _record(self, correct: torch.Tensor, loss: torch.Tensor, row: torch.Tensor, batch_rows: int) -> None:
        """``correct`` [U] bool, ``loss`` [U] and ``row`` [U] (the row within this batch) of one batch."""
        self._units.append(correct, loss.float(), (row + self.rows).to(torch.int32))
        right = torch.bincount(row[correct], minlength=batch_rows)  # [B]
        self._row_totals.append(right, torch.bincount(row, minlength=batch_rows))
        self.rows += batch_rows

    def row_totals(self) -> tuple[np.ndarray, np.ndarray]:
        """``(right, units)`` per eval row seen, [R] each: what ``omninet.scores.clustered_se_from_totals``
        needs to check the accuracy's standard error after every batch."""
        right, units = self._row_totals.read()
        return right, units

    def unit_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(correct, row)`` so far: [U] bool and [U] int32."""
        correct, _, row = self._units.read()
        return correct, row

    def scores(self, eval_hash: str | None = None) -> UnitScores:
        """The per-unit scores so far; ``eval_hash`` names the eval rows (``Task.eval_rows_hash``)."""
        correct, loss, row = self._units.read()
        return UnitScores(self.unit, correct, loss, row, eval_hash)

    def _unit_metrics(self) -> dict[str, float]:
        s = self.scores()
        return {"units": float(s.units), "rows": float(self.rows), "accuracy_se": s.accuracy_se,
                "eval_loss_se": s.loss_se}


class ClassificationMeter(UnitMeter):
    """Accumulates accuracy and mean cross-entropy over batches; logits ``[B, C]``, labels ``[B]``.
    One unit per row (``unit``: 'example' unless the task says otherwise)."""

    def __init__(self, unit: str = "example") -> None:
        super().__init__(unit)
        self.correct = 0
        self.count = 0
        self.loss_sum = 0.0

    def update(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        labels = batch["labels"]
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(f"classification metrics need logits [B, num_classes] with B = {labels.shape[0]}; "
                             f"got {tuple(logits.shape)}")
        logits = logits.detach().float()
        hit = logits.argmax(-1) == labels  # [B]
        loss = F.cross_entropy(logits, labels, reduction="none")  # [B]
        self.correct += int(hit.sum())
        self.count += int(labels.numel())
        self.loss_sum += float(loss.double().sum())
        self._record(hit, loss, torch.arange(labels.shape[0], device=labels.device), labels.shape[0])

    def compute(self) -> dict[str, float]:
        """``accuracy``, ``loss``, ``count``, and the per-unit facts: ``units``, ``rows``,
        ``accuracy_se``, ``eval_loss_se`` (clustered by row; NaN below two rows)."""
        n = max(self.count, 1)
        return {"accuracy": self.correct / n, "loss": self.loss_sum / n, "count": float(self.count),
                **self._unit_metrics()}


class LMMeter(UnitMeter):
    """Accumulates next-token metrics over the positions whose label is not ``-100``.

    ``loss`` is the mean cross-entropy in nats per scored token; ``bits_per_byte`` is that
    divided by ln 2 (the tasks that use this meter score byte or symbol tokens, so bits per
    token are bits per byte; ``TokenMeter`` is the one for a real vocabulary);
    ``next_byte_accuracy`` (alias ``accuracy``) is the argmax hit rate;
    ``sequence_accuracy`` is the fraction of rows with every scored token right. Each scored
    position is a unit (``unit``: 'token' unless the task says otherwise, e.g. 'query').
    """

    def __init__(self, unit: str = "token") -> None:
        super().__init__(unit)
        self.correct = 0
        self.tokens = 0
        self.loss_sum = 0.0
        self.rows_right = 0
        self.rows_scored = 0

    def update(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        labels = batch["labels"]  # [B, N]
        if logits.dim() != 3 or logits.shape[:2] != labels.shape:
            raise ValueError(f"lm metrics need logits [B, N, vocab] with [B, N] = {list(labels.shape)}; "
                             f"got {tuple(logits.shape)}")
        b = labels.shape[0]
        scored = labels != IGNORE_INDEX  # [B, N]
        logits = logits.detach()[scored].float()  # [U, vocab] only the scored positions, row-major = eval order
        targets = labels[scored]  # [U]
        row = torch.arange(b, device=labels.device)[:, None].expand_as(labels)[scored]  # [U]
        hit = logits.argmax(-1) == targets  # [U]
        loss = F.cross_entropy(logits, targets, reduction="none")  # [U]
        self.correct += int(hit.sum())
        self.tokens += int(targets.numel())
        self.loss_sum += float(loss.double().sum())
        wrong = torch.bincount(row[~hit], minlength=b)  # [B] misses per row
        rows = scored.any(-1)  # [B] rows with something to score
        self.rows_right += int(((wrong == 0) & rows).sum())
        self.rows_scored += int(rows.sum())
        self._record(hit, loss, row, b)

    def compute(self) -> dict[str, float]:
        """The keys above plus ``tokens`` and the per-unit facts: ``units`` (= ``tokens``),
        ``rows`` (every row seen), ``accuracy_se``, ``eval_loss_se`` (clustered by row)."""
        n = max(self.tokens, 1)
        loss = self.loss_sum / n
        acc = self.correct / n
        return {"loss": loss, "bits_per_byte": loss / math.log(2), "next_byte_accuracy": acc,
                "accuracy": acc, "sequence_accuracy": self.rows_right / max(self.rows_scored, 1),
                "tokens": float(self.tokens), **self._unit_metrics()}


class TokenMeter(LMMeter):
    """``LMMeter`` for tokens of a real vocabulary (the text tasks, Parquet ``input_ids``): the
    same per-unit record (one unit per scored token: right or not, its NLL, its row), reported
    as ``accuracy``, ``loss`` (mean NLL in nats), ``perplexity`` (``exp(loss)``) and
    ``bits_per_token``, each with its standard error clustered by row (``perplexity_se`` by
    the delta method: ``perplexity * eval_loss_se``); ``bits_per_byte`` and
    ``next_byte_accuracy`` are left out (the tokens are not bytes)."""

    def compute(self) -> dict[str, float]:
        m = super().compute()
        del m["bits_per_byte"], m["next_byte_accuracy"]
        loss, se = m["loss"], m["eval_loss_se"]
        perplexity = math.exp(min(loss, 700.0))  # capped short of float overflow
        return {**m, "perplexity": perplexity, "perplexity_se": perplexity * se,
                "bits_per_token": loss / math.log(2), "bits_per_token_se": se / math.log(2)}


class Task(ABC):
    """Base class; subclasses set the class attributes and implement ``_make_split``."""

    name: ClassVar[str]
    kind: ClassVar[Literal["classification", "lm"]]
    config_class: ClassVar[type[TaskConfig]]
    # Each task class declares these three as class attributes (``unit = "token"``), which take
    # the place of the properties below; those give ``KIND_DEFAULTS`` to a task that does not.

    vocab_size: int
    pad_id: int
    num_classes: int | None
    max_length: int

    def __init__(self, config: TaskConfig):
        if not isinstance(config, self.config_class):
            raise ValueError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config
        self._splits: dict[str, TaskSplit] = {}
        self._baseline: float | None = None

    @property
    def unit(self) -> str:
        """What one score is of: 'example', 'token' or 'query' (``omninet.scores.UNITS``)."""
        return KIND_DEFAULTS[self.kind][0]

    @property
    def default_arch(self) -> str:
        """'encoder' (bidirectional) or 'decoder' (causal): the architecture the task is meant for."""
        return KIND_DEFAULTS[self.kind][1]

    @property
    def causal(self) -> bool:
        """Next-token prediction: the output at position i may only see positions <= i."""
        return KIND_DEFAULTS[self.kind][2]

    @abstractmethod
    def _make_split(self, name: str) -> TaskSplit:
        """Builds split ``name`` (one of ``SPLITS``)."""

    def split(self, name: str) -> TaskSplit:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {name!r}")
        if name not in self._splits:
            self._splits[name] = self._make_split(name)
        return self._splits[name]

    @property
    def majority_baseline(self) -> float | None:
        """Classification: eval accuracy of always predicting the most common train label (the
        mode of the first ``BASELINE_TRAIN_EXAMPLES`` train examples). ``None`` for lm."""
        if self.kind != "classification":
            return None
        if self._baseline is None:
            train, evals = self.split("train"), self.split("eval")
            counts = collections.Counter(train.raw(i)[1] for i in range(min(len(train), BASELINE_TRAIN_EXAMPLES)))
            mode = min(counts, key=lambda label: (-counts[label], label))  # ties -> smallest label
            self._baseline = sum(evals.raw(i)[1] == mode for i in range(len(evals))) / len(evals)
        return self._baseline

    def collate(self, examples: Sequence[dict[str, torch.Tensor]], *, pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Pads examples into one batch (B batch, N padded length):

        * ``input_ids`` LongTensor [B, N], ``pad_id`` after each row's end;
        * ``attention_mask`` BoolTensor [B, N], True on real tokens;
        * ``labels`` LongTensor [B] (classification) or [B, N] (lm, -100 on padding).

        N is ``pad_to`` if given, else ``max_length`` when the config says
        ``padding='max_length'``, else the longest row in the batch.
        """
        if not examples:
            raise ValueError("collate needs at least one example")
        lengths = [int(ex["input_ids"].shape[0]) for ex in examples]
        if pad_to is None and self.config.padding == "max_length":
            pad_to = self.max_length
        n = max(lengths) if pad_to is None else pad_to
        if n < max(lengths):
            raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({max(lengths)} tokens); "
                             f"use pad_to >= {max(lengths)} or leave it unset")
        b = len(examples)
        input_ids = torch.full((b, n), self.pad_id, dtype=torch.long)  # [B, N]
        attention_mask = torch.zeros((b, n), dtype=torch.bool)  # [B, N]
        if self.kind == "lm":
            labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)  # [B, N]
        else:
            labels = torch.empty(b, dtype=torch.long)  # [B]
        for row, (ex, length) in enumerate(zip(examples, lengths)):
            input_ids[row, :length] = ex["input_ids"]
            attention_mask[row, :length] = True
            if self.kind == "lm":
                labels[row, :length] = ex["labels"]
            else:
                labels[row] = ex["labels"]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def batches(self, split: str, batch_size: int, *, seed: int = 0, shuffle: bool | None = None,
                drop_last: bool = False, pad_to: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over ``split`` in batches of ``batch_size`` (see ``collate``). ``shuffle``
        defaults to True for train and False for eval; the order depends only on ``seed``.
        Call again with another seed (e.g. ``seed + epoch``) for the next epoch."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1):
            raise ValueError(f"pad_to must be a positive integer or None, got {pad_to!r}")
        data = self.split(split)
        if shuffle is None:
            shuffle = split == "train"
        if shuffle:
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            order = list(range(len(data)))
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            yield self.collate([data[i] for i in order[start:start + batch_size]], pad_to=pad_to)

    def new_meter(self) -> ClassificationMeter | LMMeter:
        """A meter for this task's kind that records per-unit scores in ``self.unit``."""
        return ClassificationMeter(self.unit) if self.kind == "classification" else LMMeter(self.unit)

    def eval_rows_hash(self, rows: int | None = None) -> str:
        """``omninet.scores.eval_hash`` of the ``input_ids`` of the first ``rows`` eval examples in
        eval order (the rows an evaluation of ``rows`` examples scored); ``None``: the whole eval
        split, which names the order itself (equal for two evaluations that stopped after
        different numbers of rows, so they can be paired on the rows both scored)."""
        data = self.split("eval")
        if rows is None:  # every evaluation asks for this one: hashed once per task
            if self.__dict__.get("_split_hash") is None:
                self._split_hash = eval_hash(data[i]["input_ids"].numpy() for i in range(len(data)))
            return self._split_hash
        if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= len(data):
            raise ValueError(f"eval_rows_hash: rows must be an integer in [0, {len(data)}] (the eval split's size), "
                             f"got {rows!r}")
        return eval_hash(data[i]["input_ids"].numpy() for i in range(rows))

    def metrics(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics of one batch. classification: ``accuracy``, ``loss``, ``count``; lm: ``loss``,
        ``bits_per_byte``, ``next_byte_accuracy``, ``accuracy``, ``sequence_accuracy``, ``tokens``.
        ``accuracy`` is always the task metric (higher is better)."""
        meter = self.new_meter()
        meter.update(logits, batch)
        return meter.compute()

    def measurement_batch(self, batch_size: int, n: int, *, split: str = "eval") -> dict[str, torch.Tensor]:
        """``batch_size`` real inputs of exactly ``n`` tokens (B, N) for measuring latency and
        memory at a deployment shape that may be longer than anything the task trains on.
        Rows are whole examples of ``split`` laid end to end (row b starts at example b) and cut
        at ``n``: real tokens everywhere and every position unmasked, never padding or zeros.
        Tasks with a generator that reaches ``n`` tokens override this with single examples."""
        data = self.split(split)
        rows, start = [], 0
        for b in range(batch_size):
            ids, i = [], b
            while sum(len(x) for x in ids) < n:
                ex = data[(start + i) % len(data)]
                ids.append(ex["input_ids"].long())
                i += batch_size
            row = torch.cat(ids)[:n]
            label = data[(start + b) % len(data)]["labels"]
            rows.append({"input_ids": row, "labels": label if label.dim() == 0 else
                         torch.full((n,), IGNORE_INDEX, dtype=torch.long)})
        batch = self.collate(rows, pad_to=n)
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
        return batch

    def encode(self, text: str) -> list[int]:
        """Text -> token ids with the task's own tokenizer (byte tasks: ``self.tokenizer``,
        a ``ByteTokenizer``; ListOps overrides this with its token vocabulary). ValueError for a
        task without a text tokenizer: send token ids instead."""
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"task {self.name!r} has no text tokenizer; send token ids instead")
        return tokenizer.encode(text)

    def describe(self) -> dict[str, Any]:
        """Flat facts for logging next to a trial's results."""
        return {"task": self.name, "kind": self.kind, "unit": self.unit, "causal": self.causal,
                "default_arch": self.default_arch, "vocab_size": self.vocab_size, "pad_id": self.pad_id,
                "num_classes": self.num_classes, "max_length": self.max_length}


class GeneratedTask(Task):
    """A task whose examples are drawn by ``draw(rng) -> (ids, label)`` from ``random.Random``.

    ``eval`` has ``config.num_eval`` distinct examples drawn from the stream seeded by
    ``'<name>/<seed>/eval'``. Train example ``i`` is drawn, on first use, from a stream of its
    own (``'<name>/<seed>/train/<i>'``) and redrawn while it equals an eval example, so the
    splits are disjoint, deterministic and a train split costs only what is read.
    ``config`` must have ``seed``, ``num_train`` and ``num_eval``.
    """

    @abstractmethod
    def draw(self, rng: random.Random) -> tuple[list[int], Any]:
        """One example ``(ids, label)``."""

    def _make_split(self, name: str) -> TaskSplit:
        cfg = self.config
        if name == "eval":
            rng = random.Random(f"{self.name}/{cfg.seed}/eval")
            seen: set[tuple[int, ...]] = set()
            examples = []
            for _ in range(100 * cfg.num_eval + 1000):
                ids, label = self.draw(rng)
                if tuple(ids) not in seen:
                    seen.add(tuple(ids))
                    examples.append((ids, label))
                    if len(examples) == cfg.num_eval:
                        break
            else:
                raise ValueError(f"{type(cfg).__name__}: could not draw num_eval={cfg.num_eval} distinct eval examples; "
                                 f"the task's example space is too small: lower num_eval or make sequences longer")
            self._eval_keys = seen
            return TaskSplit("eval", len(examples), examples.__getitem__, vocab_size=self.vocab_size)
        self.split("eval")  # draws eval first: train must avoid its examples
        eval_keys = self._eval_keys

        def make(i: int) -> tuple[list[int], Any]:
            rng = random.Random(f"{self.name}/{cfg.seed}/train/{i}")
            for _ in range(1000):
                ids, label = self.draw(rng)
                if tuple(ids) not in eval_keys:
                    return ids, label
            raise ValueError(f"{type(cfg).__name__}: eval covers nearly every possible example, so train cannot be "
                             f"disjoint from it; lower num_eval or make sequences longer")

        return TaskSplit("train", cfg.num_train, make, vocab_size=self.vocab_size)


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: makes ``cls`` buildable by ``build_task({'name': cls.name, ...})``."""
    if cls.config_class.task_name != cls.name:
        raise TypeError(f"{cls.__name__}.config_class.task_name must equal {cls.name!r}")  # a bug here, not user input
    TASKS[cls.name] = cls
    return cls


def build_task(config: dict[str, Any] | TaskConfig) -> Task:
    """``{'name': <task>, **fields}`` (or a ``TaskConfig``) -> a ready ``Task``."""
    if isinstance(config, TaskConfig):
        return TASKS[config.task_name](config)
    if not isinstance(config, dict):
        raise ValueError(f"task config must be a mapping with a 'name' key, got {type(config).__name__}")
    name = config.get("name")
    if name not in TASKS:
        raise ValueError(f"task name must be one of {', '.join(map(repr, sorted(TASKS)))}; got {name!r}")
    cls = TASKS[name]
    return cls(cls.config_class.from_dict(config, _where=f"task config ({name})"))
