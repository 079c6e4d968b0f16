"""One trial: configuration (``config``), the model and its post-training passes (``build``),
training and evaluation (``loop``), measurement (``measure``), resource limits (``limits``),
``run_trial`` (``runner``), ``omninet trial`` (``cli``) and what the sweep platform calls
(``runners``: the ``TrialRunner`` interface).

    from omninet.trial import run_trial, TrialConfig
    result = run_trial({"task": {"name": "listops"}, "train": {"steps": 200}})
"""

from omninet.paths import with_path as set_dotted
from omninet.trial.config import (SMALL_MODEL, STATUSES, HardwareConfig, MeasureConfig, ModelOverrides, TrainConfig,
                                  TrialConfig, TrialResult)
from omninet.trial.cli import trial_main
from omninet.trial.runner import estimate_memory_mb, run_trial
from omninet.trial.runners import FunctionRunner, OmniNetRunner, RunContext, TrialRunner, resolve_runner

__all__ = [
    "STATUSES", "SMALL_MODEL", "TrainConfig", "HardwareConfig", "MeasureConfig", "ModelOverrides", "TrialConfig",
    "TrialResult", "run_trial", "estimate_memory_mb", "set_dotted", "trial_main", "OmniNetRunner", "FunctionRunner",
    "RunContext", "TrialRunner", "resolve_runner",
]
