"""Dotted paths over a configuration tree: ``'model.attention.kernel'``.

One utility for every layer that addresses a config by path (sweep search spaces, ``when:``
clauses, ``omninet trial --set``, MLflow params). It works on the plain-dict form of a config
(``ConfigBase.to_dict()``); the typed side lists which paths exist (``config_paths``) so a
misspelt path is an error at load time that names the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any, Iterable, Union, get_args, get_origin

from omninet.config import ConfigBase

__all__ = ["MISSING", "get_path", "set_path", "with_path", "flatten", "config_paths", "check_path"]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def get_path(tree: Any, path: str) -> Any:
    """The value at ``path`` in nested dicts, or ``MISSING``."""
    node = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return MISSING
        node = node[part]
    return node


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """Sets ``path`` in place, creating missing sections; a non-mapping in the way is a
    ValueError (``'model.hidden_size.x'``: hidden_size is not a section)."""
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{path}: {part!r} is not a section (it holds {child!r})")
        node = child
    node[parts[-1]] = value


def with_path(tree: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``tree`` with ``path`` set to ``value``."""
    out = copy.deepcopy(tree)
    set_path(out, path, value)
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {dotted path: leaf}; lists and empty dicts stay leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def _config_class(tp: Any) -> type | None:
    """The ConfigBase class inside an annotation (``X``, ``X | None``), else None."""
    if get_origin(tp) in (Union, types.UnionType):
        found = [c for c in (_config_class(a) for a in get_args(tp)) if c is not None]
        return found[0] if len(found) == 1 else None
    return tp if isinstance(tp, type) and issubclass(tp, ConfigBase) else None


def config_paths(cls: type, prefix: str = "") -> list[str]:
    """Every leaf path of a ConfigBase class (recursing into fields typed as configs); a
    field typed as a mapping (``dict[...]``) is a leaf whose keys are free."""
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        path = f"{prefix}{f.name}"
        sub = _config_class(hints[f.name])
        if sub is not None and hasattr(sub, "paths"):
            out += sub.paths(f"{path}.")
        elif sub is not None:
            out += config_paths(sub, f"{path}.")
        else:
            out.append(path)
    return out


def check_path(path: str, valid: Iterable[str], *, where: str) -> None:
    """ValueError naming the closest valid path when ``path`` is not one of ``valid`` (a
    prefix of a valid path, i.e. a whole section, is not a settable leaf either)."""
    valid = list(valid)
    if path in valid:
        return
    # a path below a free-form mapping leaf (e.g. heads.pruned_heads.3) is allowed
    if any(path.startswith(f"{v}.") for v in valid):
        return
    close = difflib.get_close_matches(path, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{where}: {path!r} is not a path of the trial config{hint}")
