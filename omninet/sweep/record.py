"""What one row of a sweep's trial table holds, declared once.

A row is the trial's :class:`~omninet.trial.TrialResult` (its scalar fields) plus what the
sweep adds, :class:`TrialRecord`: where it ran, how it stands against the pool's constraints,
what the scheduler and the cost model decided, how it pairs with the pool's reference run.
Every store derives its view from the fields of these two classes and their
:class:`~omninet.trial.config.ColumnInfo` metadata (``column(label=..., unit=..., ...)``):

- the Parquet schema: :func:`columns` (arrow types from the annotations);
- MLflow: :func:`metric_names` (every int or float column unless ``metric=False``) and
  :func:`mlflow_tags`;
- Optuna: :func:`user_attrs` and :func:`optuna_state` (the state each status is told as);
- the dashboard: :func:`labels` (label and unit).

So a new result field is one line in ``TrialResult``. ``RECORD_TYPE`` and ``RESULT_TYPE`` are
the classes in use (a test swaps in a subclass with an extra field).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import typing
from dataclasses import MISSING, dataclass
from typing import Any

import pyarrow as pa

from omninet.trial.config import ColumnInfo, TrialResult, column, column_info

__all__ = ["TrialRecord", "Column", "columns", "result_columns", "metric_names", "mlflow_tags", "user_attrs", "labels",
           "optuna_state", "OPTUNA_STATE", "params_key", "build_row"]


@dataclass(kw_only=True)
class TrialRecord:
    """The row's own fields. Where one restates a result field (``status``, ``error``,
    ``device``, ``device_name``) the row holds the sweep's value: a runner's 'ok' without a
    finite objective is recorded as 'error'. Unset fields are None (null in Parquet)."""

    sweep: str
    trial_number: int = column(MISSING, metric=False)
    status: str = column(MISSING, tag="always", optuna=True)
    error: str | None = column(tag="if_set", optuna=True)
    feasible: bool = column(False, tag="always")
    # placement
    simulated: bool = column(False, tag="always", optuna="placement")
    node: str | None = column(tag="always", optuna="placement")
    node_id: str | None = None
    device: str | None = column(tag="always", optuna="placement")
    device_name: str | None = column(tag="always", optuna="placement")
    finished_at: float | None = column(metric=False)
    duration_s: float | None = None
    # measured - limit per pool constraint (PoolConstraints.bounds): <= 0 is feasible, as Optuna's constraints
    constraint_memory: float | None = column(label="memory over the limit", unit="MB")
    constraint_latency: float | None = column(label="latency over the limit", unit="ms")
    constraint_latency_ratio: float | None = column(label="latency / reference over the limit")
    constraint_prefill: float | None = column(label="prefill over the limit", unit="ms")
    constraint_decode: float | None = column(label="decode per token over the limit", unit="ms")
    constraint_kv_cache: float | None = column(label="KV cache over the limit", unit="MB")
    repeat_of: int | None = column(metric=False)  # the trial whose configuration this run repeats with another seed
    config_key: str | None = None  # the searched parameters, canonical JSON: runs of one configuration share it
    # 'measure_first' (measured, then stopped) or 'cost_model' (predicted; never ran)
    screened_by: str | None = column(tag="if_set", optuna=True)
    # the cost model's prediction, made before the trial measured anything, and its held-out error then
    predicted_latency_ms: float | None = column(label="predicted latency p50", unit="ms")
    predicted_memory_infer_mb: float | None = column(label="predicted inference memory", unit="MB")
    predicted_memory_train_mb: float | None = column(label="predicted training memory", unit="MB")
    predicted_latency_ratio_ref: float | None = column(label="predicted latency / reference")
    cost_model_source: str | None = column(tag="if_set")  # 'own' or 'seeded:<pool>'
    cost_model_mape_latency: float | None = column(metric=False)
    cost_model_mape_memory: float | None = column(metric=False)
    cost_split: str | None = column(tag="if_set")  # 'fit' or 'holdout': the cost model's split this trial joined
    # status 'duplicate': the trial of the pool with the same parameters and seed
    duplicate_of: int | None = column(optuna=True)
    seed_key: str | None = None  # config_key plus the training seed: two runs with equal seed_key are one run
    role: str | None = column(tag="if_set", optuna=True)  # 'reference': the run every trial of the pool is paired against
    # the paired difference of accuracy to the pool's reference run on the eval rows both scored
    # (omninet.scores.paired_difference): value, 95% interval, McNemar p, and what it covers
    accuracy_diff_ref: float | None = column(label="accuracy - reference", optuna=True)
    accuracy_diff_ref_lo: float | None = None
    accuracy_diff_ref_hi: float | None = None
    accuracy_diff_ref_p: float | None = None
    accuracy_diff_ref_covers: str | None = column(tag="if_set")
    # a derived trial's zero-shot accuracy (after its passes, before the fine-tune) against the reference
    accuracy_zero_shot_diff_ref: float | None = column(label="zero-shot accuracy - reference")
    accuracy_zero_shot_diff_ref_lo: float | None = None
    accuracy_zero_shot_diff_ref_hi: float | None = None


# The classes the columns are derived from.
RECORD_TYPE: type = TrialRecord
RESULT_TYPE: type = TrialResult

_ARROW = {int: pa.int64(), float: pa.float64(), bool: pa.bool_(), str: pa.string()}


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    info: ColumnInfo
    source: str  # 'record' or 'result'

    @property
    def metric(self) -> bool:
        return self.info.metric is not False and self.type in (pa.int64(), pa.float64())


def _scalar_columns(cls: type, source: str) -> list[Column]:
    """The fields of ``cls`` whose type is int, float, bool or str (or that | None)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if typing.get_origin(tp) in (list, dict, tuple) or args[0] not in _ARROW:
            continue
        out.append(Column(f.name, _ARROW[args[0]], column_info(f), source))
    return out


