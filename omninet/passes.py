"""The passes of a trial, in one documented order (``PASS_ORDER``).

A trial's model is plain single-device code; every change to it after it is built is a pass
over the built model (the torchtitan pattern: each change is an ``apply`` step owned by its
component). A trial built from its seed trains first and runs the passes that need trained
weights after training; a trial derived from a trained ``base`` (a sweep with a ``base``) runs
them on the base before a short fine-tune. ``omninet.trial.build`` runs them for both:
``build`` what comes before training, ``post_passes`` what comes after.

1. ``load_base``     derived trials: the base's ``save_pretrained`` folder (config.json +
                     model.safetensors), or a Hugging Face folder or GGUF file (imported by
                     ``omninet.interop``), checked against the trial: every block option must
                     match, the task's ids must fit its vocabulary and its length must cover the
                     task (``check_base``);
2. ``prune_heads``   head importance (Michel et al. 2019: |dL/d gate| on ``PRUNE_CALIBRATION_BATCHES``
                     training batches), then physical pruning of ``prune.heads`` of all
                     heads, least important first (``prune_heads`` here, ``omninet.heads.prune_model``):
                     a derived trial's on the *base* weights, a trial from its seed after training;
3. ``attention``     derived trials: the attention kernel swap with its parameters
                     (``swap_attention``): the trial's ``attention`` config on the pruned model,
                     every weight reused; a kernel with weights of its own starts them by its
                     ``from_dense`` hook (``omninet.attention.KernelSpec``), so a new kernel needs
                     no edit here. Block-sparse layouts have none; Linformer's sequence
                     projections E/F start as a strided mean pool (projected row j averages keys
                     j*s .. (j+1)*s - 1, s = ceil(N / k)), so the zero-shot model attends to k
                     segment means, and are learned by the fine-tune. (A trial from its seed is
                     built with its kernel.);
4. ``precision``     the trial's precision plan (``omninet.trial.loop.Plan``): placement and bf16 /
                     fp16 autocast before training; ``qat_int8`` fake-quantizes before it and
                     converts after; ``int8`` (post-training) and ``mixed`` (layer-wise, from the
                     sensitivity measured on the trained weights) after it.

A derived trial then evaluates (zero-shot), fine-tunes ``finetune.steps`` (optionally distilling
from the base's outputs) and evaluates and measures as any trial; ``Derivation.passes`` lists
what was applied to it, in order, for the record (``TrialResult.passes``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omninet.attention import get_kernel
from omninet.config import AttentionConfig, ModelConfig
from omninet.heads import prune_model
from omninet.model import Attention, OmniNetModel

__all__ = ["PASS_ORDER", "Derivation", "load_base", "check_base", "prune_heads", "swap_attention", "derive"]

PASS_ORDER = ("load_base", "prune_heads", "attention", "precision")
PRUNE_CALIBRATION_BATCHES = 4  # train batches that score head importance before pruning
# What a derived trial may set for itself; every other ModelConfig field is the base's (its
# weights only fit a model of that shape and block), and vocab_size is checked on its own.
TRIAL_FIELDS = ("attention", "heads", "dropout", "gradient_checkpointing", "max_seq_length", "pad_token_id",
                "bos_token_id", "eos_token_id", "vocab_size", "position")
_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.init and f.name not in TRIAL_FIELDS)


def is_foreign(path: str | Path) -> bool:
    """A Hugging Face folder or a GGUF file rather than an OmniNet ``save_pretrained`` folder."""
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        return True
    if not (p / "config.json").is_file():
        return False
    return "model_type" in json.loads((p / "config.json").read_text())


def base_config(path: str | Path) -> ModelConfig:
    """The base's ModelConfig without loading its weights: an OmniNet folder's config.json, or
    the translation of a Hugging Face config.json or GGUF header (``omninet.interop``). Read
    once per file version: a sweep checks every searched value against it."""
    p = Path(path).expanduser()
    stamp = p / "config.json" if p.is_dir() else p
    return _base_config(p, stamp.stat().st_mtime_ns if stamp.exists() else None)


@functools.lru_cache(maxsize=8)
def _base_config(p: Path, _stamp: int | None) -> ModelConfig:
    if is_foreign(p):
        from omninet.interop.hf import foreign_config

        return foreign_config(p)
    if not (p / "config.json").is_file():
        raise ValueError(f"base: {str(p)!r} is not a saved OmniNet model, a Hugging Face folder or a .gguf file (no "
                         "config.json); point it at a save_pretrained folder, a sweep's models/pool=<pool>/trial-<n> "
                         "folder, a Hugging Face folder or a .gguf file")
    try:
        return ModelConfig.from_dict(json.loads((p / "config.json").read_text()), _where="base model")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"base: {p}/config.json is not a valid model config ({str(exc).splitlines()[0]})") from None


@dataclass
class Derivation:
    """What was done to the base, in order (``passes``: one line each, e.g. 'prune_heads: 2 of 8
    heads'), and the pruning figures."""

    passes: list[str] = field(default_factory=list)
    heads_pruned: int = 0
    heads_remaining: int | None = None

    def describe(self) -> str:
        return "; ".join(self.passes)


def load_base(base: str | Path | OmniNetModel, *, device: str | torch.device = "cpu") -> OmniNetModel:
    """The base model: an ``OmniNetModel`` as it is (copied, so passes never touch the
    caller's), or a folder written by ``save_pretrained`` or kept by a sweep trial. ValueError
    (one line) when the folder is not a saved model."""
    if isinstance(base, OmniNetModel):
        import copy

        return copy.deepcopy(base).to(device)
    path = Path(base).expanduser()
    if is_foreign(path):
        return OmniNetModel.from_hf(path).to(device)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(f"base: {str(path)!r} is not a saved OmniNet model (config.json + model.safetensors); point "
                         "base.checkpoint at a save_pretrained folder or a sweep's models/pool=<pool>/trial-<n> folder")
    return OmniNetModel.from_pretrained(path, device=device)


def check_base(base: ModelConfig, trial: ModelConfig, *, task_length: int, task_name: str = "the task") -> None:
    """ValueError (one line, naming the field and the fix) when the base cannot be the trial's
    starting point: a different vocabulary, class count, arch or shape, a base already pruned or
    not dense, or a length that does not cover the task's."""
    for name in _SHAPE_FIELDS:
        have, want = getattr(base, name), getattr(trial, name)
        if have != want:
            raise ValueError(f"base: {name}={have!r} but the trial's model needs {name}={want!r} for {task_name}; "
                             f"train the base on this task (base.train) or set trial.model.{name}: {have!r}")
    if trial.vocab_size > base.vocab_size:
        raise ValueError(f"base: vocab_size={base.vocab_size} but {task_name} has ids up to {trial.vocab_size - 1}; "
                         "tokenize the task with the base's own tokenizer (task.tokenizer)")
    for name in ("kind", "rope_base", "rope_scaling", "offset", "num_buckets", "max_distance"):
        have, want = getattr(base.position, name), getattr(trial.position, name)
        if have != want:
            raise ValueError(f"base: position.{name}={have!r} but the trial's model uses {want!r}; "
                             f"set trial.model.position.{name}: {have!r}")
    if base.position.kind == "learned" and base.max_seq_length < task_length:
        raise ValueError(f"base: max_seq_length={base.max_seq_length} is shorter than {task_name}'s {task_length} tokens "
                         "(learned positions cannot extrapolate); train the base at the deployment length")
    if base.heads.pruned_heads:
        raise ValueError("base: the model already has pruned heads; derive from the unpruned base")


def swap_attention(model: OmniNetModel, attention: AttentionConfig, *, seq_length: int) -> tuple[OmniNetModel, str]:
    """The same model with another attention kernel and parameters: a model built from the
    config with ``attention`` replaced, every existing weight copied in, then each layer's new
    kernel state started by its kernel's ``from_dense`` hook (``KernelSpec``: Linformer's E/F as a
    strided mean pool at ``seq_length``). Only kernel states may hold new weights; anything else
    missing or left over is a bug (RuntimeError). Returns the model and a line for the record."""
    config = model.config.replace(attention=attention)
    if config == model.config:
        return model, f"attention: {attention.kernel} (the base's kernel, unchanged)"
    new = OmniNetModel(config).to(next(model.parameters()).device)
    result = new.load_state_dict(model.state_dict(), strict=False)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if ".kernel_state." not in k]
    if unexpected or missing:
        raise RuntimeError(f"swap_attention: weights do not carry over (missing {missing[:4]}, unexpected "
                           f"{unexpected[:4]})")
    notes = []
    for attn in (m for m in new.modules() if isinstance(m, Attention)):
        if attn.spec.from_dense is not None and attn.kernel_state is not None:
            notes.append(attn.spec.from_dense(attn.kernel_state, seq_length=seq_length))
    spec = get_kernel(attention.kernel)
    parts = [spec.describe(config, seq_length)] if spec.describe else []
    parts += ["weights reused"] + [f"{n} layer(s): {note}" for note, n in Counter(filter(None, notes)).items()]
    return new, f"attention: {model.config.attention.kernel} -> {attention.kernel} ({'; '.join(parts)})"


