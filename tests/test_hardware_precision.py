"""Layer-wise mixed precision, training under autocast, int8, and the hysteresis monitor (CPU)."""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch

from omninet import AdvancedTransformer, ModelConfig, OmniNetModel
from omninet.hardware import (
    MemoryMonitor,
    MonitorConfig,
    apply_precision,
    cpu_flags,
    get_backend,
    low_precision_blocks,
    measure_sensitivity,
    plan_mixed_precision,
    quantize_int8,
    remove_precision,
    resolve_device_config,
    resolve_precision,
    set_block_precision,
    training_step,
)

# Planning, sensitivity and the autocast hooks are logic, not speed: bf16 autocast runs on any
# CPU (converted where not native), so only tests that resolve a bf16 *policy* need the device.
# 'mixed' resolves only where the low dtype is native (its default is the backend's default precision).
_FLAGS = ", ".join(f for f, on in cpu_flags().items() if on)
needs_bf16 = pytest.mark.skipif(
    torch.bfloat16 not in get_backend("cpu").supported_dtypes(),
    reason=f"resolve_precision refuses bf16 without AVX512 (converted) or AVX512-BF16/AMX (native); this CPU: {_FLAGS}")
needs_native_bf16 = pytest.mark.skipif(not get_backend("cpu").native_bf16(),
                                       reason=f"'mixed' needs native bf16 (AVX512-BF16/AMX); this CPU: {_FLAGS}")
SENSITIVE = 3


def _model(arch="decoder", layers=6, sensitive: int | None = SENSITIVE, **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=128, hidden_size=64, num_layers=layers, num_heads=4, max_seq_length=32,
                      dropout=0.0, **kw)
    model = OmniNetModel(cfg).eval()
    if sensitive is not None:
        # Two large biases that cancel exactly in fp32 (attention adds -50v to the residual, the
        # FFN adds +50v back) but each is rounded at magnitude 50 in bf16: this block's low-
        # precision error is ~100x the others', without amplifying anyone else's error.
        block = (model.decoder or model.encoder).blocks[sensitive]
        v = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            block.attn.o_proj.bias.sub_(50 * v)
            block.ffn.down.bias.add_(50 * v)
    return model


def _batch(model, B=4, N=32):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (B, N), generator=g)
    return {"input_ids": ids}


