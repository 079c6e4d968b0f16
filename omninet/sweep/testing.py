"""A tiny, fast trial function for testing and benchmarking the platform itself (in the
spirit of ``optuna.testing``): a closed-form trade-off instead of training a model, plus
switches that make a trial crash its worker, sleep or burn one CPU core.

The trial reads the ``toy`` section of its trial config::

    toy:
      x: 0.3            # searched; accuracy rises with x and y ...
      y: 2              # ... and so do memory and latency: a real trade-off
      sleep_s: 0.0      # wall time to spend (I/O-like)
      burn_s: 0.0       # CPU time to spend in one Python thread
      crash_marker: /tmp/m   # os._exit the worker once: if this file does not exist, create it and die
      crash_always: false    # os._exit the worker on every attempt
      started_dir: /tmp/s    # touch <started_dir>/<pid> when the trial starts
      pause_file: /tmp/p     # while this file exists the trial waits before it starts (at most 300 s)
      scores: 500            # also return per-unit eval scores (omninet.scores) over this many eval rows
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from omninet.scores import UnitScores
from omninet.trial.measure import MeasureGate
from omninet.trial.runners import TrialRunner

__all__ = ["toy_trial", "toy_estimate"]


def _toy(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config.get("toy") or {})


def toy_estimate(config: dict[str, Any]) -> float:
    """Memory estimate in MB, consistent with :func:`toy_trial`'s training peak."""
    toy = _toy(config)
    return 100.0 + 400.0 * float(toy.get("x", 0.5)) * float(toy.get("y", 1))


def toy_trial(config: dict[str, Any], *, memory_budget_mb: float | None = None) -> dict[str, Any]:
    toy = _toy(config)
    if toy.get("started_dir"):
        Path(toy["started_dir"]).mkdir(parents=True, exist_ok=True)
        (Path(toy["started_dir"]) / f"{os.getpid()}-{time.time_ns()}").touch()
    marker = toy.get("crash_marker")
    if toy.get("crash_always") or (marker and not os.path.exists(marker)):
        if marker:
            Path(marker).touch()
        os._exit(1)  # a dying worker process, as a segfault or the OOM killer would leave it
    if toy.get("pause_file"):
        deadline = time.time() + 300
        while os.path.exists(toy["pause_file"]) and time.time() < deadline:
            time.sleep(0.05)
    started = time.perf_counter()
    x, y = float(toy.get("x", 0.5)), float(toy.get("y", 1))
    estimate = toy_estimate(config)
    if memory_budget_mb is not None and estimate > memory_budget_mb:
        return {"status": "infeasible", "error": "estimate over budget", "estimated_memory_mb": estimate}
    if toy.get("sleep_s"):
        time.sleep(float(toy["sleep_s"]))
    iterations = 0
    if toy.get("burn_s"):
        end = time.thread_time() + float(toy["burn_s"])
        while time.thread_time() < end:
            iterations += 1
    accuracy = 1.0 - math.exp(-3.0 * x * y)
    loss_curve = [2.0 * math.exp(-0.3 * step * x) + 0.1 for step in range(20)]
    extra = _toy_scores(int(toy["scores"]), accuracy, int(toy.get("seed", 0))) if toy.get("scores") else {}
    if extra:
        accuracy = extra["accuracy"]
    return {**extra,
        "status": "ok", "error": None, "accuracy": accuracy, "eval_loss": loss_curve[-1],
        "peak_memory_train_mb": estimate, "peak_memory_infer_mb": 50.0 + 100.0 * x * y,
        "latency_p50_ms": 1.0 + 4.0 * x * y, "latency_p95_ms": 1.5 + 5.0 * x * y,
        # against a reference of 3 ms (x = 0.5, y = 1) timed side by side, with a +-2% interval
        "latency_ratio_ref": (1.0 + 4.0 * x * y) / 3.0, "latency_ratio_ref_lo": (1.0 + 4.0 * x * y) / 3.0 * 0.98,
        "latency_ratio_ref_hi": (1.0 + 4.0 * x * y) / 3.0 * 1.02, "latency_pairing": "toy reference",
        "throughput_tokens_s": 1000.0 / (1.0 + x * y), "num_params": int(1000 * (1 + y)),
        "train_seconds": time.perf_counter() - started, "wall_seconds": time.perf_counter() - started,
        "steps": len(loss_curve), "device": "cpu", "device_name": "toy", "estimated_memory_mb": estimate,
        "loss_curve": loss_curve, "burn_iterations": iterations,
    }


def _toy_scores(rows: int, accuracy: float, seed: int) -> dict[str, Any]:
    """Per-unit scores of ``rows`` one-example rows: row r is right when a fixed per-row
    difficulty (the same for every configuration: the eval set) is below ``accuracy``, with a
    little seed noise. Two configurations then differ on exactly the rows between their
    accuracies, as paired evaluations of real models do."""
    difficulty = np.random.default_rng(12345).random(rows)  # [R] the eval set
    jitter = np.random.default_rng(seed).normal(0.0, 0.01, rows)
    correct = difficulty + jitter < accuracy
    loss = np.where(correct, 0.1, 2.0).astype(np.float32)
    scores = UnitScores("example", correct, loss, np.arange(rows), eval_hash="toy")
    return {"accuracy": scores.accuracy, "_scores": scores.to_bytes(), **scores.summary()}


