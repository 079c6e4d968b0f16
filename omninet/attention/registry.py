"""The kernel registry: each kernel's spec (function, state, memory cost, work per query, model
rules, search-space rule, cross-attention fallback) and the lookups. Kept apart from ``omninet/attention/__init__.py``
so kernel modules import the registry, not the package that imports them (no import circle);
the package re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from omninet.config import ModelConfig, register_kernel_rules

__all__ = ["AttentionMemory", "AttentionWork", "KernelSpec", "KERNELS", "register_kernel", "get_kernel",
           "check_kernel_config", "fit_search_param", "block_keys_per_query"]


@dataclass(frozen=True)
class AttentionMemory:
    """Bytes one attention layer adds beyond q/k/v and its (B, H, N, D) output:
    ``transient`` (inference peak), ``saved`` (kept for backward) and ``backward`` (alive
    while its backward runs on top of everything saved: gradients of materialized scores)."""

    transient: float
    saved: float
    backward: float = 0.0


# (model_config, B, N, elem_bytes, *, layer_idx, cross) -> AttentionMemory, for the layer that
# make_state(model_config, layer_idx, cross) builds; omninet.hardware.memory sums it over layers.
MemoryFn = Callable[..., AttentionMemory]


@dataclass(frozen=True)
class AttentionWork:
    """What one attention layer computes for N keys (self-attention, N queries): ``kernel``, the
    path that actually runs (a kernel below its cutover runs 'sdpa'); ``keys``, the key positions
    one query attends to on average (N for dense); ``projection``, multiply-adds per sequence
    beyond Q K^T and P V (Linformer's E and F along the sequence)."""

    kernel: str
    keys: float
    projection: float = 0.0


# (model_config, N, *, layer_idx, cross) -> AttentionWork, for the layer that
# make_state(model_config, layer_idx, cross) builds; omninet.trial.cost counts it per layer.
WorkFn = Callable[..., AttentionWork]

# (state, *, seq_length) -> note or None: gives a layer's kernel state its own weights when every
# other weight of the layer comes from a dense model (a derived trial's kernel swap, omninet.passes):
# Linformer's E/F start as a strided mean pool at the task's length. Returns a line for the record
# (what it set), or None when it set nothing.
FromDenseFn = Callable[..., str | None]

# (model_config, seq_length) -> str: the kernel's parameters at that length in a few words, for the
# record of a kernel swap.
DescribeFn = Callable[[ModelConfig, int], str]

# (param, seq_length) -> (param, note or None): a kernel's rule for one searched parameter of its
# config at the measured length (Linformer: rank k <= N). ``param`` is a sweep ``ParamSpec`` (path,
# kind, low, high), returned unchanged when the rule does not concern it; a one-line ValueError when
# no value of its range can run.
SearchSpaceFn = Callable[[Any, int], tuple[Any, str | None]]


@dataclass(frozen=True)
class KernelSpec:
    """A kernel and the facts about it: its state, its memory cost, the work a layer does
    (``attention_work``, what the sweep's cost model counts), which models it fits, and its rule
    for searched parameters (``search_space``, applied per pool by the sweep).

    ``supports_causal`` / ``supports_bias`` / ``supports_cross``: whether the kernel takes causal
    calls, per-pair position biases (relative / ALiBi) and cross-attention; a model whose
    attention would need what the kernel lacks is refused at ``ModelConfig`` construction
    (``check_config`` first, with the kernel's own wording), except cross-attention, which runs
    ``cross_fallback`` instead when one is named.

    ``from_dense``: how a layer built with this kernel starts from a dense layer's weights (the
    kernel swap of a derived trial): every weight the layers share is copied, then this hook
    initializes the kernel state's own (None: the kernel has none). ``describe``: its parameters
    for the record (None: the kernel's name says it all)."""

    name: str
    fn: Callable
    make_state: Callable | None = None  # (model_config, layer_idx, cross) -> nn.Module | None
    supports_causal: bool = True
    supports_bias: bool = True
    exact: bool = True  # equals eager on the same inputs (Linformer, a low-rank approximation, does not)
    forms_weights: bool = True  # can return its own attention weights (fused SDPA never forms them)
    memory: MemoryFn | None = None  # None: costs what sdpa costs
    supports_cross: bool = True
    cross_fallback: str | None = None  # the kernel cross-attention layers use instead of this one
    check_config: Callable[[ModelConfig], None] | None = None  # raises a one-line ValueError
    work: WorkFn | None = None  # None: dense, every layer attends to all N keys under the kernel's own name
    search_space: SearchSpaceFn | None = None  # None: no rule for searched parameters
    from_dense: FromDenseFn | None = None  # None: no weights of its own to start
    describe: DescribeFn | None = None

    def for_layer(self, cross: bool) -> "KernelSpec":
        """The spec an attention layer actually runs (cross-attention may fall back)."""
        return get_kernel(self.cross_fallback) if cross and self.cross_fallback else self

    def estimate(self, config: ModelConfig, B: int, N: int, elem_bytes: int, *, layer_idx: int,
                 cross: bool = False) -> AttentionMemory:
        spec = self.for_layer(cross)
        fn = spec.memory or get_kernel("sdpa").memory
        return fn(config, B, N, elem_bytes, layer_idx=layer_idx, cross=cross)

    def attention_work(self, config: ModelConfig, N: int, *, layer_idx: int, cross: bool = False) -> AttentionWork:
        """What the layer computes for N keys (see ``AttentionWork``)."""
        spec = self.for_layer(cross)
        if spec.work is None:
            return AttentionWork(spec.name, float(N))
        return spec.work(config, N, layer_idx=layer_idx, cross=cross)


KERNELS: dict[str, KernelSpec] = {}


def register_kernel(name: str, *, make_state=None, supports_causal=True, supports_bias=True, exact=True,
                    forms_weights=True, memory: MemoryFn | None = None, supports_cross=True,
                    cross_fallback: str | None = None, check_config: Callable[[ModelConfig], None] | None = None,
                    work: WorkFn | None = None, search_space: SearchSpaceFn | None = None,
                    from_dense: FromDenseFn | None = None, describe: DescribeFn | None = None):
    """Decorator: ``@register_kernel("mine")`` makes ``AttentionConfig(kernel="mine")`` valid."""

    def wrap(fn):
        if name in KERNELS:
            raise ValueError(f"attention kernel {name!r} is already registered")
        spec = KernelSpec(name, fn, make_state, supports_causal, supports_bias, exact, forms_weights, memory,
                          supports_cross, cross_fallback, check_config, work, search_space, from_dense, describe)
        KERNELS[name] = spec
        register_kernel_rules(name, lambda config: check_kernel_config(spec, config))
        return fn

    return wrap


def get_kernel(name: str) -> KernelSpec:
    try:
        return KERNELS[name]
    except KeyError:
        raise ValueError(f"attention kernel {name!r} is not registered; choose one of {', '.join(sorted(KERNELS))}") from None


def check_kernel_config(spec: KernelSpec, config: ModelConfig) -> None:
    """The kernel's own check, then the rules its flags state (a safety net for kernels
    without a ``check_config``): raises one line naming the conflict and a fix."""
    if spec.check_config is not None:
        spec.check_config(config)
    name = spec.name
    if not spec.supports_causal and config.arch != "encoder":
        raise ValueError(f"attention.kernel={name!r} cannot run causal attention; use it only with arch='encoder'")
    if not spec.supports_bias and config.position.kind in ("relative", "alibi"):
        raise ValueError(f"attention.kernel={name!r} does not accept per-pair position biases "
                         f"({config.position.kind!r}); use position.kind 'learned', 'rotary' or 'none'")
    if not spec.supports_cross and spec.cross_fallback is None and config.arch == "encoder_decoder":
        raise ValueError(f"attention.kernel={name!r} cannot run cross-attention and names no fallback; "
                         "use arch='encoder' or 'decoder'")


def fit_search_param(param: Any, seq_length: int) -> tuple[Any, list[str]]:
    """``param`` after every registered kernel's search-space rule at the measured length, and
    one note per change (ValueError, one line, when no value of its range can run)."""
    notes = []
    for spec in KERNELS.values():
        if spec.search_space is not None:
            param, note = spec.search_space(param, seq_length)
            notes += [note] if note else []
    return param, notes


def block_keys_per_query(blocks, block_size: int, n: int, *, causal: bool) -> float:
    """Keys per query of a block layout over ``n`` positions: ``blocks`` (nb, nb) bool, query block
    i may see key block j (blocks of ``block_size`` positions, the last one cut at n); causal
    layouts keep no block above the diagonal, and a kept diagonal block is its lower triangle.
    Counted per block, so long sequences never build the (n, n) mask."""
    import torch

    nb = blocks.shape[0]
    size = torch.tensor([min(block_size, n - i * block_size) for i in range(nb)], dtype=torch.float64)  # (nb,)
    kept = blocks.to(torch.float64)
    if not causal:
        return float(size @ kept @ size) / n
    diagonal = kept.diagonal() * size * (size + 1) / 2  # query r of a block sees its keys 0..r
    return float(size @ kept.tril(-1) @ size + diagonal.sum()) / n
