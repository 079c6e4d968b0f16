"""Text in a pretrained model's own vocabulary: the user's text, tokenized with the base model's
``tokenizer.json`` through the ``tokenizers`` library (transformers is never imported).

Two tasks over the same text and windows:

* ``text_lm``: causal next-token prediction (decoders: GPT-2, Llama, Qwen, ...);
* ``masked_text``: BERT's masked-token objective (encoders: BERT, RoBERTa, ...).

Text: the files under ``root`` matching ``pattern`` minus ``exclude`` (default: the Python
standard library's sources, as the byte tasks read them), split train/eval by a hash of each
file's path (``omninet.tasks.byte_lm``); or, with ``parquet: PATH``, the rows of its ``text``
column, split by its ``split`` column or by a hash of each row's text (``omninet.tasks.parquet``).
A file or a row is one document; each split reads its documents in that order until its share
of ``max_bytes`` is spent (``eval_fraction`` of it for eval; the last document is cut).

Stream: each document is tokenized without special tokens and the documents are joined by the
separator token (``separator``; by default the tokenizer's end-of-text or separator token:
``tokenizer_config.json``'s ``eos_token`` then ``sep_token`` when the folder has one, else the
first of ``SEPARATOR_NAMES`` in the vocabulary; ``separator: ''`` joins them with nothing).

Windows (N = ``max_length``): each window is framed as the tokenizer frames one sequence, i.e.
the tokens its post-processor adds around a text (``add_special_tokens``; BERT: ``[CLS]`` ...
``[SEP]``, RoBERTa: ``<s>`` ... ``</s>``, Llama: ``<s>`` in front, GPT-2: nothing), around a
body cut from the stream:

* ``text_lm``: ``prefix + body`` is N + 1 tokens; ``input_ids`` its first N, ``labels`` its last
  N (the next token), ``-100`` where the target is itself a prefix token. Consecutive bodies
  overlap by one token when there is no prefix (so every stream token after the first is a
  target exactly once, as in ``byte_lm``), else not at all. The separator is a target like
  any other token: the model is scored on ending a document.
* ``masked_text``: ``prefix + body + suffix`` is N tokens; bodies do not overlap. Of the body's
  tokens that are not special (see below), ``k = round(mask_rate * candidates)`` are chosen (at least 1) and shown by BERT's
  rule (``replace='bert'``: the mask token with probability 0.8, a uniformly random non-special
  token with 0.1, the original with 0.1; ``'mask'``: always the mask token); ``labels`` is the
  original token there, ``-100`` elsewhere. The draw is seeded by
  ``'masked_text/<split>/<seed>/<window index>'``.

A train window equal to an eval window is dropped, so the splits share no example even when
two documents repeat each other. The eval windows depend only on the config (text, tokenizer,
N), so every trial of a sweep scores the same eval set (``Task.eval_rows_hash`` names it).

Scores: every scored token is a unit (``unit = 'token'``). ``TokenMeter`` reports the argmax
accuracy over scored tokens (next-token accuracy for ``text_lm``, masked-token accuracy for
``masked_text``), the mean NLL in nats (``loss``), ``perplexity = exp(loss)`` and
``bits_per_token``, each with its standard error clustered by window (``omninet.scores``); a
token's NLL is its unit's ``loss`` in ``UnitScores``, so two trials pair on the same tokens with
``paired_difference(a, b, metric='loss')`` (a perplexity ratio is ``exp`` of that difference).

``vocab_size`` (the model's) defaults to the tokenizer's and may be larger (embeddings padded to
a multiple); ``pad_id`` defaults to the tokenizer's pad token (``tokenizer.json``'s padding,
``tokenizer_config.json``'s ``pad_token`` or the first of ``PAD_NAMES``), else the separator,
else 0 (padding is masked out and never scored either way). Special tokens, never masked: the
tokens ``tokenizer.json`` marks special, the framing, the separator and the mask token.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import tokenizers
import torch

from omninet.tasks.base import IGNORE_INDEX, SPLITS, Task, TaskConfig, TaskSplit, TokenMeter, register_task
from omninet.tasks.byte_lm import check_pattern, corpus_listing, default_corpus_root
from omninet.tasks.masked_bytes import BERT_MASK, BERT_RANDOM, mask_positions
from omninet.tasks.parquet import content_fraction

__all__ = ["TextLMConfig", "TextLMTask", "MaskedTextConfig", "MaskedTextTask", "TextTokenizer", "SEPARATOR_NAMES",
           "PAD_NAMES", "MASK_NAMES"]

TOKENIZER_FILE = "tokenizer.json"
# tokenizer.json does not say which token ends a text, pads or masks (transformers keeps that in
# tokenizer_config.json); without that file these are tried in order against the vocabulary.
SEPARATOR_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
PAD_NAMES = ("<pad>", "[PAD]", "<|padding|>")
MASK_NAMES = ("[MASK]", "<mask>")
_PROBE = "a b"  # a text every tokenizer encodes to something, to see what its post-processor adds


def _token_name(entry: Any) -> str | None:
    """``tokenizer_config.json``'s way of naming a token: a string or ``{"content": ...}``."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) and entry else None


