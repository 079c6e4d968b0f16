"""Cost features of a trial configuration: what the sweep's cost model
(``omninet.sweep.costmodel``) regresses latency and memory on.

A linear model with non-negative weights over these features is a roofline-style cost model:
every feature is a count of work (multiply-adds) or of bytes that the measured figure grows
with, split by kernel and precision, so the fitted weights are seconds per multiply-add and
bytes-to-peak ratios of *this* pool's hardware. The counts come from the components that own
them: the block-sparse layout's own mask (its real density at the deployment length), the
Linformer rank the kernel uses at that length, and ``omninet.hardware.memory_breakdown``.

    features = cost_features(trial_config)
    features["latency_p50_ms"]          # {'attn|block_sparse|fp32': 1.2e7, 'ff|fp32': ..., ...}

Legend: L layers, H heads (Hr after pruning), d hidden size, hd head dim, f feed-forward
width, N deployment length, B measurement batch, keys = key positions one query attends to.
"""

from __future__ import annotations

import math

from omninet.trial.config import TrialConfig

__all__ = ["cost_features", "COST_TARGETS"]

# What the cost model predicts: the figures a trial measures first (``omninet.trial.runner``).
COST_TARGETS = ("latency_p50_ms", "peak_memory_infer_mb", "peak_memory_train_mb")


def _keys_per_query(cfg: TrialConfig, n: int) -> tuple[str, float, float]:
    """(kernel as computed at length n, keys per query, extra projection work per layer)."""
    mc = cfg.model_config
    kernel = mc.attention.kernel
    if kernel == "block_sparse":
        bs = mc.attention.block_sparse
        if n <= bs.min_seq_length or bs.sparsity_factor == 0.0:
            return "sdpa", float(n), 0.0
        from omninet.attention.block_sparse import BlockSparseLayout

        density = float(BlockSparseLayout(bs).dense_mask(n, n).float().mean())  # the layout's own density
        return kernel, density * n, 0.0
    if kernel == "linformer":
        lf = mc.attention.linformer
        if n <= lf.min_seq_length:
            return "sdpa", float(n), 0.0
        k = min(lf.k, math.ceil(n / lf.compression)) if lf.adaptive else lf.k
        k = min(k, n)
        return kernel, float(k), 2.0 * k * n * mc.hidden_size  # E and F project keys and values along N
    return kernel, float(n), 0.0


def cost_features(cfg: TrialConfig) -> dict[str, dict[str, float]]:
    """{target: {feature: value}} for each of ``COST_TARGETS`` (see the module docstring)."""
    from omninet.hardware.memory import memory_breakdown

    mc = cfg.model_config
    n, b = cfg.seq_length, cfg.measure_batch_size
    layers, heads, d = mc.num_layers, mc.num_heads, mc.hidden_size
    hd, f = d // heads, mc.ff_dim
    kept = heads * layers - round(mc.heads.prune_ratio * heads * layers)  # prune_model removes heads globally
    hr = kept / layers
    kernel, keys, proj = _keys_per_query(cfg, n)
    precision = cfg.hardware.precision

    def work(batch: int) -> dict[str, float]:
        return {
            f"attn|{kernel}|{precision}": layers * batch * hr * n * keys * hd,  # QK^T and PV
            f"proj|{precision}": layers * batch * n * d * 4 * hr * hd,  # Q, K, V, output projections
            f"ff|{precision}": layers * batch * n * d * f * 2,
            f"lowrank|{precision}": layers * batch * proj,
            f"calls|{kernel}": layers * hr,  # per-head kernel launches and slabs
        }

    out = {"latency_p50_ms": _shared(work(1))}
    dtype = precision if precision in ("bf16", "fp16") else "fp32"  # int8 / mixed keep fp32 tensors around
    for target, training in (("peak_memory_infer_mb", False), ("peak_memory_train_mb", True)):
        parts = memory_breakdown(mc, batch_size=b, seq_len=n, precision=dtype, training=training)
        feats = {f"{name}|{kernel}|{precision}": v / 2**20 * (hr / heads if name == "activations" else 1.0)
                 for name, v in parts.items()}
        feats[f"scores|{kernel}|{precision}"] = layers * b * hr * n * keys * 4 / 2**20  # fp32 scores, if materialized
        out[target] = _shared(feats)
    return out


def _shared(feats: dict[str, float]) -> dict[str, float]:
    """Each 'name|kernel|precision' count also as 'name', 'name|kernel' and 'name|precision':
    a pool's first trials share weights across kernels and precisions, and the specific
    weights (ridge-shrunk) only correct them where the data says so."""
    out: dict[str, float] = {}
    for key, value in feats.items():
        name, *rest = key.split("|")
        for sub in {key, name, *(f"{name}|{part}" for part in rest)}:
            out[sub] = out.get(sub, 0.0) + value
    return out
