"""The dashboard's Plotly figures: Pareto fronts per pool, parameters against objectives, and pools
side by side on the configurations they share."""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

from omninet.sweep.dashboard.data import (SweepData, diff_text, finite_rows, fmt, label, non_dominated, plain, present,
                                          ratio_interval, speedup_text)
from omninet.sweep.results import RATIOS

__all__ = ["pareto_figure", "parallel_figure", "pools_figure"]

_POOL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_GREY, _RED = "#b8b8b8", "#d62728"


def _hover(sweep: SweepData, row: pd.Series) -> str:
    lines = [f"<b>{html.escape(sweep.pool_title(row['pool']))} #{int(row['trial_number'])}</b>"]
    lines += [f"{html.escape(p)} = {html.escape(fmt(v))}" for p, v in sweep.params_of(row).items()]
    for key, _ in sweep.objectives + sweep.cost_views():
        if key in row and present(row[key]):
            lines.append(f"{html.escape(label(key))}: {fmt(row[key])}")
    if present(row.get("accuracy_diff_ref")):
        diff = diff_text(row["accuracy_diff_ref"], row.get("accuracy_diff_ref_lo"), row.get("accuracy_diff_ref_hi"))
        lines.append(f"vs reference: {diff}")
    elif row.get("role") == "reference":
        lines.append("the pool's reference run")
    if ratio_interval(row) is not None:
        lines.append(f"speed-up vs reference: {speedup_text(row)}")
    if present(row.get("device_name")):
        lines.append(f"device: {html.escape(str(row['device_name']))}")
    return "<br>".join(dict.fromkeys(lines))


def pareto_figure(sweep: SweepData):
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
                part = finite_rows(part, [key])
                if not part.empty:
                    add(name, group, x=part[key], y=part[sweep.first], marker=marker,
                        text=[_hover(sweep, row) for _, row in part.iterrows()], **_ratio_bars(part, key), **mk)
            # the front within this 2-D view, as a line (Optuna's non-domination over these two objectives)
            plane = finite_rows(feasible, [key])
            front2d = plane[plane["trial_number"].isin(
                non_dominated(plane, [sweep.first, key], [sweep.first_dir, direction]))].sort_values(key)
            if len(front2d) >= 1:
                add("front in this view", "front2d", row=r, col=c, x=front2d[key], y=front2d[sweep.first],
                    mode="lines", line=dict(color=color, dash="dot", shape="hv" if direction == "minimize" else "vh"),
                    hoverinfo="skip")
            agg = sweep.aggregates[pool]
            repeated = agg[agg["runs"] > 1] if not agg.empty else agg
            if not repeated.empty and f"{key}_mean" in repeated:
                add("mean ± 95% interval (repeats: seeds; timing: runs combined)", "noise", row=r, col=c,
                    mode="markers", x=repeated[f"{key}_mean"], y=repeated[f"{sweep.first}_mean"],
                    error_x=_aggregate_bars(repeated, key), error_y=_aggregate_bars(repeated, sweep.first),
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


def _aggregate_bars(agg: pd.DataFrame, key: str) -> dict[str, Any]:
    """An aggregate's 95% interval: a ratio's combined [lo, hi], else +- its ``_ci95``."""
    if key in RATIOS and f"{key}_lo" in agg:
        mean = agg[f"{key}_mean"]
        return dict(type="data", symmetric=False, array=(agg[f"{key}_hi"] - mean).fillna(0).tolist(),
                    arrayminus=(mean - agg[f"{key}_lo"]).fillna(0).tolist(), visible=True)
    return dict(type="data", array=agg[f"{key}_ci95"].fillna(0).tolist(), visible=True)


def _ratio_bars(part: pd.DataFrame, key: str, axis: str = "x") -> dict[str, Any]:
    """Error bars of a ratio to the reference: its own 95% interval (asymmetric), for each row."""
    if key not in RATIOS or f"{key}_lo" not in part or f"{key}_hi" not in part:
        return {}
    value = pd.to_numeric(part[key], errors="coerce")
    up = (pd.to_numeric(part[f"{key}_hi"], errors="coerce") - value).fillna(0)
    down = (value - pd.to_numeric(part[f"{key}_lo"], errors="coerce")).fillna(0)
    return {f"error_{axis}": dict(type="data", symmetric=False, array=up.tolist(), arrayminus=down.tolist(),
                                  visible=True, thickness=1)}


def _dimension(series: pd.Series, name: str) -> dict[str, Any]:
    """A parallel-coordinates axis; categorical and conditional (absent) values get ticks."""
    values = [plain(v) if present(v) else None for v in series]
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numeric) == sum(v is not None for v in values) and numeric:
        if len(numeric) == len(values):
            return dict(label=name, values=values)
        # conditional parameter: absent where it does not apply; drawn below the range as "n/a"
        lo, hi = min(numeric), max(numeric)
        na = lo - 0.15 * ((hi - lo) or abs(lo) or 1.0)
        ticks = [na, lo, hi] if hi != lo else [na, lo]
        return dict(label=name, values=[na if v is None else v for v in values], range=[na, hi],
                    tickvals=ticks, ticktext=["n/a"] + [fmt(t) for t in ticks[1:]])
    cats = sorted({"n/a" if v is None else str(v) for v in values})
    index = {c: i for i, c in enumerate(cats)}
    return dict(label=name, values=[index["n/a" if v is None else str(v)] for v in values],
                tickvals=list(range(len(cats))), ticktext=cats, range=[-0.5, len(cats) - 0.5])


def parallel_figure(sweep: SweepData, pool: str):
    import plotly.graph_objects as go

    ran = sweep.ran(pool)
    if ran.empty:
        return None
    dims = [_dimension(ran[c], label(c)) for c in sweep.param_cols if ran[c].map(present).any()]
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


def pools_figure(sweep: SweepData, shared: pd.DataFrame):
    """The objectives of the configurations run on several pools, side by side; the latency ratio
    to each pool's reference (with its 95% interval) beside them even when it is no objective:
    raw times of two pools on the same hardware differ by the moment they were taken."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    keys = [k for k, _ in sweep.objectives]
    if "latency_ratio_ref" not in keys and "latency_ratio_ref" in shared and shared["latency_ratio_ref"].map(present).any():
        keys.append("latency_ratio_ref")
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[label(k) for k in keys], horizontal_spacing=0.07)
    for i, pool in enumerate(sweep.pools):
        part = shared[shared["pool"] == pool]
        if part.empty:
            continue
        for c, key in enumerate(keys, start=1):
            fig.add_trace(go.Bar(name=sweep.pool_title(pool), legendgroup=pool, showlegend=c == 1,
                                 x=part["configuration"], y=part[key].astype(float), **_ratio_bars(part, key, "y"),
                                 marker_color=_POOL_COLORS[i % len(_POOL_COLORS)],
                                 hovertemplate=f"{html.escape(sweep.pool_title(pool))}<br>%{{x}}<br>"
                                               f"{html.escape(label(key))}: %{{y:.4g}}<extra></extra>"),
                          row=1, col=c)
    fig.update_layout(barmode="group", height=460, template="plotly_white", margin=dict(t=60, b=140))
    fig.update_xaxes(tickangle=-30)
    return fig
