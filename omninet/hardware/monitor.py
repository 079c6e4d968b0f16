"""Run-time memory adaptation with hysteresis.

``MemoryMonitor`` reads memory at most once per forward (a forward pre-hook on the TOP model,
every ``sample_every`` calls; never per module) or once per training step (call ``sample()``
yourself and pass ``hook=False``). Its state is a level on a ladder of savings:

    level 0: as configured
    level 1: activation checkpointing on (training only; skipped for inference)
    level 2..: the least sensitive fp32 blocks (from a ``MixedPrecisionPlan``) moved to low
               precision, ``blocks_per_switch`` at a time

A reading above ``memory_threshold`` (a fraction of capacity) for ``patience`` consecutive
samples climbs one level; below ``memory_threshold - margin`` for ``patience`` samples it
climbs down one level (restoring exactly: blocks go back to fp32 master weights through
autocast hooks, nothing is cast). Readings inside the dead band reset both counters, so
jitter smaller than the margin never flips precision back and forth. Every switch is
logged (logger ``omninet.hardware``) and appended to ``monitor.events``.

The ladder above is the legacy one (``mode=None``). The model card's two ladders, in their
fixed order:

    mode='inference': micro-batches (the batch split in 2, 4, ... ``max_micro_batches``), then
                      eligible blocks in low precision (only where the device has a native
                      low dtype; ``eligible_blocks``)
    mode='training':  activation checkpointing, then micro-batches with gradient accumulation
                      (the same effective batch)

An allocation failure (``escalate_on_oom``) climbs one level at once and sets a floor: the
monitor never restores below a level that a real out-of-memory proved necessary, so a hard
limit cannot make it flip-flop. ``memory_pressure`` is the reading that acts on real memory:
the allocator on accelerators; on CPU the process against the limit that applies (the RLIMIT
budget a trial registered, else RLIMIT_DATA, the cgroup, or the memory still available).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import torch
from torch import nn

from omninet.hardware.base import Backend
from omninet.hardware.mixed import _HANDLES as _PRECISION_HOOKS
from omninet.hardware.mixed import MixedPrecisionPlan, eligible_blocks, named_blocks, set_block_precision
from omninet.model import Stack

__all__ = ["MonitorConfig", "MemoryMonitor", "memory_pressure", "register_data_budget", "clear_data_budget"]

log = logging.getLogger("omninet.hardware")


@dataclass(kw_only=True)
class MonitorConfig:
    memory_threshold: float = 0.9
    margin: float = 0.1
    patience: int = 2
    sample_every: int = 1
    blocks_per_switch: int = 1
    checkpointing: bool = True
    max_micro_batches: int = 16  # the micro-batch rungs are 2, 4, ... up to this

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.memory_threshold, (int, float)) and 0 < self.memory_threshold <= 1,
             f"MonitorConfig.memory_threshold must be a fraction in (0, 1], got {self.memory_threshold!r}"),
            (isinstance(self.margin, (int, float)) and 0 < self.margin < self.memory_threshold,
             f"MonitorConfig.margin must be in (0, memory_threshold={self.memory_threshold}), got {self.margin!r}"),
            (isinstance(self.patience, int) and self.patience >= 1, f"MonitorConfig.patience must be an int >= 1, got {self.patience!r}"),
            (isinstance(self.sample_every, int) and self.sample_every >= 1,
             f"MonitorConfig.sample_every must be an int >= 1, got {self.sample_every!r}"),
            (isinstance(self.blocks_per_switch, int) and self.blocks_per_switch >= 1,
             f"MonitorConfig.blocks_per_switch must be an int >= 1, got {self.blocks_per_switch!r}"),
            (isinstance(self.checkpointing, bool), f"MonitorConfig.checkpointing must be true or false, got {self.checkpointing!r}"),
            (isinstance(self.max_micro_batches, int) and self.max_micro_batches >= 1,
             f"MonitorConfig.max_micro_batches must be an int >= 1 (1: never split), got {self.max_micro_batches!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# ---- reading real memory -----------------------------------------------------------------
_BUDGET: dict[str, int] = {}  # the RLIMIT_DATA budget in force: {'base': bytes, 'limit': bytes}


def register_data_budget(base: int, limit: int) -> None:
    """Called by whoever caps RLIMIT_DATA (``omninet.trial.limits.memory_limit``): the reading
    becomes the budget's used fraction, (VmData - base) / (limit - base)."""
    _BUDGET.update(base=int(base), limit=int(limit))


def clear_data_budget() -> None:
    _BUDGET.clear()


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _malloc_free() -> int:
    """Bytes glibc holds free for reuse (``mallinfo2().fordblks``): inside VmData, yet usable
    without raising it. 0 where that is not glibc >= 2.33."""
    try:
        class _MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallinfo2.restype = _MallInfo2
        return int(libc.mallinfo2().fordblks)
    except (OSError, AttributeError, TypeError):
        return 0


