"""Keep and serve a sweep's trained models.

* ``omninet.artifacts`` (re-exported here): a trial's model folder (safetensors + config +
  identity) and ``load_trial_model``; no Ray or MLflow needed to read one back.
* ``omninet.mlflow_model``: the folder as an MLflow ``pyfunc`` model (optionally registered).
* ``omninet.serve.app``: the Ray Serve deployment (``@serve.batch`` by length bucket) and HTTP API.
* ``omninet.serve.cli``: ``omninet serve RESULTS_DIR --pool POOL``.
"""

from omninet.artifacts import (KEEP_MODELS, TrainedModel, config_hash, keep_model, load_trial_model, model_subdir,
                               prune_models, save_trial_model, trial_identity)

__all__ = ["KEEP_MODELS", "TrainedModel", "config_hash", "keep_model", "load_trial_model", "model_subdir",
           "prune_models", "save_trial_model", "trial_identity"]
