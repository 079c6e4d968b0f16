"""A small trained model for serving tests and the serving benchmark, without a sweep.

``quick_trained_model(trial_config)`` trains the trial config's model for ``train.steps`` steps
(plain AdamW on the task's train batches, deterministic on CPU for a given config and seed),
evaluates it on the eval split and saves it with ``save_trial_model`` as a sweep would. It is a
stand-in for ``omninet.trial.run_trial`` keeping its model, not a replacement: no schedule,
pruning, precision or measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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
    ``accuracy`` and ``loss`` of the in-memory model, before it was written."""
    from omninet.model import OmniNetModel
    from omninet.serve.artifacts import save_trial_model, trial_identity
    from omninet.trial import TrialConfig

    cfg = TrialConfig.from_dict(trial_config)
    task, tc = cfg.task_obj, cfg.train
    torch.manual_seed(tc.seed)
    model = OmniNetModel(cfg.model_config)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
    model.train()
    steps, epoch = 0, 0
    while steps < (tc.steps or 0):
        for batch in task.batches("train", tc.batch_size, seed=tc.seed + epoch, drop_last=True):
            loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
            if steps >= tc.steps:
                break
        epoch += 1
    model.eval()
    meter = task.new_meter()
    with torch.no_grad():
        for batch in task.batches("eval", 64, shuffle=False):
            meter.update(model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
    metrics = {**meter.compute(), "steps": steps, "majority_baseline": task.majority_baseline}
    identity = trial_identity(sweep=sweep, pool=pool, trial=trial, trial_config=trial_config)
    return save_trial_model(model, out_dir, trial_config=trial_config, identity=identity, metrics=metrics)
