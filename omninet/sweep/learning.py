"""What a sweep learns from its trials while it runs, wired to the sweep's config: the rung
book's rules and each trial's rung client (:mod:`omninet.sweep.scheduler`), and the cost
model's features, predictions, screening and report (:mod:`omninet.sweep.costmodel`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omninet.sweep.config import SweepConfig
from omninet.sweep.costmodel import param_features
from omninet.sweep.scheduler import PoolRules, RungClient
from omninet.sweep.state import Running

__all__ = ["pool_rules", "rung_client", "features", "predict", "screen_reason", "learn", "write_report"]

log = logging.getLogger("omninet.sweep")


def pool_rules(config: SweepConfig) -> dict[str, Any]:
    """Each pool's :class:`~omninet.sweep.scheduler.PoolRules` for the rung book."""
    spec, first = config.scheduler, config.objectives[0]
    steps = config.runner.max_steps(config.trial)
    return {p.name: PoolRules(rungs=spec.rungs(steps), reduction_factor=spec.reduction_factor,
                              maximize=first.direction == "maximize",
                              cost_keys=[o.key for o in config.objectives[1:]],
                              limits=config.constraints_for(p.name).limits(),
                              screen_dominated_by=spec.screen_dominated_by, cost_margin=spec.cost_margin,
                              noise_z=spec.noise_z)
            for p in config.pools}


def rung_client(book, config: SweepConfig, run: Running):
    """The trial's rung client, or None (fifo; repeats always train to the budget)."""
    if book is None or run.repeat_of is not None:
        return None
    spec = config.scheduler
    return RungClient(book, run.pool, run.number, spec.rungs(config.runner.max_steps(run.trial_config)),
                      remeasure=spec.remeasure, limits=config.constraints_for(run.pool).limits())


def features(config: SweepConfig, params: dict[str, Any], trial_config: Any) -> dict[str, dict[str, float]]:
    """The cost model's features: the runner's (OmniNet: work and shape), else the parameters."""
    return config.runner.cost_features(trial_config) or param_features(params)


def predict(cost_model, config: SweepConfig, run: Running) -> dict[str, Any] | None:
    """The cost model's prediction for a proposal, with the model's held-out error then."""
    if cost_model is None or run.repeat_of is not None:
        return None
    try:
        feats = features(config, run.params, run.trial_config)
    except Exception as exc:  # noqa: BLE001 -- a config the features cannot describe is run, not screened
        log.debug("cost features failed: %s", exc)
        return None
    pred = cost_model.predict(run.pool, feats)
    if pred is None:
        return None
    pred["mape"] = {t: v["mape"] for t, v in cost_model.validation(run.pool).items()}
    return pred


def screen_reason(config: SweepConfig, run: Running) -> str | None:
    """Why the prediction says the proposal is infeasible (beyond the tolerance), or None."""
    pred, spec = run.prediction, config.cost_model
    if pred is None or not spec.screen or not pred.get("trusted"):
        return None
    for key, limit in config.constraints_for(run.pool).limits().items():
        value = pred.get(key)
        if value is not None and value * (1.0 - spec.screen_tolerance) > limit:
            mape = pred["mape"].get(key)
            return (f"screened by the cost model: predicted {key} {value:.4g} > the pool's limit {limit:.4g} by more "
                    f"than {spec.screen_tolerance:.0%} ({pred['source']} model on {pred['fit_trials']} trials, held-out "
                    f"MAPE {'n/a' if mape is None else f'{mape:.1%}'}); not run")
    return None


def learn(book, cost_model, config: SweepConfig, run: Running, row: dict[str, Any], result: dict[str, Any]) -> None:
    """A finished trial teaches the rung book (its full-budget costs) and the cost model (what
    it measured; ``row['cost_split']`` records which split it joined)."""
    if book is not None and row["status"] == "ok" and run.repeat_of is None:
        import ray  # heavy: ray

        ray.get(book.finish.remote(run.pool, run.number, {o.key: row.get(o.key) for o in config.objectives[1:]}))
    if cost_model is not None and row.get("screened_by") != "cost_model":
        try:
            feats = features(config, run.params, run.trial_config)
        except Exception as exc:  # noqa: BLE001
            log.debug("cost features failed: %s", exc)
            return
        row["cost_split"] = cost_model.observe(run.pool, run.number, feats, result)


def write_report(cost_model, config: SweepConfig, path: Path) -> None:
    """``cost_model.json``: per pool, the held-out validation and which trials fitted it."""
    if cost_model is None:
        return
    seed_from = config.cost_model.seed_from
    report = {p: {"validation": cost_model.validation(p),
                  "fit_trials": [s.trial for s in cost_model.fit_split(p)],
                  "holdout_trials": [s.trial for s in cost_model.holdout_split(p)],
                  "seed_from": seed_from,
                  "scale": cost_model.scale(p) if seed_from not in (None, p) else None}
              for p in cost_model.pools}
    path.write_text(json.dumps(report, indent=2, default=str))
