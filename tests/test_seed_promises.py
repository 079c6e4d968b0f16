"""The seed class's promises (issue 14): head pruning and importance on AdvancedTransformer,
save/load; regression tests for review bugs."""

from __future__ import annotations

import pytest
import torch

from omninet import AdvancedTransformer

TOL = dict(atol=1e-5, rtol=1e-4)


def seed(sparse=False, linformer=False, **kw):
    torch.manual_seed(0)
    base = dict(num_layers=2, hidden_size=32, num_heads=4, ff_dim=64, max_seq_length=64, dropout=0.0,
                use_sparse_attention=sparse, use_linformer=linformer, device_config={"device": "cpu"})
    return AdvancedTransformer(**{**base, **kw}).eval()


def _inputs(B=2, N=24, C=32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, N, C, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 18:] = False
    return x, mask


# ---- pruning on the seed class ----------------------------------------------------------
@pytest.mark.parametrize("sparse, linformer", [(False, False), (False, True), (True, True)])
def test_seed_prune_heads_equals_head_mask_and_removes_parameters(sparse, linformer):
    model, ref_model = seed(sparse, linformer), seed(sparse, linformer)
    x, mask = _inputs()
    plan = {0: [1, 3], 1: [0]}
    head_mask = torch.ones(2, 4)
    for layer, ids in plan.items():
        head_mask[layer, ids] = 0
    with torch.no_grad():
        ref = ref_model(hidden_states=x, attention_mask=mask, head_mask=head_mask)[0]
    before = model.num_parameters()
    model.prune_heads(plan)
    with torch.no_grad():
        out = model(hidden_states=x, attention_mask=mask)[0]
    torch.testing.assert_close(out, ref, **TOL)
    qkv = model.encoder.blocks[0].attn.qkv
    assert qkv.out_features == 3 * 2 * 8 and model.num_parameters() < before  # really removed
    assert model.config.heads.pruned_heads == {0: [1, 3], 1: [0]}
    model.prune_heads({0: [1]})  # already gone: a no-op, as on OmniNetModel
    assert model.encoder.blocks[0].attn.num_heads == 2


@pytest.mark.parametrize("heads, message", [
    ({0: [4]}, r"head ids \[4\] out of range \[0, 4\) in layer 0; use original head ids 0..3"),
    ({0: [-1]}, r"out of range"),
    ({5: [0]}, r"layer 5 out of range \[0, 2\); use layer indices"),
    ({0: [0, 1, 2, 3]}, r"would remove every head of layer 0 .*keep at least one"),
    ({1: [0], 0: [0, 1, 2, 3]}, r"remove every head"),
    ([0, 1], r"heads must be a dict"),
])
def test_seed_prune_heads_rejects_bad_input_before_changing_anything(heads, message):
    model = seed()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as info:
        model.prune_heads(heads)
    assert "\n" not in str(info.value)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.config.heads.pruned_heads == {} and model.encoder.blocks[1].attn.num_heads == 4


def test_seed_head_importance_and_prune_by_importance():
    model = seed()
    x, mask = _inputs()
    target = torch.randn_like(x)
    batches = [{"hidden_states": x, "attention_mask": mask}]
    imp = model.head_importance(batches, loss_fn=lambda out, batch: (out[0] - target).pow(2).mean())
    assert imp.shape == (2, 4) and torch.all(imp >= 0) and torch.allclose(imp.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="loss_fn"):
        model.head_importance(batches, loss_fn=None)
    removed = model.prune_by_importance(imp, 0.5)
    assert sum(map(len, removed.values())) == 4 and all(a.num_heads >= 1 for a in model.attention_layers())
    for layer, ids in removed.items():  # the least important heads of each layer went
        kept = [h for h in range(4) if h not in ids]
        assert max(imp[layer, ids]) <= min(imp[layer, kept]) or len(ids) < 4