@functools.cache
def _columns(record_type: type, result_type: type) -> dict[str, Column]:
    own = {c.name: c for c in _scalar_columns(record_type, "record")}
    return {**own, **{c.name: c for c in _scalar_columns(result_type, "result") if c.name not in own}}


def columns() -> dict[str, Column]:
    """The row's typed columns in table order: the record's fields, then the result's scalar
    fields the record does not restate."""
    return _columns(RECORD_TYPE, RESULT_TYPE)


def result_columns() -> dict[str, Column]:
    """The columns that come from the trial's result."""
    return {n: c for n, c in columns().items() if c.source == "result"}


def metric_names() -> set[str]:
    """The columns logged as MLflow metrics."""
    return {n for n, c in columns().items() if c.metric}


def labels() -> dict[str, str]:
    """{column: its label with unit} for the columns that have one (the dashboard's axes)."""
    return {n: c.info.title for n, c in columns().items() if c.info.title}


def mlflow_tags(row: dict[str, Any]) -> dict[str, str]:
    """The row's MLflow tags: ``tag='always'`` columns ('' for None, 'true'/'false' for bools)
    and ``tag='if_set'`` columns that hold a value (at most 5,000 characters)."""
    out = {}
    for name, c in columns().items():
        value = row.get(name)
        if c.info.tag == "always":
            out[name] = str(bool(value)).lower() if c.type == pa.bool_() else ("" if value is None else str(value))
        elif c.info.tag == "if_set" and value:
            out[name] = str(value)[:5000]
    return out


def user_attrs(row: dict[str, Any]) -> dict[str, Any]:
    """Optuna's user attributes of a row: each ``optuna=True`` column that holds a value, under
    its name (strings cut at 1,000 characters); columns that name a group (``'placement'``) as
    one dict, None included."""
    out: dict[str, Any] = {}
    for name, c in columns().items():
        attr, value = c.info.optuna, row.get(name)
        if attr is None:
            continue
        if attr != name:
            out.setdefault(attr, {})[name] = value
        elif value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
            continue
        elif c.type == pa.string():
            out[attr] = str(value)[:1000]
        else:
            out[attr] = {pa.int64(): int, pa.float64(): float, pa.bool_(): bool}[c.type](value)
    return out


# The Optuna state each recorded status is told as; any other status is FAIL, and 'duplicate'
# is told with the state of the trial it duplicates (omninet.sweep.records.tell_trial).
OPTUNA_STATE = {"ok": "COMPLETE", "infeasible": "COMPLETE", "screened": "PRUNED", "pruned": "PRUNED"}


