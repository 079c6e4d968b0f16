"""The sweep configuration: one YAML file, validated up front.

Every section is a keyword-only dataclass built on :class:`omninet.config.ConfigBase`, so an
unknown key, a wrong type or an impossible value raises ``SweepConfigError`` (a
``ValueError``) with one line naming the field and the fix, before anything is written or
started. Example (see ``sweeps/quickstart.yaml``)::

    name: quickstart
    trial:                       # base trial config (omninet.trial.TrialConfig dict, may be partial)
      task: {name: listops}
      train: {max_seconds: 8}
    search_space:                # parameters addressed by dotted trial-config paths
      model.attention.kernel: {choices: [sdpa, linformer]}
      model.attention.linformer.k: {low: 8, high: 64, log: true, when: {model.attention.kernel: linformer}}
    pools:
      - {name: cpu, resources: {CPU: 1}, trials: 6}
      - {name: gpu, resources: {GPU: 1}, trials: 6}
    constraints: {gpu: {max_memory_mb: 2048}}
    sampler: {kind: tpe, seed: 0}
    simulate_accelerators: true
"""

from __future__ import annotations

import importlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from omninet.config import ConfigBase
from omninet.hardware.table import ACCELERATOR_RESOURCES as ACCELERATORS  # Ray resources of the backends' one table
from omninet.paths import MISSING, get_path

__all__ = [
    "SweepConfigError",
    "ParamSpec",
    "ObjectiveSpec",
    "PoolConstraints",
    "PoolSpec",
    "BudgetSpec",
    "SamplerSpec",
    "StorageSpec",
    "SweepConfig",
    "RepeatSpec",
    "SchedulerSpec",
    "CostModelSpec",
    "load_config",
    "ACCELERATORS",
]

