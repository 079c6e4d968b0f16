"""Sweep config validation (no Ray): every section rejects bad input with one line, and
``sweeps/run.py`` exits 2 with nothing written."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import sysconfig
from pathlib import Path

import optuna
import pytest
import yaml

from omninet.sweep import load_config
from omninet.sweep.config import resolve_results_dir

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sweeps_run", ROOT / "sweeps" / "run.py")
run_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_py)

TOY = {
    "name": "toy",
    "trial_fn": "omninet.sweep.testing:toy_trial",
    "estimate_fn": "omninet.sweep.testing:toy_estimate",
    "trial": {"toy": {"sleep_s": 0.0, "kind": "a"}},
    "search_space": {
        "toy.x": {"low": 0.05, "high": 1.0},
        "toy.y": {"choices": [1, 2, 3]},
        "toy.z": {"low": 1, "high": 8, "log": True, "when": {"toy.y": [2, 3]}},
        "toy.w": {"choices": ["p", "q"], "when": {"toy.kind": "a"}},
        "toy.v": {"low": 0.0, "high": 1.0, "when": {"toy.kind": "b"}},
    },
    "pools": [{"name": "cpu", "resources": {"CPU": 1}, "trials": 3},
              {"name": "gpu", "resources": {"GPU": 1}, "concurrency": 2}],
    "constraints": {"gpu": {"max_memory_mb": 300}},
    "sampler": {"kind": "nsga2", "seed": 1},
    "simulate_accelerators": True,
}

# (section, change, words the one-line message must contain)
BAD = [
    ("top", {"unknown_key": 1}, "unknown_key"),
    ("name", {"name": "has space"}, "name"),
    ("results_dir", {"results_dir": 3}, "results_dir"),
    ("trial", {"trial": [1, 2]}, "trial"),
    ("trial_fn", {"trial_fn": "no.such.module:fn"}, "trial_fn"),
    ("search_space", {"search_space": {"toy.x": {"low": 2.0, "high": 1.0}}}, "low"),
    ("search_space", {"search_space": {"toy.x": {"low": "1e-4", "high": 1.0}}}, "toy.x"),
    ("search_space", {"search_space": {"toy.x": {"low": 0.0, "high": 1.0, "log": True}}}, "log"),
    ("search_space", {"search_space": {"toy.x": {"choices": []}}}, "choices"),
    ("search_space", {"search_space": {"notdotted": {"choices": [1]}}}, "dotted"),
    ("search_space", {"search_space": {"toy.x": {"low": 0.1, "high": 1.0, "when": {"toy.nope": 1}}}}, "when"),
    ("search_space", {"search_space": {"toy.x": {"lo": 0.1, "high": 1.0}}}, "lo"),
    ("objectives", {"objectives": [{"key": "accuracy", "direction": "up"}]}, "direction"),
    ("objectives", {"objectives": []}, "objectives"),
    ("objectives", {"objectives": "accuracy"}, "objectives"),
    ("constraints", {"constraints": {"tpu": {"max_memory_mb": 1}}}, "tpu"),
    ("constraints", {"constraints": {"gpu": {"max_memory_mb": -1}}}, "max_memory_mb"),
    ("constraints", {"constraints": {"gpu": {"max_mem": 1}}}, "max_mem"),
    ("pools", {"pools": []}, "pools"),
    ("pools", {"pools": [{"name": "a", "resources": {"GPU": 1, "TPU": 1}}]}, "accelerator"),
    ("pools", {"pools": [{"name": "a", "resources": {"CPU": 0}}]}, "CPU"),
    ("pools", {"pools": [{"name": "a", "concurrency": 0}]}, "concurrency"),
    ("pools", {"pools": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ("pools", {"pools": [{"name": "a", "gpus": 1}]}, "gpus"),
    ("budget", {"budget": {"wall_clock_s": -5}}, "wall_clock_s"),
    ("budget", {"budget": {"trials": 5}}, "trials"),
    ("sampler", {"sampler": {"kind": "cmaes"}}, "kind"),
    ("sampler", {"sampler": {"kind": "random", "population_size": 10}}, "population_size"),
    ("storage", {"storage": {"optuna_url": "optuna.db"}}, "optuna_url"),
    ("storage", {"storage": {"mlflow": "x"}}, "mlflow"),
    ("simulate_accelerators", {"simulate_accelerators": "yes"}, "simulate_accelerators"),
    ("enqueue", {"enqueue": [{"toy.xx": 0.5}]}, "enqueue[0]: 'toy.xx' is not a search-space parameter"),
    ("enqueue", {"enqueue": [{"toy.x": 0.5}, {"toy.y": 7}]}, "enqueue[1].toy.y: 7 is outside its search space"),
    ("enqueue", {"enqueue": [{"toy.x": 1.5}]}, "enqueue[0].toy.x: 1.5 is outside"),
    ("enqueue", {"enqueue": [{"toy.z": 2.5}]}, "(int)"),
]


def _bad(change: dict) -> dict:
    data = copy.deepcopy(TOY)
    data.update(change)
    return data


def test_valid_config_types_and_paths() -> None:
    cfg = load_config(TOY)
    kinds = {p.path: p.kind for p in cfg.params}
    assert kinds == {"toy.x": "float", "toy.y": "categorical", "toy.z": "int", "toy.w": "categorical", "toy.v": "float"}
    assert cfg.trials_for(cfg.pool("cpu")) == 3 and cfg.trials_for(cfg.pool("gpu")) == 12
    assert cfg.pool("gpu").ray_options() == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert load_config({**TOY, "constraints": {}, "pools": [{"name": "t", "resources": {"TPU": 1, "CPU": 2}}]}).pool("t").ray_options() == {
        "num_cpus": 2.0, "resources": {"TPU": 1.0}}
    assert [o.key for o in cfg.objectives] == ["accuracy", "peak_memory_infer_mb", "latency_p50_ms"]
    assert load_config(cfg.to_plain()).to_plain() == cfg.to_plain()  # the manifest round-trips


def test_conditional_sampling_follows_when() -> None:
    cfg = load_config(TOY)
    study = optuna.create_study(directions=["maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    seen_y = set()
    for _ in range(30):
        trial = study.ask()
        params = cfg.sample(trial)
        seen_y.add(params["toy.y"])
        assert ("toy.z" in params) == (params["toy.y"] in (2, 3))
        assert "toy.w" in params and "toy.v" not in params  # base trial has kind: a
        built = cfg.trial_config(params)
        assert built["toy"]["x"] == params["toy.x"] and built["toy"]["kind"] == "a" and built["toy"]["sleep_s"] == 0.0
        study.tell(trial, 0.0)
    assert seen_y == {1, 2, 3}
    assert "x" not in TOY["trial"]["toy"]  # the base config is not mutated


def test_results_dir_resolution(tmp_path, monkeypatch) -> None:
    cfg = load_config({**TOY, "results_dir": "rel/dir"})
    monkeypatch.delenv("OMNINET_CWD", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_results_dir(cfg) == tmp_path / "rel" / "dir"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # inside a `ray job submit` driver
    assert resolve_results_dir(cfg) == Path.home() / "rel" / "dir"
    monkeypatch.setenv("OMNINET_CWD", "/srv/x")
    assert resolve_results_dir(cfg) == Path("/srv/x/rel/dir")
    assert resolve_results_dir(load_config(TOY)) == Path.home() / "omninet-results" / "toy"
    assert resolve_results_dir(cfg, "/abs/here") == Path("/abs/here")


@pytest.mark.parametrize("section,change,word", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_config_exits_2_with_one_line(section, change, word, tmp_path, capsys) -> None:
    results = tmp_path / "results"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_bad(change)))
    assert run_py.main(["--config", str(path), "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert word in err, err
    assert not results.exists()


def test_unparsable_and_missing_files(tmp_path, capsys) -> None:
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    assert run_py.main(["--config", str(tmp_path / "broken.yaml")]) == 2
    assert run_py.main(["--config", str(tmp_path / "absent.yaml")]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 2 and "YAML" in errs[0] and "no such file" in errs[1]


def test_run_py_process_exit_status(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_bad({"sampler": {"kind": "annealing"}})))
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "run.py"), "--config", str(path),
                           "--results-dir", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "sampler.kind" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("point,words", [
    ({"model.attention.kernl": "sdpa", "prune.heads": 0.0},
     "enqueue[0]: 'model.attention.kernl' is not a search-space parameter"),
    ({"model.attention.kernel": "sdpa", "prune.heads": 0.7},
     "enqueue[0].prune.heads: 0.7 is outside its search space (choices [0.0, 0.25, 0.5])"),
], ids=["misspelled-key", "value-outside-choices"])
def test_quickstart_enqueue_point_outside_the_space_exits_2_before_writing(point, words, tmp_path, capsys) -> None:
    """The quickstart's enqueued base point, with a misspelled key or a value outside its choices,
    is refused by the config check with the real runner: no results directory, no base trained."""
    data = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    data["trial"]["task"]["root"] = str(Path(sysconfig.get_paths()["stdlib"]) / "asyncio")  # one package, not all
    data["enqueue"] = [point]
    path, results = tmp_path / "quick.yaml", tmp_path / "results"
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # search-space order matters (`when`)
    assert run_py.main(["--config", str(path), "--results-dir", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert not results.exists()


@pytest.mark.parametrize("name", ["quickstart.yaml", "full.yaml"])
def test_shipped_configs_parse(name) -> None:
    data = yaml.safe_load((ROOT / "sweeps" / name).read_text())
    # validated against the toy runner so this test does not depend on which kernels exist yet
    # (a base needs the real runner: test_config_tree loads every shipped sweep with it)
    cfg = load_config({**data, "trial_fn": "omninet.sweep.testing:toy_trial", "estimate_fn": None, "base": None})
    assert len(cfg.pools) >= 2
    if name == "quickstart.yaml":
        assert sum(cfg.trials_for(p) for p in cfg.pools) >= 12
    else:
        assert {p.accelerator for p in cfg.pools} >= {None, "GPU", "TPU", "NPU"}


def test_parsing_needs_no_runner_and_reopening_a_sweep_needs_neither_runner_nor_task(tmp_path) -> None:
    """Construction only parses: a sweep whose runner is gone (or whose task cannot be built
    here) still reads back, as ``SweepResult.load`` does; the runner's checks are one separate
    step (``check``, which ``load_config`` runs) with the same one-line messages."""
    from omninet.sweep import SweepResult
    from omninet.sweep.config import SweepConfigError

    data = {**copy.deepcopy(TOY), "trial_fn": "no_such_package.runner:run", "estimate_fn": None}
    config = load_config(data, check=False)
    assert [p.path for p in config.params][:2] == ["toy.x", "toy.y"] and config.trial == TOY["trial"]
    with pytest.raises(SweepConfigError, match=r"resolved by check\(\)"):
        config.runner
    with pytest.raises(SweepConfigError, match="trial_fn"):
        config.check()
    with pytest.raises(SweepConfigError, match="trial_fn"):
        load_config(data)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(data))
    result = SweepResult.load(tmp_path)
    assert result.pools == ["cpu", "gpu"] and result.objectives == [o.key for o in config.objectives]
    checked = load_config(copy.deepcopy(TOY))  # parse, then check: the runner resolved once
    assert checked.runner is checked.check().runner


def test_the_old_head_pruning_key_still_sweeps_as_an_alias_of_prune_heads() -> None:
    """A sweep written when head pruning was ``model.heads.prune_ratio`` still loads and runs its
    values as ``prune.heads`` (the parameter keeps the name the sweep gave it: its Parquet column
    and Optuna parameter), and an enqueued value outside its choices is still refused."""
    from omninet.sweep.config import SweepConfigError

    data = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    data["trial"]["task"]["root"] = str(Path(sysconfig.get_paths()["stdlib"]) / "asyncio")
    old = lambda d: {("model.heads.prune_ratio" if k == "prune.heads" else k): v for k, v in d.items()}  # noqa: E731
    data["search_space"] = old(data["search_space"])
    data["enqueue"] = [old(p) for p in data["enqueue"]]
    config = load_config(copy.deepcopy(data))
    assert "model.heads.prune_ratio" in [p.path for p in config.params]
    assert config.trial_config({"model.heads.prune_ratio": 0.25}).prune.heads == 0.25
    data["enqueue"][0]["model.heads.prune_ratio"] = 0.7
    with pytest.raises(SweepConfigError, match=r"enqueue\[0\].model.heads.prune_ratio: 0.7 is outside"):
        load_config(data)
