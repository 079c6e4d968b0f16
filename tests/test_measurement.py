"""Trustworthy numbers: the latency loop, the memory trackers and their history, node-level
isolation of measurements, a fresh sampler, the search space a pool can run, and noise in
recommendations. No figure here is a timing target: the behaviours are checked, the speed is
measured by benchmarks/measurement_fidelity.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from pathlib import Path

import pytest
import torch

from omninet.sweep.cluster import space_for
from omninet.trial import measure

ROOT = Path(__file__).resolve().parents[1]


# ---- the latency loop -------------------------------------------------------------------
def test_latency_loop_runs_min_reps_and_min_seconds():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.001)

    start = time.perf_counter()
    stats = measure.latency(fn, warmup=2, min_reps=20, min_seconds=0.15, max_cv=10.0, max_rounds=1)
    assert time.perf_counter() - start >= 0.15 and stats.reps >= 20 and len(calls) == stats.reps + 2
    assert stats.p50_ms <= stats.p90_ms <= stats.p95_ms <= stats.p99_ms and stats.mean_ms > 0
    assert stats.rounds == 1 and not stats.noisy


def test_latency_loop_remeasures_and_tags_noise(monkeypatch):
    """On a fake clock (real sleeps made the steady case fail whenever the host paused the VM for
    a few ms during one of its 20 calls: a CV over 0.5 from one outlier)."""
    clock = {"now": 0.0}
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock["now"])
    state = {"i": 0}

    def jittery():  # alternating 1 ms and 6 ms: a coefficient of variation near 0.7
        state["i"] += 1
        clock["now"] += 0.006 if state["i"] % 2 else 0.001

    stats = measure.latency(jittery, warmup=1, min_reps=20, min_seconds=0.0, max_cv=0.05, max_rounds=3)
    assert stats.rounds == 3 and stats.noisy and stats.cv > 0.05

    def steady():  # 2 ms, +-1%
        state["i"] += 1
        clock["now"] += 0.002 * (1.0 + 0.01 * (state["i"] % 3 - 1))

    steady = measure.latency(steady, warmup=1, min_reps=20, min_seconds=0.0, max_cv=0.5, max_rounds=3)
    assert steady.rounds == 1 and not steady.noisy


def test_calibration_takes_the_machines_drift_out_of_the_latency(monkeypatch):
    """A machine that runs at full speed, then at 60% for a while, then full again (what the
    host did to the VM this was built on): the raw times spread, the ratio to the reference
    call timed right after each call does not. The machine is simulated on a fake clock, with a
    small per-call jitter, so a busy CI host cannot preempt the test into failing."""
    clock = {"now": 0.0}
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock["now"])
    state = {"calls": 0, "slow": 1.0}

    def work(seconds: float) -> None:
        clock["now"] += seconds * state["slow"] * (1.0 + 0.01 * (state["calls"] % 3))

    def call():  # 3 ms of work at full speed; the machine slows down for calls 40-99
        state["calls"] += 1
        state["slow"] = 1 / 0.6 if 40 <= state["calls"] < 100 else 1.0
        work(0.003)

    def reference():  # 1 ms of work at the same moment's speed
        work(0.001)

    stats = measure.latency(call, warmup=1, min_reps=140, min_seconds=0.0, max_cv=0.05, max_rounds=1,
                            calibrate=reference)
    assert stats.cv > 0.2  # the raw times carry the drift
    assert stats.rel_cv < 0.01 and not stats.noisy, stats  # the ratios do not: not noisy
    assert stats.rel_p50 == pytest.approx(3.0, rel=0.01) and stats.calibration_ms == pytest.approx(1.0, rel=0.1)

    state["calls"] = 0  # the same drift again, without the reference
    uncalibrated = measure.latency(call, warmup=1, min_reps=140, min_seconds=0.0, max_cv=0.05, max_rounds=1)
    assert uncalibrated.noisy and uncalibrated.rel_p50 is None


# ---- paired timing against the reference --------------------------------------------------
def test_median_interval_is_the_order_statistics_of_a_hand_computed_case():
    """n = 20: P(Bin(20, 1/2) <= 5) = 21700/2^20 = 0.0207 <= 0.025 < P(<= 6) = 0.0577, so the 95%
    interval is [x_(6), x_(15)]; n = 6 is the smallest with one: [min, max] (coverage 1 - 2/64)."""
    values = [1.0 + i / 100 for i in (19, 3, 11, 0, 7, 15, 2, 9, 18, 5, 13, 1, 17, 8, 4, 16, 10, 6, 14, 12)]
    median, lo, hi = measure.median_interval(values)
    assert median == pytest.approx(1.095) and lo == pytest.approx(1.05) and hi == pytest.approx(1.14)
    assert measure.median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (3.5, 1.0, 6.0)
    assert measure.median_interval([2.0, 1.0, 3.0]) == (2.0, 1.0, 3.0)  # too few for 95%: the range


def _fake_clock(monkeypatch):
    clock = {"now": 0.0}
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock["now"])
    return clock


def test_paired_ratio_is_the_median_of_round_ratios(monkeypatch):
    """One call of each per round on a fake clock: the rounds alternate which goes first, each
    round's ratio is a / b, the result is their median with the order-statistic interval."""
    clock = _fake_clock(monkeypatch)
    a_ms = iter([9, 9] + [4, 6, 5, 8, 5, 4])  # two warm-up calls, then one per round
    b_ms = iter([9, 9] + [4, 5, 4, 5, 5, 4])
    order = []

    def call(name, times):
        def fn():
            order.append(name)
            clock["now"] += next(times) / 1e3
        return fn

    t = measure.paired(call("a", a_ms), call("b", b_ms), warmup=2, calls=1, min_rounds=6, max_rounds=6)
    assert order[4:] == list("abbaabbaabba")  # after the warm-up: a first, then b first, ...
    assert t.rounds == 6 and t.a_s == pytest.approx([0.004, 0.006, 0.005, 0.008, 0.005, 0.004])
    # round ratios 1.0, 1.2, 1.25, 1.6, 1.0, 1.0 -> median 1.1, 95% interval [min, max] at 6 rounds
    assert t.ratio() == pytest.approx((1.1, 1.0, 1.6))
    assert t.ratio(inverse=True)[0] == pytest.approx((1 / 1.2 + 1.0) / 2)  # b / a: 0.625, 0.8, 0.833, 1, 1, 1
    assert not t.narrow  # half-width 0.3 > 2% of 1.1, but max_rounds reached


