"""Typed, keyword-only configuration for OmniNet models.

Every config is a frozen-in-spirit dataclass validated at construction: a wrong type, an
unknown key or an incompatible combination raises ``ValueError`` with one line that names
the field and the fix. ``to_dict``/``from_dict`` (and the JSON variants) round-trip
losslessly, so a config can travel through YAML sweeps, MLflow params and
``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union, get_args, get_origin

__all__ = [
    "ConfigBase",
    "PositionConfig",
    "RopeScalingConfig",
    "BlockSparseConfig",
    "LinformerConfig",
    "AttentionConfig",
    "HeadsConfig",
    "ModelConfig",
    "register_kernel_rules",
]


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Checks ``value`` against the annotation ``tp``; converts only lossless cases
    (int -> float, list -> tuple, dict -> nested config, str keys -> int keys from JSON)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
        return value
    if isinstance(tp, type) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value, _where=where)
        raise ValueError(f"{where}: expected a {tp.__name__} or a dict of its fields, got {type(value).__name__}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_tp, val_tp = args
        out = {}
        for k, v in value.items():
            if key_tp is int and isinstance(k, str) and k.lstrip("-").isdigit():
                k = int(k)  # JSON object keys are strings
            out[_coerce(k, key_tp, f"{where} key")] = _coerce(v, val_tp, f"{where}[{k!r}]")
        return out
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")  # a bug in this file, not user input


@dataclass(kw_only=True)
class ConfigBase:
    """Validation and (de)serialization shared by every config dataclass."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if not f.init:  # derived in validate(), not given
                continue
            where = f"{type(self).__name__}.{f.name}"
            object.__setattr__(self, f.name, _coerce(getattr(self, f.name), hints[f.name], where))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses override."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, _where: str | None = None):
        where = _where or cls.__name__
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys are {', '.join(sorted(names))}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            v = getattr(self, f.name)
            if isinstance(v, ConfigBase):
                v = v.to_dict()
            elif isinstance(v, dict):
                v = {k: list(x) if isinstance(x, (list, tuple)) else x for k, x in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# Kernel name -> its whole-model check (raises a one-line ValueError). omninet.attention fills
# this as each kernel registers, so this module never imports the registry (which imports it).
_KERNEL_RULES: dict[str, Callable[["ModelConfig"], None]] = {}


def register_kernel_rules(name: str, check: Callable[["ModelConfig"], None]) -> None:
    """Makes ``AttentionConfig(kernel=name)`` valid and runs ``check(model_config)`` at every
    ``ModelConfig`` construction that uses it (called by ``omninet.attention.register_kernel``)."""
    _KERNEL_RULES[name] = check


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(kw_only=True)
class PositionConfig(ConfigBase):
    """Position scheme. ``learned``: absolute table of ``max_seq_length`` rows (refuses longer
    inputs). ``relative``: T5 bucketed bias per head. ``rotary``: RoPE on q/k. ``alibi``:
    linear distance bias. ``none``: no positions. rotary/alibi/relative extrapolate."""

    kind: Literal["learned", "relative", "rotary", "alibi", "none"] = "learned"
    num_buckets: int = 32  # relative
    max_distance: int = 128  # relative
    rope_base: float = 10000.0  # rotary
    rope_scaling: RopeScalingConfig | None = None  # rotary: stretched frequencies (imported checkpoints)
    offset: int = 0  # learned: token i reads row offset + i (RoBERTa: padding_idx + 1)

    def validate(self) -> None:
        _check(self.num_buckets >= 4, f"PositionConfig.num_buckets must be >= 4, got {self.num_buckets}")
        _check(self.max_distance > 0, f"PositionConfig.max_distance must be > 0, got {self.max_distance}")
        _check(self.rope_base > 1.0, f"PositionConfig.rope_base must be > 1, got {self.rope_base}")
        _check(self.offset >= 0, f"PositionConfig.offset must be >= 0, got {self.offset}")
        _check(self.rope_scaling is None or self.kind == "rotary",
               f"PositionConfig.rope_scaling applies to kind='rotary' only, not {self.kind!r}; drop it")


@dataclass(kw_only=True)
class RopeScalingConfig(ConfigBase):
    """Rotary frequency scaling as Hugging Face configs state it. ``linear``: every frequency
    divided by ``factor`` (position interpolation). ``llama3``: low frequencies divided by
    ``factor``, high ones kept, a smooth ramp between (``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position``)."""

    kind: Literal["linear", "llama3"] = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position: int = 8192  # llama3

    def validate(self) -> None:
        _check(self.factor >= 1.0, f"RopeScalingConfig.factor must be >= 1, got {self.factor}")
        _check(self.high_freq_factor > self.low_freq_factor > 0,
               "RopeScalingConfig needs high_freq_factor > low_freq_factor > 0, "
               f"got {self.high_freq_factor} and {self.low_freq_factor}")
        _check(self.original_max_position >= 1,
               f"RopeScalingConfig.original_max_position must be >= 1, got {self.original_max_position}")


@dataclass(kw_only=True)
class BlockSparseConfig(ConfigBase):
    """Block-sparse layout (``omninet.attention.block_sparse``): each query block attends to
    itself, ``global_blocks`` leading blocks (which also attend everywhere),
    ``local_blocks`` neighbours on each side and ``random_blocks`` fixed random blocks,
    trimmed or widened so that a fraction ``sparsity_factor`` of key blocks is skipped
    (causal rows: of the blocks at or before them). The layout is fixed per layer and seed.
    ``backend``: 'auto' (compiled FlexAttention on CUDA when there is no mask, bias or
    dropout; otherwise fused SDPA over slabs of key blocks, views of k/v merged by
    log-sum-exp), 'gather' (always the slab path; the name predates it), 'flex' (also
    FlexAttention for CPU inference; needs a C++ compiler for torch.compile).

    ``pattern``: 'proportional' (the above: a row keeps a fixed fraction of the blocks before it,
    so a decode step's keys grow with the context) or 'sink_window' (causal layers only: each
    query block sees the first ``sink_blocks`` blocks and the last ``window_blocks`` blocks, its
    own included, whatever the length; its KV cache is a ring buffer of
    ``(sink_blocks + window_blocks) * block_size`` keys, so memory and time per generated token
    stay flat). 'sink_window' ignores ``sparsity_factor``, ``local_blocks``, ``global_blocks``,
    ``random_blocks`` and ``min_seq_length``: it is exactly dense up to
    ``(sink_blocks + window_blocks) * block_size`` tokens and the pattern from there on, with no
    cut-over."""

    block_size: int = 128
    sparsity_factor: float = 0.875
    local_blocks: int = 1
    global_blocks: int = 1
    random_blocks: int = 0
    seed: int = 0
    min_seq_length: int = 1024  # sequences of at most this many tokens use dense SDPA (it wins on short inputs)
    backend: Literal["auto", "gather", "flex"] = "auto"
    pattern: Literal["proportional", "sink_window"] = "proportional"
    window_blocks: int = 8  # sink_window: the most recent blocks a query block sees (its own included)
    sink_blocks: int = 1  # sink_window: leading blocks every query block sees (attention sinks)

    def validate(self) -> None:
        _check(self.window_blocks >= 1,
               f"BlockSparseConfig.window_blocks must be >= 1 (the query's own block counts), got {self.window_blocks}")
        _check(self.sink_blocks >= 0, f"BlockSparseConfig.sink_blocks must be >= 0, got {self.sink_blocks}")
        _check(self.block_size >= 16 and self.block_size & (self.block_size - 1) == 0,
               f"BlockSparseConfig.block_size must be a power of two >= 16, got {self.block_size}")
        _check(0.0 <= self.sparsity_factor < 1.0,
               f"BlockSparseConfig.sparsity_factor is the fraction of key blocks skipped and must be in [0, 1), got {self.sparsity_factor}")
        for name in ("local_blocks", "global_blocks", "random_blocks", "min_seq_length", "seed"):
            _check(getattr(self, name) >= 0, f"BlockSparseConfig.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(kw_only=True)
class LinformerConfig(ConfigBase):
    """Linformer low-rank attention (``omninet.attention.linformer``): keys and values are
    projected along the sequence by learned E, F (k x max_seq_length) to ``k`` rows;
    ``k = min(k, ceil(n / compression))`` when ``adaptive`` (and never more than n).
    ``sharing``: 'headwise' (E, F per layer, shared over heads), 'kv' (one matrix per layer
    for keys and values), 'layerwise' (one matrix for keys and values of every layer).
    ``layers``: which encoder layers use Linformer; None means every layer for the
    'linformer' kernel and the odd layers (1, 3, ...) for the 'hybrid' kernel. Other
    layers use dense SDPA ('linformer') or block-sparse attention ('hybrid')."""

    k: int = 256
    adaptive: bool = False
    compression: int = 4
    sharing: Literal["headwise", "kv", "layerwise"] = "headwise"
    layers: list[int] | None = None
    min_seq_length: int = 1024  # sequences of at most this many tokens use dense SDPA

    def validate(self) -> None:
        _check(self.k >= 1, f"LinformerConfig.k must be >= 1, got {self.k}")
        _check(self.compression >= 1, f"LinformerConfig.compression must be >= 1, got {self.compression}")
        _check(self.min_seq_length >= 0, f"LinformerConfig.min_seq_length must be >= 0, got {self.min_seq_length}")
        _check(self.layers is None or (all(i >= 0 for i in self.layers) and len(set(self.layers)) == len(self.layers)),
               f"LinformerConfig.layers must hold distinct layer indices >= 0 (or null), got {self.layers}")


@dataclass(kw_only=True)
class AttentionConfig(ConfigBase):
    """Which kernel computes attention, and its parameters. Kernels are looked up by name in
    ``omninet.attention.KERNELS``; ``sdpa`` is PyTorch's fused kernel, ``eager`` the
    materialized reference."""

    kernel: str = "sdpa"
    dropout: float = 0.0
    block_sparse: BlockSparseConfig = field(default_factory=BlockSparseConfig)
    linformer: LinformerConfig = field(default_factory=LinformerConfig)

    def validate(self) -> None:
        _check(0.0 <= self.dropout < 1.0, f"AttentionConfig.dropout must be in [0, 1), got {self.dropout}")
        _check(self.kernel in _KERNEL_RULES,
               f"AttentionConfig.kernel {self.kernel!r} is not registered; choose one of {', '.join(sorted(_KERNEL_RULES))}")


@dataclass(kw_only=True)
class HeadsConfig(ConfigBase):
    """Pruned heads and per-input gating. ``pruned_heads`` maps layer index to the original
    ids of heads physically removed (written by ``prune_heads``; survives save/load).
    ``active_heads``: when set, a router picks that many heads per sequence. How many heads a
    trial prunes is the trial's (``prune.heads``, a pass: ``omninet.passes``), not the model's."""

    active_heads: int | None = None
    gating: Literal["sequence", "token"] = "sequence"
    balance_loss_weight: float = 0.01
    online_importance: bool = False
    importance_decay: float = 0.99
    pruned_heads: dict[int, list[int]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, _where: str | None = None) -> "HeadsConfig":
        # Saved models (config.json) written while the pruning ratio was a model field carry it;
        # the heads it removed are in pruned_heads, so it is dropped when they are read back.
        # A trial that sets it is told where it moved (omninet.trial.config).
        if isinstance(data, dict) and "prune_ratio" in data:
            data = {k: v for k, v in data.items() if k != "prune_ratio"}
        return super().from_dict(data, _where=_where)

    def validate(self) -> None:
        _check(self.active_heads is None or self.active_heads >= 1,
               f"HeadsConfig.active_heads must be >= 1 (or null for all heads), got {self.active_heads}")
        _check(0.0 < self.importance_decay < 1.0,
               f"HeadsConfig.importance_decay must be in (0, 1), got {self.importance_decay}")


@dataclass(kw_only=True)
class ModelConfig(ConfigBase):
    """An OmniNet transformer. ``arch``: 'encoder' (bidirectional; classification or
    masked-LM head), 'decoder' (causal LM) or 'encoder_decoder' (seq2seq with
    cross-attention)."""

    arch: Literal["encoder", "decoder", "encoder_decoder"] = "decoder"
    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_decoder_layers: int | None = None  # encoder_decoder only; defaults to num_layers
    num_heads: int = 12
    ff_ratio: float = 4.0
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu"
    dropout: float = 0.1
    max_seq_length: int = 1024
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    num_classes: int | None = None  # adds a pooled classification head
    pooling: Literal["mean", "cls", "last"] = "mean"
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    gradient_checkpointing: bool = False
    # Block options that pretrained families need (omninet.interop); the defaults are the
    # GPT-2-like block OmniNet trains itself.
    num_kv_heads: int | None = None  # grouped K/V: each K/V head serves num_heads // num_kv_heads query heads
    attention_head_dim: int | None = None  # None: hidden_size // num_heads
    attention_scale: float | None = None  # None: 1 / sqrt(head_dim)
    intermediate_size: int | None = None  # the MLP's width; None: round(hidden_size * ff_ratio)
    mlp: Literal["plain", "gated"] = "plain"  # gated: down(act(gate(x)) * up(x)) (Llama, Qwen2, Mistral)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_placement: Literal["pre", "post"] = "pre"  # post: x = norm(x + f(x)) (BERT, RoBERTa)
    bias: bool = True  # biases of the attention and MLP projections
    qkv_bias: bool | None = None  # None: as `bias` (Qwen2: bias=false, qkv_bias=true)
    embedding_norm: bool = False  # a norm over the summed embeddings (BERT, RoBERTa)
    final_norm: bool = True  # a norm after the last block of each stack
    type_vocab_size: int = 0  # token-type (segment) embeddings added to the input (BERT: 2)
    lm_head_transform: bool = False  # dense + activation + norm before the LM head (BERT's MLM head)
    lm_head_bias: bool = False
    pooler: bool = False  # classification: dense + tanh over the pooled state before the classifier (BERT)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    position: PositionConfig = field(default_factory=PositionConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_seq_length"):
            _check(getattr(self, name) >= 1, f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.attention_head_dim is not None or self.hidden_size % self.num_heads == 0,
               f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}); "
               f"try num_heads={_nearest_divisor(self.hidden_size, self.num_heads)} or set attention_head_dim")
        kv = self.num_kv_heads
        _check(kv is None or (kv >= 1 and self.num_heads % kv == 0),
               f"ModelConfig.num_kv_heads ({kv}) must divide num_heads ({self.num_heads}); "
               f"try num_kv_heads={_nearest_divisor(self.num_heads, kv or 1)} (or null for one K/V head per query head)")
        for name in ("attention_head_dim", "intermediate_size"):
            _check(getattr(self, name) is None or getattr(self, name) >= 1,
                   f"ModelConfig.{name} must be >= 1 (or null for the default), got {getattr(self, name)}")
        _check(self.attention_scale is None or self.attention_scale > 0,
               f"ModelConfig.attention_scale must be > 0 (or null for 1/sqrt(head_dim)), got {self.attention_scale}")
        _check(self.type_vocab_size >= 0, f"ModelConfig.type_vocab_size must be >= 0, got {self.type_vocab_size}")
        _check(self.ff_ratio > 0, f"ModelConfig.ff_ratio must be > 0, got {self.ff_ratio}")
        _check(0.0 <= self.dropout < 1.0, f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        _check(self.num_decoder_layers is None or self.num_decoder_layers >= 1,
               f"ModelConfig.num_decoder_layers must be >= 1, got {self.num_decoder_layers}")
        _check(self.num_classes is None or self.num_classes >= 2,
               f"ModelConfig.num_classes must be >= 2 (or null for no classification head), got {self.num_classes}")
        _check(0 <= self.pad_token_id < self.vocab_size,
               f"ModelConfig.pad_token_id must be in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}")
        _check(self.position.kind != "rotary" or self.head_dim % 2 == 0,
               f"rotary positions need an even head dimension; hidden_size/num_heads = {self.head_dim}")
        active = self.heads.active_heads
        _check(active is None or active <= self.num_heads,
               f"HeadsConfig.active_heads ({active}) must be <= num_heads ({self.num_heads})")
        _check(active is None or self.heads.gating == "token" or self.arch == "encoder",
               "HeadsConfig.gating='sequence' pools the whole sequence, which leaks future tokens into a causal "
               f"{self.arch!r} model; use gating='token' (or arch='encoder')")
        for layer, ids in self.heads.pruned_heads.items():
            _check(0 <= layer < self.total_layers,
                   f"HeadsConfig.pruned_heads: layer {layer} out of range [0, {self.total_layers})")
            _check(all(0 <= h < self.num_heads for h in ids) and len(set(ids)) == len(ids),
                   f"HeadsConfig.pruned_heads[{layer}]: head ids must be distinct and in [0, {self.num_heads}), got {ids}")
            _check(len(ids) < self.num_heads,
                   f"HeadsConfig.pruned_heads[{layer}] removes every head; keep at least one per layer")
        _check(self.attention.block_sparse.pattern != "sink_window" or self.arch == "decoder",
               "BlockSparseConfig.pattern='sink_window' is a causal pattern (sinks + the last blocks before a query); "
               f"arch={self.arch!r} has non-causal layers: use arch='decoder' or pattern='proportional'")
        self._validate_kernel()

    def _validate_kernel(self) -> None:
        _KERNEL_RULES[self.attention.kernel](self)  # the kernel's own rules (omninet.attention)

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """K/V heads per layer before pruning (num_heads without grouped K/V)."""
        return self.num_kv_heads or self.num_heads

    @property
    def ff_dim(self) -> int:
        return self.intermediate_size or int(round(self.hidden_size * self.ff_ratio))

    @property
    def total_layers(self) -> int:
        """Layers that carry self-attention heads: encoder layers then decoder layers."""
        if self.arch == "encoder_decoder":
            return self.num_layers + (self.num_decoder_layers or self.num_layers)
        return self.num_layers

    @property
    def is_causal(self) -> bool:
        return self.arch == "decoder"


def _nearest_divisor(n: int, near: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))
