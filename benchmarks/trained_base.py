"""Derived trials (a trained base + the knobs' passes + a short fine-tune) against the same
configurations trained from scratch, on the quickstart task at its deployment length.

    python benchmarks/trained_base.py [--configs 6] [--out results.json]
    python benchmarks/trained_base.py --quick --out smoke.json      # smoke mode (CI), under a minute

The trial section is the quickstart's (``sweeps/quickstart.yaml``: masked bytes on the standard
library at 512 tokens, hidden 64, 2 layers), run in this process on one pinned thread:

1. the dense base trains once (``--base-steps``, the quickstart's ``base.train``);
2. each configuration is derived from it (``omninet.passes``: head pruning by importance on the
   base, the kernel swap, precision) and fine-tuned ``--finetune-steps`` with the quickstart's
   distillation, scored zero-shot and after the fine-tune;
3. the same configuration trains from scratch for ``--scratch-steps`` (the base's budget: what
   a from-scratch sweep spends per trial).

Every model scores the same eval rows (sized by the trial's target standard error), so each
comparison is a paired difference with a 95% paired-bootstrap interval (``omninet.scores``).
Reported against the issue's targets: the base against chance (the unigram baseline: the most
frequent masked byte of train); derived vs scratch at <= 1/4 of scratch's training time; which
settings' zero-shot and fine-tuned drops against the base are beyond their intervals; the wall
time of a 12-trial sweep of each kind (base training included; from the per-trial walls measured
here, sequential on one core: a one-pool sweep without Ray's start-up); and the Spearman rank
correlation of zero-shot with fine-tuned accuracy across configurations. The machine and the
load average before and after are recorded with the figures.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {  # name -> the trial's overrides (the quickstart's search space)
    "block_sparse b16 s0.75": {"model": {"attention": {"kernel": "block_sparse", "block_sparse": {
        "block_size": 16, "sparsity_factor": 0.75}}}},
    "prune 0.25": {"prune": {"heads": 0.25}},
    "linformer k64": {"model": {"attention": {"kernel": "linformer", "linformer": {"k": 64}}}},
    "block_sparse b64 s0.9": {"model": {"attention": {"kernel": "block_sparse", "block_sparse": {
        "block_size": 64, "sparsity_factor": 0.9}}}},
    "prune 0.5": {"prune": {"heads": 0.5}},
    "linformer k128": {"model": {"attention": {"kernel": "linformer", "linformer": {"k": 128}}}},
    "block_sparse b32 s0.5 + prune 0.25": {"model": {"attention": {"kernel": "block_sparse", "block_sparse": {
        "block_size": 32, "sparsity_factor": 0.5}}}, "prune": {"heads": 0.25}},
    "linformer k256": {"model": {"attention": {"kernel": "linformer", "linformer": {"k": 256}}}},
}


def merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def quickstart(args) -> tuple[dict, dict, dict]:
    doc = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    trial = doc["trial"]
    trial["hardware"] = {"num_threads": 1}
    trial["measure"] = {**trial.get("measure", {}), "memory": False}
    finetune = dict(doc.get("finetune") or {})
    if args.quick:
        # one stdlib package as the corpus: the same byte budget, without listing the whole stdlib
        # (and any site-packages under it) for every trial's task
        corpus = str(Path(sysconfig.get_paths()["stdlib"]) / "asyncio")
        trial = merge(trial, {"task": {"max_length": 64, "max_bytes": 200_000, "root": corpus},
                              "model": {"hidden_size": 16, "num_heads": 4},
                              "train": {"eval_target_se": None, "eval_max_examples": 64},
                              "measure": {"min_seconds": 0.0, "max_rounds": 1}})
    finetune["steps"] = args.finetune_steps
    return trial, finetune, doc["base"]


def unigram_baseline(task) -> float:
    """Accuracy of predicting the most frequent masked byte of train at every scored eval unit."""
    import torch

    from omninet.tasks.base import IGNORE_INDEX

    train = task.split("train")
    counts = torch.zeros(task.vocab_size, dtype=torch.long)
    for i in range(min(len(train), 2000)):
        labels = train[i]["labels"]
        labels = labels[labels != IGNORE_INDEX]
        counts += torch.bincount(labels, minlength=task.vocab_size)
    mode = int(counts.argmax())
    right = total = 0
    for batch in task.batches("eval", 64):
        labels = batch["labels"][batch["labels"] != IGNORE_INDEX]
        right += int((labels == mode).sum())
        total += int(labels.numel())
    return right / max(total, 1)


def paired(a, b) -> dict:
    from omninet.scores import paired_difference

    return paired_difference(a, b).to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=None, help="default: the quickstart's base.train.steps")
    parser.add_argument("--scratch-steps", type=int, default=None, help="default: the base's steps")
    parser.add_argument("--finetune-steps", type=int, default=None, help="default: the quickstart's finetune.steps")
    parser.add_argument("--configs", type=int, default=6, help=f"how many of the {len(CONFIGS)} configurations")
    parser.add_argument("--sweep-trials", type=int, default=12, help="trials per sweep in the wall-time comparison")
    parser.add_argument("--quick", action="store_true", help="tiny model and task: a smoke run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch

    from omninet.trial import TrialConfig, measure, run_trial
    from omninet.trial.runners import RunContext

    torch.set_num_threads(1)
    doc_ft = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text()).get("finetune") or {}
    if args.finetune_steps is None:
        args.finetune_steps = 3 if args.quick else int(doc_ft.get("steps", 50))
    trial, finetune, base_spec = quickstart(args)
    base_steps = args.base_steps or (20 if args.quick else int(base_spec["train"]["steps"]))
    scratch_steps = args.scratch_steps or base_steps
    names = list(CONFIGS)[: (3 if args.quick else args.configs)]
    load_before = measure.load_average()
    started = time.perf_counter()

    base_cfg = merge(trial, {"train": {"steps": base_steps}})
    t0 = time.perf_counter()
    base = run_trial(base_cfg, context=RunContext(keep_model=True))
    base_wall = time.perf_counter() - t0
    if base.status != "ok":
        print(f"base failed: {base.error}", file=sys.stderr)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="omninet-base-"))
    for name, data in base.model_files.items():
        (folder / name).write_bytes(data)
    task = TrialConfig.from_dict(base_cfg).task_obj
    unigram = unigram_baseline(task)

    def derived_cfg(overrides: dict) -> dict:
        return {**merge(trial, overrides), "base": str(folder), "finetune": finetune}

    ref = run_trial({**derived_cfg({}), "finetune": {**finetune, "steps": 0}})  # the base as every trial sees it
    rows = []
    for name in names:
        overrides = CONFIGS[name]
        t0 = time.perf_counter()
        d = run_trial(derived_cfg(overrides))
        d_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        s = run_trial(merge(trial, {**overrides, "train": {"steps": scratch_steps}}))
        s_wall = time.perf_counter() - t0
        if d.status != "ok" or s.status != "ok":
            rows.append({"config": name, "derived_status": d.status, "scratch_status": s.status,
                         "error": d.error or s.error})
            continue
        zs, ft = paired(d.scores_zero_shot, ref.scores), paired(d.scores, ref.scores)
        rows.append({
            "config": name, "passes": d.passes,
            "zero_shot": d.accuracy_zero_shot, "finetuned": d.accuracy, "finetuned_se": d.accuracy_se,
            "scratch": s.accuracy, "scratch_se": s.accuracy_se,
            "zero_shot_vs_base": zs, "finetuned_vs_base": ft,
            "derived_vs_scratch": paired(d.scores, s.scores),
            "finetune_seconds": d.finetune_seconds, "scratch_train_seconds": s.train_seconds,
            "finetune_time_fraction": d.finetune_seconds / s.train_seconds,
            "derived_wall_s": d_wall, "scratch_wall_s": s_wall,
            "latency_p50_ms": d.latency_p50_ms, "scratch_latency_p50_ms": s.latency_p50_ms,
        })
        print(f"{name}: zero-shot {d.accuracy_zero_shot:.4f} fine-tuned {d.accuracy:.4f} scratch {s.accuracy:.4f} "
              f"({d_wall:.0f} s vs {s_wall:.0f} s)", file=sys.stderr, flush=True)
    done = [r for r in rows if "finetuned" in r]

    from scipy.stats import spearmanr

    rho = spearmanr([r["zero_shot"] for r in done], [r["finetuned"] for r in done]).statistic if len(done) >= 3 else None
    rho = None if rho is None or not math.isfinite(rho) else float(rho)  # constant accuracies (a smoke) rank nothing
    beyond = lambda d: d["hi"] < 0  # noqa: E731 -- a drop beyond its paired 95% interval
    attention = [r for r in done if not r["config"].startswith("prune")]
    pruning = [r for r in done if r["config"].startswith("prune")]
    mean_d = sum(r["derived_wall_s"] for r in done) / max(len(done), 1)
    mean_s = sum(r["scratch_wall_s"] for r in done) / max(len(done), 1)
    n = args.sweep_trials
    sweep_derived, sweep_scratch = base_wall + n * mean_d, n * mean_s
    summary = {
        "base_accuracy": base.accuracy, "base_accuracy_se": base.accuracy_se, "unigram_baseline": unigram,
        "base_over_unigram": base.accuracy / unigram if unigram else None,
        "target_base_2x_unigram": bool(unigram and base.accuracy >= 2 * unigram),
        "derived_not_worse_than_scratch": {r["config"]: r["derived_vs_scratch"]["hi"] >= 0 for r in done},
        "finetune_time_at_most_quarter": {r["config"]: r["finetune_time_fraction"] <= 0.25 for r in done},
        "attention_drop_beyond_interval": [r["config"] for r in attention
                                           if beyond(r["zero_shot_vs_base"]) and beyond(r["finetuned_vs_base"])],
        "pruning_drop_beyond_interval": [r["config"] for r in pruning
                                         if beyond(r["zero_shot_vs_base"]) and beyond(r["finetuned_vs_base"])],
        "finetuned_drop_within_interval": [r["config"] for r in done if not beyond(r["finetuned_vs_base"])],
        "sweep_trials": n, "sweep_wall_derived_s": sweep_derived, "sweep_wall_scratch_s": sweep_scratch,
        "sweep_wall_ratio": sweep_derived / sweep_scratch if sweep_scratch else None,
        "derived_mean_accuracy": sum(r["finetuned"] for r in done) / max(len(done), 1),
        "scratch_mean_accuracy": sum(r["scratch"] for r in done) / max(len(done), 1),
        "spearman_zero_shot_vs_finetuned": rho,
    }
    report = {
        "benchmark": "trained_base",
        "setup": {"quick": args.quick, "base_steps": base_steps, "scratch_steps": scratch_steps,
                  "finetune": finetune, "threads": 1, "task": trial["task"], "model": trial["model"],
                  "eval_target_se": trial["train"].get("eval_target_se"), "configs": names},
        "base": {"accuracy": base.accuracy, "accuracy_se": base.accuracy_se, "eval_rows": base.eval_rows,
                 "eval_units": base.eval_units, "train_seconds": base.train_seconds, "wall_s": base_wall,
                 "latency_p50_ms": base.latency_p50_ms, "reference_accuracy": ref.accuracy},
        "configs": rows,
        "summary": summary,
        "conditions": {"machine": measure.machine_facts(), "load_avg_before": load_before,
                       "load_avg_after": measure.load_average(), "wall_s": time.perf_counter() - started,
                       "pid_cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None},
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
