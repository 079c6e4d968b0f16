"""What a trial is handed beyond its config (:class:`RunContext`), and how the sweep's
scheduler stops it (:class:`Stopped`). Below both ``run_trial`` and the runners that call it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["RunContext", "Stopped"]


@dataclass
class RunContext:
    """What the platform hands a runner beyond the config: the CPU cores it was allotted, the
    node's measurement gate, and whether to send the trained model back."""

    cores: list[int] | None = None
    gate: Any = None
    keep_model: bool = False  # return the trained model's files (``model_files``) with the result
    # The sweep scheduler's client (``omninet.sweep.scheduler.RungClient``): with one, the trial
    # measures first and reports its rungs; ``screen(costs)`` / ``report(step, value)`` return
    # the reason to stop, or None to go on. None: train to the budget, measure after.
    scheduler: Any = None
    # The reference workload's time (ms) on this pool's node, from the sweep's probe: every
    # trial of the pool scales its calibrated latency to it (``latency_p50_norm_ms``). None:
    # the trial's own reading.
    calibration_ref_ms: float | None = None
    # The worker's memory estimate of this config (``TrialRunner.estimate_mb``), made once
    # before the run; None: the runner estimates itself if it needs one.
    estimated_memory_mb: float | None = None
    # The sweep pool's reference model as the runner's typed config (the base itself, or the pool's
    # reference configuration), which the trial builds and times its own model against
    # (``measure.paired``), and what it is ('base', 'enqueue[0]', ...). None: unpaired, and
    # ``reference_label`` says why ('unpaired: ...'), or nothing for a trial run on its own.
    reference: Any = None
    reference_label: str | None = None


class Stopped(Exception):
    """The sweep scheduler stopped the trial: ``status`` 'screened' (before training) or
    'pruned' (at a rung); ``reason`` says why."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason
