"""The trade-off dashboard of a sweep: one self-contained HTML file (Plotly, plotly.js inline).

    from omninet.sweep.dashboard import build_dashboard
    build_dashboard("~/omninet-results/quickstart")     # -> <results>/artifacts/dashboard.html
    omninet dashboard ~/omninet-results/quickstart      # the same from the shell

Built from a sweep's results directory (``sweep.yaml``, the Parquet trial table and the
Optuna studies, read through :class:`omninet.sweep.SweepResult`). Views, per pool:

1. Pareto fronts: the first objective (accuracy) against each cost (peak memory, latency p50).
   The non-dominated set is the pool study's own ``study.best_trials`` (Optuna, all
   objectives, constraint-aware); the front *within each 2-D view* is drawn as a line through
   the points Optuna finds non-dominated in those two objectives. Dominated trials are grey,
   trials that ran but violate the pool's constraints are red crosses, trials that never
   produced values (failed, crashed, infeasible by estimate) are listed in a table.
2. Parallel coordinates: searched parameters against the objectives.
3. Pools side by side: trials with identical searched parameters run on several pools.
4. Recommended configurations under the sweep's constraints (``SweepResult.recommendations``).

Pools whose accelerator was simulated on CPU are labelled "simulated" everywhere.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

__all__ = ["build_dashboard", "dashboard_main", "DEFAULT_NAME"]

DEFAULT_NAME = "dashboard.html"
# Cost columns always shown against the first objective, even when not searched as objectives.
_COST_VIEWS = (("peak_memory_infer_mb", ("peak_memory_infer_mb", "peak_memory_train_mb")),
               ("latency_p50_ms", ("latency_p50_ms", "latency_p95_ms")))
_POOL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_GREY, _RED = "#b8b8b8", "#d62728"


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


def _finite_rows(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if df.empty:
        return df
    mask = pd.Series(True, index=df.index)
    for k in keys:
        mask &= pd.to_numeric(df[k], errors="coerce").map(lambda v: v is not None and math.isfinite(v))
    return df[mask]


class _Sweep:
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
        return _finite_rows(df, [k for k, _ in self.objectives])

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
        return {c[len("param."):]: _plain(row[c]) for c in self.param_cols if _present(row[c])}


def _present(v: Any) -> bool:
    if v is None:
        return False
    try:
        return not pd.isna(v)
    except (TypeError, ValueError):
        return True


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _fmt(v: Any) -> str:
    v = _plain(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def config_label(params: dict[str, Any]) -> str:
    """Short text for a configuration: the last part of each path and its value."""
    return " ".join(f"{p.rsplit('.', 1)[-1]}={_fmt(v)}" for p, v in params.items()) or "(base config)"


def _hover(sweep: _Sweep, row: pd.Series) -> str:
    lines = [f"<b>{html.escape(sweep.pool_title(row['pool']))} #{int(row['trial_number'])}</b>"]
    lines += [f"{html.escape(p)} = {html.escape(_fmt(v))}" for p, v in sweep.params_of(row).items()]
    for key, _ in sweep.objectives + sweep.cost_views():
        if key in row and _present(row[key]):
            lines.append(f"{html.escape(label(key))}: {_fmt(row[key])}")
    if _present(row.get("accuracy_diff_ref")):
        lines.append(f"vs reference: {_diff(row['accuracy_diff_ref'], row.get('accuracy_diff_ref_lo'), row.get('accuracy_diff_ref_hi'))}")
    elif row.get("role") == "reference":
        lines.append("the pool's reference run")
    if _present(row.get("device_name")):
        lines.append(f"device: {html.escape(str(row['device_name']))}")
    return "<br>".join(dict.fromkeys(lines))


def _diff(d: Any, lo: Any, hi: Any) -> str:
    """'-0.0123 [-0.0150, -0.0097]': a paired difference and its 95% interval."""
    if not _present(d):
        return "-"
    if not (_present(lo) and _present(hi)):
        return f"{float(d):+.4f}"
    return f"{float(d):+.4f} [{float(lo):+.4f}, {float(hi):+.4f}]"


# -- views ------------------------------------------------------------------------------------
def pareto_figure(sweep: _Sweep):
    """Rows: pools; columns: first objective vs each cost."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    views = sweep.cost_views()
    titles = [f"{sweep.pool_title(p)}: {label(sweep.first)} vs {label(k)}" for p in sweep.pools for k, _ in views]
    fig = make_subplots(rows=len(sweep.pools), cols=len(views), subplot_titles=titles,
                        vertical_spacing=min(0.12, 0.5 / len(sweep.pools)), horizontal_spacing=0.08)
    shown: set[str] = set()

    def add(name: str, group: str, row: int, col: int, **kw) -> None:
        fig.add_trace(go.Scatter(name=name, legendgroup=group, showlegend=group not in shown, **kw), row=row, col=col)
        shown.add(group)

    for r, pool in enumerate(sweep.pools, start=1):
        color = _POOL_COLORS[(r - 1) % len(_POOL_COLORS)]
        ran = sweep.ran(pool)
        feasible = ran[ran["feasible"].astype(bool)]
        violating = ran[~ran["feasible"].astype(bool)]
        on_front = feasible["trial_number"].isin(sweep.fronts[pool])
        for c, (key, direction) in enumerate(views, start=1):
            mk = dict(row=r, col=c, mode="markers", hovertemplate="%{text}<extra></extra>")
            for part, name, group, marker in (
                (feasible[~on_front], "dominated", "dominated", dict(color=_GREY, size=8)),
                (violating, "violates constraints", "violates", dict(color=_RED, size=9, symbol="x")),
                (feasible[on_front], f"Pareto front: {sweep.pool_title(pool)}", f"front-{pool}",
                 dict(color=color, size=11, line=dict(color="black", width=1))),
            ):
                part = _finite_rows(part, [key])
                if not part.empty:
                    add(name, group, x=part[key], y=part[sweep.first], marker=marker,
                        text=[_hover(sweep, row) for _, row in part.iterrows()], **mk)
            # the front within this 2-D view, as a line (Optuna's non-domination over these two objectives)
            plane = _finite_rows(feasible, [key])
            front2d = plane[plane["trial_number"].isin(
                non_dominated(plane, [sweep.first, key], [sweep.first_dir, direction]))].sort_values(key)
            if len(front2d) >= 1:
                add("front in this view", "front2d", row=r, col=c, x=front2d[key], y=front2d[sweep.first],
                    mode="lines", line=dict(color=color, dash="dot", shape="hv" if direction == "minimize" else "vh"),
                    hoverinfo="skip")
            agg = sweep.aggregates[pool]
            repeated = agg[agg["runs"] > 1] if not agg.empty else agg
            if not repeated.empty and f"{key}_mean" in repeated:
                add("mean ± 95% interval (repeated seeds)", "noise", row=r, col=c, mode="markers",
                    x=repeated[f"{key}_mean"], y=repeated[f"{sweep.first}_mean"],
                    error_x=dict(type="data", array=repeated[f"{key}_ci95"].fillna(0).tolist(), visible=True),
                    error_y=dict(type="data", array=repeated[f"{sweep.first}_ci95"].fillna(0).tolist(), visible=True),
                    marker=dict(color="black", size=6, symbol="diamond"),
                    text=[f"#{n}: {int(k)} runs" for n, k in zip(repeated["trial_number"], repeated["runs"])],
                    hovertemplate="%{text}<extra></extra>")
            if ran.empty:
                fig.add_annotation(text="no finished trials", showarrow=False, row=r, col=c,
                                   x=0.5, y=0.5, xref="x domain", yref="y domain")
            fig.update_xaxes(title_text=label(key), row=r, col=c)
            fig.update_yaxes(title_text=label(sweep.first), row=r, col=c)
    fig.update_layout(height=max(420, 380 * len(sweep.pools)), template="plotly_white",
                      legend=dict(orientation="h", y=-0.08 if len(sweep.pools) > 1 else -0.2),
                      margin=dict(t=60, l=60, r=30, b=60))
    return fig


