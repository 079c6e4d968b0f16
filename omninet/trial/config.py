"""A trial's configuration (one typed tree, parsed once) and its flat result record.

    cfg = TrialConfig.from_dict({"task": {"name": "listops"}, "train": {"steps": 200}})
    cfg.model_config          # the resolved ModelConfig (task facts + SMALL_MODEL + overrides)
    cfg.with_values({"model.attention.kernel": "linformer"})   # a new, validated TrialConfig

Sections: ``task`` (a typed ``TaskConfig``, chosen by its ``name``), ``model`` (a typed partial
``ModelConfig``: only the fields the trial sets), ``train``, ``hardware``, ``measure``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from omninet.config import ConfigBase, ModelConfig, _coerce
from omninet.hardware.device import DeviceConfig
from omninet.paths import MISSING, check_path, config_paths, get_path, set_path
from omninet.tasks.base import TaskConfig

__all__ = ["STATUSES", "SMALL_MODEL", "TrainConfig", "FinetuneConfig", "PruneConfig", "HardwareConfig", "MeasureConfig",
           "ModelOverrides", "TrialConfig", "TrialResult", "ColumnInfo", "column", "parse_count"]

# screened: measured first (untrained model at the deployment shape) and stopped before training;
# pruned: stopped at a rung of successive halving (partial record). Both are the sweep
# scheduler's decisions (omninet.sweep.scheduler); a trial run on its own never gets them.
# duplicate: a sweep proposal equal (all sampled parameters and the seed) to a trial already run
# or running in its pool; not trained again, told to Optuna with that trial's outcome.
STATUSES = ("ok", "oom", "diverged", "infeasible", "invalid", "error", "screened", "pruned", "duplicate")

# A trial's model starts from these (not from ModelConfig's GPT-2-size defaults): a small
# dense encoder that trains in about a minute on a laptop CPU. The trial's ``model`` section
# overrides them; vocab_size, pad_token_id and num_classes come from the task.
SMALL_MODEL: dict[str, Any] = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "ff_ratio": 2.0, "dropout": 0.0,
                               "pooling": "mean"}
TASK_OWNED_MODEL_KEYS = ("vocab_size", "pad_token_id", "num_classes")

_PARSES = [0]  # TrialConfig constructions in this process (tests check a sweep trial parses exactly once)


def parse_count() -> int:
    return _PARSES[0]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(kw_only=True)
class TrainConfig(ConfigBase):
    """The training budget and optimizer. At least one of ``steps`` and ``max_seconds``;
    with both, training stops at whichever comes first. A ``steps`` budget is deterministic;
    ``max_seconds`` couples accuracy to the machine's speed."""

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
    # Eval sized by a target standard error (omninet.scores, clustered by eval row): evaluation
    # runs the eval split in its fixed order and stops after the first batch at which the
    # accuracy's standard error is at most eval_target_se (and at least eval_min_examples rows
    # were scored), or when eval_max_seconds or eval_max_examples is reached; the record says
    # which SE it reached. Every trial of a sweep scores a prefix of the same rows, so any two
    # are paired on the rows both scored. None: the whole split (or eval_max_examples).
    eval_target_se: float | None = None
    eval_min_examples: int = 64
    eval_max_seconds: float | None = None

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
        _check(self.eval_target_se is None or 0.0 < self.eval_target_se < 0.5,
               f"train.eval_target_se must be in (0, 0.5) such as 0.005 (or null), got {self.eval_target_se}")
        _check(self.eval_min_examples >= 2, f"train.eval_min_examples must be >= 2, got {self.eval_min_examples}")
        _check(self.eval_max_seconds is None or self.eval_max_seconds > 0,
               f"train.eval_max_seconds must be > 0 (or null), got {self.eval_max_seconds}")


@dataclass(kw_only=True)
class PruneConfig(ConfigBase):
    """Head pruning, a pass of the trial (``omninet.passes``): ``heads`` is the fraction of all
    attention heads removed, least important first by gradient importance on a few train
    batches, on the trained weights (a derived trial: on the base's, before its fine-tune);
    0 = off. The model records the heads removed (``model.heads.pruned_heads``)."""

    heads: float = 0.0

    def validate(self) -> None:
        _check(0.0 <= self.heads < 1.0, f"prune.heads must be in [0, 1) (the fraction of all heads removed; 0 = off), "
                                        f"got {self.heads}")


# Documented aliases: a path users wrote before its setting moved, read as the new path (so
# sweeps, search spaces and results recorded under the old name keep working, their Parquet
# column and Optuna parameter keep the name the sweep used). Giving both is refused.
ALIASES = {"model.heads.prune_ratio": "prune.heads"}  # head pruning is a pass of the trial, not a model field


