"""Trials derived from a trained base (issue 24): the passes in their documented order, a base
that does not fit refused in one line before anything runs, ``finetune.steps: 0`` as the
zero-shot figures, distillation that changes the loss and can be turned off, and a derived
model's folder that reloads to the same outputs."""

from __future__ import annotations

import copy
import sysconfig
from pathlib import Path

import pytest
import torch

from omninet.passes import PASS_ORDER, check_base, derive, load_base
from omninet.trial import TrialConfig, run_trial
from omninet.trial.runners import RunContext

N = 64
ROOT = Path(__file__).resolve().parents[1]
SLOW_FIXTURES = {"base_dir"}  # a trained base: its tests are slow (tests/conftest.py)
# one stdlib package as the corpus: the same byte budget and window counts as the whole stdlib,
# whose listing (site-packages included, then excluded) costs ~0.5 s at every task build
CORPUS = str(Path(sysconfig.get_paths()["stdlib"]) / "asyncio")


def trial(**model) -> dict:
    return {"task": {"name": "masked_bytes", "max_length": N, "max_bytes": 200_000, "root": CORPUS},
            "model": {"hidden_size": 16, "num_layers": 2, "num_heads": 4, "position": {"kind": "rotary"},
                      "attention": {"block_sparse": {"min_seq_length": 0, "block_size": 16},
                                    "linformer": {"min_seq_length": 0}}, **model},
            "train": {"steps": 30, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "eval_max_examples": 64},
            "measure": {"latency_reps": 20, "throughput_reps": 20, "warmup": 1, "min_seconds": 0.0, "max_rounds": 1,
                        "memory": False}}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    result = run_trial(trial(), context=RunContext(keep_model=True))
    assert result.status == "ok", result.error
    for name, data in result.model_files.items():
        (out / name).write_bytes(data)
    return out


def derived(base_dir, steps: int = 0, distill: float = 0.0, prune: float = 0.0, **model) -> dict:
    cfg = trial(**model)
    cfg["base"] = str(base_dir)
    cfg["prune"] = {"heads": prune}
    cfg["finetune"] = {"steps": steps, "lr": 1e-3, "warmup_steps": 1, "distill": distill}
    return cfg


def test_a_base_that_does_not_fit_is_refused_in_one_line(base_dir, tmp_path) -> None:
    wrong = copy.deepcopy(trial())
    wrong["task"]["max_length"] = 32  # another length is fine for rotary; another width is not
    wrong["model"]["hidden_size"] = 32
    wrong["base"] = str(base_dir)
    with pytest.raises(ValueError, match=r"^base: hidden_size=16 but the trial's model needs hidden_size=32") as err:
        TrialConfig.from_dict(wrong)
    assert "\n" not in str(err.value)
    vocab = trial()
    vocab["task"] = {"name": "byte_lm", "max_length": N, "max_bytes": 200_000, "root": CORPUS}  # 260 ids, and a decoder
    vocab["base"] = str(base_dir)
    with pytest.raises(ValueError, match=r"^base: arch='encoder' but"):
        TrialConfig.from_dict(vocab)
    learned = load_base(base_dir).config.replace(position={"kind": "learned"}, max_seq_length=32)
    with pytest.raises(ValueError, match="max_seq_length=32 is shorter than"):
        check_base(learned, learned.replace(max_seq_length=N), task_length=N)
    missing = trial()
    missing["base"] = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match="is not a saved OmniNet model"):
        TrialConfig.from_dict(missing)
    # nothing runs: the trial runner reports it as invalid
    assert run_trial(wrong).status == "invalid"


def test_passes_run_in_the_documented_order_on_the_base_weights(base_dir) -> None:
    assert PASS_ORDER == ("load_base", "prune_heads", "attention", "precision")
    cfg = TrialConfig.from_dict(derived(base_dir, prune=0.5, attention={
        "kernel": "block_sparse", "block_sparse": {"min_seq_length": 0, "block_size": 16, "sparsity_factor": 0.5}}))
    base = load_base(base_dir)
    batches = list(cfg.task_obj.batches("train", 8, seed=1))[:2]
    model, log = derive(base, cfg.model_config, prune_ratio=cfg.prune.heads, calibration=batches, seq_length=N)
    assert [line.split(":")[0] for line in log.passes] == ["load_base", "prune_heads", "attention"]
    assert log.heads_pruned == 4 and sum(a.num_heads for a in model.attention_layers()) == 4
    assert model.config.attention.kernel == "block_sparse"
    # the kernel swap reused every remaining weight: the FFN and embeddings are the base's
    assert torch.equal(model.embed.weight, base.embed.weight)
    kept = model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in base.state_dict().items() if ".ff." in k or "norm" in k)
    assert base.config.attention.kernel == "sdpa" and sum(a.num_heads for a in base.attention_layers()) == 8


