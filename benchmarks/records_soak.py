"""Records soak: many trials of a trivial runner through the real controller, on the embedded
store (Optuna and MLflow on SQLite files) and on the cluster store (Optuna on PostgreSQL, MLflow
tracking server with a PostgreSQL backend store), each server started here on 127.0.0.1.

    python benchmarks/records_soak.py [--trials 1000] [--quick] [--out FILE]

Per backend, one sweep of ``--trials`` trials of ``omninet.sweep.testing:toy_trial`` (nothing to
do), one pool, concurrency 1, the random sampler (the platform's cost, not a sampler's, which
for TPE grows with the trial count):
- per-trial platform overhead: the time between consecutive records minus the time inside the
  trial task (dispatch, result transfer, Parquet, Optuna ask/tell, MLflow log_batch, lock
  check). Median over trials 2..N. Target <= 0.1 s.
- records lost or duplicated: ``SweepResult.audit()`` findings, plus each record's count
  against the budget. Target 0.
- controller memory: this process's RSS (the controller, the Ray driver and, on SQLite, the
  MLflow store in-process), sampled every 0.25 s; median of the samples in the second tenth of
  the run against the last tenth. Target growth <= 10%.
``--quick`` (smoke, ~25 s): 8 trials per backend and MLflow on the SQLite file for the
PostgreSQL backend too (a tracking server takes tens of seconds to import). JSON on stdout (and
--out), with the machine and the load average at start and end: other work on the machine
shows in the overhead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray

from omninet.sweep import run_sweep
from omninet.sweep.controller import log
from omninet.sweep.localservers import LocalMlflowServer, LocalPostgres
from omninet.trial.measure import machine_facts
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)


def sweep_config(name: str, root: Path, trials: int, storage: dict) -> dict:
    return {
        "name": name, "results_dir": str(root / name), "trial_fn": "omninet.sweep.testing:toy_trial",
        "estimate_fn": None, "trial": {"toy": {}},
        "search_space": {"toy.x": {"low": 0.05, "high": 1.0}, "toy.y": {"choices": [1, 2, 3]}},
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "concurrency": 1, "trials": trials}],
        "sampler": {"kind": "random", "seed": 0}, "storage": storage, "progress_interval_s": 60.0,
    }


class RssSampler(threading.Thread):
    def __init__(self, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.every_s, self.samples, self._done = every_s, [], threading.Event()
        self._proc = psutil.Process()

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.time(), self._proc.memory_info().rss / 2**20))
            self._done.wait(self.every_s)

    def stop(self) -> list[tuple[float, float]]:
        self._done.set()
        self.join()
        return self.samples


def soak(name: str, root: Path, trials: int, storage: dict) -> dict:
    load0 = os.getloadavg()[0]
    sampler = RssSampler()
    sampler.start()
    started = time.time()
    result = run_sweep(sweep_config(name, root, trials, storage))
    wall = time.time() - started
    samples = sampler.stop()
    df = result.trials().sort_values("finished_at")
    inside = df["result_json"].map(lambda s: json.loads(s)["worker_seconds"])
    per_trial = (df["finished_at"].diff().iloc[1:] - inside.iloc[1:]).tolist()
    problems = result.audit()
    from mlflow import MlflowClient

    client = MlflowClient(result.mlflow_uri)
    exp = client.get_experiment_by_name(name)
    mlflow_runs = len(client.search_runs([exp.experiment_id], "tags.`omninet.role` = 'trial'", max_results=50000))
    optuna_trials = len(result.study("cpu").trials)
    # memory over the trial phase only (not Ray start-up): the span between the first and last record
    t0, t1 = float(df["finished_at"].iloc[0]), float(df["finished_at"].iloc[-1])
    span = [(t, m) for t, m in samples if t0 <= t <= t1] or samples
    tenth = max(1, len(span) // 10)
    early = statistics.median(m for _, m in span[tenth:2 * tenth] or span[:1])
    late = statistics.median(m for _, m in span[-tenth:])
    return {
        "trials": trials, "wall_s": wall, "trial_phase_s": t1 - t0, "trials_per_s": (len(df) - 1) / max(t1 - t0, 1e-9),
        "overhead_median_s": statistics.median(per_trial),
        "overhead_p90_s": sorted(per_trial)[int(0.9 * (len(per_trial) - 1))],
        "overhead_mean_s": statistics.fmean(per_trial),
        "records": {"parquet": len(df), "optuna": optuna_trials, "mlflow": mlflow_runs},
        "lost_or_duplicated": len(problems) + abs(len(df) - trials) + abs(optuna_trials - trials)
        + abs(mlflow_runs - trials),
        "audit_findings": problems[:20],
        "rss_mb": {"second_tenth_median": early, "last_tenth_median": late, "max": max(m for _, m in samples),
                   "samples": len(span)},
        "rss_growth_pct": 100.0 * (late - early) / early,
        "load_average_1min": {"start": load0, "end": os.getloadavg()[0]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="smoke: 8 trials per backend, no tracking server")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    trials = 8 if args.quick else args.trials

    log.disabled = True  # keep stdout for the JSON
    logging.getLogger("alembic").setLevel(logging.WARNING)
    machine = {**machine_facts(), "python": sys.version.split()[0], "platform": platform.platform(),
               "ray": ray.__version__}
    load_start = os.getloadavg()
    # address="local": a new embedded Ray, never a cluster another process left in /tmp/ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    pg = server = None
    backends = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            backends["sqlite"] = soak("soak-sqlite", root, trials, {"mlflow_uri": f"sqlite:///{root / 'mlflow.db'}"})
            pg = LocalPostgres(durable=True).start()  # PostgreSQL's defaults: fsync on
            optuna_url = pg.create_database("optuna")
            if args.quick:  # the same file: its schema costs seconds to create
                mlflow_uri = f"sqlite:///{root / 'mlflow.db'}"
            else:
                server = LocalMlflowServer(pg.create_database("mlflow"), root / "mlartifacts").start()
                mlflow_uri = server.uri
            backends["postgresql"] = soak("soak-postgresql", root, trials,
                                          {"optuna_url": optuna_url, "mlflow_uri": mlflow_uri})
            backends["postgresql"]["mlflow"] = "tracking server on PostgreSQL" if server else "SQLite file (--quick)"
            backends["sqlite"]["mlflow"] = "SQLite file"
    finally:
        if server is not None:
            server.stop()
        if pg is not None:
            pg.close()
        ray.shutdown()
    report = {
        "benchmark": "records_soak",
        "machine": machine,
        "conditions": {"trials_per_backend": trials, "quick": args.quick, "concurrency": 1, "sampler": "random",
                       "load_average_at_start": list(load_start), "load_average_at_end": list(os.getloadavg()),
                       "cores": os.cpu_count()},
        "backends": backends,
        "targets": {"overhead_median_s": 0.1, "lost_or_duplicated": 0, "rss_growth_pct": 10.0},
        "targets_met": {name: {"overhead": bool(b["overhead_median_s"] <= 0.1),
                               "records": bool(b["lost_or_duplicated"] == 0),
                               "memory": bool(b["rss_growth_pct"] <= 10.0)} for name, b in backends.items()},
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
