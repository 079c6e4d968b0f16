"""A small trained model for serving tests and the serving benchmark, without a sweep.

``quick_trained_model(trial_config)`` trains the trial config's model with the trial's own loop
(``omninet.trial.loop.train``: its optimizer, schedule, clipping and precision; deterministic on
CPU for a given config and seed), evaluates it with ``loop.evaluate`` and saves it with
``save_trial_model`` as a sweep would. It is ``omninet.trial.run_trial`` keeping its model, less
what serving tests do not need: no measurement phases, head pruning or derived passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from omninet.artifacts import save_trial_model, trial_identity
from omninet.model import OmniNetModel
from omninet.trial import TrialConfig, TrialResult, loop
from omninet.trial.measure import MeasureGate

__all__ = ["LISTOPS_SERVE_TRIAL", "quick_trained_model"]

# Quickstart-sized ListOps encoder whose positions reach 512 tokens (the serving target).
LISTOPS_SERVE_TRIAL: dict[str, Any] = {
    "task": {"name": "listops", "preset": "quickstart", "num_eval": 200},
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "ff_ratio": 2.0, "dropout": 0.0, "pooling": "mean",
              "attention": {"kernel": "sdpa"}},
    "train": {"steps": 300, "batch_size": 32, "lr": 0.002, "seed": 0},
    "hardware": {"device": "cpu", "precision": "fp32", "num_threads": 1},
    "measure": {"seq_length": 512, "allow_other_length": True},  # served at 512, trained on 20-100-token ListOps
}


def quick_trained_model(trial_config: dict[str, Any], out_dir: str | Path, *, sweep: str = "serve-test",
                        pool: str = "cpu", trial: int = 0) -> Path:
    """Trains, evaluates and saves; returns the model folder. ``metrics.json`` holds the eval
    metrics (``accuracy``, ``loss``, ...) of the in-memory model, before it was written."""
    cfg = TrialConfig.from_dict(trial_config)
    task, tc = cfg.task_obj, cfg.train
    plan = loop.resolve_plan(cfg.hardware)
    plan.buckets, plan.pad_id = cfg.buckets, task.pad_id
    torch.manual_seed(tc.seed)
    model = plan.placement.apply(OmniNetModel(cfg.model_config))
    res, gate = TrialResult(status="ok"), MeasureGate()  # res collects the step count; the gate isolates nothing
    loop.train(model, loop.make_optimizer(model, tc), task, tc, plan, res, gate)
    evaluation = loop.evaluate(model, task, tc, plan, gate)
    metrics = {**evaluation.metrics, "steps": res.steps, "majority_baseline": task.majority_baseline}
    identity = trial_identity(sweep=sweep, pool=pool, trial=trial, trial_config=trial_config)
    return save_trial_model(model, out_dir, trial_config=trial_config, identity=identity, metrics=metrics)
