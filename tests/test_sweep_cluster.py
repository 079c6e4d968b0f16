"""The platform on a simulated heterogeneous multi-node Ray cluster (``ray.cluster_utils``),
with the tiny trial function of ``omninet.sweep.testing``: a sweep completes and its three
records agree; worker death, node removal, controller death and an unavailable MLflow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pytest
import yaml

ray = pytest.importorskip("ray")

from omninet.sweep import SweepConfigError, SweepResult, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY_FN = "omninet.sweep.testing:toy_trial"


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """The session cluster (tests/conftest.py: a 2-CPU head) and, for this module, a node with
    1 CPU + {'slot': 1, 'rm': 1} and a worker 'gpu' with 1 CPU + a fake GPU (no CUDA:
    simulated) + {'slot': 1}. Tests may add and remove nodes."""
    ray_cluster.add_node(num_cpus=1, resources={"slot": 1, "rm": 1})
    ray_cluster.add_node(num_cpus=1, num_gpus=1, resources={"slot": 1})
    ray_cluster.wait_for_nodes()
    return ray_cluster


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    # one MLflow store for the module: creating its schema costs seconds on 2 cores
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def toy_config(name: str, results_dir: Path, mlflow_uri: str, **overrides) -> dict:
    cfg = {
        "name": name, "results_dir": str(results_dir), "trial_fn": TOY_FN,
        "estimate_fn": "omninet.sweep.testing:toy_estimate",
        "trial": {"toy": {"sleep_s": 0.05}},
        "search_space": {"toy.x": {"low": 0.05, "high": 1.0}, "toy.y": {"choices": [1, 2, 3]}},
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "trials": 5}],
        "sampler": {"kind": "tpe", "seed": 0, "n_startup_trials": 3},
        "storage": {"mlflow_uri": mlflow_uri},
        "progress_interval_s": 1.0,
    }
    cfg.update(overrides)
    return cfg


def parquet_files(results_dir: Path) -> list[Path]:
    return sorted((results_dir / "trials").glob("pool=*/*.parquet"))


def test_sweep_completes_records_agree(cluster, mlflow_uri, tmp_path) -> None:
    results = tmp_path / "agree"
    cfg = toy_config("agree", results, mlflow_uri,
                     pools=[{"name": "cpu", "resources": {"CPU": 1}, "trials": 5},
                            {"name": "gpu", "resources": {"GPU": 1, "CPU": 1}, "trials": 6}],
                     constraints={"gpu": {"max_memory_mb": 420}, "cpu": {"max_latency_ms": 4.0}},
                     simulate_accelerators=True)
    result = run_sweep(cfg)
    assert result.audit() == []  # Optuna, Parquet and MLflow hold the same trials and values
    df = result.trials()
    assert sorted(df.groupby("pool").size().items()) == [("cpu", 5), ("gpu", 6)]
    gpu, cpu = df[df.pool == "gpu"], df[df.pool == "cpu"]
    assert gpu.simulated.all() and not cpu.simulated.any()
    gpu_node = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")][0]
    assert set(gpu[gpu.status == "ok"].node_id) == {gpu_node}
    infeasible = gpu[gpu.status == "infeasible"]
    assert len(infeasible) >= 1 and (infeasible.estimated_memory_mb > 420).all()
    assert infeasible.accuracy.isna().all()  # never ran
    assert (gpu[gpu.status == "ok"].estimated_memory_mb <= 420).all()
    # the Pareto front comes from Optuna and holds feasible trials only
    for pool in ("cpu", "gpu"):
        front = result.pareto_front(pool)
        assert len(front) >= 1 and front.feasible.all() and (front.status == "ok").all()
    assert (result.pareto_front("cpu").latency_p50_ms <= 4.0).all()
    best = result.recommend("gpu", max_latency_ms=3.0)
    assert set(best) == {"toy"} and 1.0 + 4.0 * best["toy"]["x"] * best["toy"]["y"] <= 3.0
    with pytest.raises(ValueError, match="relax"):
        result.recommend("gpu", min_accuracy=1.01)
    # other readers: pyarrow dataset, pandas, duckdb; reopen without the controller
    table = ds.dataset(results / "trials", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 11
    assert len(pd.read_parquet(results / "trials")) == 11
    n = duckdb.sql(f"select count(*) from read_parquet('{results}/trials/*/*.parquet', hive_partitioning=true) "
                   "where pool = 'gpu'").fetchall()[0][0]
    assert n == 6
    again = SweepResult.load(results)
    assert len(again.trials()) == 11 and again.recommend("gpu", max_latency_ms=3.0) == best
    from omninet.sweep.cli import recommend_main

    assert recommend_main([str(results), "--pool", "gpu", "--max-latency-ms", "3.0", "--out", str(tmp_path / "r.yaml")]) == 0
    assert yaml.safe_load((tmp_path / "r.yaml").read_text()) == best
    # end-of-sweep artifacts, also on the MLflow parent run
    art = results / "artifacts"
    assert (art / "pareto_cpu.html").stat().st_size > 1000 and (art / "pareto_gpu.html").is_file()
    recommended = yaml.safe_load((art / "recommended.yaml").read_text())
    assert recommended["gpu"]["simulated"] is True and "config" in recommended["cpu"]
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("agree")
    parent = client.search_runs([exp.experiment_id], "tags.`omninet.role` = 'parent'")[0]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "pareto_cpu.html", "pareto_gpu.html", "recommended.yaml", "trials"}
    child = client.search_runs([exp.experiment_id], "tags.pool = 'gpu' and tags.status = 'ok'")[0]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["simulated"] == "true" and child.info.run_name.startswith("gpu ")
    assert {"accuracy", "latency_p50_ms", "peak_memory_infer_mb"} <= set(child.data.metrics)
    assert len(client.get_metric_history(child.info.run_id, "train_loss")) == 20
    assert child.data.params["toy.sleep_s"] == "0.05"


@pytest.mark.slow  # ~20-40 s: worker restarts, a node lifecycle, two driver processes
def test_worker_death_is_retried_then_recorded(cluster, mlflow_uri, tmp_path) -> None:
    marker = tmp_path / "crashed-once"
    results = tmp_path / "crash-once"
    run_sweep(toy_config("crash-once", results, mlflow_uri,
                         trial={"toy": {"sleep_s": 0.05, "crash_marker": str(marker), "started_dir": str(tmp_path / "s")}},
                         pools=[{"name": "cpu", "resources": {"slot": 1}, "trials": 3, "max_retries": 2}]))
    df = SweepResult.load(results).trials()
    assert marker.exists() and (df.status == "ok").all() and len(df) == 3
    assert len(list((tmp_path / "s").iterdir())) == 4  # 3 trials + the retried attempt

    # a trial that kills its worker every time: retried, then recorded as crashed; the sweep goes on
    results = tmp_path / "crash-pool"
    cfg = toy_config("crash-pool", results, mlflow_uri, trial={"toy": {"sleep_s": 0.05, "crash_always": True}},
                     pools=[{"name": "bad", "resources": {"slot": 1}, "trials": 2, "max_retries": 1}])
    result = run_sweep(cfg)
    df = result.trials()
    assert (df.status == "crashed").all() and len(df) == 2
    assert df.error.str.contains("after 1 retries").all() and df.error.str.contains("Worker|worker").all()
    assert result.audit() == []


@pytest.mark.slow  # ~20-40 s: worker restarts, a node lifecycle, two driver processes
def test_node_removed_mid_sweep(cluster, mlflow_uri, tmp_path) -> None:
    extra = cluster.add_node(num_cpus=1, resources={"rm": 1})
    cluster.wait_for_nodes()
    started = tmp_path / "started"
    results = tmp_path / "node-loss"
    cfg = toy_config("node-loss", results, mlflow_uri, trial={"toy": {"sleep_s": 2.5, "started_dir": str(started)}},
                     pools=[{"name": "rm", "resources": {"rm": 1}, "concurrency": 2, "trials": 4}])
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", run_sweep(cfg)))
    thread.start()
    def worker_pids() -> set[str]:
        return {p.name.split("-")[0] for p in started.glob("*")}

    deadline = time.time() + 90
    while time.time() < deadline and len(worker_pids()) < 2:  # a trial running on each node
        time.sleep(0.05)
    assert len(worker_pids()) >= 2, "the two nodes never ran trials at the same time"
    cluster.remove_node(extra)  # one of the running trials was on it
    thread.join(timeout=120)
    assert not thread.is_alive()
    df = box["result"].trials()
    assert len(df) == 4 and (df.status == "ok").all()
    assert len(list(started.glob("*"))) >= 5  # the lost trial ran again on the surviving node
    assert len(set(df.node_id)) == 1  # every recorded result came from the surviving node
    assert box["result"].audit() == []


@pytest.mark.slow  # ~20-40 s: worker restarts, a node lifecycle, two driver processes
def test_controller_killed_then_resumed(cluster, mlflow_uri, tmp_path) -> None:
    results = tmp_path / "resume"
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(toy_config(
        "resume", results, mlflow_uri, trial={"toy": {"sleep_s": 1.5}},
        pools=[{"name": "slot", "resources": {"slot": 1}, "concurrency": 2, "trials": 6}])))
    cmd = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--config", str(path), "--address", cluster.address]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(parquet_files(results)) < 2 and first.poll() is None:
        time.sleep(0.1)
    assert first.poll() is None, first.stdout.read().decode()[-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = len(parquet_files(results))
    assert 2 <= done_before < 6
    import optuna

    study = optuna.load_study(study_name="resume.slot", storage=f"sqlite:///{results / 'optuna.db'}")
    running = [t.number for t in study.get_trials() if t.state.name == "RUNNING"]
    assert running, "the killed controller left no running trial to requeue"

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    import re

    found = re.search(r"(\d+) requeued from a previous controller(?:, (\d+) repaired from Parquet)?", second.stdout)
    # every orphan re-run, or told from its Parquet row when the kill fell between the two writes: none lost
    assert found and int(found.group(1)) + int(found.group(2) or 0) == len(running), second.stdout[-3000:]
    result = SweepResult.load(results)
    assert result.audit() == []
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)  # budget held, nothing duplicated
    assert sorted(result.trials().trial_number) == list(range(6))


def test_mlflow_unavailable_then_backfilled(cluster, tmp_path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where MLflow's directory should be")
    uri = f"sqlite:///{blocker / 'mlflow.db'}"
    results = tmp_path / "offline"
    cfg = toy_config("offline", results, uri)
    result = run_sweep(cfg)
    assert len(result.trials()) == 5 and len(result.study("cpu").trials) == 5
    assert any("MLflow unavailable" in p for p in result.audit())  # MLflow is behind
    blocker.unlink()  # the store comes back
    result = run_sweep(cfg)  # same command: nothing left to run, MLflow backfilled from Parquet
    assert result.audit() == []
    assert len(result.study("cpu").trials) == 5


def test_missing_accelerator_without_simulation_is_an_error(cluster, mlflow_uri, tmp_path) -> None:
    results = tmp_path / "nogpu"
    cfg = toy_config("nogpu", results, mlflow_uri, pools=[{"name": "gpu", "resources": {"GPU": 1}, "trials": 2}])
    with pytest.raises(SweepConfigError, match="simulate_accelerators: true"):
        run_sweep(cfg)
    assert not results.exists()
