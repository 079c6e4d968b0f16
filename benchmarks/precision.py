"""CPU inference latency by precision: fp32, bf16 autocast, layer-wise mixed, int8 dynamic.

    .venv/bin/python benchmarks/precision.py [--reps 9] [--out precision.json] [--smoke]

Mid-size encoder (6 layers, hidden 512, 8 heads, FFN 2048, seq 1024, batch 1, 4-class head).
For each precision: median / p90 forward latency over ``--reps`` timed runs after warm-up,
the speed-up over fp32, and the output deltas against fp32 on held-out inputs (relative L2
error of the final hidden states and of the logits, and agreement of the predicted class).
The model is untrained (random init), so "agreement" compares predictions, not task accuracy.
``mixed``: a plan measured on a separate calibration batch (error budget ``--budget``), applied
with weights stored in bf16 in the low-precision blocks (inference). JSON on stdout and in --out.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omninet import ModelConfig, OmniNetModel  # noqa: E402
from omninet.hardware import (  # noqa: E402
    apply_precision,
    cpu_flags,
    get_backend,
    int8_engine,
    plan_mixed_precision,
    quantize_int8,
    set_block_precision,
)
from omninet.trial.measure import machine_facts  # noqa: E402
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)


def timed(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def deltas(out, ref) -> dict:
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    return {"hidden_rel_err": rel(out.hidden_states, ref.hidden_states), "logits_rel_err": rel(out.logits, ref.logits),
            "prediction_agreement": float((out.logits.argmax(-1) == ref.logits.argmax(-1)).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=1e-2, help="mixed precision error budget (relative L2 of logits)")
    ap.add_argument("--eval-batches", type=int, default=4, help="held-out sequences for the output deltas")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 reps (CI)")
    args = ap.parse_args()
    if args.reps < 1 or args.warmup < 0 or args.budget <= 0:
        raise ValueError("--reps >= 1, --warmup >= 0 and --budget > 0 are required")
    dims = dict(hidden_size=512, num_layers=6, num_heads=8, max_seq_length=1024)
    if args.smoke:
        dims, args.reps, args.warmup, args.eval_batches = dict(hidden_size=64, num_layers=4, num_heads=4, max_seq_length=64), 2, 1, 2
    seq = dims["max_seq_length"]
    cfg = ModelConfig(arch="encoder", vocab_size=8000, ff_ratio=4.0, dropout=0.0, num_classes=4, **dims)
    torch.manual_seed(0)
    base = OmniNetModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    calib = {"input_ids": torch.randint(0, cfg.vocab_size, (2, seq), generator=gen)}
    evals = [torch.randint(0, cfg.vocab_size, (1, seq), generator=gen) for _ in range(args.eval_batches)]
    bench_ids = evals[0]
    cpu = get_backend("cpu")
    bf16_ok = torch.bfloat16 in cpu.supported_dtypes()

    variants: dict[str, torch.nn.Module] = {"fp32": base}
    plan = None
    if bf16_ok:
        bf16 = OmniNetModel(cfg).eval()
        bf16.load_state_dict(base.state_dict())
        set_block_precision(bf16, torch.bfloat16, "cpu")  # whole-model autocast (fp32 weights)
        variants["bf16_autocast"] = bf16
        mixed = OmniNetModel(cfg).eval()
        mixed.load_state_dict(base.state_dict())
        with torch.inference_mode():
            plan = plan_mixed_precision(mixed, calib, dtype=torch.bfloat16, error_budget=args.budget)
        apply_precision(mixed, plan, cast_weights=True)
        variants["mixed"] = mixed
    variants["int8"] = quantize_int8(base)

    load_before = os.getloadavg()
    results = {}
    with torch.inference_mode():
        refs = [base(ids) for ids in evals]
        for name, model in variants.items():
            lat = timed(lambda: model(bench_ids), args.reps, args.warmup)
            outs = [model(ids) for ids in evals]
            per = [deltas(o, r) for o, r in zip(outs, refs)]
            results[name] = {"latency_ms_median": statistics.median(lat), "latency_ms_p90": sorted(lat)[max(0, math.ceil(0.9 * len(lat)) - 1)],
                             "latency_ms_all": [round(x, 2) for x in lat],
                             **{k: statistics.mean(p[k] for p in per) for k in per[0]}}
    fp32_ms = results["fp32"]["latency_ms_median"]
    for r in results.values():
        r["speedup_vs_fp32"] = fp32_ms / r["latency_ms_median"]
    report = {
        "benchmark": "precision", "machine": machine_facts(), "model": cfg.to_dict(), "batch_size": 1, "seq_len": seq, "reps": args.reps,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu.device_name(), "cpu_flags": cpu_flags(),
        "int8_engine": int8_engine(), "bf16_supported": bf16_ok, "arch": platform.machine(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "mixed_plan": None if plan is None else {k: v for k, v in plan.to_dict().items() if k != "table"} | {"table": plan.table},
        "results": results,
        "targets": {"int8_speedup>=1.5": results["int8"]["speedup_vs_fp32"] >= 1.5,
                    "bf16_speedup>=2": bf16_ok and results["bf16_autocast"]["speedup_vs_fp32"] >= 2.0},
        "note": "shared 2-core CPU: other jobs run concurrently, so latencies are noisy (see load averages)",
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
