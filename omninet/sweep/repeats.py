"""Runs of one configuration, counted as evidence once: seed repeats of the front, duplicate
proposals (the same parameters and seed: told the earlier trial's outcome, never trained
again) and the pool's reference run that every other trial is paired against."""

from __future__ import annotations

import logging
from typing import Any

from optuna.trial import TrialState

from omninet.paths import get_path
from omninet.scores import UnitScores, paired_difference
from omninet.sweep import record
from omninet.sweep.config import SweepConfig
from omninet.sweep.records import params_key
from omninet.sweep.state import PoolState, Running

__all__ = ["FINISHED_STATES", "base_seed", "seed_key", "plan_repeats", "duplicate_outcome", "matches_reference",
           "reference_point", "timing_reference", "pair_with_reference"]

log = logging.getLogger("omninet.sweep")
FINISHED_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
_NOT_SEARCHED = ("repeat_of", "duplicate_of", "role")  # user attributes of runs that are not a new configuration


def base_seed(config: SweepConfig) -> Any:
    """The training seed of the trial config (None when the seed itself is searched)."""
    path = config.repeats.seed_path
    return None if path in {q.path for q in config.params} else get_path(config.base_trial, path)


def seed_key(config: SweepConfig, params: dict[str, Any], seed: Any, *, reference: bool) -> str:
    """The run's identity: its sampled parameters and training seed (and the reference role)."""
    return params_key({**params, config.repeats.seed_path: seed, **({"role": "reference"} if reference else {})})


def plan_repeats(config: SweepConfig, ps: PoolState) -> bool:
    """After the pool's main budget: queue (in ``ps.repeats``) the runs that bring each
    configuration of the feasible Pareto front (or every finished one) to ``repeats.count``
    runs. True while repeat runs are left to start."""
    spec = config.repeats
    if spec.count <= 1:
        return False
    if not ps.repeats_planned:
        if ps.inflight or ps.requeue:
            return False  # the front is not final while main-budget trials still run
        ps.repeats_planned = True
        trials = [t for t in ps.study.get_trials(deepcopy=False) if t.state in FINISHED_STATES]
        searched = [t for t in (ps.study.best_trials if spec.scope == "pareto" else trials)
                    if not any(k in t.user_attrs for k in _NOT_SEARCHED)]
        chosen = [t for t in searched if spec.scope == "pareto" or t.state == TrialState.COMPLETE]
        first = config.objectives[0]
        chosen = sorted(chosen, key=lambda t: t.values[0], reverse=first.direction == "maximize")[:spec.top]
        runs: dict[str, int] = {}
        for t in trials + [t for t in ps.study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]:
            if "duplicate_of" in t.user_attrs or "role" in t.user_attrs:  # not a run of a searched configuration
                continue
            key = params_key(t.params)
            runs[key] = runs.get(key, 0) + 1
        for t in sorted(chosen, key=lambda t: t.number):
            for index in range(runs.get(params_key(t.params), 1), spec.count):
                ps.repeats.append((dict(t.params), t.number, index))
        if ps.repeats:
            log.info("pool %s: %d repeat run(s) for %d configuration(s) (noise: %d runs each)", ps.spec.name,
                     len(ps.repeats), len({r[1] for r in ps.repeats}), spec.count)
    return bool(ps.repeats)


def duplicate_outcome(config: SweepConfig, row: dict[str, Any], original: int) -> dict[str, Any]:
    """A duplicate proposal's result: the earlier trial's outcome, as Optuna's pattern for
    repeated parameters tells it (the proposal counts against the budget only as a proposal)."""
    keep = set(record.result_columns()) | {o.key for o in config.objectives}
    copied = {k: v for k, v in row.items() if k in keep and k != "status"}
    return {**copied, "status": "duplicate", "duplicate_of": original,
            "error": f"same parameters and seed as trial #{original} ({row['status']}); not trained again, told to "
                     "Optuna with its outcome"}


def reference_point(config: SweepConfig, ps: PoolState) -> dict[str, Any]:
    """The sweep's first ``enqueue`` point (the dense baseline) as this pool searches it ({} without one)."""
    if not config.enqueue:
        return {}
    return {k: v for k, v in config.enqueue[0].items() if k in {q.path for q in ps.params}}