def test_linformer_projections_start_as_a_strided_mean_pool(base_dir) -> None:
    cfg = TrialConfig.from_dict(derived(base_dir, attention={"kernel": "linformer",
                                                             "linformer": {"min_seq_length": 0, "k": 16}}))
    model, log = derive(load_base(base_dir), cfg.model_config, calibration=[], seq_length=N)
    proj = next(m for m in model.modules() if type(m).__name__ == "LinformerProjection")
    stride = N // 16
    assert torch.allclose(proj.E[0, :stride], torch.full((stride,), 1 / stride))
    assert proj.E[0, stride:].abs().sum() == 0 and torch.allclose(proj.E[:16, :N].sum(1), torch.ones(16))
    assert "strided mean pool" in log.passes[-1] and "k 16 at" in log.passes[-1]
    # the kernel's own hook did it (KernelSpec.from_dense): the pass names no kernel
    from omninet.attention import get_kernel

    before = proj.E.detach().clone()
    proj.E.data.normal_()
    assert get_kernel("linformer").from_dense(proj, seq_length=N) and torch.equal(proj.E, before)


def test_a_new_kernel_derives_through_its_own_hook_without_a_pass_edit() -> None:
    """A kernel registered with weights of its own and a ``from_dense`` hook: the kernel swap
    copies every shared weight, lets the hook start the new ones, and records the hook's line."""
    from torch import nn

    from omninet.attention import KERNELS, get_kernel, register_kernel
    from omninet.config import _KERNEL_RULES, ModelConfig
    from omninet.model import OmniNetModel
    from omninet.passes import swap_attention

    class Temperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Parameter(torch.randn(()))

    def start(state, *, seq_length):
        state.t.data.fill_(1.0)
        return f"temperature 1 at {seq_length} tokens"

    def tempered(q, k, v, *, state, scale, **kw):
        return get_kernel("sdpa").fn(q * state.t, k, v, scale=scale, **kw)

    register_kernel("tempered_test", make_state=lambda config, layer_idx, cross: Temperature(), from_dense=start,
                    describe=lambda config, n: "a learned temperature")(tempered)
    try:
        dense = OmniNetModel(ModelConfig(arch="encoder", vocab_size=40, hidden_size=16, num_heads=2, num_layers=2,
                                         max_seq_length=32)).eval()
        model, line = swap_attention(dense, dense.config.attention.replace(kernel="tempered_test"), seq_length=32)
        assert line == ("attention: sdpa -> tempered_test (a learned temperature; weights reused; "
                        "2 layer(s): temperature 1 at 32 tokens)")
        assert all(a.kernel_state.t.item() == 1.0 for a in model.attention_layers())
        ids = torch.randint(0, 40, (2, 32))
        torch.testing.assert_close(model.eval()(ids).logits, dense(ids).logits)  # temperature 1: the dense model
    finally:
        KERNELS.pop("tempered_test")
        _KERNEL_RULES.pop("tempered_test")


def test_finetune_steps_zero_is_the_zero_shot_record(base_dir) -> None:
    r = run_trial(derived(base_dir, steps=0, prune=0.25))
    assert r.status == "ok", r.error
    assert r.derived and r.finetune_steps == 0 and r.steps == 0
    assert r.accuracy == r.accuracy_zero_shot and r.accuracy_se == r.accuracy_zero_shot_se
    assert r.passes.startswith("load_base") and "prune_heads: 2 of 8" in r.passes and r.passes.endswith("precision: fp32")
    tuned = run_trial(derived(base_dir, steps=10, prune=0.25))
    assert tuned.status == "ok" and tuned.steps == 10 and tuned.accuracy_zero_shot == r.accuracy_zero_shot
    assert tuned.eval_loss != tuned.eval_loss_zero_shot and tuned.finetune_seconds > 0  # the fine-tune moved it
    assert tuned.scores_zero_shot.eval_hash == tuned.scores.eval_hash  # both on the same eval rows


def test_distillation_changes_the_loss_and_can_be_turned_off(base_dir) -> None:
    runs = {d: run_trial(derived(base_dir, steps=5, distill=d, attention={
        "kernel": "block_sparse", "block_sparse": {"min_seq_length": 0, "block_size": 16, "sparsity_factor": 0.5}}))
        for d in (0.0, 0.5)}
    assert all(r.status == "ok" for r in runs.values()), [r.error for r in runs.values()]
    assert runs[0.0].distill == 0.0 and runs[0.5].distill == 0.5
    assert runs[0.0].loss_curve[0] != pytest.approx(runs[0.5].loss_curve[0], rel=1e-4)
    again = run_trial(derived(base_dir, steps=5, distill=0.0, attention={
        "kernel": "block_sparse", "block_sparse": {"min_seq_length": 0, "block_size": 16, "sparsity_factor": 0.5}}))
    assert again.loss_curve == runs[0.0].loss_curve  # off is off: the plain task loss, deterministically


