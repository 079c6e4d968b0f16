"""Llama-style decoders (Llama, Mistral, Qwen2, SmolLM): RMSNorm, bias-free projections
(Qwen2: q/k/v biases), a gated SiLU MLP of its own width, grouped K/V heads, rotary
positions with their base and scaling, a tied or untied head."""

from __future__ import annotations

from omninet.config import ModelConfig
from omninet.interop.base import ACTIVATIONS_OUT, Family, Rule, activation_in, hf_get, refuse

_SCALINGS = ("default", "linear", "llama3")


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(base, scaling) from transformers 5's ``rope_parameters`` or 4's ``rope_theta`` / ``rope_scaling``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    base = float(hf_get(params, "rope_theta") or hf.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind not in _SCALINGS:
        refuse(f"rope scaling {kind!r} is not supported; OmniNet imports rope_type {', '.join(_SCALINGS)}")
    if kind == "default":
        return base, None
    out = {"kind": kind, "factor": float(scaling["factor"])}
    if kind == "llama3":
        out.update(low_freq_factor=float(scaling["low_freq_factor"]), high_freq_factor=float(scaling["high_freq_factor"]),
                   original_max_position=int(scaling["original_max_position_embeddings"]))
    return base, out


def _token(value, vocab: int) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and 0 <= value < vocab else None


def to_config(hf: dict, *, max_seq_length: int | None = None) -> ModelConfig:
    mt = hf["model_type"]
    if hf.get("mlp_bias"):
        refuse(f"{mt} config mlp_bias=true is not supported; OmniNet's gated MLP imports without biases")
    max_len = max_seq_length or int(hf.get("max_position_embeddings", 4096))
    window = hf.get("sliding_window") if (mt != "qwen2" or hf.get("use_sliding_window")) else None
    if window is not None and window < max_len:
        refuse(f"{mt} config sliding_window={window} is shorter than the length {max_len}; OmniNet computes full "
               f"attention, so import with max_seq_length <= {window}")
    base, scaling = _rope(hf)
    V, H = hf["vocab_size"], hf["num_attention_heads"]
    qkv_bias = True if mt == "qwen2" else bool(hf.get("attention_bias", False))
    if hf.get("attention_bias") and mt != "qwen2":
        refuse(f"{mt} config attention_bias=true biases o_proj as well, which OmniNet's bias options cannot express yet")
    eos = _token(hf.get("eos_token_id"), V)
    return ModelConfig(
        arch="decoder", vocab_size=V, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=H,
        num_kv_heads=hf.get("num_key_value_heads") or H, attention_head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"], mlp="gated", norm="rmsnorm", bias=False, qkv_bias=qkv_bias or None,
        activation=activation_in(hf.get("hidden_act", "silu"), "hidden_act"), dropout=0.0,
        max_seq_length=max_len, layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pad_token_id=_token(hf.get("pad_token_id"), V) or eos or 0, bos_token_id=_token(hf.get("bos_token_id"), V),
        eos_token_id=eos, attention={"dropout": float(hf.get("attention_dropout", 0.0))},
        position={"kind": "rotary", "rope_base": base, "rope_scaling": scaling},
    )


def rules(config: ModelConfig, hf: dict) -> list[Rule]:
    out = [Rule("embed.weight", ("model.embed_tokens.weight",)), Rule("decoder.norm.weight", ("model.norm.weight",))]
    for i in range(config.num_layers):
        o, t = f"decoder.blocks.{i}", f"model.layers.{i}"
        a = f"{t}.self_attn"
        out += [Rule(f"{o}.ln1.weight", (f"{t}.input_layernorm.weight",)),
                Rule(f"{o}.attn.qkv.weight", (f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight")),
                Rule(f"{o}.attn.o_proj.weight", (f"{a}.o_proj.weight",)),
                Rule(f"{o}.ln2.weight", (f"{t}.post_attention_layernorm.weight",)),
                Rule(f"{o}.ffn.gate.weight", (f"{t}.mlp.gate_proj.weight",)),
                Rule(f"{o}.ffn.up.weight", (f"{t}.mlp.up_proj.weight",)),
                Rule(f"{o}.ffn.down.weight", (f"{t}.mlp.down_proj.weight",))]
        if config.qkv_bias:
            out.append(Rule(f"{o}.attn.qkv.bias", (f"{a}.q_proj.bias", f"{a}.k_proj.bias", f"{a}.v_proj.bias")))
    if not config.tie_embeddings:
        out.append(Rule("lm_head.weight", ("lm_head.weight",)))
    return out


def to_hf_config(config: ModelConfig) -> dict:
    mt = "qwen2" if config.qkv_bias else "llama"
    pos = config.position
    rope = {"rope_type": "default", "rope_theta": pos.rope_base}
    if pos.rope_scaling is not None:
        s = pos.rope_scaling
        rope.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position)
    out = {
        "model_type": mt, "architectures": ["Qwen2ForCausalLM" if mt == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "intermediate_size": config.ff_dim,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim, "hidden_act": ACTIVATIONS_OUT[config.activation],
        "max_position_embeddings": config.max_seq_length, "rms_norm_eps": config.layer_norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": config.attention.dropout,
        "rope_parameters": rope, "rope_theta": pos.rope_base,  # 5.x reads rope_parameters, 4.x rope_theta / rope_scaling
        "rope_scaling": None if pos.rope_scaling is None else rope,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
    }
    if mt == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None)
    return out


def owns(config: ModelConfig) -> bool:
    return (config.arch == "decoder" and config.norm == "rmsnorm" and config.norm_placement == "pre"
            and config.mlp == "gated" and not config.bias and config.position.kind == "rotary" and config.final_norm
            and not config.embedding_norm and not config.type_vocab_size and not config.lm_head_transform
            and not config.lm_head_bias and config.attention_scale is None and config.num_classes is None)


FAMILY = Family("llama", ("llama", "mistral", "qwen2"), to_config, rules, to_hf_config, owns,
                ignored=(".rotary_emb.inv_freq",))
