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

from omninet.sweep.config import PoolConstraints, SweepConfig, load_config
from omninet.trial.runners import TrialRunner

__all__ = ["SweepResult", "write_artifacts", "RATIOS", "speed_verdict", "combine_measurements"]

log = logging.getLogger("omninet.sweep")

# Figures timed side by side with the pool's reference model (``measure.paired``): each has
# ``<key>_lo`` and ``<key>_hi`` (its 95% interval), and the side of 1 that is faster.
RATIOS = {"latency_ratio_ref": "below", "throughput_ratio_ref": "above", "prefill_ratio_ref": "below",
          "decode_ratio_ref": "below"}


def speed_verdict(lo: Any, hi: Any, *, faster: str = "below") -> str | None:
    """'faster' or 'slower' than the reference when the ratio's 95% interval [lo, hi] excludes 1,
    'indistinguishable' when it holds 1 (timing noise could make either side), None without an
    interval. ``faster``: which side of 1 is faster ('below' for latency, 'above' for throughput)."""
    lo, hi = _num(lo), _num(hi)
    if lo is None or hi is None:
        return None
    if lo <= 1.0 <= hi:
        return "indistinguishable"
    below = hi < 1.0
    return "faster" if below == (faster == "below") else "slower"


def _timing(key: str) -> bool:
    """A timed figure: it depends on the configuration and the machine, not on the training
    seed, so repeats of a configuration are repeated measurements of it."""
    return key.startswith(("latency_", "throughput_", "prefill_", "decode_")) or key in RATIOS


def combine_measurements(values, los, his) -> tuple[float, float, float]:
    """(value, lo, hi): runs of one configuration, each timed against the reference with its own
    95% interval, combined as repeated measurements of one quantity (a model's time does not
    depend on its training seed): on the log scale, each run weighted by the inverse square of
    its interval's half-width taken as 1.96 standard errors, the combined interval widened by the
    Birge ratio sqrt(chi2 / (k - 1)) when the runs disagree more than their intervals allow.
    Runs without a finite positive interval are left out; none: NaNs."""
    runs = [(math.log(v), max((math.log(h) - math.log(lo)) / (2 * 1.96), 1e-9))
            for v, lo, h in zip(values, los, his) if all(_num(x) is not None and x > 0 for x in (v, lo, h))]
    if not runs:
        return math.nan, math.nan, math.nan
    if len(runs) == 1:
        v, lo, h = next((v, lo, h) for v, lo, h in zip(values, los, his)
                        if all(_num(x) is not None and x > 0 for x in (v, lo, h)))
        return float(v), float(lo), float(h)
    weights = [1.0 / se**2 for _, se in runs]
    mean = sum(w * x for w, (x, _) in zip(weights, runs)) / sum(weights)
    chi2 = sum(w * (x - mean) ** 2 for w, (x, _) in zip(weights, runs))
    se = math.sqrt(1.0 / sum(weights)) * max(1.0, math.sqrt(chi2 / (len(runs) - 1)))
    return math.exp(mean), math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)


def _never_runs(self, config, *, memory_budget_mb, context):
    raise RuntimeError("a RecordedTrial reads records; it does not run trials (use run_sweep)")


class RecordedTrial(TrialRunner):
    """A runner that never runs: for a sweep config whose rows are written by hand (tests)."""

    name, run = "recorded", _never_runs