def matches_reference(config: SweepConfig, ps: PoolState, params: dict[str, Any]) -> bool:
    """Whether ``params`` is the sweep's first ``enqueue`` point (the dense baseline) as this
    pool searches it."""
    if not config.enqueue:
        return False
    return all(params.get(k) == v for k, v in reference_point(config, ps).items())


def timing_reference(config: SweepConfig, ps: PoolState, run: Running, *, base: Any) -> tuple[Any, str]:
    """The model every trial of the pool is timed against (``measure.paired``), as the runner's
    typed config, and what it is (the record's ``latency_pairing``):

    - with a ``base``: the base itself (the first ``enqueue`` point as the pool searches it, no
      fine-tune: the pool's reference run fine-tunes it as the trials are, which changes its
      weights, not its speed): 'base';
    - without: that ``enqueue`` point, the configuration of the pool's accuracy reference: 'enqueue[0]';
    - without either: the configuration of the pool's first run (trial #0 of its study; ``run``
      when it is that one): 'first run (#0)'.

    Without a base the reference is built from its seed, untrained: a model's time depends on
    its shapes, kernels, heads and precision, not on its weight values (the ``mixed`` plan
    aside). A configuration this pool cannot build gives (None, 'unpaired: ...')."""
    if base is not None:
        values, label = {**reference_point(config, ps), "base": str(base), "finetune.steps": 0}, "base"
    elif config.enqueue:
        values, label = reference_point(config, ps), "enqueue[0]"
    else:
        first = run.params if run.number == 0 else next(
            (t.params for t in sorted(ps.study.get_trials(deepcopy=False), key=lambda t: t.number) if t.params),
            run.params)
        values, label = dict(first), "first run (#0)"
    try:
        return config.trial_config(values), label
    except ValueError as exc:
        return None, f"unpaired: the reference configuration ({label}) is not valid on this pool: {exc}"


def is_reference(config: SweepConfig, ps: PoolState, run: Running, *, has_base: bool) -> bool:
    """The pool's reference run: with a base, the base on this pool with no passes and the
    trials' own fine-tune (its zero-shot score is the untouched base's); without, the pool's first run of the sweep's first ``enqueue`` point (the dense
    baseline), trained with the base seed."""
    if has_base:
        return run.reference
    if ps.reference is not None or run.repeat_of is not None:
        return False
    return matches_reference(config, ps, run.params)


def pair_with_reference(ps: PoolState, run: Running, row: dict[str, Any], scores: bytes, zero_shot: bytes | None,
                        *, reference: bool, read_scores) -> None:
    """``row['role']`` for the reference (``reference``: this run is it); for every other run
    with scores, its paired accuracy difference to the reference on the eval rows both scored
    (95% paired bootstrap interval, McNemar's p; it covers the eval draw, one training run each).
    ``scores`` and ``zero_shot`` are the trial's own, as the worker sent them; ``read_scores(pool,
    number)`` reads a recorded run's (a resumed controller's reference)."""
    if row["status"] == "ok" and reference:
        ps.reference, row["role"] = run.number, "reference"
        ps.reference_scores = UnitScores.from_bytes(scores)
        return
    if ps.reference is None:
        return
    if ps.reference_scores is None:  # a resumed controller: the reference was recorded by an earlier one
        ps.reference_scores = read_scores(ps.spec.name, ps.reference)
    ref = ps.reference_scores
    if ref is None:
        return
    try:
        d = paired_difference(UnitScores.from_bytes(scores), ref)
    except ValueError as exc:  # not the same eval set: say so in the log, record nothing paired
        log.info("trial %s#%d: no paired difference to reference #%d (%s)", ps.spec.name, run.number, ps.reference, exc)
        return
    row.update(accuracy_diff_ref=d.diff, accuracy_diff_ref_lo=d.lo, accuracy_diff_ref_hi=d.hi,
               accuracy_diff_ref_p=d.p_value, accuracy_diff_ref_covers=d.covers)
    if zero_shot is not None:
        z = paired_difference(UnitScores.from_bytes(zero_shot), ref)
        row.update(accuracy_zero_shot_diff_ref=z.diff, accuracy_zero_shot_diff_ref_lo=z.lo,
                   accuracy_zero_shot_diff_ref_hi=z.hi)
