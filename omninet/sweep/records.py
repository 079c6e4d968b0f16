"""Trial records: the Parquet table (the durable record of every finished trial) and MLflow.

Write order per finished trial is Parquet -> Optuna ``tell`` -> MLflow. Parquet files are
written atomically (temp file + rename) and named by pool and trial number, so a rewrite is
idempotent; a controller that dies between the Parquet write and the ``tell`` is repaired on
resume from the row, and MLflow is backfilled from Parquet whenever it is reachable again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import optuna
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from optuna.trial import TrialState

from omninet.paths import flatten
from omninet.scores import UnitScores
from omninet.sweep import record
from omninet.sweep.record import params_key  # noqa: F401 -- re-exported: its old home
from omninet.sweep.config import PoolConstraints, SweepConfig

__all__ = ["ParquetStore", "ScoreStore", "MlflowRecorder", "flatten", "run_name", "params_key", "table_schema",
           "tell_trial"]

log = logging.getLogger("omninet.sweep")

_ARROW = {"int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string()}


def table_schema(config: SweepConfig, *, with_pool: bool) -> pa.Schema:
    """The trial table's schema: the record's columns (:func:`omninet.sweep.record.columns`),
    objectives the result does not declare, ``param.<path>`` per searched parameter,
    ``loss_curve``, ``config_json`` and ``result_json`` (what of the runner's result no column
    holds, such as the rung lists a resumed scheduler reads; rows written before this version hold
    the whole result there)."""
    cols = record.columns()
    fields = [pa.field(c.name, c.type) for c in cols.values()]
    fields += [pa.field(o.key, pa.float64()) for o in config.objectives if o.key not in cols]
    fields += [pa.field(f"param.{p.path}", _ARROW[p.arrow_type()]) for p in config.params]
    fields += [
        pa.field("loss_curve", pa.list_(pa.float64())),
        pa.field("config_json", pa.string()),
        pa.field("result_json", pa.string()),
    ]
    if with_pool:
        fields.append(pa.field("pool", pa.string()))
    return pa.schema(fields)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ParquetStore:
    """``<results>/trials/pool=<pool>/trial-<number>.parquet``: a hive-partitioned pyarrow
    dataset, one row per finished trial, readable by pandas, pyarrow and duckdb
    (``read_parquet('<results>/trials/*/*.parquet', hive_partitioning=true)``)."""

    def __init__(self, root: Path, config: SweepConfig) -> None:
        self.root = Path(root)
        self.config = config
        self.file_schema = table_schema(config, with_pool=False)
        self.schema = table_schema(config, with_pool=True)

    def path(self, pool: str, number: int) -> Path:
        return self.root / f"pool={pool}" / f"trial-{number:06d}.parquet"

    def write(self, pool: str, row: dict[str, Any]) -> Path:
        values = {f.name: [_clean(row.get(f.name))] for f in self.file_schema}
        table = pa.Table.from_pydict(values, schema=self.file_schema)
        final = self.path(pool, int(row["trial_number"]))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")  # dot prefix: ignored by dataset readers
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        return final

    def row(self, pool: str, number: int) -> dict[str, Any] | None:
        """The recorded row of one trial, or None."""
        path = self.path(pool, number)
        if not path.is_file():
            return None
        return {**pq.read_table(path, schema=self.file_schema).to_pylist()[0], "pool": pool}

    def read(self) -> pa.Table:
        if not self.root.is_dir():
            return self.schema.empty_table()
        dataset = ds.dataset(self.root, format="parquet", partitioning="hive", schema=self.schema)
        return dataset.to_table().sort_by([("pool", "ascending"), ("trial_number", "ascending")])

    def rows(self) -> dict[tuple[str, int], dict[str, Any]]:
        """{(pool, trial_number): row} of every recorded trial."""
        return {(r["pool"], int(r["trial_number"])): r for r in self.read().to_pylist()}


def tell_trial(study, trial_id: int, row: dict[str, Any], objectives, *, check: bool = False) -> None:
    """Tells Optuna a recorded row: its user attributes (:func:`omninet.sweep.record.user_attrs`),
    then its state (:func:`omninet.sweep.record.optuna_state`): COMPLETE with the objectives'
    values and the pool's constraints (``constraint_<name>``; a trial that never ran gets the
    worst values), PRUNED, FAIL, or for a duplicate its original's outcome. ``check``: a retry
    after the store went away; a trial it already holds as finished is not told again."""
    if check and study._storage.get_trial(trial_id).state.is_finished():
        return  # a tell whose reply was lost when the store went away: already recorded, never told twice
    trial = optuna.trial.Trial(study, trial_id)
    for key, value in record.user_attrs(row).items():
        trial.set_user_attr(key, value)
    status = row["status"]
    if status == "duplicate":  # the earlier trial's outcome, as Optuna's duplicate pattern tells it
        original = study._storage.get_trial(
            study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(row["duplicate_of"])))
        if original.state == TrialState.COMPLETE:
            study.tell(trial, original.values)
        else:
            study.tell(trial, state=original.state if original.state.is_finished() else TrialState.FAIL)
        return
    state = record.optuna_state(status)
    if state != TrialState.COMPLETE:
        study.tell(trial, state=state)
        return
    for name in PoolConstraints.names():
        c = row.get(f"constraint_{name}")
        if c is not None:
            trial.set_constraint(name, c)
    if status == "ok":
        values = [float(row[o.key]) for o in objectives]
    else:  # never ran: worst possible values; the constraint already ranks it below every feasible trial
        values = [-math.inf if o.direction == "maximize" else math.inf for o in objectives]
    study.tell(trial, values)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def run_name(pool: str, number: int, params: dict[str, Any], trial_config: dict[str, Any]) -> str:
    """A readable MLflow run name: pool, attention kind, key params, trial number."""
    kernel = flatten(trial_config).get("model.attention.kernel", "default")
    keys = [(p.rsplit(".", 1)[-1], v) for p, v in params.items() if p != "model.attention.kernel"]
    detail = " ".join(f"{k}={_short(v)}" for k, v in keys[:4])
    return f"{pool} {kernel} {detail} #{number}".replace("  ", " ").strip()


class ScoreStore:
    """``<results>/scores/pool=<pool>/trial-<number>.npz``: each trial's per-unit eval scores
    (``omninet.scores.UnitScores``: bit-packed correctness, float16 loss, units per eval row),
    written next to its Parquet row, read by ``SweepResult`` for paired comparisons."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    KINDS = ("final", "zero_shot")  # after the fine-tune (or training), and a derived trial's right after its passes

    def path(self, pool: str, number: int, kind: str = "final") -> Path:
        if kind not in self.KINDS:
            raise ValueError(f"scores kind must be one of {self.KINDS}, got {kind!r}")
        suffix = "" if kind == "final" else f".{kind}"
        return self.root / f"pool={pool}" / f"trial-{number:06d}{suffix}.npz"

    def write(self, pool: str, number: int, data: bytes, kind: str = "final") -> Path:
        final = self.path(pool, number, kind)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, final)
        return final

    def read(self, pool: str, number: int, kind: str = "final"):
        """The trial's ``UnitScores``, or None when it kept none."""
        path = self.path(pool, number, kind)
        return UnitScores.load(path) if path.is_file() else None


