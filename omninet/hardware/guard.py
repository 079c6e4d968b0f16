"""The memory threshold that acts: a pass that makes a model's forward consult a monitor.

    placement = resolve_device_config({"device": "cpu", "memory_threshold": 0.85})
    model = placement.apply(model)          # attaches a MemoryGuard when memory_threshold is set
    model.memory_guard.events               # what it did, each switch also logged

Inference (``model.eval()``): every forward takes one reading (``memory_pressure``) and the
monitor's hysteresis decides the level of the inference ladder: split the batch into 2, 4, ...
micro-batches (outputs concatenated, losses weighted by their share of the batch: the result
equals the unsplit forward within float tolerance), then run eligible blocks in low precision
where the device has a native low dtype. An allocation failure climbs one level at once and the
forward is retried. In training mode the guard only passes through: the training step owns that
ladder (checkpointing, then micro-batches with gradient accumulation; ``accumulate``).

The model code is untouched: the pass sets ``model.forward`` on the instance (so ``nn.Module``'s
call, hooks included, still runs) and ``detach_memory_guard`` removes it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import logging
from typing import Any, Callable

import torch
from torch import nn

from omninet.hardware.base import get_backend
from omninet.hardware.monitor import MemoryMonitor, MonitorConfig, memory_pressure

__all__ = ["MemoryGuard", "attach_memory_guard", "detach_memory_guard", "is_oom", "split_batch", "merge_outputs",
           "monitor_config", "accumulate", "release_memory"]

log = logging.getLogger("omninet.hardware")

# Keyword arguments that are never split along the batch (per-layer or per-head, not per-example).
_NOT_BATCHED = ("head_mask",)
_BATCH_KEYS = ("input_ids", "hidden_states", "inputs_embeds", "decoder_input_ids", "encoder_hidden_states")


_OOM_TEXT = ("out of memory", "can't allocate memory",
             "could not create a primitive")  # oneDNN: its scratchpad / JIT buffer allocation was refused


def is_oom(exc: BaseException) -> bool:
    """An allocation failure: torch's OOM, Python's MemoryError, the CPU allocator's refusal, or
    oneDNN failing to create a primitive (how it reports a refused allocation under a limit)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(t in text for t in _OOM_TEXT)


def release_memory() -> None:
    """After a failed allocation: collect garbage and hand the C heap's free pages back to the
    kernel (glibc ``malloc_trim``), so allocations that bypass malloc (oneDNN's buffers) fit
    again under an RLIMIT."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to trim
        pass


def monitor_config(memory_threshold: float, **overrides) -> MonitorConfig:
    """The monitor settings behind a ``memory_threshold``: a dead band of 0.1 (or half the
    threshold when it is small) and two readings of patience."""
    return MonitorConfig(memory_threshold=memory_threshold, margin=min(0.1, memory_threshold / 2), **overrides)


# ---- splitting and merging --------------------------------------------------------------
def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for key in _BATCH_KEYS:
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return t.shape[0]
    for t in args:
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return t.shape[0]
    return None


def split_batch(args: tuple, kwargs: dict, n: int) -> list[tuple[tuple, dict, float]]:
    """``n`` micro-batches of a forward call: every tensor argument whose first dimension is
    the batch is cut along it. Returns (args, kwargs, weight) where weight is the chunk's share
    of the loss (its examples, or its non-ignored label tokens for per-token labels)."""
    B = _batch_size(args, kwargs)
    if B is None or n <= 1 or B < 2:
        return [(args, kwargs, 1.0)]
    bounds = torch.arange(B).tensor_split(min(n, B))

    def cut(x, idx, key=None):
        if key in _NOT_BATCHED or not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != B:
            return x
        return x[idx[0] : idx[-1] + 1]

    labels = kwargs.get("labels")
    per_token = isinstance(labels, torch.Tensor) and labels.dim() >= 2
    total = int((labels != -100).sum()) if per_token else B
    out = []
    for idx in bounds:
        a = tuple(cut(x, idx) for x in args)
        k = {key: cut(v, idx, key) for key, v in kwargs.items()}
        share = int((k["labels"] != -100).sum()) if per_token else len(idx)
        out.append((a, k, share / max(total, 1)))
    return out


def _cat(parts: list) -> Any:
    first = parts[0]
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, 0) if first.dim() > 0 else first
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    return first


def merge_outputs(outputs: list, weights: list[float]) -> Any:
    """Inverse of ``split_batch`` for the models' outputs: tensors concatenated along the batch,
    lists/tuples element-wise, ``ModelOutput.loss``/``aux_loss`` weighted by each chunk's share."""
    first = outputs[0]
    if dataclasses.is_dataclass(first):
        merged = {}
        for f in dataclasses.fields(first):
            values = [getattr(o, f.name) for o in outputs]
            if f.name in ("loss", "aux_loss"):
                merged[f.name] = None if values[0] is None else sum(w * v for w, v in zip(weights, values))
            elif f.name == "cache":
                merged[f.name] = values[0]
            else:
                merged[f.name] = _cat(values)
        return type(first)(**merged)
    return _cat(outputs)


