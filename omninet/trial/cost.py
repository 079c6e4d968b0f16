"""Cost features of a trial configuration: what the sweep's cost model
(``omninet.sweep.costmodel``) regresses latency and memory on.

A linear model with non-negative weights over these features is a roofline-style cost model:
every feature is a count of work (multiply-adds) or of bytes that the measured figure grows
with, split by kernel and precision, so the fitted weights are seconds per multiply-add and
bytes-to-peak ratios of *this* pool's hardware. The counts come from the components that own
them: each layer's ``KernelSpec.attention_work`` (the path it runs at the deployment length,
keys per query and projection work: a block-sparse layout's own density, the Linformer rank,
hybrid's per-layer mix of the two) and ``omninet.hardware.memory_breakdown``. Attention counts
are labelled by the path a layer runs, so work that runs the same code shares a weight (a
block-sparse layer below its cutover is 'sdpa', a hybrid layer is 'linformer' or 'block_sparse').

    features = cost_features(trial_config)
    features["latency_p50_ms"]          # {'attn|block_sparse|fp32': 1.2e7, 'ff|fp32': ..., ...}

Legend: L layers, H heads (Hr after pruning), d hidden size, hd head dim, f feed-forward
width, N deployment length, B measurement batch, keys = key positions one query attends to.
"""

from __future__ import annotations

from omninet.attention.registry import get_kernel
from omninet.hardware.memory import memory_breakdown
from omninet.trial.config import TrialConfig

__all__ = ["cost_features", "COST_TARGETS"]

# What the cost model predicts: the figures a trial measures first (``omninet.trial.runner``).
COST_TARGETS = ("latency_p50_ms", "peak_memory_infer_mb", "peak_memory_train_mb")


def cost_features(cfg: TrialConfig) -> dict[str, dict[str, float]]:
    """{target: {feature: value}} for each of ``COST_TARGETS`` (see the module docstring)."""
    mc = cfg.model_config
    n, b = cfg.seq_length, cfg.measure_batch_size
    layers, heads, d = mc.num_layers, mc.num_heads, mc.hidden_size
    hd, f = mc.head_dim, mc.ff_dim
    kept = heads * layers - round(cfg.prune.heads * heads * layers)  # prune_model removes heads globally
    hr = kept / layers
    # K/V heads left: with grouped K/V a K/V head goes only with its whole group (at least
    # kept / group of them stay, at most all); plain multi-head attention: one per query head
    kv = hr if mc.kv_heads == heads else min(mc.kv_heads, max(1.0, hr * mc.kv_heads / heads))
    mats = 3 if mc.mlp == "gated" else 2  # gate, up, down
    spec = get_kernel(mc.attention.kernel)
    attended = [spec.attention_work(mc, n, layer_idx=i) for i in range(layers)]  # what each layer runs at N
    paths = {w.kernel for w in attended}
    kernel = paths.pop() if len(paths) == 1 else mc.attention.kernel  # the model-wide label of memory features
    precision = cfg.hardware.precision

    def work(batch: int) -> list[tuple[str, float]]:
        return [
            (f"proj|{precision}", layers * batch * n * d * 2 * (hr + kv) * hd),  # Q and output, K and V projections
            (f"ff|{precision}", layers * batch * n * d * f * mats),
            (f"lowrank|{precision}", batch * sum(w.projection for w in attended)),
            *((f"attn|{w.kernel}|{precision}", batch * hr * n * w.keys * hd) for w in attended),  # QK^T and PV
            *((f"calls|{w.kernel}", hr) for w in attended),  # per-head kernel launches and slabs
        ]

    out = {"latency_p50_ms": _shared(work(1))}
    dtype = precision if precision in ("bf16", "fp16") else "fp32"  # int8 / mixed keep fp32 tensors around
    for target, training in (("peak_memory_infer_mb", False), ("peak_memory_train_mb", True)):
        parts = memory_breakdown(mc, batch_size=b, seq_len=n, precision=dtype, training=training)
        feats = [(f"{name}|{kernel}|{precision}", v / 2**20 * (hr / heads if name == "activations" else 1.0))
                 for name, v in parts.items()]
        feats += [(f"scores|{w.kernel}|{precision}", b * hr * n * w.keys * 4 / 2**20)  # fp32 scores, if materialized
                  for w in attended]
        out[target] = _shared(feats)
    return out


def _shared(feats: list[tuple[str, float]]) -> dict[str, float]:
    """The (feature, count) pairs summed per feature, each 'name|kernel|precision' count also as
    'name', 'name|kernel' and 'name|precision': a pool's first trials share weights across
    kernels and precisions, and the specific weights (ridge-shrunk) only correct them where the
    data says so."""
    out: dict[str, float] = {}
    for key, value in feats:
        name, *rest = key.split("|")
        for sub in {key, name, *(f"{name}|{part}" for part in rest)}:
            out[sub] = out.get(sub, 0.0) + value
    return out