DEFAULT_TRIAL_FN = "omninet.trial:run_trial"
DEFAULT_ESTIMATE_FN = "omninet.trial:estimate_memory_mb"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class SweepConfigError(ValueError):
    """A sweep config that cannot run; the message is one actionable line."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise SweepConfigError(message)


def import_object(path: str, *, where: str) -> Callable[..., Any]:
    """Imports ``'package.module:attribute'``; a bad path is a config error."""
    _check(isinstance(path, str) and path.count(":") == 1,
           f"{where}: expected 'package.module:function', got {path!r}")
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError or an error inside the module
        raise SweepConfigError(f"{where}: cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    obj = getattr(module, attr, None)
    _check(callable(obj) or hasattr(obj, "run"), f"{where}: {module_name!r} has no callable or runner {attr!r}")
    return obj


@dataclass(kw_only=True)
class ParamSpec(ConfigBase):
    """One searched parameter. ``kind`` is inferred: ``choices`` -> categorical, integer
    ``low``/``high`` as written in the YAML (``8``, not ``8.0``) -> int, otherwise float. ``when`` makes it conditional: it is sampled only
    when every named (earlier) parameter or base-config path has one of the listed values."""

    path: str
    kind: Literal["float", "int", "categorical"] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    when: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        where = f"search_space.{self.path}"
        _check(bool(_PATH_RE.match(self.path)),
               f"search_space: {self.path!r} is not a dotted trial-config path such as 'model.attention.kernel'")
        if self.choices is not None:
            _check(self.low is None and self.high is None and not self.log and self.step is None,
                   f"{where}: give either choices or low/high, not both")
            _check(len(self.choices) >= 1, f"{where}: choices must not be empty")
            for c in self.choices:
                _check(c is None or isinstance(c, (bool, int, float, str)),
                       f"{where}: choices must be numbers, strings, booleans or null; got {c!r}")
            _check(self.kind in (None, "categorical"), f"{where}: choices imply kind 'categorical', not {self.kind!r}")
            self.kind = "categorical"
        else:
            _check(self.low is not None and self.high is not None,
                   f"{where}: give low and high (a range) or choices (a list); numbers like 1e-4 must be written 1.0e-4 in YAML")
            _check(self.low < self.high, f"{where}: low ({self.low}) must be < high ({self.high})")
            _check(not self.log or self.low > 0, f"{where}: a log range needs low > 0, got {self.low}")
            _check(not (self.log and self.step is not None), f"{where}: log and step cannot be combined")
            _check(self.step is None or self.step > 0, f"{where}: step must be > 0, got {self.step}")
            if self.kind is None:
                self.kind = "float"
            _check(self.kind != "categorical", f"{where}: kind 'categorical' needs choices")
            if self.kind == "int":
                for v in (self.low, self.high, self.step):
                    _check(v is None or float(v).is_integer(), f"{where}: kind 'int' needs integer bounds and step, got {v}")
        for key, allowed in self.when.items():
            _check(isinstance(key, str) and bool(_PATH_RE.match(key)),
                   f"{where}.when: {key!r} is not a dotted trial-config path")
            values = allowed if isinstance(allowed, list) else [allowed]
            _check(len(values) >= 1, f"{where}.when.{key}: list at least one value")
            self.when[key] = values

    def applies(self, values: dict[str, Any]) -> bool:
        """Whether the ``when`` clause holds for already-resolved path values."""
        return all(values.get(k) in allowed for k, allowed in self.when.items())

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take (an ``enqueue`` point's value)."""
        if self.kind == "categorical":
            return value in self.choices
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not self.low <= value <= self.high:
            return False
        return self.kind != "int" or float(value).is_integer()

    def describe(self) -> str:
        """The space in one phrase, for messages: ``choices [0.0, 0.25, 0.5]`` or ``range [1, 8] (int)``."""
        if self.kind == "categorical":
            return f"choices {self.choices}"
        return f"range [{self.low}, {self.high}]" + (" (int)" if self.kind == "int" else "")

    def suggest(self, trial: Any) -> Any:
        """Samples this parameter through Optuna's define-by-run API."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.path, self.choices)
        if self.kind == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(self.path, float(self.low), float(self.high), step=self.step, log=self.log)

    def arrow_type(self) -> str:
        """Column type in the Parquet table: 'int64', 'float64', 'bool' or 'string'."""
        if self.kind == "int":
            return "int64"
        if self.kind == "float":
            return "float64"
        kinds = {type(c) for c in self.choices if c is not None}
        if kinds == {bool}:
            return "bool"
        if kinds == {int}:
            return "int64"
        if kinds and kinds <= {int, float}:
            return "float64"
        return "string"


@dataclass(kw_only=True)
class ObjectiveSpec(ConfigBase):
    """An objective: a numeric key of the trial result and its direction."""

    key: str
    direction: Literal["maximize", "minimize"]


DEFAULT_OBJECTIVES = [
    {"key": "accuracy", "direction": "maximize"},
    {"key": "peak_memory_infer_mb", "direction": "minimize"},
    {"key": "latency_p50_ms", "direction": "minimize"},
]


@dataclass(kw_only=True)
class PoolConstraints(ConfigBase):
    """Per-pool feasibility limits. ``max_memory_mb`` bounds the trial's training peak
    (``peak_memory_train_mb``) and, before running, the trial runner's memory estimate;
    ``max_latency_ms`` bounds ``latency_p50_ms``; ``max_latency_ratio`` bounds
    ``latency_ratio_ref`` (the trial's latency over the pool's reference model, timed side by
    side: 1.0 = as fast as the reference). For decoders (the generation phase): ``max_prefill_ms``
    bounds ``prefill_ms_p50``, ``max_decode_ms`` ``decode_ms_p50`` (per token) and
    ``max_kv_cache_mb`` ``kv_cache_mb``. Infeasible trials never enter the Pareto front."""

    max_memory_mb: float | None = None
    max_latency_ms: float | None = None
    max_latency_ratio: float | None = None
    max_prefill_ms: float | None = None
    max_decode_ms: float | None = None
    max_kv_cache_mb: float | None = None

    # Each limit: its name as an Optuna constraint (the record's ``constraint_<name>`` column)
    # and the result column it bounds. The one place a limit meets its column.
    _BOUNDS = (("memory", "max_memory_mb", "peak_memory_train_mb"), ("latency", "max_latency_ms", "latency_p50_ms"),
               ("latency_ratio", "max_latency_ratio", "latency_ratio_ref"),
               ("prefill", "max_prefill_ms", "prefill_ms_p50"), ("decode", "max_decode_ms", "decode_ms_p50"),
               ("kv_cache", "max_kv_cache_mb", "kv_cache_mb"))

    def validate(self) -> None:
        for _, name, _ in self._BOUNDS:
            v = getattr(self, name)
            _check(v is None or v > 0, f"constraints.{name} must be > 0, got {v}")

    @classmethod
    def names(cls) -> list[str]:
        """The constraints' names ('memory', 'latency')."""
        return [name for name, _, _ in cls._BOUNDS]

    @classmethod
    def columns(cls) -> list[str]:
        """The result columns the limits bound ('peak_memory_train_mb', 'latency_p50_ms')."""
        return [column for _, _, column in cls._BOUNDS]

    def bounds(self) -> list[tuple[str, str, float | None]]:
        """(constraint name, result column, limit or None) per limit, memory first."""
        return [(name, column, getattr(self, attr)) for name, attr, column in self._BOUNDS]

    def limits(self) -> dict[str, float]:
        """{result column: limit} of the limits set: ``{'peak_memory_train_mb': max_memory_mb,
        'latency_p50_ms': max_latency_ms}``."""
        return {column: limit for _, column, limit in self.bounds() if limit}

    def excess(self, result: dict[str, Any]) -> dict[str, float | None]:
        """{constraint name: the result's value - its limit} (None where no limit is set; the
        value must be there and finite where one is)."""
        return {name: float(result[column]) - limit if limit else None for name, column, limit in self.bounds()}


