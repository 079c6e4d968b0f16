"""The hardware-aware tuning API: ``omninet.tune(config) -> SweepResult``."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from omninet.model import OmniNetModel
from omninet.passes import is_foreign
from omninet.sweep.config import SweepConfig, SweepConfigError, load_config, resolve_results_dir
from omninet.sweep.controller import run_sweep
from omninet.sweep.results import SweepResult

__all__ = ["tune"]

TEXT_TASKS = ("text_lm", "masked_text")  # tasks tokenized with the base's own tokenizer


def tune(config: SweepConfig | str | os.PathLike | dict[str, Any], *, results_dir: str | os.PathLike | None = None,
         address: str | None = None, num_cpus: int | None = None, base: Any = None, runner: Any = None) -> SweepResult:
    """Runs (or resumes) the sweep described by ``config`` (a YAML path, a dict or a
    :class:`SweepConfig`) on a Ray cluster (``address``; ``$RAY_ADDRESS``; else an embedded
    local Ray) and returns its :class:`SweepResult`: ``.trials()``, ``.pareto_front(pool)``,
    ``.recommend(pool, max_latency_ms=..., max_memory_mb=..., min_accuracy=...)``.

    ``base``: tune a model you have. An ``OmniNetModel`` (saved once into
    ``<results>/base-checkpoint``), a path to a ``save_pretrained`` folder or a kept trial
    model, or your pretrained checkpoint: ``"hf:PATH"`` (or any path to a Hugging Face folder
    or ``.gguf`` file), converted once into ``<results>/base``. It replaces the config's
    ``base`` section; every trial derives from it (``omninet.passes``) and is paired against
    it. A text task (``text_lm``, ``masked_text``) without a ``tokenizer`` gets the base's.

    ``runner``: your own ``omninet.trial.TrialRunner`` object, in place of the config's
    ``trial_fn`` (a resumed sweep is given the same runner again)."""
    if base is not None:
        config = with_base(config, base, results_dir)
    if runner is not None:
        config = load_config(config, runner=runner)
    return run_sweep(config, results_dir=results_dir, address=address, num_cpus=num_cpus)


def with_base(config: Any, base: Any, results_dir: str | os.PathLike | None) -> dict[str, Any]:
    if isinstance(config, SweepConfig):
        data = config.to_plain()
    elif isinstance(config, dict):
        data = dict(config)
    else:
        data = yaml.safe_load(Path(config).read_text())
        if not isinstance(data, dict):
            raise SweepConfigError(f"{config}: expected a sweep config mapping")
    if isinstance(base, OmniNetModel):
        out = resolve_results_dir(_named(data), results_dir) / "base-checkpoint"
        base.save_pretrained(out)
        base = out
    elif not isinstance(base, (str, os.PathLike)):
        raise SweepConfigError(f"base: expected an OmniNetModel or a path to a saved model, got {type(base).__name__}")
    text = str(base)
    hf = text.startswith("hf:")
    path = Path(text[3:] if hf else text).expanduser().resolve()
    if not path.exists():
        raise SweepConfigError(f"base: {str(path)!r} does not exist; give the path of your model's folder (or .gguf file)")
    data["base"] = {"hf" if hf or is_foreign(path) else "checkpoint": str(path)}
    task = (data.get("trial") or {}).get("task")
    if isinstance(task, dict) and task.get("name") in TEXT_TASKS and not task.get("tokenizer") and path.is_dir():
        data["trial"] = {**data["trial"], "task": {**task, "tokenizer": str(path)}}
    return data


def _named(data: dict[str, Any]):
    """What ``resolve_results_dir`` reads of a config (its name and results_dir), without
    parsing the rest (which may need the base this call is about to write)."""
    return SimpleNamespace(name=data.get("name"), results_dir=data.get("results_dir"))
