"""What a family map is: a config translation both ways and a table of tensor names.

A ``Rule`` says how one OmniNet tensor is made from Hugging Face tensors: their rows
concatenated (q, k, v into the fused ``qkv``), each transposed first where the family stores
``(in, out)`` weights (GPT-2's Conv1D). The same rule, run backwards, splits an OmniNet tensor
into the family's tensors on export, so import and export cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from omninet.config import ModelConfig

__all__ = ["Rule", "Family", "refuse", "hf_get"]


@dataclass(frozen=True)
class Rule:
    ours: str  # OmniNet state-dict name
    theirs: tuple[str, ...]  # the family's names, concatenated along rows in this order
    transpose: bool = False  # the family stores (in, out)

    def gather(self, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        parts = [get(n) for n in self.theirs]
        parts = [p.t() if self.transpose and p.dim() == 2 else p for p in parts]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)

    def split(self, tensor: torch.Tensor, sizes: list[int]) -> dict[str, torch.Tensor]:
        """The inverse of ``gather``: ``sizes`` are the row counts of ``theirs``."""
        parts = tensor.split(sizes, dim=0) if len(sizes) > 1 else (tensor,)
        return {n: (p.t() if self.transpose and p.dim() == 2 else p).contiguous() for n, p in zip(self.theirs, parts)}


@dataclass(frozen=True)
class Family:
    """One pretrained family (GPT-2, Llama-style decoders, BERT/RoBERTa).

    ``to_config(hf_config, **options)`` -> ModelConfig, refusing what OmniNet cannot express;
    ``rules(config, hf_config)`` -> the tensor table (head and prefix chosen from hf_config);
    ``to_hf_config(config)`` -> the config.json that transformers reads back;
    ``owns(config)`` says whether an OmniNet config is of this family (for export)."""

    name: str
    model_types: tuple[str, ...]
    to_config: Callable[..., ModelConfig]
    rules: Callable[[ModelConfig, dict], list[Rule]]
    to_hf_config: Callable[[ModelConfig], dict]
    owns: Callable[[ModelConfig], bool]
    ignored: tuple[str, ...] = ()  # suffixes of checkpoint tensors that are not weights (old buffers)


def refuse(message: str) -> None:
    raise ValueError(message)


def hf_get(hf: dict, *keys, default=None):
    """The first of ``keys`` present (not None) in an HF config dict."""
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    return default


ACTIVATIONS_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "relu": "relu", "silu": "silu", "swish": "silu"}
ACTIVATIONS_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}


def activation_in(name: str, key: str) -> str:
    if name not in ACTIVATIONS_IN:
        refuse(f"{key}={name!r} is not supported; OmniNet has {', '.join(sorted(ACTIVATIONS_IN))}")
    return ACTIVATIONS_IN[name]
