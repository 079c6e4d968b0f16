"""Paired latency: over repeated measurements of a few configurations, how far do the raw p50, the
calibrated p50 and the paired ratio to the reference spread, and what does pairing cost a trial?

    python benchmarks/paired_latency.py [--runs 8] [--threads 1] [--load] [--quick] [--out FILE]

The quickstart's model and measurement settings (``sweeps/quickstart.yaml``: masked bytes at 512
tokens, hidden 64, 2 layers, 4 heads, rotary; latency at batch 1, throughput at 4 x 512), built
from its seed as a trial builds it (a model's time depends on its shapes, kernels, heads and
precision, not on its weight values), in one process. The reference is the quickstart's enqueued
point (dense SDPA, every head, fp32); the configurations are that same point (A/A: its ratio
must hold 1), block-sparse (block 16, sparsity 0.8), half the heads pruned, and Linformer
(k = 64). Each run of a configuration is the trial's own inference phase
(``omninet.trial.measure.inference``) twice, in alternating order: unpaired (the latency loop
with the calibration workload, then throughput: what a trial measured before issue 33) and
paired with the reference (what it measures now). Runs of all configurations are interleaved,
so the machine's drift reaches all of them.

Per configuration: every run's raw p50 (unpaired, and from the trial's own calls in the paired
rounds), calibrated p50 (``latency_p50_rel``), latency and throughput ratio with its 95%
interval, and the phase's seconds; across runs, the spread (CV, max / min) of each figure, how
many ratio intervals hold the configuration's median ratio over the runs (and, A/A, hold 1),
and the measurement phase's seconds paired over unpaired (the target: at most 1.6x).
``--load`` runs a second process that spins on one core meanwhile (the issue's "second process
loading one core"). JSON on stdout (and ``--out``) with the machine (CPU model and flags), the
load average and every raw figure.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from omninet.trial import loop, measure  # noqa: E402
from omninet.trial.build import build, post_passes  # noqa: E402
from omninet.trial.config import TrialConfig, TrialResult  # noqa: E402
from omninet.trial.context import RunContext  # noqa: E402
from omninet.trial.runner import _reference  # noqa: E402
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)

CONFIGS = {
    "reference (A/A)": {},
    "block_sparse 16 x 0.8": {"model.attention.kernel": "block_sparse", "model.attention.block_sparse.block_size": 16,
                              "model.attention.block_sparse.sparsity_factor": 0.8},
    "half the heads pruned": {"prune.heads": 0.5},
    "linformer k=64": {"model.attention.kernel": "linformer", "model.attention.linformer.k": 64},
}


def merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def quickstart(args) -> tuple[TrialConfig, dict]:
    """The quickstart's trial config (its enqueued point applied) and that point."""
    doc = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    trial = merge(doc["trial"], {"hardware": {"num_threads": args.threads}})
    if args.quick:  # one stdlib package as the corpus, a short length, few rounds: checks the JSON
        corpus = str(Path(sysconfig.get_paths()["stdlib"]) / "asyncio")
        trial = merge(trial, {"task": {"max_length": 64, "max_bytes": 200_000, "root": corpus},
                              "model": {"hidden_size": 16}, "measure": {"min_seconds": 0.0, "max_rounds": 1,
                                                                         "pair_min_rounds": 6, "pair_max_rounds": 8,
                                                                         "memory": False}})
    point = dict(doc["enqueue"][0])
    return TrialConfig.from_dict(trial).with_values(point), point


def built(cfg: TrialConfig):
    """The configuration's model as a trial measures it (built from its seed, post-passes applied)."""
    plan = loop.resolve_plan(cfg.hardware)
    plan.buckets, plan.pad_id = cfg.buckets, cfg.task_obj.pad_id
    model = post_passes(build(cfg, plan), cfg, plan, TrialResult(status="ok"))
    return model, plan


def one_run(model, cfg: TrialConfig, plan, reference) -> dict:
    res = TrialResult(status="ok")
    measure.apply(res, measure.inference(model, cfg, plan, measure.MeasureGate(), reference))
    keys = ("latency_p50_ms", "latency_p50_rel", "latency_calibration_ms", "latency_cv", "latency_rounds", "latency_reps",
            "latency_noisy", "throughput_tokens_s", "measure_seconds", "latency_ratio_ref", "latency_ratio_ref_lo",
            "latency_ratio_ref_hi", "throughput_ratio_ref", "throughput_ratio_ref_lo", "throughput_ratio_ref_hi",
            "latency_ref_p50_ms", "latency_pairing", "load_avg_before")
    return {k: getattr(res, k) for k in keys}


