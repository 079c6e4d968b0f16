"""The dashboard's tables (pandas frames, one row per pool or trial) and their HTML."""

from __future__ import annotations

import html
import json
import logging
from typing import Any

import pandas as pd

from omninet.sweep.dashboard.data import (SweepData, config_label, diff_text, fmt, label, plain, present, ratio_interval,
                                          speedup_text)
from omninet.sweep.results import RATIOS

__all__ = ["baseline_table", "conditions_table", "cost_model_table", "noise_table", "paired_table", "pools_noise_table",
           "recommendations_table", "serving_table", "table_html", "unfinished_table"]

log = logging.getLogger("omninet.sweep")


def _interval(a: Any, key: str) -> str:
    """An aggregate's objective with its 95% interval: a ratio's [lo, hi], else +- half-width."""
    if key in RATIOS and present(a.get(f"{key}_lo")):
        return f"{fmt(a[f'{key}_mean'])} [{fmt(a[f'{key}_lo'])}, {fmt(a[f'{key}_hi'])}]"
    half = a.get(f"{key}_ci95")
    return f"{fmt(a[f'{key}_mean'])} ± {fmt(half)}" if present(half) else fmt(a[f"{key}_mean"])

def recommendations_table(sweep: SweepData) -> pd.DataFrame:
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
            row.update({label(k): f"{fmt(v)} ± {fmt(rec['ci95'][k])}" if present(rec.get("ci95", {}).get(k))
                        else fmt(v) for k, v in rec["objectives"].items()})
            speed = rec.get("latency_ratio_to_reference")
            row["speed-up vs reference [95%]"] = speedup_text(
                {"latency_ratio_ref": speed["ratio"], "latency_ratio_ref_lo": speed["lo"],
                 "latency_ratio_ref_hi": speed["hi"]}) if speed else "-"
            others = rec.get("indistinguishable_from") or []
            row["indistinguishable from"] = ", ".join(f"#{n}" for n in others) or "-"
        rows.append(row)
    return pd.DataFrame(rows)


def paired_table(sweep: SweepData) -> pd.DataFrame:
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
        groups = _front_groups(sweep, pool)
        agg = agg.sort_values(f"{first}_mean", ascending=sweep.first_dir == "minimize")
        for _, a in agg.iterrows():
            number = int(a["trial_number"])
            trial = sweep.df[(sweep.df["pool"] == pool) & (sweep.df["trial_number"] == number)].iloc[0]
            on_front = any(n in sweep.fronts[pool] for n in a["trials"])
            lo, hi = a.get("accuracy_diff_lo"), a.get("accuracy_diff_hi")
            verdict = "reference" if number == ref else (
                "differs" if present(lo) and present(hi) and (lo > 0 or hi < 0) else
                "indistinguishable" if present(lo) else "-")
            row = {"pool": sweep.pool_title(pool), "trial": f"#{number}", "front": _front_text(on_front, groups.get(number)),
                   "configuration": config_label(sweep.params_of(trial)), "runs": int(a["runs"]),
                   "accuracy": f"{fmt(a[f'{first}_mean'])} (se {fmt(trial.get('accuracy_se'))})",
                   "vs reference [95%]": "0 (reference)" if number == ref else diff_text(a["accuracy_diff"], lo, hi),
                   "interval covers": a.get("accuracy_diff_covers") or "-", "verdict": verdict,
                   "speed-up vs reference [95%]": speedup_text(a)}
            if "accuracy_zero_shot_diff_ref" in trial and present(trial.get("accuracy_zero_shot_diff_ref")):
                row["zero-shot vs reference [95%]"] = diff_text(trial["accuracy_zero_shot_diff_ref"],
                                                            trial.get("accuracy_zero_shot_diff_ref_lo"),
                                                            trial.get("accuracy_zero_shot_diff_ref_hi"))
            for key, _ in sweep.objectives[1:]:
                row[label(key)] = fmt(a.get(f"{key}_mean"))
            rows.append(row)
    return pd.DataFrame(rows)


