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

Padding section (issue 25; ``--suite padding`` runs only it): the quickstart-sized
``OmniNetModel`` encoder (hidden 64, 2 layers, 4 heads, ff 256, fp32, B=2, a classifier head)
with the [B, N] attention mask the trial runner and the server always pass: no mask, all-True,
and 25% end padding on the second row. Inference at N=1024: dense SDPA against block-sparse at
75% sparsity, block 16 and 64. Training step (forward + backward of the loss) at N=256 and
1024, block 16 and 64, sparsity 0.5 and 0.85, against dense with the same mask. The cells of
one comparison are timed round robin in one run, medians of ``--padding-reps``; block-sparse
layers use ``min_seq_length=0`` so their sparse path runs at every N.
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
from omninet.trial.measure import machine_facts, peak_memory_mb  # noqa: E402
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


# ---- padding section (issue 25) ---------------------------------------------------------
def quickstart_model(kernel: str, n: int, block: int = 16, sparsity: float = 0.75, hidden: int = 64):
    from omninet.config import AttentionConfig, BlockSparseConfig, ModelConfig
    from omninet.model import OmniNetModel

    torch.manual_seed(0)
    cfg = ModelConfig(arch="encoder", vocab_size=260, hidden_size=hidden, num_layers=2, num_heads=4, ff_ratio=4.0,
                      max_seq_length=n, dropout=0.0, num_classes=2, attention=AttentionConfig(
                          kernel=kernel, block_sparse=BlockSparseConfig(block_size=block, sparsity_factor=sparsity,
                                                                        min_seq_length=0)))
    return OmniNetModel(cfg)


