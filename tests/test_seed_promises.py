"""The seed class's promises (issue 14): head pruning and importance on AdvancedTransformer,
save/load; regression tests for review bugs."""

from __future__ import annotations

import pytest
import torch

from omninet import AdvancedTransformer

TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is ~30x faster than two spinning on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    monkeypatch.delenv("OMNINET_CPU_ISA", raising=False)  # these flags, not a level simulated for the whole run
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


# ---- the memory threshold acts -----------------------------------------------------------
def _cls_model():
    from omninet import ModelConfig, OmniNetModel

    torch.manual_seed(0)
    return OmniNetModel(ModelConfig(arch="encoder", vocab_size=32, hidden_size=32, num_layers=2, num_heads=4,
                                    max_seq_length=24, num_classes=3, dropout=0.0))


def _cls_batch(B=12, N=24):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 32, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[::3, 17:] = False
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (B,), generator=g)}


def test_inference_guard_splits_then_lowers_precision_in_order_with_hysteresis(caplog):
    import logging
    import random

    from omninet.hardware import attach_memory_guard, low_precision_blocks, resolve_device_config

    model = _cls_model().eval()
    batch = _cls_batch(B=8)
    with torch.no_grad():
        ref = model(**batch)
    placement = resolve_device_config({"device": "cpu", "memory_threshold": 0.8})
    model = placement.apply(model)
    assert model.memory_guard.monitor.config.max_micro_batches == 16
    guard = attach_memory_guard(model, memory_threshold=0.8, backend=placement.backend, max_micro_batches=4)
    readings = iter([])
    guard.monitor.read = lambda: next(readings, 0.3)  # after a scripted phase: calm
    rng = random.Random(0)
    # noise inside the dead band [0.7, 0.8]: nothing happens
    readings = iter([0.75 + rng.uniform(-0.04, 0.04) for _ in range(10)])
    with torch.no_grad():
        for _ in range(10):
            model(**batch)
    assert guard.events == []
    # pressure: one level per `patience` (2) readings, micro-batches first
    readings = iter([0.9 + rng.uniform(-0.05, 0.05) for _ in range(4)])
    with caplog.at_level(logging.INFO, logger="omninet.hardware"), torch.no_grad():
        for _ in range(4):
            out = model(**batch)
    assert [e["change"].split(" (")[0] for e in guard.events] == ["micro-batches 2", "micro-batches 4"]
    assert guard.monitor.micro_batches == 4 and caplog.text.count("micro-batches") == 2  # each action logged
    torch.testing.assert_close(out.logits, ref.logits, **TOL)  # split outputs equal the unsplit ones
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    kinds = [k for k, _ in guard.monitor.levels]
    native_bf16 = torch.bfloat16 in placement.backend.native_dtypes()
    # the levels this CPU has: lower precision only where bf16 is native (AVX512-BF16 / AMX), after every split
    assert ("low_precision" in kinds) == native_bf16, (kinds, native_bf16)
    if native_bf16:  # then eligible blocks in low precision, after the micro-batch splits
        assert kinds.index("low_precision") > max(i for i, k in enumerate(kinds) if k == "micro_batches")
        readings = iter([0.95] * 2 * len(kinds))
        with torch.no_grad():
            for _ in range(2 * len(kinds)):
                model(**batch)
        assert set(low_precision_blocks(model)) == {"encoder.blocks.0", "encoder.blocks.1"}  # shallow: both
    readings = iter([0.3] * 2 * len(kinds))
    with torch.no_grad():
        for _ in range(2 * len(kinds)):
            model(**batch)
    assert guard.monitor.level == 0 and not low_precision_blocks(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref.logits, rtol=0, atol=0)


def test_inference_guard_on_the_seed_class_and_oom_retry():
    model = seed()
    x, mask = _inputs(B=6)
    with torch.no_grad():
        ref, _ = model(hidden_states=x, attention_mask=mask)
    model = model.placement.__class__(**{**vars(model.placement), "memory_threshold": 0.5}).apply(model)
    guard = model.memory_guard
    guard.monitor.read = lambda: 0.1
    real_forward = type(model).forward
    calls = []

    def flaky(self, hidden_states, **kw):  # the first whole-batch call fails to allocate
        calls.append(hidden_states.shape[0])
        if len(calls) == 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return real_forward(self, hidden_states, **kw)

    type(model).forward = flaky
    try:
        with torch.no_grad():
            out, _ = model(hidden_states=x, attention_mask=mask)
    finally:
        type(model).forward = real_forward
    assert calls == [6, 3, 3] and guard.events[0]["cause"] == "out of memory"
    torch.testing.assert_close(out, ref, **TOL)
    assert guard.monitor.floor == 1
    with torch.no_grad():
        model(hidden_states=x, attention_mask=mask)
        model(hidden_states=x, attention_mask=mask)
    assert guard.monitor.level == 1  # low readings never restore below what an OOM proved necessary


