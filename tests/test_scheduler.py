"""The sweep scheduler's decisions and the cost model, without Ray: rung decisions on synthetic
trials with known objective values, measure-first screening, the epsilon-net tie-break, the
cost model's validation split and its seeding of a new pool, and the config's errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omninet.sweep import SweepConfigError, load_config
from omninet.sweep.config import CostModelSpec
from omninet.sweep.costmodel import CostModel
from omninet.sweep.scheduler import PoolRules, RungBook, epsilon_net, nondominated_order, tolerant_ranks

COSTS = ["peak_memory_infer_mb", "latency_p50_ms"]


def book(**rules) -> RungBook:
    return RungBook({"cpu": PoolRules(**{"rungs": [3, 9], "reduction_factor": 2, "cost_keys": COSTS, **rules})})


def measured(memory: float, latency: float) -> dict:
    return {"peak_memory_infer_mb": memory, "latency_p50_ms": latency, "peak_memory_train_mb": 4 * memory}


def test_a_dominated_trial_stops_and_a_front_trial_continues() -> None:
    b = book(screen_dominated_by=None)
    # trial: (accuracy at rung 3, memory, latency)
    known = {0: (0.9, 10.0, 1.0), 1: (0.5, 20.0, 2.0), 2: (0.2, 5.0, 0.5), 3: (0.4, 30.0, 3.0)}
    for t, (_, mem, lat) in known.items():
        assert b.screen("cpu", t, measured(mem, lat)) is None
    assert b.report("cpu", 0, 3, known[0][0]) is None  # alone at the rung: goes on
    reason = b.report("cpu", 1, 3, known[1][0])  # dominated by #0 in every objective
    assert reason is not None and "pruned at rung 3" in reason
    assert b.report("cpu", 2, 3, known[2][0]) is None  # worst accuracy, but the cheapest: on the front, top 2 of 3
    assert b.report("cpu", 3, 3, known[3][0]) is not None  # dominated by #0 and #1
    # the next rung is its own ranking: the survivors meet again
    assert b.report("cpu", 0, 9, 0.95) is None
    # two on one front, room for one: the epsilon-net starts from the best first objective
    assert "ranked 2 of 2" in b.report("cpu", 2, 9, 0.25)
    assert sorted(b.state("cpu")["rungs"][3]) == [0, 1, 2, 3]


def test_keep_fraction_is_one_over_the_reduction_factor() -> None:
    b = book(reduction_factor=3, screen_dominated_by=None)
    for t in range(9):  # a chain: each trial dominated by the one before it
        b.screen("cpu", t, measured(10.0 + t, 1.0 + t))
    stopped = [b.report("cpu", t, 3, 0.9 - 0.05 * t) is not None for t in range(9)]
    # asynchronous: trial t is judged against t+1 records; it goes on while it ranks in the top ceil(n/3)
    assert stopped == [False] + [True] * 8  # each later one is dominated by all earlier ones
    b2 = book(reduction_factor=3, screen_dominated_by=None)
    for t in range(9):  # the reverse chain: every newcomer dominates everyone before it
        b2.screen("cpu", t, measured(20.0 - t, 10.0 - t))
    assert all(b2.report("cpu", t, 3, 0.1 + 0.05 * t) is None for t in range(9))


def test_epsilon_net_spreads_a_front() -> None:
    front = np.array([[0.0, 1.0], [0.5, 0.5], [0.45, 0.55], [1.0, 0.0]])
    order = epsilon_net(front)
    assert order[:2] == [0, 3]  # the best first objective, then the farthest point from it
    assert set(order[2:]) == {1, 2}
    # fronts first: a dominated point comes after every point of the front
    points = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [0.5, 0.5]])
    assert nondominated_order(points)[-1] == 2


def test_zero_tolerance_ranks_like_optunas_non_dominated_sort() -> None:
    from optuna.study._multi_objective import _fast_non_domination_rank

    rng = np.random.default_rng(0)
    for _ in range(50):
        points = rng.integers(0, 4, size=(int(rng.integers(1, 15)), 3)).astype(float)  # many ties
        zero = np.zeros((len(points), len(points)))
        assert tolerant_ranks(points, zero).tolist() == _fast_non_domination_rank(points).tolist()


def test_accuracy_within_its_noise_ties_and_the_costs_decide() -> None:
    # rung accuracies on 1000 eval examples: standard errors about 0.015, so gaps under
    # 0.021 (one standard error of the difference) are noise
    se = math.sqrt(0.35 * 0.65 / 1000)
    kept = {}
    for noise_z in (0.0, 1.0):
        b = book(screen_dominated_by=None, noise_z=noise_z, reduction_factor=3)
        for t, cost in enumerate([(20.0, 2.0), (10.0, 1.0), (5.0, 0.5), (30.0, 3.0)]):
            b.screen("cpu", t, measured(*cost))
        assert b.report("cpu", 0, 3, 0.37, se) is None
        b.report("cpu", 1, 3, 0.36, se)
        kept[noise_z] = b.report("cpu", 2, 3, 0.34, se)  # the cheapest; 0.02 behind #1, 0.03 behind #0
        last = b.report("cpu", 3, 3, 0.35, se)  # dearer than all, no more accurate beyond noise
        assert last is not None and ("standard error" in last) == (noise_z > 0)
    # raw values: all three on the front, the epsilon-net starts at the best accuracy, #2 stops;
    # within noise: #2 dominates #1 (cheaper, 0.02 behind), #1 dominates #0, so #2 alone is the front
    assert kept[0.0] is not None and "ranked" in kept[0.0]
    assert kept[1.0] is None
    # a gap well beyond the noise still counts: 0.2 more accurate goes on though dearer
    b = book(screen_dominated_by=None, noise_z=1.0, reduction_factor=2)
    b.screen("cpu", 0, measured(5.0, 0.5))
    b.screen("cpu", 1, measured(20.0, 2.0))
    assert b.report("cpu", 0, 3, 0.30, se) is None
    assert b.report("cpu", 1, 3, 0.50, se) is None
    # the standard errors are kept, and a resumed book gets them back from the record
    assert b.noise["cpu"][3] == {0: se, 1: se}
    again = book(screen_dominated_by=None, noise_z=1.0)
    again.restore("cpu", 0, measured(5.0, 0.5), [3], [0.30], [se])
    assert again.noise["cpu"][3] == {0: se}


def test_screening_before_training() -> None:
    b = book(limits={"latency_p50_ms": 5.0}, screen_dominated_by=2)
    assert "limit" in b.screen("cpu", 0, measured(10.0, 6.0))  # violates the pool's constraint
    for t, (mem, lat) in enumerate([(10.0, 1.0), (12.0, 1.2), (50.0, 0.5)], start=1):
        assert b.screen("cpu", t, measured(mem, lat)) is None
        b.finish("cpu", t)
    reason = b.screen("cpu", 9, measured(20.0, 2.0))  # #1 and #2 are cheaper in both costs
    assert reason is not None and "#1, #2" in reason
    assert b.screen("cpu", 10, measured(11.0, 0.4)) is None  # cheaper in latency than everyone: could be on the front
    assert b.screen("cpu", 11, measured(10.2, 1.02)) is None  # within the 5% margin of #1: noise, not domination


def toy_features(x: float, scale: float = 1.0) -> tuple[dict, dict]:
    feats = {t: {"x": x, "x2": x * x} for t in ("latency_p50_ms", "peak_memory_infer_mb", "peak_memory_train_mb")}
    return feats, {"latency_p50_ms": scale * (2.0 + 3.0 * x), "peak_memory_infer_mb": scale * (10.0 + x * x),
                   "peak_memory_train_mb": scale * (40.0 + 4 * x * x)}


def test_cost_model_learns_the_calibrated_latency_when_a_trial_has_it() -> None:
    """The raw p50 carries the machine's speed at the moment of measuring; the model fits the
    latency at the pool's reference speed instead, and falls back to the raw one."""
    cm = CostModel(CostModelSpec(enabled=True, min_fit=3, holdout_every=4), ["cpu"])
    for t in range(8):
        feats, values = toy_features(0.1 + 0.3 * t)
        drifted = values["latency_p50_ms"] * (1.45 if t % 2 else 1.0)  # slow phases of the host
        cm.observe("cpu", t, feats, {**values, "latency_p50_ms": drifted, "latency_p50_norm_ms": values["latency_p50_ms"]})
    assert cm.validation("cpu")["latency_p50_ms"]["mape"] < 0.02  # the drift never reached the model
    feats, values = toy_features(5.0)
    cm.observe("cpu", 50, feats, {**values, "latency_p50_norm_ms": float("nan")})
    assert next(s for s in cm.pools["cpu"].samples if s.trial == 50).measured["latency_p50_ms"] == values["latency_p50_ms"]


