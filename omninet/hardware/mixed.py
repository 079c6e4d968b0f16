"""Layer-wise mixed precision from measured sensitivity.

1. ``measure_sensitivity``: on a calibration batch, run the model once in fp32 (reference),
   then once per block with only that block in low precision, and record the relative error
   of the output (or the relative change of the loss).
2. ``plan_mixed_precision``: protect the critical layers (embeddings, positions, the first and
   last block of each stack of more than two blocks, norms, the output head), then add blocks to low precision from
   the least sensitive up while the error of the COMBINED configuration, measured again,
   stays within ``error_budget``. The result is a ``MixedPrecisionPlan`` with a per-layer table
   (``plan.table``: list of dicts, DataFrame-able; ``plan.log()``).
3. ``apply_precision(model, plan)``: a pass over the built model. Each low-precision block gets
   a forward pre-hook that enters ``torch.autocast`` and a forward hook (``always_call``, so an
   exception cannot leak the autocast state) that leaves it and returns fp32 activations. The
   model code is untouched and the state-dict keys do not change. Parameters stay fp32 (master
   weights, so training works) unless ``cast_weights=True`` (inference: the block's Linear
   weights are stored in the low dtype once instead of being cast on every forward).

On shallow stacks (one or two blocks) the first/last rule yields: it would leave no block
eligible, so there sensitivity alone decides (the table's reason says so).

The residual stream stays fp32 between blocks, and inside a pre-norm block the norms see the
fp32 residual, so norms run in fp32 even in low-precision blocks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from omninet.hardware.base import DTYPES
from omninet.model import Stack

__all__ = ["named_blocks", "measure_sensitivity", "plan_mixed_precision", "MixedPrecisionPlan", "apply_precision",
           "remove_precision", "low_precision_blocks", "set_block_precision", "eligible_blocks", "SHALLOW_STACK"]

log = logging.getLogger("omninet.hardware")

_HANDLES = "_omninet_precision_hooks"  # attribute on a block: its hook handles while low precision


def named_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every transformer block, in execution order (encoder then decoder), by qualified name."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, Stack):
            out += [(f"{name}.blocks.{i}", b) for i, b in enumerate(mod.blocks)]
    if not out:
        raise ValueError(f"{type(model).__name__} has no omninet Stack of blocks; mixed precision needs an OmniNet model")
    return out


SHALLOW_STACK = 2  # stacks of at most this many blocks keep no block fp32 by position alone


def _stack_ends(model: nn.Module) -> set[str]:
    """The first and last block of each stack deeper than ``SHALLOW_STACK`` (on a shallow
    stack protecting them would leave nothing to plan, so sensitivity alone decides there)."""
    ends = set()
    for name, mod in model.named_modules():
        if isinstance(mod, Stack) and len(mod.blocks) > SHALLOW_STACK:
            ends |= {f"{name}.blocks.0", f"{name}.blocks.{len(mod.blocks) - 1}"}
    return ends


def eligible_blocks(model: nn.Module, plan: "MixedPrecisionPlan | None" = None) -> list[str]:
    """Blocks that may run in low precision, least sensitive first when a plan measured them,
    else in depth order: never a protected first/last block of a deep stack."""
    if plan is not None:
        return plan.least_sensitive_fp32()
    ends = _stack_ends(model)
    return [n for n, _ in named_blocks(model) if n not in ends]


# ---- the pass ---------------------------------------------------------------------------------
def _to_float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, tuple):
        return tuple(_to_float32(o) for o in out)
    return out


def set_block_precision(block: nn.Module, dtype: torch.dtype | None, device_type: str, *, cast_weights: bool = False) -> None:
    """Puts one block in ``dtype`` (autocast hooks), or back in fp32 when ``dtype`` is None."""
    handles = getattr(block, _HANDLES, None)
    if handles is not None:
        for h in handles["hooks"]:
            h.remove()
        if handles["cast"]:
            _cast_linear(block, torch.float32)
        delattr(block, _HANDLES)
    if dtype is None:
        return
    contexts: list = []

    def enter(module, args):
        ctx = torch.autocast(device_type, dtype=dtype)
        ctx.__enter__()
        contexts.append(ctx)

    def leave(module, args, output):
        if contexts:  # always_call: runs even when forward raised
            contexts.pop().__exit__(None, None, None)
        return _to_float32(output)

    hooks = [block.register_forward_pre_hook(enter), block.register_forward_hook(leave, always_call=True)]
    if cast_weights:
        if block.training:
            raise ValueError("cast_weights=True stores weights in low precision and is for inference; call model.eval() "
                             "first, or keep cast_weights=False (autocast with fp32 master weights) for training")
        _cast_linear(block, dtype)
    setattr(block, _HANDLES, {"hooks": hooks, "dtype": dtype, "cast": cast_weights})


def _cast_linear(block: nn.Module, dtype: torch.dtype) -> None:
    for m in block.modules():
        if isinstance(m, nn.Linear):
            m.to(dtype)


def low_precision_blocks(model: nn.Module) -> dict[str, torch.dtype]:
    """Name -> dtype of the blocks currently in low precision."""
    return {n: getattr(b, _HANDLES)["dtype"] for n, b in named_blocks(model) if hasattr(b, _HANDLES)}


def remove_precision(model: nn.Module) -> None:
    """Back to plain fp32 everywhere (hooks removed, cast weights restored to fp32)."""
    for _, b in named_blocks(model):
        set_block_precision(b, None, "cpu")


def apply_precision(model: nn.Module, plan: "MixedPrecisionPlan", *, cast_weights: bool = False) -> nn.Module:
    """Applies ``plan`` to ``model`` (in place; returns it). Blocks not in the plan are fp32."""
    blocks = dict(named_blocks(model))
    missing = sorted(set(plan.low_precision) - set(blocks))
    if missing:
        raise ValueError(f"plan names blocks {missing} that this model does not have; build the plan on this model")
    device_type = _device_type(model)
    for name, block in blocks.items():
        set_block_precision(block, plan.dtype if name in plan.low_precision else None, device_type,
                            cast_weights=cast_weights)
    return model


# ---- measurement ------------------------------------------------------------------------------
def _device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return p.device.type if p is not None else "cpu"


def _output(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    out = model(**batch)
    if isinstance(out, tuple):  # the seed API: (output, attention_weights)
        return out[0].float(), None
    if isinstance(out, torch.Tensor):
        return out.float(), None
    return out.logits.float(), getattr(out, "loss", None)


def _error(out, ref, metric: str) -> float:
    y, loss = out
    y_ref, loss_ref = ref
    if metric == "loss":
        return float((loss - loss_ref).abs() / loss_ref.abs().clamp_min(1e-12))
    return float((y - y_ref).norm() / y_ref.norm().clamp_min(1e-12))


@torch.no_grad()
def _measure(model, batch, names: set[str], dtype, device_type) -> tuple:
    """The output with exactly ``names`` in ``dtype``; the model is left all-fp32."""
    blocks = named_blocks(model)
    try:
        for n, b in blocks:
            set_block_precision(b, dtype if n in names else None, device_type)
        return _output(model, batch)
    finally:
        for _, b in blocks:
            set_block_precision(b, None, device_type)


def measure_sensitivity(model: nn.Module, batch: dict, *, dtype: torch.dtype | str = torch.bfloat16,
                        metric: str = "output") -> dict[str, float]:
    """Block name -> error when only that block runs in ``dtype`` (relative L2 error of the
    output for ``metric='output'``; relative loss change for ``metric='loss'``, which needs
    ``labels`` in ``batch``). Runs in eval mode (no dropout); restores the model's mode."""
    dtype = _dtype(dtype)
    if metric not in ("output", "loss"):
        raise ValueError(f"metric must be 'output' or 'loss', got {metric!r}")
    if metric == "loss" and "labels" not in batch:
        raise ValueError("metric='loss' needs 'labels' in the calibration batch; add them or use metric='output'")
    if low_precision_blocks(model):
        raise ValueError("measure sensitivity on the fp32 model: call remove_precision(model) first")
    was_training = model.training
    model.eval()
    try:
        device_type = _device_type(model)
        ref = _measure(model, batch, set(), dtype, device_type)
        return {n: _error(_measure(model, batch, {n}, dtype, device_type), ref, metric)
                for n, _ in named_blocks(model)}
    finally:
        model.train(was_training)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in ("bf16", "fp16"):
            raise ValueError(f"dtype must be 'bf16' or 'fp16' (or a torch dtype), got {dtype!r}")
        return DTYPES[dtype]
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    return dtype


