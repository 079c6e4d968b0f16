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
import os
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

from omninet.sweep import cluster, learning, models, repeats, resume
from omninet.sweep.config import SweepConfig, SweepConfigError, load_config, resolve_results_dir
from omninet.sweep.costmodel import CostModel
from omninet.sweep.dashboard import build_dashboard
from omninet.sweep.isolation import DriverGate
from omninet.sweep.lock import ControllerId, SweepLock, sweep_lock
from omninet.sweep.record import build_row, finite
from omninet.sweep.records import MlflowRecorder, ParquetStore, ScoreStore, tell_trial
from omninet.sweep.results import SweepResult, write_artifacts
from omninet.sweep.scheduler import RungBook
from omninet.sweep.state import PoolState, Running, progress_line
from omninet.sweep.storage import optuna_storage, with_retry
from omninet.sweep.worker import TrialTask, execute_trial, probe

__all__ = ["SweepController", "run_sweep"]

log = logging.getLogger("omninet.sweep")


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
        resume.check_manifest(self.config, self.results_dir)
        self.address = address
        self.num_cpus = num_cpus
        self._owns_ray = False
        self._remote = None
        self._pools: dict[str, PoolState] = {}
        self.probed = cluster.Probed()
        self._started = time.monotonic()
        self._last_progress = 0.0
        self._book = None  # the rung book actor (scheduler mo_successive_halving)
        self.cost_model = None
        if self.config.cost_model.enabled:
            self.cost_model = CostModel(self.config.cost_model, [p.name for p in self.config.pools])
        self.identity = ControllerId()
        self.lock: SweepLock | None = None
        self.mlflow: MlflowRecorder | None = None
        self._gate = contextlib.nullcontext  # DriverGate.shared once Ray runs (isolate_measurements)
        self._base_path: Path | None = None  # the trained base every trial derives from (config.base)

    # -- paths and storage ------------------------------------------------------------------
    @property
    def optuna_url(self) -> str:
        return self.config.storage.optuna_url or f"sqlite:///{self.results_dir / 'optuna.db'}"

    @property
    def mlflow_uri(self) -> str:
        return self.config.storage.mlflow_uri or f"sqlite:///{self.results_dir / 'mlflow.db'}"

    def _retry(self, fn, what: str, on_retry=None):
        """A storage call, retried while the store is away (at most ``storage.retry_s``)."""
        return with_retry(fn, what=what, budget_s=self.config.storage.retry_s, on_retry=on_retry)

    # -- Ray --------------------------------------------------------------------------------
    def _start_ray(self) -> None:
        import ray  # heavy: ray

        self._owns_ray, embedded = cluster.start_ray(self.config, self.address, self.num_cpus)
        self._remote = ray.remote(execute_trial)
        self.probed = cluster.probe_pools(self.config, self.results_dir, ray.remote(probe), embedded=embedded)
        if self.config.scheduler.kind == "mo_successive_halving":
            # owned by this driver: it goes when the controller goes, and a resumed one rebuilds it from Parquet
            self._book = ray.remote(RungBook).options(num_cpus=0, max_concurrency=1).remote(
                learning.pool_rules(self.config))

    def _task(self, pool, trial_config: Any, name: Any, **how: Any):
        """The worker's :class:`~omninet.sweep.worker.TrialTask` for one run on ``pool``."""
        how = {"num_cpus": pool.resources.get("CPU", 1.0), "keep_model": self.config.keep_models != "none", **how}
        return TrialTask(runner=self.config.runner, config=trial_config, pool=pool.name,
                         key=f"{self.config.name}/{pool.name}/{name}", accelerator=pool.accelerator,
                         simulate=self.config.simulate_accelerators, isolate=self.config.isolate_measurements,
                         calibration_ref_ms=self.probed.calibration_ms(pool.name), **how)

    def _train_base(self, pool, trial_config: Any, cpus: float) -> dict[str, Any]:
        import ray  # heavy: ray

        opts = {**pool.ray_options(), "num_cpus": cpus, "max_retries": pool.max_retries, "retry_exceptions": False,
                "name": f"base {pool.name}"}
        return ray.get(self._remote.options(**opts).remote(self._task(pool, trial_config, "base", num_cpus=cpus,
                                                                      keep_model=True)))

    # -- studies and resume -------------------------------------------------------------------
    def _open(self) -> None:
        cfg = self.config
        self.results_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
            # A `ray job submit` driver starts in a temporary copy of the working dir, which Ray's
            # runtime-env agent may delete and re-extract while trial tasks start; later
            # os.getcwd() calls (MLflow's store resolves paths with it) would then fail.
            os.chdir(self.results_dir)
        (self.results_dir / resume.MANIFEST).write_text(yaml.safe_dump(cfg.to_plain(), sort_keys=False))
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
            probe = self.probed.info.get(p.name, {})
            study = self._retry(lambda: resume.open_study(cfg, storage, p, budget, probe),
                                f"opening study {cfg.study_name(p.name)!r}")
            ps = PoolState(spec=p, study=study, budget=budget, params=self.probed.params.get(p.name, cfg.params))
            self._pools[p.name] = ps
            trials = self._retry(lambda: study.get_trials(deepcopy=False), "reading trials")
            if not trials:
                resume.enqueue_points(cfg, study, ps.params)
            repaired = resume.rebuild(cfg, ps, trials, rows, tell=lambda trial_id, row: self._tell(ps, trial_id, row))
            resume.restore_learning(cfg, p.name, rows, self._book, self.cost_model,
                                    lambda params, config: learning.features(cfg, params, config))
            if ps.created:
                log.info("pool %s: resuming study %r: %d finished, %d requeued from a previous controller%s",
                         p.name, study.study_name, ps.finished, len(ps.requeue),
                         f", {repaired} repaired from Parquet" if repaired else "")
        (self.results_dir / "probe.json").write_text(json.dumps(self.probed.info, indent=2, default=str))
        backfilled = self.mlflow.sync((pool, row) for (pool, _), row in sorted(rows.items()))
        if backfilled:
            log.info("MLflow: backfilled %d trial(s) recorded while it was unavailable", backfilled)

    # -- dispatch ---------------------------------------------------------------------------
    def _out_of_time(self) -> bool:
        limit = self.config.budget.wall_clock_s
        return limit is not None and time.monotonic() - self._started > limit

    def _ask(self, ps: PoolState) -> tuple[int, int, dict[str, Any], int | None, int] | None:
        """The pool's next proposal: (number, Optuna trial id, params, repeat_of, repeat index),
        from a requeued trial, a new ask within the budget, or a planned repeat; None when done."""
        where = f"pool {ps.spec.name}"
        if ps.requeue:
            t = ps.requeue.pop(0)
            params = dict(t.params)
            if not params:  # asked, then the controller died (or the ask's reply was lost) before sampling
                trial = optuna.trial.Trial(ps.study, t._trial_id)
                params = self._retry(lambda: self.config.sample(trial, ps.params), f"{where}: sampling")
            return t.number, t._trial_id, params, t.user_attrs.get("repeat_of"), int(t.user_attrs.get("repeat_index", 0))
        if ps.created < ps.budget:
            retried: list[bool] = []
            trial = self._retry(ps.study.ask, f"{where}: asking for a trial", on_retry=lambda: retried.append(True))
            ps.created += 1
            if retried:
                running = self._retry(lambda: ps.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)),
                                      "reading trials")
                resume.adopt_orphans(ps, running, keep=trial._trial_id)
            params = self._retry(lambda: self.config.sample(trial, ps.params), f"{where}: sampling")
            return trial.number, trial._trial_id, params, None, 0
        if repeats.plan_repeats(self.config, ps):
            params, repeat_of, index = ps.repeats.pop(0)
            ps.study.enqueue_trial(params, user_attrs={"repeat_of": repeat_of, "repeat_index": index})
            trial = ps.study.ask()
            return trial.number, trial._trial_id, self.config.sample(trial, ps.params), repeat_of, index
        return None

    def _next(self, ps: PoolState) -> Running | None:
        """The next run of the pool, its config parsed once, or None when the pool is done."""
        asked = self._ask(ps)
        if asked is None:
            return None
        number, trial_id, params, repeat_of, index = asked
        values = dict(params)
        reference = False
        if self._base_path is not None:
            values["base"] = str(self._base_path)
            if (not ps.reference_sent and ps.reference is None and repeat_of is None
                    and repeats.matches_reference(self.config, ps, params)):
                # The fair control: the base with the trials' own fine-tune recipe and seed, no passes,
                # so a trial's difference to it is its knobs' doing, not extra training; its zero-shot
                # score (taken before the fine-tune) is the untouched base's. finetune.steps: 0: the same run.
                ps.reference_sent = reference = True
        seed = repeats.base_seed(self.config)
        if repeat_of is not None:  # the same configuration, another training seed
            seed = (seed if isinstance(seed, int) else 0) + index
            values[self.config.repeats.seed_path] = seed
        run = Running(ps.spec.name, number, trial_id, params, self.config.trial_config(values), repeat_of=repeat_of,
                      reference=reference)
        run.seed_key = repeats.seed_key(self.config, params, seed, reference=reference)
        first = ps.seed_keys.get(run.seed_key)
        if first is not None and first != number:
            run.duplicate_of = first
        else:
            ps.seed_keys[run.seed_key] = number
        return run

    def _fill(self, ps: PoolState) -> None:
        """Keeps the pool's ``concurrency`` trials in flight."""
        limits = self.config.constraints_for(ps.spec.name)
        while len(ps.inflight) < ps.spec.concurrency and not self._out_of_time():
            run = self._next(ps)
            if run is None:
                return
            if run.duplicate_of is not None:
                self._duplicate(ps, run)
                continue
            run.prediction = learning.predict(self.cost_model, self.config, run)
            reason = learning.screen_reason(self.config, run)
            if reason is not None:  # the record keeps the prediction and the model's held-out error
                self._finish(ps, run, {"status": "screened", "screened_by": "cost_model", "error": reason})
                continue
            opts = {**ps.spec.ray_options(), "max_retries": ps.spec.max_retries, "retry_exceptions": False,
                    "name": f"trial {ps.spec.name}#{run.number}"}
            reference, label = self._timing_reference(ps, run)
            task = self._task(ps.spec, run.trial_config, run.number, memory_budget_mb=limits.max_memory_mb,
                              scheduler=learning.rung_client(self._book, self.config, run), reference=reference,
                              reference_label=label)
            ps.inflight[self._remote.options(**opts).remote(task)] = run

    def _timing_reference(self, ps: PoolState, run: Running) -> tuple[Any, str | None]:
        """(typed config, label) of the model the pool's trials time themselves against
        (:func:`omninet.sweep.repeats.timing_reference`), made once per pool; (None, None) for a
        runner that does not pair its timing."""
        if not self.config.runner.pairs_latency:
            return None, None
        if ps.timing_reference is None:
            ps.timing_reference = repeats.timing_reference(self.config, ps, run, base=self._base_path)
            log.info("pool %s: trials are timed side by side with %s", ps.spec.name, ps.timing_reference[1])
        return ps.timing_reference

    def _duplicate(self, ps: PoolState, run: Running) -> None:
        """A proposal equal to an earlier trial (parameters and seed): recorded as 'duplicate'
        with that trial's outcome (:func:`omninet.sweep.repeats.duplicate_outcome`). When the
        earlier trial is still running, the duplicate waits for it."""
        original = ps.seed_keys[run.seed_key]
        row = self.store.row(ps.spec.name, original)
        if row is None:  # still running: recorded when it finishes
            ps.parked.setdefault(original, []).append(run)
            log.info("trial %s#%d proposes the configuration of running trial #%d; not trained, waits for it",
                     ps.spec.name, run.number, original)
            return
        self._finish(ps, run, repeats.duplicate_outcome(self.config, row, original))

    def _collect(self, ref: Any, ps: PoolState) -> tuple[Running, dict[str, Any]]:
        import ray  # heavy: ray

        run = ps.inflight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the trial function raised (the runner never should)
            result = {"status": "error", "error": f"trial function raised: {exc.cause!r}"}
        except ray.exceptions.RayError as exc:  # worker/node death after Ray's retries, lost objects
            result = {"status": "crashed",
                      "error": f"{type(exc).__name__} after {ps.spec.max_retries} retries: {' '.join(str(exc).split())[:800]}"}
        return run, result

    # -- results ----------------------------------------------------------------------------
    def _tell(self, ps: PoolState, trial_id: int, row: dict[str, Any]) -> None:
        retried: list[bool] = []
        self._retry(lambda: tell_trial(ps.study, trial_id, row, self.config.objectives, check=bool(retried)),
                    f"pool {ps.spec.name}: recording a trial in Optuna", on_retry=lambda: retried.append(True))

    def _finish(self, ps: PoolState, run: Running, result: dict[str, Any]) -> None:
        """The trial's record: scores and model beside it, then Parquet (the durable record),
        Optuna (the search state), MLflow (best effort, backfilled later)."""
        files = result.pop("_model_files", None)
        scores = result.pop("_scores", None)
        zero_shot = result.pop("_scores_zero_shot", None)
        row = build_row(self.config, self.store.file_schema, run, result,
                        simulated=self.probed.simulated.get(ps.spec.name, False))
        if scores is not None and row["status"] in ("ok", "pruned"):
            self.scores.write(ps.spec.name, run.number, scores)
            if zero_shot is not None:
                self.scores.write(ps.spec.name, run.number, zero_shot, kind="zero_shot")
            reference = repeats.is_reference(self.config, ps, run, has_base=self._base_path is not None)
            repeats.pair_with_reference(ps, run, row, scores, zero_shot, reference=reference, read_scores=self.scores.read)
        if files and row["status"] == "ok":  # the trained model, next to the records (policy: keep_models)
            models.write_model(files, self.results_dir, self.config, ps.spec.name, run.number, row, result)
        learning.learn(self._book, self.cost_model, self.config, run, row, result)
        self._retry(lambda: self.store.write(ps.spec.name, row), "writing the Parquet record")
        self._tell(ps, run.trial_id, row)
        self.mlflow.log_trial(ps.spec.name, row)
        ps.count(row, self.config.objectives[0])
        for parked in ps.parked.pop(run.number, []):  # duplicates that waited for this trial
            self._duplicate(ps, parked)
        shown = " ".join(f"{o.key}={row.get(o.key):.4g}" for o in self.config.objectives if finite(row.get(o.key)))
        log.info("trial %s#%d %s %s(%.1f s%s%s)", ps.spec.name, run.number, row["status"], f"{shown} " if shown else "",
                 row["duration_s"], ", simulated" if row["simulated"] else "",
                 ", infeasible" if row["status"] == "ok" and not row["feasible"] else "")
        if row["error"] and row["status"] != "infeasible":
            log.info("  reason: %s", row["error"].splitlines()[0][:300])

    # -- progress ---------------------------------------------------------------------------
    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < self.config.progress_interval_s:
            return
        self._last_progress = now
        log.info("progress %s", progress_line(self._pools, self.config.objectives[0], now - self._started,
                                              stopped=self._book is not None or self.cost_model is not None))

    # -- main -------------------------------------------------------------------------------
    def run(self):
        """Runs the sweep to its budget and returns the :class:`SweepResult`."""
        self._start_ray()  # may raise SweepConfigError before anything is written
        try:
            self.lock = sweep_lock(self.config.name, self.optuna_url, self.results_dir, self.identity,
                                   retry_s=self.config.storage.retry_s).acquire()  # a second controller stops here
            log.info("sweep %r: lock held by %s", self.config.name, self.identity.describe())
            self._open()
            if self.config.isolate_measurements:  # the driver's own work never overlaps a measurement on its node
                self._gate = self.mlflow.gate = DriverGate().shared
            self.mlflow.start_background()  # MLflow writes leave the per-trial path
            log.info("sweep %r: results in %s (Optuna %s, MLflow %s)", self.config.name, self.results_dir,
                     self.optuna_url, self.mlflow_uri)
            self._base_path = models.prepare_base(self.config, self.results_dir, self._train_base)
            self._loop()
            self._progress(force=True)
            learning.write_report(self.cost_model, self.config, self.results_dir / "cost_model.json")
            result = SweepResult.load(self.results_dir)
            models.keep_models(self.config, self.results_dir, result, self.mlflow)
            artifacts = write_artifacts(result, self.results_dir / "artifacts")
            try:  # the dashboard is a view of records already safe on disk: never fail the sweep over it
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
            if self.mlflow is not None:
                self.mlflow.stop_background()
            if self.lock is not None:
                self.lock.release()
            if self._owns_ray:
                import ray  # heavy: ray

                ray.shutdown()

    def _loop(self) -> None:
        """Ask, dispatch, wait for the next finished trial, record it, refill; repeats start once
        a pool's main budget is done."""
        import ray  # heavy: ray

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