class SweepResult:
    """Trials (from the Parquet table) and Pareto fronts (from the Optuna studies) of a sweep."""

    def __init__(self, results_dir: Path, config: SweepConfig) -> None:
        from omninet.sweep.records import ParquetStore, ScoreStore

        self.results_dir = Path(results_dir)
        self.config = config
        self._store = ParquetStore(self.results_dir / "trials", config)
        self._scores = ScoreStore(self.results_dir / "scores")

    @classmethod
    def load(cls, results_dir: str | os.PathLike) -> "SweepResult":
        results_dir = Path(os.path.expanduser(str(results_dir))).resolve()
        manifest = results_dir / "sweep.yaml"
        if not manifest.is_file():
            raise ValueError(f"results_dir: {results_dir} has no sweep.yaml; is it a sweep's results directory?")
        # Parsed only: reading results needs neither the sweep's runner nor its task (the checks
        # against them ran when the sweep started).
        return cls(results_dir, load_config(yaml.safe_load(manifest.read_text()), check=False))

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
        from omninet.sweep.storage import optuna_storage

        return optuna.load_study(study_name=self.config.study_name(pool), storage=optuna_storage(self.optuna_url))

    def pareto_front(self, pool: str) -> pd.DataFrame:
        """The pool's feasible Pareto front (Optuna's ``study.best_trials``, which excludes
        trials violating the pool's constraints), as rows of :meth:`trials`, with
        ``speed_vs_ref``: 'faster' or 'slower' than the pool's reference only where the trial's
        latency ratio interval excludes 1, else 'indistinguishable' (None: not timed against it)."""
        numbers = [t.number for t in self.study(pool).best_trials if "duplicate_of" not in t.user_attrs]
        df = self.trials(pool)
        first = self.config.objectives[0]
        front = df[df["trial_number"].isin(numbers) & (df["status"] != "duplicate")].copy()
        front["speed_vs_ref"] = [speed_verdict(r.get("latency_ratio_ref_lo"), r.get("latency_ratio_ref_hi"))
                                 for _, r in front.iterrows()]
        return front.sort_values(first.key, ascending=first.direction == "minimize").reset_index(drop=True)

    # -- paired comparisons on the shared eval set --------------------------------------------
    def scores(self, pool: str, trial: int, kind: str = "final"):
        """The per-unit eval scores of ``trial`` (``omninet.scores.UnitScores``), or None when it
        kept none (a runner without per-unit scores, or a trial that never evaluated). ``kind``
        'zero_shot': a derived trial's, right after its passes (before the fine-tune)."""
        self._check_pool(pool)
        return self._scores.read(pool, int(trial), kind)

    def reference_trial(self, pool: str) -> int | None:
        """The run every trial of ``pool`` is paired against (``role == 'reference'``: the pool's
        first run of the sweep's first ``enqueue`` point, or the trained base), or None."""
        df = self.trials(pool)
        if "role" not in df:
            return None
        ref = df[(df["role"] == "reference") & (df["status"] == "ok")]
        return int(ref["trial_number"].iloc[0]) if len(ref) else None

    def paired(self, pool: str, a: int, b: int | None = None, *, metric: str = "accuracy", kind: str = "final"):
        """``a - b`` (``b`` default: the pool's reference) on the eval rows both scored: an
        ``omninet.scores.PairedDifference`` (95% paired bootstrap interval; McNemar's exact p for
        0/1 scores; ``covers == 'eval'``). ValueError when either kept no scores."""
        from omninet.scores import paired_difference

        b = self.reference_trial(pool) if b is None else b
        if b is None:
            raise ValueError(f"pool {pool!r} has no reference run; pass b= (another trial number)")
        sa, sb = self.scores(pool, a, kind), self.scores(pool, b)
        missing = [n for n, sc in ((a, sa), (b, sb)) if sc is None]
        if missing:
            raise ValueError(f"trial(s) {missing} of pool {pool!r} kept no per-unit scores; paired comparisons need "
                             "the trial runner's scores (omninet.trial.run_trial keeps them)")
        return paired_difference(sa, sb, metric=metric)

    def paired_config(self, pool: str, runs_a: list[int], runs_b: list[int], *, metric: str = "accuracy"):
        """A configuration's runs against another's (each a list of trial numbers with distinct
        seeds): run i of ``a`` is paired with run i of ``b`` (or b's only run), then the seeds
        combine (``omninet.scores.combine_seeds``: 'eval+seed' with more than one)."""
        from omninet.scores import combine_seeds

        pairs = [(x, runs_b[i] if i < len(runs_b) else runs_b[0]) for i, x in enumerate(runs_a)]
        return combine_seeds([self.paired(pool, x, y, metric=metric) for x, y in pairs if x != y])

    def aggregate(self, pool: str) -> pd.DataFrame:
        """One row per configuration of ``pool`` (its runs share ``config_key``: the original
        trial and its repeats with other seeds), over its feasible ``ok`` runs: ``runs``, the
        original ``trial_number``, per objective ``<key>_mean``, ``<key>_std`` and
        ``<key>_ci95`` (half-width of the 95% t-interval of the mean), and ``<column>_mean`` of
        each column a pool constraint bounds. A configuration run once
        borrows the pooled within-configuration spread of those run several times (``noise``
        says which: 'measured', 'pooled' or 'unknown' when nothing was repeated).

        Timing is not seed noise: a timed objective (``latency_*``, ``throughput_*``) gets no
        t-interval over training seeds (its ``_ci95`` is NaN). The ratios to the reference
        (:data:`RATIOS`) combine their runs as measurements (:func:`combine_measurements`):
        ``<key>_mean``, ``<key>_lo``, ``<key>_hi`` (``_ci95``: half their distance), whether or not
        they are objectives, and ``speed_vs_ref`` (:func:`speed_verdict` of the latency ratio)."""
        df = self.trials(pool)
        reference = self.reference_trial(pool)
        df = df[(df["status"] == "ok") & df["feasible"].astype(bool)].copy()
        if df.empty:
            return pd.DataFrame()
        if "seed_key" in df:  # runs with the same parameters and seed are one run, never independent evidence
            df = df[df["seed_key"].isna() | ~df["seed_key"].duplicated()]
        key = df["config_key"].fillna(df["trial_number"].astype(str)) if "config_key" in df else df["trial_number"].astype(str)
        df["_key"] = key
        rows = []
        for _, group in df.groupby("_key", sort=False):
            first = group[group["repeat_of"].isna()] if "repeat_of" in group else group
            first = (first if not first.empty else group).sort_values("trial_number").iloc[0]
            row = {"trial_number": int(first["trial_number"]), "runs": len(group), "config_json": first["config_json"],
                   "config_key": first["_key"], "trials": sorted(int(n) for n in group["trial_number"])}
            row.update(self._paired_columns(pool, row["trials"], reference))
            for o in self.config.objectives:
                values = pd.to_numeric(group[o.key], errors="coerce").dropna()
                row[f"{o.key}_mean"] = float(values.mean()) if len(values) else math.nan
                row[f"{o.key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
                row[f"{o.key}_n"] = len(values)
            for key in RATIOS:  # repeated measurements of one quantity, each with its interval
                if {key, f"{key}_lo", f"{key}_hi"} <= set(group.columns):
                    value, lo, hi = combine_measurements(*(pd.to_numeric(group[c], errors="coerce").tolist()
                                                           for c in (key, f"{key}_lo", f"{key}_hi")))
                    row.update({f"{key}_mean": value, f"{key}_lo": lo, f"{key}_hi": hi, f"{key}_ci95": (hi - lo) / 2})
            row["speed_vs_ref"] = speed_verdict(row.get("latency_ratio_ref_lo"), row.get("latency_ratio_ref_hi"))
            for column in PoolConstraints.columns():  # what a limit bounds (recommend), an objective or not
                if f"{column}_mean" not in row and column in group:
                    values = pd.to_numeric(group[column], errors="coerce").dropna()
                    row[f"{column}_mean"] = float(values.mean()) if len(values) else math.nan
            rows.append(row)
        out = pd.DataFrame(rows)
        repeated = out["runs"] > 1
        out["noise"] = ["measured" if r else ("pooled" if repeated.any() else "unknown") for r in repeated]
        for o in self.config.objectives:
            if _timing(o.key):  # no t-interval over training seeds on a timed figure (ratios: combined above)
                if o.key not in RATIOS:
                    out[f"{o.key}_ci95"] = math.nan
                del out[f"{o.key}_n"]
                continue
            n, std = out[f"{o.key}_n"], out[f"{o.key}_std"]
            pooled = _pooled_std(std[repeated], n[repeated])
            pooled_dof = int((n[repeated] - 1).clip(lower=0).sum())
            half = []
            for k, sd, own in zip(n, std, repeated):
                sd, dof = (sd, int(k) - 1) if own else (pooled, pooled_dof)
                half.append(_t975(dof) * sd / math.sqrt(max(1, int(k))) if dof >= 1 and math.isfinite(sd) else math.nan)
            out[f"{o.key}_std"] = std.where(repeated, pooled)
            out[f"{o.key}_ci95"] = half
            del out[f"{o.key}_n"]
        return out

    def _paired_columns(self, pool: str, trials: list[int], reference: int | None) -> dict[str, Any]:
        """``accuracy_diff`` to the reference with its 95% interval and what it covers, or NaN
        when there is no reference or no scores."""
        out = {"accuracy_diff": math.nan, "accuracy_diff_lo": math.nan, "accuracy_diff_hi": math.nan,
               "accuracy_diff_p": math.nan, "accuracy_diff_covers": None, "is_reference": reference in trials}
        if reference is None:
            return out
        ref_runs = [reference]
        if reference in trials:  # the reference configuration itself: its other seeds against the reference run
            others = [n for n in trials if n != reference]
            if not others:
                out.update(accuracy_diff=0.0, accuracy_diff_lo=0.0, accuracy_diff_hi=0.0, accuracy_diff_covers="reference")
                return out
            trials = others
        try:
            d = self.paired_config(pool, trials, ref_runs)
        except ValueError:
            return out
        out.update(accuracy_diff=d.diff, accuracy_diff_lo=d.lo, accuracy_diff_hi=d.hi,
                   accuracy_diff_p=math.nan if d.p_value is None else d.p_value, accuracy_diff_covers=d.covers)
        return out

    def recommend(self, pool: str, *, max_latency_ms: float | None = None, max_memory_mb: float | None = None,
                  min_accuracy: float | None = None, max_latency_ratio: float | None = None,
                  faster_than_reference: bool = False) -> dict[str, Any]:
        """The best trial config for ``pool`` under the sweep's constraints and these limits
        (on the means of the columns the pool's constraints bound, ``latency_p50_ms``,
        ``peak_memory_train_mb`` and ``latency_ratio_ref`` (:meth:`PoolConstraints.limits`), and
        of ``accuracy``), ranked by the pessimistic bound of the first objective (the lower end
        of its 95% interval when maximizing, the upper end when minimizing), ties broken by the
        others. ``faster_than_reference``: only configurations whose latency ratio interval lies
        below 1 (ValueError when none does: an interval that holds 1 is not 'faster'). Logs a
        warning when the next configurations cannot be told apart from it (their intervals
        overlap). Returns the trial-config dict, ready for ``omninet.trial.run_trial``."""
        best = self._recommend_row(pool, max_latency_ms=max_latency_ms, max_memory_mb=max_memory_mb,
                                   min_accuracy=min_accuracy, max_latency_ratio=max_latency_ratio,
                                   faster_than_reference=faster_than_reference)
        if best.get("indistinguishable_from"):
            log.warning("recommend(%s): trial #%d is not distinguishable from #%s (%s 95%% intervals of %s overlap); "
                        "a larger eval (train.eval_target_se), longer paired timing or more repeats would separate "
                        "them", pool, int(best["trial_number"]), ", #".join(map(str, best["indistinguishable_from"])),
                        best.get("indistinguishable_by", "paired"), self.config.objectives[0].key)
        if best.get("speed_vs_ref") == "indistinguishable":
            log.info("recommend(%s): trial #%d is not faster than the reference: its latency ratio %.3f [%.3f, %.3f] "
                     "holds 1", pool, int(best["trial_number"]), best["latency_ratio_ref_mean"],
                     best["latency_ratio_ref_lo"], best["latency_ratio_ref_hi"])
        return json.loads(best["config_json"])

    def _recommend_row(self, pool: str, *, faster_than_reference: bool = False, **limits: float | None) -> pd.Series:
        df = self.aggregate(pool)
        upper = PoolConstraints(max_latency_ms=limits.get("max_latency_ms"), max_memory_mb=limits.get("max_memory_mb"),
                                max_latency_ratio=limits.get("max_latency_ratio")).limits()  # the constraints' columns
        for column, bound in upper.items():
            if not df.empty and f"{column}_mean" in df:
                df = df[df[f"{column}_mean"] <= bound]
        if limits.get("min_accuracy") is not None and not df.empty and "accuracy_mean" in df:
            df = df[df["accuracy_mean"] >= limits["min_accuracy"]]
        if faster_than_reference and not df.empty:
            df = df[df["speed_vs_ref"] == "faster"] if "speed_vs_ref" in df else df.iloc[0:0]
            if df.empty:
                raise ValueError(f"recommend: no configuration of pool {pool!r} is faster than the reference: every "
                                 "latency ratio interval holds 1 or lies above it (or none was timed against it); "
                                 "timing noise cannot tell them apart")
        if df.empty:
            given = ", ".join(f"{k}={v}" for k, v in limits.items() if v is not None) or "the sweep's constraints"
            raise ValueError(f"recommend: no finished feasible trial in pool {pool!r} meets {given}; relax a limit")
        first = self.config.objectives[0]
        mean = df[f"{first.key}_mean"]
        if first.key in RATIOS:  # its own interval, asymmetric
            lo, hi = df[f"{first.key}_lo"].fillna(mean), df[f"{first.key}_hi"].fillna(mean)
        else:
            ci = df[f"{first.key}_ci95"].fillna(0.0)
            lo, hi = mean - ci, mean + ci
        df = df.assign(_bound=lo if first.direction == "maximize" else -hi, _lo=lo, _hi=hi)
        order = ["_bound"] + [f"{o.key}_mean" for o in self.config.objectives[1:]]
        ascending = [False] + [o.direction == "minimize" for o in self.config.objectives[1:]]
        df = df.sort_values(order, ascending=ascending)
        best = df.iloc[0].copy()
        same, how = [], None
        spread = bool((df["_hi"] > df["_lo"]).any())
        for _, other in df.iloc[1:].iterrows():
            tie, how = self._same_on(pool, first.key, best, other, spread=spread)
            if tie:
                same.append(int(other["trial_number"]))
        best["indistinguishable_from"] = same
        best["indistinguishable_by"] = how or "paired"
        return best

    def _same_on(self, pool: str, key: str, a: pd.Series, b: pd.Series, *, spread: bool = True) -> tuple[bool, str]:
        """Whether configurations ``a`` and ``b`` (rows of :meth:`aggregate`) cannot be told apart
        on objective ``key``, and how that was decided: 'timing' (a ratio's 95% intervals, each
        timed side by side with the reference, overlap), 'untimed' (a raw time has no interval:
        never called equal), 'paired' (accuracy: their paired difference on the shared eval rows
        holds 0), 'exact' (a count such as a memory peak or parameters: equal within 1%, the
        allocator's rounding), 'intervals' (else, or without per-unit scores: their 95% seed
        intervals overlap). ``spread``: False when no interval of the ranking has any width."""
        def interval(row: pd.Series) -> tuple[float | None, float | None]:
            if _num(row.get(f"{key}_lo")) is not None:
                return _num(row[f"{key}_lo"]), _num(row[f"{key}_hi"])
            mean, half = _num(row.get(f"{key}_mean")), _num(row.get(f"{key}_ci95"))
            return (None, None) if mean is None or half is None else (mean - half, mean + half)

        (lo_a, hi_a), (lo_b, hi_b) = interval(a), interval(b)
        overlap = spread and None not in (lo_a, hi_a, lo_b, hi_b) and lo_b <= hi_a and hi_b >= lo_a
        if _timing(key):
            return (overlap, "timing") if key in RATIOS else (False, "untimed")
        if key == "accuracy":
            try:
                return not self.paired_config(pool, list(b["trials"]), list(a["trials"])).distinguishable, "paired"
            except ValueError:  # no per-unit scores
                return overlap, "intervals"
        if "memory" in key or key.endswith(("_mb", "_bytes", "params")):
            x, y = _num(a.get(f"{key}_mean")), _num(b.get(f"{key}_mean"))
            return x is not None and y is not None and abs(x - y) <= 0.01 * max(abs(x), abs(y)), "exact"
        return overlap, "intervals"

    def front_groups(self, pool: str, front: set[int] | None = None) -> pd.DataFrame:
        """The pool's front configurations (rows of :meth:`aggregate` with a run among ``front``,
        default :meth:`pareto_front`'s trials), each with ``front_group`` and
        ``front_group_trials``: configurations that cannot be told apart on any objective
        (:meth:`_same_on` on every one) share a group, so a front of noise-level differences reads
        as one choice, not several. Groups are built best-first by the first objective; a
        configuration joins a group only when it ties with every member."""
        if front is None:
            front = set(int(n) for n in self.pareto_front(pool)["trial_number"])
        agg = self.aggregate(pool)
        if agg.empty:
            return agg.assign(front_group=pd.Series(dtype="int64"))
        agg = agg[[bool(front & set(ts)) for ts in agg["trials"]]]
        first = self.config.objectives[0]
        agg = agg.sort_values(f"{first.key}_mean", ascending=first.direction == "minimize").reset_index(drop=True)
        groups: list[list[int]] = []
        for i, row in agg.iterrows():
            home = next((g for g in groups if all(all(self._same_on(pool, o.key, agg.loc[j], row)[0]
                                                      for o in self.config.objectives) for j in g)), None)
            if home is None:
                groups.append([i])
            else:
                home.append(i)
        label = {i: n + 1 for n, g in enumerate(groups) for i in g}
        agg["front_group"] = [label[i] for i in agg.index]
        agg["front_group_trials"] = [[int(agg.loc[j, "trial_number"]) for j in groups[label[i] - 1]] for i in agg.index]
        return agg

    def model_path(self, pool: str, trial: int | None = None) -> Path:
        """The folder of the trained model of ``trial`` in ``pool`` (default: the recommended
        trial), ``models/pool=<pool>/trial-<number:06d>/``. ValueError (one line) when the pool
        is not in this sweep, no trial is recommended, or the trial kept no model."""
        from omninet.artifacts import model_subdir

        self._check_pool(pool)
        number = int(self._recommend_row(pool)["trial_number"]) if trial is None else int(trial)
        path = self.results_dir / model_subdir(pool, number)
        if not path.is_dir():
            raise ValueError(f"trial {number} of pool {pool!r} kept no model ({path} is missing); the sweep's keep_models "
                             f"policy may be 'pareto' or 'none'")
        return path

    def load_model(self, pool: str, trial: int | None = None, *, device: str = "cpu"):
        """The trained model of ``trial`` in ``pool`` (default: the recommended trial) as an
        ``omninet.artifacts.TrainedModel``, from :meth:`model_path`."""
        from omninet.artifacts import load_trial_model

        return load_trial_model(self.model_path(pool, trial), device=device)

    def recommendations(self) -> dict[str, Any]:
        """Per pool: the recommended trial under the sweep's constraints (None if none)."""
        out: dict[str, Any] = {}
        for pool in self.pools:
            try:
                row = self._recommend_row(pool)
            except ValueError as exc:
                out[pool] = {"none": str(exc)}
                continue
            trials = self.trials(pool)
            simulated = bool(trials.loc[trials["trial_number"] == row["trial_number"], "simulated"].fillna(False).any())
            out[pool] = {
                "trial_number": int(row["trial_number"]),
                "runs": int(row["runs"]),
                "simulated": simulated,
                "objectives": {k: _num(row[f"{k}_mean"]) for k in self.objectives},
                "ci95": {k: _num(row[f"{k}_ci95"]) for k in self.objectives},
                "noise": row["noise"],
                "indistinguishable_from": list(row["indistinguishable_from"]),
                "accuracy_diff_to_reference": {k: _num(row.get(f"accuracy_diff{s}")) for k, s in
                                               (("diff", ""), ("lo", "_lo"), ("hi", "_hi"), ("p", "_p"))}
                if "accuracy_diff" in row else None,
                # timed side by side with the reference: 'faster' only when the interval lies below 1
                "latency_ratio_to_reference": {"ratio": _num(row["latency_ratio_ref_mean"]),
                                               "lo": _num(row["latency_ratio_ref_lo"]),
                                               "hi": _num(row["latency_ratio_ref_hi"]), "verdict": row["speed_vs_ref"]}
                if _num(row.get("latency_ratio_ref_mean")) is not None else None,
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

        from omninet.sweep.record import optuna_state

        problems: list[str] = []
        rows = self._store.rows()
        for pool in self.pools:
            for t in self.study(pool).get_trials(deepcopy=False):
                key = f"{pool}#{t.number}"
                if t.state in (TrialState.RUNNING, TrialState.WAITING):
                    problems.append(f"{key}: {t.state.name} in Optuna (rerun the sweep to finish it)")
                    continue
                row = rows.pop((pool, t.number), None)
                expected = optuna_state(row["status"]).name if row is not None else None
                if row is not None and row["status"] == "duplicate":
                    original = self._store.row(pool, int(row["duplicate_of"]))
                    expected = optuna_state(original["status"]).name if original else "FAIL"
                if row is None:
                    problems.append(f"{key}: in Optuna, not in Parquet")
                elif t.state.name != expected:
                    problems.append(f"{key}: {t.state.name} in Optuna for a {row['status']!r} trial (expected {expected})")
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

    def cost_model(self, pool: str) -> dict[str, Any]:
        """The pool's cost-model figures: ``validation`` (the final model, fitted on the fit split,
        on the held-out split: n, MAPE, shares within +-10% / +-15% per target; written by the
        controller to ``cost_model.json``), ``online`` (the same figures for the predictions each
        held-out trial got before it was measured, from the Parquet table) and ``screened``
        (trials screened on a prediction, never run). Empty without a cost model."""
        self._check_pool(pool)
        path = self.results_dir / "cost_model.json"
        saved = json.loads(path.read_text()).get(pool, {}) if path.is_file() else {}
        df = self.trials(pool)
        if "cost_split" not in df or df["cost_split"].isna().all():
            return dict(saved)
        from omninet.sweep.costmodel import measured_value

        online = {}
        held = df[df["cost_split"] == "holdout"]
        for target, column in (("latency_p50_ms", "predicted_latency_ms"), ("peak_memory_infer_mb", "predicted_memory_infer_mb"),
                               ("peak_memory_train_mb", "predicted_memory_train_mb"),
                               ("latency_ratio_ref", "predicted_latency_ratio_ref")):
            measured = held.apply(lambda row: measured_value(row, target), axis=1) if len(held) else pd.Series(dtype=float)
            if column not in held:  # a record from before this target
                continue
            pairs = pd.DataFrame({target: pd.to_numeric(measured, errors="coerce"),
                                  column: pd.to_numeric(held[column], errors="coerce")}).dropna()
            pairs = pairs[pairs[target] > 0]
            if len(pairs):
                err = ((pairs[column] - pairs[target]).abs() / pairs[target])
                online[target] = {"n": int(len(err)), "mape": float(err.mean()), "within_10": float((err <= 0.10).mean()),
                                  "within_15": float((err <= 0.15).mean())}
        return {**saved, "online": online, "screened": int((df["screened_by"] == "cost_model").sum())}

    def __repr__(self) -> str:
        return f"SweepResult({self.config.name!r}, results_dir={str(self.results_dir)!r}, pools={self.pools})"


# 0.975 quantiles of Student's t for 1..30 degrees of freedom (then the normal's 1.96)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def _t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def _pooled_std(stds: pd.Series, ns: pd.Series) -> float:
    """The within-configuration standard deviation pooled over repeated configurations."""
    dof = (ns - 1).clip(lower=0)
    ok = stds.notna() & (dof > 0)
    if not ok.any():
        return math.nan
    return math.sqrt(float(((stds[ok] ** 2) * dof[ok]).sum() / dof[ok].sum()))


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