# ---- the plan ---------------------------------------------------------------------------------
@dataclass
class MixedPrecisionPlan:
    """Which blocks run in ``dtype``; ``table`` has one row per layer group (embeddings,
    positions, every block, final norms, head) with its sensitivity, dtype and the reason."""

    dtype: torch.dtype
    low_precision: list[str]
    sensitivity: dict[str, float]
    protected: list[str]
    error_budget: float
    measured_error: float  # of the whole plan, on the calibration batch
    metric: str
    table: list[dict] = field(default_factory=list)

    def least_sensitive_fp32(self) -> list[str]:
        """Unprotected blocks the plan keeps in fp32, least sensitive first (what the memory
        monitor moves to low precision under pressure)."""
        rest = [n for n in self.sensitivity if n not in self.low_precision and n not in self.protected]
        return sorted(rest, key=lambda n: self.sensitivity[n])

    def log(self, logger: logging.Logger = log, level: int = logging.INFO) -> None:
        logger.log(level, "mixed precision plan: %d/%d blocks in %s, measured %s error %.3g (budget %.3g)",
                   len(self.low_precision), len(self.sensitivity), _name(self.dtype), self.metric,
                   self.measured_error, self.error_budget)
        for row in self.table:
            sens = "" if row["sensitivity"] is None else f"{row['sensitivity']:.3g}"
            logger.log(level, "  %-24s %-9s %-5s %10s  %s", row["layer"], row["kind"], row["dtype"], sens, row["reason"])

    def to_dict(self) -> dict:
        return {"dtype": _name(self.dtype), "low_precision": list(self.low_precision), "protected": list(self.protected),
                "error_budget": self.error_budget, "measured_error": self.measured_error, "metric": self.metric,
                "table": [dict(r) for r in self.table]}