def _dimension(series: pd.Series, name: str) -> dict[str, Any]:
    """A parallel-coordinates axis; categorical and conditional (absent) values get ticks."""
    values = [_plain(v) if _present(v) else None for v in series]
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numeric) == sum(v is not None for v in values) and numeric:
        if len(numeric) == len(values):
            return dict(label=name, values=values)
        # conditional parameter: absent where it does not apply; drawn below the range as "n/a"
        lo, hi = min(numeric), max(numeric)
        na = lo - 0.15 * ((hi - lo) or abs(lo) or 1.0)
        ticks = [na, lo, hi] if hi != lo else [na, lo]
        return dict(label=name, values=[na if v is None else v for v in values], range=[na, hi],
                    tickvals=ticks, ticktext=["n/a"] + [_fmt(t) for t in ticks[1:]])
    cats = sorted({"n/a" if v is None else str(v) for v in values})
    index = {c: i for i, c in enumerate(cats)}
    return dict(label=name, values=[index["n/a" if v is None else str(v)] for v in values],
                tickvals=list(range(len(cats))), ticktext=cats, range=[-0.5, len(cats) - 0.5])


def parallel_figure(sweep: _Sweep, pool: str):
    import plotly.graph_objects as go

    ran = sweep.ran(pool)
    if ran.empty:
        return None
    dims = [_dimension(ran[c], label(c)) for c in sweep.param_cols if ran[c].map(_present).any()]
    dims.append(_dimension(ran["feasible"].map(lambda v: "yes" if v else "no"), "feasible"))
    dims += [dict(label=label(k), values=ran[k].astype(float).tolist()) for k, _ in sweep.objectives]
    reverse = sweep.first_dir == "minimize"
    fig = go.Figure(go.Parcoords(
        dimensions=dims,
        line=dict(color=ran[sweep.first].astype(float), colorscale="Viridis", reversescale=reverse,
                  showscale=True, colorbar=dict(title=label(sweep.first)))))
    fig.update_layout(title=f"{sweep.pool_title(pool)}: parameters vs objectives ({len(ran)} trials)",
                      height=460, margin=dict(t=90, l=70, r=70, b=40), template="plotly_white")
    return fig


