"""Search efficiency: the same wall-clock budget, seeds and search space for a plain sweep (fifo:
every trial trains to its budget, then is measured) and for measure first + multi-objective
successive halving + the cost model. Real trials on a task with per-unit scoring, trained,
evaluated and measured at one length (default: masked bytes on the standard library at 256
tokens, every hidden byte scored, the eval sized to a standard error of 0.005; ``--task
listops`` is the earlier setup: 20-100-token ListOps measured at ``--seq`` 1024).

    python benchmarks/search_efficiency.py [--budget-s 300] [--repeats 3] [--steps 200] [--task masked_bytes] [--quick] [--out FILE]

With 200 training steps (the quickstart's budget) training dominates a trial, which is the case
the scheduler is for; with a few dozen steps a trial is mostly its measurement, which both
schedulers pay once per measured configuration.

Per sweep, the hypervolume of the feasible Pareto front (accuracy max, inference peak memory
min, latency p50 min; Optuna's hypervolume utility; fixed reference point: accuracy 0, the
memory bound below, the pool's latency limit) over time, from each trial's finish time. Figures:

- ``hv_ratio_at_budget``: hypervolume of the new scheduler / the plain sweep's, at the budget
  (target >= 1.5, median over repeats);
- ``time_ratio``: the time the new scheduler took to reach the plain sweep's final hypervolume /
  the budget (target <= 0.5);
- the cost model on held-out trials (never fitted): share within +-15% for latency and +-10%
  for memory, pooled over repeats (target >= 0.9 each), for the final model and for the
  predictions each held-out trial got before it ran;
- ``measurement_reproducibility``: the same shares between two measurements of one
  configuration (the noise floor any cost model is held to);
- ``headroom``: how much hypervolume there was to win, at the fixed reference point and at one
  just past the worst measured costs: the union of every sweep's front over each plain front,
  and a made-up utopia point (best accuracy, least memory, least latency of anything measured)
  over each plain front, which bounds what any scheduler could reach in the measured ranges;
- ``accuracy_signal``: the spread of final accuracy against its standard error (each trial's own,
  clustered by eval row, for per-unit tasks; binomial for ListOps).

Repeats interleave the two schedulers so drifting background load hits both alike. JSON on
stdout (and --out), with the machine and the load average around every sweep.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omninet.sweep import run_sweep  # noqa: E402
from omninet.sweep.controller import log  # noqa: E402
from omninet.sweep.costmodel import measured_value  # noqa: E402
from omninet.trial.measure import machine_facts  # noqa: E402
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)

MAX_LATENCY_MS = 50.0
# Both schedulers optimize the calibrated latency (in ms at the pool's probed reference speed),
# so neither sweep's choices or rung decisions follow the host's speed drift (issue 12).
OBJECTIVES = [{"key": "accuracy", "direction": "maximize"}, {"key": "peak_memory_infer_mb", "direction": "minimize"},
              {"key": "latency_p50_norm_ms", "direction": "minimize"}]
# 1000 eval examples: a binomial standard error of about 0.015 at the accuracies reached here
# (0.03 with the 256 used before), so the accuracy objective is less of a draw of eval noise.
EVAL_EXAMPLES = 1000
MEMORY_REF_MB = 12.0  # above every inference peak of this space at the measured shape (about 5-8 MB)

SPACE = {
    "model.attention.kernel": {"choices": ["sdpa", "block_sparse", "linformer"]},
    "model.attention.block_sparse.sparsity_factor": {"low": 0.5, "high": 0.9,
                                                     "when": {"model.attention.kernel": "block_sparse"}},
    "model.attention.linformer.k": {"low": 16, "high": 128, "log": True, "when": {"model.attention.kernel": "linformer"}},
    "prune.heads": {"choices": [0.0, 0.25, 0.5]},
    "hardware.precision": {"choices": ["fp32", "bf16"]},
}


def task_section(task: str, seq: int) -> tuple[dict, dict, dict]:
    """(task, train extras, measure extras) of the benchmark's trial."""
    if task == "listops":
        return ({"name": "listops", "preset": "quickstart", "num_train": 2000, "num_eval": EVAL_EXAMPLES},
                {"eval_max_examples": EVAL_EXAMPLES}, {"seq_length": seq, "allow_other_length": True})
    return ({"name": "masked_bytes", "max_length": seq, "max_bytes": 3_000_000},
            {"eval_target_se": 0.005, "eval_max_seconds": 20, "eval_batch_size": 32}, {})