class TextTokenizer:
    """A pretrained model's ``tokenizer.json`` (``path``: the file or a folder holding it) and the
    facts a task needs that it does not record by name: the separator, pad and mask ids, the
    special ids and the framing of one sequence (``prefix``, ``suffix``). ``encode`` gives a
    text's ids without special tokens; ``decode`` drops special tokens."""

    def __init__(self, path: str, *, where: str, separator: str | None = None, pad_id: int | None = None,
                 mask_token: str | None = None, add_special_tokens: bool = True):
        self.file = _tokenizer_file(path, where)
        self._tok, file_pad_id = _load_tokenizer(str(self.file), self.file.stat().st_mtime_ns)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        named = self._named_tokens()

        def pick(keys: tuple[str, ...], names: tuple[str, ...]) -> int | None:
            for name in [named.get(k) for k in keys] + list(names):
                if name is not None and name in vocab:
                    return vocab[name]
            return None

        if separator is None:
            self.separator_id = pick(("eos_token", "sep_token"), SEPARATOR_NAMES)
        elif separator == "":
            self.separator_id = None
        elif separator in vocab:
            self.separator_id = vocab[separator]
        else:
            raise ValueError(f"{where}.separator={separator!r} is not a token of {self.file}; give one of its tokens "
                             f"(e.g. its end-of-text token), '' to join documents with nothing, or leave it unset")
        self.mask_id = vocab.get(mask_token) if mask_token is not None else pick(("mask_token",), MASK_NAMES)
        if mask_token is not None and self.mask_id is None:
            raise ValueError(f"{where}.mask_token={mask_token!r} is not a token of {self.file}; give the token the "
                             f"model was trained to fill (e.g. '[MASK]' or '<mask>') or leave it unset")
        if pad_id is None:
            pad_id = file_pad_id if file_pad_id is not None else pick(("pad_token",), PAD_NAMES)
            pad_id = pad_id if pad_id is not None else self.separator_id if self.separator_id is not None else 0
        self.pad_id = pad_id
        self.prefix, self.suffix = self._framing(where) if add_special_tokens else ((), ())
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = frozenset({i for i, t in added.items() if t.special} | set(self.prefix) | set(self.suffix)
                                     | {x for x in (self.separator_id, self.mask_id) if x is not None})

    def _named_tokens(self) -> dict[str, str]:
        """``{'eos_token': '</s>', ...}`` from the folder's ``special_tokens_map.json`` and
        ``tokenizer_config.json`` (the latter wins), where they exist."""
        out: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = self.file.parent / name
            try:
                data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            except (OSError, ValueError):
                data = {}  # a broken side file: fall back to the names in the vocabulary
            for key in ("eos_token", "sep_token", "pad_token", "mask_token"):
                name_ = _token_name(data.get(key)) if isinstance(data, dict) else None
                if name_ is not None:
                    out[key] = name_
        return out

    def _framing(self, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The ids the post-processor puts before and after one sequence's own ids."""
        bare = self._tok.encode(_PROBE, add_special_tokens=False).ids
        framed = self._tok.encode(_PROBE).ids
        for start in range(len(framed) - len(bare) + 1):
            if framed[start:start + len(bare)] == bare:
                return tuple(framed[:start]), tuple(framed[start + len(bare):])
        raise ValueError(f"{where}: the post-processor of {self.file} changes a text's own tokens, so a window cannot "
                         f"be framed as it frames one sequence; set add_special_tokens: false")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._tok.id_to_token(token_id)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def _tokenizer_file(path: str, where: str) -> Path:
    p = Path(path).expanduser()
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise ValueError(f"{where}.tokenizer={path!r}: no {TOKENIZER_FILE} there; give the base model's folder "
                         f"that holds {TOKENIZER_FILE}, or the file itself")
    return file


@functools.lru_cache(maxsize=4)
def _load_tokenizer(file: str, mtime_ns: int) -> tuple[tokenizers.Tokenizer, int | None]:
    """The tokenizer at ``file`` (read again when it changes) and the pad id its file configures,
    with that padding and any truncation turned off: documents are tokenized whole and windows
    cut here. Shared by every task of a process; only read from after this."""
    try:
        tok = tokenizers.Tokenizer.from_file(file)
    except Exception as exc:  # the library raises a bare Exception for a malformed file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"tokenizer: {file} is not a tokenizers file ({first}); give the base model's "
                         f"{TOKENIZER_FILE}") from None
    pad_id = tok.padding["pad_id"] if tok.padding else None
    tok.no_padding()
    tok.no_truncation()
    return tok, pad_id