def shared_configs(sweep: _Sweep) -> pd.DataFrame:
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


def pools_figure(sweep: _Sweep, shared: pd.DataFrame):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    keys = [k for k, _ in sweep.objectives]
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[label(k) for k in keys], horizontal_spacing=0.07)
    for i, pool in enumerate(sweep.pools):
        part = shared[shared["pool"] == pool]
        if part.empty:
            continue
        for c, key in enumerate(keys, start=1):
            fig.add_trace(go.Bar(name=sweep.pool_title(pool), legendgroup=pool, showlegend=c == 1,
                                 x=part["configuration"], y=part[key].astype(float),
                                 marker_color=_POOL_COLORS[i % len(_POOL_COLORS)],
                                 hovertemplate=f"{html.escape(sweep.pool_title(pool))}<br>%{{x}}<br>"
                                               f"{html.escape(label(key))}: %{{y:.4g}}<extra></extra>"),
                          row=1, col=c)
    fig.update_layout(barmode="group", height=460, template="plotly_white", margin=dict(t=60, b=140))
    fig.update_xaxes(tickangle=-30)
    return fig


# -- tables -----------------------------------------------------------------------------------
def recommendations_table(sweep: _Sweep) -> pd.DataFrame:
    rows = []
    recs = sweep.result.recommendations()
    for pool in sweep.pools:
        limits = sweep.config.constraints_for(pool)
        limit_text = ", ".join(f"{label(column)} <= {value:g}" for column, value in limits.limits().items()) or "none"
        rec = recs.get(pool) or {}
        row: dict[str, Any] = {"pool": sweep.pool_title(pool), "constraints": limit_text}
        if "trial_number" not in rec:
            row["trial"] = "none"
            row["configuration"] = rec.get("none", "no finished feasible trial")
        else:
            number = int(rec["trial_number"])
            trial = sweep.df[(sweep.df["pool"] == pool) & (sweep.df["trial_number"] == number)].iloc[0]
            row["trial"] = f"#{number}"
            row["configuration"] = config_label(sweep.params_of(trial))
            row["runs"] = rec.get("runs", 1)
            row.update({label(k): f"{_fmt(v)} ± {_fmt(rec['ci95'][k])}" if _present(rec.get("ci95", {}).get(k))
                        else _fmt(v) for k, v in rec["objectives"].items()})
            others = rec.get("indistinguishable_from") or []
            row["indistinguishable from"] = ", ".join(f"#{n}" for n in others) or "-"
        rows.append(row)
    return pd.DataFrame(rows)