def test_the_references_own_configuration_pairs_to_one_through_a_30pct_drift(monkeypatch):
    """The same 3 ms model against itself while the machine slows down by 30% for a while (and
    jitters by up to 2% per call, seeded): the raw times move by 30%, the ratio's interval holds 1, and the
    drift moves the ratio by less than the interval is wide. A model 20% faster is called faster."""
    import random

    clock = _fake_clock(monkeypatch)
    state = {"calls": 0, "drift": True, "jitter": random.Random(0)}

    def model(ms: float):
        def fn():
            state["calls"] += 1
            slow = 1.3 if state["drift"] and 60 <= state["calls"] % 200 < 150 else 1.0
            clock["now"] += ms / 1e3 * slow * (1.0 + state["jitter"].uniform(-0.02, 0.02))
        return fn

    kw = dict(warmup=2, calls=3, min_rounds=10, max_rounds=40, halfwidth=0.02, max_seconds=100.0)
    drifted = measure.paired(model(3.0), model(3.0), **kw)
    assert max(drifted.a_s) / min(drifted.a_s) > 1.3  # the raw times carry the drift
    ratio, lo, hi = drifted.ratio()
    assert lo <= 1.0 <= hi and hi - lo < 0.05
    state.update(calls=0, drift=False)
    quiet_ratio = measure.paired(model(3.0), model(3.0), **kw).ratio()[0]
    assert abs(ratio - quiet_ratio) < hi - lo
    state.update(calls=0, drift=True)
    faster, lo, hi = measure.paired(model(2.4), model(3.0), **kw).ratio()
    assert hi < 1.0 and lo <= 0.8 <= hi


def test_paired_rounds_stop_once_the_interval_is_narrow(monkeypatch):
    clock = _fake_clock(monkeypatch)

    def fn():
        clock["now"] += 0.002

    t = measure.paired(fn, fn, warmup=1, calls=3, min_rounds=10, max_rounds=40, halfwidth=0.02)
    assert t.rounds == 10 and t.narrow and t.ratio() == (1.0, 1.0, 1.0)
    t = measure.paired(fn, fn, warmup=1, calls=3, min_rounds=10, max_rounds=40, halfwidth=0.02, min_calls=45)
    assert t.rounds == 15  # and at least min_calls calls of a


