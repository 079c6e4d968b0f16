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

Measurement phases run inside ``gate.exclusive()``: under a sweep no other trial of the node
trains or measures meanwhile (``omninet.sweep.isolation``). Memory is measured first, in a
clean state, on the first call at the measurement shape; latency after; then memory again
(``peak_memory_infer_later_mb``), so a figure that depends on call history shows up.

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

import argparse
import contextlib
import json
import math
import sys
import time
from typing import Any

import torch
from torch import nn

from omninet.trial import limits, loop, measure
from omninet.trial.config import TrialConfig, TrialResult
from omninet.trial.context import RunContext, Stopped

__all__ = ["run_trial", "estimate_memory_mb", "trial_main", "measures_first_exactly", "record_evaluation"]

MB = 2**20


# ---- memory estimate --------------------------------------------------------------------
def estimate_memory_mb(config: dict[str, Any] | TrialConfig) -> float:
    """Estimated peak tensor memory (MB) of a training step at the measurement batch and
    sequence length (``omninet.hardware.estimate_memory_mb``). ValueError on a bad config."""
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    from omninet.hardware import estimate_memory_mb as hardware_estimate
    from omninet.hardware import resolve_device_config

    precision = cfg.hardware.precision
    if precision in ("int8", "qat_int8", "mixed"):  # these train in fp32 (mixed is planned after training)
        precision = "fp32"
    elif precision == "auto":
        precision = resolve_device_config({**cfg.hardware.device_config(), "precision": "auto"}, training=True).precision
    return float(hardware_estimate(cfg.model_config, batch_size=cfg.measure_batch_size, seq_len=cfg.seq_length,
                                   precision=precision, training=True))


def _capacity_mb(plan: loop.Plan) -> float | None:
    if plan.device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available / MB
    try:
        return plan.backend.memory_stats(plan.device.index or 0).capacity / MB or None
    except Exception as exc:  # a backend without capacity figures: no capacity-based threshold
        import logging

        logging.getLogger("omninet.trial").debug("no device capacity (%s)", exc)
        return None


# ---- measurement phases -----------------------------------------------------------------
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


def _conditions(res: TrialResult, info: dict, before: float | None) -> None:
    res.measure_wait_s = (res.measure_wait_s or 0.0) + float(info.get("wait_s") or 0.0)
    if info.get("co_running") is not None:
        res.measure_co_running = max(res.measure_co_running or 0, int(info["co_running"]))
    if res.load_avg_before is None:
        res.load_avg_before = before
    res.load_avg_after = measure.load_average()


def _measure_train_memory(model, opt, task, cfg: TrialConfig, plan: loop.Plan, res: TrialResult, gate,
                          monitor=None) -> None:
    """One real training step on train inputs at the measurement shape (B, N): the weights
    move once more, as if training had lasted one step longer."""
    batch = plan.batch(task.measurement_batch(cfg.measure_batch_size, cfg.seq_length, split="train"))
    model.train()
    with gate.exclusive() as info:
        before = measure.load_average()
        limits.clean_state(plan.backend, plan.device.index or 0)
        reading = measure.track_memory(lambda: loop.step(model, opt, batch, cfg.train, plan, monitor), device=plan.device,
                                       live_bytes=_live_tensor_bytes(model, opt))
    _conditions(res, info, before)
    res.peak_memory_train_mb, res.peak_rss_train_mb = reading.tensor_peak_mb, reading.rss_peak_mb


