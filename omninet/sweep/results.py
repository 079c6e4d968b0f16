"""The result of a sweep, reopenable from its results directory without Ray.

    result = SweepResult.load("~/omninet-results/quickstart")
    result.trials()                    # one row per finished trial (pandas)
    result.pareto_front("gpu")         # the feasible Pareto front of that pool's study
    config = result.recommend("gpu", max_latency_ms=5.0)   # a trial-config dict
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from omninet.sweep.config import SweepConfig, load_config

__all__ = ["SweepResult", "write_artifacts"]

log = logging.getLogger("omninet.sweep")


class SweepResult:
    """Trials (from the Parquet table) and Pareto fronts (from the Optuna studies) of a sweep."""

    def __init__(self, results_dir: Path, config: SweepConfig) -> None:
        from omninet.sweep.records import ParquetStore

        self.results_dir = Path(results_dir)
        self.config = config
        self._store = ParquetStore(self.results_dir / "trials", config)

    @classmethod
    def load(cls, results_dir: str | os.PathLike) -> "SweepResult":
        results_dir = Path(os.path.expanduser(str(results_dir))).resolve()
        manifest = results_dir / "sweep.yaml"
        if not manifest.is_file():
            raise ValueError(f"results_dir: {results_dir} has no sweep.yaml; is it a sweep's results directory?")
        data = yaml.safe_load(manifest.read_text())
        # Reading results must not need the sweep's trial function (or torch-heavy runner) to
        # import: validate with the dependency-free toy function, then restore the recorded names.
        config = load_config({**data, "trial_fn": "omninet.sweep.testing:toy_trial", "estimate_fn": None})
        config.trial_fn, config.estimate_fn = data.get("trial_fn", config.trial_fn), data.get("estimate_fn")
        return cls(results_dir, config)

    # -- tables -----------------------------------------------------------------------------
    @property
    def pools(self) -> list[str]:
        return [p.name for p in self.config.pools]

    @property
    def objectives(self) -> list[str]:
        return [o.key for o in self.config.objectives]

    def trials(self, pool: str | None = None) -> pd.DataFrame:
        """One row per finished trial: status, objectives, measurements, ``param.<path>``
        columns, ``config_json``; ``pool`` as a column."""
        df = self._store.read().to_pandas()
        if pool is not None:
            self._check_pool(pool)
            df = df[df["pool"] == pool].reset_index(drop=True)
        return df

    def _check_pool(self, pool: str) -> None:
        if pool not in self.pools:
            raise ValueError(f"pool: {pool!r} is not in this sweep; pools are {self.pools}")

    # -- Optuna -----------------------------------------------------------------------------
    @property
    def optuna_url(self) -> str:
        return self.config.storage.optuna_url or f"sqlite:///{self.results_dir / 'optuna.db'}"

    def study(self, pool: str):
        import optuna

        self._check_pool(pool)
        from omninet.sweep.controller import optuna_storage

        return optuna.load_study(study_name=self.config.study_name(pool), storage=optuna_storage(self.optuna_url))

    def pareto_front(self, pool: str) -> pd.DataFrame:
        """The pool's feasible Pareto front (Optuna's ``study.best_trials``, which excludes
        trials violating the pool's constraints), as rows of :meth:`trials`."""
        numbers = [t.number for t in self.study(pool).best_trials]
        df = self.trials(pool)
        first = self.config.objectives[0]
        front = df[df["trial_number"].isin(numbers)]
        return front.sort_values(first.key, ascending=first.direction == "minimize").reset_index(drop=True)

    def recommend(self, pool: str, *, max_latency_ms: float | None = None, max_memory_mb: float | None = None,
                  min_accuracy: float | None = None) -> dict[str, Any]:
        """The best trial config for ``pool`` under the sweep's constraints and these limits
        (on ``latency_p50_ms``, ``peak_memory_infer_mb`` and ``accuracy``): the highest first
        objective, ties broken by the others. Returns the trial-config dict, ready for
        ``omninet.trial.run_trial`` or ``TrialConfig.from_dict``."""
        best = self._recommend_row(pool, max_latency_ms=max_latency_ms, max_memory_mb=max_memory_mb,
                                   min_accuracy=min_accuracy)
        return json.loads(best["config_json"])

    def _recommend_row(self, pool: str, **limits: float | None) -> pd.Series:
        df = self.trials(pool)
        df = df[(df["status"] == "ok") & df["feasible"].astype(bool)]
        for column, key, keep in (("latency_p50_ms", "max_latency_ms", "le"), ("peak_memory_infer_mb", "max_memory_mb", "le"),
                                  ("accuracy", "min_accuracy", "ge")):
            bound = limits.get(key)
            if bound is not None:
                df = df[df[column] <= bound] if keep == "le" else df[df[column] >= bound]
        if df.empty:
            given = ", ".join(f"{k}={v}" for k, v in limits.items() if v is not None) or "the sweep's constraints"
            raise ValueError(f"recommend: no finished feasible trial in pool {pool!r} meets {given}; relax a limit")
        order = [o.key for o in self.config.objectives]
        ascending = [o.direction == "minimize" for o in self.config.objectives]
        return df.sort_values(order, ascending=ascending).iloc[0]

    def load_model(self, pool: str, trial: int | None = None, *, device: str = "cpu"):
        """The trained model of ``trial`` in ``pool`` (default: the recommended trial) as an
        ``omninet.serve.TrainedModel``, from ``models/pool=<pool>/trial-<number:06d>/``."""
        from omninet.serve.artifacts import load_trial_model, model_subdir

        self._check_pool(pool)
        number = int(self._recommend_row(pool)["trial_number"]) if trial is None else int(trial)
        path = self.results_dir / model_subdir(pool, number)
        if not path.is_dir():
            raise ValueError(f"trial {number} of pool {pool!r} kept no model ({path} is missing); the sweep's keep_models "
                             f"policy may be 'pareto' or 'none'")
        return load_trial_model(path, device=device)

    def recommendations(self) -> dict[str, Any]:
        """Per pool: the recommended trial under the sweep's constraints (None if none)."""
        out: dict[str, Any] = {}
        for pool in self.pools:
            try:
                row = self._recommend_row(pool)
            except ValueError as exc:
                out[pool] = {"none": str(exc)}
                continue
            out[pool] = {
                "trial_number": int(row["trial_number"]),
                "simulated": bool(row["simulated"]),
                "objectives": {k: _num(row[k]) for k in self.objectives},
                "config": json.loads(row["config_json"]),
            }
        return out

    @property
    def mlflow_uri(self) -> str:
        return self.config.storage.mlflow_uri or f"sqlite:///{self.results_dir / 'mlflow.db'}"

    def audit(self) -> list[str]:
        """Cross-checks the three records: every finished Optuna trial has exactly one
        Parquet row and one MLflow child run with the same status and objective values.
        Returns the discrepancies (empty when they agree)."""
        from mlflow import MlflowClient
        from optuna.trial import TrialState

        problems: list[str] = []
        rows = self._store.rows()
        for pool in self.pools:
            for t in self.study(pool).get_trials(deepcopy=False):
                key = f"{pool}#{t.number}"
                if t.state in (TrialState.RUNNING, TrialState.WAITING):
                    problems.append(f"{key}: {t.state.name} in Optuna (rerun the sweep to finish it)")
                    continue
                row = rows.pop((pool, t.number), None)
                if row is None:
                    problems.append(f"{key}: in Optuna, not in Parquet")
                elif t.user_attrs.get("status") != row["status"]:
                    problems.append(f"{key}: status {t.user_attrs.get('status')!r} in Optuna, {row['status']!r} in Parquet")
                elif row["status"] == "ok" and not all(
                        math.isclose(v, row[k], rel_tol=1e-9) for v, k in zip(t.values, self.objectives)):
                    problems.append(f"{key}: objective values differ between Optuna and Parquet")
        problems += [f"{pool}#{n}: in Parquet, not in Optuna" for pool, n in rows]
        try:
            client = MlflowClient(tracking_uri=self.mlflow_uri)
            exp = client.get_experiment_by_name(self.config.name)
            runs = [] if exp is None else client.search_runs([exp.experiment_id], "tags.`omninet.role` = 'trial'",
                                                              max_results=50000)
        except Exception as exc:  # the store is down: that is a finding, not a crash
            return problems + [f"MLflow unavailable at {self.mlflow_uri}: {type(exc).__name__}"]
        by_key: dict[str, list] = {}
        for run in runs:
            by_key.setdefault(run.data.tags.get("omninet.trial_key"), []).append(run)
        for (pool, n), row in self._store.rows().items():
            found = by_key.pop(f"{pool}/{n}", [])
            if len(found) != 1:
                problems.append(f"{pool}#{n}: {len(found)} MLflow runs (expected 1)")
                continue
            run = found[0]
            if run.data.tags.get("status") != row["status"]:
                problems.append(f"{pool}#{n}: status {run.data.tags.get('status')!r} in MLflow, {row['status']!r} in Parquet")
            for k in self.objectives:
                if row[k] is not None and not math.isclose(run.data.metrics.get(k, math.nan), row[k], rel_tol=1e-9):
                    problems.append(f"{pool}#{n}: {k} differs between MLflow and Parquet")
        problems += [f"{key}: in MLflow, not in Parquet" for key in by_key]
        return problems

    def __repr__(self) -> str:
        return f"SweepResult({self.config.name!r}, results_dir={str(self.results_dir)!r}, pools={self.pools})"


def _num(v: Any) -> Any:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def write_artifacts(result: SweepResult, out_dir: Path) -> Path:
    """End-of-sweep artifacts: Optuna Pareto-front plots per pool (HTML, plotly.js alongside
    so they open offline) and ``recommended.yaml``."""
    import optuna

    out_dir.mkdir(parents=True, exist_ok=True)
    keys = result.objectives
    for pool in result.pools:
        study = result.study(pool)
        if not study.best_trials:
            log.info("pool %s: no feasible completed trial, no Pareto plot", pool)
            continue
        if 2 <= len(keys) <= 3:
            fig = optuna.visualization.plot_pareto_front(study, target_names=keys)
        else:
            fig = optuna.visualization.plot_optimization_history(study, target=lambda t: t.values[0], target_name=keys[0])
        fig.update_layout(title=f"{result.config.name}: pool {pool}")
        fig.write_html(out_dir / f"pareto_{pool}.html", include_plotlyjs="directory")
    (out_dir / "recommended.yaml").write_text(yaml.safe_dump(result.recommendations(), sort_keys=False))
    return out_dir
