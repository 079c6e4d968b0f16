"""A trial's model through the passes of ``omninet.passes.PASS_ORDER`` (one list, documented
there): ``build`` runs what comes before training (a trial from its seed: the model built with
its kernel; a derived trial: load_base, prune_heads and attention on the base; then precision's
placement and QAT preparation), ``post_passes`` what comes after (a trial from its seed:
prune_heads on the trained weights; then the kept model's files and precision's mixed plan,
int8 quantization or QAT conversion), leaving the model that is evaluated and measured.

    model = build(cfg, plan, res)              # placed on the device; QAT layers prepared
    ...train...
    model = post_passes(model, cfg, plan, res)  # pruned, quantized: as evaluated and measured
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from omninet import passes
from omninet.trial import loop
from omninet.trial.config import TrialConfig, TrialResult

__all__ = ["build", "post_passes", "distilling"]


def build(cfg: TrialConfig, plan: loop.Plan, res: TrialResult | None = None):
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


def post_passes(model, cfg: TrialConfig, plan: loop.Plan, res: TrialResult, *, keep_model: bool = False):
    """prune heads -> (keep the model's files) -> mixed plan / int8 / QAT conversion: the model
    as it is evaluated and measured. Returns the model (int8 and QAT conversion replace it)."""
    tc, task, device = cfg.train, cfg.task_obj, plan.device
    if cfg.base is None:  # a derived model was pruned by its passes, on the base's weights
        pruned = passes.prune_heads(model, ratio=cfg.prune.heads,
                                    calibration=_calibration_batches(cfg, device))
        if pruned is not None:
            res.heads_pruned, res.heads_remaining = pruned
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

        model = quantize_int8(model, plan.post, inplace=True)  # engine: plan.int8_engine, fixed by resolve_plan
    elif plan.post == "qat_int8":
        from omninet.hardware import convert_qat

        model = convert_qat(model)
    return model


def _calibration_batches(cfg: TrialConfig, device) -> Iterator[dict[str, torch.Tensor]]:
    """The train batches that score head importance (``prune_heads``), drawn only when it runs."""
    return (loop.to_device(b, device) for _, b in zip(range(passes.PRUNE_CALIBRATION_BATCHES),
                                                      cfg.task_obj.batches("train", cfg.train.batch_size,
                                                                           seed=cfg.train.seed + 10_000)))


def _derive(cfg: TrialConfig, plan: loop.Plan, res: TrialResult | None):
    base = passes.load_base(cfg.base)
    model, log = passes.derive(base, cfg.model_config, prune_ratio=cfg.prune.heads,
                               calibration=_calibration_batches(cfg, torch.device("cpu")),
                               seq_length=cfg.task_obj.max_length, task_name=f"task {cfg.task_obj.name!r}")
    if res is not None:
        res.derived = True
        precision = f"precision: {plan.precision}" + (" (fake-quantized for the fine-tune, int8 after)"
                                                      if plan.post == "qat_int8" else
                                                      " (after the fine-tune)" if plan.int8 or plan.post == "mixed" else "")
        res.passes = "; ".join(log.passes + [precision])
        if log.heads_pruned:
            res.heads_pruned, res.heads_remaining = log.heads_pruned, log.heads_remaining
    return model


@contextlib.contextmanager
def distilling(cfg: TrialConfig, plan: loop.Plan):
    """With ``finetune.distill`` > 0, the fine-tune's loss mixes in a KL term to the base's
    outputs (the base, loaded once, runs beside the student on every batch)."""
    if cfg.base is None or cfg.finetune.distill <= 0:
        yield
        return
    teacher = passes.load_base(cfg.base, device=plan.device).eval()
    plan.teacher, plan.distill, plan.temperature = teacher, cfg.finetune.distill, cfg.finetune.temperature
    try:
        yield
    finally:
        plan.teacher = None