@dataclass(kw_only=True)
class TextLMConfig(TaskConfig):
    """Causal LM on text in the vocabulary of ``tokenizer`` (see the module docstring):
    ``root``/``pattern``/``exclude`` (files; ``root`` None: the standard library) or ``parquet``
    (its ``text`` column), ``max_bytes`` of text read in all, ``max_length`` the window N."""

    task_name: ClassVar[str] = "text_lm"
    tokenizer: str
    root: str | None = None
    pattern: str = "**/*.py"
    exclude: tuple[str, ...] = ("*site-packages/*", "*dist-packages/*")
    parquet: str | None = None
    max_bytes: int = 2_000_000
    eval_fraction: float = 0.1
    max_length: int = 256
    vocab_size: int | None = None
    pad_id: int | None = None
    separator: str | None = None
    add_special_tokens: bool = True

    def validate(self) -> None:
        where = type(self).__name__
        if self.max_length < 2:
            raise ValueError(f"{where}.max_length must be >= 2, got {self.max_length}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"{where}.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.max_bytes < 1:
            raise ValueError(f"{where}.max_bytes must be >= 1 (the bytes of text read for both splits), got {self.max_bytes}")
        if self.parquet is not None and self.root is not None:
            raise ValueError(f"{where}: give root (a folder of text files) or parquet (a file with a 'text' column), "
                             f"not both")
        check_pattern(self.pattern, where)
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"{where}.vocab_size must be >= 1 (the model's vocabulary), got {self.vocab_size}")
        if self.pad_id is not None and self.pad_id < 0:
            raise ValueError(f"{where}.pad_id must be >= 0, got {self.pad_id}")


@dataclass(kw_only=True)
class MaskedTextConfig(TextLMConfig):
    """``TextLMConfig``'s text and windows plus the masking: ``mask_rate`` of a window's
    non-special tokens hidden by BERT's rule (``replace='bert'``) or always as ``mask_token``."""

    task_name: ClassVar[str] = "masked_text"
    mask_rate: float = 0.15
    replace: Literal["bert", "mask"] = "bert"
    mask_token: str | None = None
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.mask_rate < 1.0:
            raise ValueError(f"MaskedTextConfig.mask_rate must be in (0, 1) (the share of a window's tokens to mask), "
                             f"got {self.mask_rate}")


