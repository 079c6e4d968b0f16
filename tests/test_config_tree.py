"""One typed configuration tree from YAML to the worker: every shipped YAML loads, results
written by the previous format still load and resume, a misspelt path or objective is an
error at load time, and a sweep trial's config is parsed at most twice."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import optuna
import pytest
import yaml

from omninet.sweep import SweepConfigError, SweepResult, load_config
from omninet.trial import TrialConfig
from omninet.trial import config as trial_config

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "fixtures" / "legacy_results"


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_loads_with_the_real_runner(path, tmp_path):
    data = yaml.safe_load(path.read_text())
    if (data.get("base") or {}).get("hf"):  # a sweep over the user's model: given one (a tiny Llama) as --base does
        pytest.importorskip("transformers", reason="the tiny stand-in checkpoint is built with transformers")
        from hf_models import CORPUS, tiny_llama_folder
        from omninet.sweep.api import with_base

        data["trial"]["task"]["root"] = str(CORPUS)  # one stdlib package: the whole stdlib takes seconds to tokenize
        path = with_base(data, str(tiny_llama_folder(tmp_path / "model")), None)
    cfg = load_config(path)
    assert isinstance(cfg.trial, TrialConfig)
    assert load_config(cfg.to_plain()).to_plain() == cfg.to_plain()  # the manifest round-trips


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_trial_loads(path):
    cfg = TrialConfig.from_dict(yaml.safe_load(path.read_text()))
    assert TrialConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def _quick(**overrides) -> dict:
    """The shipped quickstart sweep (test_every_shipped_sweep_loads_with_the_real_runner loads it
    as shipped), its masked bytes read from one stdlib package: building the task then skips
    listing the whole stdlib (site-packages included), ~0.5 s at every load."""
    data = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    data["trial"]["task"]["root"] = str(Path(sysconfig.get_paths()["stdlib"]) / "asyncio")
    data.update(overrides)
    return data


def test_a_misspelt_search_path_names_the_closest_valid_one():
    data = _quick()
    data["search_space"] = {"model.attention.kernal": {"choices": ["sdpa"]}}
    with pytest.raises(SweepConfigError, match="did you mean 'model.attention.kernel'"):
        load_config(data)
    data["search_space"] = {"model.attention.block_sparse.sparsity": {"low": 0.1, "high": 0.5}}
    with pytest.raises(SweepConfigError, match="model.attention.block_sparse.sparsity_factor"):
        load_config(data)


def test_a_misspelt_objective_is_an_error_at_load_time():
    data = _quick(objectives=[{"key": "acuracy", "direction": "maximize"}])
    with pytest.raises(SweepConfigError, match="'acuracy' is not a result of the trial runner"):
        load_config(data)


def test_a_calibrated_latency_objective_needs_calibration():
    norm = [{"key": "accuracy", "direction": "maximize"}, {"key": "latency_p50_norm_ms", "direction": "minimize"}]
    assert [o.key for o in load_config(_quick(objectives=norm)).objectives][1] == "latency_p50_norm_ms"
    data = _quick(objectives=norm)
    data["trial"]["measure"] = {**data["trial"].get("measure", {}), "calibrate": False}
    with pytest.raises(SweepConfigError, match="'latency_p50_norm_ms' is a calibrated latency, but "
                                               "trial.measure.calibrate is false") as info:
        load_config(data)
    assert "\n" not in str(info.value)


def test_results_load_whatever_objectives_the_sweep_recorded(tmp_path):
    """A manifest is validated without the sweep's runner: objectives such as the calibrated
    latency or p99 (real-runner results only) must not make its results unreadable."""
    keys = ["accuracy", "latency_p50_norm_ms", "latency_p99_ms", "peak_rss_infer_mb"]
    cfg = load_config(_quick(objectives=[{"key": k, "direction": "maximize" if k == "accuracy" else "minimize"}
                                         for k in keys]))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(cfg.to_plain(), sort_keys=False))  # as the controller writes it
    loaded = SweepResult.load(tmp_path)
    assert loaded.objectives == keys and loaded.config.trial_fn == cfg.trial_fn


def test_a_bad_value_in_the_search_space_is_caught_without_parsing_every_trial():
    before = trial_config.parse_count()
    load_config(_quick())
    assert trial_config.parse_count() - before == 1  # the base trial, once
    data = _quick()
    data["search_space"]["model.num_heads"] = {"choices": [4, 5]}
    with pytest.raises(SweepConfigError, match="value 5 makes an invalid trial config"):
        load_config(data)


@pytest.mark.slow  # a real trial, run as a worker runs it (~5-12 s)
def test_a_sweep_trial_is_parsed_exactly_once_by_the_controller():
    """The controller builds the trial's typed config once; Ray ships it pickled (no parse);
    the worker runs it as is (a simulated pool re-targets it to the CPU without parsing it
    again: ``TrialConfig.on_device``)."""
    from omninet.sweep.worker import TrialTask, execute_trial

    cfg = load_config(_quick(search_space={"model.attention.kernel": {"choices": ["sdpa", "linformer"]}}, enqueue=[],
                             base=None, finetune=None))
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    trial = study.ask()
    before = trial_config.parse_count()
    config = cfg.trial_config(cfg.sample(trial))  # controller
    shipped = pickle.loads(pickle.dumps(config))  # what Ray sends
    tiny = shipped.with_values({"train.steps": 2, "task.max_length": 64, "task.max_bytes": 200_000,
                                "train.eval_target_se": None, "train.eval_max_examples": 16, "measure.memory": False,
                                "measure.min_seconds": 0.0})
    counted = trial_config.parse_count()
    result = execute_trial(TrialTask(runner=cfg.runner, config=tiny, pool="gpu", key="t/gpu/0", accelerator="GPU",
                                     simulate=True))
    assert result["status"] == "ok", result["error"]
    assert counted - before - 1 == 1  # the controller's build (the test's own shrink is not counted)
    assert trial_config.parse_count() - counted == 0  # the worker, CPU re-target included
    assert result["simulated"] and result["device"] == "cpu"


@pytest.mark.slow
def test_results_written_by_the_previous_format_load_and_resume(tmp_path, ray_cluster):
    results = tmp_path / "legacy"
    shutil.copytree(LEGACY, results)
    old = SweepResult.load(results)
    before = old.trials()
    assert len(before) == 3 and set(before.status) == {"ok"}
    assert old.audit() == []
    assert old.recommend("cpu")["task"]["name"] == "listops"
    data = yaml.safe_load((results / "sweep.yaml").read_text())
    data["pools"][0]["trials"] = 4  # one more trial on the old study
    data["results_dir"] = str(results)
    path = tmp_path / "legacy.yaml"
    path.write_text(yaml.safe_dump(data))
    # the driver joins the session cluster (tests/conftest.py): how Ray starts is not this test's subject
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), "--config", str(path),
                           "--address", ray_cluster.address], capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resuming study" in proc.stdout
    after = SweepResult.load(results)
    assert sorted(after.trials().trial_number) == [0, 1, 2, 3]
    assert after.audit() == []