def _apply_aliases(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a trial config dict) with every alias moved to its path (a copy when one is)."""
    for old, new in ALIASES.items():
        value = get_path(data, old)
        if value is MISSING:
            continue
        data = copy.deepcopy(data)
        parent, key = old.rsplit(".", 1)
        del get_path(data, parent)[key]
        current = get_path(data, new)
        _check(current is MISSING or current == value,
               f"{old}={value!r} and {new}={current!r} are the same setting ({old} is the old name of {new}); give one")
        set_path(data, new, value)
    return data


@dataclass(kw_only=True)
class FinetuneConfig(ConfigBase):
    """A derived trial's short fine-tune after its passes (``TrialConfig.base``): ``steps`` of
    AdamW at ``lr`` (warm-up, then cosine as in training; batch size, weight decay and clipping
    from ``train``). ``steps: 0`` is post-training only: the trial is scored as the passes left
    it. ``distill`` in [0, 1] weighs a KL term to the base's outputs (temperature
    ``temperature``) against the task loss: loss = (1 - distill) CE + distill T^2 KL."""

    steps: int = 100
    lr: float = 5e-4
    warmup_steps: int = 10
    distill: float = 0.0
    temperature: float = 1.0

    def validate(self) -> None:
        _check(self.steps >= 0, f"finetune.steps must be >= 0 (0 = post-training only), got {self.steps}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"finetune.lr must be a positive number, got {self.lr}")
        _check(self.warmup_steps >= 0, f"finetune.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0.0 <= self.distill <= 1.0, f"finetune.distill must be in [0, 1] (0 = off), got {self.distill}")
        _check(self.temperature > 0, f"finetune.temperature must be > 0, got {self.temperature}")

    def train_config(self, train: TrainConfig) -> TrainConfig | None:
        """The fine-tune as a training budget (``train``'s batches and optimizer, these steps);
        None for ``steps: 0``."""
        if self.steps == 0:
            return None
        return dataclasses.replace(train, steps=self.steps, max_seconds=None, lr=self.lr,
                                   warmup_steps=min(self.warmup_steps, self.steps))


@dataclass(kw_only=True)
class HardwareConfig(DeviceConfig):
    """Where and how the trial runs: the device config (``device``, ``precision``,
    ``memory_threshold``; checked against this machine by ``omninet.hardware.
    resolve_device_config``) plus the trial's memory budget, CPU threads and
    ``allow_emulated``, which lets a precision run that the device has no native support for
    (the result is tagged ``emulated``)."""

    memory_budget_mb: float | None = None
    num_threads: int | None = None  # CPU intra-op threads for this trial (None: one per allotted core, or torch's)
    allow_emulated: bool = False
    # Static-shape buckets (omninet.shapes): every batch is padded (masked) to the next length in
    # the list; 'pow2' = powers of two up to the model's max_seq_length. Checked against the
    # model when the trial config is parsed.
    shape_buckets: list[int] | Literal["pow2"] | None = None

    def validate(self) -> None:
        super().validate()
        _check(self.num_threads is None or self.num_threads >= 1,
               f"hardware.num_threads must be >= 1 (or null to keep torch's setting), got {self.num_threads}")
        _check(self.memory_budget_mb is None or self.memory_budget_mb > 0,
               f"hardware.memory_budget_mb must be > 0 (or null), got {self.memory_budget_mb}")


@dataclass(kw_only=True)
class MeasureConfig(ConfigBase):
    """How latency, throughput and memory are measured, and at which deployment shape.

    ``seq_length`` / ``batch_size``: the shape of the measurement (default: the task's
    ``max_length`` and the training batch), independent of the training length; the inputs are
    real task tokens at exactly that length. Latency is at batch 1: after ``warmup`` untimed
    calls, at least ``latency_reps`` calls AND at least ``min_seconds`` of calls; when their
    coefficient of variation exceeds ``max_cv`` the loop runs again, at most ``max_rounds``
    times, and the result is tagged ``latency_noisy`` if it stays above.

    ``calibrate`` (default on): every timed latency call is followed by a fixed reference
    workload (``omninet.trial.measure.calibration``), so the result also carries the latency in
    units of the reference (``latency_p50_rel``), free of the machine's speed drift, and in ms at
    a reference speed (``latency_p50_norm_ms``; in a sweep, the pool's probed reference, so all
    trials of a pool are on one scale). ``max_cv`` then judges the per-call ratios.

    ``paired`` (default on): in a sweep, the trial also builds its pool's reference model (the
    base, or the pool's reference configuration: ``RunContext.reference``) and times the two side
    by side (``omninet.trial.measure.paired``): rounds of ``pair_calls`` calls of each, alternating
    which goes first, until the 95% interval of the per-round ratios has a half-width of at most
    ``pair_halfwidth`` of the ratio (after ``pair_min_rounds`` rounds), or ``pair_max_rounds``
    rounds, or ``pair_max_seconds``. The result carries ``latency_ratio_ref`` and
    ``throughput_ratio_ref`` with their intervals; the trial's raw (and calibrated) latency comes
    from its own calls in those rounds (at least ``latency_reps``; ``min_seconds``, ``max_cv`` and
    ``max_rounds`` then do not apply), its throughput from its calls in rounds of one call each
    (``throughput_reps`` does not apply)."""

    latency_reps: int = 30
    throughput_reps: int = 20
    warmup: int = 3
    min_seconds: float = 1.0
    max_cv: float = 0.05
    max_rounds: int = 3
    seq_length: int | None = None
    batch_size: int | None = None
    memory: bool = True
    calibrate: bool = True
    paired: bool = True
    pair_calls: int = 3
    pair_min_rounds: int = 10
    pair_max_rounds: int = 40
    pair_halfwidth: float = 0.02
    pair_max_seconds: float = 1.5
    # Generation (decoders only; omninet.trial.measure.generation): prefill and per-token decode
    # latency, decode tokens/s and the KV cache's size, after the forward figures. Off: the
    # generation fields stay None. Each of its two latency loops runs at least generation_reps
    # calls and generation_min_seconds (None: min_seconds / 4, 0.25 s at the default); the
    # decode window is generation_tokens new tokens. generation_depths: decode again at cache
    # depths 4N and 16N (capped at the model's max_seq_length) for the slope per 1K tokens.
    generation: bool = True
    generation_tokens: int = 16
    generation_reps: int = 20
    generation_min_seconds: float | None = None
    generation_depths: bool = True
    # One length: a trial trains, evaluates and is measured at the task's length. A seq_length
    # other than the task's max_length is refused unless this says so explicitly; the result
    # then records measure_other_length and the trial logs a warning (accuracy was judged at
    # another length than cost).
    allow_other_length: bool = False

    def validate(self) -> None:
        for name in ("latency_reps", "throughput_reps"):
            _check(getattr(self, name) >= 20, f"measure.{name} must be >= 20 for stable percentiles, got {getattr(self, name)}")
        _check(self.warmup >= 1, f"measure.warmup must be >= 1, got {self.warmup}")
        _check(self.min_seconds >= 0, f"measure.min_seconds must be >= 0, got {self.min_seconds}")
        _check(self.max_cv > 0, f"measure.max_cv must be > 0 (a fraction such as 0.05), got {self.max_cv}")
        _check(1 <= self.max_rounds <= 10, f"measure.max_rounds must be in [1, 10], got {self.max_rounds}")
        _check(self.pair_calls >= 1, f"measure.pair_calls must be >= 1, got {self.pair_calls}")
        _check(6 <= self.pair_min_rounds <= self.pair_max_rounds <= 1000,
               f"measure.pair_min_rounds and pair_max_rounds must satisfy 6 <= min <= max <= 1000 (below 6 rounds no "
               f"95% interval exists), got {self.pair_min_rounds} and {self.pair_max_rounds}")
        _check(0 < self.pair_halfwidth < 1, f"measure.pair_halfwidth must be in (0, 1) (a fraction of the ratio such as "
                                            f"0.02), got {self.pair_halfwidth}")
        _check(self.pair_max_seconds > 0, f"measure.pair_max_seconds must be > 0, got {self.pair_max_seconds}")
        _check(self.pair_max_rounds * self.pair_calls >= self.latency_reps,
               f"measure: pair_max_rounds x pair_calls ({self.pair_max_rounds} x {self.pair_calls}) must reach "
               f"latency_reps ({self.latency_reps}): the paired rounds are the trial's latency calls")
        _check(self.generation_tokens >= 1, f"measure.generation_tokens must be >= 1, got {self.generation_tokens}")
        _check(self.generation_reps >= 20, f"measure.generation_reps must be >= 20 for stable percentiles, got "
                                           f"{self.generation_reps}")
        _check(self.generation_min_seconds is None or self.generation_min_seconds >= 0,
               f"measure.generation_min_seconds must be >= 0 (or null: min_seconds / 4), got {self.generation_min_seconds}")
        for name in ("seq_length", "batch_size"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"measure.{name} must be >= 1 (or null), got {value}")


def _check_partial(cls: type, values: dict[str, Any], where: str) -> None:
    """Each given key is a field of ``cls`` with a value of its type (nested configs recurse);
    cross-field rules are checked when the full ModelConfig is resolved."""
    _check(isinstance(values, dict), f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    _check(not unknown, f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys are {', '.join(sorted(names))}")
    for key, value in values.items():
        tp = hints[key]
        if isinstance(tp, type) and issubclass(tp, ConfigBase) and isinstance(value, dict):
            _check_partial(tp, value, f"{where}.{key}")
        else:
            _coerce(value, tp, f"{where}.{key}")


@dataclass(kw_only=True)
class ModelOverrides(ConfigBase):
    """A partial ``ModelConfig``: only the fields a trial sets, each checked against
    ModelConfig's annotations when given. ``resolve`` merges them over the defaults and the
    task's facts into a full, validated ModelConfig."""

    values: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, _where: str | None = None) -> "ModelOverrides":
        _check(isinstance(data, dict), f"{_where or 'model'}: expected a mapping, got {type(data).__name__}")
        return cls(values=copy.deepcopy(data))

    def validate(self) -> None:
        _check_partial(ModelConfig, self.values, "model")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.values)

    @classmethod
    def paths(cls, prefix: str = "") -> list[str]:
        return config_paths(ModelConfig, prefix)

    def resolve(self, defaults: dict[str, Any]) -> ModelConfig:
        merged = copy.deepcopy(defaults)
        for key, value in self.values.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return ModelConfig.from_dict(merged, _where="model")