def test_sensitivity_ranks_the_deliberately_sensitive_block_first():
    model = _model()
    sens = measure_sensitivity(model, _batch(model), dtype="bf16")
    name = f"decoder.blocks.{SENSITIVE}"
    assert max(sens, key=sens.get) == name
    others = sorted(v for k, v in sens.items() if k != name)
    assert sens[name] > 10 * others[len(others) // 2]
    assert not low_precision_blocks(model)  # measuring leaves the model in fp32


def test_plan_keeps_critical_and_sensitive_layers_fp32_within_budget(caplog):
    model = _model()
    batch = _batch(model)
    with torch.no_grad():
        ref = model(**batch).logits
    plan = plan_mixed_precision(model, batch, dtype=torch.bfloat16, error_budget=1e-2)
    assert f"decoder.blocks.{SENSITIVE}" not in plan.low_precision
    assert plan.low_precision and set(plan.low_precision).isdisjoint({"decoder.blocks.0", "decoder.blocks.5"})
    assert plan.measured_error <= 1e-2
    rows = {r["layer"]: r for r in plan.table}
    assert rows["embed"]["dtype"] == rows["decoder.norm"]["dtype"] == rows["lm_head"]["dtype"] == "fp32"
    assert rows["decoder.blocks.0"]["reason"].startswith("protected")
    assert all({"layer", "kind", "params", "sensitivity", "dtype", "reason"} <= set(r) for r in plan.table)
    with caplog.at_level(logging.INFO, logger="omninet.hardware"):
        plan.log()
    assert "decoder.blocks.1" in caplog.text
    apply_precision(model, plan)
    assert set(low_precision_blocks(model)) == set(plan.low_precision)
    with torch.no_grad():
        out = model(**batch).logits
    assert out.dtype == torch.float32
    err = float((out - ref).norm() / ref.norm())
    assert err == pytest.approx(plan.measured_error, rel=1e-4)  # the plan's measurement is what runs
    remove_precision(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)  # restore is exact


def test_cast_weights_inference_agrees_with_autocast_and_refuses_training():
    model = _model(sensitive=None)
    batch = _batch(model)
    plan = plan_mixed_precision(model, batch, error_budget=5e-2)
    apply_precision(model, plan)
    with torch.no_grad():
        auto = model(**batch).logits
    apply_precision(model, plan, cast_weights=True)
    block = model.decoder.blocks[int(plan.low_precision[0].rsplit(".", 1)[1])]
    assert block.ffn.up.weight.dtype == torch.bfloat16 and block.ln1.weight.dtype == torch.float32
    with torch.no_grad():
        cast = model(**batch).logits
    assert torch.allclose(cast, auto, rtol=1e-3, atol=1e-3)
    remove_precision(model)
    assert block.ffn.up.weight.dtype == torch.float32
    model.train()
    with pytest.raises(ValueError, match="cast_weights=True .* inference"):
        apply_precision(model, plan, cast_weights=True)


@needs_bf16
@pytest.mark.parametrize("mode", ["bf16", pytest.param("mixed", marks=needs_native_bf16)])
def test_mixed_precision_training_matches_fp32(mode):
    """Same init, same batches, 5 AdamW steps: the low-precision loss curve tracks fp32's, the
    parameters stay fp32 (master weights) and receive fp32 gradients."""
    base = _model(sensitive=None)
    data = [_batch(base) for _ in range(2)]
    for b in data:
        b["labels"] = b["input_ids"]
    cpu = get_backend("cpu")
    curves = {}
    for name in ("fp32", mode):
        model = copy.deepcopy(base).train()
        policy = resolve_precision(name, cpu, training=True)
        if name == "mixed":
            apply_precision(model, plan_mixed_precision(model, data[0], dtype=policy.compute_dtype, error_budget=5e-2))
            assert low_precision_blocks(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curves[name] = [training_step(model, opt, data[i % 2], policy=policy, grad_clip=1.0) for i in range(4)]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert curves[mode][-1] < curves[mode][0]  # it learns
    for a, b in zip(curves["fp32"], curves[mode]):
        assert b == pytest.approx(a, rel=2e-2)


def test_grad_scaler_is_demanded_for_fp16_policies():
    policy = resolve_precision("fp32", get_backend("cpu"))
    assert policy.make_grad_scaler() is None
    fp16 = type(policy)("fp16", torch.float16, "cpu", True, "test")
    model = _model(sensitive=None)
    with pytest.raises(ValueError, match="loss scaling"):
        training_step(model, torch.optim.SGD(model.parameters(), lr=0.1), _batch(model), policy=fp16)


def test_autocast_hooks_do_not_leak_when_forward_raises():
    model = _model(sensitive=None)
    set_block_precision(model.decoder.blocks[1], torch.bfloat16, "cpu")
    with pytest.raises(Exception):
        model.decoder.blocks[1](torch.randn(2, 8, 63))  # wrong hidden size
    assert not torch.is_autocast_enabled("cpu")


def test_int8_quantization_close_to_fp32_and_original_untouched():
    model = _model(arch="encoder", sensitive=None, num_classes=3)
    batch = _batch(model)
    q = quantize_int8(model)
    assert isinstance(model.encoder.blocks[0].ffn.up, torch.nn.Linear)  # the original is untouched
    assert isinstance(q.encoder.blocks[0].ffn.up, torch.ao.nn.quantized.dynamic.Linear)
    with torch.no_grad():
        ref, out = model(**batch), q(**batch)
    for a, b in ((ref.hidden_states, out.hidden_states), (ref.logits, out.logits)):
        assert float((b - a).norm() / a.norm()) < 0.1


@needs_bf16
def test_seed_api_honours_precision():
    x = torch.randn(2, 16, 64)
    kw = dict(num_layers=4, hidden_size=64, num_heads=4, ff_dim=128, max_seq_length=16, use_sparse_attention=False,
              use_linformer=False, dropout=0.0)
    torch.manual_seed(0)
    fp32 = AdvancedTransformer(**kw, device_config={"device": "cpu", "precision": "fp32"}).eval()
    torch.manual_seed(0)
    bf16 = AdvancedTransformer(**kw, device_config={"device": "cpu", "precision": "bf16"}).eval()
    with torch.no_grad():
        a, b = fp32(hidden_states=x)[0], bf16(hidden_states=x)[0]
    assert b.dtype == torch.float32 and not torch.equal(a, b) and torch.allclose(a, b, atol=0.1)


@needs_native_bf16
def test_seed_api_plans_mixed_on_a_calibration_batch():
    x = torch.randn(2, 16, 64)
    kw = dict(num_layers=4, hidden_size=64, num_heads=4, ff_dim=128, max_seq_length=16, use_sparse_attention=False,
              use_linformer=False, dropout=0.0)
    with pytest.raises(ValueError, match="calibration"):
        AdvancedTransformer(**kw, device_config={"device": "cpu", "precision": "mixed"})
    torch.manual_seed(0)
    model = AdvancedTransformer(**kw, device_config={"device": "cpu", "precision": "fp32"}).eval()
    placement = resolve_device_config({"device": "cpu", "precision": "mixed"})
    placement.apply(model, calibration={"hidden_states": x}, error_budget=1e-2)
    assert placement.plan is not None and placement.plan.measured_error <= 1e-2


# ---- memory monitor: hysteresis under simulated noisy readings ---------------------------
def _monitor(model, plan=None, **cfg):
    return MemoryMonitor(model, plan=plan, read=lambda: 0.0, config=MonitorConfig(**cfg))


def test_monitor_degrades_restores_and_never_flip_flops_under_jitter(caplog):
    # no native bf16 needed: the ladder's logic is tested, not bf16 speed (bf16 runs emulated where not native)
    model = _model()
    plan = plan_mixed_precision(model, _batch(model), error_budget=1e-4)
    rng = random.Random(0)
    cfg = dict(memory_threshold=0.8, margin=0.1, patience=2, checkpointing=True)
    mon = _monitor(model, plan, **cfg)
    ladder = len(mon.levels)
    assert mon.levels[0][0] == "checkpointing" and ladder >= 2
    fp32_before = plan.least_sensitive_fp32()
    # 200 readings jittering +-0.04 around 0.76 (inside the dead band [0.7, 0.8]): nothing happens
    for _ in range(200):
        mon.sample(0.76 + rng.uniform(-0.04, 0.04))
    assert mon.events == []
    # pressure: jitter around 0.9 -> climbs the ladder, one level per `patience` readings, never down
    with caplog.at_level(logging.INFO, logger="omninet.hardware"):
        for _ in range(100):
            mon.sample(0.9 + rng.uniform(-0.05, 0.05))
        assert [e["action"] for e in mon.events] == ["degrade"] * ladder
        assert all(s.gradient_checkpointing for s in mon.stacks)
        assert set(low_precision_blocks(model)) == set(fp32_before)  # least sensitive first, all moved
        # jitter straddling the threshold itself (0.75..0.85): stays degraded, no restore
        for _ in range(200):
            mon.sample(0.8 + rng.uniform(-0.05, 0.05))
        assert len(mon.events) == ladder
        # relief: readings well below threshold - margin -> restores step by step to level 0
        for _ in range(100):
            mon.sample(0.5 + rng.uniform(-0.05, 0.05))
    actions = [e["action"] for e in mon.events]
    assert actions == ["degrade"] * ladder + ["restore"] * ladder  # exactly one excursion: no flip-flop
    assert mon.level == 0 and not low_precision_blocks(model) and not any(s.gradient_checkpointing for s in mon.stacks)
    assert caplog.text.count("memory ") == 2 * ladder  # every switch logged
    first = mon.events[0]
    assert first["change"] == "activation checkpointing on" and first["memory_fraction"] > 0.8


def test_monitor_samples_once_per_forward_not_per_module():
    model = _model(sensitive=None)
    calls = []
    mon = MemoryMonitor(model, read=lambda: calls.append(1) or 0.5, config=MonitorConfig(sample_every=2))
    batch = _batch(model, B=1, N=8)
    with torch.no_grad():
        for _ in range(6):
            model(**batch)
    assert len(calls) == 3 and mon.readings == 3
    mon.detach()
    with torch.no_grad():
        model(**batch)
    assert len(calls) == 3


def test_monitor_with_the_real_cpu_backend_reads_host_memory():
    model = _model(sensitive=None)
    mon = MemoryMonitor(model, backend=get_backend("cpu"), config=MonitorConfig(memory_threshold=0.99, margin=0.01))
    r = mon.sample()
    assert 0 < r < 1
    with pytest.raises(ValueError, match="margin"):
        MonitorConfig(memory_threshold=0.5, margin=0.6)
    with pytest.raises(ValueError, match="backend="):
        MemoryMonitor(model)
