"""One trial: build a configuration on the local device, train it within a budget, evaluate
it, measure it, and return one flat record. Every point on the platform's
accuracy-memory-latency trade-off is one ``run_trial``.

    result = run_trial({"task": {"name": "listops"}, "train": {"steps": 200}})
    result.status, result.accuracy, result.latency_p50_ms, result.to_dict()

Order of work: validate the config (``invalid``) -> resolve the device and precision through
``omninet.hardware`` (``invalid``) -> estimate peak memory against the budget (``infeasible``;
nothing built) -> under the run-time memory limit and the trial's cores: build, train
(``diverged`` on a non-finite loss), measure the training step's memory, prune heads, quantize
(``int8``; ``qat_int8`` converts; ``mixed`` plans layer-wise precision on the trained weights), evaluate, measure latency, throughput and inference memory at the deployment shape
(``measure.seq_length`` x ``measure.batch_size``, real task tokens). ``oom`` on a real
allocation failure, ``error`` (with the message) on anything else. A trial-level failure is a
result, never an exception.

Measurement phases (``omninet.trial.measure``: ``train_memory``, ``inference``,
``latency_probe``) run inside ``gate.exclusive()``: under a sweep no other trial of the node
trains or measures meanwhile (``omninet.sweep.isolation``). Memory is measured first, in a
clean state, on the first call at the measurement shape; latency after; then throughput; then
memory again (``peak_memory_infer_later_mb``), so a figure that depends on call history shows
up. Each phase yields readings that ``measure.apply`` puts on the result. The model is built
and passed through its post-training passes by ``omninet.trial.build``.

Paired timing: with a reference in the context (``RunContext.reference``: a sweep pool's
reference model as a ``TrialConfig``), the inference phase also builds that model the same way
(``build`` and ``post_passes``, its own precision plan, on this trial's device and threads) and
times the trial against it side by side (``latency_ratio_ref``, ``throughput_ratio_ref``);
``latency_pairing`` says what it was paired with, or why it was not.

Memory budget: ``memory_budget_mb`` (argument, else ``hardware.memory_budget_mb``) is both the
infeasibility threshold for the estimate and a hard limit at run time (``omninet.trial.limits``).
Without a budget, ``memory_threshold`` (else 0.9) x the device's capacity is the infeasibility
threshold.

Memory threshold: with ``hardware.memory_threshold`` set, training consults a monitor of the
real limit (the budget's RLIMIT on CPU, the allocator on accelerators) every step and, with
hysteresis, turns on activation checkpointing, then micro-batches with gradient accumulation
(the same effective batch); evaluation and measurement run through the model's memory guard
(micro-batches, then low-precision blocks where native). A real allocation failure climbs one
level at once and the step is retried. ``memory_actions`` lists what was done.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import psutil
import torch

from omninet.hardware import DEFAULT_MEMORY_FRACTION, resolve_device_config
from omninet.hardware import estimate_memory_mb as hardware_estimate
from omninet.hardware.base import INT8_PRECISIONS
from omninet.trial import limits, loop, measure
from omninet.trial.build import build, distilling, post_passes
from omninet.trial.config import TrialConfig, TrialResult
from omninet.trial.context import RunContext, Stopped

__all__ = ["run_trial", "estimate_memory_mb", "measures_first_exactly", "record_evaluation"]

log = logging.getLogger("omninet.trial")

MB = 2**20


# ---- memory estimate --------------------------------------------------------------------
def estimate_memory_mb(config: dict[str, Any] | TrialConfig) -> float:
    """Estimated peak tensor memory (MB) of a training step at the measurement batch and
    sequence length (``omninet.hardware.estimate_memory_mb``). ValueError on a bad config."""
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    precision = cfg.hardware.precision
    if precision in (*INT8_PRECISIONS, "qat_int8", "mixed"):  # these train in fp32 (mixed is planned after training)
        precision = "fp32"
    elif precision == "auto":
        precision = resolve_device_config(cfg.hardware, training=True).precision
    return float(hardware_estimate(cfg.model_config, batch_size=cfg.measure_batch_size, seq_len=cfg.seq_length,
                                   precision=precision, training=True))


def _capacity_mb(plan: loop.Plan) -> float | None:
    if plan.device.type == "cpu":
        return psutil.virtual_memory().available / MB
    try:
        return plan.backend.memory_stats(plan.device.index or 0).capacity / MB or None
    except Exception as exc:  # a backend without capacity figures: no capacity-based threshold
        log.debug("no device capacity (%s)", exc)
        return None


# ---- the runner -------------------------------------------------------------------------
def run_trial(config: dict[str, Any] | TrialConfig, *, memory_budget_mb: float | None = None,
              preflight: bool = True, context: RunContext | None = None) -> TrialResult:
    """Runs one trial and returns its result; never raises for a trial-level failure.
    ``memory_budget_mb`` overrides ``hardware.memory_budget_mb``. ``preflight=False`` skips the
    estimate check, leaving the run-time limit as the only judge of memory."""
    wall = time.perf_counter()
    context = context or RunContext()
    gate = context.gate or measure.MeasureGate()
    res = TrialResult(status="ok")
    notes: list[str] = []
    try:
        cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
        plan = loop.resolve_plan(cfg.hardware)
    except ValueError as exc:
        return _finish(res, wall, notes, status="invalid", error=str(exc))
    except Exception as exc:  # a bug or broken environment, not a bad config
        return _finish(res, wall, notes, status="error", error=f"{type(exc).__name__}: {exc}")

    device = plan.device
    res.device, res.device_name = str(device), plan.backend.device_name(device.index or 0)
    res.precision = plan.precision
    res.emulated = plan.emulated
    if plan.emulated:
        notes.append(plan.emulated_reason)
    res.task, res.seq_length, res.measure_batch_size = cfg.task_obj.name, cfg.seq_length, cfg.measure_batch_size
    res.measure_other_length = cfg.other_length
    if cfg.other_length:
        note = (f"measured at {cfg.seq_length} tokens but trained and evaluated at the task's {cfg.task_obj.max_length} "
                f"(measure.allow_other_length): accuracy and cost are judged at different lengths")
        log.warning(note)
        notes.append(note)
    plan.buckets, plan.pad_id = cfg.buckets, cfg.task_obj.pad_id
    plan.calibration_ref_ms = context.calibration_ref_ms
    res.latency_pairing = context.reference_label if context.reference is None else None  # None or 'unpaired: ...'
    res.shape_buckets = None if plan.buckets is None else ",".join(map(str, plan.buckets))
    res.seed = cfg.train.seed
    budget = memory_budget_mb if memory_budget_mb is not None else cfg.hardware.memory_budget_mb
    res.memory_budget_mb = budget
    try:
        res.estimated_memory_mb = (context.estimated_memory_mb if context.estimated_memory_mb is not None
                                   else estimate_memory_mb(cfg))  # the worker's, made once before the run
        threshold = budget
        if threshold is None:
            capacity = _capacity_mb(plan)
            threshold = None if capacity is None else capacity * (cfg.hardware.memory_threshold or DEFAULT_MEMORY_FRACTION)
        if preflight and threshold is not None and res.estimated_memory_mb > threshold:
            return _finish(res, wall, notes, status="infeasible",
                           error=f"estimated peak memory {res.estimated_memory_mb:.1f} MB exceeds the budget of {threshold:.1f} MB")
        if cfg.task_obj.kind == "classification":
            res.majority_baseline = cfg.task_obj.majority_baseline
        with limits.pinned(context.cores, cfg.hardware.num_threads) as (cores, threads), \
                limits.memory_limit(device, budget, notes):
            res.cores, res.num_threads = (",".join(map(str, cores)) if cores else None), threads
            _run(cfg, plan, res, gate, keep_model=context.keep_model, scheduler=context.scheduler,
                 reference=_reference(context, plan))
    except Stopped as exc:
        limits.clean_state(plan.backend)
        return _finish(res, wall, notes, status=exc.status, error=exc.reason)
    except loop.Diverged as exc:
        limits.clean_state(plan.backend)
        return _finish(res, wall, notes, status="diverged", error=str(exc))
    except BaseException as exc:  # noqa: BLE001 -- every trial failure is a result (KeyboardInterrupt is re-raised)
        if isinstance(exc, KeyboardInterrupt):
            raise
        status = "oom" if limits.is_oom(exc) else "error"
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        del exc
        limits.clean_state(plan.backend)
        return _finish(res, wall, notes, status=status, error=message)
    return _finish(res, wall, notes, status="ok")


def measures_first_exactly(plan: loop.Plan) -> bool:
    """Whether the untrained model's latency and memory are the trained model's: they depend
    on shapes, kernels, head counts and precision, not on weight values, except for the
    ``mixed`` precision plan, which is chosen from the trained weights (measured again)."""
    return plan.post != "mixed"


def _reference(context: RunContext, plan: loop.Plan) -> measure.Reference | None:
    """The model the trial is timed against (``context.reference``), built when the inference
    phase asks: as a trial of that config builds it (derived from the base, or from its seed),
    through its post-passes, on its own precision plan; fed the trial's inputs (its shape
    buckets). The global RNG is left as it was. None without a reference."""
    ref_cfg = context.reference
    if ref_cfg is None:
        return None

    def make():
        ref_plan = loop.resolve_plan(ref_cfg.hardware)
        ref_plan.buckets, ref_plan.pad_id = plan.buckets, plan.pad_id
        with torch.random.fork_rng(devices=[]):
            model = build(ref_cfg, ref_plan)
            model = post_passes(model, ref_cfg, ref_plan, TrialResult(status="ok"))
        return model, ref_plan

    return measure.Reference(build=make, label=context.reference_label or "reference")


PROBE_OVER = 1.25  # the probe's median must exceed the latency limit by this factor to skip the full measurement


def _measure_train_memory(model, opt, cfg: TrialConfig, plan: loop.Plan, res: TrialResult, gate, monitor=None) -> None:
    """The training step's memory (``measure.train_memory``): one step of the trial's own training."""
    def step(batch):
        return loop.step(model, opt, batch, cfg.train, plan, monitor)

    measure.apply(res, measure.train_memory(model, opt, step, cfg, plan, gate))


def _measure_first(cfg: TrialConfig, plan: loop.Plan, res: TrialResult, gate, latency_limit: float | None = None,
                   reference: measure.Reference | None = None) -> None:
    """Latency and memory of the untrained model at the deployment shape, with the same
    post-passes and isolation as after training, on a throwaway copy built from the same seed
    (training then starts from the same weights as without measuring first). With a
    ``latency_limit``, a short probe comes first: a configuration whose probe is already
    ``PROBE_OVER`` x over the limit is recorded with the probe (``latency_reps`` says how many
    calls) and not measured further, since it will be screened anyway."""
    start = time.perf_counter()
    if latency_limit is not None:
        model = post_passes(build(cfg, plan, TrialResult(status="ok")), cfg, plan, TrialResult(status="ok"))
        probe = measure.latency_probe(model, cfg, plan, gate)
        del model
        if probe.latency_p50_ms > PROBE_OVER * latency_limit:
            measure.apply(res, probe)
            res.cost_measured_first = True
            res.measure_first_seconds = time.perf_counter() - start
            return
    model = build(cfg, plan, TrialResult(status="ok"))
    res.num_params = model.num_parameters()
    if cfg.measure.memory:
        opt = loop.make_optimizer(model, cfg.train)
        _measure_train_memory(model, opt, cfg, plan, res, gate)
        del opt
        model.zero_grad(set_to_none=True)
    model = post_passes(model, cfg, plan, res)
    measure.apply(res, measure.inference(model, cfg, plan, gate, reference))
    del model
    limits.clean_state(plan.backend, plan.device.index or 0)
    res.cost_measured_first = True
    res.measure_first_seconds = time.perf_counter() - start


def record_evaluation(res: TrialResult, ev: loop.Evaluation) -> None:
    """An evaluation's figures on the result: the metric with its power (units, rows, clustered
    standard errors, the eval rows' hash) and the per-unit scores that travel with the result
    (``res.scores``) for paired comparisons."""
    m = ev.metrics
    res.accuracy, res.eval_loss = m["accuracy"], m["loss"]
    summary = ev.scores.summary()
    res.eval_unit, res.eval_units, res.eval_rows = summary["eval_unit"], summary["eval_units"], summary["eval_rows"]
    res.accuracy_se, res.eval_loss_se, res.eval_hash = summary["accuracy_se"], summary["eval_loss_se"], summary["eval_hash"]
    res.eval_seconds = ev.seconds
    res.bits_per_byte = m.get("bits_per_byte")
    res.scores = ev.scores


def _rung_hook(model, cfg: TrialConfig, plan: loop.Plan, res: TrialResult, gate, scheduler, stop: list[str]):
    """``after_step`` for training: at each of the scheduler's rungs, evaluate, report the
    first objective and stop (``stop`` gets the reason) when the scheduler says so."""
    rungs = set(scheduler.rungs)

    def after_step(steps: int) -> bool:
        if steps not in rungs:
            return True
        ev = loop.evaluate(model, cfg.task_obj, cfg.train, plan, gate)
        model.train()
        record_evaluation(res, ev)  # the partial record, if stopped here
        res.rung_steps.append(steps)
        res.rung_accuracy.append(float(res.accuracy))
        noise = res.accuracy_se
        res.rung_noise.append(noise)
        reason = scheduler.report(steps, float(res.accuracy), noise)
        if reason is not None:
            stop.append(reason)
        return reason is None

    return after_step


def _run(cfg: TrialConfig, plan: loop.Plan, res: TrialResult, gate, *, keep_model: bool = False,
         scheduler=None, reference: measure.Reference | None = None) -> None:
    """(measure first -> screen) -> train (rungs) -> training-step memory -> prune heads ->
    (keep the model) -> mixed plan / int8 -> evaluate -> inference figures. An int8 or mixed
    trial keeps its fp32 weights (int8 packed weights are not plain tensors; quantize or plan
    again after loading). With a scheduler, the measure-first figures are the record unless
    ``measures_first_exactly`` is False or the scheduler asks to measure again."""
    tc, task, device = cfg.train, cfg.task_obj, plan.device
    remeasure = True  # without a scheduler nothing was measured yet
    if scheduler is not None:
        _measure_first(cfg, plan, res, gate, latency_limit=getattr(scheduler, "limits", {}).get("latency_p50_ms"),
                       reference=reference)
        reason = scheduler.screen(res.to_dict())
        if reason is not None:
            raise Stopped("screened", reason)
        remeasure = scheduler.remeasure or not measures_first_exactly(plan)
    model = build(cfg, plan, res)
    res.num_params = model.num_parameters()
    trains = True
    if cfg.base is not None:  # derived: scored as the passes left it, then fine-tuned
        tc = _zero_shot(model, cfg, plan, res, gate)
        trains, tc = tc is not None, tc or cfg.train
    opt = loop.make_optimizer(model, tc)
    monitor = loop.training_monitor(model, cfg.hardware, plan)
    stop: list[str] = []
    after_step = None if scheduler is None else _rung_hook(model, cfg, plan, res, gate, scheduler, stop)
    try:
        if trains:
            with distilling(cfg, plan):
                loop.train(model, opt, task, tc, plan, res, gate, monitor, after_step=after_step)
            if cfg.base is not None:
                res.finetune_seconds = res.train_seconds
        if stop:  # the partial record: accuracy at the rung, the measure-first costs
            raise Stopped("pruned", stop[0])
        if cfg.measure.memory and remeasure:
            if trains:
                _measure_train_memory(model, opt, cfg, plan, res, gate, monitor)
            else:  # post-training only: the measured step must not move the weights that are scored and kept
                twin = copy.deepcopy(model)
                _measure_train_memory(twin, loop.make_optimizer(twin, tc), cfg, plan, res, gate, monitor)
                del twin
    finally:
        res.memory_actions = _memory_actions(monitor, model)
    del opt  # inference needs neither gradients nor optimizer state
    model.zero_grad(set_to_none=True)
    model = post_passes(model, cfg, plan, res, keep_model=keep_model)
    if monitor is not None:  # hand training's freed heap back: the guard reads the budget's use, not its history
        limits.clean_state(plan.backend, device.index or 0)
    try:
        if trains:
            record_evaluation(res, loop.evaluate(model, task, tc, plan, gate))
        if remeasure:
            measure.apply(res, measure.inference(model, cfg, plan, gate, reference))
    finally:
        res.memory_actions = _memory_actions(monitor, model)


def _zero_shot(model, cfg: TrialConfig, plan: loop.Plan, res: TrialResult, gate):
    """A derived trial's evaluation right after its passes (``accuracy_zero_shot``, scores kept
    as ``scores_zero_shot``); returns the fine-tune's training budget."""
    ev = loop.evaluate(model, cfg.task_obj, cfg.train, plan, gate)
    res.accuracy_zero_shot, res.eval_loss_zero_shot = ev.metrics["accuracy"], ev.metrics["loss"]
    res.accuracy_zero_shot_se = ev.scores.summary()["accuracy_se"]
    res.scores_zero_shot = ev.scores
    ft = cfg.finetune
    res.finetune_steps, res.distill = ft.steps, ft.distill
    if ft.steps == 0:  # post-training only: the zero-shot figures are the trial's
        record_evaluation(res, ev)
    return ft.train_config(cfg.train)


def _memory_actions(monitor, model) -> str | None:
    """What the memory threshold did: the most of each ladder ('train: checkpointing,
    micro_batches=2; inference: micro_batches=2'); None when nothing was needed (or no threshold)."""
    parts = []
    guard = getattr(model, "memory_guard", None)
    for name, mon in (("train", monitor), ("inference", guard.monitor if guard is not None else None)):
        done = mon.actions(mon.max_level) if mon is not None else []
        if done:
            parts.append(f"{name}: {', '.join(done)}")
    return "; ".join(parts) or None


def _finish(res: TrialResult, wall: float, notes: list[str], *, status: str, error: str | None = None) -> TrialResult:
    res.status, res.error = status, error
    res.notes = "; ".join(notes) or None
    res.wall_seconds = time.perf_counter() - wall
    return res

