"""What runs inside a Ray worker: the device check, the node's cores and measurement gate,
and the runner call.

Kept free of controller state so it can be called directly in tests; the controller wraps
:func:`execute_trial` in a Ray task with the pool's resources.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from typing import Any

import psutil
import torch

from omninet.hardware import device_present as backend_device_present
from omninet.hardware import probe_capabilities
from omninet.sweep.isolation import NodeGate, coordinator_for_this_node
from omninet.trial.limits import pinned
from omninet.trial.measure import CALIBRATION, calibration_ms
from omninet.trial.runners import RunContext

__all__ = ["device_present", "node_info", "TrialTask", "execute_trial", "probe"]

log = logging.getLogger("omninet.sweep")


def device_present(accelerator: str | None) -> tuple[bool, str]:
    """Whether this node physically has the pool's accelerator: any hardware backend whose
    Ray resource it is (GPU: CUDA, ROCm or an Intel XPU; TPU; NPU)."""
    return backend_device_present(accelerator)


def node_info() -> dict[str, str]:
    info = {"node": socket.gethostname(), "node_id": ""}
    try:
        import ray  # heavy: ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info["node_id"] = ctx.get_node_id()
            info["node"] = f"{socket.gethostname()}/{ray.util.get_node_ip_address()}"
    except Exception as exc:  # outside Ray: hostname only
        log.debug("no Ray node info: %s", exc)
    return info


def probe(accelerator: str | None, device: str = "auto", threads: int = 1) -> dict[str, Any]:
    """What the pool's node offers: the accelerator's presence and the device's capabilities
    (native precisions, int8 engine, memory, CPU model and flags), the node's cores, and the
    reference workload's time with the pool's trial threads (``calibration_ms``: the speed every
    trial of the pool scales its calibrated latency to)."""
    present, detail = device_present(accelerator)
    try:
        caps = probe_capabilities("cpu" if not present else device)
    except ValueError as exc:
        caps = {"error": str(exc)}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or cores
    threads = max(1, threads)
    try:
        with pinned(None, threads):  # the trials' threads, restored after: Ray reuses this worker
            ref = calibration_ms(device=torch.device("cpu"))  # trials of a simulated or CPU pool run there
    except Exception as exc:  # noqa: BLE001 -- without a reference, each trial uses its own reading
        log.warning("probe: calibration failed: %s", exc)
        ref = None
    return {"present": present, "detail": detail, "capabilities": caps, "cores": cores,
            "physical_cores": min(physical, cores), "calibration_ms": ref, "calibration": CALIBRATION,
            "calibration_threads": threads, **node_info()}


@dataclasses.dataclass(frozen=True)
class TrialTask:
    """One trial as the controller sends it to a Ray worker: the runner and its parsed config,
    the pool it runs for, and how (``isolate``: disjoint cores and the node's measurement gate;
    ``scheduler``: the trial's rung client, or None to train to the budget; ``reference``: the
    pool's reference model as the runner's typed config, which the trial times itself against,
    and ``reference_label``, what it is or why there is none)."""

    runner: Any  # omninet.trial.TrialRunner
    config: Any  # the runner's typed config, parsed once by the controller
    pool: str
    key: str  # '<sweep>/<pool>/<trial>': the trial's name at the node's measurement gate
    accelerator: str | None = None
    simulate: bool = False
    memory_budget_mb: float | None = None
    num_cpus: float = 1.0
    isolate: bool = True
    keep_model: bool = False
    scheduler: Any = None
    calibration_ref_ms: float | None = None
    reference: Any = None
    reference_label: str | None = None


def execute_trial(task: TrialTask) -> dict[str, Any]:
    """Runs one trial on this node. A pool accelerator that is not physically here runs on
    CPU when ``task.simulate`` (result tagged ``simulated``), else the trial is an error. The
    memory estimate is made here, once, on the config as it runs: over the budget, the trial is
    ``infeasible`` and nothing is built. Under Ray with ``task.isolate``, the trial gets
    ``num_cpus`` cores of its own and the node's measurement gate (``omninet.sweep.isolation``)."""
    started = time.time()
    info = node_info()
    present, detail = device_present(task.accelerator)
    simulated = task.accelerator is not None and not present
    if simulated and not task.simulate:
        return {"status": "error", "simulated": False, **info,
                "error": f"pool {task.pool!r} needs a {task.accelerator} but node {info['node']} has none ({detail}); "
                         "set simulate_accelerators: true to run it on CPU"}
    runner, config, budget, reference = task.runner, task.config, task.memory_budget_mb, task.reference
    if simulated:
        config = runner.on_cpu(config)
        reference = None if reference is None else runner.on_cpu(reference)  # timed where the trial runs
    estimate = _estimate_mb(runner, config)
    if estimate is not None and budget is not None and estimate > budget:
        return {"status": "infeasible", "estimated_memory_mb": estimate, "simulated": simulated, **info,
                "error": f"estimated {estimate:.0f} MB > pool budget {budget:.0f} MB; not run"}
    gate = None
    context = RunContext(keep_model=task.keep_model, scheduler=task.scheduler, calibration_ref_ms=task.calibration_ref_ms,
                         estimated_memory_mb=estimate, reference=reference, reference_label=task.reference_label)
    if task.isolate and info["node_id"]:
        gate = NodeGate(coordinator_for_this_node(), task.key)
        context = dataclasses.replace(context, cores=gate.start(max(1, int(task.num_cpus))), gate=gate)
    try:
        result = runner.run(config, memory_budget_mb=budget, context=context)
    finally:
        if gate is not None:
            gate.stop()
    result.update(simulated=simulated, worker_pid=os.getpid(), worker_seconds=time.time() - started, **info)
    return result


def _estimate_mb(runner, config) -> float | None:
    try:
        value = runner.estimate_mb(config)
    except Exception as exc:  # noqa: BLE001 -- a config the estimator rejects is left to the runner to judge
        log.debug("memory estimate failed: %s", exc)
        return None
    return None if value is None else float(value)
