"""GPT-2: the OmniNet block as it is (pre-norm LayerNorm, biases, tanh GELU, learned
positions, tied head); only names differ, and Conv1D weights are stored (in, out)."""

from __future__ import annotations

from omninet.config import ModelConfig
from omninet.interop.base import ACTIVATIONS_OUT, Family, Rule, activation_in, refuse


def _token(hf: dict, key: str, vocab: int) -> int | None:
    v = hf.get(key)
    return v if isinstance(v, int) and 0 <= v < vocab else None


def to_config(hf: dict) -> ModelConfig:
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(key):
            refuse(f"GPT-2 config {key}=true is not supported by OmniNet's block; only standard GPT-2 attention imports")
    if hf.get("scale_attn_weights", True) is False:
        refuse("GPT-2 config scale_attn_weights=false is not supported (OmniNet scales scores by 1/sqrt(head_dim))")
    C, V = hf["n_embd"], hf["vocab_size"]
    eos = _token(hf, "eos_token_id", V)
    return ModelConfig(
        arch="decoder", vocab_size=V, hidden_size=C, num_layers=hf["n_layer"], num_heads=hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * C,
        activation=activation_in(hf.get("activation_function", "gelu_new"), "activation_function"),
        dropout=float(hf.get("resid_pdrop", 0.0)), max_seq_length=hf["n_positions"],
        layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), tie_embeddings=hf.get("tie_word_embeddings", True),
        pad_token_id=_token(hf, "pad_token_id", V) or eos or 0, bos_token_id=_token(hf, "bos_token_id", V),
        eos_token_id=eos, attention={"dropout": float(hf.get("attn_pdrop", 0.0))}, position={"kind": "learned"},
    )


def rules(config: ModelConfig, hf: dict) -> list[Rule]:
    out = [Rule("embed.weight", ("transformer.wte.weight",)), Rule("pos.table.weight", ("transformer.wpe.weight",)),
           Rule("decoder.norm.weight", ("transformer.ln_f.weight",)), Rule("decoder.norm.bias", ("transformer.ln_f.bias",))]
    for i in range(config.num_layers):
        o, t = f"decoder.blocks.{i}", f"transformer.h.{i}"
        for ours, theirs, tr in (("ln1", "ln_1", False), ("ln2", "ln_2", False), ("attn.qkv", "attn.c_attn", True),
                                 ("attn.o_proj", "attn.c_proj", True), ("ffn.up", "mlp.c_fc", True),
                                 ("ffn.down", "mlp.c_proj", True)):
            out += [Rule(f"{o}.{ours}.weight", (f"{t}.{theirs}.weight",), tr), Rule(f"{o}.{ours}.bias", (f"{t}.{theirs}.bias",))]
    if not config.tie_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return out


def to_hf_config(config: ModelConfig) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
        "n_embd": config.hidden_size, "n_layer": config.num_layers, "n_head": config.num_heads,
        "n_inner": config.ff_dim, "n_positions": config.max_seq_length,
        "activation_function": {"gelu_tanh": "gelu_new"}.get(config.activation, ACTIVATIONS_OUT[config.activation]),
        "layer_norm_epsilon": config.layer_norm_eps, "tie_word_embeddings": config.tie_embeddings,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.attention.dropout,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
    }


def owns(config: ModelConfig) -> bool:
    return (config.arch == "decoder" and config.norm == "layernorm" and config.norm_placement == "pre"
            and config.mlp == "plain" and config.bias and config.qkv_bias is None and config.kv_heads == config.num_heads
            and config.attention_head_dim in (None, config.hidden_size // config.num_heads)
            and config.position.kind == "learned" and config.position.offset == 0 and config.final_norm
            and not config.embedding_norm and not config.type_vocab_size and not config.lm_head_transform
            and not config.lm_head_bias and config.attention_scale is None and config.num_classes is None)


FAMILY = Family("gpt2", ("gpt2",), to_config, rules, to_hf_config, owns, ignored=(".attn.bias", ".attn.masked_bias"))
