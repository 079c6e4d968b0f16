"""The post-training int8 variants (``int8``, ``int8_token``, ``int8_weight``): one suite every
variant passes on a Llama-shaped decoder (bias-free Linears, gated MLP, grouped K/V heads, tied
embeddings), the accuracy order that sets them apart, their refusals, their engines, and the
trial and sweep that choose them by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omninet.config import ModelConfig
from omninet.hardware import INT8_PRECISIONS, Int8TokenLinear, int8_engine, int8_engines, quantize_int8
from omninet.model import OmniNetModel


def _decoder() -> OmniNetModel:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      mlp="gated", intermediate_size=96, norm="rmsnorm", bias=False, position={"kind": "rotary"},
                      tie_embeddings=True, dropout=0.0, max_seq_length=64)
    return OmniNetModel(cfg).eval()


@pytest.fixture(scope="module")
def decoder():
    model = _decoder()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    return model, ids, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def errors(decoder) -> dict[str, float]:
    model, ids, ref = decoder
    with torch.no_grad():
        return {name: _rel(quantize_int8(model, name)(ids).logits, ref) for name in INT8_PRECISIONS}


# ---- the suite every variant passes --------------------------------------------------------
@pytest.mark.parametrize("precision", INT8_PRECISIONS)
def test_variant_quantizes_every_untied_linear_and_keeps_the_model_working(decoder, precision):
    model, ids, ref = decoder
    q = quantize_int8(model, precision)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("qkv", "o_proj", "down")))  # untouched
    linears = [n for n, m in q.named_modules() if type(m) is nn.Linear]
    assert linears == ["lm_head"] and q.lm_head.weight is q.embed.weight  # the tied head stays fp32, still tied
    assert not any(isinstance(m, nn.Linear) for m in (q.decoder.blocks[0].attn.qkv, q.decoder.blocks[0].ffn.gate))
    with torch.no_grad():
        out = q(ids).logits
        assert out.shape == ref.shape and torch.isfinite(out).all()
        assert _rel(out, ref) < 0.05
        step = q(ids[:, :40], use_cache=True)  # the KV-cache path: one token after a 40-token prefix
        last = q(ids[:, 40:41], cache=step.cache).logits[:, -1]
        # A token's output depends on the other tokens of the call only through a per-tensor scale
        full = q(ids[:, :41]).logits[:, -1]
        assert _rel(last, full) < (0.05 if precision == "int8" else 1e-4)


@pytest.mark.parametrize("precision", INT8_PRECISIONS)
def test_variant_refuses_a_non_cpu_or_non_fp32_model_in_one_line(precision):
    for model, words in ((_decoder().to(torch.bfloat16), "fp32"), (_decoder().to("meta"), "CPU")):
        with pytest.raises(ValueError, match=words) as exc:
            quantize_int8(model, precision)
        assert "\n" not in str(exc.value) and precision in str(exc.value)


def test_an_unknown_variant_is_refused_with_the_names():
    with pytest.raises(ValueError, match="int8_weight"):
        quantize_int8(_decoder(), "int4")


# ---- what sets them apart ------------------------------------------------------------------
def test_weight_only_is_much_closer_to_fp32_than_dynamic(errors):
    """Weight-only rounds the weights alone; the dynamic variants round every input as well,
    'int8' with one scale for the whole call. Here (random weights, no outliers) 0.0054,
    0.0073 and 0.011 relative error of the logits; on SmolLM2-135M the gap is the cliff."""
    assert errors["int8_weight"] < errors["int8_token"] < errors["int8"], errors
    assert errors["int8_weight"] < 0.6 * errors["int8"], errors


def test_per_token_scales_survive_an_outlier_token_that_a_per_tensor_scale_does_not():
    """A real LM's few massive-activation tokens set one per-tensor scale for all the others
    (SmolLM2-135M: NLL 1.93 -> 2.58 in 'int8', 3.20 with 7-bit activations, 1.94 in
    'int8_token'); one scale per token isolates them."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False)
    x = torch.randn(1, 32, 64)
    x[0, 0] *= 200  # one outlier token
    with torch.no_grad():
        ref = lin(x)[0, 1:]
        per_tensor = quantize_int8(nn.Sequential(lin), "int8")(x)[0, 1:]
        per_token = quantize_int8(nn.Sequential(lin), "int8_token")(x)[0, 1:]
    assert _rel(per_token, ref) < 0.02 < 0.2 < _rel(per_tensor, ref)


def test_weight_only_stores_a_quarter_of_the_weight_bytes(decoder):
    model = decoder[0]
    q = quantize_int8(model, "int8_weight")
    fp32 = sum(m.weight.numel() * 4 for m in model.modules() if type(m) is nn.Linear and m is not model.lm_head)
    int8 = sum(b.numel() * b.element_size() for n, b in q.named_buffers() if n.endswith("weight_int8"))
    assert int8 * 4 == fp32