def test_seed_save_and_load_round_trip(tmp_path):
    model = seed(False, True)
    model.prune_heads({0: [2], 1: [0, 3]})
    x, mask = _inputs()
    with torch.no_grad():
        ref = model(hidden_states=x, attention_mask=mask)[0]
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors"}
    again = AdvancedTransformer.from_pretrained(tmp_path / "m")
    assert not again.training and again.config.heads.pruned_heads == {0: [2], 1: [0, 3]}
    assert again.num_parameters() == model.num_parameters()
    with torch.no_grad():
        torch.testing.assert_close(again(hidden_states=x, attention_mask=mask)[0], ref, **TOL)
    again.prune_heads({0: [0]})  # pruning continues from the loaded state
    override = AdvancedTransformer.from_pretrained(tmp_path / "m", dropout=0.2)
    assert override.init_kwargs["dropout"] == 0.2
    with pytest.raises(ValueError, match="unknown argument"):
        AdvancedTransformer.from_pretrained(tmp_path / "m", hiden_size=3)
    with pytest.raises(ValueError, match="not a saved AdvancedTransformer"):
        AdvancedTransformer.from_pretrained(tmp_path / "missing")


# ---- review bugs ------------------------------------------------------------------------
def test_tpu_peak_is_the_key_its_docstring_names(monkeypatch):
    import sys
    import types

    from omninet.hardware import get_backend
    from omninet.hardware import tpu as tpu_module

    GiB = 2**30
    info = {"bytes_used": 2 * GiB, "bytes_limit": 16 * GiB, tpu_module.PEAK_KEY: 5 * GiB}
    for name, attrs in {"torch_xla": {}, "torch_xla.runtime": dict(device_type=lambda: "TPU", addressable_device_count=lambda: 1),
                        "torch_xla.core": {}, "torch_xla.core.xla_model": dict(get_memory_info=lambda d: info,
                                                                              wait_device_ops=lambda: None)}.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(__spec__=object(), **attrs))
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    tpu = get_backend("tpu")
    tpu.reset_peak_memory()
    assert tpu_module.PEAK_KEY in tpu_module.__doc__
    stats = tpu.memory_stats()
    assert stats.peak == 5 * GiB and stats.in_use == 2 * GiB  # the runtime's high-water mark, not bytes_used
    del info[tpu_module.PEAK_KEY]
    tpu.reset_peak_memory()
    assert tpu.memory_stats().peak == 2 * GiB  # no runtime peak: the largest reading


@pytest.mark.parametrize("pattern", ["../*.py", "sub/../../*.py", "/etc/*", "..\\\\x\\\\*.txt", "**/../../*"])
def test_byte_lm_pattern_cannot_leave_its_root(tmp_path, pattern):
    from omninet.tasks import TaskConfig

    with pytest.raises(ValueError, match=r"pattern=.*reaches outside root; use a relative glob without '\.\.'"):
        TaskConfig.from_dict({"name": "byte_lm", "root": str(tmp_path), "pattern": pattern})


def test_byte_lm_skips_symlinks_out_of_its_root(tmp_path):
    from omninet.tasks import TaskConfig, build_task

    corpus, outside = tmp_path / "corpus", tmp_path / "secret"
    corpus.mkdir()
    outside.mkdir()
    (outside / "key.txt").write_text("secret " * 100)
    for i in range(30):
        (corpus / f"f{i}.txt").write_text(f"file {i} " * 40)
    (corpus / "link.txt").symlink_to(outside / "key.txt")
    task = build_task(TaskConfig.from_dict({"name": "byte_lm", "root": str(corpus), "pattern": "*.txt",
                                            "max_length": 16, "max_bytes": 4000, "eval_fraction": 0.3}))
    names = {rel for files in task.files.values() for _, rel in files}
    assert "link.txt" not in names and len(names) == 30


# ---- mixed precision at any depth, planned on the trained weights -----------------------
def _lm(layers):
    from omninet import ModelConfig, OmniNetModel

    torch.manual_seed(0)
    return OmniNetModel(ModelConfig(arch="decoder", vocab_size=64, hidden_size=32, num_layers=layers, num_heads=4,
                                    max_seq_length=16, dropout=0.0)).eval()