def test_cost_model_predicts_the_latency_ratio_from_the_latencys_features() -> None:
    """The ratio to the reference (the configuration's time over one fixed model's) is learned
    from the paired ratios on the latency's counts, so a max_latency_ratio limit can screen."""
    from omninet.sweep.config import PoolConstraints

    cm = CostModel(CostModelSpec(enabled=True, min_fit=3, holdout_every=4), ["cpu"])
    reference_ms = 2.0 + 3.0 * 0.5
    for t in range(8):
        feats, values = toy_features(0.1 + 0.3 * t)
        cm.observe("cpu", t, feats, {**values, "latency_ratio_ref": values["latency_p50_ms"] / reference_ms})
    assert cm.validation("cpu")["latency_ratio_ref"]["mape"] < 0.02
    feats, values = toy_features(3.0)
    predicted = cm.predict("cpu", feats)["latency_ratio_ref"]
    assert predicted == pytest.approx(values["latency_p50_ms"] / reference_ms, rel=0.02)
    assert "latency_ratio_ref" in PoolConstraints(max_latency_ratio=1.5).limits()  # what screen_reason compares


def test_cost_model_validation_split_never_holds_predicted_trials() -> None:
    cm = CostModel(CostModelSpec(enabled=True, min_fit=3, holdout_every=4), ["cpu"])
    splits = {}
    for t in range(12):
        feats, values = toy_features(0.1 + 0.3 * t)
        splits[t] = cm.observe("cpu", t, feats, values)
    fit = {s.trial for s in cm.fit_split("cpu")}
    held = {s.trial for s in cm.holdout_split("cpu")}
    assert held == {3, 7, 11} and not fit & held and fit | held == set(range(12))
    v = cm.validation("cpu")
    assert v["latency_p50_ms"]["n"] == 3 and v["latency_p50_ms"]["holdout_trials"] == [3, 7, 11]
    assert v["latency_p50_ms"]["mape"] < 0.02 and v["peak_memory_infer_mb"]["within_10"] == 1.0
    # a held-out trial is never fitted: corrupting its measurement leaves the model's predictions alone
    probe = toy_features(2.0)[0]
    before = cm.predict("cpu", probe)["latency_p50_ms"]
    cm.holdout_split("cpu")[0].measured["latency_p50_ms"] *= 10.0
    cm.pools["cpu"].fitted_on = -1  # force a refit
    assert cm.predict("cpu", probe)["latency_p50_ms"] == pytest.approx(before)
    assert cm.validation("cpu")["latency_p50_ms"]["within_10"] == pytest.approx(2 / 3)
    # a trial the model predicted but that never measured anything joins neither split
    assert cm.observe("cpu", 99, probe, {"status": "screened"}) is None
    assert 99 not in {s.trial for s in cm.pools["cpu"].samples}


