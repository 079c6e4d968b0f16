"""Model-level latency of the seed API (``AdvancedTransformer``) with each attention flag pair.

    .venv/bin/python benchmarks/model_sparse.py [--quick] [--out results.json]

Same model (hidden 256, 4 heads, ff 1024, ``--layers`` layers, fp32, B=1, learned positions,
dropout 0) with ``use_sparse_attention`` / ``use_linformer`` = (False, False) dense SDPA,
(True, False) block-sparse at the default 12.5% density, (False, True) Linformer k=256 and
(True, True) the seed's default, the 'hybrid' kernel. Forward only (no grad), median of
``--reps`` runs after warm-up; peak tensor memory of one forward
(``omninet.trial.measure.peak_memory_mb``, the profiler's memory timeline) on a later call
(``peak_mb``) and on the model's very first call in a fresh subprocess
(``peak_mb_first_call``; ``--no-first-call`` skips it).
Targets: block-sparse >= 1.8x faster than dense at N=4096 and its forward peak <= dense's
(first and later calls); the seed default (hybrid) not slower than dense at N=2048 and
faster as N grows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_kernels import cpu_info, median_ms  # noqa: E402
from omninet.advanced import AdvancedTransformer  # noqa: E402
from omninet.trial.measure import peak_memory_mb  # noqa: E402
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)

VARIANTS = {"dense": (False, False), "block_sparse": (True, False), "linformer": (False, True), "hybrid": (True, True)}


def build(flags, args, max_n):
    torch.manual_seed(0)
    model = AdvancedTransformer(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                                ff_dim=4 * args.hidden, max_seq_length=max_n, use_sparse_attention=flags[0],
                                use_linformer=flags[1], dropout=0.0, device_config={"device": "cpu"})
    return model.eval()


def forward_peak(model, x) -> float:
    def run():
        with torch.no_grad():
            model(hidden_states=x)
    return round(peak_memory_mb(run), 2)


def first_call_peak(variant: str, n: int, args) -> float | None:
    """Peak MB of a freshly built model's first forward, in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--first-call-child", variant, str(n), "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--heads", str(args.heads), "--sizes", *map(str, args.sizes)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
    except (subprocess.SubprocessError, ValueError, IndexError, KeyError) as exc:
        print(f"first-call measurement failed for {variant} n={n}: {exc}", file=sys.stderr)
        return None


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model, short inputs")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-first-call", dest="first_call", action="store_false")
    p.add_argument("--first-call-child", nargs=2, metavar=("VARIANT", "N"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.layers, args.hidden, args.heads, args.reps = [1100], 1, 32, 2, 3
    if args.first_call_child:
        variant, n = args.first_call_child[0], int(args.first_call_child[1])
        model = build(VARIANTS[variant], args, max(args.sizes))
        torch.manual_seed(1)
        print(json.dumps({"peak_mb": forward_peak(model, torch.randn(1, n, args.hidden))}))
        return None
    t0, load_before = time.perf_counter(), os.getloadavg()
    rows = []
    models = {name: build(flags, args, max(args.sizes)) for name, flags in VARIANTS.items()}
    for n in args.sizes:
        x = torch.randn(1, n, args.hidden)
        runs = {name: [] for name in models}
        with torch.no_grad():
            for model in models.values():
                for _ in range(args.warmup):
                    model(hidden_states=x)
            for _ in range(args.reps):  # round-robin, so drift and warm-up hit every variant alike
                for name, model in models.items():
                    runs[name] += median_ms(lambda: model(hidden_states=x), reps=1, warmup=0)[1]
        for name, model in models.items():
            row = {"variant": name, "kernel": model.config.attention.kernel, "n": n,
                   "median_ms": round(statistics.median(runs[name]), 2),
                   "runs_ms": [round(r, 2) for r in runs[name]], "peak_mb": forward_peak(model, x)}
            if args.first_call and name in ("dense", "block_sparse"):
                row["peak_mb_first_call"] = first_call_peak(name, n, args)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    by = {(r["variant"], r["n"]): r for r in rows}
    speedups = {f"{v}/n={n}": round(by[("dense", n)]["median_ms"] / by[(v, n)]["median_ms"], 3)
                for (v, n) in by if v != "dense"}
    targets = {}
    if 4096 in args.sizes:
        s = speedups["block_sparse/n=4096"]
        targets["block_sparse_fwd_speedup_n4096"] = {"value": s, "target": ">= 1.8", "met": s >= 1.8}
    n_mem = 4096 if 4096 in args.sizes else max(args.sizes)
    for key in ("peak_mb", "peak_mb_first_call"):
        a, b = by[("block_sparse", n_mem)].get(key), by[("dense", n_mem)].get(key)
        if a is not None and b is not None:
            targets[f"block_sparse_{key}_vs_dense_n{n_mem}"] = {"value": round(a / b, 3), "target": "<= 1.0",
                                                                "met": a <= b}
    if 2048 in args.sizes:
        s = speedups["hybrid/n=2048"]
        targets["hybrid_not_slower_than_dense_n2048"] = {"value": s, "target": ">= 1.0", "met": s >= 1.0}
    hybrid = [speedups[f"hybrid/n={n}"] for n in sorted(args.sizes)]
    targets["hybrid_speedup_grows_with_n"] = {"value": hybrid, "met": all(b >= a for a, b in zip(hybrid, hybrid[1:]))}
    doc = {"benchmark": "model_sparse", "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_info(),
                           "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
           "rows": rows, "speedup_vs_dense": speedups, "targets": targets,
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    emit(doc, args.out)
    return doc


if __name__ == "__main__":
    main()