def _measure_inference(model, task, cfg: TrialConfig, plan: loop.Plan, res: TrialResult, gate) -> None:
    mcfg, device = cfg.measure, plan.device
    n, b = cfg.seq_length, cfg.measure_batch_size
    model.eval()
    one = plan.batch(task.measurement_batch(1, n))  # padded to its bucket when there are buckets
    many = plan.batch(task.measurement_batch(b, n))

    @torch.no_grad()
    def infer(batch):
        with plan.autocast():
            return model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    live = _live_tensor_bytes(model)
    with gate.exclusive() as info:
        before = measure.load_average()
        start = time.perf_counter()
        if mcfg.memory:  # first: the first call at this shape, in a clean state
            limits.clean_state(plan.backend, device.index or 0)
            first = measure.track_memory(lambda: infer(many), device=device, live_bytes=live)
            res.peak_memory_infer_mb, res.peak_rss_infer_mb, res.memory_method = (
                first.tensor_peak_mb, first.rss_peak_mb, first.method)
        lat = measure.latency(lambda: infer(one), device=device, warmup=mcfg.warmup, min_reps=mcfg.latency_reps,
                              min_seconds=mcfg.min_seconds, max_cv=mcfg.max_cv, max_rounds=mcfg.max_rounds,
                              calibrate=measure.calibration(device) if mcfg.calibrate else None)
        res.latency_p50_ms, res.latency_p90_ms, res.latency_p95_ms = lat.p50_ms, lat.p90_ms, lat.p95_ms
        res.latency_p99_ms, res.latency_mean_ms, res.latency_cv = lat.p99_ms, lat.mean_ms, lat.cv
        res.latency_reps, res.latency_rounds, res.latency_noisy = lat.reps, lat.rounds, lat.noisy
        if lat.rel_p50 is not None:
            res.latency_calibration_ms, res.latency_p50_rel, res.latency_rel_cv = lat.calibration_ms, lat.rel_p50, lat.rel_cv
            res.latency_calibration_ref_ms = plan.calibration_ref_ms or lat.calibration_ms
            res.latency_p50_norm_ms = lat.rel_p50 * res.latency_calibration_ref_ms
        thr = measure.summarize(measure.time_fn(lambda: infer(many), device=device, warmup=mcfg.warmup,
                                                reps=mcfg.throughput_reps))
        res.throughput_tokens_s = b * n / thr["median_s"]
        if mcfg.memory:  # again, after the timing runs: must match the first call
            limits.clean_state(plan.backend, device.index or 0)
            res.peak_memory_infer_later_mb = measure.track_memory(lambda: infer(many), device=device,
                                                                  live_bytes=live).tensor_peak_mb
        res.measure_seconds = (res.measure_seconds or 0.0) + time.perf_counter() - start
    _conditions(res, info, before)


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
        import logging

        note = (f"measured at {cfg.seq_length} tokens but trained and evaluated at the task's {cfg.task_obj.max_length} "
                f"(measure.allow_other_length): accuracy and cost are judged at different lengths")
        logging.getLogger("omninet.trial").warning(note)
        notes.append(note)
    plan.buckets, plan.pad_id = cfg.buckets, cfg.task_obj.pad_id
    plan.calibration_ref_ms = context.calibration_ref_ms
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
            from omninet.hardware import DEFAULT_MEMORY_FRACTION

            threshold = None if capacity is None else capacity * (cfg.hardware.memory_threshold or DEFAULT_MEMORY_FRACTION)
        if preflight and threshold is not None and res.estimated_memory_mb > threshold:
            return _finish(res, wall, notes, status="infeasible",
                           error=f"estimated peak memory {res.estimated_memory_mb:.1f} MB exceeds the budget of {threshold:.1f} MB")
        if cfg.task_obj.kind == "classification":
            res.majority_baseline = cfg.task_obj.majority_baseline
        with limits.pinned(context.cores, cfg.hardware.num_threads) as (cores, threads), \
                limits.memory_limit(device, budget, notes):
            res.cores, res.num_threads = (",".join(map(str, cores)) if cores else None), threads
            _run(cfg, plan, res, gate, keep_model=context.keep_model, scheduler=context.scheduler)
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


def _post_passes(model, cfg: TrialConfig, plan: loop.Plan, res: TrialResult, *, keep_model: bool = False):
    """prune heads -> (keep the model's files) -> mixed plan / int8 / QAT conversion: the model
    as it is evaluated and measured. Returns the model (int8 and QAT conversion replace it)."""
    tc, task, device = cfg.train, cfg.task_obj, plan.device
    if cfg.base is None:  # a derived model was pruned by its passes, on the base's weights
        loop.prune_heads(model, task, tc, device, res)
    res.num_params = model.num_parameters()
    if keep_model and plan.post != "qat_int8":  # a QAT model holds fake-quant modules, not plain Linear weights
        from omninet.artifacts import model_files

        res.model_files = model_files(model)
    if plan.post == "mixed":  # planned on the trained (and pruned) weights, on a train batch
        from omninet.hardware import apply_precision, plan_mixed_precision

        calib = loop.to_device(task.measurement_batch(tc.batch_size, cfg.seq_length, split="train"), device)
        mp = plan_mixed_precision(model, {k: calib[k] for k in ("input_ids", "attention_mask")}, dtype=plan.low_dtype)
        mp.log()
        apply_precision(model, mp)
        res.low_precision_blocks = len(mp.low_precision)
    elif plan.int8:
        from omninet.hardware import quantize_int8

        model = quantize_int8(model, inplace=True)
    elif plan.post == "qat_int8":
        from omninet.hardware import convert_qat

        model = convert_qat(model)
    return model


