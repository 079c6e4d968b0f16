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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from omninet.hardware.base import Backend
from omninet.hardware.mixed import MixedPrecisionPlan, named_blocks, set_block_precision

__all__ = ["MonitorConfig", "MemoryMonitor"]

log = logging.getLogger("omninet.hardware")


@dataclass(kw_only=True)
class MonitorConfig:
    memory_threshold: float = 0.9
    margin: float = 0.1
    patience: int = 2
    sample_every: int = 1
    blocks_per_switch: int = 1
    checkpointing: bool = True

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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class MemoryMonitor:
    """Adapts ``model`` to memory pressure. ``read``: a zero-argument callable returning the
    used fraction of capacity (default: ``backend.memory_stats().fraction``; tests pass
    simulated readings). ``plan``: where block sensitivities come from (without one, only
    checkpointing is available)."""

    def __init__(self, model: nn.Module, *, backend: Backend | None = None, plan: MixedPrecisionPlan | None = None,
                 config: MonitorConfig | None = None, read: Callable[[], float] | None = None,
                 dtype: torch.dtype | None = None, hook: bool = True):
        from omninet.model import Stack

        self.model, self.config, self.plan = model, config or MonitorConfig(), plan
        if read is None:
            if backend is None:
                raise ValueError("MemoryMonitor needs backend= (to read its memory) or read= (a callable giving the used fraction)")
            read = lambda: backend.memory_stats().fraction  # noqa: E731
        self.read = read
        self.dtype = dtype or (plan.dtype if plan is not None else torch.bfloat16)
        p = next(model.parameters(), None)
        self.device_type = p.device.type if p is not None else "cpu"
        self.stacks = [m for m in model.modules() if isinstance(m, Stack)]
        self._ckpt_before = [s.gradient_checkpointing for s in self.stacks]
        self.levels: list[tuple[str, list[str]]] = []  # (kind, block names)
        if self.config.checkpointing and self.stacks:
            self.levels.append(("checkpointing", []))
        if plan is not None:
            order = plan.least_sensitive_fp32()
            k = self.config.blocks_per_switch
            self.levels += [("low_precision", order[i : i + k]) for i in range(0, len(order), k)]
        if not self.levels:
            raise ValueError("nothing to adapt: pass plan= (a MixedPrecisionPlan) or MonitorConfig(checkpointing=True)")
        self.level = 0
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
            if self._below >= self.config.patience and self.level > 0:
                self._switch(-1, r)
                self._below = 0
        else:
            self._above = self._below = 0
        return r

    # ---- switching ----------------------------------------------------------------------
    def _switch(self, direction: int, reading: float) -> None:
        kind, names = self.levels[self.level if direction > 0 else self.level - 1]
        blocks = dict(named_blocks(self.model)) if names else {}
        if kind == "checkpointing":
            for s, before in zip(self.stacks, self._ckpt_before):
                s.gradient_checkpointing = True if direction > 0 else before
            change = "activation checkpointing " + ("on" if direction > 0 else "restored")
        else:
            for n in names:
                set_block_precision(blocks[n], self.dtype if direction > 0 else None, self.device_type)
            dt = str(self.dtype).replace("torch.", "")
            change = f"{', '.join(names)} -> {dt if direction > 0 else 'float32'}"
        self.level += direction
        event = {"reading": self.readings, "memory_fraction": reading, "action": "degrade" if direction > 0 else "restore",
                 "change": change, "level": self.level}
        self.events.append(event)
        (log.warning if direction > 0 else log.info)(
            "memory %.1f%% %s %.0f%%: %s (level %d/%d)", 100 * reading, ">" if direction > 0 else "<",
            100 * (self.config.memory_threshold - (0 if direction > 0 else self.config.margin)), change,
            self.level, len(self.levels))

    def restore(self) -> None:
        """Climbs back to level 0 (everything as configured)."""
        while self.level > 0:
            self._switch(-1, float("nan"))

    def detach(self) -> None:
        """Removes the hook and restores the model."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.restore()
