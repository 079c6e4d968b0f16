"""The kernel registry: each kernel's spec (function, state, memory cost, model rules,
cross-attention fallback) and the lookups. Kept apart from ``omninet/attention/__init__.py``
so kernel modules import the registry, not the package that imports them (no import circle);
the package re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from omninet.config import ModelConfig, register_kernel_rules

__all__ = ["AttentionMemory", "KernelSpec", "KERNELS", "register_kernel", "get_kernel", "check_kernel_config"]


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
class KernelSpec:
    """A kernel and the facts about it: its state, its memory cost, and which models it fits.

    ``supports_causal`` / ``supports_bias`` / ``supports_cross``: whether the kernel takes causal
    calls, per-pair position biases (relative / ALiBi) and cross-attention; a model whose
    attention would need what the kernel lacks is refused at ``ModelConfig`` construction
    (``check_config`` first, with the kernel's own wording), except cross-attention, which runs
    ``cross_fallback`` instead when one is named."""

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

    def for_layer(self, cross: bool) -> "KernelSpec":
        """The spec an attention layer actually runs (cross-attention may fall back)."""
        return get_kernel(self.cross_fallback) if cross and self.cross_fallback else self

    def estimate(self, config: ModelConfig, B: int, N: int, elem_bytes: int, *, layer_idx: int,
                 cross: bool = False) -> AttentionMemory:
        spec = self.for_layer(cross)
        fn = spec.memory or get_kernel("sdpa").memory
        return fn(config, B, N, elem_bytes, layer_idx=layer_idx, cross=cross)


KERNELS: dict[str, KernelSpec] = {}


def register_kernel(name: str, *, make_state=None, supports_causal=True, supports_bias=True, exact=True,
                    forms_weights=True, memory: MemoryFn | None = None, supports_cross=True,
                    cross_fallback: str | None = None, check_config: Callable[[ModelConfig], None] | None = None):
    """Decorator: ``@register_kernel("mine")`` makes ``AttentionConfig(kernel="mine")`` valid."""

    def wrap(fn):
        if name in KERNELS:
            raise ValueError(f"attention kernel {name!r} is already registered")
        spec = KernelSpec(name, fn, make_state, supports_causal, supports_bias, exact, forms_weights, memory,
                          supports_cross, cross_fallback, check_config)
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