def _cgroup_fraction() -> float | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    return int(current) / int(limit) if limit.isdigit() and current.isdigit() and int(limit) else None


def memory_pressure(backend: Backend | None = None, index: int = 0) -> tuple[float, str]:
    """(used fraction, which limit) of the memory that limits this process now. Accelerators:
    the allocator's bytes in use against the device's capacity. CPU: the largest of the
    registered RLIMIT budget's use (VmData less glibc's reusable free chunks), VmData against
    RLIMIT_DATA, the cgroup's use against its
    limit, and the resident set against resident + available memory."""
    if backend is not None and backend.device_type != "cpu":
        stats = backend.memory_stats(index)
        return (stats.in_use / stats.capacity if stats.capacity else 0.0), f"{backend.name} allocator"
    readings: list[tuple[float, str]] = []
    data = _status_bytes("VmData")
    if data is not None and _BUDGET:  # the heap's free chunks count against the limit but are reusable
        used = data - _malloc_free() - _BUDGET["base"]
        readings.append((max(0, used) / max(1, _BUDGET["limit"] - _BUDGET["base"]), "rlimit budget"))
    elif data is not None:
        soft = resource.getrlimit(resource.RLIMIT_DATA)[0]
        if soft not in (resource.RLIM_INFINITY, -1) and soft > 0:
            readings.append((data / soft, "rlimit_data"))
    cgroup = _cgroup_fraction()
    if cgroup is not None:
        readings.append((cgroup, "cgroup"))
    rss = psutil.Process().memory_info().rss
    readings.append((rss / (rss + psutil.virtual_memory().available), "available"))
    return max(readings)