@pytest.mark.parametrize("layers, eligible", [(1, 1), (2, 2), (4, 2)])
def test_mixed_plan_has_eligible_blocks_at_any_depth(layers, eligible):
    from omninet.hardware import eligible_blocks, plan_mixed_precision

    model = _lm(layers)
    batch = {"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))}
    plan = plan_mixed_precision(model, batch, dtype="bf16", error_budget=0.5)  # generous: every eligible block fits
    assert len(plan.low_precision) == eligible == len(eligible_blocks(model))
    rows = {r["layer"]: r for r in plan.table}
    if layers <= 2:
        assert plan.protected == [] and "sensitivity alone" in rows["decoder.blocks.0"]["reason"]
    else:
        assert plan.protected == ["decoder.blocks.0", f"decoder.blocks.{layers - 1}"]


TRIAL_TASK = {"name": "listops", "min_length": 5, "max_length": 40, "max_depth": 3, "num_train": 256, "num_eval": 64}


def trial(**sections) -> dict:
    cfg = {"task": dict(TRIAL_TASK), "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2},
           "train": {"steps": 8, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2},
           "hardware": {"device": "cpu", "num_threads": 1},
           "measure": {"memory": False, "min_seconds": 0.0, "warmup": 1, "latency_reps": 20, "throughput_reps": 20}}
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def test_mixed_trial_plans_on_trained_weights_and_records_blocks(monkeypatch):
    import omninet.hardware as hw
    from omninet.trial import run_trial

    seen = {}
    real = hw.plan_mixed_precision

    def spy(model, batch, **kw):
        seen["weight"] = model.encoder.blocks[0].ffn.up.weight.detach().clone()
        return real(model, batch, **kw)

    monkeypatch.setattr(hw, "plan_mixed_precision", spy)
    fp32 = run_trial(trial())
    mixed = run_trial(trial(hardware={"precision": "mixed", "allow_emulated": True}))
    assert mixed.status == "ok", mixed.error
    assert mixed.precision == "mixed" and mixed.low_precision_blocks >= 1  # 2 layers: blocks are eligible
    assert mixed.loss_curve == fp32.loss_curve  # trained in fp32; the plan comes after training
    from omninet.model import OmniNetModel
    from omninet.trial import TrialConfig

    torch.manual_seed(0)
    init = OmniNetModel(TrialConfig.from_dict(trial()).model_config).encoder.blocks[0].ffn.up.weight
    assert not torch.allclose(seen["weight"], init)  # measured on the trained weights
    assert fp32.low_precision_blocks is None


def _cpu_flags(monkeypatch, **flags):
    names = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
             "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
             "amx_fp16": "_is_amx_fp16_supported"}
    for flag, fn in names.items():
        monkeypatch.setattr(torch.cpu, fn, lambda v=flags.get(flag, False): v, raising=False)


@pytest.mark.parametrize("flags", [dict(avx2=True), dict(avx2=True, avx512=True)])
@pytest.mark.parametrize("precision", ["mixed", "bf16"])
def test_non_native_precision_is_refused_before_running_or_tagged_emulated(monkeypatch, flags, precision):
    from omninet.hardware import probe_capabilities
    from omninet.trial import run_trial

    _cpu_flags(monkeypatch, **flags)
    caps = probe_capabilities("cpu")
    assert precision not in caps["native_precisions"]
    res = run_trial(trial(hardware={"precision": precision}))
    assert res.status == "invalid" and res.steps == 0 and res.num_params is None  # nothing ran
    assert "allow_emulated" in res.error and "\n" not in res.error
    if precision in caps["refused"]:
        assert caps["refused"][precision] in res.error  # the probe's own reason
    res = run_trial(trial(hardware={"precision": precision, "allow_emulated": True}, train={"steps": 3}))
    assert res.status == "ok", res.error
    assert res.emulated is True and res.precision == precision and "emulated" in res.notes
