"""GGUF files (llama.cpp's format) in, as exactly what a Hugging Face folder holds.

``read_gguf(path)`` returns the transformers ``config.json`` of the file's family, every
tensor dequantized to float32 under its transformers name, and a ``tokenizers.Tokenizer``
rebuilt from the file's vocabulary; ``gguf_to_hf(path, out_dir)`` writes those as
config.json, model.safetensors, tokenizer.json and tokenizer_config.json, so the Hugging
Face importer reads a GGUF file the way it reads any folder. The ``gguf`` library parses
and dequantizes; nothing here imports transformers.

llama.cpp's converter (convert_hf_to_gguf.py) changes a checkpoint in three ways, each
undone here: it renames tensors (``blk.{i}.attn_q.weight``; one table per family below),
it interleaves the rows of Llama's q/k projections for its rotary kernel (``_unpermute``),
and it stores GPT-2's Conv1D weights as Linear ones (transposed back). A Llama 3 rotary
scaling travels as a ``rope_freqs.weight`` tensor, turned back into ``rope_scaling``.

Dimensions: H query heads, Hk K/V heads, D head dim, C hidden, V vocabulary.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

# llama.cpp's token types (gguf.TokenType): which vocabulary entries are special.
_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class GGUFCheckpoint:
    """What a Hugging Face folder of the same model holds, read from one GGUF file."""

    config: dict[str, Any]  # transformers config.json of the family
    tensors: dict[str, torch.Tensor]  # transformers names -> float32, dequantized
    tokenizer: Tokenizer | None  # None when the file carries no vocabulary
    tokenizer_config: dict[str, Any]  # special tokens, BOS/EOS flags, chat template


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """The transformers config.json of a GGUF file, from its header alone (nothing dequantized):
    what a sweep checks its trials against before it converts the file."""
    return read_gguf(path, weights=False).config


def read_gguf(path: str | Path, *, weights: bool = True) -> GGUFCheckpoint:
    """Read a GGUF file into a transformers-shaped checkpoint (see the module docstring).

    Refuses, with a one-line ValueError, a file that is not GGUF, an architecture outside
    ``SUPPORTED_ARCHITECTURES``, a tensor the family has no place for or one it lacks, and a
    tensor type the ``gguf`` library cannot dequantize."""
    from gguf import GGUFReader  # optional: gguf (the [gguf] extra)

    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    reader = GGUFReader(path)
    meta = _Metadata(path, {key: field.contents() for key, field in reader.fields.items()})
    if meta.get("split.count", 1) > 1:
        raise ValueError(f"{path} is one part of a split GGUF (split.count={meta.need('split.count')}); "
                         f"merge the parts first with llama.cpp's `llama-gguf-split --merge`")
    arch = meta.need("general.architecture")
    if arch not in _FAMILIES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} (general.architecture) is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    family = _FAMILIES[arch]
    stored = {t.name: t for t in reader.tensors}  # each holds a view of the mapped file
    # the reader's parsed fields are small arrays, several per vocabulary entry: ~160 MB for a
    # 49k vocabulary, a third of SmolLM2's float32 weights, freed before those are made
    del reader
    shapes = _Shapes(path, {name: tuple(int(n) for n in reversed(t.shape)) for name, t in stored.items()})
    ignored = family.config_only
    if _same_data(stored.get("output.weight"), stored.get("token_embd.weight")):
        # llama.cpp's GPT-2 converter writes the tied head as a copy: keep it tied, one matrix
        shapes.pop("output.weight")
        ignored += ("output.weight",)
    config = family.config(meta, shapes)
    names = family.names(config)
    _check_names(path, arch, names, stored, ignored)

    if "rope_freqs.weight" in stored:
        config["rope_scaling"] = _llama3_scaling(path, config, _dequantize(path, stored["rope_freqs.weight"]))
    tokenizer, tokenizer_config = _tokenizer(meta)
    del meta
    tensors = {}
    for gguf_name, hf_name in (names.items() if weights else ()):
        w = _dequantize(path, stored[gguf_name])  # (rows, cols): transformers' layout
        tensors[hf_name] = torch.from_numpy(family.undo(gguf_name, w, config))
    return GGUFCheckpoint(config, tensors, tokenizer, tokenizer_config)


def gguf_to_hf(path: str | Path, out_dir: str | Path) -> Path:
    """Write a GGUF file as a Hugging Face folder (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json) that transformers' ``from_pretrained`` loads.
    Holds one float32 copy of the weights: safetensors writes straight from the tensors."""
    checkpoint = read_gguf(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(checkpoint.config, indent=2) + "\n")
    save_file(checkpoint.tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if checkpoint.tokenizer is not None:
        checkpoint.tokenizer.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(checkpoint.tokenizer_config, indent=2) + "\n")
    return out


# --- metadata -------------------------------------------------------------------------


class _Metadata:
    """The file's key/value pairs, with refusals that name the missing key."""

    def __init__(self, path: Path, values: dict[str, Any]):
        self.path, self.values = path, values

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def need(self, key: str) -> Any:
        if key not in self.values:
            raise ValueError(f"{self.path}: GGUF metadata lacks {key!r}")
        return self.values[key]

    def count(self, key: str) -> int:
        """A head count, which some files give per layer; a transformers config has one."""
        value = self.need(key)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ValueError(f"{self.path}: {key} differs between layers ({sorted(set(value))}); "
                                 f"a transformers config has one count for every layer")
            value = value[0]
        return int(value)


