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

Paired timing (``paired``, ``median_interval``): the question a sweep asks is "faster than the
reference model?", and on a shared machine the host's speed moves more between two moments than
the configurations differ (the quickstart's dense configuration measured 6.0-8.9 ms in one
sweep). So a trial also times the sweep pool's reference model (the base, or the pool's
reference configuration) in the same process, at the same shape, threads and inputs: short
rounds of ``calls`` calls of each, the order alternating per round (AB, BA, ...), so that both
see the same moment's machine. Each round gives one ratio (median call of the trial / median
call of the reference); the result is the median of the round ratios with a distribution-free
95% interval on it (order statistics of the rounds; no normality or independence of calls
assumed, only of rounds). Rounds go on until the interval's half-width is at most
``halfwidth`` of the ratio, or ``max_rounds``, or ``max_seconds`` after ``min_rounds``. A drift
that moves both models' times by 30% moves their ratio by the drift's change within a round,
not by 30% (``tests/test_measurement.py`` checks this on a fake clock).

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

Generation (``generation``, decoders, ``measure.generation``): what a decoder deployment sees,
after the forward figures under the same gate. Prefill: batch-1 calls of the whole prompt at the
trial's length N into a fresh KV cache, forming the last position's logits only (time to the
first token). Decode: one call is one greedy step of one new token against the cache; the
steps cover cache depths P .. P + T - 1 (T = ``measure.generation_tokens``, at most N - 1;
P = N - T, so the last step reads N keys), then the cache is cropped back to P (no copy), so
every call of the loop decodes at a depth of that window. Both run through ``latency`` with the
trial's warm-up, CV check, rounds and calibration, at least ``generation_reps`` calls and
``generation_min_seconds`` (by default a quarter of ``min_seconds``); p50/p90/p99 per token.
Decode tokens/s: B / median step at the measure batch B. KV-cache MB: the cache's tensors
after P + T tokens at batch B (``KVCache.nbytes``) and ``model.kv_cache_bytes`` of the same
shape and the dtype the cache holds; they differ only if the formula misses a layer or head.
Depths (``measure.generation_depths``): the decode loop again with windows ending at cache depths
4N and 16N (prompts of the task's N tokens repeated), capped at the model's ``max_seq_length`` (its
trained length: a learned table ends there, and rotary or ALiBi models are measured where they
were trained; the record's ``decode_depth_cap`` says when the cap applied, and a depth the cap
makes equal to the one before is None), with the least-squares slope in ms per 1K tokens of depth.
With a reference model, the prefill and decode loops are paired rounds against the reference's
own prefill and decode (``paired``, as the forward's), giving ``prefill_ratio_ref`` and
``decode_ratio_ref`` with their 95% intervals; the trial's figures come from its calls there.
With ``measure.memory``, the tensor peaks of a prefill and of a whole generation at (B, N) come
after the later memory reading, each from a clean state, the reference gone. Encoder trials leave
every generation field None.

A trial's phases (``train_memory``, ``inference``, ``latency_probe``) run these trackers at the
measurement shape under the node's measurement gate and yield readings, small dataclasses
named by ``TrialResult`` fields; ``apply(result, readings)`` is the one place they land. With a
reference model (``inference(..., reference=...)``) the latency and throughput trackers are the
paired ones (``track_paired_latency``, ``track_paired_throughput``): the trial's raw and
calibrated figures come from its calls in the paired rounds, so pairing adds the reference's
calls, not a second loop.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from omninet.trial.limits import clean_state

__all__ = ["backend_for", "synchronize", "time_fn", "summarize", "LatencyStats", "latency", "calibration",
           "CALIBRATION", "MemoryReading",
           "track_memory", "peak_memory_mb", "load_average", "MeasureGate", "machine_facts", "Conditions",
           "MeasureSeconds", "TrainMemoryReading", "InferMemoryReading", "LaterMemoryReading", "LatencyReading",
           "ProbeReading", "ThroughputReading", "apply", "conditions", "track_latency", "track_throughput",
           "live_tensor_bytes", "train_memory", "inference", "latency_probe", "PROBE_CALLS", "median_interval",
           "PairedTimes", "paired", "PairedLatencyReading", "PairedThroughputReading", "PairingReading",
           "Reference", "track_paired_latency", "track_paired_throughput", "GenerationReading", "generation",
           "GenerationPairedReading", "DepthReading", "DEPTH_MULTIPLES", "decode_depths", "generation_memory"]

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
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        times: list[float] = []
        cal: list[float] = []
        start = time.perf_counter()
        while len(times) < min_reps or time.perf_counter() - start < min_seconds:
            times.append(_timed_call(fn, calibrate, device, cal))
        stats = _stats(times, cal, rounds=rounds, noisy=False)
        judged_cv = stats.cv if stats.rel_cv is None else stats.rel_cv  # calibrated: the ratios', the drift taken out
        if judged_cv <= max_cv:
            break
    stats.noisy = judged_cv > max_cv
    return stats



def _timed_call(fn, calibrate, device, cal: list[float]) -> float:
    """One timed call of ``fn`` (seconds); with ``calibrate``, the calibration workload runs right
    after it and its time is appended to ``cal`` (both loops time calls this one way)."""
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    t1 = time.perf_counter()
    if calibrate is not None:
        calibrate()
        synchronize(device)
        cal.append(time.perf_counter() - t1)
    return t1 - t0

def _stats(times: list[float], cal: list[float], *, rounds: int, noisy: bool) -> LatencyStats:
    """``LatencyStats`` of timed calls (s), with ``cal`` the calibration call timed after each."""
    s = summarize(times)
    out = LatencyStats(p50_ms=s["median_s"] * 1e3, p90_ms=s["p90_s"] * 1e3, p95_ms=s["p95_s"] * 1e3,
                       p99_ms=s["p99_s"] * 1e3, mean_ms=s["mean_s"] * 1e3, cv=s["cv"], reps=s["reps"], rounds=rounds,
                       noisy=noisy)
    if cal:
        r = summarize([t / c for t, c in zip(times, cal)])
        out.calibration_ms, out.rel_p50, out.rel_cv = statistics.median(cal) * 1e3, r["median_s"], r["cv"]
    return out


# ---- paired timing ------------------------------------------------------------------------
def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, lo, hi): the sample median and a distribution-free interval on the median of the
    distribution the values come from: the order statistics x_(j) and x_(n+1-j) (1-based), with j
    the largest such that P(Binomial(n, 1/2) < j) <= (1 - confidence) / 2, so the coverage is at
    least ``confidence`` whatever the distribution (only independence of the values is assumed).
    Below 6 values no pair of order statistics reaches 95%: (median, min, max) is returned."""
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("median_interval: no values")
    tail, j, below = (1.0 - confidence) / 2.0, 0, 0.0
    while j < n // 2:
        below += math.comb(n, j) / 2.0**n  # P(Bin(n, 1/2) <= j)
        if below > tail:
            break
        j += 1
    j = max(j, 1)
    return statistics.median(s), s[j - 1], s[n - j]


@dataclass
class PairedTimes:
    """Two callables timed side by side (``paired``): every timed call of each (s) and the
    calibration call after it (empty without one), the median call of each per round, and why
    the rounds stopped."""

    a_s: list[float]
    b_s: list[float]
    cal_a: list[float]
    cal_b: list[float]
    round_a: list[float]
    round_b: list[float]
    narrow: bool  # the interval reached the half-width asked for (else the rounds or time ran out)

    @property
    def rounds(self) -> int:
        return len(self.round_a)

    def ratio(self, *, inverse: bool = False) -> tuple[float, float, float]:
        """(median, lo, hi) of the per-round ratios a / b (``inverse``: b / a), 95% interval."""
        pairs = zip(self.round_b, self.round_a) if inverse else zip(self.round_a, self.round_b)
        return median_interval([x / y for x, y in pairs])


# Paired rounds judge their interval at rounds min_rounds, x1.5, x1.5^2, ... (and at the last), not
# after every round: each look is a chance to stop on an interval that is narrow by luck. The same
# model against itself on a fake clock (per-call jitter up to 5%, 3% of calls 20% slower, a 30%
# slow phase; defaults: 3 calls, 10-40 rounds, 2% half-width) held 1 in 94.6% of 1000 seeded runs
# (98.5% with 1% jitter); with a look after every round, 93.7% of 300.
LOOK_GROWTH = 1.5


def paired(fn_a: Callable[[], object], fn_b: Callable[[], object], *, device=torch.device("cpu"), warmup: int = 2,
           calls: int = 3, min_rounds: int = 10, max_rounds: int = 40, halfwidth: float = 0.02,
           max_seconds: float = 1.5, min_calls: int = 0, calibrate: Callable[[], object] | None = None) -> PairedTimes:
    """Times ``fn_a`` against ``fn_b`` in alternating rounds (see the module docstring): ``warmup``
    untimed calls of each, then rounds of ``calls`` timed calls of each, a first in even rounds
    and b first in odd ones, until the 95% interval of the round ratios has a half-width of at
    most ``halfwidth`` x the ratio (judged after ``min_rounds`` rounds and ``min_calls`` calls of
    a, then at ``LOOK_GROWTH`` x as many), or ``max_rounds`` rounds, or ``max_seconds`` of rounds
    (``min_calls`` calls of a are always made). With ``calibrate``, every timed call of either is
    followed by one timed call of it (both sides alike, so neither runs on a cache the other left
    warmer)."""
    for _ in range(warmup):
        for fn in (fn_a, fn_b):
            fn()
            if calibrate is not None:
                calibrate()
    synchronize(device)
    out = PairedTimes([], [], [], [], [], [], narrow=False)
    sides = {"a": (fn_a, out.a_s, out.cal_a, out.round_a), "b": (fn_b, out.b_s, out.cal_b, out.round_b)}
    start, look = time.perf_counter(), 0
    while True:
        for side in ("ab" if out.rounds % 2 == 0 else "ba"):
            fn, times, cal, per_round = sides[side]
            this = []
            for _ in range(calls):
                this.append(_timed_call(fn, calibrate, device, cal))
            times += this
            per_round.append(statistics.median(this))
        last = out.rounds >= max_rounds or time.perf_counter() - start >= max_seconds
        if out.rounds < min_rounds or len(out.a_s) < min_calls or not (last or out.rounds >= look):
            continue
        look = math.ceil(out.rounds * LOOK_GROWTH)
        ratio, lo, hi = out.ratio()
        out.narrow = (hi - lo) / 2.0 <= halfwidth * ratio
        if out.narrow or last:
            return out


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


# ---- a trial's measurement phases ---------------------------------------------------------
# Each tracker returns a reading: a small dataclass whose field names are TrialResult fields.
# ``apply`` puts readings on the result, the one place a measured figure is written. A field's
# ``combine`` says how it meets what the result already holds (a trial measures in more than one
# phase): unset, the reading's value replaces it; 'if_set': only a value that is not None does;
# 'sum' adds and 'max' keeps the larger (a None reading leaves it); 'first' keeps an earlier value.
def _combined(rule: str):
    return field(default=None, metadata={"combine": rule})


@dataclass
class Conditions:
    """What a phase was measured under: the wait for the node's measurement gate, other trials
    running meanwhile, the load average around it."""

    measure_wait_s: float | None = _combined("sum")
    measure_co_running: int | None = _combined("max")
    load_avg_before: float | None = _combined("first")
    load_avg_after: float | None = None


@dataclass
class MeasureSeconds:
    measure_seconds: float | None = _combined("sum")


@dataclass
class TrainMemoryReading:
    peak_memory_train_mb: float
    peak_rss_train_mb: float


@dataclass
class InferMemoryReading:
    peak_memory_infer_mb: float
    peak_rss_infer_mb: float
    memory_method: str


@dataclass
class LaterMemoryReading:
    peak_memory_infer_later_mb: float


@dataclass
class LatencyReading:
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    latency_cv: float
    latency_reps: int
    latency_rounds: int
    latency_noisy: bool
    latency_calibration_ms: float | None = _combined("if_set")
    latency_p50_rel: float | None = _combined("if_set")
    latency_rel_cv: float | None = _combined("if_set")
    latency_calibration_ref_ms: float | None = _combined("if_set")
    latency_p50_norm_ms: float | None = _combined("if_set")


@dataclass
class ProbeReading:
    """The measure-first probe: a few batch-1 calls (``latency_reps`` says how many)."""

    latency_p50_ms: float
    latency_reps: int
    latency_rounds: int = 1


@dataclass
class ThroughputReading:
    throughput_tokens_s: float


@dataclass
class GenerationReading:
    """A decoder's generation (``generation``): prefill at batch 1 and length N, last position's
    logits only; decode per token at batch 1 over cache depths [P, P + T); decode tokens/s at
    the measure batch; the KV cache after P + T tokens at the measure batch, measured and from
    the formula."""

    prefill_ms_p50: float
    prefill_ms_p90: float
    prefill_cv: float
    prefill_noisy: bool
    decode_ms_p50: float
    decode_ms_p90: float
    decode_ms_p99: float
    decode_cv: float
    decode_noisy: bool
    decode_reps: int
    decode_tokens_s: float
    decode_context: int  # P: the cache depth the decode window starts at
    decode_new_tokens: int  # T
    kv_cache_mb: float
    kv_cache_formula_mb: float


@dataclass
class GenerationPairedReading:
    """Prefill and per-token decode (batch 1) against the reference model timed beside them
    (``paired``): the median round ratio (trial / reference) with its 95% interval."""

    prefill_ratio_ref: float
    prefill_ratio_ref_lo: float
    prefill_ratio_ref_hi: float
    decode_ratio_ref: float
    decode_ratio_ref_lo: float
    decode_ratio_ref_hi: float


@dataclass
class DepthReading:
    """Decode per token (p50 ms, batch 1) at cache depths N, 4N and 16N (``decode_depths``: None
    where the model's length cap left no new depth), each depth in tokens, the least-squares
    slope in ms per 1,000 tokens of depth, and the cap (``max_seq_length``) when it applied."""

    decode_ms_1p: float | None = None
    decode_ms_4p: float | None = None
    decode_ms_16p: float | None = None
    decode_depth_1p: int | None = None
    decode_depth_4p: int | None = None
    decode_depth_16p: int | None = None
    decode_ms_per_1k_depth: float | None = None
    decode_depth_cap: int | None = None


@dataclass
class GenerationMemoryReading:
    """Tensor peaks (live tensors + the call's peak, as ``InferMemoryReading``) at the measure
    batch: a prefill of N tokens (last position's logits, cache sized for N + T), and a whole
    ``generate`` of T tokens after a prompt of N - T (the cache ends at N)."""

    peak_memory_prefill_mb: float
    peak_memory_generate_mb: float


@dataclass
class GenerationErrorReading:
    """Why a decoder's generation figures are missing (the forward figures stand)."""

    generation_error: str


@dataclass
class PairedLatencyReading:
    """Batch-1 latency against the reference model timed beside it (``paired``): the median round
    ratio with its 95% interval, and the reference's own p50 in the same rounds."""

    latency_ratio_ref: float
    latency_ratio_ref_lo: float
    latency_ratio_ref_hi: float
    latency_ref_p50_ms: float


@dataclass
class PairedThroughputReading:
    """Throughput at (B, N) against the reference model: (reference time / trial time) per round."""

    throughput_ratio_ref: float
    throughput_ratio_ref_lo: float
    throughput_ratio_ref_hi: float


@dataclass
class PairingReading:
    """What the trial was timed against ('base', 'enqueue[0]', ...), or why it was not ('unpaired: ...')."""

    latency_pairing: str | None


@dataclass
class Reference:
    """The model a trial is timed against (the sweep pool's reference): ``build()`` returns
    (model, plan) on the trial's device, its own precision plan, the trial's inputs; ``label``
    says what it is (the record's ``latency_pairing``)."""

    build: Callable[[], tuple[torch.nn.Module, object]]
    label: str


def apply(result, readings) -> None:
    """Sets each field of each reading (one reading or an iterable of them, applied as they
    come: a phase that fails keeps the figures taken before) on ``result`` by name."""
    for reading in [readings] if dataclasses.is_dataclass(readings) else readings:
        for f in dataclasses.fields(reading):
            value, old, rule = getattr(reading, f.name), getattr(result, f.name), f.metadata.get("combine")
            if rule == "first" and old is not None:
                continue
            if rule in ("if_set", "sum", "max") and value is None:
                continue
            if rule == "sum":
                value = (old or 0) + value
            elif rule == "max":
                value = max(old or 0, value)
            setattr(result, f.name, value)


def conditions(info: dict, before: float | None) -> Conditions:
    """The conditions of a phase run under ``gate.exclusive()`` (``info``), which started at
    load average ``before``."""
    co = info.get("co_running")
    return Conditions(measure_wait_s=float(info.get("wait_s") or 0.0), measure_co_running=None if co is None else int(co),
                      load_avg_before=before, load_avg_after=load_average())


def track_latency(fn: Callable[[], object], *, device, mcfg, ref_ms: float | None = None) -> LatencyReading:
    """``latency`` with the trial's settings (``mcfg``: a ``MeasureConfig``); a calibrated
    latency is also scaled to ``ref_ms`` (the sweep pool's reference time, else this loop's)."""
    return _latency_reading(_trial_latency(fn, device=device, mcfg=mcfg), ref_ms)


def _trial_latency(fn: Callable[[], object], *, device, mcfg, min_reps: int | None = None,
                   min_seconds: float | None = None) -> LatencyStats:
    """``latency`` with the trial's warm-up, CV check, rounds and calibration (``mcfg``)."""
    return latency(fn, device=device, warmup=mcfg.warmup, min_reps=mcfg.latency_reps if min_reps is None else min_reps,
                   min_seconds=mcfg.min_seconds if min_seconds is None else min_seconds, max_cv=mcfg.max_cv,
                   max_rounds=mcfg.max_rounds, calibrate=calibration(device) if mcfg.calibrate else None)


def _latency_reading(lat: LatencyStats, ref_ms: float | None) -> LatencyReading:
    out = LatencyReading(latency_p50_ms=lat.p50_ms, latency_p90_ms=lat.p90_ms, latency_p95_ms=lat.p95_ms,
                         latency_p99_ms=lat.p99_ms, latency_mean_ms=lat.mean_ms, latency_cv=lat.cv,
                         latency_reps=lat.reps, latency_rounds=lat.rounds, latency_noisy=lat.noisy)
    if lat.rel_p50 is not None:
        ref = ref_ms or lat.calibration_ms
        out.latency_calibration_ms, out.latency_p50_rel, out.latency_rel_cv = lat.calibration_ms, lat.rel_p50, lat.rel_cv
        out.latency_calibration_ref_ms, out.latency_p50_norm_ms = ref, lat.rel_p50 * ref
    return out


def track_throughput(fn: Callable[[], object], *, device, warmup: int, reps: int, tokens: int) -> ThroughputReading:
    """Tokens per second of ``fn`` (``tokens`` per call), from the median of ``reps`` calls."""
    return ThroughputReading(throughput_tokens_s=tokens / summarize(time_fn(fn, device=device, warmup=warmup,
                                                                               reps=reps))["median_s"])


def _paired(fn, ref_fn, *, device, mcfg, calls: int, min_calls: int = 0) -> PairedTimes:
    return paired(fn, ref_fn, device=device, warmup=mcfg.warmup, calls=calls, min_rounds=mcfg.pair_min_rounds,
                  max_rounds=mcfg.pair_max_rounds, halfwidth=mcfg.pair_halfwidth, max_seconds=mcfg.pair_max_seconds,
                  min_calls=min_calls, calibrate=calibration(device) if mcfg.calibrate else None)


def track_paired_latency(fn: Callable[[], object], ref_fn: Callable[[], object], *, device, mcfg,
                         ref_ms: float | None = None) -> tuple[LatencyReading, PairedLatencyReading]:
    """Batch-1 latency of ``fn`` timed side by side with ``ref_fn`` (``paired``, ``mcfg.pair_calls``
    calls of each per round, at least ``mcfg.latency_reps`` of ``fn``): the trial's raw and
    calibrated figures from its own calls in the rounds (``latency_rounds``: the paired rounds;
    ``latency_noisy``: the ratio's interval stayed wider than ``mcfg.pair_halfwidth``), and the ratio."""
    t = _paired(fn, ref_fn, device=device, mcfg=mcfg, calls=mcfg.pair_calls, min_calls=mcfg.latency_reps)
    ratio, lo, hi = t.ratio()
    own = _latency_reading(_stats(t.a_s, t.cal_a, rounds=t.rounds, noisy=not t.narrow), ref_ms)
    return own, PairedLatencyReading(latency_ratio_ref=ratio, latency_ratio_ref_lo=lo, latency_ratio_ref_hi=hi,
                                     latency_ref_p50_ms=statistics.median(t.b_s) * 1e3)


def track_paired_throughput(fn: Callable[[], object], ref_fn: Callable[[], object], *, device, mcfg,
                            tokens: int) -> tuple[ThroughputReading, PairedThroughputReading]:
    """Tokens per second of ``fn`` (``tokens`` per call) from its median call in rounds of one
    call of each, and its throughput over ``ref_fn``'s (per round: reference time / trial time)."""
    t = _paired(fn, ref_fn, device=device, mcfg=mcfg, calls=1)
    ratio, lo, hi = t.ratio(inverse=True)
    return (ThroughputReading(throughput_tokens_s=tokens / statistics.median(t.a_s)),
            PairedThroughputReading(throughput_ratio_ref=ratio, throughput_ratio_ref_lo=lo, throughput_ratio_ref_hi=hi))


def _tensor_bytes(t: torch.Tensor) -> tuple[int, int]:
    """(storage key, bytes); quantized tensors have no plain storage: count their elements."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()


def live_tensor_bytes(*objs) -> int:
    """Bytes of the distinct tensors held by modules (state dict, gradients; int8 packed
    weights included) and optimizers (their state)."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, (tuple, list)):
            for x in t:
                add(x)
        elif isinstance(t, torch.Tensor) and t.device.type != "meta":
            key, nbytes = _tensor_bytes(t)
            seen[key] = nbytes

    for obj in objs:
        if isinstance(obj, torch.nn.Module):
            for t in obj.state_dict(keep_vars=True).values():
                add(t)
            for t in obj.parameters():
                add(t.grad)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                add(list(state.values()))
    return sum(seen.values())


def _inference(model, plan) -> Callable[[dict], torch.Tensor]:
    @torch.no_grad()
    def infer(batch):
        with plan.autocast():
            return model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    return infer


def train_memory(model, opt, step: Callable[[dict], object], cfg, plan, gate) -> Iterator[object]:
    """The training step's memory: one real ``step(batch)`` on train inputs at the measurement
    shape (B, N), from a clean state (the weights move once more, as if training had lasted one
    step longer). ``cfg``: the ``TrialConfig``; ``plan``: its ``loop.Plan``. Yields readings."""
    batch = plan.batch(cfg.task_obj.measurement_batch(cfg.measure_batch_size, cfg.seq_length, split="train"))
    model.train()
    with gate.exclusive() as info:
        before = load_average()
        clean_state(plan.backend, plan.device.index or 0)
        m = track_memory(lambda: step(batch), device=plan.device, live_bytes=live_tensor_bytes(model, opt))
    yield conditions(info, before)
    yield TrainMemoryReading(peak_memory_train_mb=m.tensor_peak_mb, peak_rss_train_mb=m.rss_peak_mb)


def inference(model, cfg, plan, gate, reference: Reference | None = None) -> Iterator[object]:
    """The inference figures at the deployment shape, in this order under ``gate.exclusive()``:
    memory of the first call at the measurement shape in a clean state, latency at batch 1,
    throughput at (B, N), a decoder's generation timings, then memory again after the timing
    runs (a figure that depends on the call history shows up as a difference), and a decoder's
    generation memory. With a ``reference`` (and ``measure.paired``), it is built after the
    first memory reading (its weights never count in the trial's peaks), latency, throughput and
    a decoder's prefill and decode are timed side by side with it on the same inputs, and it is
    gone before the later memory readings; a reference that fails to build leaves the trial
    unpaired, and says why. Yields readings as they are taken."""
    mcfg, device = cfg.measure, plan.device
    n, b = cfg.seq_length, cfg.measure_batch_size
    model.eval()
    one = plan.batch(cfg.task_obj.measurement_batch(1, n))  # padded to its bucket when there are buckets
    many = plan.batch(cfg.task_obj.measurement_batch(b, n))
    infer = _inference(model, plan)
    live = live_tensor_bytes(model)
    decoder = mcfg.generation and getattr(getattr(model, "config", None), "arch", None) == "decoder"
    with gate.exclusive() as info:
        before = load_average()
        start = time.perf_counter()
        if mcfg.memory:  # first: the first call at this shape, in a clean state
            clean_state(plan.backend, device.index or 0)
            first = track_memory(lambda: infer(many), device=device, live_bytes=live)
            yield InferMemoryReading(peak_memory_infer_mb=first.tensor_peak_mb, peak_rss_infer_mb=first.rss_peak_mb,
                                     memory_method=first.method)
        ref_model = ref_plan = ref_infer = None
        if reference is not None and not mcfg.paired:
            yield PairingReading("unpaired: measure.paired is false")
        elif reference is not None:
            try:
                ref_model, ref_plan = reference.build()
                ref_infer = _inference(ref_model.eval(), ref_plan)
                yield PairingReading(reference.label)
            except Exception as exc:  # noqa: BLE001 -- a reference that cannot be built must not fail the trial
                yield PairingReading(f"unpaired: the reference ({reference.label}) failed to build: "
                                     f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        if ref_infer is None:
            yield track_latency(lambda: infer(one), device=device, mcfg=mcfg, ref_ms=plan.calibration_ref_ms)
            yield track_throughput(lambda: infer(many), device=device, warmup=mcfg.warmup, reps=mcfg.throughput_reps,
                                   tokens=b * n)
        else:
            yield from track_paired_latency(lambda: infer(one), lambda: ref_infer(one), device=device, mcfg=mcfg,
                                            ref_ms=plan.calibration_ref_ms)
            yield from track_paired_throughput(lambda: infer(many), lambda: ref_infer(many), device=device, mcfg=mcfg,
                                               tokens=b * n)
        if decoder:
            paired_with = None if ref_infer is None else (ref_model, ref_plan)
            yield from generation(model, cfg, plan, one["input_ids"][:, :n], many["input_ids"][:, :n],
                                  reference=paired_with)
            del paired_with
        ref_infer = ref_model = ref_plan = None  # gone before the later memory readings: the trial's state as it was
        if mcfg.memory:  # again, after the timing runs: must match the first call
            clean_state(plan.backend, device.index or 0)
            yield LaterMemoryReading(track_memory(lambda: infer(many), device=device, live_bytes=live).tensor_peak_mb)
            if decoder:
                yield from generation_memory(model, cfg, plan, many["input_ids"][:, :n])
        yield MeasureSeconds(time.perf_counter() - start)
    yield conditions(info, before)


def _decode_steps(model, plan, prompt: torch.Tensor, depth: int, new: int) -> tuple[Callable[[], None], object]:
    """A greedy decode step of ``model`` after ``prompt[:, :depth]`` (prefilled here), and its
    cache. Each call decodes one token; once the cache holds ``depth + new`` tokens the next
    call first crops it back to ``depth``, so the calls cycle through the same depths."""
    from omninet.model import KVCache

    cache = KVCache(capacity=depth + new)
    with torch.no_grad(), plan.autocast():
        nxt = [model(prompt[:, :depth], cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)]
    # A ring buffer (sink_window layers) has evicted blocks a crop would need: the cycle restores
    # a copy of the prefilled cache instead (bounded: the ring's slots, once per cycle).
    prefilled = copy.deepcopy(cache) if cache.rings else None

    def step() -> None:
        if cache.length(0) >= depth + new:
            if prefilled is None:
                cache.crop(depth)
            else:
                cache.__dict__.update(copy.deepcopy(prefilled).__dict__)
        with torch.no_grad(), plan.autocast():
            nxt[0] = model(nxt[0], cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)

    return step, cache


def _error(exc: Exception) -> GenerationErrorReading:
    return GenerationErrorReading(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")


def _gen_window(cfg, n: int) -> tuple[int, int]:
    """(P, T): the decode window's first cache depth and its number of new tokens; it ends at
    depth N (within a learned table's length)."""
    new = min(cfg.measure.generation_tokens, n - 1)
    return n - new, new


DEPTH_MULTIPLES = (1, 4, 16)  # decode latency at cache depths N, 4N and 16N (TrialResult.decode_ms_{k}p)


def decode_depths(n: int, max_len: int, new: int) -> list[int | None]:
    """The cache depths (keys read by a window's last step) of the depth series: k x N for each
    of ``DEPTH_MULTIPLES``, capped at the model's ``max_len`` (its trained length: a learned
    table ends there, and rotary or ALiBi models are measured where they were trained). A depth
    that the cap makes equal to the one before it is None (not measured twice); so is one with
    no room for the window's ``new`` tokens."""
    out: list[int | None] = []
    last = 0
    for k in DEPTH_MULTIPLES:
        d = min(k * n, max_len)
        out.append(d if d > last and d - new >= 1 else None)
        last = max(last, d)
    return out


def _slope_ms_per_1k(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of decode ms against cache depth, in ms per 1,000 tokens of depth."""
    if len(points) < 2:
        return None
    mx = statistics.fmean(d for d, _ in points)
    my = statistics.fmean(ms for _, ms in points)
    sxx = sum((d - mx) ** 2 for d, _ in points)
    return 1000.0 * sum((d - mx) * (ms - my) for d, ms in points) / sxx


def _gen_latency(fn, ref_fn, *, device, mcfg, seconds: float) -> tuple[LatencyStats, tuple[float, float, float] | None]:
    """A generation loop's latency: alone (``_trial_latency``), or with ``ref_fn`` timed side by
    side in the paired rounds (``paired``, as the forward's: ``mcfg.pair_calls`` calls of each
    per round, at least ``generation_reps`` of ``fn``), its stats from its own calls there and
    the (median, lo, hi) of the per-round ratios."""
    if ref_fn is None:
        return _trial_latency(fn, device=device, mcfg=mcfg, min_reps=mcfg.generation_reps, min_seconds=seconds), None
    t = _paired(fn, ref_fn, device=device, mcfg=mcfg, calls=mcfg.pair_calls, min_calls=mcfg.generation_reps)
    return _stats(t.a_s, t.cal_a, rounds=t.rounds, noisy=not t.narrow), t.ratio()


def generation(model, cfg, plan, one: torch.Tensor, many: torch.Tensor, *,
               reference: tuple[torch.nn.Module, object] | None = None) -> Iterator[object]:
    """A decoder's generation timings (see the module docstring) for prompts ``one`` (1, N) and
    ``many`` (B, N) of real task tokens; run by ``inference`` under its gate. ``reference``:
    (model, plan) of the pool's reference, whose prefill and decode are then timed side by side
    with the trial's. A failure is recorded (``generation_error``), not raised: the forward
    figures stand without it. Yields readings."""
    from omninet.model import KVCache, kv_cache_bytes

    mcfg, device = cfg.measure, plan.device
    n, b = one.shape[1], many.shape[0]
    depth, new = _gen_window(cfg, n)
    if new < 1:
        yield GenerationErrorReading(f"no room to decode: the prompt has {n} token(s), at least 2 are needed")
        return

    def prefill_of(m, p):
        def prefill() -> None:
            with torch.no_grad(), p.autocast():
                m(one, cache=KVCache(capacity=n + new), logits_to_keep=1)
        return prefill

    seconds = mcfg.min_seconds / 4 if mcfg.generation_min_seconds is None else mcfg.generation_min_seconds
    try:
        ref_prefill = ref_step = None
        if reference is not None:
            ref_prefill = prefill_of(*reference)
            ref_step, _ = _decode_steps(reference[0], reference[1], one, depth, new)
        pre, pre_ratio = _gen_latency(prefill_of(model, plan), ref_prefill, device=device, mcfg=mcfg, seconds=seconds)
        step, _ = _decode_steps(model, plan, one, depth, new)
        dec, dec_ratio = _gen_latency(step, ref_step, device=device, mcfg=mcfg, seconds=seconds)
        del ref_prefill, ref_step
        step_b, cache_b = _decode_steps(model, plan, many, depth, new)
        for _ in range(new):  # the cache at depth + new: its bytes, and the throughput's warm-up
            step_b()
        synchronize(device)
        kv = cache_b.nbytes()
        kv_dtype = (cache_b.rings[0].k if 0 in cache_b.rings else cache_b.self_kv[0][0]).dtype  # a ring: sink_window
        step_s = summarize(time_fn(step_b, device=device, warmup=0, reps=max(new, 8)))["median_s"]
        del step_b, cache_b
    except Exception as exc:  # noqa: BLE001 -- the generation figures must not fail a trial that measured the rest
        yield _error(exc)
        return
    yield GenerationReading(
        prefill_ms_p50=pre.p50_ms, prefill_ms_p90=pre.p90_ms, prefill_cv=pre.cv, prefill_noisy=pre.noisy,
        decode_ms_p50=dec.p50_ms, decode_ms_p90=dec.p90_ms, decode_ms_p99=dec.p99_ms, decode_cv=dec.cv,
        decode_noisy=dec.noisy, decode_reps=dec.reps, decode_tokens_s=b / step_s, decode_context=depth,
        decode_new_tokens=new, kv_cache_mb=kv / MB,
        kv_cache_formula_mb=kv_cache_bytes(model.config, b, depth + new, kv_dtype) / MB)
    if pre_ratio is not None and dec_ratio is not None:
        yield GenerationPairedReading(prefill_ratio_ref=pre_ratio[0], prefill_ratio_ref_lo=pre_ratio[1],
                                      prefill_ratio_ref_hi=pre_ratio[2], decode_ratio_ref=dec_ratio[0],
                                      decode_ratio_ref_lo=dec_ratio[1], decode_ratio_ref_hi=dec_ratio[2])
    if mcfg.generation_depths:  # depth N reuses the decode loop's figure only when it ran alone (the same loop)
        yield from _depth_series(model, cfg, plan, one, dec.p50_ms if dec_ratio is None else None, seconds)


def _depth_series(model, cfg, plan, one: torch.Tensor, decode_ms: float | None, seconds: float) -> Iterator[object]:
    """Decode latency per token (p50, batch 1) with windows of T steps ending at cache depths N,
    4N and 16N (``decode_depths``), and its slope, each depth through the same loop. The prompt
    for a depth beyond N is the task's N tokens repeated. Depth N is the decode loop's own
    window: ``decode_ms`` when that loop ran alone, else timed here."""
    mcfg, n = cfg.measure, one.shape[1]
    _, new = _gen_window(cfg, n)
    max_len = model.config.max_seq_length
    depths = decode_depths(n, max_len, new)
    out = DepthReading(decode_depth_cap=max_len if any(k * n > max_len for k in DEPTH_MULTIPLES) else None)
    points = []
    try:
        for k, d in zip(DEPTH_MULTIPLES, depths):
            if d is None:
                continue
            if d == n and decode_ms is not None:
                ms = decode_ms
            else:
                prompt = one.repeat(1, math.ceil(d / n))[:, :d]
                step, cache = _decode_steps(model, plan, prompt, d - new, new)
                ms = _trial_latency(step, device=plan.device, mcfg=mcfg, min_reps=mcfg.generation_reps,
                                    min_seconds=seconds).p50_ms
                del step, cache
            setattr(out, f"decode_depth_{k}p", d)
            setattr(out, f"decode_ms_{k}p", ms)
            points.append((d, ms))
    except Exception as exc:  # noqa: BLE001 -- the depths measured so far stand; the rest say why not
        yield _error(exc)
    out.decode_ms_per_1k_depth = _slope_ms_per_1k(points)
    yield out


def generation_memory(model, cfg, plan, many: torch.Tensor) -> Iterator[object]:
    """With ``measure.memory``: the tensor peaks of a prefill of N tokens and of a whole
    ``generate`` of T tokens after N - T, at the measure batch, each from a clean state. Run
    by ``inference`` after the timings, the reference gone. A failure is recorded, not raised."""
    from omninet.model import KVCache

    device, n = plan.device, many.shape[1]
    depth, new = _gen_window(cfg, n)
    if new < 1:
        return

    def prefill() -> None:
        with torch.no_grad(), plan.autocast():
            model(many, cache=KVCache(capacity=n + new), logits_to_keep=1)

    def generate() -> None:  # prefill to depth P, then T greedy tokens: the cache ends at N
        with plan.autocast():
            model.generate(many[:, :depth], max_new_tokens=new, ignore_eos=True)

    try:
        live = live_tensor_bytes(model)
        peaks = []
        for fn in (prefill, generate):
            clean_state(plan.backend, device.index or 0)
            peaks.append(track_memory(fn, device=device, live_bytes=live).tensor_peak_mb)
    except Exception as exc:  # noqa: BLE001
        yield _error(exc)
        return
    yield GenerationMemoryReading(peak_memory_prefill_mb=peaks[0], peak_memory_generate_mb=peaks[1])


PROBE_CALLS = 3  # latency calls of the measure-first probe


def latency_probe(model, cfg, plan, gate) -> ProbeReading:
    """Median ms of a few batch-1 calls at the deployment length (isolated like every measurement)."""
    one = plan.batch(cfg.task_obj.measurement_batch(1, cfg.seq_length))
    model.eval()
    infer = _inference(model, plan)
    with gate.exclusive():
        times = time_fn(lambda: infer(one), device=plan.device, warmup=1, reps=PROBE_CALLS)
    return ProbeReading(latency_p50_ms=sorted(times)[len(times) // 2] * 1e3, latency_reps=PROBE_CALLS)
