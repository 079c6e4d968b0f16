"""BERT and RoBERTa encoders: post-norm blocks, an embedding LayerNorm, token types, no final
norm; the masked-LM head (dense -> GELU -> LayerNorm -> tied decoder + bias) or the sequence
classifier (tanh dense over the first token, then a linear layer). RoBERTa's learned
positions start after its padding index."""

from __future__ import annotations

from omninet.config import ModelConfig
from omninet.interop.base import ACTIVATIONS_OUT, Family, Rule, activation_in, refuse


def _head(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "cls"
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "mlm"
    refuse(f"{hf['model_type']} architectures {archs}: OmniNet imports *ForMaskedLM and *ForSequenceClassification "
           "checkpoints (a bare encoder has no head to score with)")


def to_config(hf: dict, *, max_seq_length: int | None = None) -> ModelConfig:
    mt = hf["model_type"]
    if hf.get("position_embedding_type", "absolute") != "absolute":
        refuse(f"{mt} config position_embedding_type={hf['position_embedding_type']!r} is not supported; only 'absolute'")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        refuse(f"{mt} config is_decoder/add_cross_attention: OmniNet imports {mt} as an encoder only")
    head = _head(hf)
    pad = hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0
    offset = pad + 1 if mt == "roberta" else 0  # RoBERTa numbers real tokens from padding_idx + 1
    table = int(hf.get("max_position_embeddings", 512))
    num_classes = None
    if head == "cls":
        num_classes = len(hf.get("id2label") or {}) or int(hf.get("num_labels", 2))
        if hf.get("problem_type") not in (None, "single_label_classification"):
            refuse(f"{mt} config problem_type={hf['problem_type']!r}: OmniNet imports single-label classifiers only")
    return ModelConfig(
        arch="encoder", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
        activation=activation_in(hf.get("hidden_act", "gelu"), "hidden_act"),
        dropout=float(hf.get("hidden_dropout_prob", 0.1)), max_seq_length=min(max_seq_length or table, table - offset),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)), tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        num_classes=num_classes, pooling="cls", pooler=head == "cls", norm_placement="post", embedding_norm=True,
        final_norm=False, type_vocab_size=int(hf.get("type_vocab_size", 2)), lm_head_transform=head == "mlm",
        lm_head_bias=head == "mlm", pad_token_id=pad, bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"), attention={"dropout": float(hf.get("attention_probs_dropout_prob", 0.1))},
        position={"kind": "learned", "offset": offset},
    )


def _prefix(config: ModelConfig) -> str:
    return "roberta" if config.position.offset else "bert"


def rules(config: ModelConfig, hf: dict) -> list[Rule]:
    p = _prefix(config)
    e = f"{p}.embeddings"
    out = [Rule("embed.weight", (f"{e}.word_embeddings.weight",)), Rule("pos.table.weight", (f"{e}.position_embeddings.weight",)),
           Rule("token_types.weight", (f"{e}.token_type_embeddings.weight",)),
           Rule("embed_norm.weight", (f"{e}.LayerNorm.weight",)), Rule("embed_norm.bias", (f"{e}.LayerNorm.bias",))]
    for i in range(config.num_layers):
        o, t = f"encoder.blocks.{i}", f"{p}.encoder.layer.{i}"
        s = f"{t}.attention.self"
        for w in ("weight", "bias"):
            out += [Rule(f"{o}.attn.qkv.{w}", (f"{s}.query.{w}", f"{s}.key.{w}", f"{s}.value.{w}")),
                    Rule(f"{o}.attn.o_proj.{w}", (f"{t}.attention.output.dense.{w}",)),
                    Rule(f"{o}.ln1.{w}", (f"{t}.attention.output.LayerNorm.{w}",)),
                    Rule(f"{o}.ffn.up.{w}", (f"{t}.intermediate.dense.{w}",)),
                    Rule(f"{o}.ffn.down.{w}", (f"{t}.output.dense.{w}",)),
                    Rule(f"{o}.ln2.{w}", (f"{t}.output.LayerNorm.{w}",))]
    if config.num_classes is not None:
        pool, clf = (f"{p}.pooler.dense", "classifier") if p == "bert" else ("classifier.dense", "classifier.out_proj")
        for w in ("weight", "bias"):
            out += [Rule(f"pooler.0.{w}", (f"{pool}.{w}",)), Rule(f"classifier.{w}", (f"{clf}.{w}",))]
        return out
    head, norm, bias = ("cls.predictions.transform", "cls.predictions.transform.LayerNorm", "cls.predictions.bias") \
        if p == "bert" else ("lm_head", "lm_head.layer_norm", "lm_head.bias")
    for w in ("weight", "bias"):
        out += [Rule(f"head_transform.0.{w}", (f"{head}.dense.{w}",)), Rule(f"head_transform.2.{w}", (f"{norm}.{w}",))]
    out.append(Rule("lm_head.bias", (bias,)))
    if not config.tie_embeddings:
        out.append(Rule("lm_head.weight", ("cls.predictions.decoder.weight" if p == "bert" else "lm_head.decoder.weight",)))
    return out


def to_hf_config(config: ModelConfig) -> dict:
    p = _prefix(config)
    arch = ("RobertaFor" if p == "roberta" else "BertFor") + ("SequenceClassification" if config.num_classes else "MaskedLM")
    out = {
        "model_type": p, "architectures": [arch], "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.ff_dim, "hidden_act": ACTIVATIONS_OUT[config.activation],
        "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.attention.dropout,
        "max_position_embeddings": config.max_seq_length + config.position.offset,
        "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": config.tie_embeddings, "position_embedding_type": "absolute",
    }
    if config.num_classes:
        out.update(num_labels=config.num_classes, id2label={str(i): f"LABEL_{i}" for i in range(config.num_classes)},
                   label2id={f"LABEL_{i}": i for i in range(config.num_classes)})
    return out


def owns(config: ModelConfig) -> bool:
    return (config.arch == "encoder" and config.norm_placement == "post" and config.norm == "layernorm"
            and config.embedding_norm and not config.final_norm and config.mlp == "plain" and config.bias
            and config.kv_heads == config.num_heads and config.position.kind == "learned"
            and config.type_vocab_size > 0 and config.attention_scale is None
            and (config.num_classes is not None and config.pooler and config.pooling == "cls"
                 or config.num_classes is None and config.lm_head_transform and config.lm_head_bias))


FAMILY = Family("bert", ("bert", "roberta"), to_config, rules, to_hf_config, owns, ignored=(".position_ids",))