class _Shapes(dict):
    """Tensor name -> transformers-order shape; a missing tensor is refused by name."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]):
        super().__init__(shapes)
        self.path = path

    def __missing__(self, name: str):
        raise ValueError(f"{self.path}: the file lacks tensor {name!r}")


def _f32(value: float) -> float:
    """The shortest decimal of a float32 (the file stores 1e-05 as 9.999999747e-06)."""
    return float(str(np.float32(value)))


def _token_ids(meta: _Metadata) -> dict[str, int]:
    keys = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "pad_token_id": "padding_token_id"}
    return {hf: int(meta.get(f"tokenizer.ggml.{key}")) for hf, key in keys.items()
            if meta.get(f"tokenizer.ggml.{key}") is not None}


# --- families: a config translation and a tensor-name table each ---------------------


@dataclass(frozen=True)
class _Family:
    config: Callable[[_Metadata, _Shapes], dict]  # (meta, shapes) -> config.json
    names: Callable[[dict], dict[str, str]]  # config -> {GGUF name: transformers name}
    undo: Callable[[str, np.ndarray, dict], np.ndarray]  # the converter's change to one tensor, undone
    config_only: tuple[str, ...] = ()  # tensors read into the config, not into the weights


def _decoder_config(meta: _Metadata, shapes: _Shapes, arch: str) -> dict:
    """Llama and Qwen2: RMSNorm, rotary, gated SiLU MLP, grouped K/V heads."""
    heads = meta.count(f"{arch}.attention.head_count")
    kv_heads = meta.count(f"{arch}.attention.head_count_kv") if f"{arch}.attention.head_count_kv" in meta.values \
        else heads
    hidden = int(meta.need(f"{arch}.embedding_length"))
    q_rows = shapes.get("blk.0.attn_q.weight", (hidden,))[0]
    head_dim = q_rows // heads  # the q projection states it; key_length is optional in the file
    rotary = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ValueError(f"{meta.path}: {arch}.rope.dimension_count={rotary} rotates part of each "
                         f"{head_dim}-dim head; a transformers {arch} config rotates whole heads")
    config = {
        "architectures": [_CAUSAL_LM[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(meta.need(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.need(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta.need(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),  # llama.cpp's default
        "rope_scaling": _rope_scaling(meta, arch),
        "max_position_embeddings": int(meta.need(f"{arch}.context_length")),
        "vocab_size": shapes["token_embd.weight"][0],
        # llama.cpp writes output.weight only when the head is not the embedding matrix (or as
        # a copy of it, dropped in read_gguf)
        "tie_word_embeddings": "output.weight" not in shapes,
        "torch_dtype": "float32",
        **_token_ids(meta),
    }
    if arch == "llama":
        config["head_dim"] = head_dim
        # transformers' Llama biases q, k, v and o together, and the three MLP projections together
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        config["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
    elif head_dim * heads != hidden:
        raise ValueError(f"{meta.path}: heads of {head_dim} dims x {heads} != {arch}.embedding_length={hidden}; "
                         f"a transformers {arch} config derives the head dim from the hidden size")
    else:
        config["use_sliding_window"] = False
    return config


def _rope_scaling(meta: _Metadata, arch: str) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if f"{arch}.rope.scale_linear" in meta.values:  # older files' key for the same thing
        kind, factor = "linear", meta.values[f"{arch}.rope.scale_linear"]
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        extra = [k for k in meta.values if k.startswith(f"{arch}.rope.scaling.yarn_")]
        if extra:
            raise ValueError(f"{meta.path}: {extra[0]} is set; only a YaRN scaling with the default "
                             f"parameters (factor, original_context_length) is translated")
        return {"rope_type": "yarn", "factor": _f32(meta.need(f"{arch}.rope.scaling.factor")),
                "original_max_position_embeddings": int(meta.need(f"{arch}.rope.scaling.original_context_length"))}
    raise ValueError(f"{meta.path}: {arch}.rope.scaling.type={kind!r} is not translated; "
                     f"supported: none, linear, yarn (and Llama 3's rope_freqs tensor)")


def _llama3_scaling(path: Path, config: dict, rope_factors: np.ndarray) -> dict:
    """transformers' ``rope_type: llama3`` parameters that reproduce the file's per-frequency
    factors. The factors fix only the ratios of those parameters, so this checks the ones every
    Llama 3.x release uses (factor aside) and refuses a file they do not reproduce."""
    if config.get("rope_scaling") is not None:
        raise ValueError(f"{path}: rope_freqs.weight and rope.scaling.type are both set")
    head_dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = float(rope_factors.max())
    low, high, context = 1.0, 4.0, 8192
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    expect = np.where(wavelen < context / high, 1.0,
                      np.where(wavelen > context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if rope_factors.shape != expect.shape or not np.allclose(rope_factors, expect, rtol=1e-5, atol=0):
        raise ValueError(f"{path}: rope_freqs.weight is not a Llama 3 rotary scaling (low/high frequency factors "
                         f"1/4 at 8192 positions); no transformers rope_scaling is known to match it")
    return {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": context}


_CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel"}

# llama.cpp name inside blk.{i} -> transformers name inside model.layers.{i}
_DECODER_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_QKV_BIASES = {f"attn_{p}.bias": f"self_attn.{p}_proj.bias" for p in "qkv"}
_MLP_BIASES = {f"ffn_{p}.bias": f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")}


def _decoder_names(config: dict) -> dict[str, str]:
    layer = dict(_DECODER_LAYER)
    if config["model_type"] == "qwen2":
        layer |= _QKV_BIASES
    if config.get("attention_bias"):
        layer |= _QKV_BIASES | {"attn_output.bias": "self_attn.o_proj.bias"}
    if config.get("mlp_bias"):
        layer |= _MLP_BIASES
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        names["output.weight"] = "lm_head.weight"
    for i in range(config["num_hidden_layers"]):
        names |= {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in layer.items()}
    return names


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's ``permute`` of Llama's q/k rows (weights and biases).

    llama.cpp's rotary pairs dimension 2j with 2j+1 of each head; transformers' rotate-half
    pairs j with j + D/2. The converter interleaved each head's two halves, (H, 2, D/2) ->
    (H, D/2, 2), so the same rotation lands on the same numbers; this restores (H, 2, D/2)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_undo(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    if ".attn_q." in name:
        return _unpermute(w, config["num_attention_heads"])
    if ".attn_k." in name:
        return _unpermute(w, config["num_key_value_heads"])
    return w


def _gpt2_config(meta: _Metadata, shapes: _Shapes) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_embd": int(meta.need("gpt2.embedding_length")),
        "n_inner": int(meta.need("gpt2.feed_forward_length")),
        "n_layer": int(meta.need("gpt2.block_count")),
        "n_head": meta.count("gpt2.attention.head_count"),
        "n_positions": shapes["position_embd.weight"][0],
        "layer_norm_epsilon": _f32(meta.need("gpt2.attention.layer_norm_epsilon")),
        "activation_function": "gelu_new",
        "vocab_size": shapes["token_embd.weight"][0],
        "tie_word_embeddings": "output.weight" not in shapes,
        "torch_dtype": "float32",
        **_token_ids(meta),
    }


_GPT2_LAYER = {
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}


def _gpt2_names(config: dict) -> dict[str, str]:
    names = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
             "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias"}
    if not config["tie_word_embeddings"]:
        names["output.weight"] = "lm_head.weight"
    for i in range(config["n_layer"]):
        for g, h in _GPT2_LAYER.items():
            names |= {f"blk.{i}.{g}.{p}": f"transformer.h.{i}.{h}.{p}" for p in ("weight", "bias")}
    return names


_CONV1D = tuple(f".{g}.weight" for g in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"))


def _gpt2_undo(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    # GPT-2's Conv1D keeps weights as (in, out); the converter transposed them to Linear's (out, in)
    return np.ascontiguousarray(w.T) if name.endswith(_CONV1D) else w


_FAMILIES = {
    "llama": _Family(lambda m, s: _decoder_config(m, s, "llama"), _decoder_names, _llama_undo,
                     config_only=("rope_freqs.weight",)),
    "qwen2": _Family(lambda m, s: _decoder_config(m, s, "qwen2"), _decoder_names, lambda n, w, c: w),
    "gpt2": _Family(_gpt2_config, _gpt2_names, _gpt2_undo),
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_FAMILIES))


def _check_names(path: Path, arch: str, names: dict[str, str], stored: dict, config_only: tuple[str, ...]):
    missing = [n for n in names if n not in stored]
    if missing:
        raise ValueError(f"{path}: a {arch} model needs tensor {missing[0]!r}, which the file lacks"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [n for n in stored if n not in names and n not in config_only]
    if extra:
        raise ValueError(f"{path}: tensor {extra[0]!r} has no place in a transformers {arch} model"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def _same_data(a, b) -> bool:
    return (a is not None and b is not None and a.tensor_type == b.tensor_type
            and a.data.shape == b.data.shape and np.array_equal(a.data, b.data))


def _dequantize(path: Path, tensor) -> np.ndarray:
    """One tensor as float32 (rows, cols), in a new array (not a view of the mapped file).

    Row blocks of ~16 MB at a time: the gguf library's block arithmetic makes several
    temporaries the size of its input, which for a whole 49k-row embedding were a third of
    the model again at peak."""
    from gguf.quants import dequantize  # optional: gguf (the [gguf] extra)

    out = np.empty(tuple(int(n) for n in reversed(tensor.shape)), dtype=np.float32)
    step = max(1, (1 << 22) // max(1, out[0].size)) if out.ndim > 1 else len(out)
    try:
        for i in range(0, len(out), step):
            out[i:i + step] = dequantize(tensor.data[i:i + step], tensor.tensor_type).reshape(out[i:i + step].shape)
    except NotImplementedError:
        raise ValueError(f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which the "
                         f"gguf library cannot dequantize") from None
    return out


# --- tokenizer ------------------------------------------------------------------------

# How each tokenizer.ggml.pre value cuts text into words before BPE (llama.cpp's llama-vocab.cpp).
_GPT2_PRE = ("gpt2", "default", None)  # the GPT-2 regex; files without the key get it in transformers too
_DIGITS_PRE = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone")  # each digit alone first
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def _byte_pre_tokenizer(path: Path, pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return byte_level
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = sorted(p for p in (*_GPT2_PRE, *_DIGITS_PRE, *_SPLITS) if p)
    raise ValueError(f"{path}: tokenizer.ggml.pre={pre!r} names a pre-tokenizer not translated here; "
                     f"known: {', '.join(known)}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level vocabularies are spelled.
    (tokenizers applies it internally but does not expose the mapping.)"""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def _byte_level(meta: _Metadata, tokens: list[str], types: list[int]) -> tuple[Tokenizer, list[AddedToken]]:
    """GPT-2-style byte-level BPE (tokenizer.ggml.model == 'gpt2'): vocabulary plus merges."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # a token stored in raw text (a space, say) is respelled in the byte alphabet, as transformers does
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta.need("tokenizer.ggml.merges")]
    pre = meta.get("tokenizer.ggml.pre")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                     ignore_merges=_SPLITS.get(pre) is _LLAMA3_SPLIT))  # as llama.cpp does
    tokenizer.pre_tokenizer = _byte_pre_tokenizer(meta.path, pre)
    tokenizer.decoder = decoders.ByteLevel()
    # a "control" token outside the byte alphabet is a mislabel that would grow the vocabulary
    special = [t for t, k in zip(tokens, types) if k == _CONTROL and set(t) <= alphabet]
    return tokenizer, [AddedToken(t, normalized=False, special=True) for t in special] + [
        AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
        if k == _USER_DEFINED and t in vocab]


def _sentencepiece(meta: _Metadata, tokens: list[str], types: list[int]) -> tuple[Tokenizer, list[AddedToken]]:
    """SentencePiece BPE (tokenizer.ggml.model == 'llama'): pieces with scores, spaces as '▁',
    bytes as <0xXX>. llama.cpp merges the adjacent pair whose union scores highest; BPE merges
    ranked by that score do the same."""
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta.values:
        merges = [tuple(m.split(" ")) for m in meta.values["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(tokens, meta.need("tokenizer.ggml.scores"), vocab)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                     unk_token=tokens[unk] if unk is not None else None))
    # llama.cpp puts a space before every stretch of text (the first, and each after a special
    # token) even when one is there already, as SentencePiece does; the original Llama 2
    # tokenizer.json did it with these normalizers. (transformers' GGUF tokenizer uses Metaspace,
    # which skips the space before text that starts with one: " x" gives ▁x, not ▁▁x.)
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tokenizer, [AddedToken(t, normalized=False, special=k == _CONTROL)
                       for t, k in zip(tokens, types) if k in (_CONTROL, _USER_DEFINED)]


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, best piece score first; within a piece, by the
    halves' ids; ties by the halves' lengths (transformers' ``generate_merges`` order)."""
    found = []
    for piece, score in zip(tokens, scores):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        found += [(left, right, score) for left, right in sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


_TOKENIZERS = {"gpt2": _byte_level, "llama": _sentencepiece}


def _tokenizer(meta: _Metadata) -> tuple[Tokenizer | None, dict]:
    """The file's tokenizer as a ``tokenizers.Tokenizer``, and tokenizer_config.json beside it."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        return None, {}
    tokens = meta.need("tokenizer.ggml.tokens")
    ids = {name: int(meta.values[f"tokenizer.ggml.{key}"]) for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))
        if meta.get(f"tokenizer.ggml.{key}") is not None}
    named = {name: tokens[i] for name, i in ids.items()}
    if "tokenizer.huggingface.json" in meta.values:  # some converters embed the original file whole
        tokenizer = Tokenizer.from_str(meta.values["tokenizer.huggingface.json"])
    elif kind in _TOKENIZERS:
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tokenizer, added = _TOKENIZERS[kind](meta, tokens, types)
        # the named special tokens match whole too, as transformers registers them
        added += [AddedToken(t, normalized=False, special=True) for t in named.values()]
        tokenizer.add_special_tokens([t for t in added if t.special])
        tokenizer.add_tokens([t for t in added if not t.special])
    else:
        raise ValueError(f"{meta.path}: tokenizer.ggml.model={kind!r} is not translated; "
                         f"supported: {', '.join(sorted(_TOKENIZERS))}")
    # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    add_bos, add_eos = add_bos and "bos_token" in named, add_eos and "eos_token" in named
    if "tokenizer.huggingface.json" not in meta.values:
        bos, eos = named.get("bos_token"), named.get("eos_token")
        single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
        pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
        specials = [(bos, ids["bos_token"])] * add_bos + [(eos, ids["eos_token"])] * add_eos
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                 special_tokens=specials)
    arch = meta.need("general.architecture")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": int(meta.get(f"{arch}.context_length", 1 << 30)),
        "clean_up_tokenization_spaces": False,
    }
    if meta.get("tokenizer.chat_template") is not None:
        config["chat_template"] = meta.values["tokenizer.chat_template"]
    return tokenizer, config