class MemoryMonitor:
    """Adapts ``model`` to memory pressure. ``read``: a zero-argument callable returning the
    used fraction of capacity (default: ``memory_pressure(backend)``; tests pass simulated
    readings). ``plan``: where block sensitivities come from. ``mode``: None (the legacy
    ladder: checkpointing, then the plan's blocks), 'inference' or 'training' (the ladders of
    the module docstring). ``low_dtype``: the dtype of the inference ladder's low-precision
    rungs (None: no such rungs, e.g. a device without a native low dtype)."""

    def __init__(self, model: nn.Module, *, backend: Backend | None = None, plan: MixedPrecisionPlan | None = None,
                 config: MonitorConfig | None = None, read: Callable[[], float] | None = None,
                 dtype: torch.dtype | None = None, hook: bool = True, mode: str | None = None):
        if mode not in (None, "inference", "training"):
            raise ValueError(f"MemoryMonitor mode must be None, 'inference' or 'training', got {mode!r}")
        self.model, self.config, self.plan, self.mode = model, config or MonitorConfig(), plan, mode
        if read is None:
            if backend is None:
                raise ValueError("MemoryMonitor needs backend= (to read its memory) or read= (a callable giving the used fraction)")
            read = lambda: memory_pressure(backend)[0]  # noqa: E731
        self.read = read
        self.dtype = dtype or (plan.dtype if plan is not None else torch.bfloat16)
        p = next(model.parameters(), None)
        self.device_type = p.device.type if p is not None else "cpu"
        self.stacks = [m for m in model.modules() if isinstance(m, Stack)]
        self._ckpt_before = [s.gradient_checkpointing for s in self.stacks]
        self.levels: list[tuple[str, list[str]]] = []  # (kind, block names); micro_batches: ([str(n)])
        k = self.config.blocks_per_switch
        splits = [("micro_batches", [str(2 ** i)]) for i in range(1, self.config.max_micro_batches.bit_length())
                  if 2 ** i <= self.config.max_micro_batches]
        if mode is None:
            if self.config.checkpointing and self.stacks:
                self.levels.append(("checkpointing", []))
            if plan is not None:
                order = plan.least_sensitive_fp32()
                self.levels += [("low_precision", order[i : i + k]) for i in range(0, len(order), k)]
        elif mode == "inference":
            self.levels += splits
            if dtype is not None and self.stacks:
                order = eligible_blocks(model, plan)
                self.levels += [("low_precision", order[i : i + k]) for i in range(0, len(order), k)]
        else:
            if self.config.checkpointing and self.stacks:
                self.levels.append(("checkpointing", []))
            self.levels += splits
        if not self.levels:
            raise ValueError("nothing to adapt: pass plan= (a MixedPrecisionPlan) or MonitorConfig(checkpointing=True)")
        self.level = 0
        self.floor = 0  # never restore below this level (set by escalate_on_oom)
        self.max_level = 0
        self._moved: dict[int, list[str]] = {}  # ladder index -> blocks this monitor put in low precision
        self.events: list[dict] = []
        self.readings = 0
        self._calls = 0
        self._above = self._below = 0
        self._handle = model.register_forward_pre_hook(self._on_forward) if hook else None

    # ---- sampling -----------------------------------------------------------------------
    def _on_forward(self, module, args) -> None:
        self._calls += 1
        if (self._calls - 1) % self.config.sample_every == 0:
            self.sample()

    def sample(self, reading: float | None = None) -> float:
        """Takes one reading (or uses ``reading``) and switches if the hysteresis says so."""
        r = float(self.read() if reading is None else reading)
        self.readings += 1
        high, low = self.config.memory_threshold, self.config.memory_threshold - self.config.margin
        if r > high:
            self._above, self._below = self._above + 1, 0
            if self._above >= self.config.patience and self.level < len(self.levels):
                self._switch(+1, r)
                self._above = 0
        elif r < low:
            self._below, self._above = self._below + 1, 0
            if self._below >= self.config.patience and self.level > self.floor:
                self._switch(-1, r)
                self._below = 0
        else:
            self._above = self._below = 0
        return r

    def escalate_on_oom(self) -> bool:
        """An allocation failed: climb one level now (no patience) and never restore below it.
        False when the ladder is exhausted (the caller re-raises)."""
        if self.level >= len(self.levels):
            return False
        self._switch(+1, float("nan"), cause="out of memory")
        self.floor = self.level
        return True

    @property
    def micro_batches(self) -> int:
        """How many micro-batches a batch is split into at the current level (1: not split)."""
        done = [int(names[0]) for kind, names in self.levels[: self.level] if kind == "micro_batches"]
        return max(done, default=1)

    def actions(self, level: int | None = None) -> list[str]:
        """The savings in force at ``level`` (default: now), in ladder order: 'checkpointing',
        'micro_batches=4', 'low_precision_blocks=2'. ``actions(monitor.max_level)``: the most
        this monitor ever did."""
        level = self.level if level is None else level
        out, low = [], 0
        micro = max([int(n[0]) for k, n in self.levels[:level] if k == "micro_batches"], default=1)
        for kind, names in self.levels[:level]:
            if kind == "checkpointing":
                out.append("checkpointing")
            elif kind == "low_precision":
                low += len(names)
        if micro > 1:
            out.append(f"micro_batches={micro}")
        if low:
            out.append(f"low_precision_blocks={low}")
        return out

    # ---- switching ----------------------------------------------------------------------
    def _switch(self, direction: int, reading: float, cause: str | None = None) -> None:
        kind, names = self.levels[self.level if direction > 0 else self.level - 1]
        blocks = dict(named_blocks(self.model)) if names and kind == "low_precision" else {}
        if kind == "micro_batches":
            n = int(names[0])
            change = f"micro-batches {n if direction > 0 else max(1, n // 2)} (of each batch)"
        elif kind == "checkpointing":
            for s, before in zip(self.stacks, self._ckpt_before):
                s.gradient_checkpointing = True if direction > 0 else before
            change = "activation checkpointing " + ("on" if direction > 0 else "restored")
        else:
            if direction > 0:  # blocks a precision plan already put in low precision stay as they are
                self._moved[self.level] = [n for n in names if not hasattr(blocks[n], _PRECISION_HOOKS)]
            for n in self._moved.pop(self.level - 1, []) if direction < 0 else self._moved[self.level]:
                set_block_precision(blocks[n], self.dtype if direction > 0 else None, self.device_type)
            dt = str(self.dtype).replace("torch.", "")
            change = f"{', '.join(names)} -> {dt if direction > 0 else 'float32'}"
        self.level += direction
        self.max_level = max(self.max_level, self.level)
        event = {"reading": self.readings, "memory_fraction": reading, "action": "degrade" if direction > 0 else "restore",
                 "change": change, "level": self.level, "cause": cause or "threshold"}
        self.events.append(event)
        if cause is not None:
            log.warning("memory: %s: %s (level %d/%d)", cause, change, self.level, len(self.levels))
            return
        (log.warning if direction > 0 else log.info)(
            "memory %.1f%% %s %.0f%%: %s (level %d/%d)", 100 * reading, ">" if direction > 0 else "<",
            100 * (self.config.memory_threshold - (0 if direction > 0 else self.config.margin)), change,
            self.level, len(self.levels))

    def restore(self) -> None:
        """Climbs back to level 0 (everything as configured), floor included."""
        self.floor = 0
        while self.level > 0:
            self._switch(-1, float("nan"))

    def detach(self) -> None:
        """Removes the hook and restores the model."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.restore()