def prune_heads(model: OmniNetModel, *, ratio: float, calibration: Iterable[dict]) -> tuple[int, int] | None:
    """Pass 2: removes ``ratio`` of all heads, least important first by gradient importance on
    ``calibration`` batches (``omninet.heads.prune_model``). Returns (heads pruned, heads
    left), or None when ``ratio`` is 0 (nothing runs)."""
    if ratio <= 0:
        return None
    report = prune_model(model, list(calibration), prune_ratio=ratio)
    return report.heads_before - report.heads_after, report.heads_after


def derive(base: OmniNetModel, trial: ModelConfig, *, prune_ratio: float = 0.0, calibration: Iterable[dict],
           seq_length: int, task_name: str = "the task") -> tuple[OmniNetModel, Derivation]:
    """Passes 1-3 of ``PASS_ORDER`` on a copy of ``base`` (already loaded): check, prune heads by
    importance on ``calibration`` batches (training data) to ``prune_ratio`` of all heads (the
    trial's ``prune.heads``), swap the attention kernel. Precision (pass 4) is the trial's plan
    (``omninet.trial.build``). ``trial`` is the trial's resolved ModelConfig."""
    check_base(base.config, trial, task_length=seq_length, task_name=task_name)
    model = load_base(base)
    log = Derivation(passes=["load_base: dense base, "
                             f"{sum(a.num_heads for a in model.attention_layers())} heads, {model.num_parameters()} params"])
    heads_before = sum(a.num_heads for a in model.attention_layers())
    log.heads_remaining = heads_before
    pruned = prune_heads(model, ratio=prune_ratio, calibration=calibration)
    if pruned is not None:
        log.heads_pruned, log.heads_remaining = pruned
        log.passes.append(f"prune_heads: {log.heads_pruned} of {heads_before} heads by importance on the base")
    model, line = swap_attention(model, trial.attention, seq_length=seq_length)
    log.passes.append(line)
    # the rest of the trial's model config (dropout, gating, checkpointing, ...) as the trial says
    rest = trial.replace(attention=model.config.attention, max_seq_length=model.config.max_seq_length,
                         heads=trial.heads.replace(pruned_heads=model.config.heads.pruned_heads))
    if rest != model.config:
        rebuilt = OmniNetModel(rest).to(next(model.parameters()).device)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    return model, log
