"""One declaration of a result field reaches every store (omninet.sweep.record).

A test subclass of ``TrialResult`` adds one field with its metadata; with it swapped in
(``record.RESULT_TYPE``), the controller's row holds it, the Parquet schema has it typed,
MLflow logs it as a metric, Optuna gets it as a user attribute and the dashboard labels it
with its unit. No Ray, no MLflow server (the recorder writes to a stand-in client)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass, fields
from types import SimpleNamespace

import optuna
import pyarrow as pa
import pytest

from omninet.sweep import record
from omninet.sweep.config import PoolConstraints, load_config
from omninet.sweep.record import build_row
from omninet.sweep.state import Running
from omninet.sweep.dashboard import label
from omninet.sweep.records import MlflowRecorder, ParquetStore, tell_trial
from omninet.trial import TrialResult
from omninet.trial.config import column


@dataclass
class FlopsResult(TrialResult):
    gflops: float | None = column(label="compute", unit="GFLOP", optuna=True)  # the one declaration


def _config(tmp_path):
    return load_config({
        "name": "record", "results_dir": str(tmp_path / "results"),
        "trial_fn": "omninet.sweep.testing:toy_trial", "estimate_fn": "omninet.sweep.testing:toy_estimate",
        "trial": {"toy": {}}, "search_space": {"toy.x": {"low": 0.1, "high": 1.0}},
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "trials": 1}],
        "constraints": {"cpu": {"max_latency_ms": 5.0}},
    })


class _Client:
    """What MlflowRecorder._log_child calls on an MlflowClient, recorded."""

    def __init__(self) -> None:
        self.tags, self.metrics = {}, []

    def create_run(self, experiment_id, run_name, tags, start_time):
        self.tags = tags
        return SimpleNamespace(info=SimpleNamespace(run_id="r1"))

    def log_batch(self, run_id, metrics, params, tags):
        self.metrics += metrics

    def set_terminated(self, run_id, status, end_time):
        self.status = status


def _recorded(tmp_path, config=None, result=None):
    """A toy trial's result with the extra field, through the controller's row, the Parquet
    store, Optuna's tell and the MLflow recorder."""
    config = config or _config(tmp_path)
    store = ParquetStore(tmp_path / "trials", config)
    study = optuna.create_study(directions=[o.direction for o in config.objectives])
    trial = study.ask()
    params = {"toy.x": 0.5}
    run = Running("cpu", trial.number, trial._trial_id, params, config.trial_config(params))
    result = result or {"status": "ok", "accuracy": 0.7, "peak_memory_infer_mb": 80.0, "latency_p50_ms": 3.0,
                        "node": "n1", "device": "cpu", "gflops": 3.5}
    row = build_row(config, store.file_schema, run, result, simulated=False)
    store.write("cpu", row)
    tell_trial(study, trial._trial_id, row, config.objectives)
    recorder = MlflowRecorder("sqlite:///unused.db", config, None)
    recorder._client, recorder._experiment_id, recorder.parent_run_id = _Client(), "0", "parent"
    recorder._log_child("cpu", row)
    return row, store, study.trials[0], recorder._client


def test_one_field_reaches_every_store(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "RESULT_TYPE", FlopsResult)
    row, store, frozen, client = _recorded(tmp_path)
    assert row["gflops"] == 3.5
    assert store.file_schema.field("gflops").type == pa.float64()
    assert store.row("cpu", 0)["gflops"] == 3.5
    assert "gflops" in record.metric_names()
    assert {m.key: m.value for m in client.metrics}["gflops"] == 3.5
    assert frozen.state == optuna.trial.TrialState.COMPLETE and frozen.user_attrs["gflops"] == 3.5
    assert label("gflops") == "compute (GFLOP)"
    # the attributes every trial had before stay as they were
    assert frozen.user_attrs["status"] == "ok"
    assert frozen.user_attrs["placement"] == {"simulated": False, "node": "n1", "device": "cpu", "device_name": None,
                                              "cores": None}
    assert client.tags["status"] == "ok" and client.tags["node"] == "n1" and client.tags["device_name"] == ""


def test_without_the_subclass_no_store_has_it(tmp_path):
    row, store, frozen, client = _recorded(tmp_path)
    assert "gflops" not in row and "gflops" not in store.file_schema.names
    assert "gflops" not in {m.key for m in client.metrics} and "gflops" not in frozen.user_attrs
    assert label("gflops") == "gflops"