@functools.lru_cache(maxsize=4)
def _token_streams(file: str, mtime_ns: int, separator_id: int | None, source: tuple, max_bytes: int,
                   eval_fraction: float, where: str) -> dict[str, tuple[torch.Tensor, dict[str, int]]]:
    """Each split's token stream (int32 [T]) and its facts (documents, bytes, tokens). Kept per
    process: a sweep builds its task in the controller and again in every trial, and tokenizing
    a few MB of text takes seconds on a small CPU."""
    tok, _ = _load_tokenizer(file, mtime_ns)
    documents = _documents(source, eval_fraction, where)
    out = {}
    for name in SPLITS:
        budget = round(max_bytes * eval_fraction)
        budget = budget if name == "eval" else max_bytes - budget
        texts, used = [], 0
        for read in documents[name]:
            if used >= budget:
                break
            data = read()[: budget - used]
            used += len(data)
            texts.append(data.decode("utf-8", errors="replace"))
        ids = [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(texts, add_special_tokens=False)]
        ids = [x for x in ids if x.size]
        parts = []
        for x in ids:
            if parts and separator_id is not None:
                parts.append(np.array([separator_id], dtype=np.int32))
            parts.append(x)
        stream = torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.int32)
        out[name] = (stream, {"documents": len(ids), "bytes": used, "tokens": int(stream.numel())})
    return out