def paired_table(sweep: _Sweep) -> pd.DataFrame:
    """Each finished configuration's accuracy as a paired difference to its pool's reference run
    on the same eval rows (``SweepResult.aggregate``: a 95% paired-bootstrap interval covering the
    eval draw, or a t-interval over seeds covering training too), its zero-shot difference when
    it was derived from a base, and whether it is on the pool's front."""
    rows = []
    first = sweep.first
    for pool in sweep.pools:
        agg = sweep.aggregates[pool]
        if agg.empty or "accuracy_diff" not in agg:
            continue
        ref = sweep.result.reference_trial(pool)
        agg = agg.sort_values(f"{first}_mean", ascending=sweep.first_dir == "minimize")
        for _, a in agg.iterrows():
            number = int(a["trial_number"])
            trial = sweep.df[(sweep.df["pool"] == pool) & (sweep.df["trial_number"] == number)].iloc[0]
            on_front = any(n in sweep.fronts[pool] for n in a["trials"])
            lo, hi = a.get("accuracy_diff_lo"), a.get("accuracy_diff_hi")
            verdict = "reference" if number == ref else (
                "differs" if _present(lo) and _present(hi) and (lo > 0 or hi < 0) else
                "indistinguishable" if _present(lo) else "-")
            row = {"pool": sweep.pool_title(pool), "trial": f"#{number}", "front": "yes" if on_front else "",
                   "configuration": config_label(sweep.params_of(trial)), "runs": int(a["runs"]),
                   "accuracy": f"{_fmt(a[f'{first}_mean'])} (se {_fmt(trial.get('accuracy_se'))})",
                   "vs reference [95%]": "0 (reference)" if number == ref else _diff(a["accuracy_diff"], lo, hi),
                   "interval covers": a.get("accuracy_diff_covers") or "-", "verdict": verdict}
            if "accuracy_zero_shot_diff_ref" in trial and _present(trial.get("accuracy_zero_shot_diff_ref")):
                row["zero-shot vs reference [95%]"] = _diff(trial["accuracy_zero_shot_diff_ref"],
                                                            trial.get("accuracy_zero_shot_diff_ref_lo"),
                                                            trial.get("accuracy_zero_shot_diff_ref_hi"))
            for key, _ in sweep.objectives[1:]:
                row[label(key)] = _fmt(a.get(f"{key}_mean"))
            rows.append(row)
    return pd.DataFrame(rows)


def noise_table(sweep: _Sweep) -> pd.DataFrame:
    """Configurations run with several seeds: mean ± 95% interval of each objective."""
    rows = []
    for pool in sweep.pools:
        agg = sweep.aggregates[pool]
        if agg.empty:
            continue
        for _, a in agg[agg["runs"] > 1].iterrows():
            trial = sweep.df[(sweep.df["pool"] == pool) & (sweep.df["trial_number"] == a["trial_number"])].iloc[0]
            row = {"pool": sweep.pool_title(pool), "trial": f"#{int(a['trial_number'])}", "runs": int(a["runs"]),
                   "configuration": config_label(sweep.params_of(trial))}
            row.update({label(k): f"{_fmt(a[f'{k}_mean'])} ± {_fmt(a[f'{k}_ci95'])}" for k, _ in sweep.objectives})
            rows.append(row)
    return pd.DataFrame(rows)