def _cv(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.pstdev(xs) / statistics.fmean(xs) if len(xs) > 1 else None


def _spread(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return max(xs) / min(xs) if xs and min(xs) > 0 else None


def summary(name: str, runs: list[dict]) -> dict:
    unpaired = [r["unpaired"] for r in runs]
    paired = [r["paired"] for r in runs]
    ratios = [p["latency_ratio_ref"] for p in paired]
    median_ratio = statistics.median(ratios)
    halfwidths = [(p["latency_ratio_ref_hi"] - p["latency_ratio_ref_lo"]) / 2 / p["latency_ratio_ref"] for p in paired]
    out = {
        "raw_p50_ms": {"cv": _cv([u["latency_p50_ms"] for u in unpaired]),
                       "max_over_min": _spread([u["latency_p50_ms"] for u in unpaired])},
        "raw_p50_ms_in_paired_rounds": {"cv": _cv([p["latency_p50_ms"] for p in paired]),
                                        "max_over_min": _spread([p["latency_p50_ms"] for p in paired])},
        "calibrated_p50_rel": {"cv": _cv([u["latency_p50_rel"] for u in unpaired]),
                               "max_over_min": _spread([u["latency_p50_rel"] for u in unpaired])},
        "latency_ratio_ref": {"median": median_ratio, "cv": _cv(ratios), "max_over_min": _spread(ratios),
                              "median_halfwidth": statistics.median(halfwidths), "max_halfwidth": max(halfwidths),
                              "intervals_holding_the_median_ratio": sum(
                                  p["latency_ratio_ref_lo"] <= median_ratio <= p["latency_ratio_ref_hi"] for p in paired),
                              "runs": len(paired)},
        "throughput_ratio_ref": {"median": statistics.median(p["throughput_ratio_ref"] for p in paired),
                                 "cv": _cv([p["throughput_ratio_ref"] for p in paired])},
        "measure_seconds": {"unpaired_median": statistics.median(u["measure_seconds"] for u in unpaired),
                            "paired_median": statistics.median(p["measure_seconds"] for p in paired)},
    }
    ms = out["measure_seconds"]
    ms["paired_over_unpaired"] = ms["paired_median"] / ms["unpaired_median"]
    if name.startswith("reference"):
        out["latency_ratio_ref"]["intervals_holding_1"] = sum(
            p["latency_ratio_ref_lo"] <= 1.0 <= p["latency_ratio_ref_hi"] for p in paired)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8, help="measurements of each configuration (each unpaired and paired)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a quickstart trial runs on one core)")
    ap.add_argument("--load", action="store_true", help="a second process spins on one core while the runs go")
    ap.add_argument("--configs", nargs="*", default=None, help=f"a subset of {list(CONFIGS)}")
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 runs, 2 configurations: checks the JSON")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = 2 if args.quick else args.runs
    names = args.configs or (list(CONFIGS)[:2] if args.quick else list(CONFIGS))
    torch.set_num_threads(args.threads)
    ref_cfg, point = quickstart(args)
    load = {"start": measure.load_average()}
    spinner = None
    if args.load:
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        models = {name: built(ref_cfg.with_values(CONFIGS[name])) for name in names}
        reference = {name: _reference(RunContext(reference=ref_cfg, reference_label="enqueue[0]"), plan)
                     for name, (_, plan) in models.items()}
        results: dict[str, list[dict]] = {name: [] for name in names}
        started = time.perf_counter()
        for i in range(runs):
            for name in names:  # interleaved: the machine's drift reaches every configuration
                model, plan = models[name]
                cfg = ref_cfg.with_values(CONFIGS[name])
                order = ("unpaired", "paired") if i % 2 == 0 else ("paired", "unpaired")
                run = {"order": "/".join(order)}
                for mode in order:
                    run[mode] = one_run(model, cfg, plan, reference[name] if mode == "paired" else None)
                results[name].append(run)
        seconds = time.perf_counter() - started
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    load["end"] = measure.load_average()
    summaries = {name: summary(name, results[name]) for name in names}
    over = [s["measure_seconds"]["paired_over_unpaired"] for s in summaries.values()]
    aa = summaries.get("reference (A/A)", {}).get("latency_ratio_ref", {})
    report = {
        "benchmark": "paired_latency", "quick": args.quick, "machine": measure.machine_facts(), "load_avg": load,
        "conditions": {"threads": args.threads, "second_process_spinning_on_one_core": args.load, "runs": runs,
                       "seconds": seconds, "reference": point,
                       "measure": ref_cfg.measure.to_dict(), "shape": {"seq_length": ref_cfg.seq_length,
                                                                      "batch": ref_cfg.measure_batch_size}},
        "configs": {name: CONFIGS[name] for name in names},
        "summary": summaries,
        "runs": results,
        "targets": {
            "aa_intervals_hold_1": aa.get("intervals_holding_1") == aa.get("runs"),
            "aa_median_halfwidth_at_most_3pct": (aa.get("median_halfwidth") or 1.0) <= 0.03,
            "measure_seconds_paired_at_most_1.6x": max(over) <= 1.6,
        },
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
