"""Bounded sparse decoding (issue 32 item 3): KV memory and decode time per token while a tiny
decoder generates 4K, 16K and 64K tokens, sink + window layout against dense attention.

    python benchmarks/bounded_decoding.py --out benchmarks/results/bounded_decoding.json
    python benchmarks/bounded_decoding.py --quick --out smoke.json     # 256 / 512 / 1K tokens

Each layout generates in a fresh child process (one torch thread, batch 1, greedy, fp32, rotary
positions, a model trained for ``--trained`` tokens: the bounded layout generates far past it):
a prompt of ``--prompt`` tokens, then one token per call through ``KVCache`` up to the longest
length. At each length L it records the cache's bytes (``KVCache.nbytes``, what it holds;
``allocated_bytes``, its buffers) beside ``kv_cache_bytes(config, 1, L)``, and the process's peak
RSS so far (``ru_maxrss``) and its growth over the RSS after the prompt. Decode time per token is
the median (and quartiles) of the ``--window`` steps that end at each depth P, 4P and 16P (P the
shortest length), timed step by step inside the same generation; the bounded layout's ratio
16P / P (target <= 1.15) sits beside dense's. Dense attention is ``kernel='sdpa'`` over a
preallocated cache (as ``generate`` sizes it): its bytes grow with L. The machine, its load
before and after each child and the children's order are recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _report import emit  # benchmarks/ is on sys.path when a benchmark runs

from omninet.trial.measure import load_average, machine_facts

_CHILD = r"""
import json, resource, statistics, sys, time
import psutil, torch
from omninet.config import ModelConfig
from omninet.model import KVCache, OmniNetModel, kv_cache_bytes

args = json.loads(sys.argv[1])
torch.set_num_threads(1)
torch.manual_seed(0)
attention = {"kernel": "block_sparse", "block_sparse": {"block_size": args["block"], "pattern": "sink_window",
             "window_blocks": args["window_blocks"], "sink_blocks": args["sink_blocks"]}} if args["layout"] == "sink_window" \
    else {"kernel": "sdpa"}
cfg = ModelConfig(arch="decoder", vocab_size=256, hidden_size=args["hidden"], num_layers=args["layers"], num_heads=4,
                  max_seq_length=args["trained"], dropout=0.0, position={"kind": "rotary"}, attention=attention)
model = OmniNetModel(cfg).eval()
lengths, window = sorted(args["lengths"]), args["window"]
cache = KVCache(capacity=lengths[-1] if args["layout"] == "dense" else None)
proc = psutil.Process()
rows, steps = [], []
with torch.inference_mode():
    nxt = model(torch.randint(0, 256, (1, args["prompt"])), cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    rss_after_prompt = proc.memory_info().rss
    for n in range(args["prompt"], lengths[-1]):
        start = time.perf_counter()
        nxt = model(nxt, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - start)  # step n writes position n: depth n + 1 afterwards
        if n + 1 in lengths:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            times = sorted(steps[-window:])
            q = statistics.quantiles(times, n=4)
            rows.append({"tokens": n + 1, "cache_nbytes": cache.nbytes(), "cache_allocated_bytes": cache.allocated_bytes(),
                         "formula_bytes": kv_cache_bytes(cfg, 1, n + 1), "peak_rss_mb": peak / 2**20,
                         "peak_rss_growth_mb": (peak - rss_after_prompt) / 2**20,
                         "decode_ms_p50": 1e3 * statistics.median(times), "decode_ms_q1": 1e3 * q[0],
                         "decode_ms_q3": 1e3 * q[2], "steps_timed": len(times)})
print(json.dumps({"rows": rows, "rss_after_prompt_mb": rss_after_prompt / 2**20,
                  "ring_tokens": None if args["layout"] == "dense" else
                  (args["sink_blocks"] + args["window_blocks"]) * args["block"]}))
"""


def run_child(layout: str, args) -> dict:
    spec = {"layout": layout, "lengths": args.lengths, "prompt": args.prompt, "window": args.window, "block": args.block,
            "window_blocks": args.window_blocks, "sink_blocks": args.sink_blocks, "hidden": args.hidden,
            "layers": args.layers, "trained": args.trained}
    before = load_average()
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the {layout} child failed: {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"load_before": before, "load_after": load_average(), **result}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536], help="P, 4P, 16P")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--window", type=int, default=256, help="decode steps timed per depth")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--window-blocks", type=int, default=8)
    p.add_argument("--sink-blocks", type=int, default=1)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--trained", type=int, default=1024, help="max_seq_length of the model (rotary generates past it)")
    p.add_argument("--quick", action="store_true", help="smoke mode: 256 / 512 / 1024 tokens, a 2-block window")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.window, args.block, args.window_blocks, args.hidden, args.layers = [256, 512, 1024], 64, 32, 2, 64, 2
    lengths = sorted(args.lengths)
    if len(lengths) < 2 or lengths[0] <= args.prompt or args.window < 4 or args.window > lengths[0] - args.prompt:
        print(f"--lengths must be >= 2 lengths above --prompt ({args.prompt}) and --window (4 .. first length - prompt), "
              f"got {args.lengths} and {args.window}", file=sys.stderr)
        return 2
    runs = {layout: run_child(layout, args) for layout in ("sink_window", "dense")}
    summary = {}
    for layout, run in runs.items():
        rows = run["rows"]
        first, last = rows[0], rows[-1]
        summary[layout] = {
            "cache_bytes": [r["cache_nbytes"] for r in rows],
            "cache_equals_formula": all(r["cache_nbytes"] == r["formula_bytes"] for r in rows),
            "cache_bytes_flat": len({r["cache_nbytes"] for r in rows}) == 1,
            "allocated_bytes": [r["cache_allocated_bytes"] for r in rows],
            "peak_rss_ratio_last_to_first": last["peak_rss_mb"] / first["peak_rss_mb"],
            "decode_ms_p50": [r["decode_ms_p50"] for r in rows],
            "decode_ratio_last_to_first": last["decode_ms_p50"] / first["decode_ms_p50"],
        }
    bounded = summary["sink_window"]
    result = {
        "benchmark": "bounded_decoding",
        "machine": machine_facts(),
        "conditions": "one child process per layout (sink_window first), 1 torch thread, batch 1, greedy, fp32, "
                      "inference_mode; decode time = median of the last --window steps before each depth",
        "model": {"vocab": 256, "hidden": args.hidden, "layers": args.layers, "heads": 4, "positions": "rotary",
                  "max_seq_length": args.trained},
        "layout": {"block_size": args.block, "sink_blocks": args.sink_blocks, "window_blocks": args.window_blocks,
                   "ring_tokens": (args.sink_blocks + args.window_blocks) * args.block},
        "lengths": lengths,
        "runs": runs,
        "summary": summary,
        "targets": {
            "bounded_cache_equals_formula_and_flat": {"met": bounded["cache_equals_formula"] and bounded["cache_bytes_flat"]},
            "bounded_peak_rss_within_10pct": {"value": bounded["peak_rss_ratio_last_to_first"], "target": "<= 1.10",
                                              "met": bounded["peak_rss_ratio_last_to_first"] <= 1.10},
            "bounded_decode_16P_over_P": {"value": bounded["decode_ratio_last_to_first"], "target": "<= 1.15",
                                          "met": bounded["decode_ratio_last_to_first"] <= 1.15,
                                          "dense_beside_it": summary["dense"]["decode_ratio_last_to_first"]},
        },
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
