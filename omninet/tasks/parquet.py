"""A user dataset from Parquet (a file or a directory of files, read with pyarrow).

Columns:

=============  =======================  ==================================================
column         type                     meaning
=============  =======================  ==================================================
``input_ids``  list<integer>            token ids in ``[0, vocab_size)``; wins over ``text``
``text``       string                   UTF-8 text, byte-tokenized (``omninet.tasks.tokenizer``)
``label``      integer                  class in ``[0, num_classes)``; classification only
``split``      string (optional)        ``'train'`` or ``'eval'`` per row
=============  =======================  ==================================================

``kind='classification'`` needs ``label`` and one of ``input_ids``/``text``; ``kind='lm'``
needs one of them too (each row is one document: ``input_ids = x[:-1]``, ``labels = x[1:]``;
``input_ids`` as already tokenized, e.g. by a pretrained model's tokenizer, with ``vocab_size``
the model's: an id at or above it is refused). To window a long text in a pretrained model's
vocabulary instead, use the ``text_lm`` task (``omninet.tasks.text``).
Rows longer than ``max_length`` (``max_length + 1`` for lm) are cut; rows too short to give an
example (empty, or under 2 bytes for lm) are dropped and counted in ``dropped_rows``.
Without a ``split`` column a row goes to eval when a hash of its content (ids or text) falls
below ``eval_fraction``, so equal rows always land in the same split.
``vocab_size`` and ``num_classes`` default to ``max + 1`` over the data (at least ``pad_id + 1``
and 2); with ``text`` the vocabulary is the byte vocabulary and ``pad_id`` is 0.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.dataset as pads

from omninet.tasks.base import (SPLITS, ClassificationMeter, LMMeter, Task, TaskConfig, TaskSplit, TokenMeter,
                                register_task)
from omninet.tasks.tokenizer import ByteTokenizer

__all__ = ["ParquetConfig", "ParquetTask", "content_fraction"]


def content_fraction(content: bytes) -> float:
    """A stable number in [0, 1) from a row's content; ``< eval_fraction`` puts it in eval."""
    return int.from_bytes(hashlib.blake2b(content, digest_size=8).digest(), "big") / 2.0**64