def test_a_new_pool_is_seeded_with_a_learned_scale() -> None:
    cm = CostModel(CostModelSpec(enabled=True, min_fit=4, holdout_every=5, seed_from="cpu"), ["cpu", "gpu"])
    for t in range(6):
        cm.observe("cpu", t, *toy_features(0.2 * t + 0.1))
    probe, truth = toy_features(0.77, scale=0.25)
    assert cm.predict("gpu", probe) is None or not cm.predict("gpu", probe)["trusted"]  # no own data: no scale yet
    cm.observe("gpu", 0, *toy_features(0.5, scale=0.25))  # one measurement: the pool is 4x faster
    pred = cm.predict("gpu", probe)
    assert pred["source"] == "seeded:cpu" and pred["trusted"]
    assert pred["scale"]["latency_p50_ms"] == pytest.approx(0.25, rel=0.02)
    for target in truth:
        assert pred[target] == pytest.approx(truth[target], rel=0.02)


BASE = {"name": "s", "trial_fn": "omninet.sweep.testing:rung_toy", "estimate_fn": None, "trial": {"toy": {"steps": 27}},
        "search_space": {"toy.x": {"low": 0.05, "high": 1.0}}, "pools": [{"name": "cpu"}]}


@pytest.mark.parametrize("change, words", [
    ({"scheduler": {"kind": "asha"}}, "scheduler.kind"),
    ({"scheduler": {"kind": "mo_successive_halving", "grace_period": 27}}, "grace_period"),
    ({"scheduler": {"kind": "mo_successive_halving", "reduction_factor": 1}}, "reduction_factor"),
    ({"scheduler": {"kind": "mo_successive_halving", "cost_margin": 1.5}}, "cost_margin"),
    ({"scheduler": {"kind": "mo_successive_halving", "noise_z": -1}}, "noise_z"),
    ({"scheduler": {"kind": "mo_successive_halving", "rungs": [1]}}, "rungs"),
    ({"scheduler": {"kind": "mo_successive_halving"}, "trial_fn": "omninet.sweep.testing:toy_trial"}, "measures first"),
    ({"scheduler": {"kind": "mo_successive_halving"},
      "objectives": [{"key": "accuracy", "direction": "maximize"}, {"key": "eval_loss", "direction": "minimize"}]},
     "not measured before training"),
    ({"cost_model": {"seed_from": "tpu"}}, "seed_from"),
    ({"cost_model": {"holdout_every": 1}}, "holdout_every"),
    ({"cost_model": {"min_fit": "many"}}, "min_fit"),
])
def test_bad_scheduler_and_cost_model_configs(change, words) -> None:
    with pytest.raises(SweepConfigError, match=words) as info:
        load_config({**BASE, **change})
    assert "\n" not in str(info.value)


