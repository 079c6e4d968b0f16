"""Attention-block latency and parameters with fewer heads: physical pruning vs. per-input gating.

One command, JSON out (stdout, and ``--out FILE``)::

    python benchmarks/head_pruning.py                  # CPU fp32, B=4, N=1024, C=512, H=8
    python benchmarks/head_pruning.py --smoke          # tiny sizes, seconds (CI)

For 100/75/50/25% of the heads it times one self-attention block (``omninet.model.Attention``:
fused qkv projection, SDPA kernel, output projection) forward under ``torch.inference_mode``:

- ``pruned``: heads physically removed (``OmniNetModel.prune_heads``), so the projections are
  smaller matrices;
- ``gated``: all H heads kept, a sequence-level router picks ``active_heads`` per sequence, and
  only those heads' qkv rows / o_proj columns are gathered and applied (batched matmuls).

Variants are timed round-robin (one rep of each in turn) so that load from other processes
hits all of them alike; medians and p90 are reported, with speedups against the full dense
block, plus FLOPs counted by ``torch.utils.flop_counter`` (deterministic, noise-free; on CPU it
counts the projections, not the flash-SDPA op).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from omninet import ModelConfig, OmniNetModel
from omninet.trial.measure import machine_facts
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)


def build_block(args, *, keep: int, gated: bool):
    heads = {"active_heads": keep} if gated else {}
    cfg = ModelConfig(arch="encoder", vocab_size=128, hidden_size=args.hidden, num_heads=args.heads, num_layers=1,
                      dropout=0.0, max_seq_length=args.seq, position={"kind": "none"},
                      attention={"kernel": args.kernel}, heads=heads)
    torch.manual_seed(0)
    model = OmniNetModel(cfg).eval()
    if not gated and keep < args.heads:
        model.prune_heads({0: list(range(keep, args.heads))})
    attn = model.attention_layers()[0]
    if gated:
        with torch.no_grad():
            attn.router.proj.weight.normal_(0, 1.0)  # varied, input-dependent choices across the batch
    return attn


def projection_params(attn) -> int:
    return sum(p.numel() for m in (attn.qkv, attn.o_proj) for p in m.parameters())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kernel", default="sdpa")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and few reps, for CI")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.hidden, args.heads, args.reps, args.warmup = 2, 64, 64, 8, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    fractions = [1.0, 0.75, 0.5, 0.25]
    variants = {}
    for frac in fractions:
        keep = max(1, round(args.heads * frac))
        for mode in ("pruned", "gated"):
            variants[(mode, frac)] = (keep, build_block(args, keep=keep, gated=mode == "gated"))
    x = torch.randn(args.batch, args.seq, args.hidden, generator=torch.Generator().manual_seed(0))
    times = {key: [] for key in variants}
    flops = {}
    with torch.inference_mode():
        for key, (_, attn) in variants.items():
            with FlopCounterMode(display=False) as counter:
                attn(x)
            flops[key] = counter.get_total_flops()
            for _ in range(args.warmup):
                attn(x)
        for _ in range(args.reps):
            for key, (_, attn) in variants.items():
                t0 = time.perf_counter()
                attn(x)
                times[key].append(time.perf_counter() - t0)
    base_key = ("pruned", 1.0)  # every head, no router: the plain block
    base_ms = statistics.median(times[base_key]) * 1e3
    base_params = projection_params(variants[base_key][1])
    rows = []
    for (mode, frac), (keep, attn) in variants.items():
        ms = statistics.median(times[(mode, frac)]) * 1e3
        router = sum(q.numel() for q in attn.router.parameters()) if attn.router is not None else 0
        rows.append({
            "mode": mode, "heads_fraction": frac, "heads_computed": keep,
            "latency_ms_p50": round(ms, 3),
            "latency_ms_p90": round(sorted(times[(mode, frac)])[int(0.9 * (args.reps - 1))] * 1e3, 3),
            "speedup_vs_all_heads": round(base_ms / ms, 3),
            "projection_params": projection_params(attn), "router_params": router,
            "projection_params_ratio": round(projection_params(attn) / base_params, 4),
            "counted_gflops": round(flops[(mode, frac)] / 1e9, 3),
            "flops_ratio": round(flops[(mode, frac)] / flops[base_key], 4),
        })
    get = {(r["mode"], r["heads_fraction"]): r for r in rows}
    result = {
        "benchmark": "head_pruning", "machine": machine_facts(),
        "setup": {"batch": args.batch, "seq": args.seq, "hidden": args.hidden, "heads": args.heads,
                  "kernel": args.kernel, "dtype": "float32", "device": "cpu", "reps": args.reps,
                  "warmup": args.warmup, "threads": torch.get_num_threads(), "torch": torch.__version__,
                  "machine": platform.machine(), "smoke": args.smoke,
                  "note": "medians of round-robin reps on a possibly shared CPU; counted_gflops come from "
                          "torch.utils.flop_counter, which counts the projections' matmuls but not the CPU "
                          "flash-SDPA op (its FLOPs also scale with the heads computed)"},
        "results": rows,
        "targets": {
            "pruned_50pct_speedup": get[("pruned", 0.5)]["speedup_vs_all_heads"],
            "pruned_50pct_speedup_target": 1.6,
            "pruned_50pct_projection_params_ratio": get[("pruned", 0.5)]["projection_params_ratio"],
            "pruned_50pct_projection_params_ratio_target": 0.5,
            "gated_half_speedup": get[("gated", 0.5)]["speedup_vs_all_heads"],
            "gated_half_speedup_target": 1.4,
        },
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