@pytest.mark.slow  # a trial and its reference, timed side by side
def test_a_trial_times_itself_against_the_reference_it_is_given(tmp_path):
    """The reference model is built in the trial (its own config, the trial's inputs) and timed
    beside it; the trial's raw figures come from its calls in those rounds. A reference that
    cannot be built leaves the trial unpaired, and the record says why."""
    from omninet.trial import RunContext, run_trial
    from omninet.trial.config import TrialConfig

    cfg = {"task": {"name": "listops", "preset": "quickstart", "num_train": 64, "num_eval": 16},
           "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2}, "train": {"steps": 1, "batch_size": 8},
           "measure": {"seq_length": 128, "allow_other_length": True, "batch_size": 2, "memory": False,
                       "latency_reps": 20, "pair_min_rounds": 6, "pair_max_rounds": 8}}
    ref = TrialConfig.from_dict(cfg)
    r = run_trial(cfg, context=RunContext(reference=ref, reference_label="enqueue[0]")).to_dict()
    assert r["status"] == "ok", r["error"]
    assert r["latency_pairing"] == "enqueue[0]" and 7 <= r["latency_rounds"] <= 8 and r["latency_reps"] >= 20
    for key in ("latency_ratio_ref", "throughput_ratio_ref"):
        assert 0 < r[f"{key}_lo"] <= r[key] <= r[f"{key}_hi"]
    assert r["latency_ref_p50_ms"] > 0 and r["latency_p50_rel"] > 0 and r["throughput_tokens_s"] > 0
    (tmp_path / "config.json").write_text(json.dumps(ref.model_config.to_dict()))  # a base whose weights are gone
    broken = ref.with_values({"base": str(tmp_path)})
    r = run_trial(cfg, context=RunContext(reference=broken, reference_label="base")).to_dict()
    assert r["status"] == "ok" and r["latency_ratio_ref"] is None
    assert r["latency_pairing"].startswith("unpaired: the reference (base) failed to build")
    alone = run_trial(cfg, context=RunContext(reference_label="unpaired: no reference")).to_dict()
    assert alone["latency_pairing"] == "unpaired: no reference" and alone["latency_ratio_ref"] is None


def test_a_trial_reports_its_latency_against_the_reference():
    from omninet.trial import RunContext, run_trial

    cfg = {"task": {"name": "listops", "preset": "quickstart", "num_train": 64, "num_eval": 16},
           "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2}, "train": {"steps": 1, "batch_size": 8},
           "measure": {"seq_length": 128, "allow_other_length": True, "batch_size": 2, "min_seconds": 0.05,
                       "max_rounds": 1, "memory": False}}
    r = run_trial(cfg, context=RunContext(calibration_ref_ms=2.0)).to_dict()
    assert r["status"] == "ok", r["error"]
    assert r["latency_calibration_ref_ms"] == 2.0 and r["latency_calibration_ms"] > 0
    assert r["latency_p50_norm_ms"] == pytest.approx(r["latency_p50_rel"] * 2.0)
    alone = run_trial({**cfg, "measure": {**cfg["measure"], "calibrate": False}}).to_dict()
    assert alone["status"] == "ok" and alone["latency_p50_rel"] is None and alone["latency_p50_ms"] > 0


def test_a_resumed_sweep_keeps_the_pools_first_reference(tmp_path):
    from omninet.sweep.cluster import keep_reference

    (tmp_path / "probe.json").write_text(json.dumps({"cpu": {"calibration_ms": 1.25}}))
    kept = keep_reference(tmp_path, "cpu", {"calibration_ms": 1.9, "cores": 2})
    assert kept["calibration_ms"] == 1.25 and kept["calibration_ms_now"] == 1.9 and kept["cores"] == 2
    fresh = keep_reference(tmp_path, "gpu", {"calibration_ms": 1.9})
    assert fresh == {"calibration_ms": 1.9}


# ---- memory -----------------------------------------------------------------------------
def test_track_memory_reports_tensor_peak_and_process_rss():
    from omninet.trial.limits import clean_state

    def alloc():
        x = torch.ones(10 * 2**20)  # 40 MB, touched
        return float(x.sum())

    clean_state()
    base_rss = measure._rss_bytes() / 2**20
    reading = measure.track_memory(alloc, live_bytes=2**20)
    assert 40 <= reading.tensor_peak_mb - 1 <= 44
    assert reading.rss_peak_mb >= base_rss + 35  # the OS saw the pages while the call ran
    assert "profiler" in reading.method and "resident" in reading.method


_HIDDEN: dict[str, torch.Tensor] = {}


def test_a_buffer_that_outlives_the_call_shows_up_as_history():
    """The failure mode the trial runner guards against: a scratch buffer kept between calls
    is seen by the first call only. The runner records both calls, so this is visible."""

    def leaky():
        if "buf" not in _HIDDEN:
            _HIDDEN["buf"] = torch.empty(8 * 2**20).fill_(1.0)  # 32 MB, kept
        return torch.ones(2**20).sum()

    first = measure.track_memory(leaky).tensor_peak_mb
    later = measure.track_memory(leaky).tensor_peak_mb
    assert first > later + 25