def sweep_config(name: str, root: Path, *, scheduler: str, budget_s: float, steps: int, seq: int, seed: int,
                 task: str = "masked_bytes") -> dict:
    task_cfg, train_extra, measure_extra = task_section(task, seq)
    trial = {
        "task": task_cfg,
        "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4,
                  "attention": {"block_sparse": {"min_seq_length": 0, "block_size": 64}, "linformer": {"min_seq_length": 0}}},
        "train": {"steps": steps, "batch_size": 16, "lr": 2.0e-3, "warmup_steps": max(1, steps // 10), "seed": 0,
                  **train_extra},
        "measure": {"batch_size": 1, "latency_reps": 20, "throughput_reps": 20, "warmup": 2, "min_seconds": 0.2,
                    **measure_extra},
    }
    if task != "listops":
        trial["model"]["position"] = {"kind": "rotary"}
    cfg = {
        "name": name, "results_dir": str(root / name), "trial": trial, "search_space": copy.deepcopy(SPACE),
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "concurrency": 1, "trials": 1000}],
        "constraints": {"cpu": {"max_latency_ms": MAX_LATENCY_MS}},
        "budget": {"wall_clock_s": budget_s},
        "sampler": {"kind": "tpe", "seed": seed, "n_startup_trials": 4},
        "objectives": OBJECTIVES,
        # the dense baseline first in both sweeps: every trial's accuracy is then also a paired
        # difference to it (on the same eval rows), the signal the accuracy objective carries
        "enqueue": [{"model.attention.kernel": "sdpa", "prune.heads": 0.0, "hardware.precision": "fp32"}],
        "storage": {"mlflow_uri": f"sqlite:///{root / name / 'mlflow.db'}"},
        "keep_models": "none", "progress_interval_s": 30.0,
    }
    if scheduler == "mosh":
        cfg["scheduler"] = {"kind": "mo_successive_halving"}
        cfg["cost_model"] = {"enabled": True}
    return cfg


FIXED_REFERENCE = (0.0, MEMORY_REF_MB, MAX_LATENCY_MS)  # accuracy, memory MB, latency ms


def hypervolume(df, until: float, reference_ms: float, reference=FIXED_REFERENCE) -> float:
    """Hypervolume of the feasible Pareto front of the ``ok`` trials finished by ``until``.
    Latency is each trial's calibrated ratio (``latency_p50_rel``) times one reference time
    measured at the start of the benchmark: every sweep on one scale, whatever the host's speed
    was while it ran (each sweep's own probe is one sample of it: 0.87-1.63 ms over six sweeps)."""
    from optuna._hypervolume import compute_hypervolume

    done = df[(df["status"] == "ok") & df["feasible"].astype(bool) & (df["finished_at"] <= until)]
    if done.empty:
        return 0.0
    points = np.stack([-done["accuracy"].to_numpy(float), done["peak_memory_infer_mb"].to_numpy(float),
                       done["latency_p50_rel"].to_numpy(float) * reference_ms], axis=1)
    ref = np.array([-reference[0], reference[1], reference[2]])
    points = points[(points < ref).all(axis=1)]
    return float(compute_hypervolume(points, ref)) if len(points) else 0.0