@dataclass(kw_only=True)
class TrialConfig(ConfigBase):
    """A trial: ``task``, ``model`` (a partial ModelConfig over ``SMALL_MODEL``; the task sets
    vocab_size, pad_token_id, num_classes and, unless given, arch and max_seq_length),
    ``train``, ``hardware``, ``measure``, ``prune`` (head pruning, a pass), and for a trial
    derived from a trained model ``base`` and ``finetune``. Parsing builds the task (cheap: data is made lazily)
    and resolves ``model_config`` once."""

    task: TaskConfig
    model: ModelOverrides = field(default_factory=ModelOverrides)
    train: TrainConfig
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    # A trained dense model to derive this trial from (``omninet.passes``): a save_pretrained
    # folder or a kept trial model. None: the trial trains from scratch (``train``).
    base: str | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    model_config: ModelConfig = field(init=False, repr=False, compare=False)

    _task_obj: ClassVar[None] = None  # the built Task, per instance (not pickled: rebuilt where it runs)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, _where: str | None = None) -> "TrialConfig":
        if isinstance(data, dict):
            missing = [k for k in ("task", "train") if k not in data]
            _check(not missing, f"trial config: missing section(s) {', '.join(missing)}; a trial needs a task and a "
                                "train budget, e.g. train: {steps: 100}")
            _check(isinstance(data["task"], dict), "task must be a mapping such as {name: listops}")
            data = _apply_aliases(data)
        return super().from_dict(data, _where=_where)

    def validate(self) -> None:
        _PARSES[0] += 1
        object.__setattr__(self, "model_config", self._resolve_model(self.model))
        if self.base is not None:
            self._check_base()
        n, task_n = self.measure.seq_length, self.task_obj.max_length
        _check(n is None or n == task_n or self.measure.allow_other_length,
               f"measure.seq_length={n} differs from the task's length ({task_n} tokens), so accuracy would be judged "
               f"at another length than latency and memory; make the task produce {n}-token examples (e.g. "
               f"task.max_length), drop measure.seq_length, or set measure.allow_other_length: true")
        if self.hardware.shape_buckets is not None:
            buckets = self.buckets
            longest = max(self.task_obj.max_length, self.measure.seq_length or 0)
            _check(buckets[-1] >= longest, f"hardware.shape_buckets={buckets} stops below the longest input ({longest} "
                                           f"tokens); end the list with a bucket >= {longest}, e.g. 'pow2'")

    def _check_base(self) -> None:
        """The base holds a model this trial can derive from (``omninet.passes.check_base``):
        one line naming the mismatch, before anything runs."""
        from omninet.passes import base_config, check_base  # passes imports the model, which is heavy

        check_base(base_config(self.base), self.model_config, task_length=self.task_obj.max_length,
                   task_name=f"task {self.task_obj.name!r}")

    def _resolve_model(self, model: ModelOverrides) -> ModelConfig:
        """The full ModelConfig: ``SMALL_MODEL``, then the task's facts and defaults (arch by
        task kind, max_seq_length covering the task and the measurement), then ``model``."""
        task, given = self.task_obj, model.values
        facts = {"vocab_size": task.vocab_size, "pad_token_id": task.pad_id, "num_classes": task.num_classes}
        for key in TASK_OWNED_MODEL_KEYS:
            if key in given and given[key] != facts[key]:
                raise ValueError(f"model.{key}={given[key]!r} conflicts with task {task.name!r} ({facts[key]!r}); "
                                 f"remove model.{key}: the task sets it")
        causal = getattr(task, "causal", task.kind == "lm")
        arch = given.get("arch", getattr(task, "default_arch", "encoder" if task.kind == "classification" else "decoder"))
        _check(task.kind != "lm" or not causal or arch == "decoder",
               f"model.arch={arch!r} cannot be trained on the language-modelling task {task.name!r}; use arch 'decoder'")
        _check(task.kind != "lm" or causal or arch == "encoder",
               f"model.arch={arch!r} cannot be trained on the masked task {task.name!r} (it needs both sides of every "
               f"masked position); use arch 'encoder'")
        _check(task.kind != "classification" or arch != "encoder_decoder",
               f"model.arch='encoder_decoder' has no classification path; use 'encoder' for task {task.name!r}")
        n = max(task.max_length, self.measure.seq_length or 0)
        if self.base is not None:  # a derived trial is its base's model with the trial's knobs on top
            return ModelOverrides(values={k: v for k, v in given.items() if k != "arch"}).resolve(
                self._base_defaults(facts, arch, n))
        defaults = {**SMALL_MODEL, "max_seq_length": n, **facts, "arch": arch}
        return ModelOverrides(values={k: v for k, v in given.items() if k != "arch"}).resolve(defaults)

    def _base_defaults(self, facts: dict[str, Any], arch: str, n: int) -> dict[str, Any]:
        """The base's own config (pruning and kernel aside) under the task's facts: its vocabulary
        stays when the task's ids fit it (a tokenizer may cover fewer ids than the embedding has)
        and its length when that covers the task. A mismatch is check_base's to report."""
        from omninet.passes import base_config

        base = base_config(self.base).to_dict()
        base["heads"] = {**base["heads"], "pruned_heads": {}}
        facts = {**facts, "vocab_size": max(base["vocab_size"], facts["vocab_size"])}
        return {**base, **facts, "arch": base["arch"] if arch == base["arch"] else arch,
                "max_seq_length": max(base["max_seq_length"], n)}

    def check_values(self, values: dict[str, Any]) -> None:
        """ValueError when setting ``{dotted path: value}`` would make an invalid config. Only
        the sections concerned are rebuilt (for ``model``, the resolved ModelConfig), not the
        whole trial: the sweep checks every searched value this way without parsing N trials."""
        data = self.to_dict()
        sections = set()
        for path, value in values.items():
            path = ALIASES.get(path, path)
            set_path(data, path, value)
            sections.add(path.split(".", 1)[0])
        for name in sections:
            if name == "model":
                self._resolve_model(ModelOverrides.from_dict(data["model"]))
            elif name == "task":
                TaskConfig.from_dict(data["task"])
            else:
                type(getattr(self, name)).from_dict(data[name], _where=name)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_task_obj", None)  # a Task may hold generated data: rebuild it on the worker
        return state

    @property
    def task_obj(self):
        """The built task (``omninet.tasks.build_task(self.task)``), built once per process."""
        if self.__dict__.get("_task_obj") is None:
            from omninet.tasks import build_task

            object.__setattr__(self, "_task_obj", build_task(self.task))
        return self.__dict__["_task_obj"]

    @property
    def buckets(self) -> list[int] | None:
        """``hardware.shape_buckets`` resolved against the model (None: no buckets)."""
        from omninet.shapes import check_buckets, default_buckets

        b = self.hardware.shape_buckets
        if b is None:
            return None
        n = self.model_config.max_seq_length
        return default_buckets(n) if b == "pow2" else check_buckets(b, n, where="hardware.shape_buckets")

    @property
    def seq_length(self) -> int:
        """The deployment length that latency and memory are measured at: the task's length
        unless ``measure.seq_length`` says otherwise (with ``measure.allow_other_length``)."""
        return self.measure.seq_length or self.task_obj.max_length

    @property
    def other_length(self) -> bool:
        """Measured at another length than the task trains and evaluates at."""
        return self.seq_length != self.task_obj.max_length

    @property
    def measure_batch_size(self) -> int:
        return self.measure.batch_size or self.train.batch_size

    def paths(self) -> list[str]:
        """Every settable dotted path of this trial config (the task's fields by its name)."""
        out = [f"task.{p}" for p in config_paths(type(self.task))] + ["task.name"]
        out.append("base")
        for name in ("model", "train", "hardware", "measure", "finetune", "prune"):
            cls = ModelOverrides if name == "model" else type(getattr(self, name))
            out += cls.paths(f"{name}.") if hasattr(cls, "paths") else config_paths(cls, f"{name}.")
        return out

    def check_path(self, path: str, *, where: str) -> None:
        check_path(ALIASES.get(path, path), self.paths(), where=where)

    def on_device(self, device: str) -> "TrialConfig":
        """The same trial on another ``hardware.device``, not parsed again: a shallow copy that
        keeps the resolved model config and the built task. ``validate`` reads no device (only
        where the machine is checked, ``loop.resolve_plan``, does), so the copy is as valid as
        this config."""
        out = object.__new__(type(self))  # not copy.copy: its __getstate__ drops the built task
        out.__dict__.update(self.__dict__, hardware=dataclasses.replace(self.hardware, device=device))
        return out

    def with_values(self, values: dict[str, Any]) -> "TrialConfig":
        """A new TrialConfig with ``{dotted path: value}`` set (one parse)."""
        data = self.to_dict()
        for path, value in values.items():
            set_path(data, ALIASES.get(path, path), value)
        return TrialConfig.from_dict(data)