def test_a_derived_trial_folder_reloads_to_the_same_outputs(base_dir, tmp_path) -> None:
    from omninet.model import OmniNetModel

    cfg = derived(base_dir, steps=3, prune=0.25, attention={
        "kernel": "block_sparse", "block_sparse": {"min_seq_length": 0, "block_size": 16, "sparsity_factor": 0.5}})
    r = run_trial(cfg, context=RunContext(keep_model=True))
    assert r.status == "ok", r.error
    for name, data in r.model_files.items():
        (tmp_path / name).write_bytes(data)
    again = OmniNetModel.from_pretrained(tmp_path).eval()
    assert again.config.attention.kernel == "block_sparse" and again.config.heads.pruned_heads
    task = TrialConfig.from_dict(cfg).task_obj
    batch = next(task.batches("eval", 4))
    with torch.no_grad():
        logits = again(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    meter = task.new_meter()
    meter.update(logits, batch)
    first = r.scores.prefix(4)
    assert meter.scores().correct.tolist() == first.correct.tolist()


def _kept(result, cfg: dict, out):
    from omninet.artifacts import write_trial_model

    return write_trial_model(result.model_files, out, trial_config=TrialConfig.from_dict(cfg).to_dict(),
                             identity={"sweep": "t", "pool": "cpu", "trial": 1}, metrics=result.to_dict())


def test_a_derived_masked_byte_model_serves_fill_mask(base_dir, tmp_path) -> None:
    from omninet.artifacts import load_trial_model
    from omninet.serve.predictor import Predictor

    cfg = derived(base_dir, steps=2, prune=0.25, attention={
        "kernel": "block_sparse", "block_sparse": {"min_seq_length": 0, "block_size": 16, "sparsity_factor": 0.5}})
    r = run_trial(cfg, context=RunContext(keep_model=True))
    assert r.status == "ok", r.error
    trained = load_trial_model(_kept(r, cfg, tmp_path / "m"))
    assert trained.kind == "fill_mask" and trained.model.config.heads.pruned_heads  # passes re-applied from the folder
    predictor = Predictor(trained)
    inputs = predictor.parse('{"text": ["def f(x<mask>:\\n    return x"]}')
    (out,) = predictor.run_batch(inputs.sequences)
    assert out["prediction"]["positions"] == [7] and len(out["prediction"]["ids"]) == 1
    assert 0 <= out["probabilities"][0] <= 1 and out["prediction"]["text"].startswith("def f(x")
    assert trained.evaluate(max_examples=64)["accuracy"] == pytest.approx(r.accuracy, abs=1e-9)


def test_a_derived_int8_model_reloads_quantized_as_it_was_measured(base_dir, tmp_path) -> None:
    from omninet.artifacts import load_trial_model

    cfg = derived(base_dir, steps=2)
    cfg["hardware"] = {"precision": "int8", "num_threads": 1}
    r = run_trial(cfg, context=RunContext(keep_model=True))
    assert r.status == "ok", r.error
    assert r.passes.endswith("precision: int8 (after the fine-tune)")
    trained = load_trial_model(_kept(r, cfg, tmp_path / "q"))
    assert any("quantized" in type(m).__module__ for m in trained.model.modules())
    assert trained.evaluate(max_examples=64)["accuracy"] == pytest.approx(r.accuracy, abs=1e-9)


def test_tune_takes_the_users_own_model_as_the_base(base_dir, tmp_path) -> None:
    """``omninet.tune(config, base=model_or_path)``: the model is saved once into the results and
    becomes the sweep's ``base.checkpoint``, checked against the task before anything runs."""
    import yaml

    from omninet.sweep.api import with_base
    from omninet.sweep.config import SweepConfigError, load_config

    doc = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    doc["trial"] = {**trial(), "finetune": {"steps": 2}}
    doc.pop("finetune")
    doc["results_dir"] = str(tmp_path / "r")
    mine = load_base(base_dir)
    data = with_base(doc, mine, None)
    assert data["base"] == {"checkpoint": str((tmp_path / "r" / "base-checkpoint").resolve())}
    assert (tmp_path / "r" / "base-checkpoint" / "model.safetensors").is_file()
    assert load_config(data).base.checkpoint == data["base"]["checkpoint"]
    assert with_base(doc, str(base_dir), None)["base"] == {"checkpoint": str(base_dir.resolve())}
    wrong = dict(doc, trial={**trial(hidden_size=32), "finetune": {"steps": 2}})
    with pytest.raises(SweepConfigError, match="base: hidden_size=16 but the trial's model needs hidden_size=32"):
        load_config(with_base(wrong, str(base_dir), None))