def test_the_latency_ratio_to_the_reference_reaches_every_store(tmp_path):
    """The paired timing's fields are plain TrialResult fields: Parquet columns, MLflow metrics
    (and the pairing as a tag), Optuna user attributes, and an objective's value in Optuna."""
    from omninet.sweep.results import RecordedTrial

    config = load_config({
        "name": "ratio", "results_dir": str(tmp_path / "results"), "trial_fn": "omninet.sweep.testing:toy_trial",
        "estimate_fn": None, "trial": {"toy": {}}, "search_space": {"toy.x": {"low": 0.1, "high": 1.0}},
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "trials": 1}],
        "objectives": [{"key": "accuracy", "direction": "maximize"}, {"key": "latency_ratio_ref", "direction": "minimize"}],
        "constraints": {"cpu": {"max_latency_ratio": 1.2}},
    }, runner=RecordedTrial())
    paired = {"latency_ratio_ref": 0.91, "latency_ratio_ref_lo": 0.89, "latency_ratio_ref_hi": 0.93,
              "throughput_ratio_ref": 1.08, "throughput_ratio_ref_lo": 1.05, "throughput_ratio_ref_hi": 1.11}
    result = {"status": "ok", "accuracy": 0.7, "latency_p50_ms": 3.0, "latency_ref_p50_ms": 3.3,
              "latency_pairing": "base", **paired}
    row, store, frozen, client = _recorded(tmp_path, config, result)
    assert {k: store.row("cpu", 0)[k] for k in paired} == paired
    assert store.file_schema.field("latency_pairing").type == pa.string()
    metrics = {m.key: m.value for m in client.metrics}
    assert {k: metrics[k] for k in paired} == paired and metrics["latency_ref_p50_ms"] == 3.3
    assert client.tags["latency_pairing"] == "base"
    assert frozen.values == [0.7, 0.91] and {k: frozen.user_attrs[k] for k in paired} == paired
    assert frozen.user_attrs["latency_pairing"] == "base"
    assert row["constraint_latency_ratio"] == pytest.approx(0.91 - 1.2) and row["feasible"]
    assert label("latency_ratio_ref") == "latency / reference"


def test_trial_result_stays_a_plain_dataclass():
    result = TrialResult("ok", accuracy=0.5)
    assert pickle.loads(pickle.dumps(result)) == result
    defaults = {f.name: f.default for f in fields(TrialResult) if f.name != "status"}
    assert all(v is None for k, v in defaults.items() if k not in ("steps", "rung_steps", "rung_accuracy", "rung_noise",
                                                                    "loss_curve"))
    assert TrialResult("ok").steps == 0 and TrialResult("ok").loss_curve == []


def test_pool_constraints_own_the_limit_column_pairing():
    c = PoolConstraints(max_memory_mb=500.0, max_latency_ms=5.0)
    assert c.limits() == {"peak_memory_train_mb": 500.0, "latency_p50_ms": 5.0}
    assert PoolConstraints(max_latency_ms=5.0).limits() == {"latency_p50_ms": 5.0}
    assert c.excess({"peak_memory_train_mb": 600.0, "latency_p50_ms": 4.0}) == {
        "memory": 100.0, "latency": -1.0, "latency_ratio": None, "prefill": None, "decode": None, "kv_cache": None}
    ratio = PoolConstraints(max_latency_ratio=0.9)
    assert ratio.limits() == {"latency_ratio_ref": 0.9}
    assert ratio.excess({"latency_ratio_ref": 0.95})["latency_ratio"] == pytest.approx(0.05)
    assert {f"constraint_{n}" for n in PoolConstraints.names()} <= set(record.columns())


def test_optuna_state_of_each_status():
    states = {s: record.optuna_state(s).name for s in ("ok", "infeasible", "screened", "pruned", "error", "oom")}
    assert states == {"ok": "COMPLETE", "infeasible": "COMPLETE", "screened": "PRUNED", "pruned": "PRUNED",
                      "error": "FAIL", "oom": "FAIL"}


def test_recommend_bounds_the_column_the_pool_constraint_bounds(tmp_path):
    from test_dashboard import write_results

    from omninet.sweep.results import SweepResult

    result = SweepResult.load(write_results(tmp_path / "synthetic"))
    # gpu trials: training peaks 220, 340, 360 MB (inference 110, 170, 180); the best is #1
    assert result._recommend_row("gpu")["trial_number"] == 1
    assert result._recommend_row("gpu", max_memory_mb=300.0)["trial_number"] == 0
    assert result.aggregate("gpu")["peak_memory_train_mb_mean"].tolist() == [220.0, 340.0, 360.0]
