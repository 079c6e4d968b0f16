"""Platform overhead: what the sweep machinery itself costs, measured through the real path
(Optuna ask/tell on SQLite, Ray task dispatch, Parquet write, MLflow log_batch on SQLite)
with the trivial trial of ``omninet.sweep.testing``.

    python benchmarks/platform_overhead.py [--trials 25] [--burn-s 2.0] [--reps 3] [--out FILE]

1. per-trial overhead: one pool, concurrency 1, trials that do nothing. Per trial, the time
   between consecutive records minus the time spent inside the trial function: dispatch +
   result transfer + Parquet + tell + MLflow + the next ask. Median (first trial excluded:
   worker start and MLflow schema creation). Target <= 0.3 s.
2. parallel throughput: trials that burn ``--burn-s`` of CPU in one Python thread; the same 4
   trials with concurrency 1 and with concurrency 2 (two pools' worth of cores on this 2-core
   machine). Throughput ratio, median over reps (after an untimed run that starts both
   worker processes). Target >= 1.8x.
JSON on stdout (and --out). Numbers are noisy when other work shares the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import ray

from omninet.sweep import run_sweep
from omninet.sweep.controller import log
from omninet.trial.measure import machine_facts
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)


def toy_sweep(name: str, root: Path, *, trials: int, concurrency: int, toy: dict) -> dict:
    return {
        "name": name, "results_dir": str(root / name),
        "trial_fn": "omninet.sweep.testing:toy_trial", "estimate_fn": None,
        "trial": {"toy": toy},
        "search_space": {"toy.x": {"low": 0.05, "high": 1.0}, "toy.y": {"choices": [1, 2, 3]}},
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "concurrency": concurrency, "trials": trials}],
        "sampler": {"kind": "tpe", "seed": 0},
        "storage": {"mlflow_uri": f"sqlite:///{root / 'mlflow.db'}"},
        "progress_interval_s": 60.0,
    }


def overhead(root: Path, trials: int) -> dict:
    df = run_sweep(toy_sweep("overhead", root, trials=trials, concurrency=1, toy={})).trials()
    df = df.sort_values("finished_at")
    inside = df["result_json"].map(lambda s: json.loads(s)["worker_seconds"])
    cycle = df["finished_at"].diff().iloc[1:]
    per_trial = (cycle - inside.iloc[1:]).tolist()
    return {"trials": trials, "samples": len(per_trial), "median_s": float(statistics.median(per_trial)),
            "p90_s": float(sorted(per_trial)[int(0.9 * (len(per_trial) - 1))]), "min_s": float(min(per_trial)),
            "median_cycle_s": float(statistics.median(cycle.tolist())), "target_median_s": 0.3}


def throughput(root: Path, name: str, *, concurrency: int, burn_s: float, trials: int) -> tuple[float, float]:
    """(trials per second over the sweep's trial phase, median wall seconds inside one trial).
    A trial burns ``burn_s`` of its own thread's CPU time, so its wall time exceeds ``burn_s``
    only when it waits for a core: the second number shows CPU contention."""
    df = run_sweep(toy_sweep(name, root, trials=trials, concurrency=concurrency, toy={"burn_s": burn_s})).trials()
    started = (df["finished_at"] - df["duration_s"]).min()
    inside = df["train_seconds"]
    return float(trials / (df["finished_at"].max() - started)), float(inside.median())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--burn-s", type=float, default=2.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    log.disabled = True  # keep stdout for the JSON
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            over = overhead(root, args.trials)
            # untimed: start the second worker process, as a sweep's first trials do once
            throughput(root, "warmup", concurrency=2, burn_s=0.1, trials=2)
            one, two, wall1, wall2 = [], [], [], []
            for rep in range(args.reps):  # interleaved, so drifting background load hits both alike
                rate, wall = throughput(root, f"serial-{rep}", concurrency=1, burn_s=args.burn_s, trials=4)
                one.append(rate), wall1.append(wall)
                rate, wall = throughput(root, f"parallel-{rep}", concurrency=2, burn_s=args.burn_s, trials=4)
                two.append(rate), wall2.append(wall)
    finally:
        ray.shutdown()
    ratios = [b / a for a, b in zip(one, two)]
    report = {
        "benchmark": "platform_overhead",
        "machine": {**machine_facts(), "python": sys.version.split()[0], "platform": platform.platform(), "ray": ray.__version__},
        "per_trial_overhead": over,
        "parallel_throughput": {
            "burn_s_per_trial": args.burn_s, "trials_per_run": 4, "reps": args.reps,
            "trials_per_s_concurrency_1": one, "trials_per_s_concurrency_2": two,
            "ratio_per_rep": ratios, "median_ratio": statistics.median(ratios), "target_ratio": 1.8,
            "median_trial_wall_s_concurrency_1": statistics.median(wall1),
            "median_trial_wall_s_concurrency_2": statistics.median(wall2),
            "load_average_1min_at_end": os.getloadavg()[0],
        },
        "targets_met": {"overhead": bool(over["median_s"] <= 0.3), "throughput": bool(statistics.median(ratios) >= 1.8)},
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
