"""Accuracy a sweep can act on, through the real sweep path (Ray, Optuna, Parquet, MLflow) with
the toy trial's per-unit scores (``toy.scores``): a duplicate proposal is not trained and is
told to Optuna with its original's values, every trial is paired with the pool's reference on
the same eval rows, and two pools on the same hardware do not propose the same sequence."""

from __future__ import annotations

from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from omninet.sweep import SweepResult, run_sweep  # noqa: E402


@pytest.fixture(scope="module")
def cluster(ray_cluster):
    """The session cluster (tests/conftest.py): one 2-CPU head."""
    return ray_cluster


def config(name: str, results: Path, started: Path, **overrides) -> dict:
    cfg = {
        "name": name, "results_dir": str(results), "trial_fn": "omninet.sweep.testing:toy_trial", "estimate_fn": None,
        "trial": {"toy": {"y": 1, "scores": 600, "seed": 0, "started_dir": str(started)}},
        "search_space": {"toy.x": {"choices": [0.1, 0.3, 0.6]}},
        "enqueue": [{"toy.x": 0.6}],
        "pools": [{"name": "a", "resources": {"CPU": 1}, "trials": 8}],
        "sampler": {"kind": "random", "seed": 1},
        "repeats": {"count": 1, "seed_path": "toy.seed"},
        "keep_models": "none", "oversubscribe": True, "progress_interval_s": 1.0,
    }
    cfg.update(overrides)
    return cfg


@pytest.mark.slow  # an 8-proposal sweep on a Ray cluster with MLflow and the dashboard (~10 s)
def test_duplicates_are_not_trained_and_trials_pair_with_the_reference(cluster, tmp_path) -> None:
    started = tmp_path / "started"
    result = run_sweep(config("dups", tmp_path / "dups", started))
    df = result.trials("a")
    assert len(df) == 8
    dups = df[df.status == "duplicate"]
    ran = df[df.status == "ok"]
    # three configurations, eight proposals: at most three trainings, the rest duplicates
    assert len(ran) == ran["param.toy.x"].nunique() <= 3 and len(dups) == 8 - len(ran) >= 5
    assert len(list(started.iterdir())) == len(ran)  # the toy touches started_dir once per training
    study = {t.number: t for t in result.study("a").trials}
    for _, row in dups.iterrows():  # Optuna's duplicate pattern: told the original's values
        original = int(row["duplicate_of"])
        assert study[int(row["trial_number"])].values == study[original].values
        assert df.set_index("trial_number").loc[original, "param.toy.x"] == row["param.toy.x"]
    assert result.audit() == []

    ref = result.reference_trial("a")
    assert ref == 0 and df.set_index("trial_number").loc[0, "role"] == "reference"
    agg = result.aggregate("a").set_index("trial_number")
    assert (agg["runs"] == 1).all()  # a duplicate is never a second run of its configuration
    assert agg.loc[ref, "accuracy_diff"] == 0.0
    worse = agg[agg.index != ref]
    assert len(worse) and (worse["accuracy_diff_hi"] < 0).all()  # x=0.1, 0.3 are far below x=0.6 on 600 rows
    assert (worse["accuracy_diff_covers"] == "eval").all()
    # the controller's record agrees with SweepResult's on-demand pairing
    for number in worse.index:
        d = result.paired("a", int(number))
        row = df.set_index("trial_number").loc[number]
        assert d.diff == pytest.approx(row["accuracy_diff_ref"]) and d.p_value < 1e-6
        assert d.diff == pytest.approx(row["accuracy"] - df.set_index("trial_number").loc[ref, "accuracy"])
    rec = result.recommendations()["a"]
    assert rec["trial_number"] == ref and rec["indistinguishable_from"] == []


@pytest.mark.slow
def test_pools_on_the_same_hardware_draw_their_own_proposals(cluster, tmp_path) -> None:
    cfg = config("pools", tmp_path / "pools", tmp_path / "s", enqueue=[],
                 search_space={"toy.x": {"low": 0.05, "high": 1.0}},
                 pools=[{"name": "a", "resources": {"CPU": 1}, "trials": 4},
                        {"name": "b", "resources": {"CPU": 1}, "trials": 4}])
    result = run_sweep(cfg)
    xa = list(result.trials("a").sort_values("trial_number")["param.toy.x"])
    xb = list(result.trials("b").sort_values("trial_number")["param.toy.x"])
    assert len(xa) == len(xb) == 4 and xa != xb
    assert SweepResult.load(tmp_path / "pools").audit() == []


def test_every_trial_of_a_pool_is_timed_against_one_reference(tmp_path) -> None:
    """What a trial's worker builds to time itself against (``repeats.timing_reference``): the
    base as the pool's reference run measures it, else the first enqueue point as the pool
    searches it, else the configuration of the pool's first run (trial #0 of its study)."""
    import optuna

    from omninet.sweep import load_config, repeats
    from omninet.sweep.state import PoolState, Running

    cfg = load_config(config("timed", tmp_path / "timed", tmp_path / "started"))
    ps = PoolState(spec=cfg.pools[0], study=optuna.create_study(), budget=8, params=cfg.params)
    run = Running("a", 3, 3, {"toy.x": 0.1}, cfg.trial_config({"toy.x": 0.1}))
    reference, label = repeats.timing_reference(cfg, ps, run, base=None)
    assert label == "enqueue[0]" and reference["toy"]["x"] == 0.6
    reference, label = repeats.timing_reference(cfg, ps, run, base=tmp_path / "base")
    assert label == "base" and reference["base"] == str(tmp_path / "base") and reference["finetune"]["steps"] == 0
    assert reference["toy"]["x"] == 0.6  # the base's own configuration: no passes, no fine-tune

    scratch = load_config(config("scratch", tmp_path / "scratch", tmp_path / "started", enqueue=[]))
    study = optuna.create_study()
    first = study.ask()
    first.suggest_categorical("toy.x", [0.1, 0.3, 0.6])
    ps = PoolState(spec=scratch.pools[0], study=study, budget=8, params=scratch.params)
    reference, label = repeats.timing_reference(scratch, ps, run, base=None)
    assert label == "first run (#0)" and reference["toy"]["x"] == first.params["toy.x"]
    itself = Running("a", 0, 0, {"toy.x": 0.3}, scratch.trial_config({"toy.x": 0.3}))
    assert repeats.timing_reference(scratch, ps, itself, base=None)[0]["toy"]["x"] == 0.3