def _kernel_configs() -> list:
    from omninet.attention import KERNELS

    return [pytest.param({"kernel": name, "block_sparse": {"min_seq_length": 0, "block_size": 32, "sparsity_factor": 0.75},
                          "linformer": {"min_seq_length": 0, "k": 32}}, id=name) for name in sorted(KERNELS)]


@pytest.mark.parametrize("attention", _kernel_configs())
def test_same_call_same_peak_on_its_first_and_tenth_call(attention):
    """History-free memory: for every registered kernel, the model's forward at one shape
    peaks the same on its first call and its tenth (tensor peak within 5%)."""
    from omninet import ModelConfig, OmniNetModel
    from omninet.trial.limits import clean_state

    cfg = ModelConfig(arch="encoder", vocab_size=50, num_classes=4, hidden_size=64, num_layers=2, num_heads=4,
                      max_seq_length=512, attention=attention)
    model = OmniNetModel(cfg).eval()
    ids = torch.randint(1, 50, (2, 512))
    mask = torch.ones(2, 512, dtype=torch.bool)

    @torch.no_grad()
    def call():
        return model(ids, attention_mask=mask).logits

    clean_state()
    first = measure.track_memory(call).tensor_peak_mb
    for _ in range(8):
        call()
    clean_state()
    tenth = measure.track_memory(call).tensor_peak_mb
    assert abs(tenth - first) <= 0.05 * first + 0.5, (first, tenth)


# ---- the node's measurement gate --------------------------------------------------------
def test_coordinator_makes_measurement_exclusive_and_cores_disjoint():
    from omninet.sweep.isolation import NodeCoordinator

    async def scenario():
        c = NodeCoordinator()
        c.cores = [0, 1, 2, 3]
        a, b = c.allot("a", 2), c.allot("b", 2)
        assert set(a).isdisjoint(b) and len(a) == len(b) == 2
        await c.enter("a", 1)
        await c.enter("b", 1)
        writer = asyncio.ensure_future(c.begin_exclusive("a", 1))
        await asyncio.sleep(0.05)
        assert not writer.done() and c.writer_waiting()  # b still trains
        paused = asyncio.ensure_future(c.pause("b", 1))  # b reaches a checkpoint
        wait_s = await asyncio.wait_for(writer, 2)
        assert c.writer == "a" and c.shared == {} and wait_s >= 0.04
        await asyncio.sleep(0.05)
        assert not paused.done()  # b waits while a measures
        co_running = await c.end_exclusive("a", 1)
        await asyncio.wait_for(paused, 2)
        assert co_running == 0 and set(c.shared) == {"a", "b"}

    asyncio.run(scenario())


def test_a_measurement_that_ends_while_another_waits_steps_back_in_after_that_one_ends():
    from omninet.sweep.isolation import NodeCoordinator

    async def scenario():
        c = NodeCoordinator()
        await c.enter("a", 1)
        await asyncio.wait_for(c.begin_exclusive("a", 1), 2)
        b_measures = asyncio.ensure_future(c.begin_exclusive("b", 1))
        await asyncio.sleep(0.05)
        a_done = asyncio.ensure_future(c.end_exclusive("a", 1))
        await asyncio.wait_for(b_measures, 2)
        assert c.writer == "b"
        await asyncio.sleep(1.3)  # past the coordinator's 1 s re-check of waiters
        assert not a_done.done() and "a" not in c.shared  # a waits out b's measurement
        assert await c.end_exclusive("b", 1) == 0  # nobody else ran during it
        await asyncio.wait_for(a_done, 2)
        assert set(c.shared) == {"a", "b"}

    asyncio.run(scenario())


def test_coordinator_drops_a_dead_holder():
    from omninet.sweep.isolation import NodeCoordinator

    async def scenario():
        c = NodeCoordinator()
        await c.enter("dead", 2**22 + 12345)  # no such process
        await asyncio.wait_for(c.begin_exclusive("live", 1), 5)  # does not wait forever
        assert c.writer == "live"

    asyncio.run(scenario())


def test_cores_held_by_a_dead_trial_are_allotted_again():
    """A trial killed on a long-lived node (its driver killed, say) does not keep its cores from
    the next sweep's trials there."""
    from omninet.sweep.isolation import NodeCoordinator

    c = NodeCoordinator()
    c.cores = [0, 1]
    assert c.allot("dead", 2) == [0, 1]
    asyncio.run(c.enter("dead", 2**22 + 12345))  # no such process
    assert c.allot("next", 2) == [0, 1] and set(c.allotted) == {"next"}


