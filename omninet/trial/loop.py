"""Training and evaluation of a trial: AdamW (weight decay on matrices only), linear warm-up
then cosine decay to ``min_lr_ratio * lr``, gradient clipping, the precision policy (autocast
in bf16/fp16; a gradient scaler where the backend needs one), head pruning after training.

With a ``steps`` budget training is deterministic on CPU given the config and seed; a
``max_seconds`` budget makes the step count depend on the machine's speed (the cosine
schedule then follows elapsed time). Training and evaluation call ``gate.checkpoint()``
between steps, where a trial pauses while another trial on its node measures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omninet.hardware.base import INT8_PRECISIONS
from omninet.trial.config import HardwareConfig, TrainConfig

__all__ = ["Diverged", "Plan", "resolve_plan", "make_optimizer", "train", "evaluate", "step",
           "to_device", "training_monitor", "native_refusal", "Evaluation"]



class Diverged(Exception):
    pass


@dataclass
class Plan:
    """How this trial computes: the training placement (device, precision policy), its loss
    scaler, what happens to the trained model before evaluation (``post``: 'int8', 'int8_token'
    or 'int8_weight' quantizes it, through ``int8_engine``; 'qat_int8' converts its fake-quantized
    layers to int8, 'mixed' plans layer-wise precision on the trained weights in ``low_dtype``),
    and whether the precision runs emulated (no native support here; ``allow_emulated``)."""

    placement: Any
    scaler: Any
    emulated: bool = False
    post: str | None = None  # None | an INT8_PRECISIONS name | 'qat_int8' | 'mixed'
    int8_engine: str | None = None  # the engine of a post-training int8 variant (omninet.hardware.int8_engine)
    low_dtype: torch.dtype | None = None  # the low dtype of 'mixed'
    precision: str = "fp32"  # what the trial records
    emulated_reason: str | None = None
    buckets: list[int] | None = None  # static-shape buckets every batch is padded to (omninet.shapes)
    pad_id: int = 0
    calibration_ref_ms: float | None = None  # the sweep pool's reference speed (RunContext), for latency_p50_norm_ms
    teacher: Any = None  # a derived trial's base while it fine-tunes with distillation
    distill: float = 0.0  # weight of the KL term to the teacher's outputs
    temperature: float = 1.0

    def batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """On the device, padded (and masked) to its shape bucket when there are buckets."""
        batch = to_device(batch, self.device)
        if self.buckets is None:
            return batch
        from omninet.shapes import pad_batch

        return pad_batch(batch, self.buckets, pad_id=self.pad_id)

    @property
    def int8(self) -> bool:
        """Quantized to int8 after training (post-training: not QAT)."""
        return self.post in INT8_PRECISIONS

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def backend(self):
        return self.placement.backend

    def autocast(self):
        policy = self.placement.policy
        return policy.autocast() if policy is not None else contextlib.nullcontext()


_LOW = ("bf16", "fp16", "mixed")
_QUANTIZED = (*INT8_PRECISIONS, "qat_int8")  # train in fp32, int8 for evaluation and measurement


def native_refusal(hw: HardwareConfig) -> str | None:
    """Why this device does not run ``hw.precision`` natively, as the sweep's capability probe
    (``omninet.hardware.probe_capabilities``, the one source of truth) sees it; None if it does."""
    from omninet.hardware import probe_capabilities

    if hw.precision not in _LOW + _QUANTIZED:
        return None
    caps = probe_capabilities(hw.device)
    if hw.precision in caps["native_precisions"]:
        return None
    return caps["refused"].get(hw.precision) or (
        f"precision={hw.precision!r} is not native on {caps['device_name']} (the capability probe's native precisions: "
        f"{', '.join(caps['native_precisions'])})")


def resolve_plan(hw: HardwareConfig) -> Plan:
    """ValueError, before anything runs, when this machine cannot run the requested device /
    precision natively (per the capability probe), unless the config allows emulation, in which
    case bf16/fp16/mixed run tagged emulated. The int8 variants and qat_int8 train in fp32 and
    quantize after training; mixed trains in fp32 and plans its layer-wise precision on the trained
    weights."""
    from omninet.hardware import resolve_device_config

    name = hw.precision
    refusal = native_refusal(hw)
    emulated = False
    if refusal is not None:
        if not hw.allow_emulated or name not in _LOW:
            fix = "; set hardware.allow_emulated: true to run it tagged emulated" if name in _LOW else ""
            raise ValueError(refusal + fix)
        emulated = True
    post, low_dtype, train_hw, engine = None, None, hw, None
    if name in _QUANTIZED:
        resolve_device_config(hw, training=name == "qat_int8")  # int8 inference must be possible here
        post = name
        if name in INT8_PRECISIONS:
            from omninet.hardware import int8_engine

            engine = int8_engine(name)  # ValueError now, not after training, for an engine that is not here
        train_hw = dataclasses.replace(hw, precision="fp32")  # trains in fp32 (QAT with fake-quant modules), int8 after
    elif name == "mixed":
        post = "mixed"
        if emulated:
            low_dtype = torch.bfloat16
        else:
            low_dtype = resolve_device_config(hw, training=False).policy.compute_dtype
        train_hw = dataclasses.replace(hw, precision="fp32")  # the plan is measured on the trained weights
    if emulated and name != "mixed":
        placement = _emulated_placement(hw, ValueError(refusal))
    else:
        placement = resolve_device_config(train_hw, training=True)
    policy = getattr(placement, "policy", None)
    scaler = policy.make_grad_scaler() if policy is not None else None
    precision = name if name in _QUANTIZED + ("mixed",) else placement.precision
    reason = f"emulated: {refusal}" if emulated else None
    return Plan(placement, scaler, emulated=emulated, post=post, int8_engine=engine, low_dtype=low_dtype,
                precision=precision, emulated_reason=reason)


def _emulated_placement(hw: HardwareConfig, refusal: ValueError):
    """The requested low precision on a device without native support: autocast to that dtype
    anyway (PyTorch's scalar fallbacks), tagged emulated. Only when the user allows it."""
    from omninet.hardware import resolve_device_config
    from omninet.hardware.precision import PrecisionPolicy

    base = resolve_device_config(dataclasses.replace(hw, precision="fp32"), training=True)
    name = hw.precision
    dtype = torch.float16 if name == "fp16" else torch.bfloat16
    base.policy = PrecisionPolicy(name=name, compute_dtype=dtype, device_type=base.device.type,
                                  grad_scaler=name == "fp16", reason=f"emulated: {refusal}")
    base.precision = name
    return base


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def lr_factor(step_index: int, elapsed: float, tc: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine to ``min_lr_ratio``; progress is the
    larger of the step and time fractions of the budget."""
    warm = min(1.0, (step_index + 1) / tc.warmup_steps) if tc.warmup_steps else 1.0
    progress = 0.0
    if tc.steps is not None:
        progress = max(progress, step_index / tc.steps)
    if tc.max_seconds is not None:
        progress = max(progress, elapsed / tc.max_seconds)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return warm * (tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * cosine)


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if p.dim() >= 2 else no_decay).append(p)  # biases and norms are not decayed
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas))


def train_batches(task, tc: TrainConfig) -> Iterator[dict[str, torch.Tensor]]:
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


def _forward_backward(model, batch, plan: Plan, micro_batches: int) -> torch.Tensor:
    """Loss of the whole batch with its gradients accumulated; split into ``micro_batches``
    (each loss weighted by its share) when the memory monitor asks for it."""
    from omninet.hardware import accumulate

    def loss_of(mb):
        with plan.autocast():
            out = model(mb["input_ids"], attention_mask=mb["attention_mask"], labels=mb["labels"])
        if plan.teacher is None:
            return out.loss
        return (1.0 - plan.distill) * out.loss + plan.distill * distillation_loss(out.logits, plan.teacher, mb,
                                                                                   plan.temperature)

    backward = (lambda loss: plan.scaler.scale(loss).backward()) if plan.scaler is not None else None
    if micro_batches <= 1:
        loss = loss_of(batch)
        (backward or torch.Tensor.backward)(loss)
        return loss.detach()
    keys = ("input_ids", "attention_mask", "labels")
    return accumulate(loss_of, {k: batch[k] for k in keys}, micro_batches, backward=backward)


def distillation_loss(logits: torch.Tensor, teacher, batch: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2 (Hinton et al. 2015), averaged over
    what the task scores: every example (logits [B, C]) or every labelled position ([B, N, V],
    labels != -100). The teacher runs without gradients on the same batch."""
    from omninet.tasks.base import IGNORE_INDEX

    with torch.no_grad():
        target = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    student = logits.float()
    if student.dim() == 3:  # [B, N, V]: only the scored positions
        scored = batch["labels"] != IGNORE_INDEX  # [B, N]
        student, target = student[scored], target[scored]  # [S, V]
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(target / t, -1), log_target=True, reduction="batchmean")
    return kl * t * t


def step(model, opt, batch, tc: TrainConfig, plan: Plan, monitor=None) -> torch.Tensor:
    """One optimizer step under the precision policy; returns the detached loss. The head
    router's balance term is already part of ``out.loss`` (the model adds it). With a memory
    ``monitor`` (training ladder) the batch runs in its micro-batches, and an allocation
    failure climbs the ladder and retries the step from zeroed gradients."""
    from omninet.trial.limits import clean_state, is_oom

    while True:
        opt.zero_grad(set_to_none=True)
        try:
            loss = _forward_backward(model, batch, plan, monitor.micro_batches if monitor is not None else 1)
            break
        except Exception as exc:  # noqa: BLE001 -- only allocation failures are retried
            if monitor is None or not is_oom(exc) or monitor.level >= len(monitor.levels):
                raise
        opt.zero_grad(set_to_none=True)  # outside the handler: the failed attempt's frames are gone
        clean_state(plan.backend)
        monitor.escalate_on_oom()
    if plan.scaler is not None:
        plan.scaler.unscale_(opt)  # clip true gradients, not scaled ones
    if tc.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    if plan.scaler is not None:
        plan.scaler.step(opt)
        plan.scaler.update()
    else:
        opt.step()
    return loss


def training_monitor(model, hw: HardwareConfig, plan: Plan):
    """The training ladder's monitor when ``hardware.memory_threshold`` is set, else None."""
    if hw.memory_threshold is None:
        return None
    from omninet.hardware import MemoryMonitor
    from omninet.hardware.guard import monitor_config
    from omninet.hardware.monitor import memory_pressure

    index = plan.device.index or 0
    return MemoryMonitor(model, backend=plan.backend, config=monitor_config(hw.memory_threshold), hook=False,
                         read=lambda: memory_pressure(plan.backend, index)[0], mode="training")


def train(model, opt, task, tc: TrainConfig, plan: Plan, res, gate, monitor=None, after_step=None) -> bool:
    """Trains to the budget; True when it got there. ``after_step(steps)`` (a rung of the sweep
    scheduler) runs after every step and stops training early by returning False."""
    model.train()
    stream = train_batches(task, tc)
    tokens, stopped = 0, False
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if (tc.steps is not None and res.steps >= tc.steps) or (tc.max_seconds is not None and elapsed >= tc.max_seconds):
            break
        gate.checkpoint()
        for group in opt.param_groups:
            group["lr"] = tc.lr * lr_factor(res.steps, elapsed, tc)
        batch = plan.batch(next(stream))
        if monitor is not None:
            monitor.sample()
        loss = float(step(model, opt, batch, tc, plan, monitor))
        res.steps += 1
        tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(loss):
            res.train_seconds = time.perf_counter() - start
            raise Diverged(f"training loss became {loss} at step {res.steps} (lr={tc.lr})")
        res.loss_curve.append(loss)
        if after_step is not None and not after_step(res.steps):
            stopped = True
            break
    res.train_seconds = time.perf_counter() - start
    res.train_tokens_s = tokens / res.train_seconds if res.train_seconds > 0 else None
    return not stopped


@dataclass
class Evaluation:
    """One evaluation: the meter's metrics (``accuracy``, ``loss``, ``accuracy_se``, ``units``,
    ``rows``, ...), the per-unit ``scores`` (``omninet.scores.UnitScores``) and why it stopped
    (``'split'``: every eval row; ``'target_se'``, ``'max_examples'``, ``'max_seconds'``)."""

    metrics: dict[str, float]
    scores: Any
    stopped_by: str
    seconds: float

    def __getitem__(self, key: str) -> float:  # metrics["accuracy"] reads as before
        return self.metrics[key]


@torch.no_grad()
def evaluate(model, task, tc: TrainConfig, plan: Plan, gate) -> Evaluation:
    """Scores the eval split in its fixed order (every trial of a sweep sees the same rows in
    the same order, so two evaluations pair on the rows both scored) until one of: the split
    ends; ``eval_max_examples`` rows; ``eval_max_seconds``; or, with ``eval_target_se``, the
    first batch after which at least ``eval_min_examples`` rows are scored and the accuracy's
    standard error (clustered by row) is at most the target."""
    from omninet.scores import clustered_se_from_totals

    model.eval()
    meter = task.new_meter()
    seen, stopped_by = 0, "split"
    start = time.perf_counter()
    for batch in task.batches("eval", tc.eval_batch_size, shuffle=False):
        if tc.eval_max_examples is not None:
            if seen >= tc.eval_max_examples:
                stopped_by = "max_examples"
                break
            batch = {k: v[: tc.eval_max_examples - seen] for k, v in batch.items()}
        if tc.eval_max_seconds is not None and seen and time.perf_counter() - start >= tc.eval_max_seconds:
            stopped_by = "max_seconds"
            break
        gate.checkpoint()
        batch = plan.batch(batch)
        with plan.autocast():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        meter.update(logits.float(), batch)
        seen += batch["input_ids"].shape[0]
        if tc.eval_target_se is not None and seen >= tc.eval_min_examples:
            se = clustered_se_from_totals(*meter.row_totals())
            if 0.0 < se <= tc.eval_target_se:  # 0 only when every unit so far agrees: not yet a measurement
                stopped_by = "target_se"
                break
    seconds = time.perf_counter() - start
    scores = meter.scores(eval_hash=task.eval_rows_hash())  # the ordered split: every prefix of it pairs
    return Evaluation(meter.compute(), scores, stopped_by, seconds)
