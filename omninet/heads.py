"""Attention heads: importance scoring, pruning schedules and per-input head gating.

Dimensions: B batch, N tokens, Nk keys, C hidden, H heads a layer still has (its
``head_ids``, original ids), k active heads per input, D head dim, L self-attention layers.

- Importance, two ways, stored per layer on ``Attention`` and indexed by ORIGINAL head id
  (so pruning never reshapes them; removed heads score 0):
  ``compute_head_importance`` (gradient of the loss w.r.t. a head gate, Michel et al. 2019,
  ``attn.importance``) and the online EMA of each head's contribution norm, updated inside
  forward when ``HeadsConfig.online_importance`` is on (``attn.online_importance``).
- Pruning: ``prune_by_importance`` (global least-important fraction, >= 1 head per layer),
  ``prune_model`` (one shot: score, prune, evaluate before/after) and ``IterativePruner``
  (a slice every few training steps). Physical removal itself is ``prune_heads`` on ``OmniNetModel`` or the seed
  class ``AdvancedTransformer`` (both work with every function here; the seed class needs
  ``loss_fn``).
- Gating (mixture-of-heads, MoH arXiv 2410.11842): ``HeadRouter`` picks the top-k heads per
  sequence (``gating='sequence'``) or per token (``'token'``). With sequence gating only the
  selected heads are computed: their rows of the qkv weight and columns of the output
  projection are gathered per sequence and applied with batched matmuls (``gather_qkv``,
  ``gather_out``), in training and inference alike, so FLOPs drop by k/H in the projections
  and the kernel. Token gating cannot skip work with dense kernels (every head is some
  token's choice and keys/values are needed for all tokens), so it computes every head and
  zeroes the unselected ones: a quality knob, not a speed one. Sequence gating pools the whole
  input, so it is refused in causal stacks (it would leak future tokens); decoders use token
  gating, which is causal and works with the KV cache. Only self-attention is gated and
  pruned; cross-attention keeps every head. ``output_attentions`` under sequence gating gives
  (B, k, N, N) weights of the selected heads. The router's balance term is returned as
  ``ModelOutput.aux_loss`` and already added to ``loss`` (training mode only). If pruning
  leaves a layer fewer heads than ``active_heads``, that layer runs all it has.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from omninet.gating import (  # noqa: F401  (re-exported: gating lives where the model can import it)
    HeadGate,
    HeadRouter,
    attend,
    collect_aux_loss,
    gather_out,
    gather_qkv,
    head_scale,
    restrict_mask,
    update_online_importance,
)
from omninet.model import OmniNetModel

__all__ = [
    "HeadGate",
    "HeadRouter",
    "gather_qkv",
    "gather_out",
    "attend",
    "head_scale",
    "update_online_importance",
    "collect_aux_loss",
    "compute_head_importance",
    "online_head_importance",
    "set_online_importance",
    "prune_by_importance",
    "prune_model",
    "PruneReport",
    "IterativePruner",
]


# ---- importance -------------------------------------------------------------------------
def compute_head_importance(model: OmniNetModel, batches: Iterable[dict], *,
                            loss_fn: Callable | None = None, normalize: bool = True) -> torch.Tensor:
    """Gradient importance (Michel et al. 2019): I_h = mean over batches of |dL/d xi_h| for a
    gate xi_h = 1 multiplying head h's output (passed as ``head_mask``), then divided by its
    layer's L2 norm. ``batches``: dicts of keyword arguments for ``model(...)``, with labels
    unless ``loss_fn(output, batch) -> scalar`` is given. Runs in eval mode (no dropout);
    parameter ``.grad`` is left untouched. Returns (L, H) by original head id (removed
    heads 0) and stores each row in ``attn.importance``."""
    layers = model.attention_layers()
    L, H = len(layers), model.config.num_heads
    device = next(model.parameters()).device
    gate = torch.ones(L, H, device=device, requires_grad=True)
    total, n = torch.zeros(L, H, device=device), 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if not isinstance(batch, dict):
                raise ValueError(f"compute_head_importance: each batch must be a dict of model(...) keyword "
                                 f"arguments (input_ids, labels, ...), got {type(batch).__name__}")
            output = model(**batch, head_mask=gate)
            loss = loss_fn(output, batch) if loss_fn is not None else getattr(output, "loss", None)
            if loss is None:  # the seed class returns (output, weights): it has no loss of its own
                raise ValueError("compute_head_importance: the model returned no loss; put labels in each batch or pass "
                                 "loss_fn(output, batch) -> scalar")
            (grad,) = torch.autograd.grad(loss, gate)
            total += grad.abs()
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("compute_head_importance: batches is empty; pass at least one calibration batch")
    imp = total / n
    if normalize:
        imp = imp / imp.norm(dim=1, keepdim=True).clamp(min=1e-20)
    for attn, row in zip(layers, imp):
        attn.importance.copy_(row)
    return imp


def online_head_importance(model: OmniNetModel) -> torch.Tensor:
    """(L, H) online contribution estimates by original head id (0 for removed heads)."""
    return torch.stack([a.online_importance for a in model.attention_layers()])


def set_online_importance(model: OmniNetModel, enabled: bool, *, reset: bool = False) -> None:
    """Switches the online estimate on or off for every layer; ``reset`` clears it."""
    for a in model.attention_layers():
        a.track_importance = enabled
        if reset:
            a.online_importance.zero_()
            a.online_updates = 0


# ---- pruning schedules ------------------------------------------------------------------
def _check_ratio(prune_ratio) -> float:
    """The ratio, or a one-line ValueError before any importance is computed."""
    if not isinstance(prune_ratio, (int, float)) or isinstance(prune_ratio, bool) or not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be a number in [0, 1), got {prune_ratio!r}")
    return float(prune_ratio)


def prune_by_importance(model: OmniNetModel, importance: torch.Tensor, prune_ratio: float) -> dict[int, list[int]]:
    """Prunes the globally least important heads until a fraction ``prune_ratio`` of all
    L*H original heads is gone (heads already removed count), keeping >= 1 head per layer
    (so the achieved ratio may fall short of a very high target). Returns what it removed,
    {layer: [original ids]}."""
    layers = model.attention_layers()
    L, H = len(layers), model.config.num_heads
    _check_ratio(prune_ratio)
    if not isinstance(importance, torch.Tensor) or importance.shape != (L, H):
        shape = list(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__
        raise ValueError(f"importance must be a tensor of shape [num_layers={L}, num_heads={H}], got {shape}")
    if not bool(torch.isfinite(importance).all()):
        raise ValueError("importance holds NaN or inf; recompute it (check the calibration loss is finite)")
    present = [a.head_ids.tolist() for a in layers]
    need = round(prune_ratio * L * H) - (L * H - sum(map(len, present)))
    remaining = [len(p) for p in present]
    plan: dict[int, list[int]] = {}
    scores = importance.detach().float().cpu()
    for _, l, h in sorted((float(scores[l, h]), l, h) for l, p in enumerate(present) for h in p):
        if need <= 0:
            break
        if remaining[l] > 1:
            plan.setdefault(l, []).append(h)
            remaining[l] -= 1
            need -= 1
    if plan:
        model.prune_heads(plan)
    return plan


@dataclass
class PruneReport:
    pruned: dict[int, list[int]]  # removed this time, {layer: [original ids]}
    ratio: float  # fraction of all original heads removed so far
    heads_before: int
    heads_after: int
    params_before: int
    params_after: int
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    step: int | None = None  # training step (IterativePruner)

    def to_dict(self) -> dict:
        return {k: ({str(l): v for l, v in x.items()} if isinstance(x, dict) else x) for k, x in vars(self).items()}


def _heads_left(model: OmniNetModel) -> int:
    return sum(a.num_heads for a in model.attention_layers())


def prune_model(model: OmniNetModel, batches: Iterable[dict], *, prune_ratio: float,
                loss_fn: Callable | None = None, eval_fn: Callable[[OmniNetModel], float] | None = None) -> PruneReport:
    """One shot: gradient importance on ``batches``, prune to ``prune_ratio`` of all heads, and
    ``eval_fn(model) -> accuracy`` before and after."""
    ratio = _check_ratio(prune_ratio)
    total = len(model.attention_layers()) * model.config.num_heads
    before = dict(heads_before=_heads_left(model), params_before=model.num_parameters(),
                  accuracy_before=None if eval_fn is None else float(eval_fn(model)))
    plan = prune_by_importance(model, compute_head_importance(model, batches, loss_fn=loss_fn), ratio) if ratio > 0 else {}
    after = _heads_left(model)
    return PruneReport(pruned=plan, ratio=1 - after / total, heads_after=after, params_after=model.num_parameters(),
                       accuracy_after=None if eval_fn is None else float(eval_fn(model)), **before)


@dataclass
class IterativePruner:
    """Gradual pruning inside a training loop: every ``every`` calls to ``step`` it scores the
    heads on ``calibration_batches`` batches taken from the training iterator and prunes up
    to ``target_ratio * round / rounds``, until ``rounds`` rounds are done. Pruning replaces
    the q/k/v/o parameters, so pass the ``optimizer``: its parameter lists are updated and
    the moments of the replaced tensors restart."""

    model: OmniNetModel
    target_ratio: float
    rounds: int
    every: int
    calibration_batches: int = 4
    eval_fn: Callable[[OmniNetModel], float] | None = None
    loss_fn: Callable | None = None
    optimizer: torch.optim.Optimizer | None = None
    history: list[PruneReport] = field(default_factory=list)
    steps: int = 0

    def __post_init__(self):
        if not 0.0 < self.target_ratio < 1.0:
            raise ValueError(f"IterativePruner.target_ratio must be in (0, 1), got {self.target_ratio}")
        for name in ("rounds", "every", "calibration_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"IterativePruner.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def done(self) -> bool:
        return len(self.history) >= self.rounds

    def step(self, batch_iter: Iterator[dict]) -> PruneReport | None:
        """Call once per training step; returns a report on the steps where it pruned."""
        self.steps += 1
        if self.done or self.steps % self.every:
            return None
        batches = list(itertools.islice(batch_iter, self.calibration_batches))
        ratio = self.target_ratio * (len(self.history) + 1) / self.rounds
        old = dict(self.model.named_parameters())
        report = prune_model(self.model, batches, prune_ratio=ratio, loss_fn=self.loss_fn, eval_fn=self.eval_fn)
        report.step = self.steps
        if self.optimizer is not None:
            _swap_optimizer_params(self.optimizer, old, dict(self.model.named_parameters()))
        self.history.append(report)
        return report


def _swap_optimizer_params(optimizer: torch.optim.Optimizer, old: dict, new: dict) -> None:
    swap = {id(p): new[n] for n, p in old.items() if n in new and new[n] is not p}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if id(p) in swap:
                optimizer.state.pop(p, None)
                group["params"][i] = swap[id(p)]
