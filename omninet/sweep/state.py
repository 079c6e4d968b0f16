"""What the controller knows of each pool while a sweep runs: the trials in flight and what
the finished ones came to. Rebuilt from the records on resume (:mod:`omninet.sweep.resume`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial

__all__ = ["Running", "PoolState", "progress_line"]


@dataclass
class Running:
    """One trial the controller has asked for, from its proposal to its record."""

    pool: str
    number: int
    trial_id: int
    params: dict[str, Any]
    trial_config: Any  # the runner's typed config, parsed once here and sent to the worker as is
    started: float = field(default_factory=time.time)
    repeat_of: int | None = None
    prediction: dict[str, Any] | None = None  # the cost model's, made before the trial measured anything
    seed_key: str | None = None  # the sampled parameters and the training seed (equal: the same run)
    duplicate_of: int | None = None  # an earlier trial of the pool with this seed_key: not trained again
    reference: bool = False  # the base, no passes, the trials' fine-tune: what every trial is paired against


@dataclass
class PoolState:
    spec: Any
    study: optuna.Study
    budget: int
    created: int = 0
    requeue: list[FrozenTrial] = field(default_factory=list)
    inflight: dict[Any, Running] = field(default_factory=dict)
    done: int = 0
    failed: int = 0
    infeasible: int = 0
    screened: int = 0
    pruned: int = 0
    durations: list[float] = field(default_factory=list)
    best: tuple[float, int] | None = None
    params: list = field(default_factory=list)  # the search space as this pool's hardware can run it
    repeats: list[tuple[dict[str, Any], int, int]] = field(default_factory=list)  # (params, repeat_of, index)
    repeats_planned: bool = False
    repeat_runs: int = 0  # finished repeat runs (beyond the pool's trial budget)
    duplicates: int = 0  # proposals equal to an earlier trial: told its outcome, never trained
    seed_keys: dict[str, int] = field(default_factory=dict)  # seed_key -> the first trial number that ran it
    parked: dict[int, list[Running]] = field(default_factory=dict)  # duplicates of a trial still running
    reference: int | None = None  # the trial every other is paired against (omninet.scores)
    reference_sent: bool = False  # a sweep with a base: the pool's reference run was dispatched
    reference_scores: Any = None  # the reference run's UnitScores, read once
    timing_reference: tuple[Any, str] | None = None  # (typed config, label) trials are timed against, made once

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.infeasible + self.screened + self.pruned + self.duplicates

    def count(self, row: dict[str, Any] | None, objective, frozen: FrozenTrial | None = None) -> None:
        """A finished trial (its record, or Optuna's trial when the record is missing) in the
        pool's tallies; ``objective``: the sweep's first, for the best so far."""
        status = (row or {}).get("status") or (frozen.user_attrs.get("status") if frozen else None) or "error"
        if (row or {}).get("repeat_of") is not None or (frozen is not None and "repeat_of" in frozen.user_attrs):
            self.repeat_runs += 1
        if status not in ("infeasible", "screened", "duplicate") and row and row.get("duration_s"):
            self.durations.append(float(row["duration_s"]))  # it ran: its time feeds the ETA
        if status == "ok":
            self.done += 1
            value = row.get(objective.key) if row else None
            if value is not None and row.get("feasible"):
                score = value if objective.direction == "maximize" else -value
                if self.best is None or score > self.best[0]:
                    self.best = (score, int(row["trial_number"]))
        elif status == "infeasible":
            self.infeasible += 1
        elif status == "screened":
            self.screened += 1
        elif status == "pruned":
            self.pruned += 1
        elif status == "duplicate":
            self.duplicates += 1
        else:
            self.failed += 1


def progress_line(pools: dict[str, PoolState], objective, elapsed_s: float, *, stopped: bool) -> str:
    """One line of every pool's tallies, the best first objective so far and the ETA
    (``stopped``: the sweep screens or prunes, so those tallies are shown)."""
    parts, eta = [], 0.0
    for name, ps in pools.items():
        finished = ps.finished - ps.repeat_runs
        best = f", best {objective.key} {abs(ps.best[0]):.4g} (#{ps.best[1]})" if ps.best else ""
        repeat_runs = f", {ps.repeat_runs} repeat runs" if ps.repeat_runs else ""
        dups = f", {ps.duplicates} duplicate proposals not trained" if ps.duplicates else ""
        screened = f", {ps.screened} screened, {ps.pruned} pruned" if stopped else ""
        parts.append(f"{name}: {finished}/{ps.budget} done ({ps.done} ok, {len(ps.inflight)} running, "
                     f"{ps.failed} failed, {ps.infeasible} infeasible{screened}{repeat_runs}{dups}){best}")
        if ps.durations:
            mean = sum(ps.durations) / len(ps.durations)
            left = max(0, ps.budget - finished - len(ps.inflight)) + 0.5 * len(ps.inflight)
            eta = max(eta, left * mean / ps.spec.concurrency)
    timed = any(ps.durations for ps in pools.values())
    return f"{' | '.join(parts)} | elapsed {_fmt_s(elapsed_s)}, ETA {_fmt_s(eta) if timed else '?'}"


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"