toy_trial.result_fields = ("accuracy", "eval_loss", "peak_memory_train_mb", "peak_memory_infer_mb", "latency_p50_ms",
                           "latency_p95_ms", "latency_ratio_ref", "throughput_tokens_s", "num_params", "train_seconds",
                           "wall_seconds",
                           "steps", "estimated_memory_mb", "burn_iterations", "accuracy_se", "eval_units", "eval_rows")


class GateProbe(TrialRunner):
    """A runner that exercises the node's measurement gate like the real trial runner does:
    "trains" (burns CPU in steps, calling ``gate.checkpoint()`` between them), then
    "measures" inside ``gate.exclusive()``. It returns its intervals (wall-clock, from
    ``time.time()``) so a test can check that no measurement overlapped another trial's work.
    Config: ``{"probe": {"train_s": 1.0, "measure_s": 0.3}}``, a plain dict (``TrialRunner``'s
    defaults)."""

    name = "gate-probe"
    result_fields = frozenset({"accuracy", "peak_memory_infer_mb", "latency_p50_ms"})

    def on_cpu(self, config):
        return config

    def run(self, config, *, memory_budget_mb=None, context=None):
        probe = dict(config.get("probe") or {})
        gate = (context.gate if context is not None else None) or MeasureGate()
        work = []  # (start, end) of training steps, each between two checkpoints
        end = time.time() + float(probe.get("train_s", 1.0))
        while time.time() < end:
            gate.checkpoint()
            t0 = time.time()
            stop = time.thread_time() + 0.02
            while time.thread_time() < stop:
                pass
            work.append((t0, time.time()))
        with gate.exclusive() as info:
            m0 = time.time()
            time.sleep(float(probe.get("measure_s", 0.3)))
            m1 = time.time()
        gate.checkpoint()
        return {"status": "ok", "accuracy": 0.5, "peak_memory_infer_mb": 1.0, "latency_p50_ms": 1.0,
                "work": work, "measure": [m0, m1], "measure_wait_s": info["wait_s"],
                "measure_co_running": info["co_running"],
                "cores": ",".join(map(str, context.cores)) if context is not None and context.cores else None}


gate_probe = GateProbe()


class RungToy(TrialRunner):
    """The toy trade-off (:func:`toy_trial`) as a runner the sweep scheduler can drive: it
    "measures first" (the closed-form costs), asks the scheduler to screen it, then "trains"
    ``toy.steps`` steps of ``toy.step_s`` seconds, reporting ``accuracy(step) = (1 -
    exp(-3xy)) * sqrt(step / steps)`` at the scheduler's rungs. Known objective values, so a
    test can say which trial a rung must stop. ``toy.pause_file`` holds every step while it
    exists; ``toy.started_dir`` is touched at the start as in :func:`toy_trial`; ``toy.rung_noise``
    is reported as each rung accuracy's standard error (none by default)."""

    name = "rung-toy"
    supports_scheduler = True
    cost_keys = ("peak_memory_infer_mb", "latency_p50_ms", "peak_memory_train_mb")
    result_fields = frozenset(toy_trial.result_fields)

    def on_cpu(self, config):
        return config

    def max_steps(self, config) -> int:
        return int(_toy(config).get("steps", 27))

    def cost_features(self, config) -> dict[str, dict[str, float]]:
        toy = _toy(config)
        xy = float(toy.get("x", 0.5)) * float(toy.get("y", 1))
        return {t: {"xy": xy} for t in ("latency_p50_ms", "peak_memory_infer_mb", "peak_memory_train_mb")}

    def run(self, config, *, memory_budget_mb=None, context=None):
        toy = _toy(config)
        if toy.get("started_dir"):
            Path(toy["started_dir"]).mkdir(parents=True, exist_ok=True)
            (Path(toy["started_dir"]) / f"{os.getpid()}-{time.time_ns()}").touch()
        x, y = float(toy.get("x", 0.5)), float(toy.get("y", 1))
        steps, step_s = self.max_steps(config), float(toy.get("step_s", 0.0))
        out = {"status": "ok", "error": None, "peak_memory_train_mb": toy_estimate(config),
               "peak_memory_infer_mb": 50.0 + 100.0 * x * y, "latency_p50_ms": 1.0 + 4.0 * x * y,
               "estimated_memory_mb": toy_estimate(config), "steps": 0, "rung_steps": [], "rung_accuracy": [],
               "rung_noise": [], "device": "cpu", "device_name": "toy"}
        scheduler = context.scheduler if context is not None else None
        if scheduler is not None:
            out["cost_measured_first"] = True
            reason = scheduler.screen(out)
            if reason is not None:
                return {**out, "status": "screened", "error": reason}
        final = 1.0 - math.exp(-3.0 * x * y)
        rungs = set(scheduler.rungs) if scheduler is not None else set()
        for step in range(1, steps + 1):
            while toy.get("pause_file") and os.path.exists(toy["pause_file"]):
                time.sleep(0.02)
            time.sleep(step_s)
            out["steps"] = step
            if step in rungs:
                accuracy = final * math.sqrt(step / steps)
                out["rung_steps"].append(step)
                out["rung_accuracy"].append(accuracy)
                out["accuracy"] = accuracy
                noise = toy.get("rung_noise")
                out["rung_noise"].append(noise)
                reason = scheduler.report(step, accuracy, noise)
                if reason is not None:
                    return {**out, "status": "pruned", "error": reason}
        return {**out, "accuracy": final}


rung_toy = RungToy()