def _front_groups(sweep: SweepData, pool: str) -> dict[int, tuple[int, list[int]]]:
    """trial number -> (front group, its members) from ``SweepResult.front_groups`` over the
    dashboard's front; empty when they cannot be computed (the table then says only 'yes')."""
    try:
        groups = sweep.result.front_groups(pool, set(sweep.fronts[pool]))
    except Exception as exc:  # a partial record: the table still renders, without groups
        log.warning("dashboard: front groups of pool %s not computed (%s: %s)", pool, type(exc).__name__, exc)
        return {}
    return {int(r["trial_number"]): (int(r["front_group"]), list(r["front_group_trials"])) for _, r in groups.iterrows()}


def _front_text(on_front: bool, group: tuple[int, list[int]] | None) -> str:
    """'yes', or 'yes, group 2 (= #5, #9)' when other front configurations tie with it on every objective."""
    if not on_front:
        return ""
    if group is None or len(group[1]) < 2:
        return "yes" if group is None else f"yes, group {group[0]}"
    return f"yes, group {group[0]} (ties on every objective: {', '.join(f'#{n}' for n in group[1])})"


def noise_table(sweep: SweepData) -> pd.DataFrame:
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
            row.update({label(k): _interval(a, k) for k, _ in sweep.objectives})
            if "latency_ratio_ref" not in dict(sweep.objectives) and present(a.get("latency_ratio_ref_mean")):
                row[label("latency_ratio_ref")] = _interval(a, "latency_ratio_ref")
            rows.append(row)
    return pd.DataFrame(rows)


def pools_noise_table(sweep: SweepData, shared: pd.DataFrame) -> pd.DataFrame:
    """Per configuration run on several pools: each pool's raw latency and its latency ratio to
    that pool's reference (timed side by side), and whether the pools differ beyond noise. On the
    same hardware (the same device on the same node) the raw times differ by the moment they
    were taken; the ratios are what to compare: overlapping intervals differ only by noise."""
    rows = []
    if shared.empty:
        return pd.DataFrame()
    for configuration, group in shared.groupby("configuration", sort=False):
        ratios = {row["pool"]: ratio_interval(row) for _, row in group.iterrows()}
        hardware = {(str(row.get("node") or "").split("/")[0], str(row.get("device_name") or ""))
                    for _, row in group.iterrows()}
        same = len(hardware) == 1
        timed = [r for r in ratios.values() if r is not None]
        if len(timed) < 2:
            verdict = "no paired timing on two pools"
        elif max(lo for _, lo, _ in timed) <= min(hi for _, _, hi in timed):
            verdict = "differ only by noise (ratio intervals overlap)" if same else "ratio intervals overlap"
        else:
            verdict = "differ beyond noise (ratio intervals disjoint)"
        rows.append({
            "configuration": configuration,
            "hardware": f"same ({next(iter(hardware))[1] or 'device'})" if same else "different",
            label("latency_p50_ms"): ", ".join(f"{sweep.pool_title(row['pool'])} {fmt(row.get('latency_p50_ms'))}"
                                               for _, row in group.iterrows()),
            "latency / reference [95%]": ", ".join(
                f"{sweep.pool_title(pool)} " + (f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]" if r else "-")
                for pool, r in ratios.items()),
            "verdict": verdict})
    return pd.DataFrame(rows)


_KERNEL = "param.model.attention.kernel"