@pytest.mark.slow
def test_no_measurement_overlaps_another_trials_work_on_the_node(tmp_path, monkeypatch, ray_cluster):
    """Two pools on one node (the session cluster's 2-CPU head, tests/conftest.py), their trials
    training concurrently: every measurement interval is free of the other trials' training
    steps and of the controller's own record writing (Parquet, Optuna, MLflow), and cores are
    disjoint."""
    from omninet.sweep import SweepResult, run_sweep
    from omninet.sweep.isolation import DriverGate

    sections, gated = [], DriverGate.shared

    @contextlib.contextmanager
    def recorded(self):  # each section holds the node's shared side (so a measurement waits for it)
        import ray

        with gated(self):
            holders = ray.get(self.actor.state.remote())["shared"]
            assert any(h.startswith(f"driver-{self.pid}-") for h in holders), holders
            t0 = time.time()
            try:
                yield
            finally:
                sections.append((t0, time.time()))

    monkeypatch.setattr(DriverGate, "shared", recorded)

    cfg = {
        "name": "isolation", "results_dir": str(tmp_path / "iso"), "trial_fn": "omninet.sweep.testing:gate_probe",
        "trial": {"probe": {"train_s": 1.2, "measure_s": 0.3}},
        # unequal trials, so one pool's trial finishes (and the controller records it) while
        # the other pool's measures
        "search_space": {"probe.train_s": {"choices": [0.3, 0.6, 1.2]}, "probe.measure_s": {"choices": [0.3, 0.8]}},
        "pools": [{"name": "a", "resources": {"CPU": 1}, "trials": 4}, {"name": "b", "resources": {"CPU": 1}, "trials": 4}],
        "sampler": {"kind": "random", "seed": 0}, "progress_interval_s": 1.0,
    }
    result = run_sweep(cfg, num_cpus=2)
    rows = result.trials()
    assert len(rows) == 8 and rows.status.isin(["ok", "duplicate"]).all()  # a duplicate proposal is not run again
    rows = rows[rows.status == "ok"]
    runs = [{**r, **json.loads(r["result_json"])} for r in rows.to_dict("records")]  # columns + what no column holds
    assert all(r["measure_co_running"] == 0 for r in runs)
    overlaps = 0
    for i, r in enumerate(runs):
        m0, m1 = r["measure"]
        for j, other in enumerate(runs):
            if i != j:
                overlaps += sum(1 for s, e in other["work"] if s < m1 - 0.005 and e > m0 + 0.005)
        overlaps += sum(1 for s, e in sections if s < m1 - 0.005 and e > m0 + 0.005)
    assert overlaps == 0
    assert len(sections) >= 2 * len(runs)  # each trial's record and its MLflow run were gated sections
    concurrent_cores = {r["cores"] for r in runs}
    assert len(concurrent_cores) == 2  # each pool's worker pinned to its own core
    assert isinstance(SweepResult.load(tmp_path / "iso"), SweepResult)


# ---- the sampler sees every finished trial before the next ask --------------------------
@pytest.mark.slow
def test_each_trial_is_told_before_the_pools_next_ask(tmp_path, ray_cluster):
    import optuna

    from omninet.sweep import run_sweep

    cfg = {
        "name": "fresh", "results_dir": str(tmp_path / "fresh"), "trial_fn": "omninet.sweep.testing:toy_trial",
        "estimate_fn": "omninet.sweep.testing:toy_estimate", "trial": {"toy": {"sleep_s": 0.2}},
        "search_space": {"toy.x": {"low": 0.05, "high": 1.0}},
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "concurrency": 1, "trials": 5}],
        "sampler": {"kind": "tpe", "seed": 0, "n_startup_trials": 2}, "progress_interval_s": 1.0,
    }
    run_sweep(cfg, num_cpus=2)
    study = optuna.load_study(study_name="fresh.cpu", storage=f"sqlite:///{tmp_path / 'fresh' / 'optuna.db'}")
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert len(trials) == 5
    for before, after in zip(trials, trials[1:]):
        assert after.datetime_start >= before.datetime_complete, (before.number, after.number)


