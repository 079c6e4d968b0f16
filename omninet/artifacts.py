"""A trial's trained model on disk: safetensors weights plus everything needed to serve it.

    path = save_trial_model(model, results_dir / model_subdir("gpu", 7), trial_config=cfg,
                            identity=trial_identity(sweep="quickstart", pool="gpu", trial=7, trial_config=cfg),
                            metrics={"accuracy": 0.61})
    trained = load_trial_model(path)          # TrainedModel: model (eval mode), task, identity, metrics
    trained.predict_ids([[2, 10, 17, 5]])     # {'predictions': [...], 'probabilities': [[...]]}

One folder per kept trial, ``<results_dir>/models/pool=<pool>/trial-<number:06d>/``:

==================  ==============================================================
config.json         the ModelConfig (``OmniNetModel.save_pretrained``)
model.safetensors   the weights (no pickle anywhere)
trial.json          the trial config dict, incl. its ``task`` section (rebuilds the tokenizer)
identity.json       sweep, pool, trial number, config_hash (sha256 of the canonical trial JSON)
metrics.json        the trial's record (accuracy, latency, ...) or ``{}``
==================  ==============================================================

``KEEP_MODELS`` names the sweep-level policy for which ``ok`` trials keep their folder;
``keep_model(policy, on_front=...)`` answers it for one trial and ``prune_models`` applies
the ``pareto`` policy once the front is known.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omninet.buckets import bucket_for, default_buckets, pad_to_bucket
from omninet.hardware import quantize_int8
from omninet.hardware.base import INT8_PRECISIONS
from omninet.model import OmniNetModel

__all__ = ["KEEP_MODELS", "TrainedModel", "config_hash", "keep_model", "load_trial_model", "model_files",
           "model_subdir", "prune_models", "save_trial_model", "trial_identity", "write_trial_model"]

KEEP_MODELS = ("all", "pareto", "none")
_FILES = ("config.json", "model.safetensors", "trial.json", "identity.json", "metrics.json")


def config_hash(trial_config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a trial config (sorted keys, no whitespace)."""
    canonical = json.dumps(trial_config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def trial_identity(*, sweep: str | None, pool: str | None, trial: int | None, trial_config: dict[str, Any]) -> dict[str, Any]:
    """The identity a served model reports: which sweep, pool and trial made it, and its config hash."""
    return {"sweep": sweep, "pool": pool, "trial": trial, "config_hash": config_hash(trial_config)}


def model_subdir(pool: str, trial: int) -> Path:
    """Where a trial's model lives under a sweep's results directory."""
    return Path("models") / f"pool={pool}" / f"trial-{int(trial):06d}"


def keep_model(policy: str, *, on_front: bool) -> bool:
    """Whether an ``ok`` trial keeps its model under ``policy`` (one of ``KEEP_MODELS``)."""
    if policy not in KEEP_MODELS:
        raise ValueError(f"keep_models must be one of {', '.join(map(repr, KEEP_MODELS))}; got {policy!r}")
    return policy == "all" or (policy == "pareto" and on_front)


def prune_models(results_dir, pool: str, keep: set[int]) -> list[Path]:
    """Deletes the model folders of ``pool`` whose trial number is not in ``keep`` (for the
    ``pareto`` policy: a trial's place on the front is known only after later trials, so the
    controller saves every ``ok`` trial and prunes to the front at the end). Returns what it removed."""
    removed = []
    for folder in sorted((Path(results_dir) / "models" / f"pool={pool}").glob("trial-*")):
        number = folder.name.removeprefix("trial-")
        if number.isdigit() and int(number) not in keep:
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def save_trial_model(model, out_dir, *, trial_config: dict, identity: dict, metrics: dict | None = None) -> Path:
    """Writes the folder described in the module docstring and returns its path. ``identity``
    needs ``sweep``, ``pool`` and ``trial``; ``config_hash`` is computed from ``trial_config``
    (a given one must match). The model is saved as it was evaluated (after head pruning);
    int8-quantized models are refused (their packed weights are not plain tensors)."""
    if not isinstance(model, OmniNetModel):
        raise ValueError(f"save_trial_model needs an OmniNetModel, got {type(model).__name__} (an int8-quantized "
                         f"model cannot be saved as safetensors; save the fp32 model)")
    if not isinstance(trial_config, dict) or "task" not in trial_config:
        raise ValueError("trial_config must be the trial config dict, with its 'task' section")
    missing = [k for k in ("sweep", "pool", "trial") if k not in identity]
    if missing:
        raise ValueError(f"identity is missing {', '.join(missing)}")
    digest = config_hash(trial_config)
    if identity.get("config_hash") not in (None, digest):
        raise ValueError(f"identity.config_hash {identity['config_hash']!r} is not the hash of trial_config ({digest})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return _write_meta(out, trial_config, {**identity, "config_hash": digest}, metrics)


def model_files(model) -> dict[str, bytes]:
    """The ``save_pretrained`` files of a model as bytes: what a worker on another node sends
    back to the controller, which writes them with :func:`write_trial_model`."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)  # tokenizer files of an imported base stay with the base folder
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.name in ("config.json", "model.safetensors")}


def write_trial_model(files: dict[str, bytes], out_dir, *, trial_config: dict, identity: dict,
                      metrics: dict | None = None) -> Path:
    """The folder of :func:`save_trial_model`, from the model files' bytes (see ``model_files``)."""
    unknown = sorted(set(files) - {"config.json", "model.safetensors"})
    if unknown or "model.safetensors" not in files:
        raise ValueError(f"model files must be config.json and model.safetensors, got {sorted(files)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return _write_meta(out, trial_config, {**identity, "config_hash": config_hash(trial_config)}, metrics)


def _write_meta(out: Path, trial_config: dict, identity: dict, metrics: dict | None) -> Path:
    (out / "trial.json").write_text(json.dumps(trial_config, indent=2, sort_keys=True, default=str))
    (out / "identity.json").write_text(json.dumps(identity, indent=2))
    (out / "metrics.json").write_text(json.dumps(_json_safe(dict(metrics or {})), indent=2, default=str))
    return out


@dataclass
class TrainedModel:
    """A loaded trial model: ``model`` in eval mode, the ``task`` it was trained on (tokenizer,
    vocab, pad id, classes), its ``identity`` and ``metrics``, and the folder it came from."""

    model: Any
    task: Any
    trial_config: dict[str, Any]
    identity: dict[str, Any]
    metrics: dict[str, Any]
    path: Path
    buckets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.buckets:
            self.buckets = default_buckets(self.max_length)

    @property
    def max_length(self) -> int:
        """The longest input the model accepts (its position table / configured sequence length)."""
        return int(self.model.config.max_seq_length)

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def kind(self) -> str:
        """What a served request gets: 'classification' (a class per sequence), 'fill_mask' (an
        encoder on token labels: the token at every MASK position) or 'next_token' (a decoder)."""
        if self.task.kind == "classification":
            return "classification"
        return "next_token" if getattr(self.task, "causal", True) else "fill_mask"

    @torch.no_grad()
    def logits(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor | list[torch.Tensor]:
        """Id sequences (already valid) -> fp32 logits, padded per length bucket (one forward per
        bucket present): [B, num_classes] for a classifier; for a token model one [len, vocab]
        tensor per sequence."""
        token = self.kind != "classification"
        out: Any = [None] * len(sequences) if token else torch.empty(len(sequences), int(self.model.config.num_classes or 0))
        by_bucket: dict[int, list[int]] = {}
        for i, ids in enumerate(sequences):
            by_bucket.setdefault(bucket_for(len(ids), self.buckets), []).append(i)
        for bucket, rows in by_bucket.items():
            input_ids, mask = pad_to_bucket([sequences[i] for i in rows], bucket, pad_id=self.task.pad_id)
            logits = self.model(input_ids.to(self.device), attention_mask=mask.to(self.device)).logits.float().cpu()
            if token:
                for j, i in enumerate(rows):
                    out[i] = logits[j, : len(sequences[i])]  # [len, vocab]
            else:
                out[rows] = logits
        return out

    def predict_ids(self, sequences: Sequence[Sequence[int]]) -> dict[str, list]:
        """``{'predictions': [...], 'probabilities': [...]}`` per sequence: a classifier's class
        and class probabilities; a fill-mask model's ``{positions, ids, text}`` of the tokens it
        puts at the MASK positions and their probabilities; a next-token model's next id and
        its probability."""
        logits = self.logits(sequences)
        if self.kind == "classification":
            probs = logits.softmax(-1)
            return {"predictions": probs.argmax(-1).tolist(), "probabilities": probs.tolist()}
        predictions, probabilities = [], []
        mask_id = getattr(getattr(self.task, "tokenizer", None), "mask_id", None)
        for ids, lg in zip(sequences, logits):
            probs = lg.softmax(-1)  # [len, vocab]
            if self.kind == "next_token":
                p, top = probs[-1].max(-1)
                predictions.append(int(top))
                probabilities.append(float(p))
                continue
            positions = [i for i, t in enumerate(ids) if t == mask_id]
            p, top = probs[positions].max(-1) if positions else (torch.empty(0), torch.empty(0, dtype=torch.long))
            filled = [int(top[positions.index(i)]) if i in positions else int(t) for i, t in enumerate(ids)]
            text = self.task.tokenizer.decode(filled) if hasattr(self.task, "tokenizer") else None
            predictions.append({"positions": positions, "ids": top.tolist(), "text": text})
            probabilities.append(p.tolist())
        return {"predictions": predictions, "probabilities": probabilities}

    @torch.no_grad()
    def evaluate(self, split: str = "eval", *, batch_size: int = 64, max_examples: int | None = None) -> dict[str, float]:
        """The task's metrics of this model on ``split``, batched as the trial evaluated it."""
        meter, seen = self.task.new_meter(), 0
        for batch in self.task.batches(split, batch_size, shuffle=False):
            if max_examples is not None:
                if seen >= max_examples:
                    break
                batch = {k: v[: max_examples - seen] for k, v in batch.items()}
            logits = self.model(batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)).logits
            meter.update(logits.float().cpu(), batch)
            seen += batch["input_ids"].shape[0]
        return meter.compute()


def load_trial_model(directory, *, device: str | torch.device = "cpu") -> TrainedModel:
    """Reads a folder written by ``save_trial_model``: the model (eval mode, on ``device``), the
    task rebuilt from trial.json, identity and metrics. ValueError names a missing file."""
    from omninet.tasks import build_task  # heavy: pyarrow (omninet.tasks reads Parquet)

    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"{d} is not a directory; no trained model was kept there")
    missing = [f for f in _FILES if not (d / f).is_file()]
    if missing:
        raise ValueError(f"{d} is not a saved trial model: missing {', '.join(missing)}")
    model = OmniNetModel.from_pretrained(d, device=device).eval()  # pruned heads and attention layout: its config
    trial_config = json.loads((d / "trial.json").read_text())
    precision = (trial_config.get("hardware") or {}).get("precision")
    if precision in INT8_PRECISIONS:  # kept as fp32: quantized again, as measured
        model = quantize_int8(model, precision, inplace=True)
    task = build_task(trial_config["task"])
    if task.vocab_size > model.config.vocab_size:  # a pretrained embedding may be padded past its tokenizer's ids
        raise ValueError(f"{d}: trial.json's task has vocab_size {task.vocab_size}, the model {model.config.vocab_size}")
    return TrainedModel(model=model, task=task, trial_config=trial_config,
                        identity=json.loads((d / "identity.json").read_text()),
                        metrics=json.loads((d / "metrics.json").read_text()), path=d)
