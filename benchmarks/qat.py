"""fp32, post-training dynamic int8 and quantization-aware int8 on quickstart ListOps, in one budget.

    python benchmarks/qat.py [--steps 400] [--repeats 5] [--out results.json]
    python benchmarks/qat.py --quick --out smoke.json         # smoke mode (CI), well under a minute

One steps budget (deterministic on CPU) and one seed for all three:

- ``fp32``: the trial's fp32 training; evaluated as trained.
- ``ptq_int8``: the same trained fp32 weights, Linear layers quantized afterwards
  (``omninet.hardware.quantize_int8``: dynamic int8, the trial's ``precision: int8``).
- ``qat_int8``: trained from the same initialization with fake-quantized Linear layers
  (``prepare_qat``: per-channel int8 weights), then converted (``convert_qat``; the trial's
  ``precision: qat_int8``).

Accuracy is on the same held-out examples. Latency is batch 1 at the task's full length, with
the trial's latency loop (warm-up, then at least ``--latency-reps`` calls and
``--min-seconds``); the three models are timed in interleaved rounds, ``--repeats`` times, and
the median of the per-round medians is reported with their spread, so drift on a shared machine
hits all three alike. The machine (CPU model, flags, cores, torch) and the load average before
and after are recorded with the figures.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)


def build(args):
    from omninet.trial import TrialConfig

    return TrialConfig.from_dict({
        "task": {"name": "listops", "preset": "quickstart", **({"num_train": 2000, "num_eval": 200} if args.quick else {})},
        "model": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "ff_ratio": 2.0, "dropout": 0.0},
        "train": {"steps": args.steps, "batch_size": 32, "lr": 1e-3, "warmup_steps": min(20, args.steps), "seed": 0,
                  "eval_max_examples": args.eval_examples},
        "hardware": {"device": "cpu", "num_threads": args.threads},
    })


def trained(cfg, *, qat: bool):
    from omninet.hardware import prepare_qat
    from omninet.model import OmniNetModel
    from omninet.trial import loop, measure
    from omninet.trial.config import TrialResult

    plan = loop.resolve_plan(cfg.hardware)
    torch.manual_seed(cfg.train.seed)
    model = OmniNetModel(cfg.model_config)
    if qat:
        prepare_qat(model)
    opt = loop.make_optimizer(model, cfg.train)
    res = TrialResult(status="ok")
    loop.train(model, opt, cfg.task_obj, cfg.train, plan, res, measure.MeasureGate())
    return model, plan, res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-examples", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5, help="interleaved latency rounds (median reported)")
    p.add_argument("--latency-reps", type=int, default=50)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke mode: 10 steps, 200 eval examples, 2 short rounds")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_examples, args.repeats, args.latency_reps, args.min_seconds = 10, 200, 2, 20, 0.05

    from omninet.hardware import convert_qat, int8_engine, quantize_int8
    from omninet.trial import loop, measure

    torch.set_num_threads(args.threads)
    cfg = build(args)
    task, gate = cfg.task_obj, measure.MeasureGate()
    start = time.perf_counter()
    fp32, plan, fp32_res = trained(cfg, qat=False)
    qat, _, qat_res = trained(cfg, qat=True)
    models = {"fp32": fp32.eval(), "ptq_int8": quantize_int8(copy.deepcopy(fp32)), "qat_int8": convert_qat(qat)}
    train_s = time.perf_counter() - start
    rows = {}
    for name, model in models.items():
        metrics = loop.evaluate(model, task, cfg.train, plan, gate)
        curve = (qat_res if name == "qat_int8" else fp32_res).loss_curve
        rows[name] = {"accuracy": metrics["accuracy"], "eval_loss": metrics["loss"], "final_train_loss": curve[-1],
                      "p50_ms_rounds": []}
    one = task.measurement_batch(1, cfg.seq_length)

    def infer(model):
        with torch.no_grad():
            return model(one["input_ids"], attention_mask=one["attention_mask"]).logits

    load_before = measure.load_average()
    for _ in range(args.repeats):
        for name, model in models.items():  # interleaved: drift on a shared machine hits all three alike
            lat = measure.latency(lambda m=model: infer(m), warmup=3, min_reps=args.latency_reps,
                                  min_seconds=args.min_seconds, max_cv=0.05, max_rounds=2)
            rows[name]["p50_ms_rounds"].append(lat.p50_ms)
    load_after = measure.load_average()
    for row in rows.values():
        r = row["p50_ms_rounds"]
        row["latency_p50_ms_median"] = statistics.median(r)
        row["latency_p50_ms_spread"] = max(r) - min(r)
    base = rows["fp32"]
    for name in ("ptq_int8", "qat_int8"):
        rows[name]["accuracy_change_points"] = 100 * (rows[name]["accuracy"] - base["accuracy"])
        rows[name]["latency_speedup"] = base["latency_p50_ms_median"] / rows[name]["latency_p50_ms_median"]
    result = {
        "benchmark": "qat", "task": "listops quickstart", "quick": args.quick, "steps": args.steps,
        "eval_examples": args.eval_examples, "batch_size": cfg.train.batch_size, "seq_length": cfg.seq_length,
        "latency": {"batch": 1, "repeats": args.repeats, "min_reps": args.latency_reps, "min_seconds": args.min_seconds,
                    "threads": args.threads, "statistic": "median over interleaved rounds of each round's p50"},
        "int8_engine": int8_engine(), "train_seconds_total": train_s, "rows": rows,
        "conditions": {"machine": measure.machine_facts(), "load_avg_before": load_before, "load_avg_after": load_after},
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