def test_seed_class_memory_threshold_attaches_a_guard():
    model = seed(device_config={"device": "cpu", "memory_threshold": 0.85})
    assert model.memory_guard.monitor.config.memory_threshold == 0.85
    assert not hasattr(seed(), "memory_guard")  # no threshold: nothing acts
    x, _ = _inputs()
    out, _ = model(hidden_states=x)  # reads real memory (far below 85% here)
    assert out.shape == x.shape


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, True, "0.8"])
def test_bad_memory_threshold_is_one_line_before_anything(bad):
    from omninet.hardware import attach_memory_guard

    with pytest.raises(ValueError, match=r"memory_threshold.*\(0, 1\]") as info:
        seed(device_config={"device": "cpu", "memory_threshold": bad})
    assert "\n" not in str(info.value)
    model = _cls_model()
    with pytest.raises(ValueError, match=r"memory_threshold must be a fraction in \(0, 1\]"):
        attach_memory_guard(model, memory_threshold=bad if not isinstance(bad, str) else 2)
    assert "forward" not in model.__dict__


def test_training_micro_batches_give_the_same_gradients_and_checkpointing_too():
    from omninet.hardware import accumulate

    batch = _cls_batch(B=10)
    grads = {}
    for name, n, ckpt in (("whole", 1, False), ("micro3", 3, False), ("micro4_ckpt", 4, True)):
        model = _cls_model().train()
        model.encoder.gradient_checkpointing = ckpt
        accumulate(lambda mb: model(**mb).loss, batch, n)
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    for name in ("micro3", "micro4_ckpt"):
        assert grads[name].keys() == grads["whole"].keys()
        for k in grads["whole"]:
            torch.testing.assert_close(grads[name][k], grads["whole"][k], atol=1e-6, rtol=1e-4)


def test_memory_pressure_reads_the_registered_budget():
    from omninet.hardware import memory_pressure
    from omninet.hardware.monitor import _malloc_free, _status_bytes, clear_data_budget, register_data_budget

    fraction, which = memory_pressure()
    assert 0 < fraction < 1 and which in ("available", "cgroup", "rlimit_data")
    data = _status_bytes("VmData")
    if data is None:
        pytest.skip("no /proc/self/status")
    used = data - _malloc_free()  # what the budget counts: VmData less glibc's reusable free chunks
    register_data_budget(base=used - 30 * 2**20, limit=used + 10 * 2**20)
    try:
        fraction, which = memory_pressure()
        assert which == "rlimit budget" and 0.7 <= fraction <= 0.8  # 30 of 40 MB used (plus what this test made)
    finally:
        clear_data_budget()


# Activations dominate (512 x 128 tokens, hidden 64): the plain step needs far more than the
# budget, a quarter of the batch far less, so oneDNN's own buffers keep headroom.
OOM_TASK = {"name": "listops", "min_length": 100, "max_length": 128, "max_depth": 4, "num_train": 1024, "num_eval": 64}
OOM_BUDGET_MB = 400


def _oom_trial(threshold):
    return {"task": OOM_TASK, "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4},
            "train": {"steps": 3, "batch_size": 512, "lr": 3e-3, "warmup_steps": 1, "eval_batch_size": 128},
            "hardware": {"device": "cpu", "num_threads": 1, "memory_threshold": threshold},
            "measure": {"memory": False, "min_seconds": 0.0, "warmup": 1, "latency_reps": 20, "throughput_reps": 20,
                        "batch_size": 8}}


_REAL_LIMIT_CHILD = """
import json, sys
from omninet.trial import run_trial
plain, adapted = json.loads(sys.argv[1]), json.loads(sys.argv[2])
budget, roomy = float(sys.argv[3]), float(sys.argv[4])
runs = [(plain, budget), (adapted, budget), (plain, roomy)]
print(json.dumps([run_trial(c, memory_budget_mb=b, preflight=False).to_dict() for c, b in runs]))
"""


