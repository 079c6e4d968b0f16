"""The experimentation platform: Optuna multi-objective sweeps over hardware pools on Ray,
recorded in MLflow and Parquet. Entry points: ``python sweeps/run.py --config X.yaml``,
:func:`tune` / :func:`run_sweep`, and :meth:`SweepResult.load` to reopen results."""

from omninet.sweep.api import tune
from omninet.sweep.config import SweepConfig, SweepConfigError, load_config
from omninet.sweep.controller import SweepController, run_sweep
from omninet.sweep.results import SweepResult

__all__ = ["SweepConfig", "SweepConfigError", "SweepController", "SweepResult", "load_config", "run_sweep", "tune"]