@dataclass(kw_only=True)
class PoolSpec(ConfigBase):
    """A hardware pool: the Ray resources one trial holds (``{CPU: 1}``, ``{GPU: 1}``,
    ``{TPU: 1}``, ``{NPU: 1}`` or custom resources), how many trials run at once, the trial
    budget and how often Ray retries a trial whose worker or node died."""

    name: str
    resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    concurrency: int = 1
    trials: int | None = None
    max_retries: int = 2

    def validate(self) -> None:
        where = f"pools[{self.name}]"
        _check(bool(_NAME_RE.match(self.name)),
               f"pools: name {self.name!r} must be 1-64 letters, digits, '_', '-' or '.'")
        _check(len(self.resources) >= 1, f"{where}.resources: name at least one resource, e.g. {{CPU: 1}}")
        for key, amount in self.resources.items():
            _check(amount > 0, f"{where}.resources.{key} must be > 0, got {amount}")
            _check(key not in ("memory", "object_store_memory"),
                   f"{where}.resources: {key!r} is not a per-trial device; use constraints.{self.name}.max_memory_mb")
        accels = [k for k in self.resources if k in ACCELERATORS]
        _check(len(accels) <= 1, f"{where}.resources: one accelerator kind per pool, got {accels}")
        _check(self.concurrency >= 1, f"{where}.concurrency must be >= 1, got {self.concurrency}")
        _check(self.trials is None or self.trials >= 1, f"{where}.trials must be >= 1, got {self.trials}")
        _check(0 <= self.max_retries <= 10, f"{where}.max_retries must be in [0, 10], got {self.max_retries}")

    @property
    def accelerator(self) -> str | None:
        """'GPU', 'TPU', 'NPU' or None for a CPU pool."""
        return next((k for k in self.resources if k in ACCELERATORS), None)

    def ray_options(self) -> dict[str, Any]:
        """``.options(...)`` for the trial task: Ray's own accelerator resources."""
        opts: dict[str, Any] = {"num_cpus": self.resources.get("CPU", 1.0)}
        custom = {k: v for k, v in self.resources.items() if k not in ("CPU", "GPU")}
        if "GPU" in self.resources:
            opts["num_gpus"] = self.resources["GPU"]
        if custom:
            opts["resources"] = custom
        return opts


@dataclass(kw_only=True)
class BudgetSpec(ConfigBase):
    """``trials_per_pool`` applies to pools that set no ``trials``. After ``wall_clock_s``
    (per invocation) no new trial starts; running ones finish."""

    trials_per_pool: int = 12
    wall_clock_s: float | None = None

    def validate(self) -> None:
        _check(self.trials_per_pool >= 1, f"budget.trials_per_pool must be >= 1, got {self.trials_per_pool}")
        _check(self.wall_clock_s is None or self.wall_clock_s > 0,
               f"budget.wall_clock_s must be > 0 seconds, got {self.wall_clock_s}")


