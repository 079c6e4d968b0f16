"""What the dashboard's views read from a results directory, once (:class:`SweepData`), and the
small formatting every view shares: column labels, values, configurations, paired differences."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

__all__ = ["SweepData", "config_label", "diff_text", "finite_rows", "fmt", "label", "non_dominated", "plain", "present",
           "shared_configs", "speedup_text", "ratio_interval"]

# Cost columns always shown against the first objective, even when not searched as objectives.
_COST_VIEWS = (("peak_memory_infer_mb", ("peak_memory_infer_mb", "peak_memory_train_mb")),
               ("latency_p50_ms", ("latency_p50_ms", "latency_p95_ms", "latency_ratio_ref", "latency_p50_norm_ms")))


def label(key: str) -> str:
    """Axis label with units for a record column (its declared label,
    :func:`omninet.sweep.record.labels`) or a ``param.<path>`` column."""
    from omninet.sweep.record import labels

    if key.startswith("param."):
        return key[len("param."):]
    return labels().get(key, key)


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def non_dominated(df: pd.DataFrame, keys: list[str], directions: list[str]) -> set[int]:
    """Trial numbers of ``df`` rows that no other row dominates in ``keys``, by Optuna's own
    Pareto machinery: the rows are added to an in-memory study and read back as
    ``study.best_trials``. Rows must be feasible and have finite values in ``keys``."""
    import optuna

    if df.empty:
        return set()
    with _quiet_optuna():
        study = optuna.create_study(directions=directions)
        study.add_trials([
            optuna.trial.create_trial(values=[float(row[k]) for k in keys],
                                      user_attrs={"number": int(row["trial_number"])})
            for _, row in df.iterrows()
        ])
        return {t.user_attrs["number"] for t in study.best_trials}


def finite_rows(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if df.empty:
        return df
    mask = pd.Series(True, index=df.index)
    for k in keys:
        mask &= pd.to_numeric(df[k], errors="coerce").map(lambda v: v is not None and math.isfinite(v))
    return df[mask]


class SweepData:
    """What the views need from a results directory, read once."""

    def __init__(self, results_dir: Path) -> None:
        from omninet.sweep.results import SweepResult

        self.result = SweepResult.load(results_dir)
        self.config = self.result.config
        self.objectives = [(o.key, o.direction) for o in self.config.objectives]
        self.first, self.first_dir = self.objectives[0]
        self.df = self.result.trials()
        self.param_cols = [f"param.{p.path}" for p in self.config.params if f"param.{p.path}" in self.df.columns]
        self.pools = self.result.pools
        self.simulated = {p: bool(self.df.loc[self.df["pool"] == p, "simulated"].fillna(False).any()) for p in self.pools}
        self.front_source: dict[str, str] = {}
        self.fronts = {p: self._front(p) for p in self.pools}
        self.aggregates = {p: self.result.aggregate(p) for p in self.pools}
        probe = self.result.results_dir / "probe.json"
        self.probes = json.loads(probe.read_text()) if probe.is_file() else {}

    def pool_title(self, pool: str) -> str:
        return f"{pool} (simulated)" if self.simulated[pool] else pool

    def ran(self, pool: str) -> pd.DataFrame:
        """Rows of ``pool`` that finished with every objective measured."""
        df = self.df[(self.df["pool"] == pool) & (self.df["status"] == "ok")]
        return finite_rows(df, [k for k, _ in self.objectives])

    def _front(self, pool: str) -> set[int]:
        try:
            url = self.result.optuna_url
            if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
                raise FileNotFoundError(url)  # opening it would create an empty database
            numbers = {t.number for t in self.result.study(pool).best_trials}
            self.front_source[pool] = "Optuna study.best_trials"
            return numbers
        except Exception as exc:  # storage gone (a copied results dir, a database that is down)
            # Same Optuna machinery over the Parquet rows: the table keeps the feasibility the
            # controller told Optuna, so the result matches the study's own front.
            self.front_source[pool] = f"computed from the Parquet table (Optuna storage unavailable: {type(exc).__name__})"
            ran = self.ran(pool)
            ran = ran[ran["feasible"].astype(bool)]
            return non_dominated(ran, [k for k, _ in self.objectives], [d for _, d in self.objectives])

    def cost_views(self) -> list[tuple[str, str]]:
        """(column, direction) of every cost plotted against the first objective."""
        views = [(k, d) for k, d in self.objectives[1:]]
        for default, family in _COST_VIEWS:
            if not any(k in family for k, _ in views) and default in self.df.columns:
                views.append((default, "minimize"))
        return views

    def params_of(self, row: pd.Series) -> dict[str, Any]:
        return {c[len("param."):]: plain(row[c]) for c in self.param_cols if present(row[c])}


def present(v: Any) -> bool:
    if v is None:
        return False
    try:
        return not pd.isna(v)
    except (TypeError, ValueError):
        return True


def plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def fmt(v: Any) -> str:
    v = plain(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def config_label(params: dict[str, Any]) -> str:
    """Short text for a configuration: the last part of each path and its value."""
    return " ".join(f"{p.rsplit('.', 1)[-1]}={fmt(v)}" for p, v in params.items()) or "(base config)"


def diff_text(d: Any, lo: Any, hi: Any) -> str:
    """'-0.0123 [-0.0150, -0.0097]': a paired difference and its 95% interval."""
    if not present(d):
        return "-"
    if not (present(lo) and present(hi)):
        return f"{float(d):+.4f}"
    return f"{float(d):+.4f} [{float(lo):+.4f}, {float(hi):+.4f}]"


def ratio_interval(row: Any, key: str = "latency_ratio_ref") -> tuple[float, float, float] | None:
    """(ratio, lo, hi) of a row's (or an aggregate's ``_mean``) ratio to the reference; None without one."""
    value = row.get(key) if present(row.get(key)) else row.get(f"{key}_mean")
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    if not (present(value) and present(lo) and present(hi)):
        return None
    return float(value), float(lo), float(hi)


def speedup_text(row: Any) -> str:
    """'1.10x [1.08, 1.12], faster': the reference's latency over this one's (its speed-up) with
    the 95% interval, and the verdict (faster or slower only when the interval excludes 1)."""
    from omninet.sweep.results import speed_verdict

    r = ratio_interval(row)
    if r is None:
        return "-"
    ratio, lo, hi = r
    return f"{1 / ratio:.3f}x [{1 / hi:.3f}, {1 / lo:.3f}], {speed_verdict(lo, hi)}"


def shared_configs(sweep: SweepData) -> pd.DataFrame:
    """Finished trials whose searched parameters are identical on two or more pools; one row
    per (configuration, pool)."""
    ran = pd.concat([sweep.ran(p) for p in sweep.pools]) if sweep.pools else sweep.df.iloc[0:0]
    if ran.empty:
        return ran
    ran = ran.assign(_key=[json.dumps(sweep.params_of(row), sort_keys=True, default=str) for _, row in ran.iterrows()])
    pools_per_key = ran.groupby("_key")["pool"].nunique()
    shared = ran[ran["_key"].isin(pools_per_key[pools_per_key >= 2].index)]
    # one trial per (config, pool): repeats of a config on one pool keep the first
    shared = shared.sort_values(["_key", "pool", "trial_number"]).drop_duplicates(["_key", "pool"])
    return shared.assign(configuration=[config_label(sweep.params_of(row)) for _, row in shared.iterrows()])
