"""The sweep controller: Optuna ask-and-tell, one study per hardware pool, trials as Ray tasks.

Loop: keep every pool's ``concurrency`` trials in flight (``study.ask`` -> sample the search
space -> memory estimate -> Ray task with the pool's resources), ``ray.wait`` for the next
finished one, record it (Parquet -> Optuna ``tell`` -> MLflow), refill, log progress.

With ``scheduler.kind: mo_successive_halving`` every trial gets a rung client
(:mod:`omninet.sweep.scheduler`): it measures first, may be ``screened``, and reports its rungs
to one rung-book actor, which may stop it as ``pruned``; both are told to Optuna as PRUNED.
With ``cost_model.enabled`` each proposal is predicted before it is sent
(:mod:`omninet.sweep.costmodel`; screened unrun when predicted infeasible) and each measured
trial joins the model's fit or held-out split.

Faults, and why the controller owns them (Optuna's heartbeat does not cover ask-and-tell):
- worker or node death: Ray re-executes the task (``max_retries`` per pool) on any node with
  the pool's resources; after that the trial is recorded as ``crashed`` with Ray's reason.
- controller death: Optuna holds the dead controller's trials as RUNNING. On restart, a
  RUNNING trial with a Parquet row is told from the row; one without is re-run under the same
  trial number with the same parameters, so nothing is duplicated and the budget holds.
- MLflow down: see :class:`omninet.sweep.records.MlflowRecorder` (backfilled from Parquet).
- a second controller on the same sweep: refused by the sweep lock (:mod:`omninet.sweep.lock`),
  held for the whole run, before anything is written.
- Optuna's store down for a while (a PostgreSQL restart): every storage call and the records
  around it are retried with bounded backoff (:func:`omninet.sweep.storage.with_retry`); a tell
  is never repeated for a trial the store already holds as finished, and a trial created by an
  ask whose reply was lost is adopted, so nothing is recorded twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from omninet.sweep.config import SweepConfig, SweepConfigError, load_config, resolve_results_dir
from omninet.sweep.lock import ControllerId, SweepLock, sweep_lock
from omninet.sweep import record
from omninet.sweep.records import MlflowRecorder, ParquetStore, ScoreStore, params_key, tell_trial
from omninet.sweep.storage import optuna_storage, with_retry

__all__ = ["SweepController", "run_sweep"]

log = logging.getLogger("omninet.sweep")
FINISHED_STATES = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
MANIFEST = "sweep.yaml"


@dataclass
class _Running:
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
    reference: bool = False  # the base itself (no passes, no fine-tune): what every trial is paired against


@dataclass
class _PoolState:
    spec: Any
    study: optuna.Study
    budget: int
    created: int = 0
    requeue: list[FrozenTrial] = field(default_factory=list)
    inflight: dict[Any, _Running] = field(default_factory=dict)
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
    parked: dict[int, list[_Running]] = field(default_factory=dict)  # duplicates of a trial still running
    reference: int | None = None  # the trial every other is paired against (omninet.scores)
    reference_sent: bool = False  # a sweep with a base: the pool's reference run was dispatched
    reference_scores: Any = None  # the reference run's UnitScores, read once


def _make_sampler(config: SweepConfig, budget: int, pool_index: int = 0) -> optuna.samplers.BaseSampler:
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


class SweepController:
    """Runs (or resumes) one sweep. ``address``: a Ray cluster to join; None joins
    ``$RAY_ADDRESS`` if set, else starts an embedded local Ray with ``num_cpus`` CPUs and, when
    ``simulate_accelerators``, the pools' accelerator resources declared on it."""

    def __init__(self, config: SweepConfig | str | os.PathLike | dict, *, results_dir: str | os.PathLike | None = None,
                 address: str | None = None, num_cpus: int | None = None) -> None:
        self.config = load_config(config)
        self.results_dir = resolve_results_dir(self.config, results_dir)
        if self.results_dir.exists() and not self.results_dir.is_dir():
            raise SweepConfigError(f"results_dir: {self.results_dir} exists and is not a directory")
        self._check_manifest()
        self.address = address
        self.num_cpus = num_cpus
        self._owns_ray = False
        self._remote = None
        self._pools: dict[str, _PoolState] = {}
        self._simulated: dict[str, bool] = {}
        self._probes: dict[str, dict[str, Any]] = {}
        self._pool_params: dict[str, list] = {}
        self._started = time.monotonic()
        self._last_progress = 0.0
        self._book = None  # the rung book actor (scheduler mo_successive_halving)
        self.cost_model = None
        if self.config.cost_model.enabled:
            from omninet.sweep.costmodel import CostModel

            self.cost_model = CostModel(self.config.cost_model, [p.name for p in self.config.pools])
        self.identity = ControllerId()
        self.lock: SweepLock | None = None
        self._gate = contextlib.nullcontext  # DriverGate.shared once Ray runs (isolate_measurements)
        self._base_path: Path | None = None  # the trained base every trial derives from (config.base)

    # -- paths and storage ------------------------------------------------------------------
    @property
    def optuna_url(self) -> str:
        return self.config.storage.optuna_url or f"sqlite:///{self.results_dir / 'optuna.db'}"

    @property
    def mlflow_uri(self) -> str:
        return self.config.storage.mlflow_uri or f"sqlite:///{self.results_dir / 'mlflow.db'}"

    def _check_manifest(self) -> None:
        """A results directory belongs to one sweep: resuming with another search space or
        other objectives would mix incomparable trials."""
        path = self.results_dir / MANIFEST
        if not path.is_file():
            return
        old = yaml.safe_load(path.read_text()) or {}
        new = self.config.to_plain()
        try:  # compare as parsed: a manifest written by an older version states the same trial differently
            old["trial"] = load_config({**old, "pools": new["pools"], "constraints": {}}).to_plain()["trial"]
        except (SweepConfigError, ValueError, TypeError) as exc:
            raise SweepConfigError(f"results_dir: {self.results_dir} holds a sweep.yaml this version cannot read "
                                   f"({exc}); use another results_dir") from None
        for key in ("name", "search_space", "objectives", "trial"):
            if old.get(key) != new.get(key):
                raise SweepConfigError(
                    f"results_dir: {self.results_dir} holds sweep results with a different {key!r}; "
                    "use another results_dir (or sweep name) for a different sweep")

    # -- Ray --------------------------------------------------------------------------------
    def _start_ray(self) -> None:
        import ray

        from omninet.sweep.worker import execute_trial, probe

        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS")
            if address:
                ray.init(address=address, log_to_driver=True)
                log.info("connected to Ray cluster at %s", address)
            else:
                ray.init(**self._embedded_args())
                log.info("started an embedded local Ray: %s", _fmt_resources(ray.cluster_resources()))
            self._owns_ray = True
        self._remote = ray.remote(execute_trial)
        self._probe_pools(ray.remote(probe), embedded=not (self.address or os.environ.get("RAY_ADDRESS")))
        if self.config.scheduler.kind == "mo_successive_halving":
            from omninet.sweep.scheduler import RungBook

            # owned by this driver: it goes when the controller goes, and a resumed one rebuilds it from Parquet
            self._book = ray.remote(RungBook).options(num_cpus=0, max_concurrency=1).remote(self._rules())

    def _embedded_args(self) -> dict[str, Any]:
        cfg = self.config
        cpus = sum(p.concurrency * p.resources.get("CPU", 1.0) for p in cfg.pools)
        args: dict[str, Any] = {
            "address": "local",  # a new embedded instance, never a cluster left in /tmp/ray
            "num_cpus": self.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus)),
            "include_dashboard": False, "log_to_driver": True, "_node_ip_address": "127.0.0.1",
        }
        if cfg.simulate_accelerators:  # declare the pools' accelerators so Ray can schedule them
            need: dict[str, float] = {}
            for p in cfg.pools:
                for key, amount in p.resources.items():
                    if key != "CPU":
                        need[key] = need.get(key, 0.0) + amount * p.concurrency
            if "GPU" in need:
                args["num_gpus"] = math.ceil(need.pop("GPU"))
            if need:
                args["resources"] = need
        return args

    def _probe_pools(self, remote_probe, *, embedded: bool) -> None:
        """Fails fast, before anything is written, when a pool cannot run: its resources are
        missing from the cluster, or its accelerator is not physically present and the
        config does not ask to simulate it."""
        import ray

        have = ray.cluster_resources()
        refs = {}
        for p in self.config.pools:
            missing = {k: v for k, v in p.resources.items() if have.get(k, 0.0) < v}
            if missing and embedded:
                hint = ("set simulate_accelerators: true to simulate it on CPU" if p.accelerator
                        else "start Ray with these custom resources or pass --address of a cluster that has them")
                raise SweepConfigError(f"pools[{p.name}]: no node offers {missing} (cluster has "
                                       f"{_fmt_resources(have)}); {hint}")
            if missing:
                log.warning("pool %s: no node offers %s yet; waiting for one (autoscaler?)", p.name, missing)
            refs[p.name] = remote_probe.options(**p.ray_options(), max_retries=1).remote(
                p.accelerator, threads=max(1, int(p.resources.get("CPU", 1))))
        for name, ref in refs.items():
            pool = self.config.pool(name)
            try:
                info = ray.get(ref, timeout=600)
            except ray.exceptions.GetTimeoutError:
                raise SweepConfigError(f"pools[{name}]: no node with {pool.resources} appeared within 600 s") from None
            self._simulated[name] = not info["present"]
            if not info["present"] and not self.config.simulate_accelerators:
                raise SweepConfigError(
                    f"pools[{name}]: needs a {pool.accelerator} but node {info['node']} has none ({info['detail']}); "
                    "run on a node with one, or set simulate_accelerators: true to run it on CPU (tagged simulated)")
            self._probes[name] = self._keep_reference(name, info)
            self._pool_params[name] = self._space_for(pool, info)
        self._check_cores(embedded)

    def _keep_reference(self, name: str, info: dict[str, Any]) -> dict[str, Any]:
        """A resumed sweep keeps the pool's first reference speed (probe.json), so every trial
        of the pool, before and after the resume, has its normalized latency on one scale."""
        try:
            earlier = json.loads((self.results_dir / "probe.json").read_text()).get(name, {})
        except (OSError, ValueError):
            earlier = {}
        if earlier.get("calibration_ms"):
            info = {**info, "calibration_ms_now": info.get("calibration_ms"), "calibration_ms": earlier["calibration_ms"]}
        return info

    def _check_cores(self, embedded: bool) -> None:
        """Concurrent trials get disjoint cores: a pool (or, on one embedded node, all pools)
        asking for more trial CPUs at once than a node has physical cores is refused."""
        if self.config.oversubscribe:
            return
        for p in self.config.pools:
            cores = self._probes[p.name].get("physical_cores") or 1
            want = p.concurrency * max(1, math.ceil(p.resources.get("CPU", 1.0)))
            if want > cores:
                raise SweepConfigError(
                    f"pools[{p.name}]: concurrency {p.concurrency} x {p.resources.get('CPU', 1.0):g} CPU needs {want} cores "
                    f"but node {self._probes[p.name]['node']} has {cores}; lower concurrency or set oversubscribe: true "
                    "(measurements then share cores)")
        if embedded:
            cores = min(info.get("physical_cores") or 1 for info in self._probes.values())
            want = sum(p.concurrency * max(1, math.ceil(p.resources.get("CPU", 1.0))) for p in self.config.pools)
            if want > cores:
                raise SweepConfigError(
                    f"pools: together {want} concurrent trial CPUs on this machine's {cores} cores; lower the pools' "
                    "concurrency or set oversubscribe: true (measurements then share cores)")

    def _space_for(self, pool, info: dict[str, Any]) -> list:
        """The search space this pool's hardware can run: precision choices the probed device
        has no native support for are removed (``allow_emulated: true`` keeps them), and a
        Linformer rank above the measured length is clipped, each with one log line and a
        record in ``<results>/probe.json``."""
        import dataclasses

        caps = info.get("capabilities") or {}
        native = caps.get("native_precisions")
        refused = caps.get("refused") or {}
        seq = self.config.runner.seq_length(self.config.trial)
        out, notes = [], []
        for param in self.config.params:
            if param.path == "hardware.precision" and native is not None and not self.config.allow_emulated:
                keep = [c for c in param.choices if c in native or c == "auto"]
                dropped = [c for c in param.choices if c not in keep]
                if dropped:
                    reasons = "; ".join(f"{c}: {refused.get(c, 'not native here')}" for c in dropped)
                    notes.append(f"removed hardware.precision {dropped} ({reasons})")
                if not keep:
                    raise SweepConfigError(f"pools[{pool.name}]: no hardware.precision choice runs natively on "
                                           f"{caps.get('device_name')} ({reasons}); add fp32 or set allow_emulated: true")
                param = dataclasses.replace(param, choices=keep) if dropped else param
            if seq:  # each kernel's own rule at the measured length (Linformer: k <= N)
                from omninet.attention.registry import fit_search_param

                try:
                    param, fitted = fit_search_param(param, seq)
                except ValueError as exc:
                    raise SweepConfigError(f"search_space.{param.path}: {exc}") from None
                notes += fitted
            out.append(param)
        for note in notes:
            log.info("pool %s: %s", pool.name, note)
        info["search_space_notes"] = notes
        return out

    # -- scheduler and cost model ---------------------------------------------------------------
    def _rules(self) -> dict[str, Any]:
        from omninet.sweep.scheduler import PoolRules

        spec, first = self.config.scheduler, self.config.objectives[0]
        steps = self.config.runner.max_steps(self.config.trial)
        out = {}
        for p in self.config.pools:
            out[p.name] = PoolRules(rungs=spec.rungs(steps), reduction_factor=spec.reduction_factor,
                                    maximize=first.direction == "maximize",
                                    cost_keys=[o.key for o in self.config.objectives[1:]],
                                    limits=self.config.constraints_for(p.name).limits(),
                                    screen_dominated_by=spec.screen_dominated_by, cost_margin=spec.cost_margin,
                                    noise_z=spec.noise_z)
        return out

    def _scheduler_for(self, ps: _PoolState, run: _Running):
        """The trial's rung client, or None (fifo; repeats always train to the budget)."""
        if self._book is None or run.repeat_of is not None:
            return None
        from omninet.sweep.scheduler import RungClient

        spec = self.config.scheduler
        return RungClient(self._book, ps.spec.name, run.number, spec.rungs(self.config.runner.max_steps(run.trial_config)),
                          remeasure=spec.remeasure, limits=self.config.constraints_for(ps.spec.name).limits())

    def _features(self, params: dict[str, Any], trial_config: Any) -> dict[str, dict[str, float]]:
        from omninet.sweep.costmodel import param_features

        return self.config.runner.cost_features(trial_config) or param_features(params)

    def _restore(self, pool: str, rows: dict[tuple[str, int], dict[str, Any]]) -> None:
        """A resumed controller's rung book and cost model, from the pool's Parquet rows."""
        import ray

        records = trials = 0
        for (p, number), row in sorted(rows.items()):
            if p != pool:
                continue
            result = json.loads(row.get("result_json") or "{}")
            if self._book is not None and row.get("repeat_of") is None:
                steps = result.get("rung_steps") or []
                ray.get(self._book.restore.remote(pool, number, row, steps, result.get("rung_accuracy") or [],
                                                  result.get("rung_noise")))
                records, trials = records + len(steps), trials + 1
            if self.cost_model is not None and row.get("screened_by") != "cost_model" and row.get("cost_split"):
                config = self.config.runner.parse(json.loads(row["config_json"]))
                params = {k[len("param."):]: v for k, v in row.items() if k.startswith("param.") and v is not None}
                self.cost_model.observe(pool, number, self._features(params, config), row, split=row["cost_split"])
        if self._book is not None and trials:
            log.info("pool %s: rung book restored from Parquet: %d rung record(s) of %d trial(s)", pool, records, trials)

    def _predict(self, ps: _PoolState, run: _Running) -> dict[str, Any] | None:
        """The cost model's prediction for a proposal, with the model's held-out error then."""
        if self.cost_model is None or run.repeat_of is not None:
            return None
        try:
            features = self._features(run.params, run.trial_config)
        except Exception as exc:  # noqa: BLE001 -- a config the features cannot describe is run, not screened
            log.debug("cost features failed: %s", exc)
            return None
        pred = self.cost_model.predict(ps.spec.name, features)
        if pred is None:
            return None
        errors = self.cost_model.validation(ps.spec.name)
        pred["mape"] = {t: v["mape"] for t, v in errors.items()}
        return pred

    def _screen_by_prediction(self, ps: _PoolState, run: _Running) -> str | None:
        """Why the prediction says the proposal is infeasible (beyond the tolerance), or None."""
        pred, spec = run.prediction, self.config.cost_model
        if pred is None or not spec.screen or not pred.get("trusted"):
            return None
        for key, limit in self.config.constraints_for(ps.spec.name).limits().items():
            value = pred.get(key)
            if value is not None and value * (1.0 - spec.screen_tolerance) > limit:
                mape = pred["mape"].get(key)
                return (f"screened by the cost model: predicted {key} {value:.4g} > the pool's limit {limit:.4g} by more "
                        f"than {spec.screen_tolerance:.0%} ({pred['source']} model on {pred['fit_trials']} trials, held-out "
                        f"MAPE {'n/a' if mape is None else f'{mape:.1%}'}); not run")
        return None

    def _write_cost_model(self) -> None:
        if self.cost_model is None:
            return
        report = {p: {"validation": self.cost_model.validation(p),
                      "fit_trials": [s.trial for s in self.cost_model.fit_split(p)],
                      "holdout_trials": [s.trial for s in self.cost_model.holdout_split(p)],
                      "seed_from": self.config.cost_model.seed_from,
                      "scale": self.cost_model.scale(p) if self.config.cost_model.seed_from not in (None, p) else None}
                  for p in self.cost_model.pools}
        (self.results_dir / "cost_model.json").write_text(json.dumps(report, indent=2, default=str))

    # -- studies and resume -------------------------------------------------------------------
    def _open(self) -> None:
        cfg = self.config
        self.results_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            # A `ray job submit` driver starts in a temporary copy of the working dir, which Ray's
            # runtime-env agent may delete and re-extract while trial tasks start; later
            # os.getcwd() calls (MLflow's store resolves paths with it) would then fail.
            os.chdir(self.results_dir)
        manifest = cfg.to_plain()
        (self.results_dir / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
        self.store = ParquetStore(self.results_dir / "trials", cfg)
        self.scores = ScoreStore(self.results_dir / "scores")
        local_mlflow = self.mlflow_uri.startswith("sqlite:") or "://" not in self.mlflow_uri
        artifacts = cfg.storage.artifact_location or ((self.results_dir / "mlartifacts").as_uri() if local_mlflow else None)
        self.mlflow = MlflowRecorder(self.mlflow_uri, cfg, artifacts, controller=self.identity,
                                     is_live=self.lock.is_live if self.lock else None)
        rows = self.store.rows()
        storage = optuna_storage(self.optuna_url)
        for p in cfg.pools:
            budget = cfg.trials_for(p)
            study = self._retry(lambda: self._open_study(storage, p, budget), f"opening study {cfg.study_name(p.name)!r}")
            ps = _PoolState(spec=p, study=study, budget=budget, params=self._pool_params.get(p.name, cfg.params))
            self._pools[p.name] = ps
            repaired = 0
            trials = self._retry(lambda: study.get_trials(deepcopy=False), "reading trials")
            if not trials:
                names = {q.path for q in ps.params}
                for point in cfg.enqueue:  # e.g. the dense baseline, so every sweep shows what the knobs buy
                    point = {k: v for k, v in point.items() if k in names}
                    if all(v in q.choices for q in ps.params if q.kind == "categorical" and q.path in point
                           for v in [point[q.path]]):
                        study.enqueue_trial(point, skip_if_exists=True)
            for t in trials:
                if t.state == TrialState.RUNNING:
                    row = rows.get((p.name, t.number))
                    if row is not None:  # finished and written, not yet told when the controller died
                        self._tell(ps, t._trial_id, row)  # FrozenTrial._trial_id: Optuna's own handle
                        self._count(ps, row)
                        repaired += 1
                    else:
                        ps.requeue.append(t)
                elif t.state in FINISHED_STATES:
                    self._count(ps, rows.get((p.name, t.number)), t)
            self._restore(p.name, rows)
            for (pool, number), row in sorted(rows.items()):
                if pool != p.name:
                    continue
                if row.get("seed_key") and row.get("status") != "duplicate":
                    ps.seed_keys.setdefault(row["seed_key"], number)
                if row.get("role") == "reference":
                    ps.reference = number
            ps.created = sum(1 for t in study.get_trials(deepcopy=False)
                             if t.state != TrialState.WAITING and "repeat_of" not in t.user_attrs)
            if ps.created:
                log.info("pool %s: resuming study %r: %d finished, %d requeued from a previous controller%s",
                         p.name, study.study_name, ps.done + ps.failed + ps.infeasible + ps.screened + ps.pruned + ps.duplicates,
                         len(ps.requeue),
                         f", {repaired} repaired from Parquet" if repaired else "")
        (self.results_dir / "probe.json").write_text(json.dumps(self._probes, indent=2, default=str))
        backfilled = self.mlflow.sync((pool, row) for (pool, _), row in sorted(rows.items()))
        if backfilled:
            log.info("MLflow: backfilled %d trial(s) recorded while it was unavailable", backfilled)

    def _open_study(self, storage, p, budget: int) -> optuna.Study:
        cfg = self.config
        index = [q.name for q in cfg.pools].index(p.name)
        study = optuna.create_study(storage=storage, study_name=cfg.study_name(p.name),
                                    sampler=_make_sampler(cfg, budget, index), directions=[o.direction for o in cfg.objectives],
                                    load_if_exists=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([o.key for o in cfg.objectives])
        study.set_user_attr("pool", p.name)
        study.set_user_attr("resources", p.resources)
        study.set_user_attr("simulate_accelerators", cfg.simulate_accelerators)
        study.set_user_attr("probe", self._probes.get(p.name, {}))
        return study

    def _retry(self, fn, what: str, on_retry=None):
        """A storage call, retried while the store is away (at most ``storage.retry_s``)."""
        return with_retry(fn, what=what, budget_s=self.config.storage.retry_s, on_retry=on_retry)

    def _adopt_orphans(self, ps: _PoolState, keep: int | None = None) -> None:
        """After an ask that failed and was retried: its first attempt may have created a trial
        whose reply was lost. The sweep lock makes every RUNNING trial ours, so one that is neither
        in flight nor queued is such an orphan: it is run (and counted) instead of lost."""
        known = {r.trial_id for r in ps.inflight.values()} | {t._trial_id for t in ps.requeue} | {keep}
        for t in self._retry(lambda: ps.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)), "reading trials"):
            if t._trial_id not in known:
                log.info("pool %s: trial #%d was created by an ask whose reply was lost; running it", ps.spec.name,
                         t.number)
                ps.requeue.append(t)
                ps.created += 0 if "repeat_of" in t.user_attrs else 1

    def _count(self, ps: _PoolState, row: dict[str, Any] | None, frozen: FrozenTrial | None = None) -> None:
        status = (row or {}).get("status") or (frozen.user_attrs.get("status") if frozen else None) or "error"
        if (row or {}).get("repeat_of") is not None or (frozen is not None and "repeat_of" in frozen.user_attrs):
            ps.repeat_runs += 1
        if status == "ok":
            ps.done += 1
            if row and row.get("duration_s"):
                ps.durations.append(float(row["duration_s"]))
            obj = self.config.objectives[0]
            value = row.get(obj.key) if row else None
            if value is not None and row.get("feasible"):
                score = value if obj.direction == "maximize" else -value
                if ps.best is None or score > ps.best[0]:
                    ps.best = (score, int(row["trial_number"]))
        elif status == "infeasible":
            ps.infeasible += 1
        elif status == "screened":
            ps.screened += 1
        elif status == "duplicate":
            ps.duplicates += 1
        elif status == "pruned":
            ps.pruned += 1
            if row and row.get("duration_s"):
                ps.durations.append(float(row["duration_s"]))
        else:
            ps.failed += 1
            if row and row.get("duration_s"):
                ps.durations.append(float(row["duration_s"]))

    # -- dispatch ---------------------------------------------------------------------------
    def _out_of_time(self) -> bool:
        limit = self.config.budget.wall_clock_s
        return limit is not None and time.monotonic() - self._started > limit

    def _next(self, ps: _PoolState) -> _Running | None:
        repeat_of, index = None, 0
        if ps.requeue:
            t = ps.requeue.pop(0)
            number, trial_id, params = t.number, t._trial_id, dict(t.params)
            if not params:  # asked, then the controller died (or the ask's reply was lost) before sampling
                trial = optuna.trial.Trial(ps.study, trial_id)
                params = self._retry(lambda: self.config.sample(trial, ps.params), f"pool {ps.spec.name}: sampling")
            repeat_of, index = t.user_attrs.get("repeat_of"), int(t.user_attrs.get("repeat_index", 0))
        elif ps.created < ps.budget:
            retried: list[bool] = []
            trial = self._retry(ps.study.ask, f"pool {ps.spec.name}: asking for a trial", on_retry=lambda: retried.append(True))
            ps.created += 1
            if retried:
                self._adopt_orphans(ps, keep=trial._trial_id)
            number, trial_id = trial.number, trial._trial_id
            params = self._retry(lambda: self.config.sample(trial, ps.params), f"pool {ps.spec.name}: sampling")
        elif self._plan_repeats(ps):
            params, repeat_of, index = ps.repeats.pop(0)
            ps.study.enqueue_trial(params, user_attrs={"repeat_of": repeat_of, "repeat_index": index})
            trial = ps.study.ask()
            number, trial_id = trial.number, trial._trial_id
            params = self.config.sample(trial, ps.params)
        else:
            return None
        values = dict(params)
        reference = False
        if self._base_path is not None:
            values["base"] = str(self._base_path)
            if not ps.reference_sent and ps.reference is None and repeat_of is None and self._matches_reference(ps, params):
                ps.reference_sent = reference = True
                values["finetune.steps"] = 0  # the base as it is: evaluated and measured on this pool
        seed = self._base_seed()
        if repeat_of is not None:  # the same configuration, another training seed
            seed = (seed if isinstance(seed, int) else 0) + index
            values[self.config.repeats.seed_path] = seed
        run = _Running(ps.spec.name, number, trial_id, params, self.config.trial_config(values), repeat_of=repeat_of)
        run.reference = reference
        run.seed_key = params_key({**params, self.config.repeats.seed_path: seed, **({"role": "reference"} if reference else {})})
        first = ps.seed_keys.get(run.seed_key)
        if first is not None and first != number:
            run.duplicate_of = first
        else:
            ps.seed_keys[run.seed_key] = number
        return run

    def _base_seed(self) -> Any:
        """The training seed of the trial config (None when the seed itself is searched)."""
        from omninet.paths import get_path

        path = self.config.repeats.seed_path
        return None if path in {q.path for q in self.config.params} else get_path(self.config.base_trial, path)

    def _plan_repeats(self, ps: _PoolState) -> bool:
        """After the pool's main budget: queue the runs that bring each configuration of the
        feasible Pareto front (or every finished one) to ``repeats.count`` runs."""
        spec = self.config.repeats
        if spec.count <= 1:
            return False
        if not ps.repeats_planned:
            if ps.inflight or ps.requeue:
                return False  # the front is not final while main-budget trials still run
            ps.repeats_planned = True
            trials = [t for t in ps.study.get_trials(deepcopy=False) if t.state in FINISHED_STATES]
            if spec.scope == "pareto":
                chosen = [t for t in ps.study.best_trials if "repeat_of" not in t.user_attrs
                          and "duplicate_of" not in t.user_attrs and "role" not in t.user_attrs]
            else:
                chosen = [t for t in trials if t.state == TrialState.COMPLETE and "repeat_of" not in t.user_attrs
                          and "duplicate_of" not in t.user_attrs and "role" not in t.user_attrs]
            first = self.config.objectives[0]
            chosen = sorted(chosen, key=lambda t: t.values[0], reverse=first.direction == "maximize")[:spec.top]
            runs: dict[str, int] = {}
            for t in trials + [t for t in ps.study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]:
                if "duplicate_of" in t.user_attrs or "role" in t.user_attrs:  # not a run of a searched configuration
                    continue
                key = params_key(t.params)
                runs[key] = runs.get(key, 0) + 1
            for t in sorted(chosen, key=lambda t: t.number):
                have = runs.get(params_key(t.params), 1)
                for index in range(have, spec.count):
                    ps.repeats.append((dict(t.params), t.number, index))
            if ps.repeats:
                log.info("pool %s: %d repeat run(s) for %d configuration(s) (noise: %d runs each)", ps.spec.name,
                         len(ps.repeats), len({r[1] for r in ps.repeats}), spec.count)
        return bool(ps.repeats)

    def _fill(self, ps: _PoolState) -> None:
        import ray

        limits = self.config.constraints_for(ps.spec.name)
        while len(ps.inflight) < ps.spec.concurrency and not self._out_of_time():
            run = self._next(ps)
            if run is None:
                return
            if run.duplicate_of is not None:
                self._duplicate(ps, run)
                continue
            run.prediction = self._predict(ps, run)
            reason = self._screen_by_prediction(ps, run)
            if reason is not None:  # the record keeps the prediction and the model's held-out error
                self._finish(ps, run, {"status": "screened", "screened_by": "cost_model", "error": reason})
                continue
            opts = {**ps.spec.ray_options(), "max_retries": ps.spec.max_retries, "retry_exceptions": False,
                    "name": f"trial {ps.spec.name}#{run.number}"}
            task = self._task(ps.spec, run.trial_config, run.number, memory_budget_mb=limits.max_memory_mb,
                              scheduler=self._scheduler_for(ps, run))
            ps.inflight[self._remote.options(**opts).remote(task)] = run

    def _task(self, pool, trial_config: Any, name: Any, **how: Any):
        """The worker's :class:`~omninet.sweep.worker.TrialTask` for one run on ``pool``."""
        from omninet.sweep.worker import TrialTask

        how = {"num_cpus": pool.resources.get("CPU", 1.0), "keep_model": self.config.keep_models != "none", **how}
        return TrialTask(runner=self.config.runner, config=trial_config, pool=pool.name,
                         key=f"{self.config.name}/{pool.name}/{name}", accelerator=pool.accelerator,
                         simulate=self.config.simulate_accelerators, isolate=self.config.isolate_measurements,
                         calibration_ref_ms=self._probes.get(pool.name, {}).get("calibration_ms"), **how)

    def _duplicate(self, ps: _PoolState, run: _Running) -> None:
        """A proposal equal to an earlier trial (parameters and seed): not trained again. It is
        recorded as 'duplicate' with that trial's outcome (Optuna's pattern for repeated
        parameters), and counts against the budget only as a proposal. When the earlier trial is
        still running, the duplicate waits for it."""
        original = ps.seed_keys[run.seed_key]
        row = self.store.row(ps.spec.name, original)
        if row is None:  # still running: recorded when it finishes
            ps.parked.setdefault(original, []).append(run)
            log.info("trial %s#%d proposes the configuration of running trial #%d; not trained, waits for it",
                     ps.spec.name, run.number, original)
            return
        keep = set(record.result_columns()) | {o.key for o in self.config.objectives}
        copied = {k: v for k, v in row.items() if k in keep and k != "status"}
        self._finish(ps, run, {**copied, "status": "duplicate", "duplicate_of": original,
                               "error": f"same parameters and seed as trial #{original} ({row['status']}); not trained "
                                        "again, told to Optuna with its outcome"})

    # -- results ----------------------------------------------------------------------------
    def _row(self, ps: _PoolState, run: _Running, result: dict[str, Any]) -> dict[str, Any]:
        """The trial's row: its :class:`~omninet.sweep.record.TrialRecord`, the result's columns,
        the searched parameters, the loss curve, the config and the whole result as JSON."""
        limits = self.config.constraints_for(ps.spec.name)
        status = str(result.get("status") or "error")
        error = result.get("error")
        values = {o.key: result.get(o.key) for o in self.config.objectives}
        if status == "ok":
            bad = [k for k, v in values.items() if not _finite(v)]
            needed = [k for k in limits.limits() if not _finite(result.get(k))]
            if bad or needed:
                status, error = "error", f"trial result has no finite {', '.join(bad + needed)}"
        excess = limits.excess(result) if status == "ok" else dict.fromkeys(limits.names())
        if status == "infeasible":  # by the memory estimate, or by the runner's own judgement (inf)
            est = result.get("estimated_memory_mb")
            c_mem = float(est) - limits.max_memory_mb if _finite(est) and limits.max_memory_mb else math.inf
            excess["memory"] = c_mem if c_mem > 0 else math.inf
        pred = run.prediction or {}
        own = record.TrialRecord(
            sweep=self.config.name, trial_number=run.number, status=status,
            error=None if error is None else str(error)[:2000],
            feasible=status == "ok" and all(c is None or c <= 0 for c in excess.values()),
            simulated=bool(result.get("simulated", self._simulated.get(ps.spec.name, False))),
            node=result.get("node"), node_id=result.get("node_id"),
            device=result.get("device"), device_name=result.get("device_name"),
            finished_at=time.time(), duration_s=time.time() - run.started,
            **{f"constraint_{name}": value for name, value in excess.items()},
            repeat_of=run.repeat_of,
            config_key=params_key({**run.params, **({"role": "reference"} if run.reference else {})}),
            screened_by=result.get("screened_by") or ("measure_first" if status == "screened" else None),
            predicted_latency_ms=pred.get("latency_p50_ms"), predicted_memory_infer_mb=pred.get("peak_memory_infer_mb"),
            predicted_memory_train_mb=pred.get("peak_memory_train_mb"), cost_model_source=pred.get("source"),
            cost_model_mape_latency=pred.get("mape", {}).get("latency_p50_ms"),
            cost_model_mape_memory=pred.get("mape", {}).get("peak_memory_infer_mb"),
            duplicate_of=run.duplicate_of, seed_key=run.seed_key,
        )
        row = asdict(own)
        for key in self.store.file_schema.names:
            if key not in row and key in result and not key.startswith("param."):
                row[key] = result[key] if _finite(result[key]) or not isinstance(result[key], float) else None
        for key, value in run.params.items():
            row[f"param.{key}"] = value
        row.update(loss_curve=[float(x) for x in result.get("loss_curve") or []],
                   config_json=json.dumps(self.config.runner.to_dict(run.trial_config), sort_keys=True),
                   result_json=json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, sort_keys=True,
                                          default=str))
        for f in self.store.file_schema:  # integer columns from runners that report floats
            if f.type == "int64" and isinstance(row.get(f.name), float) and math.isfinite(row[f.name]):
                row[f.name] = int(row[f.name])
        return row

    def _tell(self, ps: _PoolState, trial_id: int, row: dict[str, Any]) -> None:
        retried: list[bool] = []
        self._retry(lambda: tell_trial(ps.study, trial_id, row, self.config.objectives, check=bool(retried)),
                    f"pool {ps.spec.name}: recording a trial in Optuna", on_retry=lambda: retried.append(True))

    def _finish(self, ps: _PoolState, run: _Running, result: dict[str, Any]) -> None:
        files = result.pop("_model_files", None)
        scores = result.pop("_scores", None)
        zero_shot = result.pop("_scores_zero_shot", None)
        row = self._row(ps, run, result)
        if scores is not None and row["status"] in ("ok", "pruned"):
            self.scores.write(ps.spec.name, run.number, scores)
            if zero_shot is not None:
                self.scores.write(ps.spec.name, run.number, zero_shot, kind="zero_shot")
            self._pair_with_reference(ps, run, row, scores, zero_shot)
        if files and row["status"] == "ok":  # the trained model, next to the records (policy: keep_models)
            from omninet.artifacts import model_subdir, trial_identity, write_trial_model

            config = json.loads(row["config_json"])
            write_trial_model(files, self.results_dir / model_subdir(ps.spec.name, run.number), trial_config=config,
                              identity=trial_identity(sweep=self.config.name, pool=ps.spec.name, trial=run.number,
                                                      trial_config=config),
                              metrics={k: v for k, v in result.items() if not isinstance(v, (list, dict))})
        self._learn(ps, run, row, result)
        self._retry(lambda: self.store.write(ps.spec.name, row), "writing the Parquet record")  # 1. the durable record
        self._tell(ps, run.trial_id, row)  # 2. the search state
        self.mlflow.log_trial(ps.spec.name, row)  # 3. best effort, backfilled later
        self._count(ps, row)
        for parked in ps.parked.pop(run.number, []):  # duplicates that waited for this trial
            self._duplicate(ps, parked)
        shown = " ".join(f"{o.key}={row.get(o.key):.4g}" for o in self.config.objectives if _finite(row.get(o.key)))
        log.info("trial %s#%d %s %s(%.1f s%s%s)", ps.spec.name, run.number, row["status"], f"{shown} " if shown else "",
                 row["duration_s"], ", simulated" if row["simulated"] else "",
                 f", infeasible" if row["status"] == "ok" and not row["feasible"] else "")
        if row["error"] and row["status"] != "infeasible":
            log.info("  reason: %s", row["error"].splitlines()[0][:300])

    def _matches_reference(self, ps: _PoolState, params: dict[str, Any]) -> bool:
        if not self.config.enqueue:
            return False
        point = {k: v for k, v in self.config.enqueue[0].items() if k in {q.path for q in ps.params}}
        return all(params.get(k) == v for k, v in point.items())

    def _is_reference(self, ps: _PoolState, run: _Running) -> bool:
        """The pool's reference run: with a base, the base itself on this pool (no passes, no
        fine-tune); without, the pool's first run of the sweep's first ``enqueue`` point (the
        dense baseline), trained with the base seed."""
        if self._base_path is not None:
            return run.reference
        if ps.reference is not None or run.repeat_of is not None:
            return False
        return self._matches_reference(ps, run.params)

    def _pair_with_reference(self, ps: _PoolState, run: _Running, row: dict[str, Any], scores: bytes,
                             zero_shot: bytes | None) -> None:
        """``row['role']`` for the reference; for every other run with scores, its paired
        accuracy difference to the reference on the eval rows both scored (95% paired bootstrap
        interval, McNemar's p; it covers the eval draw, one training run each). ``scores`` and
        ``zero_shot`` are the trial's own, as the worker sent them."""
        from omninet.scores import UnitScores, paired_difference

        if row["status"] == "ok" and self._is_reference(ps, run):
            ps.reference, row["role"] = run.number, "reference"
            ps.reference_scores = UnitScores.from_bytes(scores)
            return
        if ps.reference is None:
            return
        if ps.reference_scores is None:  # a resumed controller: the reference was recorded by an earlier one
            ps.reference_scores = self.scores.read(ps.spec.name, ps.reference)
        mine, ref = UnitScores.from_bytes(scores), ps.reference_scores
        if ref is None:
            return
        try:
            d = paired_difference(mine, ref)
        except ValueError as exc:  # not the same eval set: say so in the log, record nothing paired
            log.info("trial %s#%d: no paired difference to reference #%d (%s)", ps.spec.name, run.number, ps.reference, exc)
            return
        row.update(accuracy_diff_ref=d.diff, accuracy_diff_ref_lo=d.lo, accuracy_diff_ref_hi=d.hi,
                   accuracy_diff_ref_p=d.p_value, accuracy_diff_ref_covers=d.covers)
        if zero_shot is not None:
            z = paired_difference(UnitScores.from_bytes(zero_shot), ref)
            row.update(accuracy_zero_shot_diff_ref=z.diff, accuracy_zero_shot_diff_ref_lo=z.lo,
                       accuracy_zero_shot_diff_ref_hi=z.hi)

    def _learn(self, ps: _PoolState, run: _Running, row: dict[str, Any], result: dict[str, Any]) -> None:
        """A finished trial teaches the rung book (its full-budget costs) and the cost model (what
        it measured; ``row['cost_split']`` records which split it joined)."""
        if self._book is not None and row["status"] == "ok" and run.repeat_of is None:
            import ray

            ray.get(self._book.finish.remote(ps.spec.name, run.number,
                                             {k: row.get(k) for k in (o.key for o in self.config.objectives[1:])}))
        if self.cost_model is not None and row.get("screened_by") != "cost_model":
            try:
                features = self._features(run.params, run.trial_config)
            except Exception as exc:  # noqa: BLE001
                log.debug("cost features failed: %s", exc)
                return
            row["cost_split"] = self.cost_model.observe(ps.spec.name, run.number, features, result)

    def _collect(self, ref: Any, ps: _PoolState) -> tuple[_Running, dict[str, Any]]:
        import ray

        run = ps.inflight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the trial function raised (the runner never should)
            result = {"status": "error", "error": f"trial function raised: {exc.cause!r}"}
        except ray.exceptions.RayError as exc:  # worker/node death after Ray's retries, lost objects
            result = {"status": "crashed",
                      "error": f"{type(exc).__name__} after {ps.spec.max_retries} retries: {' '.join(str(exc).split())[:800]}"}
        return run, result

    # -- progress ---------------------------------------------------------------------------
    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < self.config.progress_interval_s:
            return
        self._last_progress = now
        obj = self.config.objectives[0]
        parts, eta = [], 0.0
        for name, ps in self._pools.items():
            finished = ps.done + ps.failed + ps.infeasible + ps.screened + ps.pruned + ps.duplicates - ps.repeat_runs
            best = f", best {obj.key} {abs(ps.best[0]):.4g} (#{ps.best[1]})" if ps.best else ""
            repeats = f", {ps.repeat_runs} repeat runs" if ps.repeat_runs else ""
            dups = f", {ps.duplicates} duplicate proposals not trained" if ps.duplicates else ""
            stopped = f", {ps.screened} screened, {ps.pruned} pruned" if self._book is not None or self.cost_model else ""
            parts.append(f"{name}: {finished}/{ps.budget} done ({ps.done} ok, {len(ps.inflight)} running, "
                         f"{ps.failed} failed, {ps.infeasible} infeasible{stopped}{repeats}{dups}){best}")
            if ps.durations:
                mean = sum(ps.durations) / len(ps.durations)
                left = max(0, ps.budget - finished - len(ps.inflight)) + 0.5 * len(ps.inflight)
                eta = max(eta, left * mean / ps.spec.concurrency)
        elapsed = now - self._started
        log.info("progress %s | elapsed %s, ETA %s", " | ".join(parts), _fmt_s(elapsed),
                 _fmt_s(eta) if any(ps.durations for ps in self._pools.values()) else "?")

    # -- main -------------------------------------------------------------------------------
    def run(self):
        """Runs the sweep to its budget and returns the :class:`SweepResult`."""
        from omninet.sweep.results import SweepResult, write_artifacts

        self._start_ray()  # may raise SweepConfigError before anything is written
        try:
            self.lock = sweep_lock(self.config.name, self.optuna_url, self.results_dir, self.identity,
                                   retry_s=self.config.storage.retry_s).acquire()  # a second controller stops here
            log.info("sweep %r: lock held by %s", self.config.name, self.identity.describe())
            self._open()
            if self.config.isolate_measurements:  # the driver's own work never overlaps a measurement on its node
                from omninet.sweep.isolation import DriverGate

                self._gate = self.mlflow.gate = DriverGate().shared
            self.mlflow.start_background()  # MLflow writes leave the per-trial path
            log.info("sweep %r: results in %s (Optuna %s, MLflow %s)", self.config.name, self.results_dir,
                     self.optuna_url, self.mlflow_uri)
            self._prepare_base()
            self._loop()
            self._progress(force=True)
            self._write_cost_model()
            result = SweepResult.load(self.results_dir)
            self._keep_models(result)
            artifacts = write_artifacts(result, self.results_dir / "artifacts")
            try:  # the dashboard is a view of records already safe on disk: never fail the sweep over it
                from omninet.sweep.dashboard import build_dashboard

                log.info("dashboard: %s", build_dashboard(self.results_dir, out=artifacts / "dashboard.html"))
            except Exception as exc:  # noqa: BLE001
                log.warning("dashboard not built (%s); rebuild with `omninet dashboard %s`", exc, self.results_dir)
            self.mlflow.stop_background()
            self.mlflow.flush(now=True)  # what the writer left, one more try even while backing off from an outage
            logged = [(artifacts, None), (self.results_dir / "trials", "trials")]
            if self._base_path is not None and self._base_path.is_relative_to(self.results_dir):
                logged.append((self._base_path, "base"))
            if self.mlflow.finish(logged):
                log.info("MLflow: experiment %r, parent run %s", self.config.name, self.mlflow.parent_run_id)
            else:
                log.warning("MLflow unavailable at the end; %d trial(s) will be backfilled on the next run",
                            self.mlflow.pending)
            log.info("sweep %r done: results in %s", self.config.name, self.results_dir)
            return result
        finally:
            if getattr(self, "mlflow", None) is not None:
                self.mlflow.stop_background()
            if self.lock is not None:
                self.lock.release()
            if self._owns_ray:
                import ray

                ray.shutdown()

    def _prepare_base(self) -> None:
        """``config.base``: the checkpoint as given, or the dense base trained once on the base
        pool (its first ``enqueue`` point, the trial's train section with ``base.train``) and kept
        in ``<results>/base``; a resumed sweep finds it there and does not train it again."""
        spec = self.config.base
        if spec is None:
            return
        if spec.checkpoint is not None:
            self._base_path = Path(os.path.expanduser(spec.checkpoint)).resolve()
            log.info("base: %s (checkpoint)", self._base_path)
            return
        out = self.results_dir / "base"
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            self._base_path = out
            log.info("base: %s (trained by an earlier run of this sweep; not trained again)", out)
            return
        import ray

        from omninet.artifacts import write_trial_model

        pool = self.config.base_pool()
        point = dict(self.config.enqueue[0]) if self.config.enqueue else {}
        values = {**point, **{f"train.{k}": v for k, v in (spec.train or {}).items()}}
        trial = self.config.trial_config(values)
        cpus = spec.cpus or pool.concurrency * pool.resources.get("CPU", 1.0)
        opts = {**pool.ray_options(), "num_cpus": cpus, "max_retries": pool.max_retries, "retry_exceptions": False,
                "name": f"base {pool.name}"}
        log.info("base: training the dense base on pool %s (%g cores): %s", pool.name, cpus,
                 ", ".join(f"{k}={v}" for k, v in values.items()))
        started = time.time()
        result = ray.get(self._remote.options(**opts).remote(self._task(pool, trial, "base", num_cpus=cpus,
                                                                         keep_model=True)))
        files = result.pop("_model_files", None)
        result.pop("_scores", None)
        if result.get("status") != "ok" or not files:
            raise SweepConfigError(f"base: training the base failed ({result.get('status')}: "
                                   f"{str(result.get('error') or 'no model returned').splitlines()[0][:300]}); fix the "
                                   "trial or base.train config, or give base.checkpoint")
        config = self.config.runner.to_dict(trial)
        write_trial_model(files, out, trial_config=config,
                          identity={"sweep": self.config.name, "pool": pool.name, "trial": "base"},
                          metrics={k: v for k, v in result.items() if not isinstance(v, (list, dict, bytes))})
        self._base_path = out
        log.info("base: trained in %.0f s: %s %.4g (se %.2g), kept in %s", time.time() - started,
                 self.config.objectives[0].key, result.get(self.config.objectives[0].key) or float("nan"),
                 result.get("accuracy_se") or float("nan"), out)

    def _keep_models(self, result) -> None:
        """The ``keep_models`` policy at the end: ``pareto`` prunes each pool's model folders to
        its feasible front; every kept model is logged to its trial's MLflow run as a pyfunc
        model (registered as ``<sweep>.<pool>`` with ``register_models``)."""
        if self.config.keep_models == "none":
            return
        from omninet.artifacts import prune_models

        for pool in result.pools:
            if self.config.keep_models == "pareto":
                front = {int(n) for n in result.pareto_front(pool)["trial_number"]}
                removed = prune_models(self.results_dir, pool, front)
                if removed:
                    log.info("pool %s: kept the models of the %d front trial(s), removed %d", pool, len(front),
                             len(removed))
            folders = sorted((self.results_dir / "models" / f"pool={pool}").glob("trial-*"))
            self.mlflow.log_models(pool, folders, register=self.config.register_models)

    def _loop(self) -> None:
        import ray

        if self._out_of_time():
            return
        for ps in self._pools.values():
            self._fill(ps)
        self._progress(force=True)
        while True:
            owner = {ref: ps for ps in self._pools.values() for ref in ps.inflight}
            if not owner:
                for ps in self._pools.values():  # repeats start once a pool's main budget is done
                    self._fill(ps)
                owner = {ref: ps for ps in self._pools.values() for ref in ps.inflight}
            if not owner:
                break
            ready, _ = ray.wait(list(owner), num_returns=1, timeout=self.config.progress_interval_s)
            for ref in ready:
                ps = owner[ref]
                run, result = self._collect(ref, ps)
                with self._gate():
                    self._finish(ps, run, result)  # told to Optuna first: the next ask sees this result
                    self._fill(ps)
            self.mlflow.flush()
            self.lock.ensure()
            self._progress()
        if self._out_of_time():
            log.info("wall-clock budget of %.0f s reached: no new trials started", self.config.budget.wall_clock_s)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _fmt_resources(res: dict[str, float]) -> str:
    keep = {k: v for k, v in res.items() if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
    return ", ".join(f"{k}={v:g}" for k, v in sorted(keep.items()))


def setup_logging() -> None:
    """Progress lines on stdout (what ``ray job logs`` shows)."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s [omninet.sweep] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_sweep(config: SweepConfig | str | os.PathLike | dict, *, results_dir: str | os.PathLike | None = None,
              address: str | None = None, num_cpus: int | None = None):
    """Runs or resumes a sweep; returns its :class:`~omninet.sweep.results.SweepResult`."""
    setup_logging()
    return SweepController(config, results_dir=results_dir, address=address, num_cpus=num_cpus).run()
