"""Request validation and batched inference for a served trial model, without Ray.

The Serve deployment (``omninet.serve.app``) is a thin HTTP shell over ``Predictor``: the
handler parses and validates a request here (``parse_request`` -> ``Inputs`` or
``RequestError``), and only valid inputs reach the batch method, which calls
``Predictor.run_batch``. A request body is one JSON object::

    {"text": "[MAX 2 9 [MIN 4 7 ] 0 ]"}            one text, encoded by the task's tokenizer
    {"text": ["[MAX 2 9 ]", "[SM 1 2 ]"]}          several
    {"input_ids": [2, 10, 17, 5]}                   one token-id sequence
    {"input_ids": [[2, 10, 17, 5], [4, 9, 10, 5]]}  several
    optional: "truncate": true                       cut inputs longer than the model accepts
                                                     (otherwise they are refused with 413)

An error message is one line and quotes at most ``QUOTE_CHARS`` characters of any input
(``clip``): a 5 MB token is named by its start and its length, not echoed back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omninet.buckets import bucket_for

__all__ = ["MAX_INPUTS_PER_REQUEST", "QUOTE_CHARS", "Inputs", "Predictor", "RequestError", "clip", "one_line",
           "parse_request"]

MAX_INPUTS_PER_REQUEST = 256
QUOTE_CHARS = 80  # the most of any one input an error message quotes
_KEYS = {"text", "input_ids", "truncate"}


def clip(text: str, limit: int = QUOTE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def one_line(message: str, default: str = "bad request") -> str:
    """An error message's first line, with every run of more than ``QUOTE_CHARS`` characters
    other than spaces and quotes clipped: a message built elsewhere (a tokenizer's, an
    exception's) may quote an input token whole."""
    first = message.splitlines()[0] if message and message.strip() else default
    return re.sub(rf"[^\s'\"]{{{QUOTE_CHARS + 1},}}", lambda m: clip(m.group()), first)


class RequestError(Exception):
    """A bad request: ``status`` (400 malformed, 413 too long) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = one_line(message)


@dataclass
class Inputs:
    """A validated request: id sequences ready for the model, and which of them were cut."""

    sequences: list[list[int]]
    truncated: list[bool]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_request(body: bytes | str, *, encode, vocab_size: int, max_length: int) -> Inputs:
    """Body bytes -> ``Inputs``; ``RequestError`` for anything the model must not see.
    ``encode(text) -> list[int]`` is the task's tokenizer."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise RequestError(400, f"unknown field(s) {clip(', '.join(map(repr, unknown)))}; send 'text' or 'input_ids' "
                                f"(and optionally 'truncate')")
    if ("text" in data) == ("input_ids" in data):
        raise RequestError(400, "send exactly one of 'text' (a string or a list of strings) or 'input_ids' "
                                "(a list of ints or a list of lists of ints)")
    truncate = data.get("truncate", False)
    if not isinstance(truncate, bool):
        raise RequestError(400, f"'truncate' must be true or false, got {clip(json.dumps(truncate))}")
    if "text" in data:
        texts = data["text"]
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise RequestError(400, "'text' must be a string or a list of strings")
        _check_count(len(texts), "text")
        sequences = []
        for i, text in enumerate(texts):
            try:
                sequences.append(list(encode(text)))
            except ValueError as exc:
                raise RequestError(400, f"text[{i}]: {exc}") from None
    else:
        ids = data["input_ids"]
        if isinstance(ids, list) and ids and all(_is_int(x) for x in ids):
            sequences = [ids]
        elif isinstance(ids, list) and all(isinstance(s, list) and all(_is_int(x) for x in s) for s in ids):
            sequences = ids
        else:
            raise RequestError(400, "'input_ids' must be a list of ints or a list of lists of ints")
        _check_count(len(sequences), "input_ids")
    truncated = []
    for i, seq in enumerate(sequences):
        if not seq:
            raise RequestError(400, f"input {i} is empty; send at least one token")
        bad = next((x for x in seq if not 0 <= x < vocab_size), None)
        if bad is not None:
            raise RequestError(400, f"input {i}: token id {clip(str(bad))} is outside the vocabulary [0, {vocab_size})")
        if len(seq) > max_length and not truncate:
            raise RequestError(413, f"input {i} has {len(seq)} tokens; the model accepts at most {max_length} "
                                    f"(send \"truncate\": true to cut it)")
        truncated.append(len(seq) > max_length)
    return Inputs([s[:max_length] for s in sequences], truncated)


def _check_count(n: int, field: str) -> None:
    if n == 0:
        raise RequestError(400, f"'{field}' is empty; send at least one input")
    if n > MAX_INPUTS_PER_REQUEST:
        raise RequestError(413, f"{n} inputs in one request; send at most {MAX_INPUTS_PER_REQUEST}")


class Predictor:
    """A ``TrainedModel`` behind request validation and per-bucket batched inference."""

    def __init__(self, trained) -> None:
        if trained.task.kind == "classification" and not trained.model.config.num_classes:
            raise ValueError(f"{trained.path}: a classification task's model has no classifier head")
        self.trained = trained
        self.identity = {k: trained.identity.get(k) for k in ("sweep", "pool", "trial", "config_hash")}

    @property
    def buckets(self) -> list[int]:
        return self.trained.buckets

    def parse(self, body: bytes | str) -> Inputs:
        t = self.trained
        return parse_request(body, encode=t.task.encode, vocab_size=t.vocab_size, max_length=t.max_length)

    def bucket_of(self, ids: Sequence[int]) -> int:
        return bucket_for(len(ids), self.buckets)

    def run_batch(self, sequences: list[list[int]]) -> list[dict[str, Any] | Exception]:
        """One forward for a batch of valid sequences (one bucket); per item the prediction and
        class probabilities. If the batch fails as a whole, each item is retried alone, so one
        poisoned item returns its own exception and never fails the others."""
        try:
            out = self.trained.predict_ids(sequences)
            return [{"prediction": p, "probabilities": q} for p, q in zip(out["predictions"], out["probabilities"])]
        except Exception:  # noqa: BLE001 -- isolate the failing item below
            if len(sequences) == 1:
                raise
        results: list[dict[str, Any] | Exception] = []
        for seq in sequences:
            try:
                results.extend(self.run_batch([seq]))
            except Exception as exc:  # noqa: BLE001 -- this item's own failure, reported to its caller only
                results.append(exc)
        return results