_KERNEL = "param.model.attention.kernel"


def baseline_table(sweep: _Sweep) -> pd.DataFrame:
    """What the knobs buy: per pool, the best (lowest latency, then memory) run of each
    attention kernel against the enqueued baseline configuration (the first ``enqueue`` entry,
    e.g. dense SDPA, no pruning, fp32), as ratios measured at the same deployment shape."""
    base = sweep.config.enqueue[0] if sweep.config.enqueue else None
    rows = []
    for pool in sweep.pools:
        ran = sweep.ran(pool)
        if base is None or ran.empty:
            continue
        match = pd.Series(True, index=ran.index)
        for path, value in base.items():
            col = f"param.{path}"
            if col in ran:
                match &= ran[col].map(lambda v, value=value: _present(v) and _plain(v) == value)
        baseline = ran[match].sort_values("trial_number")
        if baseline.empty:
            continue
        b = baseline.iloc[0]
        groups = ran.groupby(_KERNEL) if _KERNEL in ran else [("(all)", ran)]
        for kernel, group in groups:
            best = group.sort_values(["latency_p50_ms", "peak_memory_infer_mb"]).iloc[0]
            rows.append({"pool": sweep.pool_title(pool), "kernel": kernel, "trial": f"#{int(best['trial_number'])}",
                         "configuration": config_label(sweep.params_of(best)),
                         "latency p50 vs baseline": f"{best['latency_p50_ms'] / b['latency_p50_ms']:.2f}x",
                         "inference memory vs baseline": f"{best['peak_memory_infer_mb'] / b['peak_memory_infer_mb']:.2f}x",
                         "accuracy - baseline": f"{best['accuracy'] - b['accuracy']:+.3f}" if "accuracy" in best else "",
                         "baseline": f"#{int(b['trial_number'])}", "shape (B x N)":
                         f"{_fmt(best.get('measure_batch_size'))} x {_fmt(best.get('seq_length'))}"})
    return pd.DataFrame(rows)


def conditions_table(sweep: _Sweep) -> pd.DataFrame:
    """How each pool's numbers were measured: the search space its hardware could run,
    latency spread (raw, and against the reference workload timed beside every call), the
    machine's speed during the measurements (the reference's time) against the probe's, trials
    re-measured as noisy, other trials active during measurements
    (0 under isolation), the load average, and the memory counters' agreement between a first
    and a later call."""
    rows = []
    for pool in sweep.pools:
        ran = sweep.ran(pool)
        probe = sweep.probes.get(pool, {})
        caps = probe.get("capabilities") or {}
        row = {"pool": sweep.pool_title(pool), "device": caps.get("device_name") or "",
               "native precisions": ", ".join(caps.get("native_precisions") or []),
               "search space changes": "; ".join(probe.get("search_space_notes") or []) or "none"}
        if not ran.empty:
            def col(name):
                return pd.to_numeric(ran[name], errors="coerce") if name in ran else pd.Series(dtype=float)

            row["latency cv (median)"] = _fmt(col("latency_cv").median())
            # calibrated: the per-call ratio to the reference workload, the machine's drift taken out
            row["latency / reference cv (median)"] = _fmt(col("latency_rel_cv").median())
            cal = col("latency_calibration_ms")
            row["machine speed during measures (reference ms, min-max)"] = (
                f"{_fmt(cal.min())}-{_fmt(cal.max())} (probe {_fmt(probe.get('calibration_ms'))})" if cal.notna().any() else "")
            row["noisy"] = int(ran["latency_noisy"].fillna(False).astype(bool).sum()) if "latency_noisy" in ran else ""
            row["co-running during measure (max)"] = _fmt(col("measure_co_running").max())
            row["load avg"] = f"{_fmt(col('load_avg_before').min())}-{_fmt(col('load_avg_after').max())}"
            drift = (col("peak_memory_infer_later_mb") / col("peak_memory_infer_mb") - 1).abs()
            row["memory 1st vs later call (max diff)"] = f"{100 * drift.max():.1f}%" if drift.notna().any() else ""
        rows.append(row)
    return pd.DataFrame(rows)


