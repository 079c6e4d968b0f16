"""Tiny Hugging Face checkpoints built offline, shared by the tests that need one on disk."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

CORPUS = Path(sysconfig.get_paths()["stdlib"]) / "asyncio"


def tiny_llama_folder(out: Path) -> Path:
    """A tiny random Llama (4 query heads over 2 K/V heads, tied) with a byte-level BPE tokenizer
    trained on a few stdlib files, saved as a Hugging Face folder (needs transformers)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(p) for p in sorted(CORPUS.glob("*.py"))[:8]],
              trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=2048, tie_word_embeddings=True, eos_token_id=0,
                                   bos_token_id=None, pad_token_id=0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out