def baseline_table(sweep: SweepData) -> pd.DataFrame:
    """What the knobs buy: per pool, the best (lowest latency, then memory) run of each
    attention kernel against the enqueued baseline configuration (the first ``enqueue`` entry,
    e.g. dense SDPA, no pruning, fp32), as ratios measured at the same deployment shape. Where
    trials were timed side by side with the reference, latency is that paired ratio with its 95%
    interval (ranked on it); else the quotient of two raw p50s taken at different moments."""
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
                match &= ran[col].map(lambda v, value=value: present(v) and plain(v) == value)
        baseline = ran[match].sort_values("trial_number")
        if baseline.empty:
            continue
        b = baseline.iloc[0]
        groups = ran.groupby(_KERNEL) if _KERNEL in ran else [("(all)", ran)]
        for kernel, group in groups:
            paired = "latency_ratio_ref" in group and group["latency_ratio_ref"].map(present).all()
            best = group.sort_values(["latency_ratio_ref" if paired else "latency_p50_ms", "peak_memory_infer_mb"]).iloc[0]
            r = ratio_interval(best) if paired else None
            latency = (f"{r[0]:.3f}x [{r[1]:.3f}, {r[2]:.3f}] (paired)" if r else
                       f"{best['latency_p50_ms'] / b['latency_p50_ms']:.2f}x (raw p50s, unpaired)")
            rows.append({"pool": sweep.pool_title(pool), "kernel": kernel, "trial": f"#{int(best['trial_number'])}",
                         "configuration": config_label(sweep.params_of(best)),
                         "latency vs baseline": latency,
                         "inference memory vs baseline": f"{best['peak_memory_infer_mb'] / b['peak_memory_infer_mb']:.2f}x",
                         "accuracy - baseline": f"{best['accuracy'] - b['accuracy']:+.3f}" if "accuracy" in best else "",
                         "baseline": f"#{int(b['trial_number'])}", "shape (B x N)":
                         f"{fmt(best.get('measure_batch_size'))} x {fmt(best.get('seq_length'))}"})
    return pd.DataFrame(rows)


def conditions_table(sweep: SweepData) -> pd.DataFrame:
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

            pairing = ran["latency_pairing"].dropna().unique() if "latency_pairing" in ran else []
            row["timed against"] = ", ".join(map(str, pairing)) or "nothing (unpaired)"
            half = (col("latency_ratio_ref_hi") - col("latency_ratio_ref_lo")) / 2 / col("latency_ratio_ref")
            row["ratio half-width (median, max)"] = (f"{100 * half.median():.1f}%, {100 * half.max():.1f}%"
                                                     if half.notna().any() else "")
            row["latency cv (median)"] = fmt(col("latency_cv").median())
            # calibrated: the per-call ratio to the reference workload, the machine's drift taken out
            row["latency / reference cv (median)"] = fmt(col("latency_rel_cv").median())
            cal = col("latency_calibration_ms")
            row["machine speed during measures (reference ms, min-max)"] = (
                f"{fmt(cal.min())}-{fmt(cal.max())} (probe {fmt(probe.get('calibration_ms'))})" if cal.notna().any() else "")
            row["noisy"] = int(ran["latency_noisy"].fillna(False).astype(bool).sum()) if "latency_noisy" in ran else ""
            row["co-running during measure (max)"] = fmt(col("measure_co_running").max())
            row["load avg"] = f"{fmt(col('load_avg_before').min())}-{fmt(col('load_avg_after').max())}"
            drift = (col("peak_memory_infer_later_mb") / col("peak_memory_infer_mb") - 1).abs()
            row["memory 1st vs later call (max diff)"] = f"{100 * drift.max():.1f}%" if drift.notna().any() else ""
        rows.append(row)
    return pd.DataFrame(rows)


def unfinished_table(sweep: SweepData) -> pd.DataFrame:
    df = sweep.df[sweep.df["status"] != "ok"]
    return pd.DataFrame({
        "pool": [sweep.pool_title(p) for p in df["pool"]],
        "trial": [f"#{int(n)}" for n in df["trial_number"]],
        "status": df["status"].tolist(),
        "configuration": [config_label(sweep.params_of(row)) for _, row in df.iterrows()],
        "reason": [str(e).splitlines()[0][:300] if present(e) else "" for e in df["error"]],
        label("predicted_latency_ms"): [fmt(v) if present(v) else "" for v in df.get("predicted_latency_ms", [None] * len(df))],
    })


def cost_model_table(sweep: SweepData) -> pd.DataFrame:
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


def serving_table(sweep: SweepData) -> tuple[str, pd.DataFrame]:
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


def table_html(df: pd.DataFrame, empty: str) -> str:
    if df.empty:
        return f"<p class='note'>{html.escape(empty)}</p>"
    return df.to_html(index=False, classes="grid", border=0, na_rep="")
