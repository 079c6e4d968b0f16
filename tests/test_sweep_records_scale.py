"""Records at cluster scale, against real servers started here on 127.0.0.1: PostgreSQL (initdb
into a temporary directory, as an unprivileged user when root) for Optuna and for an MLflow
tracking server's backend store, on a 3-node local Ray cluster. Covers: a sweep whose three
records agree; one controller per sweep (a second exits 2 naming the holder; a killed one's
lock and half-written runs are recovered); two sweeps from two drivers on one store at once;
MLflow stopped and restarted mid-sweep; PostgreSQL restarted mid-sweep."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("psycopg2", reason="the postgres extra: pip install -e '.[postgres]'")

from omninet.sweep import SweepResult, run_sweep  # noqa: E402
from omninet.sweep.localservers import LocalMlflowServer, LocalPostgres, postgres_bin  # noqa: E402
from omninet.sweep.lock import ControllerId, FileSweepLock, PostgresSweepLock, SweepLockedError  # noqa: E402

pytestmark = pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL server binaries missing (make test installs them)")

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def pg():
    """A throwaway PostgreSQL with a database ``optuna``: (server, its URL). The lock tests need
    only this; the sweeps also need :func:`stack`."""
    server = LocalPostgres().start()
    try:
        yield server, server.create_database("optuna")
    finally:
        server.close()


@pytest.fixture(scope="module")
def stack(pg, ray_cluster, tmp_path_factory):
    """PostgreSQL (databases ``optuna`` and ``mlflow``), an MLflow tracking server on it with a
    file artifact destination, and a 3-node Ray cluster: the session head (tests/conftest.py)
    and two workers of 1 CPU + {'slot': 1}. The server imports for seconds: it starts while the
    workers come up."""
    server, optuna_url = pg
    mlflow = LocalMlflowServer(server.create_database("mlflow"), tmp_path_factory.mktemp("mlflow") / "artifacts").launch()
    try:
        for _ in range(2):
            ray_cluster.add_node(num_cpus=1, resources={"slot": 1})
        ray_cluster.wait_for_nodes()
        mlflow.wait()
        yield SimpleNamespace(pg=server, optuna_url=optuna_url, mlflow=mlflow, cluster=ray_cluster)
    finally:
        mlflow.stop()


def config(stack, name: str, results: Path, *, trials: int, concurrency: int = 1, sleep_s: float = 0.1,
           resources: dict | None = None, **toy) -> dict:
    return {
        "name": name, "results_dir": str(results), "trial_fn": "omninet.sweep.testing:toy_trial", "estimate_fn": None,
        "trial": {"toy": {"sleep_s": sleep_s, **toy}},
        "search_space": {"toy.x": {"low": 0.05, "high": 1.0}, "toy.y": {"choices": [1, 2, 3]}},
        "pools": [{"name": "cpu", "resources": resources or {"CPU": 1}, "concurrency": concurrency, "trials": trials}],
        "sampler": {"kind": "random", "seed": 0},
        "storage": {"optuna_url": stack.optuna_url, "mlflow_uri": stack.mlflow.uri, "retry_s": 60},
        "progress_interval_s": 0.5,
        "oversubscribe": True,  # three simulated nodes on this machine's cores; nothing here measures speed
    }


def parquet_count(results: Path) -> int:
    return len(list((results / "trials").glob("pool=*/*.parquet")))


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def in_thread(cfg: dict) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["result"] = run_sweep(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def joined(thread: threading.Thread, box: dict, timeout: float = 180) -> SweepResult:
    thread.join(timeout)
    assert not thread.is_alive(), "the sweep did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"]


def driver(stack, cfg: dict, path: Path) -> subprocess.Popen:
    """A second driver process (``sweeps/run.py``) joining the same Ray cluster."""
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen([sys.executable, str(ROOT / "sweeps" / "run.py"), "--config", str(path),
                             "--address", stack.cluster.address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def trial_runs(stack, sweep: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow.uri)
    exp = client.get_experiment_by_name(sweep)
    return [] if exp is None else client.search_runs([exp.experiment_id], "tags.`omninet.role` = 'trial'", max_results=1000)


@pytest.mark.slow  # each test here: 5-60 s on 2 busy cores (server and worker start-ups)
def test_postgres_sweep_on_three_nodes_records_agree(stack, tmp_path) -> None:
    import optuna
    from mlflow import MlflowClient

    result = run_sweep(config(stack, "pg-agree", tmp_path / "r", trials=9, concurrency=3, sleep_s=0.3))
    assert result.audit() == []  # Optuna (PostgreSQL), Parquet and MLflow (tracking server) agree
    df = result.trials()
    assert len(df) == 9 and (df.status == "ok").all()
    assert df.node_id.nunique() >= 2  # spread over the cluster's nodes
    study = optuna.load_study(study_name="pg-agree.cpu", storage=stack.optuna_url)
    assert len(study.trials) == 9
    runs = trial_runs(stack, "pg-agree")
    assert len(runs) == 9 and len({r.data.tags["omninet.controller"] for r in runs}) == 1
    assert {r.data.tags["omninet.controller_host"] for r in runs} == {HOST}
    client = MlflowClient(stack.mlflow.uri)
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED"
    assert {"recommended.yaml", "trials"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert (stack.mlflow.artifacts).rglob("recommended.yaml")  # served from the artifact destination


@pytest.mark.slow
def test_many_drivers_one_store(stack, tmp_path, capsys) -> None:
    """Driver 1 runs sweep alpha; a second controller on alpha exits 2 naming it (host, PID)
    before writing anything; driver 2 runs sweep beta on the same store meanwhile, touching none
    of alpha's runs or trials; driver 1 is killed and alpha resumed: the dead controller's lock
    is recovered with no manual step, and only its unfinished runs of alpha are cleaned up."""
    import optuna
    from mlflow import MlflowClient

    from omninet.sweep.cli import sweep_main

    a_dir, pause = tmp_path / "alpha", tmp_path / "pause"
    a_cfg = config(stack, "pg-alpha", a_dir, trials=40, sleep_s=0.3, resources={"slot": 1}, pause_file=str(pause))
    b_cfg = config(stack, "pg-beta", tmp_path / "beta", trials=6, concurrency=2, sleep_s=0.2)
    alpha = driver(stack, a_cfg, tmp_path / "alpha.yaml")
    client = MlflowClient(stack.mlflow.uri)
    try:
        wait_for(lambda: parquet_count(a_dir) >= 2 or alpha.poll() is not None, 120, "alpha's first trials")
        assert alpha.poll() is None, alpha.stdout.read().decode()[-3000:]
        manifest = (a_dir / "sweep.yaml").stat().st_mtime_ns
        capsys.readouterr()
        assert sweep_main(["--config", str(tmp_path / "alpha.yaml"), "--address", stack.cluster.address]) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # not Ray's worker logs
        assert len(lines) == 1 and f"pid {alpha.pid}" in lines[0] and f"host {HOST}" in lines[0], lines
        err = lines[0]
        assert (a_dir / "sweep.yaml").stat().st_mtime_ns == manifest  # nothing written
        alpha_id = re.search(r"controller (\w+) on host", err).group(1)
        alpha_done = {r.info.run_id for r in trial_runs(stack, "pg-alpha") if r.info.status == "FINISHED"}
        thread, box = in_thread(b_cfg)  # driver 2 (this process), while alpha's trials run
        wait_for(lambda: parquet_count(tmp_path / "beta") >= 1 or not thread.is_alive(), 120, "beta's first trial")
        assert alpha.poll() is None and parquet_count(a_dir) < 40, "alpha finished before beta began: raise its budget"
        pause.touch()  # alpha's next trials wait: it will be killed mid-sweep, trials in flight
        beta = joined(thread, box)
        # beta never touched alpha's runs (alpha itself never deletes a finished one)
        assert alpha_done <= {r.info.run_id for r in trial_runs(stack, "pg-alpha")}
        # a run alpha was writing when it died, and a live run of beta's (another controller):
        # alpha's resume deletes the first and must leave the second alone
        half = client.create_run(client.get_experiment_by_name("pg-alpha").experiment_id, tags={
            "omninet.role": "trial", "omninet.sweep": "pg-alpha", "omninet.trial_key": "cpu/999",
            "omninet.controller": alpha_id})
        live = client.create_run(client.get_experiment_by_name("pg-beta").experiment_id, tags={
            "omninet.role": "trial", "omninet.sweep": "pg-beta", "omninet.trial_key": "cpu/999",
            "omninet.controller": "beta-still-running"})
    finally:
        alpha.send_signal(signal.SIGKILL)
        alpha.wait()
        pause.unlink(missing_ok=True)
    alpha_result = run_sweep(a_cfg)  # the same sweep again
    assert alpha_result.audit() == []
    assert client.get_run(half.info.run_id).info.lifecycle_stage == "deleted"
    assert client.get_run(live.info.run_id).info.lifecycle_stage == "active"
    assert client.get_run(live.info.run_id).info.status == "RUNNING"
    client.delete_run(live.info.run_id)  # the planted run is not one of beta's trials
    assert beta.audit() == []
    for name, n in (("pg-alpha", 40), ("pg-beta", 6)):
        trials = optuna.load_study(study_name=f"{name}.cpu", storage=stack.optuna_url).trials
        assert len(trials) == n and all(t.state.name == "COMPLETE" for t in trials)  # budget held, nothing twice
        runs = trial_runs(stack, name)
        assert len(runs) == n and {r.data.tags["omninet.sweep"] for r in runs} == {name}
    assert len({r.data.tags["omninet.controller"] for r in trial_runs(stack, "pg-alpha")}) == 2  # killed + resumed


@pytest.mark.slow
def test_mlflow_stopped_and_restarted_mid_sweep(stack, tmp_path) -> None:
    """Trials go on while MLflow is down; its runs are backfilled mid-sweep once it is back."""
    results, pause = tmp_path / "r", tmp_path / "pause"
    thread, box = in_thread(config(stack, "pg-mlflow-outage", results, trials=10, sleep_s=0.2, pause_file=str(pause)))
    try:
        wait_for(lambda: parquet_count(results) >= 2, 120, "two trials")
        pause.touch()  # trials wait at their start while the test stops and starts servers
        stack.mlflow.stop()
        down_at = parquet_count(results)
        pause.unlink()
        wait_for(lambda: parquet_count(results) >= down_at + 2, 60, "trials recorded while MLflow is down")
        pause.touch()
        stack.mlflow.start()  # on the same port; it imports for seconds
        recorded = parquet_count(results)
        assert thread.is_alive() and recorded < 10
        wait_for(lambda: len(trial_runs(stack, "pg-mlflow-outage")) >= recorded, 60, "the backfill")
    finally:
        pause.unlink(missing_ok=True)
        if not stack.mlflow.healthy():
            stack.mlflow.start()
    result = joined(thread, box)
    assert result.audit() == []  # nothing lost, nothing written twice
    assert len(result.trials()) == 10


@pytest.mark.slow
def test_postgres_restarted_mid_sweep(stack, tmp_path) -> None:
    """The controller retries with bounded backoff, takes its lock again and records each trial
    once; MLflow (on the same PostgreSQL) catches up."""
    import optuna

    import logging

    results, seen = tmp_path / "r", []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    sweep_log = logging.getLogger("omninet.sweep")
    level = sweep_log.level
    sweep_log.setLevel(logging.INFO)  # "held again" is INFO, whatever level earlier tests left
    sweep_log.addHandler(handler)
    try:
        thread, box = in_thread(config(stack, "pg-restart", results, trials=10, concurrency=2, sleep_s=0.3))
        wait_for(lambda: parquet_count(results) >= 3, 120, "three trials")
        stack.pg.stop()
        try:  # down until the controller has met it down (a fixed pause can fall between its calls)
            wait_for(lambda: any("store unavailable" in m for m in seen), 60, "a store call while down")
            time.sleep(1.0)
        finally:
            stack.pg.start()
        result = joined(thread, box)
    finally:
        sweep_log.removeHandler(handler)
        sweep_log.setLevel(level)
    assert any("store unavailable" in m for m in seen) and any("sweep lock: held again" in m for m in seen), seen[-20:]
    assert result.audit() == []
    trials = optuna.load_study(study_name="pg-restart.cpu", storage=stack.optuna_url).trials
    assert sorted(t.number for t in trials) == list(range(10)) and all(t.state.name == "COMPLETE" for t in trials)
    assert sorted(result.trials().trial_number) == list(range(10))


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_lock_names_holder_and_is_recovered_after_kill(pg, tmp_path, kind) -> None:
    """A lock left by a killed controller is recovered by the next one, with no manual step."""
    optuna_url = pg[1]
    lock_file = tmp_path / "s.sweep.lock"
    make = (f"FileSweepLock('s', ControllerId(), {str(lock_file)!r})" if kind == "sqlite"
            else f"PostgresSweepLock('s', ControllerId(), {optuna_url!r})")
    code = ("import sys, time\nfrom omninet.sweep.lock import ControllerId, FileSweepLock, PostgresSweepLock\n"
            f"lock = {make}.acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = (FileSweepLock("s", ControllerId(), lock_file) if kind == "sqlite"
                else PostgresSweepLock("s", ControllerId(), optuna_url))
        with pytest.raises(SweepLockedError, match=rf"host {re.escape(HOST)}, pid {holder.pid}\b"):
            lock.acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = (FileSweepLock("s", ControllerId(), lock_file) if kind == "sqlite"
            else PostgresSweepLock("s", ControllerId(), optuna_url))
    deadline = time.time() + 10  # the server notices the killed client's closed socket at once
    while True:
        try:
            lock.acquire()
            break
        except SweepLockedError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    lock.release()


@pytest.mark.slow  # its stack: an MLflow server and two Ray workers, ~10-15 s to start
def test_trial_asked_but_never_sampled_is_run_with_fresh_params(stack, tmp_path) -> None:
    """A controller that died (or lost a store's reply) between ``ask`` and sampling leaves a
    RUNNING trial without parameters: the next controller samples it and runs it, under the
    same number, and the budget holds. (Also a whole sweep on SQLite under the file lock.)"""
    import optuna

    results = tmp_path / "r"
    cfg = config(stack, "unsampled", results, trials=3)
    cfg["storage"] = {"mlflow_uri": stack.mlflow.uri}  # Optuna on the default SQLite file
    results.mkdir()
    study = optuna.create_study(storage=f"sqlite:///{results / 'optuna.db'}", study_name="unsampled.cpu",
                                directions=["maximize", "minimize", "minimize"])
    study.ask()
    result = run_sweep(cfg)
    assert result.audit() == []
    df = result.trials()
    assert sorted(df.trial_number) == [0, 1, 2] and df["param.toy.x"].notna().all()
    assert (results / "unsampled.sweep.lock").read_text() == ""  # released at the end
