"""Byte-level language modelling on a local directory of text files.

Default corpus: the Python standard library's own sources (``sysconfig.get_paths()['stdlib']``,
``**/*.py``, ``site-packages``/``dist-packages`` excluded), which exists wherever Python does.

* Files are split train/eval by a hash of their path relative to ``root`` (md5, so the split
  never depends on the machine, the seed or the order the filesystem lists them in).
* Within each split files are read in hash order until the split's byte budget is spent
  (``max_bytes * eval_fraction`` for eval, the rest for train; the last file is cut).
* Files are joined with ``EOS`` between them into one stream (byte tokenizer ids, see
  ``omninet.tasks.tokenizer``) and cut into non-overlapping windows of ``max_length + 1``
  tokens: ``input_ids = w[:-1]``, ``labels = w[1:]``, with ``-100`` where the target is ``EOS``
  so that only bytes are scored (``bits_per_byte`` is then exact).
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any, ClassVar

import torch

from omninet.tasks.base import IGNORE_INDEX, Task, TaskConfig, TaskSplit, register_task
from omninet.tasks.tokenizer import EOS_ID, ByteTokenizer

__all__ = ["ByteLMConfig", "ByteLMTask", "check_pattern", "corpus_listing", "default_corpus_root", "path_fraction"]


def default_corpus_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def path_fraction(relative_path: str) -> float:
    """A stable number in [0, 1) from a relative path; ``< eval_fraction`` puts a file in eval."""
    digest = hashlib.md5(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclass(kw_only=True)
class ByteLMConfig(TaskConfig):
    """Byte LM over ``root`` (``None``: the standard library) files matching ``pattern``
    (``pathlib`` glob, ``**`` recurses) minus ``exclude`` (fnmatch on the relative path).
    ``max_length`` is the context length N; ``max_bytes`` bounds the bytes read in total."""

    task_name: ClassVar[str] = "byte_lm"
    root: str | None = None
    pattern: str = "**/*.py"
    exclude: tuple[str, ...] = ("*site-packages/*", "*dist-packages/*")
    max_bytes: int = 4_000_000
    eval_fraction: float = 0.1
    max_length: int = 256

    def validate(self) -> None:
        where = type(self).__name__  # also the masked-byte task's config, which extends this one
        if self.max_length < 1:
            raise ValueError(f"{where}.max_length must be >= 1, got {self.max_length}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"{where}.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_bytes * min(self.eval_fraction, 1 - self.eval_fraction) < self.max_length + 1:
            raise ValueError(f"{where}.max_bytes={self.max_bytes} leaves a split fewer than max_length + 1 = "
                             f"{self.max_length + 1} bytes; raise max_bytes or lower max_length")
        check_pattern(self.pattern, where)


def check_pattern(pattern: str, where: str) -> None:
    """A corpus glob is relative and stays under ``root``: one-line ValueError otherwise."""
    if not pattern:
        raise ValueError(f"{where}.pattern must be a non-empty glob such as '**/*.txt'")
    if PurePath(pattern).is_absolute() or PureWindowsPath(pattern).is_absolute() or ".." in PurePath(pattern).parts \
            or ".." in PureWindowsPath(pattern).parts:
        raise ValueError(f"{where}.pattern={pattern!r} reaches outside root; use a relative glob without "
                         "'..' such as '**/*.txt', and point root at the folder to read")


@functools.lru_cache(maxsize=8)
def corpus_listing(root: str, pattern: str, exclude: tuple[str, ...], eval_fraction: float,
             where: str) -> dict[str, tuple[tuple[float, str], ...]]:
    """Files under ``root`` matching ``pattern`` minus ``exclude``, by split, each in hash order:
    ``(fraction, relative path)``. Kept per process: globbing the default corpus, the standard
    library, walks every installed package before excluding them (~0.5 s), and a sweep builds
    its task in the controller and again in every trial. A corpus that changes while a process
    runs is not listed again (a new process lists it again)."""
    base = Path(root)
    resolved = base.resolve()
    found: dict[str, list[tuple[float, str]]] = {"train": [], "eval": []}
    # glob.glob on relative strings is ~3x faster than Path.glob here; stat only survivors.
    for rel in glob.glob(pattern, root_dir=base, recursive=True):
        rel = Path(rel).as_posix()
        if any(fnmatch.fnmatch(rel, pat) for pat in exclude) or not (base / rel).is_file():
            continue
        if not (base / rel).resolve().is_relative_to(resolved):  # a symlink out of the corpus
            continue
        fraction = path_fraction(rel)
        found["eval" if fraction < eval_fraction else "train"].append((fraction, rel))
    for name, files in found.items():
        if not files:
            raise ValueError(f"{where}: no file under {root!r} matching {pattern!r} fell in the {name} split; "
                             "use a corpus with more files or change eval_fraction")
    return {name: tuple(sorted(files)) for name, files in found.items()}


@register_task
class ByteLMTask(Task):
    """Next-byte prediction on fixed windows of a local text corpus."""

    name = "byte_lm"
    kind = "lm"
    config_class = ByteLMConfig
    unit: ClassVar[str] = "token"
    default_arch: ClassVar[str] = "decoder"
    causal: ClassVar[bool] = True

    def __init__(self, config: ByteLMConfig):
        super().__init__(config)
        self.tokenizer = ByteTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.pad_id = self.tokenizer.pad_id
        self.num_classes = None
        self.max_length = config.max_length
        self.root = Path(config.root if config.root is not None else default_corpus_root()).expanduser()
        if not self.root.is_dir():
            raise ValueError(f"{type(config).__name__}.root={str(self.root)!r} is not a directory; "
                             "point it at a folder of text files")
        self.files = self._find_files()
        self.bytes_read: dict[str, int] = {}
        self.files_read: dict[str, int] = {}

    def _find_files(self) -> dict[str, list[tuple[float, str]]]:
        """Matching files by split, each list in hash order: ``(fraction, relative path)``."""
        c = self.config
        found = corpus_listing(str(self.root), c.pattern, tuple(c.exclude), c.eval_fraction, type(c).__name__)
        return {name: list(files) for name, files in found.items()}

    def _read_stream(self, name: str) -> torch.Tensor:
        """The split's files, cut to its byte budget, joined by EOS: int16 ids [T]."""
        budget = round(self.config.max_bytes * self.config.eval_fraction)
        if name == "train":
            budget = self.config.max_bytes - budget
        parts: list[torch.Tensor] = []
        used = 0
        eos = torch.tensor([EOS_ID], dtype=torch.int16)
        for _, rel in self.files[name]:
            if used >= budget:
                break
            data = (self.root / rel).read_bytes()[: budget - used]
            if not data:
                continue
            if parts:
                parts.append(eos)
            parts.append(self.tokenizer.encode_tensor(data))
            used += len(data)
        self.bytes_read[name] = used
        self.files_read[name] = (len(parts) + 1) // 2
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int16)

    def _make_split(self, name: str) -> TaskSplit:
        stream = self._read_stream(name)  # [T]
        n = self.max_length
        windows = (stream.numel() - 1) // n
        if windows < 1:
            raise ValueError(f"ByteLMConfig: the {name} split has only {stream.numel()} tokens, fewer than max_length + 1 = "
                             f"{n + 1}; raise max_bytes or lower max_length")

        def make(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            w = stream[i * n: i * n + n + 1]  # [N + 1] int16 view of the stream
            labels = w[1:].clone()  # [N] next-byte targets
            labels[labels == EOS_ID] = IGNORE_INDEX
            return w[:-1], labels

        return TaskSplit(name, windows, make, vocab_size=self.vocab_size)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "root": str(self.root), "pattern": self.config.pattern,
                "files_train": len(self.files["train"]), "files_eval": len(self.files["eval"])}