# ---- the guard --------------------------------------------------------------------------
class MemoryGuard:
    """The forward of ``model`` under a memory monitor (inference ladder). Not a module: it
    holds no weights and adds nothing to the state dict."""

    def __init__(self, model: nn.Module, monitor: MemoryMonitor):
        self.model, self.monitor = model, monitor

    @property
    def events(self) -> list[dict]:
        return self.monitor.events

    def __call__(self, *args, **kwargs):
        forward = type(self.model).forward
        if self.model.training:  # the training step owns the training ladder
            return forward(self.model, *args, **kwargs)
        self.monitor.sample()
        while True:
            try:
                return self._run(forward, args, kwargs, self.monitor.micro_batches)
            except Exception as exc:  # noqa: BLE001 -- only allocation failures are retried
                if not is_oom(exc) or self.monitor.level >= len(self.monitor.levels):
                    raise
            gc.collect()  # outside the handler: the failed attempt's frames and tensors are gone
            self.monitor.escalate_on_oom()

    def _run(self, forward: Callable, args: tuple, kwargs: dict, n: int):
        if n <= 1 or kwargs.get("cache") is not None or kwargs.get("use_cache"):
            return forward(self.model, *args, **kwargs)
        chunks = split_batch(args, kwargs, n)
        if len(chunks) == 1:
            return forward(self.model, *args, **kwargs)
        outputs = [forward(self.model, *a, **k) for a, k, _ in chunks]
        return merge_outputs(outputs, [w for _, _, w in chunks])


def attach_memory_guard(model: nn.Module, *, memory_threshold: float, backend=None, plan=None,
                        read: Callable[[], float] | None = None, low_dtype: torch.dtype | None | str = "native",
                        **config) -> MemoryGuard:
    """Makes ``model``'s forward consult a monitor at ``memory_threshold`` (a fraction in (0, 1]).
    ``low_dtype='native'``: the backend's native bf16/fp16 for the low-precision rungs, none
    where the device has no native low dtype; None: never change precision."""
    t = memory_threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
        raise ValueError(f"memory_threshold must be a fraction in (0, 1], got {t!r}; e.g. 0.85")
    backend = backend or get_backend("cpu")
    if low_dtype == "native":
        native = backend.native_dtypes()
        low_dtype = next((d for d in (torch.bfloat16, torch.float16) if d in native), None)
    detach_memory_guard(model)
    p = next(model.parameters(), None)
    index = (p.device.index or 0) if p is not None else 0
    monitor = MemoryMonitor(model, backend=backend, plan=plan, config=monitor_config(float(t), **config),
                            read=read or (lambda: memory_pressure(backend, index)[0]), dtype=low_dtype, hook=False,
                            mode="inference")
    guard = MemoryGuard(model, monitor)
    model.forward = guard
    model.memory_guard = guard
    return guard


def detach_memory_guard(model: nn.Module) -> None:
    """Removes the guard (and restores everything it changed)."""
    guard = model.__dict__.get("memory_guard")
    if guard is not None:
        guard.monitor.restore()
        model.__dict__.pop("forward", None)
        del model.memory_guard


# ---- training: micro-batches with gradient accumulation ---------------------------------
def accumulate(loss_of: Callable[[dict], torch.Tensor], batch: dict, n: int, *, backward: Callable | None = None) -> torch.Tensor:
    """Forward and backward over ``n`` micro-batches of ``batch`` (dict of model keyword
    arguments), each loss weighted by its share so the accumulated gradient equals the whole
    batch's (mean losses). ``loss_of(micro_batch) -> scalar``; ``backward(loss)`` defaults to
    ``loss.backward()``. Returns the batch loss, detached."""
    backward = backward or (lambda loss: loss.backward())
    total = None
    for _, k, w in split_batch((), batch, n):
        loss = loss_of(k) * w
        backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    return total