def accuracy_signal(frames, eval_examples: int) -> dict:
    """Does accuracy separate the configurations at this budget? The spread of the final accuracy
    over every ``ok`` trial of every sweep against the eval split's own sampling noise (binomial
    standard error at the mean accuracy), and the mean per attention kernel. A spread near the
    standard error means the accuracy objective is eval noise here, and the front is set by the
    costs plus the luck of that noise."""
    import pandas as pd

    df = pd.concat(frames)
    ok = df[df["status"] == "ok"]
    if len(ok) < 2:
        return {}
    acc = ok["accuracy"].astype(float)
    p = float(acc.mean())
    kernel = ok.get("param.model.attention.kernel")
    out = {"ok_trials": int(len(ok)), "mean": p, "std": float(acc.std()), "min": float(acc.min()),
           "max": float(acc.max()), "eval_examples": eval_examples, "binomial_standard_error": math.sqrt(p * (1 - p) / eval_examples),
           "mean_by_kernel": {} if kernel is None else {k: float(v) for k, v in acc.groupby(kernel).mean().items()}}
    if "accuracy_se" in ok and ok["accuracy_se"].notna().any():  # per-unit scoring: each trial's own SE
        se = float(ok["accuracy_se"].median())
        out.update(median_standard_error=se, spread_over_se=float(acc.std()) / se if se else None,
                   eval_unit=str(ok["eval_unit"].dropna().iloc[0]) if "eval_unit" in ok else None,
                   median_eval_rows=float(ok["eval_rows"].median()) if "eval_rows" in ok else None)
        if "accuracy_diff_ref" in ok and ok["accuracy_diff_ref"].notna().any():
            half = (ok["accuracy_diff_ref_hi"] - ok["accuracy_diff_ref_lo"]).dropna() / 2
            out["median_paired_half_interval"] = float(half.median())
            out["distinct_from_reference"] = int(((ok["accuracy_diff_ref_lo"] > 0) | (ok["accuracy_diff_ref_hi"] < 0)).sum())
    return out


def headroom(runs, reference_ms: float) -> dict:
    """How much hypervolume there was to win, at the fixed reference point and again at a
    reference just past the worst measured costs (``nadir``: accuracy 0, 1.1 x the largest
    memory and latency of any measured trial of any sweep), where the hypervolume weighs the
    cost trade-offs inside the measured range instead of the distance to the pool's limits:

    - ``union / plain``: the front of every sweep's feasible ``ok`` trials together (the best
      anyone found here) against each plain sweep's;
    - ``utopia / plain``: one made-up point with the best accuracy of any ``ok`` trial and the
      least memory and latency of any measured trial (``ok``, ``pruned`` or ``screened``). No
      front of configurations inside these measured ranges exceeds it, so it bounds what any
      scheduler could reach unless it finds a configuration more accurate or cheaper than every
      one measured in all the sweeps."""
    import pandas as pd

    union = pd.concat([r["_trials"] for r in runs])
    measured = union[union["peak_memory_infer_mb"].notna() & union["latency_p50_rel"].notna()]
    ok = union[union["status"] == "ok"]
    out: dict = {}
    if ok.empty or measured.empty:
        return out
    utopia = {"accuracy": float(ok["accuracy"].max()), "peak_memory_infer_mb": float(measured["peak_memory_infer_mb"].min()),
              "latency_ms": float(measured["latency_p50_rel"].min()) * reference_ms}
    nadir = (0.0, 1.1 * float(measured["peak_memory_infer_mb"].max()),
             1.1 * float(measured["latency_p50_rel"].max()) * reference_ms)
    for name, ref in (("fixed_reference", FIXED_REFERENCE), ("nadir_reference", nadir)):
        plain = [hypervolume(r["_trials"], math.inf, reference_ms, ref) for r in runs if r["scheduler"] == "plain"]
        new = [hypervolume(r["_trials"], math.inf, reference_ms, ref) for r in runs if r["scheduler"] == "mosh"]
        union_hv = hypervolume(union, math.inf, reference_ms, ref)
        # one point: its hypervolume is the box between it and the reference
        utopia_hv = math.prod(max(0.0, d) for d in (utopia["accuracy"] - ref[0], ref[1] - utopia["peak_memory_infer_mb"],
                                                   ref[2] - utopia["latency_ms"]))
        out[name] = {"reference": list(ref), "plain_hv": plain, "new_hv": new, "union_hv": union_hv,
                     "utopia_hv": utopia_hv,
                     "new_over_plain": [n / p if p > 0 else None for n, p in zip(new, plain)],
                     "union_over_plain": [union_hv / p if p > 0 else None for p in plain],
                     "utopia_over_plain": [utopia_hv / p if p > 0 else None for p in plain]}
    out["utopia_point"] = utopia
    return out


