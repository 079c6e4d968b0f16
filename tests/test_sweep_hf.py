"""A sweep over the user's own Hugging Face checkpoint (issue 31): ``base: {hf: PATH}`` is
converted once into ``<results>/base``, trials derive from it through Ray on text tokenized with
its own tokenizer.json, a resumed sweep does not convert again, and the recommended model goes
back out as an HF folder that transformers loads with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")
transformers = pytest.importorskip("transformers", reason="transformers (the test oracle) is in the dev extra")

from hf_models import CORPUS, tiny_llama_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny-llama"))


def _sweep(results: Path) -> dict:
    return {
        "name": "hf-tiny", "results_dir": str(results),
        "trial": {"task": {"name": "text_lm", "max_length": 64, "max_bytes": 60_000, "root": str(CORPUS),
                           "padding": "max_length"},
                  "model": {"attention": {"block_sparse": {"min_seq_length": 0, "block_size": 16}}},
                  "train": {"steps": 1, "batch_size": 4, "eval_batch_size": 8, "eval_max_examples": 32},
                  "measure": {"batch_size": 2, "latency_reps": 20, "throughput_reps": 20, "warmup": 1, "min_seconds": 0.0,
                              "max_rounds": 1, "memory": False}},
        "base": {"hf": "set by tune(base=...)"},
        "finetune": {"steps": 0},
        "search_space": {"model.attention.kernel": {"choices": ["sdpa", "block_sparse"]},
                         "prune.heads": {"choices": [0.0, 0.25]}},
        "enqueue": [{"model.attention.kernel": "sdpa", "prune.heads": 0.0}],
        "objectives": [{"key": "accuracy", "direction": "maximize"}, {"key": "latency_p50_ms", "direction": "minimize"}],
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "concurrency": 1, "trials": 3}],
        "repeats": {"count": 1}, "sampler": {"kind": "random", "seed": 1}, "keep_models": "all",
    }


@pytest.mark.slow  # one embedded Ray, 3 small trials and a resume: ~1-2 minutes on 2 cores
def test_a_sweep_over_an_hf_checkpoint_converts_once_and_exports_its_winner(tiny_hf, tmp_path, monkeypatch) -> None:
    import omninet.sweep.models as convert  # where the sweep's conversion calls it
    from omninet import OmniNetModel
    from omninet.sweep import SweepResult
    from omninet.sweep.api import tune
    from omninet.sweep.models import export_recommended

    calls = []
    real = convert.import_checkpoint
    monkeypatch.setattr(convert, "import_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    results = tmp_path / "r"
    result = tune(_sweep(results), base=f"hf:{tiny_hf}", num_cpus=2)
    assert len(calls) == 1 and (results / "base" / "tokenizer.json").is_file()
    assert (results / "base" / "imported_from.json").is_file()
    df = result.trials()
    ok = df[df.status == "ok"]
    assert len(ok) == 3, df[["trial_number", "status", "error"]].to_string()
    ref = ok[ok.role == "reference"]
    assert len(ref) == 1 and (ref.finetune_steps == 0).all()
    assert ok.eval_hash.nunique() == 1 and (ok.eval_unit == "token").all()  # the same tokens for every trial
    derived = ok[ok.role != "reference"]
    assert derived.passes.str.startswith("load_base").all() and derived.accuracy_diff_ref.notna().all()
    # the base model is the checkpoint: its reference accuracy is transformers' on the same windows
    # (scored by the trial; here: the imported model reloads to transformers' logits)
    base = OmniNetModel.from_pretrained(results / "base")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    ids = torch.randint(1, base.config.vocab_size, (1, 20))
    with torch.no_grad():
        assert (base(ids).logits - theirs(input_ids=ids).logits).abs().max() <= 1e-4

    again = tune(_sweep(results), base=f"hf:{tiny_hf}", num_cpus=2)  # resume: found, not converted again
    assert len(calls) == 1 and len(again.trials()) == len(df)

    reopened = SweepResult.load(results)
    written = export_recommended(reopened, "cpu", tmp_path / "winner", hf_out=None)
    assert (tmp_path / "winner" / "model.safetensors").is_file() and (tmp_path / "winner" / "tokenizer.json").is_file()
    winner = OmniNetModel.from_pretrained(tmp_path / "winner").eval()
    if winner.config.attention.kernel in ("sdpa", "eager"):
        winner.save_hf(tmp_path / "winner-hf")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "winner-hf").eval()
        with torch.no_grad():
            assert (back(input_ids=ids).logits - winner(ids).logits).abs().max() <= 1e-4
        assert (tmp_path / "winner-hf" / "tokenizer.json").is_file()
    else:
        with pytest.raises(ValueError, match="save_pretrained"):
            winner.save_hf(tmp_path / "winner-hf")
    assert written["trial_number"] in set(ok.trial_number)