def _build(cfg: TrialConfig, plan: loop.Plan, res: TrialResult | None = None):
    """The trial's model: built from its config and seed, or derived from the base by its passes
    (``omninet.passes``; ``res`` gets the passes and pruning figures)."""
    from omninet.model import OmniNetModel

    torch.manual_seed(cfg.train.seed)
    if cfg.base is not None:
        model = _derive(cfg, plan, res)
    else:
        model = OmniNetModel(cfg.model_config)
    model = plan.placement.apply(model)
    if plan.post == "qat_int8":  # trains with fake-quantized Linear layers, converted to int8 after training
        from omninet.hardware import prepare_qat

        prepare_qat(model)
    return model


def _calibration_batches(cfg: TrialConfig, device) -> list[dict[str, torch.Tensor]]:
    return [loop.to_device(b, device) for _, b in zip(range(loop.PRUNE_CALIBRATION_BATCHES),
                                                      cfg.task_obj.batches("train", cfg.train.batch_size,
                                                                           seed=cfg.train.seed + 10_000))]


def _derive(cfg: TrialConfig, plan: loop.Plan, res: TrialResult | None):
    from omninet.passes import derive, load_base

    base = load_base(cfg.base)
    model, log = derive(base, cfg.model_config, calibration=_calibration_batches(cfg, torch.device("cpu")),
                        seq_length=cfg.task_obj.max_length, task_name=f"task {cfg.task_obj.name!r}")
    if res is not None:
        res.derived = True
        precision = f"precision: {plan.precision}" + (" (fake-quantized for the fine-tune, int8 after)"
                                                      if plan.post == "qat_int8" else
                                                      " (after the fine-tune)" if plan.post in ("int8", "mixed") else "")
        res.passes = "; ".join(log.passes + [precision])
        if log.heads_pruned:
            res.heads_pruned, res.heads_remaining = log.heads_pruned, log.heads_remaining
    return model


def measures_first_exactly(plan: loop.Plan) -> bool:
    """Whether the untrained model's latency and memory are the trained model's: they depend
    on shapes, kernels, head counts and precision, not on weight values, except for the
    ``mixed`` precision plan, which is chosen from the trained weights (measured again)."""
    return plan.post != "mixed"


PROBE_CALLS = 3  # latency calls of the measure-first probe
PROBE_OVER = 1.25  # the probe's median must exceed the latency limit by this factor to skip the full measurement


