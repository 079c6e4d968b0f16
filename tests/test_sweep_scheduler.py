"""Measure first + multi-objective successive halving + the cost model through the real sweep
path (Ray, Optuna, Parquet, MLflow) with the rung-aware toy runner of ``omninet.sweep.testing``
(known objective values): screened and pruned trials agree across the three records, the
cost model's validation split never holds a trial it screened, and a controller killed
mid-rung resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from omninet.sweep import SweepResult, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """The session cluster (tests/conftest.py): one 2-CPU head."""
    return ray_cluster


def sweep_config(name: str, results: Path, **overrides) -> dict:
    cfg = {
        "name": name, "results_dir": str(results), "trial_fn": "omninet.sweep.testing:rung_toy", "estimate_fn": None,
        "trial": {"toy": {"steps": 27, "step_s": 0.0, "rung_noise": 0.001}},
        "search_space": {"toy.x": {"low": 0.05, "high": 1.0}, "toy.y": {"choices": [1, 2, 3]}},
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "trials": 16}],
        "constraints": {"cpu": {"max_latency_ms": 6.0}},
        "scheduler": {"kind": "mo_successive_halving", "reduction_factor": 3, "screen_dominated_by": 2},
        "cost_model": {"enabled": True, "min_fit": 3, "holdout_every": 3, "screen_tolerance": 0.1},
        "sampler": {"kind": "random", "seed": 3},
        "keep_models": "none", "oversubscribe": True, "progress_interval_s": 1.0,
    }
    cfg.update(overrides)
    return cfg


@pytest.mark.slow  # a 16-trial sweep on a Ray cluster with MLflow and the dashboard (~20 s idle, more under load)
def test_screened_and_pruned_trials_agree_across_records(cluster, tmp_path) -> None:
    results = tmp_path / "mosh"
    result = run_sweep(sweep_config("mosh", results))
    df = result.trials()
    statuses = set(df.status)
    assert {"ok", "screened", "pruned"} <= statuses, df.status.value_counts()
    assert result.audit() == []  # Optuna (PRUNED), Parquet and MLflow hold the same trials and statuses
    states = {t.number: t.state.name for t in result.study("cpu").trials}
    for _, row in df.iterrows():
        assert states[row.trial_number] == {"ok": "COMPLETE", "screened": "PRUNED", "pruned": "PRUNED"}[row.status]
    # measure first: a configuration over the latency limit never trains
    over = df[(df.status == "screened") & (df.screened_by == "measure_first")]
    assert len(over) and over.error.str.contains("screened").all()
    assert (over.steps == 0).all() and over.accuracy.isna().all()
    # a pruned trial keeps its partial record: accuracy at its last rung, the measure-first costs
    pruned = df[df.status == "pruned"]
    for _, row in pruned.iterrows():
        rungs = json.loads(row.result_json)
        assert row.steps == rungs["rung_steps"][-1] < 27 and row.accuracy == pytest.approx(rungs["rung_accuracy"][-1])
        assert rungs["rung_noise"] == [0.001] * len(rungs["rung_steps"])  # told to the book with each rung
        assert "standard error" in row.error
        assert row.latency_p50_ms == pytest.approx(1.0 + 4.0 * row["param.toy.x"] * row["param.toy.y"])
    # finished trials trained to the budget; front trials are feasible and ok
    assert (df[df.status == "ok"].steps == 27).all()
    front = result.pareto_front("cpu")
    assert len(front) and (front.status == "ok").all()
    # the cost model: screened proposals never ran and are in neither split; held-out trials were never fitted
    by_model = df[df.screened_by == "cost_model"]
    assert by_model.cost_split.isna().all() and by_model.predicted_latency_ms.notna().all()
    assert (by_model.predicted_latency_ms * 0.9 > 6.0).all() and by_model.error.str.contains("held-out MAPE").all()
    report = result.cost_model("cpu")
    fit, held = set(report["fit_trials"]), set(report["holdout_trials"])
    assert held and not fit & held and not (fit | held) & set(by_model.trial_number)
    assert set(df[df.cost_split == "holdout"].trial_number) == held
    assert report["validation"]["latency_p50_ms"]["mape"] < 0.02  # the toy's costs are linear in x*y
    assert report["online"]["latency_p50_ms"]["n"] >= 1
    # MLflow has the decisions as tags; the dashboard shows them
    from mlflow import MlflowClient

    client = MlflowClient(result.mlflow_uri)
    exp = client.get_experiment_by_name("mosh")
    runs = client.search_runs([exp.experiment_id], "tags.status = 'screened'")
    assert {r.data.tags.get("screened_by") for r in runs} <= {"measure_first", "cost_model"} and runs
    html = (results / "artifacts" / "dashboard.html").read_text()
    assert "Cost model" in html and "pruned" in html and "screened" in html


@pytest.mark.slow  # two controller processes, one killed mid-rung (~30 s idle)
def test_controller_killed_mid_rung_resumes(cluster, tmp_path) -> None:
    results = tmp_path / "resume"
    pause = tmp_path / "hold"
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(sweep_config(
        "resume", results, trial={"toy": {"steps": 27, "step_s": 0.02, "pause_file": str(pause)}},
        pools=[{"name": "cpu", "resources": {"CPU": 1}, "concurrency": 2, "trials": 8}],
        cost_model={"enabled": False})))
    cmd = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--config", str(path), "--address", cluster.address]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(results.glob("trials/pool=*/*.parquet"))) < 3 and first.poll() is None:
        time.sleep(0.05)
    pause.touch()  # the running trials stop between steps: past a rung or before one, but not done
    time.sleep(1.0)
    assert first.poll() is None, first.stdout.read().decode()[-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = SweepResult.load(results).trials()
    assert 3 <= len(before) < 8
    import optuna

    study = optuna.load_study(study_name="resume.cpu", storage=f"sqlite:///{results / 'optuna.db'}")
    assert any(t.state.name == "RUNNING" for t in study.get_trials()), "no trial was in flight at the kill"
    rung_records = sum(len(json.loads(r)["rung_steps"]) for r in before.result_json)
    pause.unlink()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"rung book restored from Parquet: {rung_records} rung record(s)" in second.stdout, second.stdout[-3000:]
    result = SweepResult.load(results)
    assert result.audit() == []
    after = result.trials()
    assert sorted(after.trial_number) == list(range(8))  # the budget held, nothing duplicated
    kept = after.set_index("trial_number").loc[before.trial_number]
    assert list(kept.status) == list(before.status)  # decisions made before the kill stand
    assert {t.state.name for t in result.study("cpu").trials} <= {"COMPLETE", "PRUNED"}