# ---- a search space the hardware can run --------------------------------------------------
def _controller(tmp_path, **overrides):
    from omninet.sweep import SweepController

    cfg = {
        "name": "space", "results_dir": str(tmp_path / "space"),
        "trial": {"task": {"name": "listops", "min_length": 5, "max_length": 40, "max_depth": 3, "num_train": 64,
                           "num_eval": 16},
                  "model": {"hidden_size": 16, "num_layers": 1, "num_heads": 2}, "train": {"steps": 2},
                  "measure": {"seq_length": 128, "allow_other_length": True}},
        "search_space": {"hardware.precision": {"choices": ["fp32", "bf16"]},
                         "model.attention.kernel": {"choices": ["sdpa", "linformer"]},
                         "model.attention.linformer.k": {"low": 8, "high": 512, "log": True,
                                                         "when": {"model.attention.kernel": "linformer"}}},
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "concurrency": 2}],
    }
    cfg.update(overrides)
    return SweepController(cfg)


def test_precisions_the_pool_cannot_run_are_removed_with_the_reason(tmp_path):
    ctl = _controller(tmp_path)
    info = {"capabilities": {"native_precisions": ["fp32", "int8"], "device_name": "an AVX2 CPU",
                             "refused": {"bf16": "bf16 is not supported on cpu (AVX2 only)"}}}
    space = {p.path: p for p in space_for(ctl.config, ctl.config.pool("cpu"), info)}
    assert space["hardware.precision"].choices == ["fp32"]
    assert space["model.attention.linformer.k"].high == 128  # clipped to the measured length
    notes = " ".join(info["search_space_notes"])
    assert "bf16" in notes and "AVX2 only" in notes and "clipped" in notes

    kept = _controller(tmp_path, allow_emulated=True)
    assert {p.path: p for p in space_for(kept.config, kept.config.pool("cpu"), dict(info))}["hardware.precision"].choices == [
        "fp32", "bf16"]


def test_a_pool_that_oversubscribes_the_node_is_refused(tmp_path):
    from omninet.sweep import SweepConfigError

    from omninet.sweep.cluster import check_cores

    probes = {"cpu": {"physical_cores": 1, "node": "n1"}}
    with pytest.raises(SweepConfigError, match="oversubscribe"):
        check_cores(_controller(tmp_path).config, probes, embedded=True)
    check_cores(_controller(tmp_path, oversubscribe=True).config, probes, embedded=True)


# ---- noise in recommendations -----------------------------------------------------------
def test_recommend_ranks_by_the_pessimistic_bound_and_flags_ties(tmp_path, caplog):
    import yaml

    from omninet.sweep import SweepResult, load_config
    from omninet.sweep.records import ParquetStore, params_key

    data = {"name": "noise", "trial_fn": "omninet.sweep.testing:toy_trial", "estimate_fn": None,
            "trial": {"toy": {}}, "search_space": {"toy.x": {"choices": [1, 2, 3]}},
            "pools": [{"name": "cpu", "resources": {"CPU": 1}}]}
    results = tmp_path / "noise"
    results.mkdir()
    (results / "sweep.yaml").write_text(yaml.safe_dump(data))
    store = ParquetStore(results / "trials", load_config(data))
    runs = {1: [0.50, 0.30, 0.40], 2: [0.385, 0.38, 0.39], 3: [0.05]}
    number = 0
    for x, accs in runs.items():
        first = number
        for i, acc in enumerate(accs):
            store.write("cpu", {"sweep": "noise", "trial_number": number, "status": "ok", "feasible": True,
                                "accuracy": acc, "peak_memory_infer_mb": 10.0, "latency_p50_ms": 1.0,
                                "param.toy.x": x, "config_key": params_key({"toy.x": x}),
                                "repeat_of": None if i == 0 else first, "config_json": json.dumps({"toy": {"x": x}})})
            number += 1
    result = SweepResult.load(results)
    agg = result.aggregate("cpu").set_index("trial_number")
    assert agg.loc[0, "runs"] == 3 and agg.loc[0, "accuracy_mean"] == pytest.approx(0.40)
    assert agg.loc[0, "accuracy_ci95"] > agg.loc[3, "accuracy_ci95"] > 0  # config 1 spreads wide; config 3 (one run) borrows the pooled spread
    assert agg.loc[6, "noise"] == "pooled" and agg.loc[0, "noise"] == "measured"
    # config 1 has the best mean, config 2 the best lower bound
    with caplog.at_level("WARNING", logger="omninet.sweep"):
        assert result.recommend("cpu") == {"toy": {"x": 2}}
    assert "not distinguishable" in caplog.text and "#0" in caplog.text
    rec = result.recommendations()["cpu"]
    assert rec["trial_number"] == 3 and rec["runs"] == 3 and rec["indistinguishable_from"] == [0]


