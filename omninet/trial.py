"""One trial: build a configuration on the local device, train it within a budget, evaluate
it, measure it, and return one flat record. Every point on the platform's
accuracy-memory-latency trade-off is one ``run_trial``.

    result = run_trial({"task": {"name": "listops"}, "train": {"max_seconds": 60}})
    result.status, result.accuracy, result.latency_p50_ms, result.to_dict()

Order of work (``run_trial``): validate the config (``invalid``) -> build the task and resolve
the device and precision through ``omninet.hardware`` (``invalid``) -> estimate peak memory
and compare it with the budget (``infeasible``; nothing built) -> under the run-time memory
limit: build, train (``diverged`` on a non-finite loss), measure the training step's memory,
prune heads (``model.heads.prune_ratio``, by gradient importance), quantize (``int8``: trained
in fp32, quantized for evaluation and inference), evaluate on the held-out split, measure
latency, throughput and inference memory. ``oom`` on a real allocation failure, ``error``
(with the message) on anything else. A trial-level failure is a result, never an exception.

Training: AdamW (weight decay on matrices only), linear warm-up then cosine decay to
``min_lr_ratio * lr``, gradient clipping, the precision policy (autocast in bf16/fp16; fp16
with a gradient scaler where the backend needs one). With a ``steps`` budget the run is
deterministic on CPU given the config and seed; a ``max_seconds`` budget makes the number of
steps depend on the machine's speed (the cosine schedule then follows elapsed time).

Measurement, at the target sequence length N (``measure.seq_length``, default the task's
``max_length``; examples cut or padded to N): latency p50/p95 at batch 1 and throughput
(tokens/s, inference) at the measurement batch (default the training batch), each after
``warmup`` untimed calls with ``reps >= 20`` timed, device-synchronized calls; peak memory
of one extra training step on train examples (forward, backward, clip, AdamW; right after
training, so the weights move once more) and of one inference forward. Peak memory counts
tensors: on accelerators the allocator's ``max_memory_allocated``; on CPU the tensors alive
before the call (parameters, buffers, gradients, optimizer state; counted exactly) plus the
PyTorch profiler's allocation timeline during the call (``omninet.measure.peak_memory_mb``).
The Python heap and allocator slack are not counted, on any device.

Memory budget: ``memory_budget_mb`` (argument, else ``hardware.memory_budget_mb``) is both the
infeasibility threshold for the estimate and a hard limit at run time, counted from the
trial's start. CUDA caps its caching allocator (``set_per_process_memory_fraction``); on Linux
CPUs the kernel caps the process's data segment (``RLIMIT_DATA`` = data size now - memory
glibc holds free for reuse + budget), so an allocation past the budget really fails
(``oom``). The CPU limit covers the whole process while the trial runs (the trial owns its
worker; torch's thread pool is started first) and is lifted afterwards. Other devices: the
estimate check only (noted in ``notes``). Without a budget, ``memory_threshold`` x the
device's capacity (host: available RAM) is the infeasibility threshold and nothing is capped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from omninet.config import ConfigBase, ModelConfig
from omninet.model import OmniNetModel

__all__ = [
    "STATUSES",
    "TrainConfig",
    "HardwareConfig",
    "MeasureConfig",
    "TrialConfig",
    "TrialResult",
    "TRIAL_MODEL_DEFAULTS",
    "run_trial",
    "estimate_memory_mb",
    "set_dotted",
    "trial_main",
]

STATUSES = ("ok", "oom", "diverged", "infeasible", "invalid", "error")
MB = 2**20

# A trial's model starts from these (not from ModelConfig's GPT-2-size defaults): a small
# dense encoder that trains in about a minute on a laptop CPU. Any key given in the trial's
# ``model`` section overrides them; vocab_size, pad_token_id and num_classes come from the task.
TRIAL_MODEL_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "ff_ratio": 2.0,
    "dropout": 0.0,
    "pooling": "mean",
}
TASK_OWNED_MODEL_KEYS = ("vocab_size", "pad_token_id", "num_classes")
PRUNE_CALIBRATION_BATCHES = 4  # train batches that score head importance before pruning


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


# ---- configuration ----------------------------------------------------------------------
@dataclass(kw_only=True)
class TrainConfig(ConfigBase):
    """The training budget and optimizer. At least one of ``steps`` and ``max_seconds``;
    with both, training stops at whichever comes first."""

    steps: int | None = None
    max_seconds: float | None = None
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_batch_size: int = 128
    eval_max_examples: int | None = None  # None: the whole eval split

    def validate(self) -> None:
        _check(self.steps is not None or self.max_seconds is not None,
               "train: give a budget: steps (deterministic) and/or max_seconds")
        _check(self.steps is None or self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _check(self.max_seconds is None or self.max_seconds > 0, f"train.max_seconds must be > 0, got {self.max_seconds}")
        for name in ("batch_size", "eval_batch_size"):
            _check(getattr(self, name) >= 1, f"train.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"train.lr must be a positive number, got {self.lr}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
               f"train.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _check(self.grad_clip is None or self.grad_clip > 0, f"train.grad_clip must be > 0 (or null), got {self.grad_clip}")
        _check(self.eval_max_examples is None or self.eval_max_examples >= 1,
               f"train.eval_max_examples must be >= 1 (or null for the whole split), got {self.eval_max_examples}")


@dataclass(kw_only=True)
class HardwareConfig(ConfigBase):
    """Where and how the trial runs. ``device``, ``precision`` and ``memory_threshold`` go to
    ``omninet.hardware.resolve_device_config``, which checks them against this machine."""

    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16", "auto", "mixed", "int8"] = "fp32"
    memory_threshold: float = 0.9
    memory_budget_mb: float | None = None
    num_threads: int | None = None  # CPU intra-op threads for this trial (None: leave torch's setting)

    def validate(self) -> None:
        _check(self.num_threads is None or self.num_threads >= 1,
               f"hardware.num_threads must be >= 1 (or null to keep torch's setting), got {self.num_threads}")
        _check(0.0 < self.memory_threshold <= 1.0,
               f"hardware.memory_threshold must be a fraction in (0, 1], got {self.memory_threshold}")
        _check(self.memory_budget_mb is None or self.memory_budget_mb > 0,
               f"hardware.memory_budget_mb must be > 0 (or null), got {self.memory_budget_mb}")

    def device_config(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "memory_threshold": self.memory_threshold}


@dataclass(kw_only=True)
class MeasureConfig(ConfigBase):
    """Latency at batch 1 and throughput at ``batch_size`` (default: the training batch), both
    at ``seq_length`` tokens (default: the task's ``max_length``)."""

    latency_reps: int = 30
    throughput_reps: int = 20
    warmup: int = 3
    seq_length: int | None = None
    batch_size: int | None = None
    memory: bool = True

    def validate(self) -> None:
        for name in ("latency_reps", "throughput_reps"):
            _check(getattr(self, name) >= 20, f"measure.{name} must be >= 20 for stable percentiles, got {getattr(self, name)}")
        _check(self.warmup >= 1, f"measure.warmup must be >= 1, got {self.warmup}")
        for name in ("seq_length", "batch_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"measure.{name} must be >= 1 (or null), got {value}")


@dataclass(kw_only=True)
class TrialConfig(ConfigBase):
    """A trial: ``task`` (``{'name': ..., **task fields}``, see ``omninet.tasks``), ``model``
    (ModelConfig fields over ``TRIAL_MODEL_DEFAULTS``; the task sets vocab_size, pad_token_id,
    num_classes and, unless given, arch and max_seq_length), ``train``, ``hardware``, ``measure``.
    Validation builds the task (cheap: data is made lazily) and the full ModelConfig."""

    task: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, _where: str | None = None) -> "TrialConfig":
        if isinstance(data, dict):
            missing = [k for k in ("task", "train") if k not in data]
            _check(not missing, f"trial config: missing section(s) {', '.join(missing)}; a trial needs a task and a "
                                "train budget, e.g. train: {steps: 100}")
        return super().from_dict(data, _where=_where)

    def validate(self) -> None:
        from omninet.tasks import build_task

        task = build_task(self.task)
        object.__setattr__(self, "_task", task)
        object.__setattr__(self, "_model_config", self._resolve_model(task))

    def _resolve_model(self, task) -> ModelConfig:
        facts = {"vocab_size": task.vocab_size, "pad_token_id": task.pad_id, "num_classes": task.num_classes}
        for key in TASK_OWNED_MODEL_KEYS:
            if key in self.model and self.model[key] != facts[key]:
                raise ValueError(f"model.{key}={self.model[key]!r} conflicts with task {task.name!r} ({facts[key]!r}); "
                                 f"remove model.{key}: the task sets it")
        arch = self.model.get("arch", "encoder" if task.kind == "classification" else "decoder")
        _check(task.kind != "lm" or arch == "decoder",
               f"model.arch={arch!r} cannot be trained on the language-modelling task {task.name!r}; use arch 'decoder'")
        _check(task.kind != "classification" or arch != "encoder_decoder",
               f"model.arch='encoder_decoder' has no classification path; use 'encoder' for task {task.name!r}")
        n = max(task.max_length, self.measure.seq_length or 0)
        merged = {**TRIAL_MODEL_DEFAULTS, "max_seq_length": n, **self.model, **facts, "arch": arch}
        return ModelConfig.from_dict(merged, _where="model")

    @property
    def task_obj(self):
        return self._task

    @property
    def model_config(self) -> ModelConfig:
        return self._model_config

    @property
    def seq_length(self) -> int:
        return self.measure.seq_length or self._task.max_length

    @property
    def measure_batch_size(self) -> int:
        return self.measure.batch_size or self.train.batch_size


def set_dotted(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``config`` with ``path`` (``'model.attention.kernel'``) set to ``value``;
    missing intermediate sections are created."""
    out = copy.deepcopy(config)
    node = out
    keys = path.split(".")
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        _check(isinstance(child, dict), f"{path}: {key!r} is not a section (it holds {child!r})")
        node = child
    node[keys[-1]] = value
    return out


# ---- result -----------------------------------------------------------------------------
@dataclass
class TrialResult:
    """One trial's flat record. Metrics are None where the trial did not get that far."""

    status: str
    error: str | None = None
    accuracy: float | None = None  # the task metric, higher is better
    eval_loss: float | None = None
    majority_baseline: float | None = None
    peak_memory_train_mb: float | None = None
    peak_memory_infer_mb: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    throughput_tokens_s: float | None = None
    train_tokens_s: float | None = None  # real (unpadded) tokens trained on per second
    num_params: int | None = None  # after head pruning
    heads_pruned: int | None = None
    heads_remaining: int | None = None
    train_seconds: float | None = None
    measure_seconds: float | None = None
    wall_seconds: float | None = None
    steps: int = 0
    device: str | None = None
    device_name: str | None = None
    precision: str | None = None
    estimated_memory_mb: float | None = None
    memory_budget_mb: float | None = None
    memory_method: str | None = None
    seq_length: int | None = None
    task: str | None = None
    notes: str | None = None
    loss_curve: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Flat and JSON-serializable (non-finite floats become None)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        out["loss_curve"] = [float(x) for x in self.loss_curve if math.isfinite(x)]
        return out


class _Diverged(Exception):
    pass


# ---- memory estimate --------------------------------------------------------------------
def estimate_memory_mb(config: dict[str, Any] | TrialConfig) -> float:
    """Estimated peak tensor memory (MB) of a training step at the measurement batch and
    sequence length: weights + gradients + AdamW's two moments + saved activations. Uses the
    hardware layer's analytic estimator (``omninet.hardware.estimate_memory_mb``).
    ValueError on an invalid config."""
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    from omninet.hardware import estimate_memory_mb as hardware_estimate

    precision = cfg.hardware.precision
    if precision in ("int8", "auto"):  # int8 trains in fp32; 'auto' resolves per device
        precision = "fp32" if precision == "int8" else _train_precision(cfg)
    return float(hardware_estimate(cfg.model_config, batch_size=cfg.measure_batch_size, seq_len=cfg.seq_length,
                                   precision=precision, training=True))


def _train_precision(cfg: TrialConfig) -> str:
    from omninet.hardware import resolve_device_config

    return resolve_device_config({**cfg.hardware.device_config(), "precision": "auto"}, training=True).precision


def _capacity_mb(device: torch.device) -> float | None:
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available / MB
    mod = getattr(torch, device.type, None)
    try:
        return mod.get_device_properties(device).total_memory / MB
    except Exception:  # a backend without device properties: no capacity-based threshold
        return None


# ---- run-time memory limit --------------------------------------------------------------
def _vm_data_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def _memory_limit(device: torch.device, budget_mb: float | None, notes: list[str]) -> Iterator[None]:
    """Makes allocations beyond ``budget_mb`` (counted from now) fail for real."""
    if budget_mb is None:
        yield
        return
    budget = int(budget_mb * MB)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, (torch.cuda.memory_allocated(device) + budget) / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return
    free = _malloc_free_bytes() if device.type == "cpu" else 0  # first: it returns what it can to the kernel
    base = _vm_data_bytes() if device.type == "cpu" else None
    if base is not None:
        base -= free
    try:
        import resource
    except ImportError:
        resource = None
    if base is None or resource is None:
        notes.append(f"memory budget not enforced at run time on {device.type} here (estimate check only)")
        yield
        return
    # Start torch's intra-op thread pool first: its threads' stacks must not be refused later.
    torch.ones(64, 64) @ torch.ones(64, 64)
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = base + budget
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _malloc_free_bytes() -> int:
    """Bytes glibc malloc holds free for reuse (after returning what it can to the kernel).
    The kernel counts them in VmData already, so a trial could reuse them unseen by RLIMIT_DATA;
    subtracting them keeps the budget about the trial's own allocations."""
    try:
        import ctypes
        import ctypes.util

        class _MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc_trim(0)
        libc.mallinfo2.restype = _MallInfo2
        return int(libc.mallinfo2().fordblks)
    except (OSError, AttributeError, TypeError):  # not glibc >= 2.33: count from VmData alone
        return 0


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# ---- training ---------------------------------------------------------------------------
def _lr_factor(step: int, elapsed: float, tc: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine to ``min_lr_ratio``; progress is the
    larger of the step and time fractions of the budget."""
    warm = min(1.0, (step + 1) / tc.warmup_steps) if tc.warmup_steps else 1.0
    progress = 0.0
    if tc.steps is not None:
        progress = max(progress, step / tc.steps)
    if tc.max_seconds is not None:
        progress = max(progress, elapsed / tc.max_seconds)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return warm * (tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * cosine)


def _make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if p.dim() >= 2 else no_decay).append(p)  # biases and norms are not decayed
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas))


def _train_batches(task, tc: TrainConfig) -> Iterator[dict[str, torch.Tensor]]:
    """Endless deterministic stream: epoch e is shuffled with seed ``seed + e``."""
    epoch = 0
    while True:
        yielded = False
        for batch in task.batches("train", tc.batch_size, seed=tc.seed + epoch, shuffle=True, drop_last=True):
            yielded = True
            yield batch
        if not yielded:  # fewer examples than one batch: keep the partial batch
            partial = list(task.batches("train", tc.batch_size, seed=tc.seed + epoch, shuffle=True, drop_last=False))
            if not partial:
                raise ValueError(f"task {task.name!r} has no training examples")
            yield from partial
        epoch += 1


@dataclass
class _Plan:
    """How this trial computes: the training placement (device, precision policy), its loss
    scaler, and whether the trained model is quantized to int8 for evaluation and inference."""

    placement: Any
    scaler: Any
    int8: bool

    @property
    def device(self) -> torch.device:
        return self.placement.device

    def autocast(self):
        policy = self.placement.policy
        return policy.autocast() if policy is not None else contextlib.nullcontext()


def _resolve_plan(hw: HardwareConfig) -> _Plan:
    """ValueError when this machine cannot run the requested device / precision."""
    from omninet.hardware import resolve_device_config

    device_config = hw.device_config()
    int8 = hw.precision == "int8"
    if int8:
        resolve_device_config(device_config, training=False)  # int8 inference must be possible here
        device_config["precision"] = "fp32"  # train in fp32, quantize after training
    placement = resolve_device_config(device_config, training=True)
    policy = getattr(placement, "policy", None)
    scaler = policy.make_grad_scaler() if policy is not None else None
    return _Plan(placement, scaler, int8)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _step(model, opt, batch, tc: TrainConfig, plan: _Plan) -> torch.Tensor:
    """One optimizer step under the precision policy (the head router's auxiliary loss, if
    any, is trained too); returns the detached loss."""
    with plan.autocast():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
    opt.zero_grad(set_to_none=True)
    if plan.scaler is not None:
        plan.scaler.scale(loss).backward()
        plan.scaler.unscale_(opt)  # clip true gradients, not scaled ones
    else:
        loss.backward()
    if tc.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    if plan.scaler is not None:
        plan.scaler.step(opt)
        plan.scaler.update()
    else:
        opt.step()
    return loss.detach()


def _train(model, opt, task, tc: TrainConfig, plan: _Plan, res: TrialResult) -> None:
    model.train()
    stream = _train_batches(task, tc)
    tokens = 0
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if (tc.steps is not None and res.steps >= tc.steps) or (tc.max_seconds is not None and elapsed >= tc.max_seconds):
            break
        for group in opt.param_groups:
            group["lr"] = tc.lr * _lr_factor(res.steps, elapsed, tc)
        batch = _to_device(next(stream), plan.device)
        loss = float(_step(model, opt, batch, tc, plan))
        res.steps += 1
        tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(loss):
            res.train_seconds = time.perf_counter() - start
            raise _Diverged(f"training loss became {loss} at step {res.steps} (lr={tc.lr})")
        res.loss_curve.append(loss)
    res.train_seconds = time.perf_counter() - start
    res.train_tokens_s = tokens / res.train_seconds if res.train_seconds > 0 else None


@torch.no_grad()
def _evaluate(model, task, tc: TrainConfig, plan: _Plan, device) -> dict[str, float]:
    model.eval()
    meter = task.new_meter()
    seen = 0
    for batch in task.batches("eval", tc.eval_batch_size, shuffle=False):
        if tc.eval_max_examples is not None:
            if seen >= tc.eval_max_examples:
                break
            batch = {k: v[: tc.eval_max_examples - seen] for k, v in batch.items()}
        batch = _to_device(batch, device)
        with plan.autocast():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        meter.update(logits.float(), batch)
        seen += batch["input_ids"].shape[0]
    return meter.compute()


# ---- head pruning -----------------------------------------------------------------------
def _prune_heads(model: OmniNetModel, task, mc: ModelConfig, tc: TrainConfig, device, res: TrialResult) -> None:
    """After training: removes ``heads.prune_ratio`` of all heads, least important first by
    gradient importance (``omninet.heads.prune_model``) on a few train batches."""
    ratio = mc.heads.prune_ratio
    if ratio <= 0:
        return
    from omninet.heads import prune_model

    calibration = [_to_device(b, device) for _, b in zip(range(PRUNE_CALIBRATION_BATCHES),
                                                         task.batches("train", tc.batch_size, seed=tc.seed + 10_000))]
    report = prune_model(model, calibration, prune_ratio=ratio)
    res.heads_pruned, res.heads_remaining = report.heads_before - report.heads_after, report.heads_after


# ---- measurement ------------------------------------------------------------------------
def _fixed_batch(task, split: str, batch_size: int, n: int, device) -> dict[str, torch.Tensor]:
    """``batch_size`` examples of ``split`` cut or padded to exactly ``n`` tokens (B, N)."""
    data = task.split(split)
    rows = []
    for i in range(batch_size):
        ex = data[i % len(data)]
        labels = ex["labels"]
        rows.append({"input_ids": ex["input_ids"][:n], "labels": labels[:n] if labels.dim() else labels})
    return _to_device(task.collate(rows, pad_to=n), device)


def _tensor_bytes(t: torch.Tensor) -> tuple[int, int]:
    """(storage key, bytes); quantized tensors have no plain storage: count their elements."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return id(t), t.numel() * t.element_size()


def _live_tensor_bytes(*objs) -> int:
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
        if isinstance(obj, nn.Module):
            for t in obj.state_dict(keep_vars=True).values():
                add(t)
            for t in obj.parameters():
                add(t.grad)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                add(list(state.values()))
    return sum(seen.values())


def _peak_mb(fn, device: torch.device, live: int) -> float:
    """Peak tensor MB while ``fn`` runs. Accelerators: the allocator's peak above the level at
    the start, plus what was allocated then. CPU: the tensors alive at the start (``live``)
    plus the profiler timeline's peak above them."""
    from omninet.measure import peak_memory_mb

    if device.type != "cpu":
        from omninet.measure import synchronize

        synchronize(device)
        live = getattr(torch, device.type).memory_allocated(device)
    return live / MB + peak_memory_mb(fn, device=device)


def _measure_train_memory(model, opt, task, cfg: TrialConfig, plan: _Plan, res: TrialResult) -> None:
    """One real training step on train examples at the measurement shape (B, N): the
    weights move once more, as if training had lasted one step longer."""
    if not cfg.measure.memory:
        return
    batch = _fixed_batch(task, "train", cfg.measure_batch_size, cfg.seq_length, plan.device)
    model.train()
    live = _live_tensor_bytes(model, opt)
    res.peak_memory_train_mb = _peak_mb(lambda: _step(model, opt, batch, cfg.train, plan), plan.device, live)


def _measure_inference(model, task, cfg: TrialConfig, plan: _Plan, res: TrialResult) -> None:
    from omninet.measure import summarize, time_fn

    mcfg, device = cfg.measure, plan.device
    n, b = cfg.seq_length, cfg.measure_batch_size
    model.eval()
    one, many = _fixed_batch(task, "eval", 1, n, device), _fixed_batch(task, "eval", b, n, device)

    @torch.no_grad()
    def infer(batch):
        with plan.autocast():
            return model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    lat = summarize(time_fn(lambda: infer(one), device=device, warmup=mcfg.warmup, reps=mcfg.latency_reps))
    res.latency_p50_ms, res.latency_p95_ms = lat["median_s"] * 1e3, lat["p95_s"] * 1e3
    thr = summarize(time_fn(lambda: infer(many), device=device, warmup=mcfg.warmup, reps=mcfg.throughput_reps))
    res.throughput_tokens_s = b * n / thr["median_s"]
    if mcfg.memory:
        res.memory_method = ("allocator max_memory_allocated" if device.type != "cpu"
                             else "live tensors + torch.profiler memory timeline")
        res.peak_memory_infer_mb = _peak_mb(lambda: infer(many), device, _live_tensor_bytes(model))


def _device_name(device: torch.device) -> str:
    try:
        from omninet.hardware import get_backend

        return get_backend(device.type).device_name(device.index or 0)
    except Exception:  # the hardware layer may not know this device; fall back to torch/platform
        pass
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return device.type


# ---- the runner -------------------------------------------------------------------------
def run_trial(config: dict[str, Any] | TrialConfig, *, memory_budget_mb: float | None = None,
              preflight: bool = True) -> TrialResult:
    """Runs one trial and returns its result; never raises for a trial-level failure.
    ``memory_budget_mb`` overrides ``hardware.memory_budget_mb``. ``preflight=False`` skips the
    estimate check, leaving the run-time limit as the only judge of memory."""
    wall = time.perf_counter()
    res = TrialResult(status="ok")
    notes: list[str] = []
    try:
        cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
        plan = _resolve_plan(cfg.hardware)
    except ValueError as exc:
        return _finish(res, wall, notes, status="invalid", error=str(exc))
    except Exception as exc:  # a bug or broken environment, not a bad config
        return _finish(res, wall, notes, status="error", error=f"{type(exc).__name__}: {exc}")

    device = plan.device
    res.device, res.device_name = str(device), _device_name(device)
    res.precision = "int8" if plan.int8 else plan.placement.precision
    res.task, res.seq_length = cfg.task_obj.name, cfg.seq_length
    budget = memory_budget_mb if memory_budget_mb is not None else cfg.hardware.memory_budget_mb
    res.memory_budget_mb = budget
    try:
        res.estimated_memory_mb = estimate_memory_mb(cfg)
        threshold = budget
        if threshold is None:
            capacity = _capacity_mb(device)
            threshold = None if capacity is None else capacity * cfg.hardware.memory_threshold
        if preflight and threshold is not None and res.estimated_memory_mb > threshold:
            return _finish(res, wall, notes, status="infeasible",
                           error=f"estimated peak memory {res.estimated_memory_mb:.1f} MB exceeds the budget of {threshold:.1f} MB")
        if cfg.task_obj.kind == "classification":
            res.majority_baseline = cfg.task_obj.majority_baseline
        with _threads(cfg.hardware.num_threads), _memory_limit(device, budget, notes):
            _run(cfg, plan, res)
    except _Diverged as exc:
        _release(device)
        return _finish(res, wall, notes, status="diverged", error=str(exc))
    except BaseException as exc:  # noqa: BLE001 -- every trial failure is a result (KeyboardInterrupt is re-raised)
        if isinstance(exc, KeyboardInterrupt):
            raise
        status = "oom" if _is_oom(exc) else "error"
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        del exc
        _release(device)
        return _finish(res, wall, notes, status=status, error=message)
    return _finish(res, wall, notes, status="ok")


def _run(cfg: TrialConfig, plan: _Plan, res: TrialResult) -> None:
    """train -> training-step memory -> prune heads -> int8 -> evaluate -> inference figures."""
    tc, task, device = cfg.train, cfg.task_obj, plan.device
    torch.manual_seed(tc.seed)
    model = OmniNetModel(cfg.model_config)
    if plan.placement.precision == "mixed":  # the layer-wise plan is measured on a train batch
        calib = _fixed_batch(task, "train", tc.batch_size, cfg.seq_length, device)
        model = plan.placement.apply(model, calibration={k: calib[k] for k in ("input_ids", "attention_mask")})
    else:
        model = plan.placement.apply(model)
    res.num_params = model.num_parameters()
    opt = _make_optimizer(model, tc)
    _train(model, opt, task, tc, plan, res)
    start = time.perf_counter()
    _measure_train_memory(model, opt, task, cfg, plan, res)
    res.measure_seconds = time.perf_counter() - start
    del opt  # inference needs neither gradients nor optimizer state
    model.zero_grad(set_to_none=True)
    _prune_heads(model, task, cfg.model_config, tc, device, res)
    res.num_params = model.num_parameters()
    if plan.int8:
        from omninet.hardware import quantize_int8

        model = quantize_int8(model, inplace=True)
    metrics = _evaluate(model, task, tc, plan, device)
    res.accuracy, res.eval_loss = metrics["accuracy"], metrics["loss"]
    start = time.perf_counter()
    _measure_inference(model, task, cfg, plan, res)
    res.measure_seconds += time.perf_counter() - start


@contextlib.contextmanager
def _threads(num_threads: int | None) -> Iterator[None]:
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _finish(res: TrialResult, wall: float, notes: list[str], *, status: str, error: str | None = None) -> TrialResult:
    res.status, res.error = status, error
    res.notes = "; ".join(notes) or None
    res.wall_seconds = time.perf_counter() - wall
    return res


# ---- command line -----------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def trial_main(argv: list[str] | None = None) -> int:
    """``omninet trial --config X.yaml [--set model.attention.kernel=linformer ...]``: prints the
    flat result as one JSON object. Exit status: 0 ok, 1 another trial status, 2 invalid config
    (one line on stderr, nothing run)."""
    import yaml

    parser = argparse.ArgumentParser(prog="omninet trial", description="Train, evaluate and measure one configuration.")
    parser.add_argument("--config", required=True, help="trial config YAML (sections task, model, train, hardware, measure)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="override a dotted key, e.g. --set train.max_seconds=10 (value parsed as YAML)")
    parser.add_argument("--memory-budget-mb", type=float, default=None, help="memory budget (infeasibility + run-time limit)")
    parser.add_argument("--no-preflight", action="store_true",
                        help="skip the memory-estimate check: the run-time limit alone decides (oom instead of infeasible)")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    try:
        with open(args.config) as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: expected a mapping of sections (task, model, train, ...)")
        for item in args.set:
            path, sep, value = item.partition("=")
            _check(bool(sep) and bool(path), f"--set {item!r}: expected PATH=VALUE, e.g. train.steps=100")
            data = set_dotted(data, path, _parse_value(value))
        cfg = TrialConfig.from_dict(data)
    except (OSError, yaml.YAMLError, ValueError) as exc:
        print(f"invalid trial config: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    result = run_trial(cfg, memory_budget_mb=args.memory_budget_mb, preflight=not args.no_preflight)
    text = json.dumps(result.to_dict())
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if result.status == "invalid":
        print(f"invalid trial config: {result.error}", file=sys.stderr)
        return 2
    return 0 if result.status == "ok" else 1


if __name__ == "__main__":
    sys.exit(trial_main())
