"""OmniNet's dense encoder vs ``torch.nn.TransformerEncoder`` with the same dimensions.

    python benchmarks/dense_vs_torch.py [--quick] [--out results.json]

fp32 inference (eval, no_grad) on this machine's CPU, same thread count for both, pre-norm
blocks with GELU and a final LayerNorm on both sides. Reports median latency over several
reps (after warm-up) and peak tensor memory (``omninet.trial.measure.peak_memory_mb``), and the
ratios ours / torch (target: time <= 1.10x, memory <= 1.0x).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from omninet.config import ModelConfig, PositionConfig
from omninet.trial.measure import machine_facts, peak_memory_mb, summarize, time_fn
from omninet.model import Stack
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)


def build_pair(hidden, heads, ff, layers):
    cfg = ModelConfig(arch="encoder", vocab_size=1, hidden_size=hidden, num_heads=heads, ff_ratio=ff / hidden,
                      num_layers=layers, dropout=0.0, position=PositionConfig(kind="none"))
    ours = Stack(cfg, num_layers=layers, causal=False).eval()
    layer = nn.TransformerEncoderLayer(hidden, heads, ff, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
    theirs = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(hidden), enable_nested_tensor=False).eval()
    return ours, theirs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    hidden, heads, ff, layers = (64, 4, 256, 1) if args.quick else (512, 8, 2048, 2)
    seqs, batches = ([64, 128], [1, 2]) if args.quick else ([512, 2048], [1, 8])
    torch.manual_seed(0)
    ours, theirs = build_pair(hidden, heads, ff, layers)
    rows = []
    for n in seqs:
        for b in batches:
            x = torch.randn(b, n, hidden)
            with torch.no_grad():
                run_ours = lambda: ours(x)
                run_theirs = lambda: theirs(x)
                t_ours, t_theirs = [], []
                for _ in range(args.reps):  # interleaved so drift hits both sides alike
                    t_ours += time_fn(run_ours, warmup=1, reps=1)
                    t_theirs += time_fn(run_theirs, warmup=1, reps=1)
                m_ours, m_theirs = peak_memory_mb(run_ours), peak_memory_mb(run_theirs)
            so, st = summarize(t_ours), summarize(t_theirs)
            rows.append({
                "seq_len": n, "batch": b,
                "ours_median_ms": so["median_s"] * 1e3, "torch_median_ms": st["median_s"] * 1e3,
                "time_ratio": so["median_s"] / st["median_s"],
                "ours_peak_mb": m_ours, "torch_peak_mb": m_theirs,
                "memory_ratio": m_ours / m_theirs if m_theirs else None,
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {
        "benchmark": "dense_vs_torch", "machine": machine_facts(), "device": "cpu", "threads": torch.get_num_threads(), "dtype": "float32",
        "mode": "inference (eval, no_grad)", "dims": {"hidden": hidden, "heads": heads, "ff": ff, "layers": layers},
        "reps": args.reps, "rows": rows,
        "targets": {"time_ratio_max": 1.10, "memory_ratio_max": 1.0},
        "pass": all(r["time_ratio"] <= 1.10 and (r["memory_ratio"] or 0) <= 1.0 for r in rows),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
