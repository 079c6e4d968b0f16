"""Model-level latency of the seed API (``AdvancedTransformer``) with each attention flag pair.

    .venv/bin/python benchmarks/model_sparse.py [--quick] [--out results.json]

Same model (hidden 256, 4 heads, ff 1024, ``--layers`` layers, fp32, B=1, learned positions,
dropout 0) with ``use_sparse_attention`` / ``use_linformer`` = (False, False) dense SDPA,
(True, False) block-sparse at the default 12.5% density, (False, True) Linformer k=256 and
(True, True) the seed's default, the 'hybrid' kernel. Forward only (no grad), median of
``--reps`` runs after warm-up; peak memory measured as in ``attention_kernels.py``.
Targets: block-sparse >= 1.8x faster than dense at N=4096; the seed default (hybrid) not
slower than dense at N=2048 and faster as N grows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attention_kernels import median_ms, peak_bytes  # noqa: E402
from omninet.advanced import AdvancedTransformer  # noqa: E402

VARIANTS = {"dense": (False, False), "block_sparse": (True, False), "linformer": (False, True), "hybrid": (True, True)}


def build(flags, args, max_n):
    torch.manual_seed(0)
    model = AdvancedTransformer(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                                ff_dim=4 * args.hidden, max_seq_length=max_n, use_sparse_attention=flags[0],
                                use_linformer=flags[1], dropout=0.0, device_config={"device": "cpu"})
    return model.eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny model, short inputs")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.layers, args.hidden, args.heads, args.reps = [1100, 1300], 1, 32, 2, 3
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
            def run():
                with torch.no_grad():
                    model(hidden_states=x)
            row = {"variant": name, "kernel": model.config.attention.kernel, "n": n,
                   "median_ms": round(statistics.median(runs[name]), 2),
                   "runs_ms": [round(r, 2) for r in runs[name]], "peak_mb": round(peak_bytes(run) / 2**20, 2)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    by = {(r["variant"], r["n"]): r for r in rows}
    speedups = {f"{v}/n={n}": round(by[("dense", n)]["median_ms"] / by[(v, n)]["median_ms"], 3)
                for (v, n) in by if v != "dense"}
    targets = {}
    if 4096 in args.sizes:
        s = speedups["block_sparse/n=4096"]
        targets["block_sparse_fwd_speedup_n4096"] = {"value": s, "target": ">= 1.8", "met": s >= 1.8}
    if 2048 in args.sizes:
        s = speedups["hybrid/n=2048"]
        targets["hybrid_not_slower_than_dense_n2048"] = {"value": s, "target": ">= 1.0", "met": s >= 1.0}
    hybrid = [speedups[f"hybrid/n={n}"] for n in sorted(args.sizes)]
    targets["hybrid_speedup_grows_with_n"] = {"value": hybrid, "met": all(b >= a for a, b in zip(hybrid, hybrid[1:]))}
    doc = {"benchmark": "model_sparse", "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                           "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
           "rows": rows, "speedup_vs_dense": speedups, "targets": targets,
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return doc


if __name__ == "__main__":
    main()
