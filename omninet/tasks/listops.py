"""ListOps (Nangia & Bowman 2018) as generated for the Long Range Arena.

The generator follows google-research/long-range-arena ``lra_benchmarks/data/listops.py``:

* a node at depth < ``max_depth`` is an operator with probability ``VALUE_P = 0.25`` (else a
  digit 0-9); nodes at ``max_depth`` are digits; the root is at depth 1;
* an operator takes ``randint(2, max_args)`` arguments and is one of ``[MIN``, ``[MAX``,
  ``[MED`` (median of the arguments, truncated to an int as ``int(np.median)`` does) and
  ``[SM`` (sum modulo 10); it is closed by ``]``; the label is the value of the root (10 classes);
* trees are drawn until their length lies in the range; LRA keeps ``500 < length < 2000``,
  which the ``lra`` preset writes as the inclusive range 501..1999.

Tokens. LRA writes the tree with parentheses (``( ( ( [MAX 2 ) 9 ) ] )``) and then tokenizes
with a TFDS tokenizer that keeps only alphanumeric runs, which also drops ``]`` and so makes
the nesting ambiguous. We keep the LRA generator's own token vocabulary, word-level:
``<pad> [MIN [MAX [MED [SM ] ( ) 0..9`` -> ids 0..17 (``vocab_size = 18``, ``pad_id = 0``).
With ``parens=False`` (default) the sequence is the operators, digits and ``]`` only, so its
length is exactly LRA's ``length``; ``parens=True`` adds LRA's parentheses. The length range
always bounds the emitted token count.

Splits. ``eval`` is drawn from its own seed and deduplicated (as LRA deduplicates); example
``i`` of ``train`` is drawn from a seed of its own, on first use, and redrawn if it equals an
eval example, so train and eval share nothing and a train split costs only what is read.
``evaluate_listops`` is an independent checker: it parses the token string with a stack and
never sees the generator's tree.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from omninet.tasks.base import GeneratedTask, TaskConfig, register_task

__all__ = ["LISTOPS_TOKENS", "LISTOPS_PRESETS", "ListOpsConfig", "ListOpsTask", "evaluate_listops",
           "generate_listops"]

LISTOPS_TOKENS = ("<pad>", "[MIN", "[MAX", "[MED", "[SM", "]", "(", ")",
                  "0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
_ID = {tok: i for i, tok in enumerate(LISTOPS_TOKENS)}
_OP0, _END, _LPAREN, _RPAREN, _DIGIT0 = _ID["[MIN"], _ID["]"], _ID["("], _ID[")"], _ID["0"]
VALUE_P = 0.25  # LRA: a node is an operator with probability VALUE_P (below max_depth)
MAX_ATTEMPTS = 1_000_000  # draws per example before declaring the length range unreachable in practice

LISTOPS_PRESETS: dict[str, dict[str, int]] = {
    # Short and shallow: learnable by a tiny transformer in about a minute of CPU training.
    "quickstart": {"min_length": 20, "max_length": 100, "max_depth": 3, "max_args": 10,
                   "num_train": 50_000, "num_eval": 2_000},
    # Long Range Arena ListOps: 96k train / 2k eval, 500 < length < 2000, depth 10, 10 args.
    "lra": {"min_length": 501, "max_length": 1999, "max_depth": 10, "max_args": 10,
            "num_train": 96_000, "num_eval": 2_000},
}


@dataclass(kw_only=True)
class ListOpsConfig(TaskConfig):
    """ListOps task. Fields left at ``None`` take the ``preset``'s value (see ``LISTOPS_PRESETS``);
    any field given explicitly overrides the preset."""

    task_name: ClassVar[str] = "listops"
    preset: Literal["quickstart", "lra"] = "quickstart"
    min_length: int | None = None
    max_length: int | None = None
    max_depth: int | None = None
    max_args: int | None = None
    num_train: int | None = None
    num_eval: int | None = None
    parens: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.preset in LISTOPS_PRESETS:  # an unknown preset is reported by the type check below
            for key, value in LISTOPS_PRESETS[self.preset].items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        super().__post_init__()

    def validate(self) -> None:
        where = "ListOpsConfig"
        for key, low in (("min_length", 1), ("max_depth", 1), ("max_args", 2), ("num_train", 1), ("num_eval", 1)):
            if getattr(self, key) < low:
                raise ValueError(f"{where}.{key} must be >= {low}, got {getattr(self, key)}")
        if self.max_length < self.min_length:
            raise ValueError(f"{where}.max_length ({self.max_length}) must be >= min_length ({self.min_length})")
        longest = _longest_tree(self.max_depth, self.max_args, self.parens)
        if longest < self.min_length:
            raise ValueError(f"{where}.min_length={self.min_length} is unreachable: trees of max_depth={self.max_depth} "
                             f"and max_args={self.max_args} have at most {longest} tokens; raise max_depth or max_args")


def _longest_tree(max_depth: int, max_args: int, parens: bool) -> int:
    longest = 1  # a node at max_depth is one digit
    for _ in range(max_depth - 1):
        longest = 2 + max_args * longest + (2 * max_args + 2 if parens else 0)
    return longest


class _TooLong(Exception):
    """Aborts a draw as soon as it exceeds max_length (it would be rejected anyway)."""


def _tree_sampler(max_depth: int, max_args: int, parens: bool, limit: int) -> Callable[[Callable[[], float], list[int]], int]:
    """Returns ``draw(rnd, out)``: appends one tree's token ids to ``out``, returns its value,
    raises ``_TooLong`` once ``out`` exceeds ``limit``. ``rnd`` is a uniform [0, 1) source."""

    def draw(rnd: Callable[[], float], out: list[int], depth: int = 1) -> int:
        if depth < max_depth and rnd() <= VALUE_P:
            n = 2 + int(rnd() * (max_args - 1))  # randint(2, max_args)
            op = int(rnd() * 4)  # MIN, MAX, MED, SM
            if parens:
                out.extend([_LPAREN] * (n + 1))
            out.append(_OP0 + op)
            values = []
            for _ in range(n):
                values.append(draw(rnd, out, depth + 1))
                if parens:
                    out.append(_RPAREN)
            if len(out) >= limit:  # the closing ']' would take it past the limit
                raise _TooLong
            out.append(_END)
            if parens:
                out.append(_RPAREN)
            if op == 0:
                return min(values)
            if op == 1:
                return max(values)
            if op == 2:
                values.sort()
                mid = n // 2
                return values[mid] if n % 2 else (values[mid - 1] + values[mid]) // 2
            return sum(values) % 10
        value = int(rnd() * 10)
        out.append(_DIGIT0 + value)
        return value

    return draw


def generate_listops(rng: random.Random, config: ListOpsConfig) -> tuple[list[int], int]:
    """One ``(token ids, label)`` drawn by rejection until ``min_length <= len <= max_length``."""
    draw = _tree_sampler(config.max_depth, config.max_args, config.parens, config.max_length)
    rnd = rng.random
    for _ in range(MAX_ATTEMPTS):
        out: list[int] = []
        try:
            value = draw(rnd, out)
        except _TooLong:
            continue
        if config.min_length <= len(out) <= config.max_length:
            return out, value
    raise ValueError(f"ListOps: no tree with {config.min_length} <= length <= {config.max_length} in {MAX_ATTEMPTS} "
                     f"draws (max_depth={config.max_depth}, max_args={config.max_args}); widen the length range")


def evaluate_listops(tokens: str | Sequence[str]) -> int:
    """Independent ListOps evaluator: the value of an expression given as a whitespace-separated
    string or a list of tokens (parentheses optional). Raises ValueError on malformed input."""
    if isinstance(tokens, str):
        tokens = tokens.split()
    ops = {"[MIN": min, "[MAX": max, "[MED": lambda v: int(statistics.median(v)), "[SM": lambda v: sum(v) % 10}
    stack: list[tuple[str, list[int]]] = []
    depth = 0  # open parentheses
    result: int | None = None
    for pos, tok in enumerate(tokens):
        if result is not None:
            if tok == ")" and depth > 0:  # LRA closes the root's parenthesis after its ']'
                depth -= 1
                continue
            raise ValueError(f"token {pos} ({tok!r}) follows a complete expression")
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' at token {pos}")
        elif tok in ops:
            stack.append((tok, []))
        elif tok == "]":
            if not stack or len(stack[-1][1]) < 1:
                raise ValueError(f"']' at token {pos} closes no operator with arguments")
            op, args = stack.pop()
            value = ops[op](args)
            if stack:
                stack[-1][1].append(value)
            else:
                result = value
        elif len(tok) == 1 and tok.isdigit():
            if stack:
                stack[-1][1].append(int(tok))
            else:
                result = int(tok)
        else:
            raise ValueError(f"unknown ListOps token {tok!r} at position {pos}")
    if result is None or depth != 0:
        raise ValueError("incomplete ListOps expression (unclosed operator or parenthesis)")
    return result


@register_task
class ListOpsTask(GeneratedTask):
    """10-way classification of a ListOps expression's value."""

    name = "listops"
    kind = "classification"
    config_class = ListOpsConfig

    def __init__(self, config: ListOpsConfig):
        super().__init__(config)
        self.vocab_size = len(LISTOPS_TOKENS)
        self.pad_id = _ID["<pad>"]
        self.num_classes = 10
        self.max_length = config.max_length

    @staticmethod
    def decode(ids: Sequence[int]) -> list[str]:
        """Token ids -> LRA tokens (padding dropped)."""
        return [LISTOPS_TOKENS[i] for i in ids if i != _ID["<pad>"]]

    @staticmethod
    def encode(tokens: str | Sequence[str]) -> list[int]:
        if isinstance(tokens, str):
            tokens = tokens.split()
        try:
            return [_ID[t] for t in tokens]
        except KeyError as exc:
            raise ValueError(f"unknown ListOps token {exc.args[0]!r}; known: {' '.join(LISTOPS_TOKENS[1:])}") from None

    def draw(self, rng: random.Random) -> tuple[list[int], int]:
        return generate_listops(rng, self.config)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "preset": self.config.preset}