class MlflowRecorder:
    """One experiment per sweep, one parent run per sweep (found again by tag on resume), one
    child run per trial with ``mlflow.parentRunId`` set explicitly. Writes go through
    ``MlflowClient.log_batch``. When the store is unreachable (from the start or mid-sweep),
    trials stay pending and are backfilled from the Parquet rows once it answers again; it is
    retried after 1 s, then 2, 4, ... at most ``retry_s`` apart.

    Every trial run is tagged with the controller that wrote it (``omninet.controller``, plus its
    host and PID). On (re)connecting, an unfinished trial run, half-written by a controller that
    died mid-log or by this one when the store failed mid-write, is deleted and rewritten whole,
    but only when its controller is not live (``is_live``: the sweep lock's holder); finished runs
    count as logged. Only this sweep's experiment and runs are ever searched, never another's."""

    ROLE, SWEEP, KEY = "omninet.role", "omninet.sweep", "omninet.trial_key"
    CONTROLLER = "omninet.controller"

    def __init__(self, uri: str, config: SweepConfig, artifact_location: str | None, *, retry_s: float = 15.0,
                 controller=None, is_live=None) -> None:
        # Fail fast instead of MLflow's default ~2 min of HTTP retries when a server is down.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # Sweeps run on clusters without internet access; MLflow's usage telemetry would only
        # add latency to every logged trial. Users who want it set MLFLOW_DISABLE_TELEMETRY=false.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # a tracking server makes MLflow print two "View run ... at http://..." lines per trial
        # run to stdout: noise in the progress log (and in benchmarks' JSON on stdout)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.uri, self.config, self.artifact_location = uri, config, artifact_location
        self.retry_s = retry_s
        self._backoff = 1.0
        self.controller = controller  # omninet.sweep.lock.ControllerId, or None (untagged runs)
        self._is_live = is_live or (lambda controller_id: False)
        self._client = None
        self._experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self._logged: set[str] = set()
        self._pending: dict[str, tuple[str, dict[str, Any]]] = {}
        self._next_try = 0.0
        self.last_error: str | None = None
        self._guard = threading.Lock()  # _pending is filled by the controller, drained by the writer thread
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.gate = contextlib.nullcontext  # each write as one section (the controller's DriverGate.shared)

    @staticmethod
    def trial_key(pool: str, number: int) -> str:
        return f"{pool}/{number}"

    # -- connection -------------------------------------------------------------------------
    def _connect(self) -> None:
        from mlflow import MlflowClient  # heavy: mlflow (~4 s)
        from mlflow.entities import ViewType  # heavy: mlflow

        client = MlflowClient(tracking_uri=self.uri)
        exp = client.get_experiment_by_name(self.config.name)
        if exp is None:
            exp_id = client.create_experiment(
                self.config.name, artifact_location=self.artifact_location, tags={self.SWEEP: self.config.name,
                                                # MLflow 3's UI opens runs (not GenAI traces) for this kind
                                                "mlflow.experimentKind": "custom_model_development"}
            )
        else:
            exp_id = exp.experiment_id
        runs = self._search(client, exp_id, f"tags.`{self.ROLE}` = 'parent'", ViewType.ACTIVE_ONLY)
        if runs:
            parent = runs[0].info.run_id
            client.update_run(parent, status="RUNNING")
        else:
            parent = client.create_run(
                exp_id, run_name=f"sweep {self.config.name}",
                tags={self.ROLE: "parent", self.SWEEP: self.config.name},
            ).info.run_id
        logged, own = set(), self.controller.id if self.controller else None
        trials = f"tags.`{self.ROLE}` = 'trial' and tags.`{self.SWEEP}` = '{self.config.name}'"
        for run in self._search(client, exp_id, trials, ViewType.ACTIVE_ONLY):
            key, writer = run.data.tags.get(self.KEY), run.data.tags.get(self.CONTROLLER)
            if run.info.status in ("FINISHED", "FAILED"):
                logged.add(key)
            elif writer == own or not self._is_live(writer):  # half-written: rewritten whole from Parquet
                client.delete_run(run.info.run_id)
                log.info("MLflow: deleted half-written run of %s (%s)", key,
                         "this controller, store failed mid-write" if writer == own else f"dead controller {writer}")
        self._client, self._experiment_id, self.parent_run_id, self._logged = client, exp_id, parent, logged

    @staticmethod
    def _search(client, exp_id: str, filter_string: str, view) -> list:
        out, token = [], None
        while True:
            page = client.search_runs([exp_id], filter_string=filter_string, run_view_type=view,
                                      max_results=1000, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def _ready(self) -> bool:
        if self._client is not None:
            return True
        if time.monotonic() < self._next_try:
            return False
        try:
            self._connect()
            return True
        except Exception as exc:  # any store error: keep the sweep going
            self._unavailable(exc)
            return False
        self._backoff = 1.0

    def _unavailable(self, exc: BaseException) -> None:
        message = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        if self.last_error is None:
            log.warning("MLflow at %s is unavailable (%s); trials go to Optuna and Parquet and will be "
                        "backfilled into MLflow when it is reachable", self.uri, message)
        log.debug("MLflow error", exc_info=exc)
        self.last_error = message
        self._client = None  # the next attempt reconnects: a full scan, so a half-written run is found
        self._next_try = time.monotonic() + min(self._backoff, self.retry_s)
        self._backoff = min(self._backoff * 2, self.retry_s)

    # -- public -----------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self._client is not None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def sync(self, rows: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Logs every (pool, row) not yet in MLflow; returns how many were written (0 when a
        writer thread runs: it writes them)."""
        with self._guard:
            for pool, row in rows:
                key = self.trial_key(pool, int(row["trial_number"]))
                if key not in self._logged:
                    self._pending[key] = (pool, row)
        return self.flush()

    def log_trial(self, pool: str, row: dict[str, Any]) -> int:
        return self.sync([(pool, row)])

    # -- background writing -------------------------------------------------------------------
    def start_background(self) -> None:
        """From here on a writer thread logs the pending trials and ``log_trial``/``flush`` only
        queue and wake it: MLflow's round trips (three or more per trial) leave the controller's
        per-trial path, and an outage never stalls it. :meth:`stop_background` joins it."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._write_loop, name="omninet-mlflow", daemon=True)
            self._thread.start()

    def stop_background(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None

    def _write_loop(self) -> None:
        while not self._stopping:
            self._wake.wait(timeout=1.0)  # woken per finished trial; every second to retry an outage
            self._wake.clear()
            if self._stopping:
                return
            try:
                self._flush()
            except Exception as exc:  # noqa: BLE001 - never let the writer die: the trial stays pending
                log.debug("MLflow writer", exc_info=exc)

    def flush(self, *, now: bool = False) -> int:
        """Writes the pending trials (or wakes the writer thread); ``now`` tries at once even while
        backing off (sweep end)."""
        if now:
            self._next_try = 0.0
        if self._thread is not None:
            self._wake.set()
            return 0
        return self._flush()

    def _flush(self) -> int:
        if not self._pending or not self._ready():
            return 0
        written = 0
        with self._guard:
            keys = sorted(self._pending, key=lambda k: (k.split("/")[0], int(k.split("/")[1])))
        for key in keys:
            with self._guard:
                pool, row = self._pending[key]
                if key in self._logged:  # found in the store when (re)connecting
                    del self._pending[key]
                    continue
            try:
                with self.gate():
                    self._log_child(pool, row)
            except Exception as exc:
                self._unavailable(exc)
                return written
            with self._guard:
                self._logged.add(key)
                del self._pending[key]
            written += 1
        if self.last_error is not None:
            log.info("MLflow reachable again: backfilled %d trial(s)", written)
            self.last_error = None
        return written

    def _log_child(self, pool: str, row: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param  # heavy: mlflow
        from mlflow.utils.validation import (  # heavy: mlflow
            MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH,
        )

        number = int(row["trial_number"])
        trial_config = json.loads(row["config_json"])
        params = {k[len("param."):]: v for k, v in row.items() if k.startswith("param.") and v is not None}
        ok = row["status"] in ("ok", "infeasible", "screened", "pruned")  # decisions, not failures
        tags = {
            "mlflow.parentRunId": self.parent_run_id,  # explicit: trials finish in another process
            self.ROLE: "trial", self.SWEEP: self.config.name, self.KEY: self.trial_key(pool, number),
            "pool": pool, "optuna_trial_number": str(number), **record.mlflow_tags(row),
        }
        if self.controller is not None:
            tags.update({self.CONTROLLER: self.controller.id, f"{self.CONTROLLER}_host": self.controller.host,
                         f"{self.CONTROLLER}_pid": str(self.controller.pid)})
        ms = int((row.get("finished_at") or time.time()) * 1000)
        start_ms = ms - int(1000 * (row.get("duration_s") or 0))  # the trial's own span, not the logging time
        run = self._client.create_run(self._experiment_id, run_name=run_name(pool, number, params, trial_config),
                                      tags=tags, start_time=start_ms)
        run_id = run.info.run_id
        names = record.metric_names() | {o.key for o in self.config.objectives}
        metrics = [Metric(k, float(v), ms, 0) for k, v in row.items()
                   if k in names and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        metrics += [Metric("train_loss", float(v), ms, step) for step, v in enumerate(row.get("loss_curve") or [])
                    if v is not None and math.isfinite(v)]
        flat = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in sorted(flatten(trial_config).items())]
        # log_batch caps: 100 params, 100 tags, 1000 metrics, 1000 entities per call
        while flat or metrics:
            p, flat = flat[:MAX_PARAMS_TAGS_PER_BATCH], flat[MAX_PARAMS_TAGS_PER_BATCH:]
            room = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - len(p))
            m, metrics = metrics[:room], metrics[room:]
            self._client.log_batch(run_id, metrics=m, params=p, tags=[])
        self._client.set_terminated(run_id, status="FINISHED" if ok else "FAILED", end_time=ms)

    def log_models(self, pool: str, folders: list[Path], *, register: bool = False) -> int:
        """Logs each trial-model folder (``models/pool=<pool>/trial-<n>``) to its trial's run as
        an MLflow pyfunc model, once (the run is tagged ``omninet.model``). Best effort: a store
        that is down leaves the folders on disk, logged on a later run. Returns how many."""
        if not folders or not self._ready():
            return 0
        from omninet.mlflow_model import log_mlflow_model, registry_name  # heavy: mlflow

        from mlflow.entities import ViewType  # heavy: mlflow

        runs = {r.data.tags.get(self.KEY): r for r in self._search(
            self._client, self._experiment_id, f"tags.`{self.ROLE}` = 'trial'", ViewType.ACTIVE_ONLY)}
        written = 0
        for folder in folders:
            number = int(folder.name.removeprefix("trial-"))
            run = runs.get(self.trial_key(pool, number))
            if run is None or run.data.tags.get("omninet.model"):
                continue
            try:
                uri = log_mlflow_model(run.info.run_id, folder, tracking_uri=self.uri,
                                       register_as=registry_name(self.config.name, pool) if register else None)
                self._client.set_tag(run.info.run_id, "omninet.model", uri)
                written += 1
            except Exception as exc:  # noqa: BLE001 -- the weights are safe on disk; say so and go on
                log.warning("MLflow: model of %s#%d not logged (%s); it stays in %s", pool, number,
                            " ".join(str(exc).split())[:200], folder)
        return written

    def finish(self, artifacts: list[tuple[Path, str | None]], *, status: str = "FINISHED") -> bool:
        """Logs the end-of-sweep artifacts ((local dir, artifact path) pairs) to the parent run
        and closes it; False when MLflow is unavailable or trials are still pending."""
        if not self._ready() or self._pending:
            return False
        try:
            for local_dir, artifact_path in artifacts:
                self._client.log_artifacts(self.parent_run_id, str(local_dir), artifact_path)
            self._client.set_terminated(self.parent_run_id, status=status)
            return True
        except Exception as exc:
            self._unavailable(exc)
            return False