def trial_rows(df) -> list[dict]:
    """The few columns of each trial the figures are computed from (for re-analysis)."""
    cols = ["trial_number", "status", "accuracy", "peak_memory_infer_mb", "latency_p50_ms", "latency_p50_rel", "steps",
            "finished_at", "param.model.attention.kernel", "param.prune.heads", "param.hardware.precision",
            "param.model.attention.block_sparse.sparsity_factor", "param.model.attention.linformer.k"]
    keep = [c for c in cols if c in df]
    return [{k: (None if v != v else v) for k, v in row.items()} for row in df[keep].to_dict("records")]


def run_one(root: Path, scheduler: str, rep: int, args) -> dict:
    name = f"{scheduler}-{rep}"
    load_before = os.getloadavg()[0]
    start = time.time()
    result = run_sweep(sweep_config(name, root, scheduler=scheduler, budget_s=args.budget_s, steps=args.steps,
                                    seq=args.seq, seed=rep, task=args.task))
    wall = time.time() - start
    df = result.trials()
    ref = args.reference_ms
    curve = [(float(t - start), hypervolume(df, t, ref)) for t in sorted(df["finished_at"])]
    out = {
        "scheduler": scheduler, "repeat": rep, "wall_s": wall, "load_avg_before": load_before,
        "load_avg_after": os.getloadavg()[0], "trials": int(len(df)),
        "statuses": {k: int(v) for k, v in df["status"].value_counts().items()},
        "hv_at_budget": hypervolume(df, start + args.budget_s, ref), "hv_final": hypervolume(df, start + wall + 1, ref),
        "probe_reference_ms": float(df["latency_calibration_ref_ms"].dropna().iloc[0])
        if df["latency_calibration_ref_ms"].notna().any() else None,
        "hv_curve": curve, "audit_problems": len(result.audit()), "_trials": df,
        "training_steps_spent": int(df["steps"].fillna(0).sum()),
        "trial_rows": trial_rows(df.assign(finished_at=df["finished_at"] - start)),
    }
    if scheduler == "mosh":
        report = result.cost_model("cpu")
        out["cost_model"] = {"validation": report.get("validation", {}), "online": report.get("online", {}),
                             "screened_on_prediction": report.get("screened", 0)}
        out["cost_model_errors"] = _errors(df)
    return out


def _errors(df) -> dict:
    """Held-out relative errors of the predictions made before each trial ran (for pooling)."""
    held = df[df["cost_split"] == "holdout"]
    out = {}
    for target, column in (("latency_p50_ms", "predicted_latency_ms"), ("peak_memory_infer_mb", "predicted_memory_infer_mb")):
        pairs = [(measured_value(row, target), row[column]) for _, row in held.iterrows()]
        out[target] = [float(abs(p - m) / m) for m, p in pairs if m and p == p]
    return out


