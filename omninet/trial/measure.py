"""Measurement: a robust latency loop, history-free memory trackers, and the conditions each
number was measured under. The trial runner and the benchmarks both use this module.

Latency (``latency``): ``warmup`` untimed calls, then at least ``min_reps`` calls AND at least
``min_seconds`` of calls, each device-synchronized through the hardware backend; p50/p90/
p95/p99, mean and the coefficient of variation (std / mean). When the variation exceeds
``max_cv`` the loop runs again (at most ``max_rounds`` rounds) and the result is tagged
``noisy`` if it stays above.

Calibration (``calibration``, ``latency(..., calibrate=...)``): the speed of a shared or virtual
machine drifts with what its host runs. On the 2-core KVM Xeon this was built on, a fixed
256x256 matmul took 225 us for tens of seconds, then 330 us, then 225 us again, and every
model's latency moved with it (correlation 0.9; no steal time reported), so two measurements
of one configuration a minute apart differed by up to 50%. With ``calibrate``, every timed call
is followed by one call of a fixed reference workload (four fp32 256x256 matmuls on the same
device and threads), and the loop reports the median of the per-call ratios (``rel_p50``: the
latency in units of the reference) next to the raw times. On that machine the run-to-run
variation of ``rel_p50`` was 2.5-4.5% where the raw p50's was 17-19% (80 rounds across the
speed phases, ``benchmarks/machine_drift.py``). A ratio tracks the host's speed for
compute-bound work; time spent in Python overhead scales differently, so it is a correction,
not an identity. The raw figures are always recorded beside it.

Memory (``track_memory``), measured from a clean state (``limits.clean_state``: garbage
collected, C allocator trimmed, accelerator cache emptied), two counters reported side by side:

- ``tensor_peak_mb``: tensors alive at the start (``live_bytes``: parameters, buffers,
  gradients, optimizer state) plus the peak of tensor allocations during the call. CPU: the
  PyTorch profiler's allocation events (replayed in time order); accelerators: the allocator's peak
  (``backend.memory_stats().peak`` after ``backend.reset_peak_memory``).
- ``rss_peak_mb``: the process's resident set, sampled every millisecond by a thread while the
  call runs (and Linux's VmHWM after resetting it, when allowed): what the OS sees, including
  allocator slack, the Python heap and anything a kernel keeps outside torch's tensors.

A measured peak must not depend on what ran before: callers measure the first call in a
clean state and a later call after the timing runs, and record both.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["backend_for", "synchronize", "time_fn", "summarize", "LatencyStats", "latency", "calibration",
           "CALIBRATION", "MemoryReading",
           "track_memory", "peak_memory_mb", "load_average", "MeasureGate", "machine_facts"]

MB = 2**20


def backend_for(device: torch.device):
    """The hardware backend that drives ``device`` (ROCm for a HIP build's ``cuda``)."""
    from omninet.hardware import BACKENDS, get_backend

    device = torch.device(device)
    if device.type == "cuda" and getattr(torch.version, "hip", None):
        return get_backend("rocm")
    for name, cls in BACKENDS.items():
        if cls.device_type == device.type and name != "rocm":
            return get_backend(name)
    raise ValueError(f"no hardware backend drives device type {device.type!r}")


def synchronize(device: torch.device) -> None:
    device = torch.device(device)
    if device.type != "cpu":
        backend_for(device).synchronize(device.index or 0)


def time_fn(fn: Callable[[], object], *, device=torch.device("cpu"), warmup: int = 2, reps: int = 5) -> list[float]:
    """Seconds per call: ``reps`` timed calls after ``warmup`` untimed ones, device-synchronized."""
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


def _quantile(s: list[float], q: float) -> float:
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def summarize(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    mean = statistics.fmean(s)
    return {"median_s": statistics.median(s), "p90_s": _quantile(s, 0.90), "p95_s": _quantile(s, 0.95),
            "p99_s": _quantile(s, 0.99), "min_s": s[0], "max_s": s[-1], "mean_s": mean,
            "cv": (statistics.pstdev(s) / mean) if mean > 0 and len(s) > 1 else 0.0, "reps": len(s)}


@dataclass
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    cv: float
    reps: int
    rounds: int
    noisy: bool
    # with a calibration workload (``latency(..., calibrate=...)``), else None:
    calibration_ms: float | None = None  # median time of the reference call, last round
    rel_p50: float | None = None  # median of (call / the reference call right after it)
    rel_cv: float | None = None  # std / mean of those ratios


CALIBRATION = "4 x torch.mm of fp32 256x256 (1024x1024 on an accelerator), same device and threads"


def calibration(device=torch.device("cpu")) -> Callable[[], object]:
    """The fixed reference workload (``CALIBRATION``) that ``latency`` times after every call
    to follow the machine's speed at that moment (see the module docstring)."""
    device = torch.device(device)
    n = 256 if device.type == "cpu" else 1024
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(device), torch.randn(n, n, generator=g).to(device)

    def run() -> None:
        for _ in range(4):
            torch.mm(a, b)

    return run


def calibration_ms(*, device=torch.device("cpu"), seconds: float = 0.3, windows: int = 5, gap_s: float = 0.2) -> float:
    """The reference workload's time (ms) on this machine now, with the current torch threads: a
    sweep pool's reference speed (its probe). The fastest of ``windows`` medians, each over
    ``seconds / windows`` of calls, ``gap_s`` apart: other work beside the probe (Ray starting
    workers at a sweep's start) can only slow a window, so one busy moment no longer sets the
    scale of every trial of the pool (one 0.3 s window read 6.7 ms against 1.5 ms in the other
    five sweeps of a search_efficiency run)."""
    fn, n = calibration(device), max(1, windows)
    best = math.inf
    for i in range(n):
        if i:
            time.sleep(gap_s)
        best = min(best, latency(fn, device=device, warmup=1, min_seconds=seconds / n, max_rounds=1).p50_ms)
    return best


def latency(fn: Callable[[], object], *, device=torch.device("cpu"), warmup: int = 3, min_reps: int = 20,
            min_seconds: float = 1.0, max_cv: float = 0.05, max_rounds: int = 3,
            calibrate: Callable[[], object] | None = None) -> LatencyStats:
    """The robust latency loop (see the module docstring). Statistics are those of the last
    round (the earlier ones are judged too noisy, or the loop would have stopped). With
    ``calibrate``, each timed call is followed by one timed call of it, and the variation that
    decides ``noisy`` is that of the per-call ratios (the machine's drift taken out)."""
    for _ in range(warmup):
        fn()
        if calibrate is not None:
            calibrate()
    synchronize(device)
    rounds, s = 0, None
    while rounds < max_rounds:
        rounds += 1
        times: list[float] = []
        cal: list[float] = []
        start = time.perf_counter()
        while len(times) < min_reps or time.perf_counter() - start < min_seconds:
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if calibrate is not None:
                calibrate()
                synchronize(device)
                cal.append(time.perf_counter() - t1)
        s = summarize(times)
        if cal:
            ratios = [t / c for t, c in zip(times, cal)]
            r = summarize(ratios)
            s.update(cal_ms=statistics.median(cal) * 1e3, rel_p50=r["median_s"], rel_cv=r["cv"])
        judged_cv = s.get("rel_cv", s["cv"])  # calibrated: the ratios' variation, the drift taken out
        if judged_cv <= max_cv:
            break
    return LatencyStats(p50_ms=s["median_s"] * 1e3, p90_ms=s["p90_s"] * 1e3, p95_ms=s["p95_s"] * 1e3,
                        p99_ms=s["p99_s"] * 1e3, mean_ms=s["mean_s"] * 1e3, cv=s["cv"], reps=s["reps"],
                        rounds=rounds, noisy=judged_cv > max_cv, calibration_ms=s.get("cal_ms"),
                        rel_p50=s.get("rel_p50"), rel_cv=s.get("rel_cv"))


# ---- memory -----------------------------------------------------------------------------
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


def _timeline_peak_mb(fn: Callable[[], object]) -> float:
    """CPU: peak tensor MB allocated by ``fn`` above the level at its start, replayed from the
    profiler's allocation events in time order: each allocation (+size) and free (-size) during
    the call. Frees of blocks allocated before the call carry no size on CPU and count 0, so
    the peak is never under-reported. (``MemoryProfile(...).timeline`` yields the same levels
    but first builds a data-flow graph of every op: 20x slower on the block-sparse kernel's
    many small ops, with nothing of it used here.)"""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._utils import traverse_dfs

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # kineto prints "profiler_start/stop" lines straight to fd 2 on every call
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = [e for e in traverse_dfs(prof.profiler.kineto_results.experimental_event_tree())
              if e.tag == _EventType.Allocation]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_time_ns):
        level += event.extra_fields.alloc_size  # negative for a free
        peak = max(peak, level)
    return peak / MB


def peak_memory_mb(fn: Callable[[], object], *, device=torch.device("cpu")) -> float:
    """Peak tensor memory (MB) allocated by ``fn`` above the level when it starts."""
    device = torch.device(device)
    if device.type == "cpu":
        return _timeline_peak_mb(fn)
    backend = backend_for(device)
    index = device.index or 0
    backend.synchronize(index)
    backend.reset_peak_memory(index)
    base = backend.memory_stats(index).in_use
    fn()
    backend.synchronize(index)
    return max(0.0, (backend.memory_stats(index).peak - base) / MB)


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    """Resets Linux's peak-RSS counter (VmHWM) for this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class _RSSSampler(threading.Thread):
    """Samples the process's resident set every ``interval_s`` until stopped; ``peak``."""

    def __init__(self, interval_s: float = 0.001) -> None:
        super().__init__(daemon=True, name="omninet-rss-sampler")
        self.interval_s, self.peak = interval_s, _rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop_event.wait(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


@dataclass
class MemoryReading:
    tensor_peak_mb: float
    rss_peak_mb: float
    method: str


def track_memory(fn: Callable[[], object], *, device=torch.device("cpu"), live_bytes: int = 0) -> MemoryReading:
    """Both counters of one call of ``fn`` (see the module docstring). Call it from a clean
    state (``omninet.trial.limits.clean_state``)."""
    device = torch.device(device)
    if device.type != "cpu":
        backend = backend_for(device)
        backend.synchronize(device.index or 0)
        live_bytes = backend.memory_stats(device.index or 0).in_use
    hwm = _reset_hwm()
    sampler = _RSSSampler()
    sampler.start()
    try:
        tensor = live_bytes / MB + peak_memory_mb(fn, device=device)
    finally:
        rss = sampler.stop()
    if hwm:
        rss = max(rss, _hwm_bytes() or 0)
    counter = "torch.profiler allocation events" if device.type == "cpu" else "allocator peak (backend memory_stats)"
    method = (f"tensor: live tensors + {counter}; rss: process resident set sampled every 1 ms"
              f"{' + VmHWM' if hwm else ''}")
    return MemoryReading(tensor_peak_mb=tensor, rss_peak_mb=rss / MB, method=method)


# ---- conditions -------------------------------------------------------------------------
def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


class MeasureGate:
    """Isolation of the measurement phases. This one, for a trial run on its own, isolates
    nothing and reports that; the sweep's workers pass a node-wide gate
    (``omninet.sweep.isolation``) under which no other trial of the node runs while one
    measures. ``checkpoint()`` is called between training and evaluation steps (where a
    trial pauses when another one on its node wants to measure)."""

    def checkpoint(self) -> None:
        return None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[dict]:
        yield {"wait_s": 0.0, "co_running": None}


def machine_facts() -> dict:
    """CPU model, the CPU flags the targets depend on, cores and torch: recorded with every
    benchmark."""
    import platform

    from omninet.hardware import cpu_flags

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = cpu_flags()
    return {"cpu_model": model, "cpu_flags": sorted(k for k, v in flags.items() if v), "cores": os.cpu_count(),
            "torch": torch.__version__, "load_avg": load_average()}