def _documents(source: tuple, eval_fraction: float, where: str) -> dict[str, list]:
    """Each split's documents in reading order, as callables giving their UTF-8 bytes."""
    if source[0] == "files":
        _, root, pattern, exclude = source
        found = corpus_listing(root, pattern, exclude, eval_fraction, where)
        return {name: [functools.partial((Path(root) / rel).read_bytes) for _, rel in files]
                for name, files in found.items()}
    _, path = source
    try:
        dataset = pads.dataset(path, format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{where}.parquet={path!r} is not readable as Parquet: {exc}") from None
    names = dataset.schema.names
    text_type = dataset.schema.field("text").type if "text" in names else None
    if text_type is None or not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise ValueError(f"{where}.parquet={path!r} needs a 'text' column of strings (one document a row); it has "
                         f"{', '.join(f'{n}: {dataset.schema.field(n).type}' for n in names)}")
    table = dataset.to_table(columns=["text"] + (["split"] if "split" in names else []))
    texts = table.column("text").to_pylist()
    splits = table.column("split").to_pylist() if "split" in names else None
    if splits is not None and set(splits) - set(SPLITS):
        raise ValueError(f"{where}.parquet={path!r}: column 'split' may hold only 'train' or 'eval'; found "
                         f"{sorted(set(map(str, splits)) - set(SPLITS))[:5]}")
    out: dict[str, list] = {"train": [], "eval": []}
    for i, text in enumerate(texts):
        if not text:
            continue
        data = text.encode("utf-8")
        split = splits[i] if splits is not None else "eval" if content_fraction(data) < eval_fraction else "train"
        out[split].append(functools.partial(bytes, data))
    return out


@register_task
class TextLMTask(Task):
    """Next-token prediction on windows of the user's text in a pretrained vocabulary."""

    name = "text_lm"
    kind = "lm"
    config_class = TextLMConfig
    unit: ClassVar[str] = "token"
    default_arch: ClassVar[str] = "decoder"
    causal: ClassVar[bool] = True

    def __init__(self, config: TextLMConfig):
        super().__init__(config)
        where = type(config).__name__
        self.tokenizer = TextTokenizer(config.tokenizer, where=where, separator=config.separator, pad_id=config.pad_id,
                                       mask_token=getattr(config, "mask_token", None),
                                       add_special_tokens=config.add_special_tokens)
        tok = self.tokenizer
        self.vocab_size = config.vocab_size if config.vocab_size is not None else tok.vocab_size
        if self.vocab_size < tok.vocab_size:
            raise ValueError(f"{where}.vocab_size={self.vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
                             f"tokens; give the model's vocabulary size (>= {tok.vocab_size}) or leave it unset")
        self.pad_id = tok.pad_id
        if self.pad_id >= self.vocab_size:
            raise ValueError(f"{where}.pad_id={self.pad_id} is outside the vocabulary [0, {self.vocab_size}); "
                             f"give one of the tokenizer's ids or leave it unset")
        self.num_classes = None
        self.max_length = config.max_length
        if config.parquet is not None:
            path = Path(config.parquet).expanduser()
            if not path.exists():
                raise ValueError(f"{where}.parquet={config.parquet!r} does not exist; give a .parquet file (or a "
                                 f"folder of them) with a 'text' column")
            source: tuple = ("parquet", str(path))
        else:
            root = Path(config.root if config.root is not None else default_corpus_root()).expanduser()
            if not root.is_dir():
                raise ValueError(f"{where}.root={str(root)!r} is not a directory; point it at a folder of text files")
            source = ("files", str(root), config.pattern, tuple(config.exclude))
        self.source = source
        # Tokenized here, not at first use: an empty corpus or a window longer than the text is
        # refused when the task is built.
        streams = _token_streams(str(tok.file), tok.file.stat().st_mtime_ns, tok.separator_id, source,
                                 config.max_bytes, config.eval_fraction, where)
        self._streams = {name: stream for name, (stream, _) in streams.items()}
        self.facts = {name: facts for name, (_, facts) in streams.items()}
        self.body, self.step = self._layout(where)
        self._starts: dict[str, list[int]] = {}
        for name in SPLITS:
            self._check_split(name, where)

    def _layout(self, where: str) -> tuple[int, int]:
        """(body tokens per window, stream tokens between window starts); see the module docstring."""
        p = len(self.tokenizer.prefix)
        body = self.max_length + 1 - p
        if body < 2:
            raise ValueError(f"{where}.max_length={self.max_length} leaves no text after the tokenizer's {p} leading "
                             f"special token(s); raise max_length")
        return body, body - 1 if p == 0 else body

    def _windows(self, name: str) -> int:
        tokens = self._streams[name].numel()
        return 0 if tokens < self.body else (tokens - self.body) // self.step + 1

    def _check_split(self, name: str, where: str) -> None:
        facts, source = self.facts[name], "parquet" if self.source[0] == "parquet" else "root/pattern"
        if facts["tokens"] == 0:
            raise ValueError(f"{where}: the {name} split holds no text ({facts['documents']} non-empty documents); "
                             f"point {source} at text, or change eval_fraction")
        if self._windows(name) < 1:
            raise ValueError(f"{where}.max_length={self.max_length}: the {name} split has only {facts['tokens']} tokens "
                             f"({facts['bytes']} bytes of text), fewer than one window ({self.body}); raise max_bytes, "
                             f"add text, or lower max_length")

    def _window_starts(self, name: str) -> list[int]:
        """Stream offsets of the split's windows; train leaves out any window that eval also has."""
        if name not in self._starts:
            starts = [i * self.step for i in range(self._windows(name))]
            if name == "train":
                body, stream = self.body, self._streams
                seen = {stream["eval"][s:s + body].numpy().tobytes() for s in self._window_starts("eval")}
                starts = [s for s in starts if stream["train"][s:s + body].numpy().tobytes() not in seen]
            self._starts[name] = starts
        return self._starts[name]

    def _make_split(self, name: str) -> TaskSplit:
        stream, starts = self._streams[name], self._window_starts(name)
        prefix = torch.tensor(self.tokenizer.prefix, dtype=torch.int32)
        framing = max(len(prefix) - 1, 0)  # targets that are prefix tokens: not the text's

        def make(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            w = torch.cat([prefix, stream[starts[i]: starts[i] + self.body]])  # [N + 1]
            labels = w[1:].clone()  # [N] the next token
            labels[:framing] = IGNORE_INDEX
            return w[:-1], labels

        return TaskSplit(name, len(starts), make, vocab_size=self.vocab_size)

    def new_meter(self) -> TokenMeter:
        return TokenMeter(self.unit)

    def encode(self, text: str) -> list[int]:
        """Text -> ids as a window starts: the tokenizer's prefix, then the text's own tokens."""
        return [*self.tokenizer.prefix, *self.tokenizer.encode(text)]

    def describe(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {**super().describe(), "tokenizer": str(tok.file), "tokenizer_vocab_size": tok.vocab_size,
                "source": self.source[0], "path": self.source[1], "separator": tok.token(tok.separator_id),
                "prefix": list(tok.prefix), "suffix": list(tok.suffix),
                **{f"{key}_{name}": value for name, facts in self.facts.items() for key, value in facts.items()}}


@register_task
class MaskedTextTask(TextLMTask):
    """Recover masked tokens of a window (bidirectional; labels at the masked positions)."""

    name = "masked_text"
    config_class = MaskedTextConfig
    default_arch: ClassVar[str] = "encoder"
    causal: ClassVar[bool] = False

    def __init__(self, config: MaskedTextConfig):
        super().__init__(config)
        if self.tokenizer.mask_id is None:
            raise ValueError(f"MaskedTextConfig: the tokenizer {str(self.tokenizer.file)!r} has no mask token (none of "
                             f"{', '.join(MASK_NAMES)}, and no mask_token in tokenizer_config.json); set mask_token to "
                             f"the token the model was trained to fill, or use task text_lm")
        self.mask_id = self.tokenizer.mask_id
        special = torch.tensor(sorted(self.tokenizer.special_ids), dtype=torch.int32)
        self._special = special
        self._random_ids = np.setdiff1d(np.arange(self.tokenizer.vocab_size), special.numpy())  # BERT's 10% random

    def _layout(self, where: str) -> tuple[int, int]:
        framing = len(self.tokenizer.prefix) + len(self.tokenizer.suffix)
        body = self.max_length - framing
        if body < 2:
            raise ValueError(f"{where}.max_length={self.max_length} leaves fewer than 2 text tokens inside the "
                             f"tokenizer's {framing} framing special tokens; raise max_length")
        return body, body

    def _make_split(self, name: str) -> TaskSplit:
        stream, starts, cfg = self._streams[name], self._window_starts(name), self.config
        prefix = torch.tensor(self.tokenizer.prefix, dtype=torch.int32)
        suffix = torch.tensor(self.tokenizer.suffix, dtype=torch.int32)

        def make(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            body = stream[starts[i]: starts[i] + self.body]  # [Nb]
            ids = torch.cat([prefix, body, suffix])  # [N] a new tensor: the stream is never written
            labels = torch.full_like(ids, IGNORE_INDEX)  # [N]
            candidates = (~torch.isin(body, self._special)).nonzero().flatten() + len(prefix)  # [C] positions in ids
            if candidates.numel() < 2:
                return ids, labels  # nothing to hide behind a visible token
            rng = random.Random(f"{self.name}/{name}/{cfg.seed}/{i}")
            pos = candidates[mask_positions(rng, candidates.numel(), cfg.mask_rate, 1.0)]
            labels[pos] = ids[pos]
            for p in pos.tolist():
                u = rng.random() if cfg.replace == "bert" else 0.0
                if u < BERT_MASK:
                    ids[p] = self.mask_id
                elif u < BERT_MASK + BERT_RANDOM:
                    ids[p] = int(self._random_ids[rng.randrange(self._random_ids.size)])
            return ids, labels

        return TaskSplit(name, len(starts), make, vocab_size=self.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Text -> ids framed as a window (the tokenizer matches its own mask token in the text)."""
        return [*self.tokenizer.prefix, *self.tokenizer.encode(text), *self.tokenizer.suffix]

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {**super().describe(), "mask_rate": cfg.mask_rate, "replace": cfg.replace,
                "mask_token": self.tokenizer.token(self.mask_id)}
