"""Task accuracy of int8 dynamic quantization against fp32 on the same trained weights.

    python benchmarks/int8_accuracy.py [--steps 300] [--out results.json]
    python benchmarks/int8_accuracy.py --quick --out smoke.json      # smoke mode (CI)

Two trials of the quickstart ListOps task with the same seed and a steps budget: training is
deterministic on CPU, so both train the same fp32 weights; the int8 trial then quantizes the
Linear layers (``torch.ao`` dynamic int8) before evaluation and latency measurement. The
accuracy difference is therefore the quantization's alone (target: <= 1 point).
"""

from __future__ import annotations

import argparse
import json

from omninet.trial import run_trial
from omninet.trial.measure import machine_facts
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-examples", type=int, default=2000)
    p.add_argument("--quick", action="store_true",
                   help="smoke mode (CI): 3 steps, 32 eval examples, one short latency round")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_examples = 3, 32
    base = {
        "task": {"name": "listops", "preset": "quickstart", **({"num_train": 512, "num_eval": 64} if args.quick else {})},
        "model": {"hidden_size": 128, "num_layers": 2, "num_heads": 4},
        "train": {"steps": args.steps, "batch_size": 32, "lr": 1e-3, "seed": 0, "eval_max_examples": args.eval_examples},
        "hardware": {"device": "cpu", "num_threads": 2},
    }
    if args.quick:
        base["measure"] = {"min_seconds": 0.0, "max_rounds": 1, "batch_size": 4}
        base["hardware"]["num_threads"] = 1  # the suite runs two smokes at once on two cores
    rows = {}
    for precision in ("fp32", "int8"):
        cfg = json.loads(json.dumps(base))
        cfg["hardware"]["precision"] = precision
        r = run_trial(cfg).to_dict()
        rows[precision] = {k: r[k] for k in ("status", "accuracy", "eval_loss", "latency_p50_ms", "latency_p95_ms",
                                             "peak_memory_infer_mb", "steps")}
    delta = rows["int8"]["accuracy"] - rows["fp32"]["accuracy"]
    result = {"benchmark": "int8_accuracy", "machine": machine_facts(), "task": "listops quickstart", "eval_examples": args.eval_examples,
              "rows": rows, "accuracy_change_points": 100 * delta,
              "latency_speedup": rows["fp32"]["latency_p50_ms"] / rows["int8"]["latency_p50_ms"],
              "target": "|accuracy change| <= 1 point", "met": abs(100 * delta) <= 1.0}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