def test_default_scheduler_is_fifo_and_rungs_follow_asha() -> None:
    cfg = load_config(BASE)
    assert cfg.scheduler.kind == "fifo" and not cfg.cost_model.enabled
    assert cfg.scheduler.rungs(200) == [23, 69]  # ceil(200 / 3**2), then x3, below the budget
    assert load_config({**BASE, "scheduler": {"kind": "mo_successive_halving", "grace_period": 5,
                                              "reduction_factor": 4}}).scheduler.rungs(100) == [5, 20, 80]
    assert math.isclose(load_config(BASE).scheduler.cost_margin, 0.05)


REAL = {"task": {"name": "listops", "preset": "quickstart", "num_train": 64, "num_eval": 32},
        "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2},
        "train": {"steps": 6, "batch_size": 8, "warmup_steps": 1, "eval_max_examples": 32},
        "measure": {"seq_length": 64, "allow_other_length": True, "batch_size": 1, "latency_reps": 20,
                    "throughput_reps": 20, "warmup": 1,
                    "min_seconds": 0.0}}


@pytest.mark.slow  # three small real trials (a few seconds each on 2 cores)
def test_real_trial_measures_first_then_is_screened_pruned_or_finished() -> None:
    from omninet.sweep.scheduler import RungClient
    from omninet.trial import run_trial
    from omninet.trial.runners import RunContext

    rules = PoolRules(rungs=[2, 4], reduction_factor=2, cost_keys=COSTS, screen_dominated_by=None)
    b = RungBook({"cpu": rules})
    first = run_trial(REAL, context=RunContext(scheduler=RungClient(b, "cpu", 0, [2, 4])))
    assert first.status == "ok" and first.cost_measured_first and first.steps == 6
    assert first.rung_steps == [2, 4] and len(first.rung_accuracy) == 2
    n = REAL["train"]["eval_max_examples"]
    assert len(first.rung_noise) == 2
    for acc, se in zip(first.rung_accuracy, first.rung_noise):  # the eval's standard error, told to the book:
        assert se == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))  # one unit per row, clustered by row
    assert b.noise["cpu"][2][0] == pytest.approx(first.rung_noise[0])
    assert first.latency_p50_ms > 0 and first.peak_memory_infer_mb > 0 and first.peak_memory_train_mb > 0
    plain = run_trial(REAL)  # the same trial without a scheduler: same training (the probe model is a copy)
    assert plain.loss_curve == pytest.approx(first.loss_curve) and plain.accuracy == pytest.approx(first.accuracy)
    # a trial far worse at the first rung than #0, and no cheaper: pruned with a partial record
    b.costs["cpu"][0] = (0.0, 0.0)  # make #0 cheaper than anything
    b.rung["cpu"][2][0] = 1.0
    second = run_trial(REAL, context=RunContext(scheduler=RungClient(b, "cpu", 1, [2, 4])))
    assert second.status == "pruned" and second.steps == 2 and "rung 2" in second.error
    assert second.accuracy == pytest.approx(second.rung_accuracy[0]) and second.latency_p50_ms > 0
    # over the latency limit: the probe alone decides, before any training
    tight = RungBook({"cpu": PoolRules(rungs=[2, 4], cost_keys=COSTS, limits={"latency_p50_ms": 1e-6})})
    third = run_trial(REAL, context=RunContext(scheduler=RungClient(tight, "cpu", 0, [2, 4],
                                                                    limits={"latency_p50_ms": 1e-6})))
    assert third.status == "screened" and third.steps == 0 and third.latency_reps == 3 and "limit" in third.error