def unfinished_table(sweep: _Sweep) -> pd.DataFrame:
    df = sweep.df[sweep.df["status"] != "ok"]
    return pd.DataFrame({
        "pool": [sweep.pool_title(p) for p in df["pool"]],
        "trial": [f"#{int(n)}" for n in df["trial_number"]],
        "status": df["status"].tolist(),
        "configuration": [config_label(sweep.params_of(row)) for _, row in df.iterrows()],
        "reason": [str(e).splitlines()[0][:300] if _present(e) else "" for e in df["error"]],
        label("predicted_latency_ms"): [_fmt(v) if _present(v) else "" for v in df.get("predicted_latency_ms", [None] * len(df))],
    })


def cost_model_table(sweep: _Sweep) -> pd.DataFrame:
    """Per pool and predicted figure: the cost model's error on held-out trials (never fitted),
    for the final model and for the predictions each held-out trial got before it ran."""
    rows = []
    for pool in sweep.pools:
        report = sweep.result.cost_model(pool)
        for kind in ("validation", "online"):
            for target, v in (report.get(kind) or {}).items():
                rows.append({"pool": sweep.pool_title(pool), "figure": label(target),
                             "model": "final (fit split)" if kind == "validation" else "as predicted before running",
                             "held-out trials": v["n"], "MAPE": f"{v['mape']:.1%}", "within ±10%": f"{v['within_10']:.0%}",
                             "within ±15%": f"{v['within_15']:.0%}", "screened on a prediction": report.get("screened", 0)})
    return pd.DataFrame(rows)


def serving_table(sweep: _Sweep) -> tuple[str, pd.DataFrame]:
    """The serving benchmark (``<results_dir>/serving.json``, from ``benchmarks/serving.py``):
    a headline line and one row per open-loop level and mode; empty when it never ran."""
    path = sweep.result.results_dir / "serving.json"
    if not path.is_file():
        return "", pd.DataFrame()
    report = json.loads(path.read_text())
    h, model = report.get("headline", {}), report.get("model", {})
    head = (f"Model: pool {model.get('pool')}, trial {model.get('trial')}. Highest rate with p99 < "
            f"{h.get('target_p99_ms')} ms: batch-1 {h.get('b1_throughput_rps')} req/s, dynamic batching "
            f"{h.get('dyn_throughput_rps')} req/s (x{h.get('speedup')}). CPU: {report.get('conditions', {}).get('cpu_model')}, "
            f"load average {report.get('conditions', {}).get('load_average_before')}.")
    bounds = h.get("bounds") or {}
    if bounds.get("forward_bound_speedup") is not None:
        head += (f" Most batching could give for these request lengths: x{bounds['forward_bound_speedup']} with a free "
                 f"HTTP path, about x{bounds.get('amdahl_bound_speedup')} with this stack's cost per request.")
    rows = []
    for mode, loops in report.get("modes", {}).items():
        for lv in loops.get("open_loop", []):
            sizes = {int(k): v for k, v in lv.get("batch_sizes", {}).items()}
            mean_batch = sum(k * v for k, v in sizes.items()) / max(sum(sizes.values()), 1)
            rows.append({"mode": {"b1": "batch-1", "dyn": "dynamic"}.get(mode, mode), "rate req/s": lv["rate_rps"],
                         "throughput req/s": lv["throughput_rps"], "p50 ms": lv["p50_ms"], "p95 ms": lv["p95_ms"],
                         "p99 ms": lv["p99_ms"], "mean batch": round(mean_batch, 2),
                         "errors": sum(lv.get("errors", {}).values())})
    return head, pd.DataFrame(rows)


