"""Honest timing and peak-memory measurement, shared by benchmarks and the trial runner.

Peak memory: on CUDA-like devices the caching allocator's ``max_memory_allocated``; on CPU the
PyTorch profiler's memory timeline (every tensor allocation and free, by category), whose
maximum total above the level at the start of the call is the call's peak tensor memory.
That counts tensors only (not the Python heap or allocator slack), which is what attention
and activation savings change.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import statistics
import tempfile
import time
import warnings
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


def time_fn(fn: Callable[[], object], *, device=torch.device("cpu"), warmup: int = 2, reps: int = 5) -> list[float]:
    """Seconds per call, ``reps`` timed calls after ``warmup`` untimed ones, device-synchronized."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    p95 = s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]
    return {"median_s": statistics.median(s), "p95_s": p95, "min_s": s[0], "reps": len(s)}


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_mb(fn: Callable[[], object], *, device=torch.device("cpu")) -> float:
    """Peak tensor memory (MB) allocated by ``fn`` above the level when it starts."""
    device = torch.device(device)
    if device.type != "cpu":
        mod = getattr(torch, device.type)
        synchronize(device)
        mod.reset_peak_memory_stats()
        base = mod.memory_allocated()
        fn()
        synchronize(device)
        return (mod.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)
    with _quiet_stderr():  # kineto prints "profiler_start/stop" lines straight to fd 2 on every call
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the timeline export is deprecated but still the CPU path
            prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
    finally:
        os.unlink(path)
    if not sizes:
        return 0.0
    totals = [sum(row) for row in sizes]
    return max(0.0, (max(totals) - totals[0]) / 2**20)