@dataclass(kw_only=True)
class ParquetConfig(TaskConfig):
    """A Parquet dataset at ``path``; see the module docstring for the columns."""

    task_name: ClassVar[str] = "parquet"
    path: str
    kind: Literal["classification", "lm"] = "classification"
    max_length: int = 512
    eval_fraction: float = 0.1
    num_classes: int | None = None
    vocab_size: int | None = None
    pad_id: int = 0

    def validate(self) -> None:
        where = "ParquetConfig"
        if self.max_length < 1:
            raise ValueError(f"{where}.max_length must be >= 1, got {self.max_length}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"{where}.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.num_classes is not None and (self.num_classes < 2 or self.kind != "classification"):
            raise ValueError(f"{where}.num_classes={self.num_classes} needs kind='classification' and a value >= 2; "
                             f"leave it null to infer it from the labels")
        if self.pad_id < 0 or (self.vocab_size is not None and not self.pad_id < self.vocab_size):
            raise ValueError(f"{where}.pad_id={self.pad_id} must be in [0, vocab_size={self.vocab_size})")


def _is_int_list(tp: pa.DataType) -> bool:
    return (pa.types.is_list(tp) or pa.types.is_large_list(tp)) and pa.types.is_integer(tp.value_type)


def _is_text(tp: pa.DataType) -> bool:
    return pa.types.is_string(tp) or pa.types.is_large_string(tp)


@register_task
class ParquetTask(Task):
    """Classification or byte-level lm over rows of a Parquet dataset."""

    name = "parquet"
    config_class = ParquetConfig

    def __init__(self, config: ParquetConfig):
        super().__init__(config)
        self.kind = config.kind  # instance attribute: the kind comes from the config
        path = Path(config.path).expanduser()
        if not path.exists():
            raise ValueError(f"ParquetConfig.path={config.path!r} does not exist; give a .parquet file or a folder of them")
        try:
            dataset = pads.dataset(str(path), format="parquet")
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"ParquetConfig.path={config.path!r} is not readable as Parquet: {exc}") from None
        self.source_column = self._check_schema(dataset.schema)
        wanted = [self.source_column] + [c for c in ("label", "split") if c in dataset.schema.names]
        if config.kind == "lm":
            wanted = [c for c in wanted if c != "label"]
        self._load(dataset.to_table(columns=wanted))

    def _check_schema(self, schema: pa.Schema) -> str:
        """Returns the token source column; ValueError naming what is missing or mistyped."""
        cfg, names = self.config, set(schema.names)
        need = {"input_ids"} if "input_ids" in names or "text" not in names else {"text"}
        if cfg.kind == "classification":
            need |= {"label"}
        missing = sorted(need - names)
        if missing:
            hint = "'input_ids' (list<int>) or 'text' (string)"
            hint += ", and 'label' (int)" if cfg.kind == "classification" else ""
            raise ValueError(f"Parquet dataset {cfg.path!r} lacks column(s) {', '.join(map(repr, missing))} needed for "
                             f"kind={cfg.kind!r}: it needs {hint}; it has {', '.join(schema.names)}")
        source = "input_ids" if "input_ids" in need else "text"
        checks = {"input_ids": (_is_int_list, "list<int>"), "text": (_is_text, "string"),
                  "label": (pa.types.is_integer, "an integer type"), "split": (_is_text, "string")}
        for col in [c for c in (source, "label", "split") if c in names and (c != "label" or cfg.kind != "lm")]:
            ok, want = checks[col]
            if not ok(schema.field(col).type):
                raise ValueError(f"Parquet column {col!r} must be {want}, got {schema.field(col).type}")
        if source == "text" and cfg.vocab_size is not None:
            raise ValueError("ParquetConfig.vocab_size applies to 'input_ids' only; text uses the byte vocabulary: drop it")
        return source

    def _load(self, table: pa.Table) -> None:
        cfg = self.config
        sources = table.column(self.source_column).to_pylist()
        labels = table.column("label").to_pylist() if cfg.kind == "classification" else [None] * len(sources)
        splits = table.column("split").to_pylist() if "split" in table.column_names else None
        if any(s is None for s in sources) or any(x is None for x in labels if cfg.kind == "classification"):
            raise ValueError(f"Parquet dataset {cfg.path!r} has null {self.source_column!r} or 'label' values; drop those rows")
        if splits is not None:
            unknown = sorted({s for s in splits if s not in SPLITS}, key=str)
            if unknown:
                raise ValueError(f"Parquet column 'split' may hold only 'train' or 'eval'; found {unknown[:5]}")

        tokenizer = ByteTokenizer()
        keep = cfg.max_length + 1 if cfg.kind == "lm" else cfg.max_length
        shortest = 2 if cfg.kind == "lm" else 1
        rows: dict[str, list[tuple[list[int], Any]]] = {"train": [], "eval": []}
        self.dropped_rows = 0
        for i, (src, label) in enumerate(zip(sources, labels)):
            ids = tokenizer.encode(src) if self.source_column == "text" else src
            if len(ids) < shortest:
                self.dropped_rows += 1
                continue
            if splits is not None:
                split = splits[i]
            else:
                content = src.encode("utf-8") if isinstance(src, str) else b"".join(x.to_bytes(8, "little", signed=True) for x in src)
                split = "eval" if content_fraction(content) < cfg.eval_fraction else "train"
            ids = ids[:keep]
            rows[split].append((ids[:-1], ids[1:]) if cfg.kind == "lm" else (ids, label))
        for split, examples in rows.items():
            if not examples:
                raise ValueError(f"Parquet dataset {cfg.path!r} gives no {split} rows; add rows, a 'split' column with "
                                 f"both values, or change eval_fraction")

        if self.source_column == "text":
            self.vocab_size, self.pad_id = tokenizer.vocab_size, tokenizer.pad_id
            self.tokenizer = tokenizer  # so Task.encode turns served text into the ids trained on
        else:
            all_ids = [x for examples in rows.values() for ids, _ in examples for x in ids]
            low, high = min(all_ids), max(all_ids)
            self.pad_id = cfg.pad_id
            self.vocab_size = cfg.vocab_size if cfg.vocab_size is not None else max(high, cfg.pad_id) + 1
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"Parquet 'input_ids' hold ids in [{low}, {high}] outside [0, vocab_size={self.vocab_size}); "
                                 f"fix the data or set vocab_size to the model's vocabulary size")
        if cfg.kind == "classification":
            all_labels = [label for examples in rows.values() for _, label in examples]
            self.num_classes = cfg.num_classes if cfg.num_classes is not None else max(max(all_labels) + 1, 2)
            if min(all_labels) < 0 or max(all_labels) >= self.num_classes:
                raise ValueError(f"Parquet 'label' values lie in [{min(all_labels)}, {max(all_labels)}], outside "
                                 f"[0, num_classes={self.num_classes}); fix the labels or raise num_classes")
        else:
            self.num_classes = None
        self.max_length = max(len(ids) for examples in rows.values() for ids, _ in examples)
        self._rows = rows

    def new_meter(self) -> ClassificationMeter | LMMeter:
        """lm on ``input_ids``: a ``TokenMeter`` (perplexity; the ids are not bytes)."""
        if self.kind == "lm" and self.source_column == "input_ids":
            return TokenMeter(self.unit)
        return super().new_meter()

    def _make_split(self, name: str) -> TaskSplit:
        examples = self._rows[name]
        return TaskSplit(name, len(examples), examples.__getitem__, vocab_size=self.vocab_size)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.config.path, "source_column": self.source_column,
                "train_rows": len(self._rows["train"]), "eval_rows": len(self._rows["eval"]),
                "dropped_rows": self.dropped_rows}