def _table_html(df: pd.DataFrame, empty: str) -> str:
    if df.empty:
        return f"<p class='note'>{html.escape(empty)}</p>"
    return df.to_html(index=False, classes="grid", border=0, na_rep="")


# -- page -------------------------------------------------------------------------------------
_CSS = """
body { font-family: -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif; margin: 24px 32px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.meta { color: #555; } .note { color: #666; font-style: italic; }
table.grid { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
table.grid th, table.grid td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
table.grid th { background: #f4f4f4; }
.sim { background: #fff3cd; padding: 1px 6px; border-radius: 4px; }
"""


def _summary(sweep: _Sweep) -> str:
    df = sweep.df
    repeat = df["repeat_of"].notna() if "repeat_of" in df else pd.Series(False, index=df.index)
    counts = df[~repeat].groupby(["pool", "status"]).size() if not df.empty else pd.Series(dtype=int)
    items = []
    for pool in sweep.pools:
        per = {s: int(n) for (p, s), n in counts.items() if p == pool}
        done = ", ".join(f"{n} {s}" for s, n in sorted(per.items())) or "no trials yet"
        repeats = int((repeat & (df["pool"] == pool)).sum()) if not df.empty else 0
        sim = " <span class='sim'>simulated</span>" if sweep.simulated[pool] else ""
        items.append(f"<li><b>{html.escape(pool)}</b>{sim}: {html.escape(done)} of "
                     f"{sweep.config.trials_for(sweep.config.pool(pool))} budgeted"
                     f"{f', plus {repeats} repeat runs (other seeds)' if repeats else ''}; "
                     f"non-dominated set from {html.escape(sweep.front_source[pool])}</li>")
    objectives = ", ".join(f"{label(k)} ({d})" for k, d in sweep.objectives)
    return (f"<p class='meta'>Results: <code>{html.escape(str(sweep.result.results_dir))}</code><br>"
            f"Objectives: {html.escape(objectives)}</p><ul>{''.join(items)}</ul>")


def _serving_html(sweep: _Sweep) -> str:
    head, table = serving_table(sweep)
    if table.empty:
        return ""
    return (f"<h2 id='serving'>Serving (benchmarks/serving.py)</h2><p class='meta'>{html.escape(head)}</p>"
            + _table_html(table, ""))