def reproducibility(frames) -> dict:
    """The measurement's own noise floor: for every configuration measured more than once in
    these sweeps (the same sampler seed proposes the same first configurations to both
    schedulers), the relative difference of each pair of measurements (full measurements only,
    not latency probes). No cost model can be more accurate than this."""
    import itertools

    import pandas as pd

    df = pd.concat(frames)
    df = df[df["latency_p50_ms"].notna() & (df["latency_reps"].fillna(0) >= 20)]
    out = {}
    for column, tol in (("latency_p50_ms", 0.15), ("latency_p50_norm_ms", 0.15), ("latency_p50_rel", 0.15),
                        ("peak_memory_infer_mb", 0.10)):
        if column not in df:
            continue
        diffs = sorted(abs(a - b) / min(a, b) for _, g in df.groupby("config_key")
                       for a, b in itertools.combinations(g[column].dropna().tolist(), 2) if min(a, b) > 0)
        if diffs:
            out[column] = {"pairs": len(diffs), "median_rel_diff": diffs[len(diffs) // 2], "max_rel_diff": diffs[-1],
                           f"share_within_{int(tol * 100)}": sum(d <= tol for d in diffs) / len(diffs)}
            out[column]["of_config_mean"] = _within_config_mean(df, column, tol)
    return out


def _within_config_mean(df, column: str, tol: float) -> dict:
    """Each measurement of a configuration measured more than once against that configuration's
    mean: the share within ``tol``, overall and per precision. A cost model that predicted every
    configuration's true mean exactly would score about this on held-out trials."""
    rows = []
    for _, g in df.groupby("config_key"):
        xs = g[column].dropna()
        if len(xs) < 2 or xs.mean() <= 0:
            continue
        mean, tag = xs.mean(), str(g["precision"].iloc[0]) if "precision" in g else "all"
        rows += [(abs(x - mean) / mean <= tol, tag) for x in xs]
    out = {"measurements": len(rows), "share": sum(ok for ok, _ in rows) / len(rows) if rows else None}
    for tag in sorted({t for _, t in rows}):
        picked = [ok for ok, t in rows if t == tag]
        out[f"share_{tag}"], out[f"measurements_{tag}"] = sum(picked) / len(picked), len(picked)
    return out


def time_to(curve: list[tuple[float, float]], level: float) -> float | None:
    for t, hv in curve:
        if hv >= level > 0:
            return t
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget per sweep")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200,
                        help="training steps of a full trial (the quickstart's budget: training dominates a trial)")
    parser.add_argument("--seq", type=int, default=None,
                        help="the length: masked_bytes trains, evaluates and is measured at it (default 256); listops is "
                             "measured at it (default 1024)")
    parser.add_argument("--task", choices=["masked_bytes", "listops"], default="masked_bytes")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1 repeat, 60 s, 9 steps, 256 tokens")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.seq is None:
        args.seq = 1024 if args.task == "listops" else 256
    if args.quick:
        args.budget_s, args.repeats, args.steps, args.seq = 60.0, 1, 9, (256 if args.task == "listops" else 64)

    import ray

    from omninet.trial import limits
    from omninet.trial.measure import calibration_ms

    with limits.pinned(None, 1):  # one thread, like the pool's trials
        args.reference_ms = calibration_ms(seconds=1.0)
    log.disabled = True  # keep stdout for the JSON
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    runs = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rep in range(args.repeats):  # interleaved
                for scheduler in ("plain", "mosh"):
                    runs.append(run_one(Path(tmp), scheduler, rep, args))
                    print(f"{scheduler} repeat {rep}: hv {runs[-1]['hv_at_budget']:.4g}, {runs[-1]['statuses']}",
                          file=sys.stderr, flush=True)
    finally:
        ray.shutdown()

    room = headroom(runs, args.reference_ms)
    signal = accuracy_signal([r["_trials"] for r in runs], EVAL_EXAMPLES)
    noise = reproducibility([r.pop("_trials") for r in runs])
    by = {s: [r for r in runs if r["scheduler"] == s] for s in ("plain", "mosh")}
    hv_ratios, time_ratios = [], []
    for plain, mosh in zip(by["plain"], by["mosh"]):
        hv_ratios.append(mosh["hv_at_budget"] / plain["hv_at_budget"] if plain["hv_at_budget"] > 0 else None)
        reached = time_to(mosh["hv_curve"], plain["hv_at_budget"])
        time_ratios.append(None if reached is None else reached / args.budget_s)
    pooled = {t: [e for r in by["mosh"] for e in r["cost_model_errors"][t]] for t in ("latency_p50_ms", "peak_memory_infer_mb")}
    final = {t: [v for r in by["mosh"] for v in [r["cost_model"]["validation"].get(t)] if v] for t in pooled}

    def share(errors, tol):
        return sum(e <= tol for e in errors) / len(errors) if errors else None

    def pooled_final(target, key):
        items = final[target]
        n = sum(v["n"] for v in items)
        return sum(v[key] * v["n"] for v in items) / n if n else None

    hv_ok = [r for r in hv_ratios if r is not None]
    t_ok = [r for r in time_ratios if r is not None]
    summary = {
        "hv_ratio_at_budget_per_repeat": hv_ratios, "hv_ratio_at_budget_median": statistics.median(hv_ok) if hv_ok else None,
        "time_ratio_per_repeat": time_ratios,
        "time_ratio_median": statistics.median(t_ok) if len(t_ok) == len(time_ratios) else None,
        "cost_model_final": {
            "latency_within_15": pooled_final("latency_p50_ms", "within_15"),
            "memory_within_10": pooled_final("peak_memory_infer_mb", "within_10"),
            "latency_mape": pooled_final("latency_p50_ms", "mape"), "memory_mape": pooled_final("peak_memory_infer_mb", "mape"),
            "holdout_trials": sum(v["n"] for v in final["latency_p50_ms"]),
        },
        "cost_model_online": {
            "latency_within_15": share(pooled["latency_p50_ms"], 0.15),
            "memory_within_10": share(pooled["peak_memory_infer_mb"], 0.10),
            "holdout_trials": len(pooled["latency_p50_ms"]),
        },
        "measurement_reproducibility": noise,
        "headroom": room,
        "accuracy_signal": signal,
        "targets": {"hv_ratio": 1.5, "time_ratio": 0.5, "latency_within_15": 0.9, "memory_within_10": 0.9},
    }
    cm = summary["cost_model_final"]
    summary["targets_met"] = {
        "hv_ratio": bool(summary["hv_ratio_at_budget_median"] and summary["hv_ratio_at_budget_median"] >= 1.5),
        "time_ratio": bool(summary["time_ratio_median"] is not None and summary["time_ratio_median"] <= 0.5),
        "cost_model": bool(cm["latency_within_15"] is not None and cm["latency_within_15"] >= 0.9
                           and cm["memory_within_10"] is not None and cm["memory_within_10"] >= 0.9),
    }
    report = {
        "benchmark": "search_efficiency",
        "machine": {**machine_facts(), "python": sys.version.split()[0], "platform": platform.platform()},
        "setup": {"budget_s": args.budget_s, "repeats": args.repeats, "steps": args.steps, "seq_length": args.seq,
                  "task": args.task,
                  "search_space": SPACE, "objectives": OBJECTIVES, "max_latency_ms": MAX_LATENCY_MS,
                  "hv_latency": "latency_p50_rel x reference_ms", "reference_ms": args.reference_ms,
                  "hv_reference_point": {"accuracy": 0.0, "peak_memory_infer_mb": MEMORY_REF_MB,
                                         "latency_p50_ms": MAX_LATENCY_MS}, "quick": args.quick},
        "load_average": {"min": min(min(r["load_avg_before"], r["load_avg_after"]) for r in runs),
                         "max": max(max(r["load_avg_before"], r["load_avg_after"]) for r in runs),
                         "at_end": os.getloadavg()[0]},
        "summary": summary,
        "runs": runs,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
