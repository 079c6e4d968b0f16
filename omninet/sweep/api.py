"""The hardware-aware tuning API: ``omninet.tune(config) -> SweepResult``."""

from __future__ import annotations

import os
from typing import Any

from omninet.sweep.config import SweepConfig
from omninet.sweep.controller import run_sweep
from omninet.sweep.results import SweepResult

__all__ = ["tune"]


def tune(config: SweepConfig | str | os.PathLike | dict[str, Any], *, results_dir: str | os.PathLike | None = None,
         address: str | None = None, num_cpus: int | None = None) -> SweepResult:
    """Runs (or resumes) the sweep described by ``config`` (a YAML path, a dict or a
    :class:`SweepConfig`) on a Ray cluster (``address``; ``$RAY_ADDRESS``; else an embedded
    local Ray) and returns its :class:`SweepResult`: ``.trials()``, ``.pareto_front(pool)``,
    ``.recommend(pool, max_latency_ms=..., max_memory_mb=..., min_accuracy=...)``."""
    return run_sweep(config, results_dir=results_dir, address=address, num_cpus=num_cpus)