def _name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def plan_mixed_precision(model: nn.Module, batch: dict, *, dtype: torch.dtype | str = torch.bfloat16,
                         error_budget: float = 1e-2, metric: str = "output", protect_first_last: bool = True,
                         protect: tuple[str, ...] | list[str] = ()) -> MixedPrecisionPlan:
    """Measures every block's sensitivity on ``batch`` and picks the low-precision blocks:
    least sensitive first, each kept only if the combined configuration's measured error stays
    <= ``error_budget``. ``protect`` names extra blocks to keep fp32."""
    if not error_budget > 0:
        raise ValueError(f"error_budget must be > 0 (a relative error, e.g. 1e-2), got {error_budget!r}")
    dtype = _dtype(dtype)
    names = [n for n, _ in named_blocks(model)]
    unknown = sorted(set(protect) - set(names))
    if unknown:
        raise ValueError(f"protect names unknown blocks {unknown}; blocks are {names}")
    sens = measure_sensitivity(model, batch, dtype=dtype, metric=metric)
    protected = sorted(set(protect) | (_stack_ends(model) if protect_first_last else set()), key=names.index)
    chosen, err, rejected = [], 0.0, {}
    was_training = model.training
    model.eval()
    try:
        device_type = _device_type(model)
        ref = _measure(model, batch, set(), dtype, device_type)
        for n in sorted((n for n in names if n not in protected), key=lambda n: sens[n]):
            trial = _error(_measure(model, batch, set(chosen) | {n}, dtype, device_type), ref, metric)
            if trial <= error_budget:
                chosen.append(n)
                err = trial
            else:
                rejected[n] = trial
    finally:
        model.train(was_training)
    chosen.sort(key=names.index)
    plan = MixedPrecisionPlan(dtype, chosen, sens, protected, error_budget, err, metric)
    plan.table = _table(model, plan, rejected)
    return plan


def _table(model: nn.Module, plan: MixedPrecisionPlan, rejected: dict[str, float]) -> list[dict]:
    def nparams(m):
        return sum(p.numel() for p in m.parameters())

    rows = []
    stacks = {n for n, m in model.named_modules() if isinstance(m, Stack)}
    for name, mod in model.named_children():
        if name in stacks:
            continue
        if isinstance(mod, (nn.Embedding, nn.Linear)) or name in ("pos", "embed"):
            kind = "head" if isinstance(mod, nn.Linear) else "embedding"
            rows.append(dict(layer=name, kind=kind, params=nparams(mod), sensitivity=None, dtype="fp32",
                             reason=f"protected: {kind}"))
    low = _name(plan.dtype)
    for stack in sorted(stacks, key=lambda s: (s != "encoder", s)):
        for n, b in named_blocks(model):
            if not n.startswith(f"{stack}.blocks."):
                continue
            shallow = len(model.get_submodule(f"{stack}.blocks")) <= SHALLOW_STACK
            if n in plan.protected:
                reason = "protected: first/last block" if n not in rejected else "protected"
            elif shallow and n in plan.low_precision:
                reason = "within error budget (shallow stack: sensitivity alone decides)"
            elif n in plan.low_precision:
                reason = "within error budget"
            else:
                reason = f"over budget (combined error {rejected.get(n, float('nan')):.3g})"
            rows.append(dict(layer=n, kind="block", params=nparams(b), sensitivity=plan.sensitivity[n],
                             dtype=low if n in plan.low_precision else "fp32", reason=reason))
        rows.append(dict(layer=f"{stack}.norm", kind="norm", params=nparams(model.get_submodule(f"{stack}.norm")),
                         sensitivity=None, dtype="fp32", reason="protected: norm"))
    order = {"embedding": 0, "block": 1, "norm": 1, "head": 2}
    return sorted(rows, key=lambda r: order[r["kind"]])