def _latency_probe(model, cfg: TrialConfig, plan: loop.Plan, gate) -> float:
    """Median ms of a few batch-1 calls at the deployment length (isolated like every measurement)."""
    one = plan.batch(cfg.task_obj.measurement_batch(1, cfg.seq_length))
    model.eval()

    @torch.no_grad()
    def infer():
        with plan.autocast():
            return model(one["input_ids"], attention_mask=one["attention_mask"]).logits

    with gate.exclusive():
        times = measure.time_fn(infer, device=plan.device, warmup=1, reps=PROBE_CALLS)
    return sorted(times)[len(times) // 2] * 1e3


def _measure_first(cfg: TrialConfig, plan: loop.Plan, res: TrialResult, gate, latency_limit: float | None = None) -> None:
    """Latency and memory of the untrained model at the deployment shape, with the same
    post-passes and isolation as after training, on a throwaway copy built from the same seed
    (training then starts from the same weights as without measuring first). With a
    ``latency_limit``, a short probe comes first: a configuration whose probe is already
    ``PROBE_OVER`` x over the limit is recorded with the probe (``latency_reps`` says how many
    calls) and not measured further, since it will be screened anyway."""
    start = time.perf_counter()
    if latency_limit is not None:
        probe = _post_passes(_build(cfg, plan, TrialResult(status="ok")), cfg, plan, TrialResult(status="ok"))
        p50 = _latency_probe(probe, cfg, plan, gate)
        del probe
        if p50 > PROBE_OVER * latency_limit:
            res.latency_p50_ms, res.latency_reps, res.latency_rounds = p50, PROBE_CALLS, 1
            res.cost_measured_first = True
            res.measure_first_seconds = time.perf_counter() - start
            return
    model = _build(cfg, plan, TrialResult(status="ok"))
    res.num_params = model.num_parameters()
    if cfg.measure.memory:
        opt = loop.make_optimizer(model, cfg.train)
        _measure_train_memory(model, opt, cfg.task_obj, cfg, plan, res, gate)
        del opt
        model.zero_grad(set_to_none=True)
    model = _post_passes(model, cfg, plan, res)
    _measure_inference(model, cfg.task_obj, cfg, plan, res, gate)
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
         scheduler=None) -> None:
    """(measure first -> screen) -> train (rungs) -> training-step memory -> prune heads ->
    (keep the model) -> mixed plan / int8 -> evaluate -> inference figures. An int8 or mixed
    trial keeps its fp32 weights (int8 packed weights are not plain tensors; quantize or plan
    again after loading). With a scheduler, the measure-first figures are the record unless
    ``measures_first_exactly`` is False or the scheduler asks to measure again."""
    tc, task, device = cfg.train, cfg.task_obj, plan.device
    remeasure = True  # without a scheduler nothing was measured yet
    if scheduler is not None:
        _measure_first(cfg, plan, res, gate, latency_limit=getattr(scheduler, "limits", {}).get("latency_p50_ms"))
        reason = scheduler.screen(res.to_dict())
        if reason is not None:
            raise Stopped("screened", reason)
        remeasure = scheduler.remeasure or not measures_first_exactly(plan)
    model = _build(cfg, plan, res)
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
            with _distilling(cfg, plan):
                loop.train(model, opt, task, tc, plan, res, gate, monitor, after_step=after_step)
            if cfg.base is not None:
                res.finetune_seconds = res.train_seconds
        if stop:  # the partial record: accuracy at the rung, the measure-first costs
            raise Stopped("pruned", stop[0])
        if cfg.measure.memory and remeasure:
            if trains:
                _measure_train_memory(model, opt, task, cfg, plan, res, gate, monitor)
            else:  # post-training only: the measured step must not move the weights that are scored and kept
                import copy

                twin = copy.deepcopy(model)
                _measure_train_memory(twin, loop.make_optimizer(twin, tc), task, cfg, plan, res, gate, monitor)
                del twin
    finally:
        res.memory_actions = _memory_actions(monitor, model)
    del opt  # inference needs neither gradients nor optimizer state
    model.zero_grad(set_to_none=True)
    model = _post_passes(model, cfg, plan, res, keep_model=keep_model)
    if monitor is not None:  # hand training's freed heap back: the guard reads the budget's use, not its history
        limits.clean_state(plan.backend, device.index or 0)
    try:
        if trains:
            record_evaluation(res, loop.evaluate(model, task, tc, plan, gate))
        if remeasure:
            _measure_inference(model, task, cfg, plan, res, gate)
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


@contextlib.contextmanager
def _distilling(cfg: TrialConfig, plan: loop.Plan):
    """With ``finetune.distill`` > 0, the fine-tune's loss mixes in a KL term to the base's
    outputs (the base, loaded once, runs beside the student on every batch)."""
    if cfg.base is None or cfg.finetune.distill <= 0:
        yield
        return
    from omninet.passes import load_base

    teacher = load_base(cfg.base, device=plan.device).eval()
    plan.teacher, plan.distill, plan.temperature = teacher, cfg.finetune.distill, cfg.finetune.temperature
    try:
        yield
    finally:
        plan.teacher = None


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


# ---- command line -----------------------------------------------------------------------
def trial_main(argv: list[str] | None = None) -> int:
    """``omninet trial --config X.yaml [--set model.attention.kernel=linformer ...]``: prints the
    flat result as one JSON object. Exit status: 0 ok, 1 another trial status, 2 invalid config
    (one line on stderr, nothing run)."""
    import yaml

    from omninet.paths import set_path

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
            if not (sep and path):
                raise ValueError(f"--set {item!r}: expected PATH=VALUE, e.g. train.steps=100")
            set_path(data, path, yaml.safe_load(value))
        cfg = TrialConfig.from_dict(data)
        for item in args.set:
            cfg.check_path(item.partition("=")[0], where="--set")
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
