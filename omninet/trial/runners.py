"""What the sweep platform calls for each trial: the :class:`TrialRunner` interface, the
context a worker hands it, and the two runners that ship (OmniNet's own and a plain function).

    class MyRunner(TrialRunner):
        result_fields = frozenset({"accuracy", "latency_p50_ms"})

        def run(self, config, *, memory_budget_mb, context):
            return {"status": "ok", "accuracy": ..., "latency_p50_ms": ...}

    omninet.tune(sweep_yaml, runner=MyRunner())

Every member but ``run`` has a default, so a runner states only what it supports: no memory
estimate, no step budget, no scheduler, a plain-dict config. A sweep's ``trial_fn`` string is
sugar for one of these objects, resolved in one place (:func:`resolve_runner`).
"""

from __future__ import annotations

from typing import Any

from omninet.paths import with_path
from omninet.trial.config import TrialConfig, TrialResult
from omninet.trial.context import RunContext, Stopped
from omninet.trial.cost import cost_features
from omninet.trial.runner import estimate_memory_mb, run_trial

__all__ = ["TrialRunner", "RunContext", "Stopped", "OmniNetRunner", "FunctionRunner", "resolve_runner"]


class TrialRunner:
    """The interface between the sweep platform and a trial. Override ``run``; a runner with a
    typed config also overrides ``parse``, ``to_dict``, ``with_values`` and ``check_path``. The
    defaults describe a plain-dict config that supports nothing optional."""

    name = "custom"
    result_fields: frozenset[str] | None = None  # the numeric keys ``run`` returns; None: not declared
    supports_scheduler = False  # measures first and reports rungs (``RunContext.scheduler``)
    cost_keys: tuple[str, ...] = ()  # results measured before training (the scheduler's cost objectives)
    pairs_latency = False  # times itself against the pool's reference model (``RunContext.reference``)

    # -- the config ---------------------------------------------------------------------------
    def parse(self, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError(f"trial must be a mapping, got {type(data).__name__}")
        return data

    def to_dict(self, config: Any) -> dict[str, Any]:
        return config

    def with_values(self, base: Any, values: dict[str, Any]) -> Any:
        out = base
        for path, value in values.items():
            out = with_path(out, path, value)
        return out if values else dict(base)

    def check_path(self, base: Any, path: str, *, where: str) -> None:
        return None  # a free-form config: any path may be set

    def check_values(self, base: Any, values: dict[str, Any]) -> None:
        self.with_values(base, values)

    def on_cpu(self, config: Any) -> Any:
        """The same trial on this node's CPU (a simulated accelerator pool)."""
        return {**config, "hardware": {**(config.get("hardware") or {}), "device": "cpu"}}

    # -- what the platform may ask before running -----------------------------------------------
    def estimate_mb(self, config: Any) -> float | None:
        """Estimated peak memory (MB); None: no estimate (the run-time limit alone judges)."""
        return None

    def max_steps(self, config: Any) -> int | None:
        """The training step budget (the scheduler's rungs are steps); None: none."""
        return None

    def seq_length(self, config: Any) -> int | None:
        """The length the trial is measured at (kernels clip their search ranges to it); None: unknown."""
        return None

    def unmeasured_keys(self, config: Any) -> dict[str, str]:
        """Results this config will not produce, each with why."""
        return {}

    def cost_features(self, config: Any) -> dict[str, dict[str, float]] | None:
        """The cost model's features of this config; None: the sampled parameters themselves."""
        return None

    # -- the trial -------------------------------------------------------------------------------
    def run(self, config: Any, *, memory_budget_mb: float | None, context: RunContext) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.run")


class OmniNetRunner(TrialRunner):
    """The default runner: typed ``TrialConfig`` in, ``TrialResult`` record out. Resolved once
    per sweep; the controller parses each trial's config once (``with_values``) and the worker
    runs it as is."""

    name = "omninet"
    result_fields = frozenset(TrialResult.numeric_fields())
    supports_scheduler = True
    pairs_latency = True
    cost_keys = ("latency_p50_ms", "latency_p90_ms", "latency_p95_ms", "latency_p99_ms", "latency_mean_ms",
                 "latency_p50_rel", "latency_p50_norm_ms", "latency_ratio_ref", "throughput_ratio_ref",
                 "peak_memory_infer_mb", "peak_memory_train_mb", "peak_rss_infer_mb", "peak_rss_train_mb",
                 "throughput_tokens_s", "num_params")  # what it measures before training
    calibrated_keys = ("latency_p50_rel", "latency_p50_norm_ms", "latency_rel_cv", "latency_calibration_ms",
                       "latency_calibration_ref_ms")
    paired_keys = ("latency_ratio_ref", "latency_ratio_ref_lo", "latency_ratio_ref_hi", "throughput_ratio_ref",
                   "throughput_ratio_ref_lo", "throughput_ratio_ref_hi", "latency_ref_p50_ms")
    # a decoder's generation phase (omninet.trial.measure.generation): the GenerationReading,
    # DepthReading and GenerationPairedReading fields, and the generation memory peaks
    depth_keys = ("decode_ms_1p", "decode_ms_4p", "decode_ms_16p", "decode_depth_1p", "decode_depth_4p",
                  "decode_depth_16p", "decode_ms_per_1k_depth", "decode_depth_cap")
    generation_paired_keys = ("prefill_ratio_ref", "prefill_ratio_ref_lo", "prefill_ratio_ref_hi", "decode_ratio_ref",
                              "decode_ratio_ref_lo", "decode_ratio_ref_hi")
    generation_keys = ("prefill_ms_p50", "prefill_ms_p90", "prefill_cv", "decode_ms_p50", "decode_ms_p90",
                       "decode_ms_p99", "decode_cv", "decode_reps", "decode_tokens_s", "decode_context",
                       "decode_new_tokens", "kv_cache_mb", "kv_cache_formula_mb", "peak_memory_prefill_mb",
                       "peak_memory_generate_mb") + depth_keys + generation_paired_keys

    def parse(self, data):
        return data if isinstance(data, TrialConfig) else TrialConfig.from_dict(data)

    def to_dict(self, config) -> dict[str, Any]:
        return config.to_dict()

    def with_values(self, base, values: dict[str, Any]):
        return base.with_values(values)

    def check_path(self, base, path: str, *, where: str) -> None:
        base.check_path(path, where=where)

    def check_values(self, base, values: dict[str, Any]) -> None:
        base.check_values(values)

    def on_cpu(self, config):
        return config.on_device("cpu")  # no second parse: the controller's is the trial's only one

    def estimate_mb(self, config) -> float | None:
        return estimate_memory_mb(config)

    def max_steps(self, config) -> int | None:
        return config.train.steps

    def seq_length(self, config) -> int | None:
        return config.seq_length

    def unmeasured_keys(self, config) -> dict[str, str]:
        """The calibrated latency without ``measure.calibrate``; the ratios to the reference
        without ``measure.paired``; the generation figures for a model that is not a decoder or
        without ``measure.generation`` (the depth ones without ``measure.generation_depths``, the
        generation peaks without ``measure.memory``)."""
        out = {}
        if not config.measure.calibrate:
            why = "is a calibrated latency, but trial.measure.calibrate is false; set it true or use latency_p50_ms"
            out.update(dict.fromkeys(self.calibrated_keys, why))
        if not config.measure.paired:
            why = "is timed against the pool's reference, but trial.measure.paired is false; set it true"
            out.update(dict.fromkeys(self.paired_keys + self.generation_paired_keys, why))
        if not config.measure.generation_depths:
            out.update(dict.fromkeys(self.depth_keys, "is a decode depth figure, but trial.measure.generation_depths "
                                                      "is false; set it true"))
        if not config.measure.memory:
            out.update(dict.fromkeys(("peak_memory_prefill_mb", "peak_memory_generate_mb"),
                                     "is a memory peak, but trial.measure.memory is false; set it true"))
        arch = config.model_config.arch
        if arch != "decoder" or not config.measure.generation:
            why = (f"is measured for decoders only, and this model is an {arch}" if arch != "decoder" else
                   "is a generation figure, but trial.measure.generation is false; set it true")
            out.update(dict.fromkeys(self.generation_keys, why))
        return out

    def cost_features(self, config) -> dict[str, dict[str, float]]:
        return cost_features(config)

    def run(self, config, *, memory_budget_mb: float | None, context: RunContext) -> dict[str, Any]:
        result = run_trial(config, memory_budget_mb=memory_budget_mb, context=context)
        out = result.to_dict()
        if result.status == "ok" and result.model_files:
            out["_model_files"] = result.model_files  # popped by the controller, never recorded
        if result.scores is not None:
            out["_scores"] = result.scores.to_bytes()  # per-unit eval scores: written next to the record
        if result.scores_zero_shot is not None:
            out["_scores_zero_shot"] = result.scores_zero_shot.to_bytes()
        return out


class FunctionRunner(TrialRunner):
    """A plain ``fn(config_dict, *, memory_budget_mb) -> dict`` trial function (the toy runner
    of the platform's tests, or a user's own) with an optional ``estimate(config_dict)``.
    Its config is a plain dict; ``fn.result_fields`` (if set) declares the keys it returns."""

    name = "function"

    def __init__(self, fn, estimate=None) -> None:
        self.fn, self.estimate = fn, estimate
        fields = getattr(fn, "result_fields", None)
        self.result_fields = frozenset(fields) if fields is not None else None

    def estimate_mb(self, config: dict[str, Any]) -> float | None:
        return None if self.estimate is None else self.estimate(config)

    def run(self, config: dict[str, Any], *, memory_budget_mb: float | None, context: RunContext) -> dict[str, Any]:
        result = self.fn(config, memory_budget_mb=memory_budget_mb)
        return result.to_dict() if hasattr(result, "to_dict") else dict(result)


def resolve_runner(obj, estimate=None) -> TrialRunner:
    """The runner a sweep's ``trial_fn`` names: a :class:`TrialRunner` as it is (a subclass is
    instantiated), ``omninet.trial:run_trial`` as :class:`OmniNetRunner`, any other callable as
    a :class:`FunctionRunner` (with ``estimate``, the sweep's ``estimate_fn``)."""
    if isinstance(obj, TrialRunner):
        return obj
    if isinstance(obj, type) and issubclass(obj, TrialRunner):
        return obj()
    if obj is run_trial:
        return OmniNetRunner()
    if not callable(obj):
        raise ValueError(f"trial_fn: expected a TrialRunner or a function, got {type(obj).__name__}")
    return FunctionRunner(obj, estimate)