def render(sweep: _Sweep) -> str:
    """The whole page. plotly.js is inlined once, with the first figure."""
    figures: list[tuple[str, Any]] = [("pareto", pareto_figure(sweep))]
    for pool in sweep.pools:
        fig = parallel_figure(sweep, pool)
        if fig is not None:
            figures.append((f"parallel-{pool}", fig))
    shared = shared_configs(sweep)
    if not shared.empty:
        figures.append(("pools", pools_figure(sweep, shared)))
    divs: dict[str, str] = {}
    for i, (name, fig) in enumerate(figures):
        divs[name] = fig.to_html(full_html=False, include_plotlyjs=i == 0, div_id=f"plot-{name}",
                                 config={"displaylogo": False, "responsive": True})
    parallel = "".join(divs[n] for n, _ in figures if n.startswith("parallel-")) or \
        "<p class='note'>No finished trials yet.</p>"
    if shared.empty:
        pools_html = ("<p class='note'>No configuration was run on more than one pool. With identical "
                      "sampler seeds the first trials of every pool coincide; categorical search spaces repeat "
                      "configurations more often.</p>")
    else:
        keys = [k for k, _ in sweep.objectives]
        table = shared[["configuration", "pool", "trial_number"] + keys].rename(
            columns={"trial_number": "trial", **{k: label(k) for k in keys}})
        table["pool"] = [sweep.pool_title(p) for p in table["pool"]]
        pools_html = divs["pools"] + _table_html(table, "")
    title = f"OmniNet sweep {sweep.config.name}: trade-offs"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
{_summary(sweep)}
<h2 id="pareto">Pareto fronts per pool</h2>
<p class="meta">Coloured: the pool's Pareto front over all objectives (feasible trials only). Grey: dominated.
Red crosses: ran but violate the pool's constraints. Dotted line: the front within that view.</p>
{divs['pareto']}
<h2 id="parallel">Parameters vs objectives</h2>
{parallel}
<h2 id="pools">Hardware pools side by side (same configuration)</h2>
{pools_html}
<h2 id="paired">Accuracy against the reference, paired on the same eval rows</h2>
<p class="meta">Every trial scores the same eval rows in the same order as its pool's reference run (the trained
base, or the dense baseline), so each accuracy is a paired difference with a 95% interval: 'eval' intervals are
a paired bootstrap over eval rows (one training run each), 'eval+seed' a t-interval over seed repeats.
Indistinguishable: the interval contains 0. Zero-shot: a derived trial right after its passes, before its
fine-tune.</p>
{_table_html(paired_table(sweep), "No per-unit scores recorded (the runner keeps none, or no reference run finished).")}
<h2 id="baseline">What the knobs buy against the baseline</h2>
{_table_html(baseline_table(sweep), "No baseline configuration (enqueue) finished.")}
<h2 id="recommended">Recommended configurations under the sweep's constraints</h2>
<p class="meta">Ranked by the pessimistic end of the first objective's 95% interval (repeated seeds; a
configuration run once borrows the pooled spread of the repeated ones).</p>
{_table_html(recommendations_table(sweep), "No pools.")}
<h2 id="noise">Noise: configurations run with several seeds</h2>
{_table_html(noise_table(sweep), "No configuration was repeated (set repeats.count >= 2).")}
<h2 id="conditions">Measurement conditions</h2>
{_table_html(conditions_table(sweep), "No pools.")}
<h2 id="unfinished">Trials that did not finish (failed, crashed, infeasible, screened, pruned)</h2>
<p class="meta">screened: stopped before training (measured first, or predicted by the cost model); pruned: stopped
at a rung of successive halving, with its accuracy at that rung.</p>
{_table_html(unfinished_table(sweep), "Every trial finished and was measured.")}
<h2 id="cost-model">Cost model</h2>
{_table_html(cost_model_table(sweep), "No cost model (cost_model.enabled: false).")}
{_serving_html(sweep)}
</body></html>
"""


def build_dashboard(results_dir: str | os.PathLike, *, out: str | os.PathLike | None = None) -> Path:
    """Writes the trade-off dashboard of the sweep in ``results_dir`` to ``out`` (default
    ``<results_dir>/artifacts/dashboard.html``, which the sweep logs to MLflow) and returns
    its path. Raises ``ValueError`` (one line) when ``results_dir`` is not a sweep's results
    directory or ``out`` is a directory."""
    path = Path(os.path.expanduser(str(results_dir)))
    if not path.is_dir():
        raise ValueError(f"results_dir: {str(path)!r} is not a directory; pass a sweep's results directory "
                         "(the one holding sweep.yaml and trials/)")
    target = Path(os.path.expanduser(str(out))) if out is not None else path / "artifacts" / DEFAULT_NAME
    if target.is_dir():
        raise ValueError(f"out: {str(target)!r} is a directory; give a file path such as {target / DEFAULT_NAME}")
    page = render(_Sweep(path))  # all reading and plotting before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target.resolve()


def dashboard_main(argv: list[str]) -> int:
    """``omninet dashboard RESULTS_DIR [--out FILE]``: exit 0 and the file's path on stdout;
    exit 2 with one line on stderr on bad input."""
    parser = argparse.ArgumentParser(prog="omninet dashboard",
                                     description="(Re)build a sweep's trade-off dashboard: one self-contained HTML file.")
    parser.add_argument("results_dir", metavar="RESULTS_DIR", help="the sweep's results directory (holds sweep.yaml)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help=f"where to write the HTML (default RESULTS_DIR/artifacts/{DEFAULT_NAME})")
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits 2
    try:
        path = build_dashboard(args.results_dir, out=args.out)
    except ValueError as exc:
        print(f"omninet dashboard: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(dashboard_main(sys.argv[1:]))