def test_int8_token_layer_handles_bias_and_batched_shapes():
    torch.manual_seed(0)
    lin = nn.Linear(32, 48)
    q = Int8TokenLinear(lin)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        assert _rel(q(x), lin(x)) < 0.02 and q(x).shape == (3, 5, 48)
        assert _rel(q(x[0, :1]), lin(x[0, :1])) < 0.02  # one token (decoding)


# ---- engines -------------------------------------------------------------------------------
def test_int8_keeps_7_bit_activations_unless_the_cpu_sums_in_int32(monkeypatch):
    monkeypatch.delenv("OMNINET_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert int8_engine("int8") == "torch.ao"
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True)
    assert int8_engine("int8") == "torch.ao-vnni"
    assert int8_engines() == {"int8": "torch.ao-vnni", "int8_token": "torch", "int8_weight": "torch"}


def test_the_engine_variable_is_checked(monkeypatch):
    monkeypatch.setenv("OMNINET_INT8_ENGINE", "onnx")
    with pytest.raises(ValueError, match="OMNINET_INT8_ENGINE='onnx'"):
        int8_engine("int8_token")
    assert int8_engine("int8") in ("torch.ao", "torch.ao-vnni")  # 'int8' has one engine
    monkeypatch.setenv("OMNINET_INT8_ENGINE", "torchao")
    monkeypatch.setattr("omninet.hardware.quantize.lazy_import", lambda name: None)
    with pytest.raises(ValueError, match="torchao is not installed"):
        quantize_int8(_decoder(), "int8_weight")


@pytest.mark.parametrize("precision", ["int8_token", "int8_weight"])
def test_torchao_engine_computes_what_ours_does(monkeypatch, decoder, precision):
    pytest.importorskip("torchao.quantization")
    model, ids, _ = decoder
    with torch.no_grad():
        ours = quantize_int8(model, precision)(ids).logits
        monkeypatch.setenv("OMNINET_INT8_ENGINE", "torchao")
        theirs = quantize_int8(model, precision)
        assert theirs.lm_head.weight is theirs.embed.weight  # the tied head is left alone there too
        assert _rel(theirs(ids).logits, ours) < 1e-2


# ---- chosen by name in a trial and a sweep -------------------------------------------------
TINY = {"task": {"name": "listops", "min_length": 5, "max_length": 40, "max_depth": 3, "num_train": 256, "num_eval": 64},
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
        "train": {"steps": 8, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2},
        "measure": {"memory": False}}


@pytest.mark.parametrize("precision", ["int8_token", "int8_weight"])
def test_a_trial_chooses_a_variant_by_name(precision):
    from omninet.trial import TrialConfig, run_trial

    cfg = {**TINY, "hardware": {"device": "cpu", "num_threads": 1, "precision": precision}}
    assert TrialConfig.from_dict(cfg).hardware.precision == precision
    res = run_trial(cfg)
    assert res.status == "ok", res.error
    assert res.precision == precision and res.accuracy is not None and res.latency_p50_ms > 0


def test_the_sweep_keeps_the_variants_this_cpu_runs(tmp_path):
    from omninet.hardware import probe_capabilities
    from omninet.sweep import SweepController
    from omninet.sweep.cluster import space_for

    ctl = SweepController({
        "name": "int8", "results_dir": str(tmp_path / "int8"),
        "trial": {"task": TINY["task"], "model": TINY["model"], "train": {"steps": 2}},
        "search_space": {"hardware.precision": {"choices": ["fp32", *INT8_PRECISIONS]}},
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "concurrency": 1}]})
    caps = probe_capabilities("cpu")
    space = {p.path: p for p in space_for(ctl.config, ctl.config.pool("cpu"), {"capabilities": caps})}
    assert space["hardware.precision"].choices == ["fp32", *[n for n in INT8_PRECISIONS if n in caps["int8_engines"]]]
    assert set(caps["int8_engines"]) == set(INT8_PRECISIONS)  # torch's own kernels: every variant runs on a CPU


@pytest.mark.parametrize("precision", INT8_PRECISIONS)
def test_hf_export_refuses_an_int8_model(decoder, tmp_path, precision):
    with pytest.raises(ValueError, match="quantized modules") as exc:
        quantize_int8(decoder[0], precision).save_hf(tmp_path / precision)
    assert "\n" not in str(exc.value)


@pytest.mark.slow
def test_benchmark_smoke_mode_reports_every_variant(tmp_path):
    """benchmarks/int8_variants.py --quick (a tiny decoder): every variant's time ratio, NLL and bytes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "int8.json"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "int8_variants.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "int8_variants" and doc["machine"]["cpu_model"]
    assert set(INT8_PRECISIONS) | {"fp32"} <= set(doc["variants"])
    for name, row in doc["variants"].items():
        assert row["time_ratio_to_fp32"]["median"] > 0 and abs(row["nll_minus_fp32"]) < 0.05, name
        assert row["linear_weight_bytes_ratio_to_fp32"] < (0.35 if name != "fp32" else 1.01), name