@pytest.mark.slow  # three trials, two under a real limit: ~30 s on a busy 2-core machine
def test_trial_that_ooms_plain_completes_with_memory_actions_under_a_real_limit():
    # In a fresh interpreter: an allocation refused under RLIMIT_DATA can leave oneDNN unable to
    # create primitives for the rest of the process, which would fail unrelated later tests.
    import json
    import subprocess
    import sys
    from pathlib import Path

    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU run-time limit uses Linux RLIMIT_DATA")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _REAL_LIMIT_CHILD, json.dumps(_oom_trial(None)),
                           json.dumps(_oom_trial(0.8)), str(OOM_BUDGET_MB), "4000"],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain, adapted, roomy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain["status"] == "oom", plain["error"]
    assert adapted["status"] == "ok", adapted["error"]
    assert adapted["memory_actions"].startswith("train: checkpointing, micro_batches=")
    assert roomy["status"] == "ok" and roomy["memory_actions"] is None
    assert adapted["loss_curve"] == pytest.approx(roomy["loss_curve"], rel=1e-3)  # same effective batch
    assert abs(adapted["accuracy"] - roomy["accuracy"]) <= 0.05


# ---- quantization-aware training -----------------------------------------------------------
def test_qat_trains_fake_quantized_then_converts_to_per_channel_int8():
    from omninet.hardware import convert_qat, prepare_qat, qat_modules, resolve_device_config

    model = _cls_model()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    before = {n: p for n, p in model.named_parameters()}
    prepare_qat(model)
    assert len(qat_modules(model)) == linears
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert all(p is before[n] for n, p in model.named_parameters())  # same tensors: optimizers keep working
    batch = _cls_batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        fake = model(**batch).logits
    convert_qat(model)
    qkv = model.encoder.blocks[0].attn.qkv
    assert type(qkv).__module__.startswith("torch.ao.nn.quantized.dynamic")
    assert qkv.weight().qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, fake, atol=2e-2, rtol=0)  # inference = what training saw
    seeded = seed(device_config={"device": "cpu", "precision": "qat_int8"})
    assert qat_modules(seeded)  # the seed class trains quantization-aware through its device_config
    with pytest.raises(ValueError, match="qat_int8.*CPU only"):
        from omninet.hardware import get_backend, resolve_precision

        fake_gpu = type("G", (type(get_backend("cpu")),), {"name": "cuda"})()
        resolve_precision("qat_int8", fake_gpu)
    assert resolve_device_config({"device": "cpu", "precision": "qat_int8"}, training=True).precision == "qat_int8"


def test_qat_trial_trains_quantization_aware_and_evaluates_int8():
    from omninet.trial import run_trial

    fp32 = run_trial(trial())
    qat = run_trial(trial(hardware={"precision": "qat_int8"}))
    assert qat.status == "ok", qat.error
    assert qat.precision == "qat_int8" and qat.accuracy is not None and qat.emulated is False
    assert qat.loss_curve != fp32.loss_curve  # training saw the fake quantization
    assert qat.loss_curve == pytest.approx(fp32.loss_curve, rel=0.1)


def test_trial_step_adds_the_router_balance_loss_once():
    # Regression (fixed on main): the training step added the router's balance term to a loss
    # that already held it.
    import copy

    from omninet import ModelConfig, OmniNetModel
    from omninet.trial import TrialConfig, loop

    torch.manual_seed(0)
    model = OmniNetModel(ModelConfig(arch="encoder", vocab_size=32, hidden_size=32, num_layers=2, num_heads=4,
                                     max_seq_length=24, num_classes=3, dropout=0.0,
                                     heads={"active_heads": 2, "balance_loss_weight": 0.5})).train()
    batch = _cls_batch()
    out = copy.deepcopy(model)(**batch)
    assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0
    cfg = TrialConfig.from_dict(trial())
    plan = loop.resolve_plan(cfg.hardware)
    loss = loop.step(model, loop.make_optimizer(model, cfg.train), batch, cfg.train, plan)
    assert float(loss) == pytest.approx(float(out.loss.detach()), rel=1e-6)  # task loss + aux, once