# ---- result -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnInfo:
    """What a record field means to the stores that show it (``omninet.sweep.record`` derives
    the Parquet schema, MLflow metrics and tags, Optuna's user attributes and the dashboard's
    labels from it). ``metric``: an MLflow metric (every int or float field is one unless
    False). ``tag``: an MLflow tag, ``'always'`` (None as '') or ``'if_set'``. ``optuna``: a
    user attribute of Optuna's trial: True under the field's own name (set when the value is),
    or a name that groups fields into one dict (``'placement'``)."""

    label: str | None = None
    unit: str | None = None
    metric: bool | None = None
    tag: Literal["always", "if_set"] | None = None
    optuna: str | bool | None = None

    @property
    def title(self) -> str | None:
        """The label with its unit: 'latency p50 (ms)'."""
        if self.label is None:
            return None
        return f"{self.label} ({self.unit})" if self.unit else self.label


def column(default: Any = None, *, label: str | None = None, unit: str | None = None, metric: bool | None = None,
           tag: Literal["always", "if_set"] | None = None, optuna: str | bool | None = None, **kw: Any):
    """A record field with its :class:`ColumnInfo` (``optuna=True``: a user attribute of its
    own name). ``kw`` goes to ``dataclasses.field`` (``default_factory``)."""
    info = ColumnInfo(label=label, unit=unit, metric=metric, tag=tag, optuna=optuna or None)
    if "default_factory" not in kw:
        kw["default"] = default
    return field(metadata={"column": info}, **kw)


