"""What runs inside a Ray worker: the device check and the trial call.

Kept free of Ray-specific state so it can be called directly in tests; the controller wraps
:func:`execute_trial` in a Ray task with the pool's resources.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import time
from typing import Any

__all__ = ["device_present", "node_info", "execute_trial", "probe"]


def device_present(accelerator: str | None) -> tuple[bool, str]:
    """Whether this node physically has the pool's accelerator, as torch sees it."""
    if accelerator is None:
        return True, "cpu"
    if accelerator == "GPU":
        import torch

        ok = torch.cuda.is_available() and torch.cuda.device_count() > 0
        return ok, torch.cuda.get_device_name(0) if ok else "torch.cuda.is_available() is False"
    if accelerator == "NPU":
        if importlib.util.find_spec("torch_npu") is None:
            return False, "torch_npu is not installed"
        import torch
        import torch_npu  # noqa: F401  (registers torch.npu)

        return bool(torch.npu.is_available()), "torch.npu"
    if accelerator == "TPU":
        if importlib.util.find_spec("torch_xla") is None:
            return False, "torch_xla is not installed"
        import torch_xla.runtime as xr

        return xr.global_runtime_device_count() > 0, "torch_xla"
    return False, f"unknown accelerator {accelerator!r}"


def node_info() -> dict[str, str]:
    info = {"node": socket.gethostname(), "node_id": ""}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info["node_id"] = ctx.get_node_id()
            info["node"] = f"{socket.gethostname()}/{ray.util.get_node_ip_address()}"
    except Exception:  # outside Ray: hostname only
        pass
    return info


def probe(accelerator: str | None) -> dict[str, Any]:
    present, detail = device_present(accelerator)
    return {"present": present, "detail": detail, **node_info()}


def execute_trial(trial_fn: str, config: dict[str, Any], *, pool: str, accelerator: str | None,
                  simulate: bool, memory_budget_mb: float | None, num_threads: int | None = None) -> dict[str, Any]:
    """Runs one trial on this node. A pool accelerator that is not physically here runs on
    CPU when ``simulate`` (result tagged ``simulated``), else the trial is an error.
    ``num_threads`` (the CPUs Ray reserved for the trial) caps torch's intra-op threads for
    the default trial runner unless the config sets ``hardware.num_threads``, so concurrent
    trials on one node do not oversubscribe its cores."""
    started = time.time()
    info = node_info()
    present, detail = device_present(accelerator)
    simulated = accelerator is not None and not present
    if simulated and not simulate:
        return {"status": "error", "simulated": False, **info,
                "error": f"pool {pool!r} needs a {accelerator} but node {info['node']} has none ({detail}); "
                         "set simulate_accelerators: true to run it on CPU"}
    hardware = dict(config.get("hardware") or {})
    if simulated:
        hardware["device"] = "cpu"
    if num_threads is not None and trial_fn == "omninet.trial:run_trial":
        hardware.setdefault("num_threads", num_threads)
    if hardware:
        config = {**config, "hardware": hardware}
    module_name, attr = trial_fn.split(":")
    fn = getattr(importlib.import_module(module_name), attr)
    result = fn(config, memory_budget_mb=memory_budget_mb)
    result = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    result.update(simulated=simulated, worker_pid=os.getpid(), worker_seconds=time.time() - started, **info)
    return result
