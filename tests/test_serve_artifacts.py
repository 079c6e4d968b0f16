"""Trained-model folders (save_trial_model / load_trial_model), SweepResult.load_model, length
buckets and per-item isolation in batched inference; no Ray. The HTTP path is in test_serving.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from omninet.buckets import bucket_for, default_buckets, pad_to_bucket
from omninet.artifacts import (config_hash, keep_model, load_trial_model, model_subdir, prune_models, save_trial_model,
                               trial_identity)
from omninet.serve.predictor import Predictor, RequestError
from omninet.serve.testing import LISTOPS_SERVE_TRIAL, quick_trained_model

TRIAL = {**LISTOPS_SERVE_TRIAL, "train": {**LISTOPS_SERVE_TRIAL["train"], "steps": 5}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return quick_trained_model(TRIAL, tmp_path_factory.mktemp("model") / "m", sweep="s", pool="cpu", trial=3)


def test_default_buckets_and_bucket_for() -> None:
    assert default_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert default_buckets(100) == [16, 32, 64, 100]
    assert default_buckets(8) == [8]
    buckets = default_buckets(100)
    assert [bucket_for(n, buckets) for n in (1, 16, 17, 64, 65, 100)] == [16, 16, 32, 64, 100, 100]
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_for(101, buckets)


def test_folder_layout_identity_and_roundtrip(model_dir) -> None:
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        ["config.json", "model.safetensors", "trial.json", "identity.json", "metrics.json"])
    assert json.loads((model_dir / "trial.json").read_text()) == TRIAL
    identity = json.loads((model_dir / "identity.json").read_text())
    assert identity == {"sweep": "s", "pool": "cpu", "trial": 3, "config_hash": config_hash(TRIAL)}
    assert config_hash(TRIAL) == config_hash(json.loads(json.dumps(TRIAL, sort_keys=True)))  # key order does not matter
    trained = load_trial_model(model_dir)
    assert not trained.model.training and trained.max_length == 512 and trained.task.name == "listops"
    assert trained.evaluate()["accuracy"] == pytest.approx(trained.metrics["accuracy"])
    assert str(model_subdir("cpu", 7)) == "models/pool=cpu/trial-000007"
    assert [keep_model(p, on_front=f) for p in ("all", "pareto", "none") for f in (True, False)] == \
        [True, True, True, False, False, False]


def test_outputs_at_a_bucket_equal_the_unpadded_outputs(model_dir) -> None:
    trained = load_trial_model(model_dir)
    eval_split = trained.task.split("eval")
    seqs = [eval_split[i]["input_ids"].tolist() for i in range(6)]
    for ids in seqs:
        alone = trained.model(torch.tensor([ids])).logits
        for bucket in (bucket_for(len(ids), trained.buckets), 512):
            input_ids, mask = pad_to_bucket([ids], bucket, pad_id=trained.task.pad_id)
            assert input_ids.shape == (1, bucket) and int(mask.sum()) == len(ids)
            torch.testing.assert_close(trained.model(input_ids, attention_mask=mask).logits, alone, atol=1e-5, rtol=1e-4)
    direct = torch.cat([trained.model(torch.tensor([ids])).logits for ids in seqs])
    torch.testing.assert_close(trained.logits(seqs), direct, atol=1e-5, rtol=1e-4)


def test_bad_folders_say_what_is_missing(model_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        load_trial_model(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="missing model.safetensors"):
        load_trial_model(tmp_path / "half")
    trained = load_trial_model(model_dir)
    with pytest.raises(ValueError, match="config_hash"):
        save_trial_model(trained.model, tmp_path / "x", trial_config=TRIAL,
                         identity={"sweep": "s", "pool": "cpu", "trial": 1, "config_hash": "0" * 64})


def test_a_poisoned_item_fails_alone(model_dir) -> None:
    predictor = Predictor(load_trial_model(model_dir))
    good = [[2, 10, 11, 5], [3, 9, 9, 9, 5]]
    results = predictor.run_batch([good[0], [10**6], good[1]])  # an id the embedding cannot look up
    assert isinstance(results[1], Exception)
    for got, want in zip([results[0], results[2]], predictor.run_batch(good)):
        assert got["prediction"] == want["prediction"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        predictor.parse(json.dumps({"input_ids": [10**6]}))


def test_the_old_import_paths_still_work() -> None:
    import omninet.artifacts
    import omninet.serve
    import omninet.serve.artifacts

    for name in omninet.serve.__all__:
        assert getattr(omninet.serve, name) is getattr(omninet.artifacts, name)
    for name in omninet.artifacts.__all__:
        assert getattr(omninet.serve.artifacts, name) is getattr(omninet.artifacts, name)


def _write_sweep(results: Path, trained_dir: Path) -> None:
    """A one-pool results directory in the platform's format whose recommended trial is 1."""
    import optuna

    from omninet.sweep.config import load_config
    from omninet.sweep.records import ParquetStore

    config = load_config({"name": "serve-test", "results_dir": str(results), "trial_fn": "omninet.sweep.testing:toy_trial",
                          "estimate_fn": None, "trial": {"toy": {}}, "search_space": {"toy.x": {"low": 0.0, "high": 1.0}},
                          "pools": [{"name": "cpu", "resources": {"CPU": 1}, "trials": 2}]})
    results.mkdir(parents=True)
    (results / "sweep.yaml").write_text(yaml.safe_dump(config.to_plain(), sort_keys=False))
    store = ParquetStore(results / "trials", config)
    study = optuna.create_study(storage=f"sqlite:///{results / 'optuna.db'}", study_name=config.study_name("cpu"),
                                directions=["maximize", "minimize", "minimize"])
    for number, acc in ((0, 0.3), (1, 0.6)):
        store.write("cpu", {"sweep": "serve-test", "trial_number": number, "status": "ok", "simulated": False,
                            "feasible": True, "accuracy": acc, "peak_memory_infer_mb": 10.0, "latency_p50_ms": 1.0,
                            "config_json": json.dumps(TRIAL), "result_json": "{}", "param.toy.x": acc})
        study.add_trial(optuna.trial.create_trial(values=[acc, 10.0, 1.0]))
    dest = results / model_subdir("cpu", 1)
    dest.parent.mkdir(parents=True)
    trained = load_trial_model(trained_dir)
    save_trial_model(trained.model, dest, trial_config=TRIAL,
                     identity=trial_identity(sweep="serve-test", pool="cpu", trial=1, trial_config=TRIAL))