def attention_mask(kind: str, B: int, n: int):
    if kind == "none":
        return None
    mask = torch.ones(B, n, dtype=torch.bool)
    if kind == "pad25_half":
        mask[1::2, n - n // 4 :] = False
    return mask


def padding_section(args) -> dict:
    from attention_kernels import interleaved_ms

    B, rows = 2, []

    def step_fn(model, ids, mask, train):
        labels = torch.zeros(B, dtype=torch.long)
        if not train:
            def run():
                with torch.no_grad():
                    model(ids, attention_mask=mask)
            return run

        def run():
            model.zero_grad(set_to_none=True)
            model(ids, attention_mask=mask, labels=labels).loss.backward()
        return run

    def compare(n, variants, masks, train):
        """One comparison: every (variant, mask) cell timed round robin; ratios stay within it."""
        ids = torch.randint(1, 260, (B, n), generator=torch.Generator().manual_seed(n))
        runs, comparison = {}, len({r["comparison"] for r in rows})
        for name, model in variants.items():
            model.train(train)
            for m in masks:
                runs[(name, m)] = step_fn(model, ids, attention_mask(m, B, n), train)
        for (name, m), t in interleaved_ms(runs, reps=args.padding_reps, warmup=args.warmup).items():
            rows.append({"comparison": comparison, "variant": name, "n": n,
                         "mode": "train_step" if train else "inference", "mask": m, **t})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    n = args.padding_n
    compare(n, {"dense": quickstart_model("sdpa", n), **{f"block_sparse_b{b}_s0.75": quickstart_model(
        "block_sparse", n, b, 0.75) for b in args.padding_blocks}}, ("none", "all_true", "pad25_half"), False)
    for n in args.padding_fb_sizes:
        for b in args.padding_blocks:
            compare(n, {"dense": quickstart_model("sdpa", n), **{f"block_sparse_b{b}_s{s:g}": quickstart_model(
                "block_sparse", n, b, s) for s in args.padding_fb_sparsities}}, ("all_true", "pad25_half"), True)
    dense = {(r["comparison"], r["mask"]): r for r in rows if r["variant"] == "dense"}
    ratios, targets = [], {}
    for r in rows:
        if r["variant"] != "dense":
            d = dense[(r["comparison"], r["mask"])]
            ratios.append({"variant": r["variant"], "n": r["n"], "mode": r["mode"], "mask": r["mask"],
                           "vs_dense_same_mask": round(r["median_ms"] / d["median_ms"], 3),
                           # with more threads, OpenMP's spinning workers count as CPU time
                           "vs_dense_same_mask_cpu": round(r["median_cpu_ms"] / d["median_cpu_ms"], 3)
                           if torch.get_num_threads() == 1 else None})
    n = args.padding_n
    inf = [x for x in ratios if x["mode"] == "inference" and x["n"] == n and x["mask"] != "none"]
    fb = [x for x in ratios if x["mode"] == "train_step"]
    def worst(rs, key="vs_dense_same_mask"):
        return max((x[key] for x in rs if x[key] is not None), default=None)

    def target(rs, op, bound):
        """Judged on wall-clock medians; the CPU-time ratio beside it."""
        v = worst(rs)
        return {"value": v, "value_cpu": worst(rs, "vs_dense_same_mask_cpu"), "target": f"{op} {bound}",
                "met": None if v is None else (v <= bound if op == "<=" else v < bound)}

    for b in args.padding_blocks:
        targets[f"inference_n{n}_block{b}_s0.75_masked_vs_dense"] = target(
            [x for x in inf if x["variant"] == f"block_sparse_b{b}_s0.75"], "<=", 0.8)
    for s_, op, bound in ((min(args.padding_fb_sparsities), "<=", 1.2), (max(args.padding_fb_sparsities), "<", 1.0)):
        targets[f"train_step_s{s_:g}_vs_dense_worst"] = target([x for x in fb if x["variant"].endswith(f"_s{s_:g}")],
                                                                op, bound)
        targets[f"train_step_n1024_s{s_:g}_vs_dense_worst"] = target(
            [x for x in fb if x["variant"].endswith(f"_s{s_:g}") and x["n"] >= 1024], op, bound)
    return {"rows": rows, "ratios": ratios, "targets": targets,
            "model": {"hidden": 64, "layers": 2, "heads": 4, "ff": 256, "batch": B, "dtype": "float32"}}


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
    p.add_argument("--suite", choices=("all", "seed", "padding"), default="all",
                   help="seed: the seed API table; padding: the padding section (issue 25); all: both")
    p.add_argument("--padding-n", type=int, default=1024)
    p.add_argument("--padding-blocks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--padding-fb-sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--padding-fb-sparsities", type=float, nargs="+", default=[0.5, 0.85])
    p.add_argument("--padding-reps", type=int, default=21)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.layers, args.hidden, args.heads, args.reps = [1100], 1, 32, 2, 3
        args.padding_n, args.padding_blocks, args.padding_fb_sizes, args.padding_reps = 128, [16], [64], 3
    if args.first_call_child:
        variant, n = args.first_call_child[0], int(args.first_call_child[1])
        model = build(VARIANTS[variant], args, max(args.sizes))
        torch.manual_seed(1)
        print(json.dumps({"peak_mb": forward_peak(model, torch.randn(1, n, args.hidden))}))
        return None
    t0, load_before = time.perf_counter(), os.getloadavg()
    rows = []
    models = {name: build(flags, args, max(args.sizes)) for name, flags in VARIANTS.items()} if args.suite != "padding" \
        else {}
    for n in (args.sizes if models else []):
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
    targets = {} if models else {"seed_table": "skipped (--suite padding)"}
    if 4096 in args.sizes and models:
        s = speedups["block_sparse/n=4096"]
        targets["block_sparse_fwd_speedup_n4096"] = {"value": s, "target": ">= 1.8", "met": s >= 1.8}
    n_mem = 4096 if 4096 in args.sizes else max(args.sizes)
    for key in ("peak_mb", "peak_mb_first_call") if models else ():
        a, b = by[("block_sparse", n_mem)].get(key), by[("dense", n_mem)].get(key)
        if a is not None and b is not None:
            targets[f"block_sparse_{key}_vs_dense_n{n_mem}"] = {"value": round(a / b, 3), "target": "<= 1.0",
                                                                "met": a <= b}
    if 2048 in args.sizes and models:
        s = speedups["hybrid/n=2048"]
        targets["hybrid_not_slower_than_dense_n2048"] = {"value": s, "target": ">= 1.0", "met": s >= 1.0}
    if models:
        hybrid = [speedups[f"hybrid/n={n}"] for n in sorted(args.sizes)]
        targets["hybrid_speedup_grows_with_n"] = {"value": hybrid, "met": all(b >= a for a, b in zip(hybrid, hybrid[1:]))}
    padding = padding_section(args) if args.suite != "seed" else None
    doc = {"benchmark": "model_sparse", "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_info(),
                           "load_avg_before": load_before, "load_avg_after": os.getloadavg()},
           "machine": machine_facts(), "rows": rows, "speedup_vs_dense": speedups, "targets": targets,
           "padding": padding, "wall_seconds": round(time.perf_counter() - t0, 1)}
    emit(doc, args.out)
    return doc


if __name__ == "__main__":
    main()