@dataclass(kw_only=True)
class SamplerSpec(ConfigBase):
    """Optuna sampler. Every kind is multi-objective and constraint-aware except ``random``
    (which ignores both, but the Pareto front still excludes infeasible trials)."""

    kind: Literal["tpe", "nsga2", "gp", "random"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int | None = None  # tpe, gp; Optuna's default (10) when null
    population_size: int | None = None  # nsga2; min(50, max(4, trials)) when null

    def validate(self) -> None:
        _check(self.n_startup_trials is None or self.n_startup_trials >= 0,
               f"sampler.n_startup_trials must be >= 0, got {self.n_startup_trials}")
        _check(self.n_startup_trials is None or self.kind in ("tpe", "gp"),
               f"sampler.n_startup_trials applies to tpe and gp, not {self.kind!r}")
        _check(self.population_size is None or self.population_size >= 2,
               f"sampler.population_size must be >= 2, got {self.population_size}")
        _check(self.population_size is None or self.kind == "nsga2",
               f"sampler.population_size applies to nsga2, not {self.kind!r}")


@dataclass(kw_only=True)
class StorageSpec(ConfigBase):
    """Where the records live; null means a SQLite file in the results directory (one machine).
    Shared by many drivers::

        storage:
          optuna_url: postgresql://omninet@postgres:5432/optuna   # Optuna's RDB storage (SQLAlchemy URL)
          mlflow_uri: http://mlflow:5000                          # an MLflow tracking server
          artifact_location: mlflow-artifacts:/omninet            # the sweep experiment's artifact root

    ``artifact_location``: null keeps artifacts in ``<results>/mlartifacts`` for a local MLflow
    store, and uses the server's ``--artifacts-destination`` for a tracking server.
    ``retry_s``: how long the controller keeps retrying a store that went away (a PostgreSQL
    restart) before it gives up; the sweep resumes on the next run either way."""

    optuna_url: str | None = None
    mlflow_uri: str | None = None
    artifact_location: str | None = None
    retry_s: float = 120.0

    def validate(self) -> None:
        _check(self.optuna_url is None or "://" in self.optuna_url,
               f"storage.optuna_url must be a database URL such as sqlite:////abs/optuna.db, got {self.optuna_url!r}")
        _check(self.mlflow_uri is None or bool(self.mlflow_uri.strip()), "storage.mlflow_uri must not be empty")
        _check(self.artifact_location is None or ":" in self.artifact_location,
               f"storage.artifact_location must be a URI such as s3://bucket/path, mlflow-artifacts:/path or "
               f"file:///abs/path, got {self.artifact_location!r}")
        _check(self.retry_s >= 0, f"storage.retry_s must be >= 0 seconds, got {self.retry_s}")


@dataclass(kw_only=True)
class RepeatSpec(ConfigBase):
    """Noise: after the main budget, every configuration on a pool's feasible Pareto front
    (``scope: pareto``) or every finished one (``all``) runs again until it has ``count``
    runs, each with another training seed (``train.seed + i``); ``top`` keeps the best few by
    the first objective. Results then aggregate mean
    and a 95% interval per objective, and ``recommend()`` ranks by the pessimistic bound.
    ``count: 1`` turns repeats off."""

    count: int = 1
    scope: Literal["pareto", "all"] = "pareto"
    top: int | None = None  # at most this many configurations per pool, best first objective first
    seed_path: str = "train.seed"

    def validate(self) -> None:
        _check(1 <= self.count <= 20, f"repeats.count must be in [1, 20] (1 = no repeats), got {self.count}")
        _check(self.top is None or self.top >= 1, f"repeats.top must be >= 1 (or null for all), got {self.top}")


@dataclass(kw_only=True)
class SchedulerSpec(ConfigBase):
    """How trials spend their training budget. ``fifo``: every trial trains to its budget and is
    measured after (what sweeps always did). ``mo_successive_halving``: a trial first measures
    its untrained model at the deployment shape and is ``screened`` (before any training) when it
    violates the pool's constraints or when ``screen_dominated_by`` finished trials are cheaper
    in every cost objective (by more than ``cost_margin``); then it trains with rungs at
    ``grace_period * reduction_factor**k`` steps, where it is ranked among the pool's trials at
    that rung by non-dominated sorting on (first objective, costs) with an epsilon-net
    tie-break (MOASHA), and only the top ``1/reduction_factor`` go on (the rest are ``pruned``,
    with a partial record). First objectives within ``noise_z`` standard errors of their
    difference (the trial reports the binomial standard error of its eval accuracy) tie at a
    rung and the costs decide; ``noise_z: 0`` ranks the raw values. Asynchronous: a trial is
    judged against whoever reached the rung before it; nothing waits. ``grace_period`` null: ``ceil(steps / reduction_factor**2)`` (two rungs
    below the full budget); the reduction factor 3 is Hyperband's and Syne Tune's MOASHA's."""

    kind: Literal["fifo", "mo_successive_halving"] = "fifo"
    grace_period: int | None = None
    reduction_factor: int = 3
    screen_dominated_by: int | None = 3  # null: screen on constraints only
    cost_margin: float = 0.05
    noise_z: float = 1.0
    remeasure: bool = False  # measure again after training (the measure-first figures are exact: see the runner)

    def validate(self) -> None:
        _check(self.grace_period is None or self.grace_period >= 1,
               f"scheduler.grace_period must be >= 1 training step (or null), got {self.grace_period}")
        _check(self.reduction_factor >= 2, f"scheduler.reduction_factor must be >= 2, got {self.reduction_factor}")
        _check(self.screen_dominated_by is None or self.screen_dominated_by >= 1,
               f"scheduler.screen_dominated_by must be >= 1 (or null to screen on constraints only), got "
               f"{self.screen_dominated_by}")
        _check(0.0 <= self.cost_margin < 1.0, f"scheduler.cost_margin must be in [0, 1), got {self.cost_margin}")
        _check(0.0 <= self.noise_z <= 5.0,
               f"scheduler.noise_z must be in [0, 5] standard errors (0: rank raw values), got {self.noise_z}")

    def rungs(self, max_steps: int) -> list[int]:
        """Rung levels in training steps below ``max_steps`` (the full budget is no rung)."""
        grace = self.grace_period or max(1, math.ceil(max_steps / self.reduction_factor**2))
        out, level = [], grace
        while level < max_steps:
            out.append(int(level))
            level *= self.reduction_factor
        return out


@dataclass(kw_only=True)
class CostModelSpec(ConfigBase):
    """A per-pool regression from configuration features and shape to latency and memory
    (``omninet.sweep.costmodel``), fitted online on the pool's measured trials. Every
    ``holdout_every``-th measured trial of a pool is held out (never fitted) and validates it.
    With ``screen: true`` a proposal predicted to violate the pool's constraints by more than
    ``screen_tolerance`` is ``screened`` without running, once ``min_fit`` trials are fitted;
    its prediction and the model's held-out error are recorded. ``seed_from``: a pool whose
    data predicts the other pools (times a learned per-pool scale) until they have their own."""

    enabled: bool = False
    screen: bool = True
    min_fit: int = 5
    holdout_every: int = 4
    screen_tolerance: float = 0.15
    seed_from: str | None = None

    def validate(self) -> None:
        _check(self.min_fit >= 2, f"cost_model.min_fit must be >= 2 fitted trials, got {self.min_fit}")
        _check(self.holdout_every >= 2, f"cost_model.holdout_every must be >= 2 (every n-th measured trial is held out), "
                                        f"got {self.holdout_every}")
        _check(0.0 <= self.screen_tolerance < 1.0,
               f"cost_model.screen_tolerance must be in [0, 1), got {self.screen_tolerance}")


@dataclass(kw_only=True)
class BaseSpec(ConfigBase):
    """The trained model every trial derives from (``omninet.passes``). One of ``hf``: your own
    pretrained model, a Hugging Face folder (config.json + safetensors) or a GGUF file, converted
    once into ``<results>/base`` (found there again on resume); ``checkpoint``: a
    ``save_pretrained`` folder or a kept trial model, checked against the task before any trial;
    or ``train``: the dense base (the sweep's first ``enqueue`` point) is trained once, at the
    task's length, with the trial's ``train`` section updated by these keys (e.g. ``{steps:
    3000}``), on ``pool`` (default: the first) with ``cpus`` cores (default: the pool's
    ``concurrency`` x CPU, all its slots: nothing else runs yet). It is kept in
    ``<results>/base`` (and logged to MLflow) and reused on resume."""

    checkpoint: str | None = None
    hf: str | None = None
    train: dict[str, Any] | None = None
    pool: str | None = None
    cpus: float | None = None

    def validate(self) -> None:
        _check(sum(x is not None for x in (self.checkpoint, self.hf, self.train)) == 1,
               "base: give exactly one of hf (a Hugging Face folder or .gguf file), checkpoint (a saved OmniNet "
               "folder) and train (e.g. {steps: 3000})")
        _check(self.cpus is None or self.cpus >= 1, f"base.cpus must be >= 1, got {self.cpus}")
        _check(self.train is None or isinstance(self.train, dict),
               "base.train must be a mapping of train keys such as {steps: 3000}")


@dataclass(kw_only=True)
class SweepConfig(ConfigBase):
    """A whole sweep. Build with :func:`load_config` (YAML path or dict)."""

    name: str
    results_dir: str | None = None
    trial: Any = field(default_factory=dict)  # the runner's typed trial config (omninet: TrialConfig)
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec.from_dict(o) for o in DEFAULT_OBJECTIVES])
    constraints: dict[str, PoolConstraints] = field(default_factory=dict)
    pools: list[PoolSpec] = field(default_factory=list)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    simulate_accelerators: bool = False
    allow_emulated: bool = False  # keep precisions a pool cannot run natively (trials tagged emulated)
    oversubscribe: bool = False  # allow more concurrent trial CPUs than a node has cores
    isolate_measurements: bool = True  # measurement phases exclusive per node, disjoint cores (off: for comparison)
    keep_models: Literal["all", "pareto", "none"] = "all"  # which ok trials keep their trained model
    register_models: bool = False  # also register kept models in MLflow's Model Registry as <sweep>.<pool>
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # {param path: value} runs first in every pool
    repeats: RepeatSpec = field(default_factory=RepeatSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    cost_model: CostModelSpec = field(default_factory=CostModelSpec)
    # Tune a trained model: every trial derives from one base by its passes and a short
    # fine-tune (``finetune``, the trial's section; given here it is merged into ``trial``).
    base: BaseSpec | None = None
    finetune: dict[str, Any] | None = None
    # The trial runner: a ``omninet.trial.TrialRunner`` object (``tune(config, runner=...)``) or,
    # in YAML, its import path ('package.module:name', a runner, runner class or function).
    trial_fn: Any = DEFAULT_TRIAL_FN
    estimate_fn: str | None = DEFAULT_ESTIMATE_FN
    progress_interval_s: float = 10.0

    def validate(self) -> None:
        _check(bool(_NAME_RE.match(self.name)),
               f"name: {self.name!r} must be 1-64 letters, digits, '_', '-' or '.' (it names the study and experiment)")
        _check(len(self.pools) >= 1, "pools: list at least one pool, e.g. [{name: cpu, resources: {CPU: 1}}]")
        names = [p.name for p in self.pools]
        _check(len(set(names)) == len(names), f"pools: names must be unique, got {names}")
        unknown = sorted(set(self.constraints) - set(names))
        _check(not unknown, f"constraints: unknown pool(s) {unknown}; pools are {names}")
        _check(len(self.objectives) >= 1, "objectives: list at least one {key, direction}")
        keys = [o.key for o in self.objectives]
        _check(len(set(keys)) == len(keys), f"objectives: keys must be unique, got {keys}")
        _check(self.progress_interval_s > 0, f"progress_interval_s must be > 0, got {self.progress_interval_s}")
        _check(isinstance(self.trial, (dict, ConfigBase)),
               "trial must be a mapping of sections such as {task: {name: listops}, train: {steps: 100}}")
        if isinstance(self.trial, dict):
            _check(isinstance(self.trial.get("task", {}), dict), "trial.task must be a mapping such as {name: listops}")
            if self.finetune is not None:  # top-level sugar for the trial's finetune section
                _check(isinstance(self.finetune, dict), "finetune must be a mapping such as {steps: 100, lr: 5.0e-4}")
                _check("finetune" not in self.trial, "finetune: given both at the top level and in trial; keep one")
                self.trial = {**self.trial, "finetune": dict(self.finetune)}
                self.finetune = None
        self._runner = None  # set by check()
        self._base_trial: dict[str, Any] | None = None
        # search space: typed specs in declared order
        self._params: list[ParamSpec] = []
        for path, spec in self.search_space.items():
            _check(isinstance(spec, dict), f"search_space.{path}: expected a mapping such as {{low: 0.1, high: 0.9}}")
            spec = dict(spec)
            if "kind" not in spec and "choices" not in spec:
                bounds = [spec.get(k) for k in ("low", "high")]
                integral = all(isinstance(v, int) and not isinstance(v, bool) for v in bounds)
                spec["kind"] = "int" if integral and isinstance(spec.get("step", 1), int) else "float"
            try:
                param = ParamSpec.from_dict({"path": path, **spec}, _where=f"search_space.{path}")
            except SweepConfigError:
                raise
            except ValueError as exc:
                hint = ""
                for key in ("low", "high", "step"):
                    if isinstance(spec.get(key), str):
                        hint = f" (YAML reads {spec[key]!r} as text: write it with a dot, e.g. 1.0e-4)"
                raise SweepConfigError(f"search_space.{path}: {_one_line(str(exc).replace('ParamSpec.', ''))}{hint}") from None
            self._params.append(param)

    def check(self, runner: Any = None) -> "SweepConfig":
        """The checks that need the trial runner or the task's data, run once, before anything
        is written: resolves the runner (``runner``, a ``TrialRunner`` object, replaces
        ``trial_fn``), parses the trial with it, and checks the search space's paths and values,
        the objectives, constraints, scheduler and base against it. Construction only parses (a
        finished sweep's ``SweepResult.load`` reads its config that way); ``load_config`` runs
        both. Returns the config; a second call does nothing."""
        if self._runner is not None:
            return self
        if runner is not None:
            self.trial_fn = runner
        self._runner = self._resolve_runner()
        try:
            self.trial = self._runner.parse(self.trial)
        except (ValueError, TypeError) as exc:
            self._runner = None
            raise SweepConfigError(f"trial: {_one_line(str(exc))}") from None
        try:
            self._check_against_runner()
        except Exception:
            self._runner = None  # not checked: a second check() runs every check again
            raise
        return self

    def _check_against_runner(self) -> None:
        base = self.base_trial
        seen: set[str] = set()  # `when` may name earlier params or paths set in the trial
        for param in self._params:
            try:
                self._runner.check_path(self.trial, param.path, where="search_space")
            except ValueError as exc:
                raise SweepConfigError(_one_line(str(exc))) from None
            for key in param.when:
                _check(key in seen or get_path(base, key) is not MISSING,
                       f"search_space.{param.path}.when: {key!r} is neither an earlier search-space parameter nor set in trial")
            seen.add(param.path)
        self._check_result_keys()
        self._check_values()
        self._check_enqueue()
        self._check_scheduler([p.name for p in self.pools])
        self._check_base([p.name for p in self.pools])

    def _check_base(self, pools: list[str]) -> None:
        """A base needs the omninet runner, a known pool, and (a checkpoint) a model this task's
        trials can derive from: one line before any trial."""
        if self.base is None:
            return
        _check(bool(self.enqueue), "base: enqueue the base's own configuration first (e.g. enqueue: [{model.attention.kernel: "
                                   "sdpa, prune.heads: 0.0}]): it is trained as the base and is each pool's "
                                   "reference run")
        _check(self.base.pool is None or self.base.pool in pools, f"base.pool: {self.base.pool!r} is not a pool; pools are {pools}")
        _check(self._runner.name == "omninet",
               "base: trials derived from a trained model need the omninet trial runner (trial_fn: omninet.trial:run_trial)")
        if self.base.checkpoint is not None or self.base.hf is not None:
            path = os.path.expanduser(self.base.checkpoint or self.base.hf)
            _check(os.path.exists(path), f"base: {path!r} does not exist; give the path of your model's folder "
                                         "(or .gguf file) on this machine")
            self.trial_config({"base": path})  # parses the trial with the base: check_base's one line on a mismatch
        else:
            try:  # only the train section is rebuilt (check_values): the trial itself was parsed once above
                self._runner.check_values(self.trial, {f"train.{k}": v for k, v in self.base.train.items()})
            except ValueError as exc:
                raise SweepConfigError(f"base.train: {_one_line(str(exc))}") from None

    def base_pool(self) -> "PoolSpec":
        name = (self.base.pool if self.base is not None else None) or self.pools[0].name
        return next(p for p in self.pools if p.name == name)

    def _check_enqueue(self) -> None:
        """Each ``enqueue`` point names search-space parameters with values inside their space:
        a misspelled key or an out-of-range value is refused here, before anything is written,
        not by Optuna once the study exists (or never: an out-of-range value is simply run)."""
        names = {p.path: p for p in self._params}
        for i, point in enumerate(self.enqueue):
            for key, value in point.items():
                _check(key in names, f"enqueue[{i}]: {key!r} is not a search-space parameter; parameters are {sorted(names)}")
                _check(names[key].contains(value),
                       f"enqueue[{i}].{key}: {value!r} is outside its search space ({names[key].describe()})")

    def _resolve_runner(self):
        """``trial_fn`` as a runner object: the one place its string form is resolved."""
        from omninet.trial.runners import resolve_runner

        fn = import_object(self.trial_fn, where="trial_fn") if isinstance(self.trial_fn, str) else self.trial_fn
        estimate = None
        if self.estimate_fn is not None and self.estimate_fn != DEFAULT_ESTIMATE_FN:
            estimate = import_object(self.estimate_fn, where="estimate_fn")
        try:
            return resolve_runner(fn, estimate)
        except ValueError as exc:
            raise SweepConfigError(str(exc)) from None

    def _check_result_keys(self) -> None:
        """Objective keys must be numbers the runner reports: a typo (``acuracy``) would
        otherwise end every trial of the sweep as ``error``."""
        fields = self._runner.result_fields
        if fields is None:
            return
        unmeasured = self._runner.unmeasured_keys(self.trial)  # key -> why
        for o in self.objectives:
            _check(o.key in fields, f"objectives: {o.key!r} is not a result of the trial runner; "
                                    f"choose from {', '.join(sorted(fields))}")
            _check(o.key not in unmeasured, f"objectives: {o.key!r} {unmeasured.get(o.key)}")
        for pool, limits in self.constraints.items():
            for name, column, limit in limits.bounds():
                _check(not limit or column not in unmeasured,
                       f"constraints.{pool}: the {name} limit bounds {column!r}, which {unmeasured.get(column)}")

    def _check_scheduler(self, pools: list[str]) -> None:
        """``mo_successive_halving`` needs a runner that measures first and reports rungs, a
        step budget, a rung below it, and cost objectives the runner measures before training."""
        cm = self.cost_model
        _check(cm.seed_from is None or cm.seed_from in pools,
               f"cost_model.seed_from: {cm.seed_from!r} is not a pool; pools are {pools}")
        if self.scheduler.kind == "fifo":
            return
        runner = self._runner
        where = "scheduler.kind: mo_successive_halving"
        _check(runner.supports_scheduler,
               f"{where} needs a trial runner that measures first and reports rungs; {self.runner_name} does not "
               "(use omninet.trial:run_trial, or kind: fifo)")
        steps = runner.max_steps(self.trial)
        _check(steps is not None, f"{where} needs a step budget: set trial.train.steps (rungs are training steps)")
        rungs = self.scheduler.rungs(steps)
        _check(bool(rungs), f"scheduler.grace_period {self.scheduler.grace_period} is not below the budget of {steps} "
                            f"steps; lower it so that at least one rung falls before the end")
        costs = set(runner.cost_keys)
        late = [o.key for o in self.objectives[1:] if o.key not in costs]
        _check(not late, f"{where}: objective(s) {late} are not measured before training; cost objectives must be "
                         f"among {', '.join(sorted(costs))}")

    def _check_values(self) -> None:
        """Every searched value at its range ends / choices makes a valid trial config, so an
        impossible value is reported now, not as N invalid trials later."""
        for param in self._params:
            when = {k: v[0] for k, v in param.when.items()}
            candidates = param.choices if param.kind == "categorical" else [param.low, param.high]
            for value in candidates:
                if param.kind == "int":
                    value = int(value)
                try:
                    self._runner.check_values(self.trial, {**when, param.path: value})
                except (ValueError, TypeError) as exc:
                    raise SweepConfigError(
                        f"search_space.{param.path}: value {value!r} makes an invalid trial config ({_one_line(str(exc))})"
                    ) from None

    @property
    def runner(self):
        """The trial runner object (validate / estimate / run), resolved once from ``trial_fn`` by ``check``."""
        _check(self._runner is not None, "SweepConfig: the trial runner is resolved by check(); "
                                         "build the config with load_config (which runs it) or call config.check()")
        return self._runner

    @property
    def runner_name(self) -> str:
        """``trial_fn`` as an import path (a runner object: its class's)."""
        if isinstance(self.trial_fn, str):
            return self.trial_fn
        named = self.trial_fn if callable(self.trial_fn) and hasattr(self.trial_fn, "__qualname__") else type(self.trial_fn)
        return f"{named.__module__}:{named.__qualname__}"

    @property
    def base_trial(self) -> dict[str, Any]:
        """The trial config as a plain dict (for ``when:`` paths and the repeat seed), built once."""
        if self._base_trial is None:
            self._base_trial = self.runner.to_dict(self.trial)
        return self._base_trial

    def to_plain(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe dict that :func:`load_config` reads back."""
        out = _plain({**self.to_dict(), "trial": None, "trial_fn": self.runner_name})
        out["trial"] = _plain(self.base_trial)
        return out

    @property
    def params(self) -> list[ParamSpec]:
        return self._params

    def pool(self, name: str) -> PoolSpec:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(f"no pool {name!r}; pools are {[p.name for p in self.pools]}")

    def trials_for(self, pool: PoolSpec) -> int:
        return pool.trials if pool.trials is not None else self.budget.trials_per_pool

    def constraints_for(self, pool: str) -> PoolConstraints:
        return self.constraints.get(pool) or PoolConstraints()

    def sample(self, trial: Any, params: list[ParamSpec] | None = None) -> dict[str, Any]:
        """Samples the search space (or a pool's version of it, ``params``) for an Optuna
        trial; returns {dotted path: value}."""
        values: dict[str, Any] = {}
        base = self.base_trial
        for param in self._params if params is None else params:
            resolved = {k: values.get(k, get_path(base, k)) for k in param.when}
            if param.applies(resolved):
                values[param.path] = param.suggest(trial)
        return values

    def trial_config(self, params: dict[str, Any]) -> Any:
        """The base trial config with ``params`` set at their dotted paths: a new config of the
        runner's type, parsed once (for the omninet runner, a validated ``TrialConfig``)."""
        try:
            return self.runner.with_values(self.trial, params)
        except SweepConfigError:
            raise
        except ValueError as exc:
            raise SweepConfigError(_one_line(str(exc))) from None

    def study_name(self, pool: str) -> str:
        return f"{self.name}.{pool}"


def _plain(value: Any) -> Any:
    if isinstance(value, ConfigBase):
        return _plain(value.to_dict())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resolve_results_dir(config: SweepConfig, override: str | os.PathLike | None = None) -> Path:
    """An absolute, stable results directory. Relative paths resolve against the directory
    the user ran the command from: ``$OMNINET_CWD`` if set, else the current directory, except
    inside a ``ray job submit`` driver (whose cwd is a temporary copy of the working dir), where
    they resolve against the home directory. The default is ``~/omninet-results/<name>``."""
    raw = override if override is not None else config.results_dir
    if raw is None:
        return (Path.home() / "omninet-results" / config.name).resolve()
    path = Path(os.path.expanduser(str(raw)))
    if path.is_absolute():
        return path.resolve()
    if os.environ.get("OMNINET_CWD"):
        base = Path(os.environ["OMNINET_CWD"])
    elif os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set by Ray's job supervisor for the driver
        base = Path.home()
    else:
        base = Path.cwd()
    return (base / path).resolve()


def load_config(source: str | os.PathLike | dict[str, Any] | SweepConfig, *, runner: Any = None,
                check: bool = True) -> SweepConfig:
    """Reads and validates a sweep config from a YAML path, a dict or a ``SweepConfig``: parses
    it, then (``check``) runs ``SweepConfig.check``, the checks that need the trial runner and
    the task. ``runner``: a ``TrialRunner`` object that replaces the config's ``trial_fn``.
    ``check=False`` only parses: no runner is imported and no task is built (reading a
    finished sweep's records)."""
    if isinstance(source, SweepConfig):
        if runner is None:
            return source.check() if check else source
        source = source.to_plain()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise SweepConfigError(f"config: no such file {str(path)!r}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SweepConfigError(f"config: {path} is not valid YAML ({' '.join(str(exc).split())})") from None
    else:
        data = source
    if not isinstance(data, dict):
        raise SweepConfigError("config: expected a mapping with at least 'name' and 'pools'")
    if "name" not in data:
        raise SweepConfigError("name: missing; every sweep needs a name (it names the study, experiment and results)")
    data = dict(data)
    if runner is not None:
        data["trial_fn"] = runner
    try:
        if "objectives" in data:
            _check(isinstance(data["objectives"], list), "objectives: expected a list of {key, direction}")
        if "pools" in data:
            _check(isinstance(data["pools"], list), "pools: expected a list of {name, resources, concurrency, trials}")
        config = SweepConfig.from_dict(data)
        return config.check() if check else config
    except SweepConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise SweepConfigError(_one_line(str(exc))) from None


def _one_line(message: str) -> str:
    message = " ".join(message.split())
    for cls_name, section in (("SweepConfig.", ""), ("SweepConfig:", "config:"), ("SamplerSpec", "sampler"),
                              ("BudgetSpec", "budget"), ("StorageSpec", "storage"), ("PoolSpec", "pools[]"),
                              ("PoolConstraints", "constraints"), ("ObjectiveSpec", "objectives[]"),
                              ("ParamSpec", "search_space"), ("SchedulerSpec", "scheduler"),
                              ("CostModelSpec", "cost_model")):
        message = message.replace(cls_name, section)
    return message