def _timed_sweep(tmp_path, runs: dict, objectives: list[dict]):
    """A recorded toy sweep whose rows carry latency ratios to the reference: ``runs`` maps a
    configuration x to its runs, each (accuracy, ratio, lo, hi)."""
    import yaml

    from omninet.sweep import SweepResult, load_config
    from omninet.sweep.records import ParquetStore, params_key
    from omninet.sweep.results import RecordedTrial

    data = {"name": "timed", "trial_fn": "omninet.sweep.testing:toy_trial", "estimate_fn": None,
            "trial": {"toy": {}}, "search_space": {"toy.x": {"choices": [1, 2, 3]}},
            "pools": [{"name": "cpu", "resources": {"CPU": 1}}], "objectives": objectives}
    results = tmp_path / "timed"
    results.mkdir(parents=True)
    (results / "sweep.yaml").write_text(yaml.safe_dump(data))
    store = ParquetStore(results / "trials", load_config(data, runner=RecordedTrial()))
    number = 0
    for x, measured in runs.items():
        first = number
        for i, (acc, ratio, lo, hi) in enumerate(measured):
            store.write("cpu", {"sweep": "timed", "trial_number": number, "status": "ok", "feasible": True,
                                "accuracy": acc, "peak_memory_infer_mb": 10.0, "latency_p50_ms": 6.0 * ratio,
                                "latency_ratio_ref": ratio, "latency_ratio_ref_lo": lo, "latency_ratio_ref_hi": hi,
                                "param.toy.x": x, "config_key": params_key({"toy.x": x}),
                                "repeat_of": None if i == 0 else first, "config_json": json.dumps({"toy": {"x": x}})})
            number += 1
    return SweepResult.load(results)


def test_recommend_refuses_to_call_a_configuration_faster_when_its_interval_holds_1(tmp_path):
    result = _timed_sweep(tmp_path, {1: [(0.50, 0.97, 0.93, 1.01)], 2: [(0.40, 1.02, 0.99, 1.05)]},
                          [{"key": "accuracy", "direction": "maximize"},
                           {"key": "latency_ratio_ref", "direction": "minimize"}])
    rec = result.recommendations()["cpu"]
    assert rec["trial_number"] == 0 and rec["latency_ratio_to_reference"] == {
        "ratio": 0.97, "lo": 0.93, "hi": 1.01, "verdict": "indistinguishable"}  # 0.97 < 1, yet not faster
    with pytest.raises(ValueError, match="no configuration of pool 'cpu' is faster than the reference"):
        result.recommend("cpu", faster_than_reference=True)
    assert set(result.aggregate("cpu")["speed_vs_ref"]) == {"indistinguishable"}

    faster = _timed_sweep(tmp_path / "b", {1: [(0.50, 0.97, 0.93, 1.01)], 2: [(0.40, 0.90, 0.88, 0.92)]},
                          [{"key": "accuracy", "direction": "maximize"},
                           {"key": "latency_ratio_ref", "direction": "minimize"}])
    assert faster.recommend("cpu", faster_than_reference=True) == {"toy": {"x": 2}}
    assert faster.recommendations()["cpu"]["latency_ratio_to_reference"]["verdict"] == "indistinguishable"


def test_repeats_combine_their_timing_as_measurements_not_over_seeds(tmp_path, caplog):
    """Two runs of configuration 1 timed at 0.90 [0.88, 0.92] and 0.91 [0.89, 0.93]: combined on
    the log scale by their intervals, 0.905 [0.891, 0.919], not a t-interval over 2 seeds (t = 12.7);
    the raw latency gets no seed interval. Ranked on the ratio, overlapping intervals tie."""
    result = _timed_sweep(tmp_path, {1: [(0.5, 0.90, 0.88, 0.92), (0.5, 0.91, 0.89, 0.93)],
                                     2: [(0.5, 0.915, 0.90, 0.93)], 3: [(0.5, 1.00, 0.98, 1.02)]},
                          [{"key": "latency_ratio_ref", "direction": "minimize"},
                           {"key": "latency_p50_ms", "direction": "minimize"}])
    agg = result.aggregate("cpu").set_index("trial_number")
    assert agg.loc[0, "runs"] == 2
    assert (agg.loc[0, "latency_ratio_ref_mean"], agg.loc[0, "latency_ratio_ref_lo"], agg.loc[0, "latency_ratio_ref_hi"]) \
        == pytest.approx((0.905, 0.891, 0.919), rel=2e-3)
    assert math.isnan(agg.loc[0, "latency_p50_ms_ci95"]) and agg.loc[0, "speed_vs_ref"] == "faster"
    assert agg.loc[3, "speed_vs_ref"] == "indistinguishable"
    with caplog.at_level("WARNING", logger="omninet.sweep"):
        assert result.recommend("cpu") == {"toy": {"x": 1}}  # the lowest upper bound
    assert "not distinguishable from #2 (timing" in caplog.text


