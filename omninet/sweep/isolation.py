"""Per-node isolation of measurements, and disjoint CPU cores for concurrent trials.

One ``NodeCoordinator`` actor per Ray node (named ``omninet-node-<node id>``, pinned to that
node, created by the first trial that runs there). Trials of every sweep on the node use it:

- **cores**: ``allot(key, n)`` hands a trial ``n`` of the node's cores that no other running
  trial holds (wrapping around only when the node is oversubscribed, which the sweep refuses
  unless ``oversubscribe: true``); the worker pins itself to them.
- **measurement lock**, a writer-preferring readers-writer lock: a running trial holds the
  shared side while it builds, trains and evaluates; a measurement phase takes the exclusive
  side, which waits until every other trial of the node has paused at its next
  ``checkpoint()`` (between training steps). So no other trial's training or measurement
  overlaps a measurement; training still overlaps training. A holder whose process died is
  dropped (its PID is checked while others wait), so a killed worker cannot wedge the node.

Each measurement records how long it waited and how many other trials were active on the
node during it (expected 0).

The controller's own work on its node (the Parquet record, Optuna's tell and ask, the MLflow
writer thread) takes the shared side too (``DriverGate``): on an embedded local Ray, where the
driver shares the cores with the trials, it never runs during a measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator

__all__ = ["DriverGate", "NodeCoordinator", "NodeGate", "coordinator_for_this_node"]

NAMESPACE = "omninet"
CHECK_INTERVAL_S = 0.1  # how often a training loop asks whether a measurement is waiting


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class NodeCoordinator:
    """The actor's logic (plain class; ``coordinator_for_this_node`` wraps it in Ray)."""

    def __init__(self) -> None:
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        self.allotted: dict[str, list[int]] = {}
        self.shared: dict[str, int] = {}  # key -> pid, trials in their shared phase
        self.writer: str | None = None
        self.writer_pid = 0
        self.waiting_writers = 0
        self.peak_during_write = 0
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def node_cores(self) -> list[int]:
        return list(self.cores)

    def allot(self, key: str, n: int) -> list[int]:
        self._prune_dead()  # a trial killed on a long-lived node (its driver killed, say) frees its cores
        busy = {c for cores in self.allotted.values() for c in cores}
        free = [c for c in self.cores if c not in busy]
        if len(free) < n:  # oversubscribed (allowed by the sweep): share the least used cores
            use = {c: sum(c in v for v in self.allotted.values()) for c in self.cores}
            free += sorted((c for c in self.cores if c not in free), key=lambda c: use[c])
        self.allotted[key] = free[:max(1, n)]
        return self.allotted[key]

    def _prune_dead(self) -> None:
        if self.writer is not None and not _alive(self.writer_pid):
            self.allotted.pop(self.writer, None)
            self.writer = None
        for key, pid in list(self.shared.items()):
            if not _alive(pid):
                del self.shared[key]
                self.allotted.pop(key, None)

    async def enter(self, key: str, pid: int) -> None:
        cond = self._condition()
        async with cond:
            while self.writer is not None or self.waiting_writers:
                await self._wait(cond)
            self.shared[key] = pid

    async def leave(self, key: str) -> None:
        cond = self._condition()
        async with cond:
            self.shared.pop(key, None)
            self.allotted.pop(key, None)
            cond.notify_all()

    def writer_waiting(self) -> bool:
        return self.writer is not None or self.waiting_writers > 0

    async def pause(self, key: str, pid: int) -> None:
        """A trial at a checkpoint while a measurement waits: step out, wait, step back in."""
        cond = self._condition()
        async with cond:
            self.shared.pop(key, None)
            cond.notify_all()
            while self.writer is not None or self.waiting_writers:
                await self._wait(cond)
            self.shared[key] = pid

    async def begin_exclusive(self, key: str, pid: int) -> float:
        cond = self._condition()
        start = time.monotonic()
        async with cond:
            self.shared.pop(key, None)
            self.waiting_writers += 1
            cond.notify_all()
            try:
                while self.writer is not None or self.shared:
                    await self._wait(cond)
            finally:
                self.waiting_writers -= 1
            self.writer, self.writer_pid = key, pid
            self.peak_during_write = len(self.shared)
        return time.monotonic() - start

    async def end_exclusive(self, key: str, pid: int) -> int:
        cond = self._condition()
        async with cond:
            co_running = max(self.peak_during_write, len(self.shared))
            self.writer = None
            cond.notify_all()
            # writer preference: a waiting measurement goes first, and this trial steps back in
            # only once it has ended too (not as soon as it has begun)
            while self.writer is not None or self.waiting_writers:
                await self._wait(cond)
            self.shared[key] = pid
        return co_running

    async def _wait(self, cond: asyncio.Condition) -> None:
        try:
            await asyncio.wait_for(cond.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            self._prune_dead()
            cond.notify_all()

    def state(self) -> dict:
        return {"cores": self.cores, "allotted": dict(self.allotted), "shared": sorted(self.shared),
                "writer": self.writer, "waiting_writers": self.waiting_writers}


def coordinator_for_this_node():
    """The node's coordinator actor handle, created on first use (race-safe: get_if_exists)."""
    import ray  # heavy: ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # heavy: ray

    node_id = ray.get_runtime_context().get_node_id()
    actor = ray.remote(NodeCoordinator).options(
        name=f"omninet-node-{node_id}", namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        num_cpus=0, max_concurrency=64,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False))
    return actor.remote()


class NodeGate:
    """The measurement gate a sweep worker hands the trial runner (``omninet.trial.measure.
    MeasureGate``'s interface), backed by the node's coordinator."""

    def __init__(self, actor, key: str) -> None:
        self.actor, self.key, self.pid = actor, key, os.getpid()
        self._next_check = 0.0

    def start(self, cores: int) -> list[int]:
        import ray  # heavy: ray

        allotted = ray.get(self.actor.allot.remote(self.key, cores))
        ray.get(self.actor.enter.remote(self.key, self.pid))
        return allotted

    def stop(self) -> None:
        import ray  # heavy: ray

        ray.get(self.actor.leave.remote(self.key))

    def checkpoint(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        import ray  # heavy: ray

        self._next_check = now + CHECK_INTERVAL_S
        if ray.get(self.actor.writer_waiting.remote()):
            ray.get(self.actor.pause.remote(self.key, self.pid))

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[dict]:
        import ray  # heavy: ray

        info = {"wait_s": ray.get(self.actor.begin_exclusive.remote(self.key, self.pid)), "co_running": None}
        try:
            yield info
        finally:
            info["co_running"] = ray.get(self.actor.end_exclusive.remote(self.key, self.pid))


class DriverGate:
    """The controller's sections of work on its own node as holders of the shared side of the
    node's measurement lock: ``with gate.shared(): ...`` waits while a measurement runs there and
    keeps the next one waiting until the section ends. One key per thread (the controller's main
    loop and the MLflow writer hold it independently)."""

    def __init__(self) -> None:
        self.actor, self.pid = coordinator_for_this_node(), os.getpid()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        import ray  # heavy: ray

        key = f"driver-{self.pid}-{threading.get_ident()}"
        ray.get(self.actor.enter.remote(key, self.pid))
        try:
            yield
        finally:
            ray.get(self.actor.leave.remote(key))