def optuna_state(status: str):
    """The ``optuna.trial.TrialState`` a row of this status is told as."""
    from optuna.trial import TrialState

    return TrialState[OPTUNA_STATE.get(status, "FAIL")]


def params_key(params: dict[str, Any]) -> str:
    """Canonical JSON of a trial's searched parameters (runs of one configuration share it)."""
    return json.dumps(dict(sorted(params.items())), sort_keys=True, default=str)


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def build_row(config, schema: pa.Schema, run, result: dict[str, Any], *, simulated: bool) -> dict[str, Any]:
    """The trial's row: its :class:`TrialRecord` (status judged against the objectives and the
    pool's constraints, placement, the cost model's prediction, repeat and duplicate links),
    the result's columns in ``schema`` (the Parquet file's), the searched parameters, the loss
    curve, the config, and as JSON what of the result no column holds (``result_json``: the rung
    lists, a runner's own keys; each value is stored once). ``run``: the controller's
    :class:`~omninet.sweep.state.Running`; ``simulated``: the pool's, when the result does not say."""
    limits = config.constraints_for(run.pool)
    status = str(result.get("status") or "error")
    error = result.get("error")
    values = {o.key: result.get(o.key) for o in config.objectives}
    if status == "ok":
        bad = [k for k, v in values.items() if not finite(v)]
        needed = [k for k in limits.limits() if not finite(result.get(k))]
        if bad or needed:
            status, error = "error", f"trial result has no finite {', '.join(bad + needed)}"
    excess = limits.excess(result) if status == "ok" else dict.fromkeys(limits.names())
    if status == "infeasible":  # by the memory estimate, or by the runner's own judgement (inf)
        est = result.get("estimated_memory_mb")
        c_mem = float(est) - limits.max_memory_mb if finite(est) and limits.max_memory_mb else math.inf
        excess["memory"] = c_mem if c_mem > 0 else math.inf
    pred = run.prediction or {}
    own = TrialRecord(
        sweep=config.name, trial_number=run.number, status=status,
        error=None if error is None else str(error)[:2000],
        feasible=status == "ok" and all(c is None or c <= 0 for c in excess.values()),
        simulated=bool(result.get("simulated", simulated)),
        node=result.get("node"), node_id=result.get("node_id"),
        device=result.get("device"), device_name=result.get("device_name"),
        finished_at=time.time(), duration_s=time.time() - run.started,
        **{f"constraint_{name}": value for name, value in excess.items()},
        repeat_of=run.repeat_of,
        config_key=params_key({**run.params, **({"role": "reference"} if run.reference else {})}),
        screened_by=result.get("screened_by") or ("measure_first" if status == "screened" else None),
        predicted_latency_ms=pred.get("latency_p50_ms"), predicted_memory_infer_mb=pred.get("peak_memory_infer_mb"),
        predicted_memory_train_mb=pred.get("peak_memory_train_mb"),
        predicted_latency_ratio_ref=pred.get("latency_ratio_ref"), cost_model_source=pred.get("source"),
        cost_model_mape_latency=pred.get("mape", {}).get("latency_p50_ms"),
        cost_model_mape_memory=pred.get("mape", {}).get("peak_memory_infer_mb"),
        duplicate_of=run.duplicate_of, seed_key=run.seed_key,
    )
    row = dataclasses.asdict(own)
    for key in schema.names:
        if key not in row and key in result and not key.startswith("param."):
            row[key] = result[key] if finite(result[key]) or not isinstance(result[key], float) else None
    for key, value in run.params.items():
        row[f"param.{key}"] = value
    extra = {k: v for k, v in result.items() if k not in schema.names and k != "loss_curve"}
    row.update(loss_curve=[float(x) for x in result.get("loss_curve") or []],
               config_json=json.dumps(config.runner.to_dict(run.trial_config), sort_keys=True),
               result_json=json.dumps(extra, sort_keys=True, default=str))
    for f in schema:  # integer columns from runners that report floats
        if f.type == "int64" and isinstance(row.get(f.name), float) and math.isfinite(row[f.name]):
            row[f.name] = int(row[f.name])
    return row