def test_pool_probe_is_the_fastest_window_not_one_busy_moment(monkeypatch):
    """A busy moment beside the probe (Ray starting workers) slows one window; the probe reads
    the machine's speed from the fastest of its windows, so the pool's scale is not 4x off."""
    readings = iter([6.7, 1.52, 1.61, 1.50, 1.55])
    calls = []

    def fake_latency(fn, **kw):
        calls.append(kw)
        return measure.LatencyStats(p50_ms=next(readings), p90_ms=0, p95_ms=0, p99_ms=0, mean_ms=0, cv=0, reps=20,
                                    rounds=1, noisy=False)

    monkeypatch.setattr(measure, "latency", fake_latency)
    monkeypatch.setattr(measure.time, "sleep", lambda s: None)
    assert measure.calibration_ms(seconds=0.5, windows=5) == 1.50
    assert len(calls) == 5 and all(kw["min_seconds"] == 0.1 for kw in calls)
    # and on the real workload: a positive time
    monkeypatch.undo()
    assert 0 < measure.calibration_ms(seconds=0.05, windows=2, gap_s=0.0) < 1000


def test_front_configurations_that_tie_on_every_objective_form_one_group(tmp_path):
    """Configurations 1 and 2 overlap on accuracy (seed intervals: no per-unit scores) and on the
    latency ratio and use the same memory: one group. Configuration 3 is as accurate but its ratio
    interval lies apart: its own group, as does 4 whose memory differs by 20%."""
    result = _timed_sweep(tmp_path, {1: [(0.50, 0.90, 0.88, 0.92), (0.52, 0.90, 0.88, 0.92)],
                                     2: [(0.51, 0.91, 0.89, 0.93), (0.49, 0.91, 0.89, 0.93)],
                                     3: [(0.51, 0.70, 0.68, 0.72), (0.50, 0.70, 0.68, 0.72)]},
                          [{"key": "accuracy", "direction": "maximize"},
                           {"key": "latency_ratio_ref", "direction": "minimize"},
                           {"key": "peak_memory_infer_mb", "direction": "minimize"}])
    groups = result.front_groups("cpu", front={0, 2, 4}).set_index("trial_number")
    assert groups.loc[0, "front_group"] == groups.loc[2, "front_group"] != groups.loc[4, "front_group"]
    assert sorted(groups.loc[0, "front_group_trials"]) == [0, 2] and groups.loc[4, "front_group_trials"] == [4]
    a, b = (result.aggregate("cpu").set_index("trial_number").loc[n] for n in (0, 2))
    assert result._same_on("cpu", "peak_memory_infer_mb", a, b) == (True, "exact")
    assert result._same_on("cpu", "peak_memory_infer_mb", a, b.copy().replace({10.0: 12.0})) == (False, "exact")
    assert result._same_on("cpu", "latency_p50_ms", a, b) == (False, "untimed")  # a raw time has no interval


def test_recommend_cli_takes_the_ratio_limits(tmp_path, capsys):
    import yaml

    from omninet.sweep.cli import recommend_main

    result = _timed_sweep(tmp_path, {1: [(0.50, 0.97, 0.93, 1.01)], 2: [(0.40, 0.90, 0.88, 0.92)]},
                          [{"key": "accuracy", "direction": "maximize"},
                           {"key": "latency_ratio_ref", "direction": "minimize"}])
    assert recommend_main([str(result.results_dir), "--pool", "cpu"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {"toy": {"x": 1}}
    for flags in (["--faster-than-reference"], ["--max-latency-ratio", "0.95"]):
        assert recommend_main([str(result.results_dir), "--pool", "cpu", *flags]) == 0
        assert yaml.safe_load(capsys.readouterr().out) == {"toy": {"x": 2}}


def test_generation_ratios_combine_as_measurements_too():
    """prefill and decode per token, timed beside the reference, are ratios like the latency's:
    repeats combine by their intervals and get no t-interval over training seeds."""
    from omninet.sweep.results import RATIOS, _timing

    assert {"prefill_ratio_ref", "decode_ratio_ref"} <= set(RATIOS)
    assert all(_timing(k) for k in ("prefill_ratio_ref", "decode_ratio_ref", "decode_ms_p50", "prefill_ms_p50"))