def column_info(f: dataclasses.Field) -> ColumnInfo:
    """The field's :class:`ColumnInfo` (the empty one for a plain field)."""
    info = f.metadata.get("column") or ColumnInfo()
    return dataclasses.replace(info, optuna=f.name) if info.optuna is True else info


@dataclass
class TrialResult:
    """One trial's flat record. Metrics are None where the trial did not get that far.

    Every measured number carries the conditions it was measured under: ``cores`` and
    ``num_threads`` the trial ran on, ``measure_co_running`` (other trials active on the node
    while it measured: 0 under the sweep's isolation), the load average around the
    measurement, and ``memory_method`` (which counter each memory figure comes from)."""

    status: str
    error: str | None = None
    accuracy: float | None = column(label="accuracy")  # the task metric, higher is better
    eval_loss: float | None = column(label="eval loss")
    # the eval's power (omninet.scores): what one scored unit is, how many were scored over how
    # many eval rows, the accuracy's and loss's standard errors clustered by row, and the hash of
    # the ordered eval rows (trials with equal hashes scored the same rows: they pair)
    eval_unit: str | None = None
    eval_units: int | None = None
    eval_rows: int | None = None
    accuracy_se: float | None = None
    eval_loss_se: float | None = None
    eval_hash: str | None = None
    eval_seconds: float | None = None
    bits_per_byte: float | None = None  # byte tasks: the eval loss in bits per scored byte
    measure_other_length: bool | None = None  # measured at measure.seq_length != the task's length (explicit)
    # derived from a trained base (TrialConfig.base, omninet.passes): the passes applied in order,
    # the accuracy right after them (zero-shot) and after the fine-tune (accuracy above)
    derived: bool | None = None
    passes: str | None = None
    accuracy_zero_shot: float | None = None
    accuracy_zero_shot_se: float | None = None
    eval_loss_zero_shot: float | None = None
    finetune_steps: int | None = None
    finetune_seconds: float | None = None
    distill: float | None = None
    majority_baseline: float | None = None
    # tensor peak of one training step (allocator / profiler timeline)
    peak_memory_train_mb: float | None = column(label="peak training memory", unit="MB")
    # tensor peak of one inference forward, first call in a clean state
    peak_memory_infer_mb: float | None = column(label="peak inference memory", unit="MB")
    peak_memory_infer_later_mb: float | None = None  # the same call after the timing runs (history check)
    peak_rss_train_mb: float | None = None  # process resident set, sampled in a thread during the training step
    peak_rss_infer_mb: float | None = None  # process resident set, sampled during the inference forward
    latency_p50_ms: float | None = column(label="latency p50", unit="ms")
    latency_p90_ms: float | None = None
    latency_p95_ms: float | None = column(label="latency p95", unit="ms")
    latency_p99_ms: float | None = None
    latency_mean_ms: float | None = None
    latency_cv: float | None = None  # std / mean of the timed calls of the last round
    latency_reps: int | None = None
    latency_rounds: int | None = None  # rounds of the latency loop (paired: the paired rounds)
    # cv (calibrated: of the ratios) stayed above measure.max_cv after max_rounds; paired: the ratio's
    # interval stayed wider than measure.pair_halfwidth
    latency_noisy: bool | None = None
    latency_calibration_ms: float | None = None  # the reference workload's median time during the latency loop
    latency_p50_rel: float | None = None  # median per-call latency / reference time: free of the machine's drift
    latency_rel_cv: float | None = None
    latency_calibration_ref_ms: float | None = None  # the reference time latency_p50_norm_ms is scaled to
    latency_p50_norm_ms: float | None = None  # latency_p50_rel x latency_calibration_ref_ms
    throughput_tokens_s: float | None = column(label="throughput", unit="tokens/s")
    # timed side by side with the sweep pool's reference model (measure.paired): the trial's latency
    # over the reference's (median of per-round ratios, 95% distribution-free interval), the same
    # for throughput (trial / reference: above 1 is faster), what it was paired with ('base',
    # 'enqueue[0]', 'first run (#0)') or why not ('unpaired: ...'), the reference's p50 in those rounds
    latency_ratio_ref: float | None = column(label="latency / reference", optuna=True)
    latency_ratio_ref_lo: float | None = column(optuna=True)
    latency_ratio_ref_hi: float | None = column(optuna=True)
    throughput_ratio_ref: float | None = column(label="throughput / reference", optuna=True)
    throughput_ratio_ref_lo: float | None = column(optuna=True)
    throughput_ratio_ref_hi: float | None = column(optuna=True)
    latency_ref_p50_ms: float | None = None
    latency_pairing: str | None = column(tag="if_set", optuna=True)
    # generation (decoders, measure.generation; None for encoders): prefill of the prompt at
    # seq_length, batch 1, last position's logits; decode per new token at batch 1 over cache depths
    # [decode_context, decode_context + decode_new_tokens); greedy decode tokens/s at the measure
    # batch; the KV cache after seq_length tokens at the measure batch, measured and from
    # omninet.model.kv_cache_bytes (K/V heads, head dim, the dtype it holds); or why they are missing.
    # Each is an Optuna user attribute too (optuna=True), so every store holds every figure.
    prefill_ms_p50: float | None = column(label="prefill p50", unit="ms", optuna=True)
    prefill_ms_p90: float | None = column(optuna=True)
    prefill_cv: float | None = column(optuna=True)
    prefill_noisy: bool | None = column(optuna=True)
    decode_ms_p50: float | None = column(label="decode per token p50", unit="ms", optuna=True)
    decode_ms_p90: float | None = column(label="decode per token p90", unit="ms", optuna=True)
    decode_ms_p99: float | None = column(optuna=True)
    decode_cv: float | None = column(optuna=True)
    decode_noisy: bool | None = column(optuna=True)
    decode_reps: int | None = column(optuna=True)
    decode_tokens_s: float | None = column(label="decode throughput", unit="tokens/s", optuna=True)
    decode_context: int | None = column(optuna=True)
    decode_new_tokens: int | None = column(optuna=True)
    kv_cache_mb: float | None = column(label="KV cache", unit="MB", optuna=True)
    kv_cache_formula_mb: float | None = column(optuna=True)
    # decode per token p50 with windows ending at cache depths N (= seq_length), 4N and 16N, capped at
    # the model's max_seq_length (decode_depth_cap, set when the cap applied; a depth the cap makes
    # equal to the one before is None), each depth in tokens, and the least-squares slope
    decode_ms_1p: float | None = column(label="decode at depth N", unit="ms", optuna=True)
    decode_ms_4p: float | None = column(label="decode at depth 4N", unit="ms", optuna=True)
    decode_ms_16p: float | None = column(label="decode at depth 16N", unit="ms", optuna=True)
    decode_depth_1p: int | None = column(optuna=True)
    decode_depth_4p: int | None = column(optuna=True)
    decode_depth_16p: int | None = column(optuna=True)
    decode_ms_per_1k_depth: float | None = column(label="decode slope", unit="ms per 1K tokens of depth", optuna=True)
    decode_depth_cap: int | None = column(optuna=True)
    # timed side by side with the pool's reference model (measure.paired): prefill and decode per token,
    # trial / reference, median of per-round ratios with its 95% interval (as latency_ratio_ref)
    prefill_ratio_ref: float | None = column(label="prefill / reference", optuna=True)
    prefill_ratio_ref_lo: float | None = column(optuna=True)
    prefill_ratio_ref_hi: float | None = column(optuna=True)
    decode_ratio_ref: float | None = column(label="decode / reference", optuna=True)
    decode_ratio_ref_lo: float | None = column(optuna=True)
    decode_ratio_ref_hi: float | None = column(optuna=True)
    # with measure.memory: tensor peaks of a prefill of seq_length tokens and of a whole generation
    # (a prompt of decode_context tokens, then decode_new_tokens) at the measure batch
    peak_memory_prefill_mb: float | None = column(label="peak prefill memory", unit="MB", optuna=True)
    peak_memory_generate_mb: float | None = column(label="peak generation memory", unit="MB", optuna=True)
    generation_error: str | None = column(tag="if_set", optuna=True)
    train_tokens_s: float | None = None  # real (unpadded) tokens trained on per second
    num_params: int | None = column(label="parameters")  # after head pruning
    heads_pruned: int | None = None
    heads_remaining: int | None = None
    train_seconds: float | None = None
    measure_seconds: float | None = None
    measure_wait_s: float | None = None  # waiting for the node's measurement lock
    measure_co_running: int | None = None
    load_avg_before: float | None = None  # 1-minute load average at the start of the measurement
    load_avg_after: float | None = None
    cores: str | None = column(optuna="placement")  # CPU cores the trial was pinned to ('0,1'), None if not pinned
    num_threads: int | None = None
    wall_seconds: float | None = None
    steps: int = 0
    device: str | None = None
    device_name: str | None = None
    precision: str | None = None
    emulated: bool | None = None  # the precision has no native support on this device (allow_emulated)
    low_precision_blocks: int | None = None  # precision 'mixed': blocks the plan (on the trained weights) put in low precision
    estimated_memory_mb: float | None = column(label="estimated memory", unit="MB")
    memory_budget_mb: float | None = None
    memory_method: str | None = None
    shape_buckets: str | None = None  # the static-shape buckets batches were padded to ('16,32,64')
    memory_actions: str | None = None  # what hardware.memory_threshold did ('train: checkpointing, micro_batches=2; ...')
    seq_length: int | None = None
    measure_batch_size: int | None = None
    seed: int | None = None
    task: str | None = None
    notes: str | None = None
    # measure first (sweep scheduler): latency and memory were measured on the untrained model
    # before training; they equal the trained model's (they depend on shapes, kernels and
    # precision, not on weight values), so they are the recorded figures unless re-measured
    cost_measured_first: bool | None = None
    measure_first_seconds: float | None = None
    rung_steps: list[int] = field(default_factory=list)  # training steps at which the scheduler ranked the trial
    rung_accuracy: list[float] = field(default_factory=list)  # the first objective at each of those rungs
    rung_noise: list[float | None] = field(default_factory=list)  # its standard error there (binomial, eval split)
    loss_curve: list[float] = field(default_factory=list)
    # Beside the record, never in it (not dataclass fields): the trained model's files
    # (``RunContext.keep_model``) and the per-unit eval scores (``omninet.scores.UnitScores``).
    model_files = None
    scores = None
    scores_zero_shot = None

    def to_dict(self) -> dict[str, Any]:
        """Flat and JSON-serializable (non-finite floats become None)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        out["loss_curve"] = [float(x) for x in self.loss_curve if math.isfinite(x)]
        out["rung_accuracy"] = [float(x) if math.isfinite(x) else None for x in self.rung_accuracy]
        out["rung_noise"] = [float(x) if x is not None and math.isfinite(x) else None for x in self.rung_noise]
        return out

    @classmethod
    def numeric_fields(cls) -> dict[str, type]:
        """{field: int | float | bool | str} for the scalar fields (the Parquet schema's source)."""
        out: dict[str, type] = {}
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) in (list, dict, tuple):
                continue
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if args[0] in (int, float, bool, str):
                out[name] = args[0]
        return out
