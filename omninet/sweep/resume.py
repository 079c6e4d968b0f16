"""A sweep's results directory checked, its studies opened, and a dead controller's state
rebuilt from its records.

Optuna holds a dead controller's trials as RUNNING. A RUNNING trial with a Parquet row finished
and was written but not told: it is told from the row. One without is re-run under the same
trial number with the same parameters, so nothing is duplicated and the budget holds. The rung
book, the cost model, the seed keys and the reference run come back from the rows.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from omninet.sweep.config import SweepConfig, SweepConfigError, load_config
from omninet.sweep.repeats import FINISHED_STATES
from omninet.sweep.state import PoolState

__all__ = ["MANIFEST", "check_manifest", "make_sampler", "open_study", "enqueue_points", "rebuild", "restore_learning", "adopt_orphans"]

log = logging.getLogger("omninet.sweep")
Rows = dict[tuple[str, int], dict[str, Any]]
MANIFEST = "sweep.yaml"


def check_manifest(config: SweepConfig, results_dir: Path) -> None:
    """A results directory belongs to one sweep: resuming with another search space or other
    objectives would mix incomparable trials."""
    path = results_dir / MANIFEST
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text()) or {}
    new = config.to_plain()
    try:  # compare as parsed: a manifest written by an older version states the same trial differently
        old["trial"] = load_config({**old, "pools": new["pools"], "constraints": {}}).to_plain()["trial"]
    except (SweepConfigError, ValueError, TypeError) as exc:
        raise SweepConfigError(f"results_dir: {results_dir} holds a sweep.yaml this version cannot read "
                               f"({exc}); use another results_dir") from None
    for key in ("name", "search_space", "objectives", "trial"):
        if old.get(key) != new.get(key):
            raise SweepConfigError(f"results_dir: {results_dir} holds sweep results with a different {key!r}; "
                                   "use another results_dir (or sweep name) for a different sweep")


def make_sampler(config: SweepConfig, budget: int, pool_index: int = 0) -> optuna.samplers.BaseSampler:
    """The pool's sampler. Each pool draws from its own seed (``sampler.seed`` + the pool's
    index): two pools on the same hardware (a simulated accelerator pool on the CPU node) would
    otherwise propose the same configurations in the same order and measure nothing new."""
    s = config.sampler
    seed = None if s.seed is None else s.seed + pool_index
    if s.kind == "tpe":
        kw = {} if s.n_startup_trials is None else {"n_startup_trials": s.n_startup_trials}
        return optuna.samplers.TPESampler(seed=seed, **kw)  # constant_liar on: parallel asks spread out
    if s.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=s.population_size or min(50, max(4, budget)))
    if s.kind == "gp":
        kw = {} if s.n_startup_trials is None else {"n_startup_trials": s.n_startup_trials}
        return optuna.samplers.GPSampler(seed=seed, **kw)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(config: SweepConfig, storage, pool, budget: int, probe: dict[str, Any]) -> optuna.Study:
    """The pool's study, created or loaded, with its objectives' names and the pool's facts."""
    index = [q.name for q in config.pools].index(pool.name)
    study = optuna.create_study(storage=storage, study_name=config.study_name(pool.name),
                                sampler=make_sampler(config, budget, index),
                                directions=[o.direction for o in config.objectives], load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.key for o in config.objectives])
    study.set_user_attr("pool", pool.name)
    study.set_user_attr("resources", pool.resources)
    study.set_user_attr("simulate_accelerators", config.simulate_accelerators)
    study.set_user_attr("probe", probe)
    return study


def enqueue_points(config: SweepConfig, study: optuna.Study, params: list) -> None:
    """A new study runs the ``enqueue`` points first (e.g. the dense baseline, so every sweep
    shows what the knobs buy), each as this pool's search space has it."""
    names = {q.path for q in params}
    for point in config.enqueue:
        point = {k: v for k, v in point.items() if k in names}
        if all(point[q.path] in q.choices for q in params if q.kind == "categorical" and q.path in point):
            study.enqueue_trial(point, skip_if_exists=True)


def rebuild(config: SweepConfig, ps: PoolState, trials: list[FrozenTrial], rows: Rows,
            tell: Callable[[int, dict[str, Any]], None]) -> int:
    """The pool's state from its study's trials and Parquet rows: finished trials counted,
    RUNNING ones told from their row (returns how many) or requeued, seed keys and the
    reference run restored, the number of trials created so far."""
    name, objective = ps.spec.name, config.objectives[0]
    repaired = 0
    for t in trials:
        if t.state == TrialState.RUNNING:
            row = rows.get((name, t.number))
            if row is not None:  # finished and written, not yet told when the controller died
                tell(t._trial_id, row)  # FrozenTrial._trial_id: Optuna's own handle
                ps.count(row, objective)
                repaired += 1
            else:
                ps.requeue.append(t)
        elif t.state in FINISHED_STATES:
            ps.count(rows.get((name, t.number)), objective, t)
    for (pool, number), row in sorted(rows.items()):
        if pool != name:
            continue
        if row.get("seed_key") and row.get("status") != "duplicate":
            ps.seed_keys.setdefault(row["seed_key"], number)
        if row.get("role") == "reference":
            ps.reference = number
    ps.created = sum(1 for t in ps.study.get_trials(deepcopy=False)
                     if t.state != TrialState.WAITING and "repeat_of" not in t.user_attrs)
    return repaired


def restore_learning(config: SweepConfig, pool: str, rows: Rows, book, cost_model,
                     features: Callable[[dict[str, Any], Any], dict]) -> None:
    """A resumed controller's rung book and cost model, from the pool's Parquet rows."""
    import ray  # heavy: ray

    records = trials = 0
    for (p, number), row in sorted(rows.items()):
        if p != pool:
            continue
        result = json.loads(row.get("result_json") or "{}")
        if book is not None and row.get("repeat_of") is None:
            steps = result.get("rung_steps") or []
            ray.get(book.restore.remote(pool, number, row, steps, result.get("rung_accuracy") or [],
                                        result.get("rung_noise")))
            records, trials = records + len(steps), trials + 1
        if cost_model is not None and row.get("screened_by") != "cost_model" and row.get("cost_split"):
            trial_config = config.runner.parse(json.loads(row["config_json"]))
            params = {k[len("param."):]: v for k, v in row.items() if k.startswith("param.") and v is not None}
            cost_model.observe(pool, number, features(params, trial_config), row, split=row["cost_split"])
    if book is not None and trials:
        log.info("pool %s: rung book restored from Parquet: %d rung record(s) of %d trial(s)", pool, records, trials)


def adopt_orphans(ps: PoolState, running: list[FrozenTrial], keep: int | None = None) -> None:
    """After an ask that failed and was retried: its first attempt may have created a trial
    whose reply was lost. The sweep lock makes every RUNNING trial ours, so one that is neither
    in flight nor queued (nor ``keep``, the retried ask's own) is such an orphan: it is run (and
    counted) instead of lost. ``running``: the study's RUNNING trials."""
    known = {r.trial_id for r in ps.inflight.values()} | {t._trial_id for t in ps.requeue} | {keep}
    for t in running:
        if t._trial_id not in known:
            log.info("pool %s: trial #%d was created by an ask whose reply was lost; running it", ps.spec.name, t.number)
            ps.requeue.append(t)
            ps.created += 0 if "repeat_of" in t.user_attrs else 1