def test_sweep_result_loads_the_recommended_trials_model(model_dir, tmp_path) -> None:
    from omninet.sweep.results import SweepResult

    _write_sweep(tmp_path / "sweep", model_dir)
    result = SweepResult.load(tmp_path / "sweep")
    trained = result.load_model("cpu")
    assert trained.identity["trial"] == 1 and trained.path.name == "trial-000001"
    assert result.load_model("cpu", trial=1).identity == trained.identity
    assert result.model_path("cpu") == result.model_path("cpu", trial=1) == trained.path  # what `omninet serve` serves
    with pytest.raises(ValueError, match="trial 0 of pool 'cpu' kept no model"):
        result.load_model("cpu", trial=0)
    with pytest.raises(ValueError, match="not in this sweep"):
        result.load_model("gpu")
    assert prune_models(tmp_path / "sweep", "cpu", keep={0}) == [tmp_path / "sweep" / model_subdir("cpu", 1)]
    with pytest.raises(ValueError, match="trial 1 of pool 'cpu' kept no model"):
        result.load_model("cpu")


def test_dashboard_shows_the_serving_benchmark(model_dir, tmp_path) -> None:
    from omninet.sweep.dashboard import build_dashboard

    _write_sweep(tmp_path / "sweep", model_dir)
    assert "id='serving'" not in build_dashboard(tmp_path / "sweep").read_text()
    level = {"rate_rps": 50, "throughput_rps": 49.5, "p50_ms": 10.0, "p95_ms": 20.0, "p99_ms": 30.0, "errors": {},
             "batch_sizes": {"1": 10, "4": 10}}
    report = {"headline": {"target_p99_ms": 200, "b1_throughput_rps": 49.5, "dyn_throughput_rps": 99.0, "speedup": 2.0,
                           "bounds": {"forward_bound_speedup": 1.27, "amdahl_bound_speedup": 1.08}},
              "model": {"pool": "cpu", "trial": 1}, "conditions": {"cpu_model": "x"},
              "modes": {"b1": {"open_loop": [level]}, "dyn": {"open_loop": [level]}}}
    (tmp_path / "sweep" / "serving.json").write_text(json.dumps(report))
    page = build_dashboard(tmp_path / "sweep").read_text()
    assert "id='serving'" in page and "dynamic" in page and "2.5" in page  # mean batch (10*1 + 10*4) / 20
    assert "x1.27 with a free HTTP path" in page and "x1.08" in page  # the bounds on what batching could give


def test_task_encode_uses_the_tasks_own_tokenizer() -> None:
    from omninet.tasks import LISTOPS_TOKENS, ByteTokenizer, build_task

    listops = build_task({"name": "listops", "preset": "quickstart"})
    assert listops.encode("[MAX 2 9 ]") == [LISTOPS_TOKENS.index(t) for t in ("[MAX", "2", "9", "]")]
    assert build_task({"name": "copy"}).encode("ab") == ByteTokenizer().encode("ab")
    with pytest.raises(ValueError, match="no text tokenizer"):
        build_task({"name": "associative_recall"}).encode("ab")
