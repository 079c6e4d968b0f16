"""The trade-off dashboard built from a synthetic results directory, written in the platform's
own format (``SweepConfig.to_plain`` -> sweep.yaml, ``ParquetStore.write`` -> trials/, Optuna
studies with constraints -> optuna.db) without Ray or MLflow. The real-sweep, real-browser
checks are in tests/test_browser.py."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import optuna
import pytest
import yaml

from omninet.sweep.dashboard import SweepData, build_dashboard, dashboard_main, non_dominated, pareto_figure, parallel_figure
from omninet.sweep.config import load_config
from omninet.sweep.records import ParquetStore

OBJ = ("accuracy", "peak_memory_infer_mb", "latency_p50_ms")

# (pool, number, status, params, (accuracy, memory MB, latency ms)); cpu allows latency <= 5 ms
TRIALS = [
    ("cpu", 0, "ok", {"kernel": "dense", "x": 0.2}, (0.60, 100.0, 2.0)),        # front
    ("cpu", 1, "ok", {"kernel": "sparse", "k": 16, "x": 0.5}, (0.80, 150.0, 3.0)),  # front
    ("cpu", 2, "ok", {"kernel": "sparse", "k": 32, "x": 0.6}, (0.70, 160.0, 3.5)),  # dominated by 1
    ("cpu", 3, "ok", {"kernel": "dense", "x": 0.9}, (0.95, 300.0, 9.0)),         # violates latency
    ("cpu", 4, "error", {"kernel": "dense", "x": 0.7}, None),                    # failed
    ("cpu", 5, "ok", {"kernel": "dense", "x": 0.1}, (0.55, 120.0, 2.5)),         # dominated by 0
    ("cpu", 6, "ok", {"kernel": "sparse", "k": 8, "x": 0.3}, (0.65, 90.0, 4.0)),   # front (least memory)
    ("gpu", 0, "ok", {"kernel": "dense", "x": 0.2}, (0.60, 110.0, 0.5)),        # same config as cpu#0
    ("gpu", 1, "ok", {"kernel": "sparse", "k": 16, "x": 0.5}, (0.80, 170.0, 0.8)),  # same config as cpu#1
    ("gpu", 2, "infeasible", {"kernel": "dense", "x": 1.0}, None),               # over memory budget, not run
    ("gpu", 3, "ok", {"kernel": "sparse", "k": 32, "x": 0.6}, (0.70, 180.0, 0.9)),  # dominated; same config as cpu#2
]
EXPECTED_FRONT = {"cpu": {0, 1, 6}, "gpu": {0, 1}}


def sweep_config(results: Path) -> dict:
    return {
        "name": "synthetic", "results_dir": str(results),
        "trial_fn": "omninet.sweep.testing:toy_trial", "estimate_fn": "omninet.sweep.testing:toy_estimate",
        "trial": {"toy": {}},
        "search_space": {
            "toy.kernel": {"choices": ["dense", "sparse"]},
            "toy.k": {"low": 8, "high": 64, "log": True, "when": {"toy.kernel": "sparse"}},
            "toy.x": {"low": 0.05, "high": 1.0},
        },
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "trials": 8},
                  {"name": "gpu", "resources": {"GPU": 1, "CPU": 1}, "trials": 4}],
        "constraints": {"cpu": {"max_latency_ms": 5.0}, "gpu": {"max_memory_mb": 1000}},
        "simulate_accelerators": True,
    }


def write_results(results: Path, trials=TRIALS, ratios: dict | None = None, extra: dict | None = None) -> Path:
    """A finished sweep's results directory, as the controller leaves it; ``ratios``: {(pool,
    number): (latency ratio to the reference, lo, hi)} for trials timed against it; ``extra``:
    {(pool, number): {column: value}} more result columns of a row (a decoder's generation)."""
    config = load_config(sweep_config(results))
    results.mkdir(parents=True, exist_ok=True)
    (results / "sweep.yaml").write_text(yaml.safe_dump(config.to_plain(), sort_keys=False))
    store = ParquetStore(results / "trials", config)
    storage = f"sqlite:///{results / 'optuna.db'}"
    studies = {p.name: optuna.create_study(storage=storage, study_name=config.study_name(p.name),
                                           directions=["maximize", "minimize", "minimize"]) for p in config.pools}
    for pool, number, status, params, values in trials:
        limit = config.constraints_for(pool)
        row = {"sweep": "synthetic", "trial_number": number, "status": status, "simulated": pool == "gpu",
               "device": "cpu", "device_name": "synthetic", "node": "here",
               "config_json": json.dumps(config.trial_config({f"toy.{k}": v for k, v in params.items()}), sort_keys=True),
               "result_json": "{}", "loss_curve": [1.0, 0.5]}
        row.update({f"param.toy.{k}": v for k, v in params.items()})
        if (pool, number) in (ratios or {}):
            row.update(zip(("latency_ratio_ref", "latency_ratio_ref_lo", "latency_ratio_ref_hi"), ratios[pool, number]),
                       latency_pairing="enqueue[0]")
        row.update((extra or {}).get((pool, number), {}))
        constraints = {}
        if values is not None:
            row.update(zip(OBJ, values))
            row["peak_memory_train_mb"] = 2 * values[1]
            if limit.max_latency_ms:
                constraints["latency"] = row["constraint_latency"] = values[2] - limit.max_latency_ms
            if limit.max_memory_mb:
                constraints["memory"] = row["constraint_memory"] = row["peak_memory_train_mb"] - limit.max_memory_mb
            row["feasible"] = all(c <= 0 for c in constraints.values())
        else:
            row["feasible"] = False
            row["error"] = "estimated 1200 MB > pool budget 1000 MB; not run" if status == "infeasible" else "RuntimeError: boom"
        store.write(pool, row)
        if status == "ok":
            trial = optuna.trial.create_trial(values=list(values), constraints=constraints or None)
        elif status == "infeasible":
            trial = optuna.trial.create_trial(values=[-math.inf, math.inf, math.inf], constraints={"memory": math.inf})
        else:
            trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL)
        studies[pool].add_trial(trial)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return write_results(tmp_path_factory.mktemp("sweep") / "synthetic")


def test_fronts_come_from_the_optuna_studies(results) -> None:
    sweep = SweepData(results)
    assert sweep.fronts == EXPECTED_FRONT
    assert all(src == "Optuna study.best_trials" for src in sweep.front_source.values())
    assert sweep.simulated == {"cpu": False, "gpu": True}
    assert sweep.pool_title("gpu") == "gpu (simulated)"


def test_front_falls_back_to_the_table_when_storage_is_gone(results, tmp_path) -> None:
    copy = write_results(tmp_path / "copy")
    (copy / "optuna.db").unlink()
    sweep = SweepData(copy)
    assert sweep.fronts == EXPECTED_FRONT
    assert "Parquet" in sweep.front_source["cpu"]
    assert not (copy / "optuna.db").exists()  # reading never creates an empty database


def test_non_dominated_matches_brute_force() -> None:
    import pandas as pd

    rng = __import__("random").Random(0)
    rows = [{"trial_number": i, "a": rng.random(), "m": rng.random()} for i in range(40)]
    df = pd.DataFrame(rows)
    brute = {r["trial_number"] for r in rows
             if not any(o["a"] >= r["a"] and o["m"] <= r["m"] and (o["a"], o["m"]) != (r["a"], r["m"]) for o in rows)}
    assert non_dominated(df, ["a", "m"], ["maximize", "minimize"]) == brute
    assert non_dominated(df.iloc[0:0], ["a", "m"], ["maximize", "minimize"]) == set()


def _traces(fig, name_prefix: str, subplot: tuple[str, str]) -> list[int]:
    """Trial numbers plotted in traces whose name starts with ``name_prefix`` on axes ``subplot``."""
    numbers = []
    for t in fig.data:
        if (t.name or "").startswith(name_prefix) and (t.xaxis, t.yaxis) == subplot and t.text is not None:
            numbers += [int(re.search(r"#(\d+)</b>", s).group(1)) for s in t.text]
    return sorted(numbers)


def test_pareto_figure_greys_dominated_and_marks_violations(results) -> None:
    sweep = SweepData(results)
    fig = pareto_figure(sweep)
    # row 1 = cpu, columns = memory, latency; row 2 = gpu
    assert _traces(fig, "Pareto front: cpu", ("x", "y")) == [0, 1, 6]
    assert _traces(fig, "dominated", ("x", "y")) == [2, 5]
    assert _traces(fig, "violates constraints", ("x", "y")) == [3]
    assert _traces(fig, "Pareto front: gpu (simulated)", ("x3", "y3")) == [0, 1]
    assert _traces(fig, "dominated", ("x4", "y4")) == [3]
    titles = [a.text for a in fig.layout.annotations]
    assert "cpu: accuracy vs peak inference memory (MB)" in titles
    assert "gpu (simulated): accuracy vs latency p50 (ms)" in titles
    # the dotted line is the front within the accuracy-memory view of cpu: 6 (90 MB), 0 is dominated there
    line = [t for t in fig.data if t.name == "front in this view" and (t.xaxis, t.yaxis) == ("x", "y")][0]
    assert list(line.x) == [90.0, 150.0]


def test_parallel_coordinates_mark_conditional_params(results) -> None:
    sweep = SweepData(results)
    fig = parallel_figure(sweep, "cpu")
    dims = {d.label: d for d in fig.data[0].dimensions}
    assert set(dims) == {"toy.kernel", "toy.k", "toy.x", "feasible", *(label for label in
                                                                       ("accuracy", "peak inference memory (MB)", "latency p50 (ms)"))}
    assert "n/a" in dims["toy.k"].ticktext  # k applies to the sparse kernel only
    assert list(dims["toy.kernel"].ticktext) == ["dense", "sparse"]
    assert len(dims["accuracy"].values) == 6  # the failed trial has no measurements


def test_build_writes_one_self_contained_page(results, tmp_path) -> None:
    out = build_dashboard(results, out=tmp_path / "d.html")
    page = out.read_text()
    assert out == (tmp_path / "d.html").resolve()
    assert page.count("<script") >= 4 and not re.search(r"<script[^>]+src=", page)  # plotly.js inline, no CDN
    assert page.count("Plotly.newPlot") == 4  # pareto, 2 x parallel coordinates, pools side by side
    for text in ("gpu (simulated)", "Pareto fronts per pool", "Recommended configurations", "RuntimeError: boom",
                 "estimated 1200 MB &gt; pool budget", "kernel=dense x=0.2"):
        assert text in page, text
    default = build_dashboard(results)
    assert default == (results / "artifacts" / "dashboard.html").resolve() and default.is_file()


def test_recommendations_and_shared_configs(results) -> None:
    from omninet.sweep.dashboard import recommendations_table, shared_configs, unfinished_table

    sweep = SweepData(results)
    rec = recommendations_table(sweep).set_index("pool")
    assert rec.loc["cpu", "trial"] == "#1" and rec.loc["gpu (simulated)", "trial"] == "#1"  # best feasible accuracy
    assert rec.loc["cpu", "constraints"] == "latency p50 (ms) <= 5"
    shared = shared_configs(sweep)
    assert sorted(zip(shared["pool"], shared["trial_number"])) == [("cpu", 0), ("cpu", 1), ("cpu", 2), ("gpu", 0), ("gpu", 1), ("gpu", 3)]
    assert set(shared["configuration"]) == {"kernel=dense x=0.2", "kernel=sparse k=16 x=0.5", "kernel=sparse k=32 x=0.6"}
    bad = unfinished_table(sweep)
    assert sorted(zip(bad["pool"], bad["status"])) == [("cpu", "error"), ("gpu (simulated)", "infeasible")]


@pytest.mark.slow  # ~5-13 s on 2 cores
def test_speed_against_the_reference_with_its_interval(tmp_path) -> None:
    """Each front point's speed-up over its pool's reference with the 95% interval, called faster
    only when the interval excludes 1; the pools chart draws the ratios' intervals, and the same
    configuration on two pools of the same hardware is said to differ only by noise when its
    ratio intervals overlap (cpu#0 2.0 ms against gpu#0 0.5 ms raw)."""
    from omninet.sweep.dashboard import paired_table, pools_figure, pools_noise_table, recommendations_table, \
        shared_configs

    ratios = {("cpu", 0): (1.0, 0.98, 1.02), ("gpu", 0): (1.01, 0.99, 1.03), ("cpu", 1): (0.8, 0.78, 0.82),
              ("gpu", 1): (0.9, 0.88, 0.92), ("cpu", 6): (0.97, 0.93, 1.01)}
    results = write_results(tmp_path / "timed", ratios=ratios)
    sweep = SweepData(results)
    rec = recommendations_table(sweep).set_index("pool")
    assert rec.loc["cpu", "speed-up vs reference [95%]"] == "1.250x [1.220, 1.282], faster"
    table = paired_table(sweep).set_index(["pool", "trial"])  # next to the accuracy difference, per configuration
    assert table.loc[("cpu", "#6"), "speed-up vs reference [95%]"] == "1.031x [0.990, 1.075], indistinguishable"
    assert table.loc[("gpu (simulated)", "#1"), "speed-up vs reference [95%]"] == "1.111x [1.087, 1.136], faster"
    agg = sweep.aggregates["cpu"].set_index("trial_number")
    assert agg.loc[6, "speed_vs_ref"] == "indistinguishable" and agg.loc[1, "speed_vs_ref"] == "faster"
    shared = shared_configs(sweep)
    noise = pools_noise_table(sweep, shared).set_index("configuration")
    assert noise.loc["kernel=dense x=0.2", "verdict"] == "differ only by noise (ratio intervals overlap)"
    assert noise.loc["kernel=dense x=0.2", "hardware"] == "same (synthetic)"
    assert noise.loc["kernel=sparse k=16 x=0.5", "verdict"] == "differ beyond noise (ratio intervals disjoint)"
    bars = {t.name: t for t in pools_figure(sweep, shared).data if t.error_y is not None and t.error_y.array is not None}
    gpu = bars["gpu (simulated)"]  # the ratio's own interval around each bar (gpu#3 was not timed: no bar)
    assert list(gpu.error_y.arrayminus) == pytest.approx([0.02, 0.0, 0.02]) and list(gpu.y)[::2] == [0.9, 1.01]
    hover = " ".join(t for tr in pareto_figure(sweep).data if tr.text is not None for t in tr.text)
    assert "speed-up vs reference: 1.250x [1.220, 1.282], faster" in hover
    assert "speed-up vs reference: 1.031x [0.990, 1.075], indistinguishable" in hover
    page = build_dashboard(results).read_text()
    assert "differ only by noise" in page and "speed-up vs reference" in page


def test_sweep_without_trials_still_builds(tmp_path) -> None:
    results = write_results(tmp_path / "empty", trials=[])
    page = build_dashboard(results).read_text()
    assert "no finished trials" in page and "No configuration was run on more than one pool" in page


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, results) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        build_dashboard(tmp_path / "missing")
    with pytest.raises(ValueError, match="no sweep.yaml"):
        build_dashboard(tmp_path)
    with pytest.raises(ValueError, match="is a directory"):
        build_dashboard(results, out=tmp_path)
    assert dashboard_main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omninet dashboard: error: results_dir:") and err.count("\n") == 1
    assert dashboard_main([str(results), "--out", str(tmp_path / "ok.html")]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "ok.html").resolve())


def test_a_decoder_sweep_shows_prefill_decode_and_kv_cache_per_configuration(results, tmp_path) -> None:
    """The generation view: one row per finished decoder trial, fastest decode first, with the
    depths, the slope, the KV cache, and prefill and decode against the reference where paired;
    a sweep without generation figures has no such section."""
    from omninet.sweep.dashboard import generation_table, label, render

    gen = {("cpu", 0): {"prefill_ms_p50": 12.5, "decode_ms_p50": 2.25, "decode_ms_p90": 2.5, "decode_tokens_s": 3100.0,
                        "kv_cache_mb": 1.5, "decode_ms_1p": 2.25, "decode_ms_4p": 2.5, "decode_depth_1p": 64,
                        "decode_depth_4p": 256, "decode_depth_cap": 256, "decode_ms_per_1k_depth": 1.302,
                        "seq_length": 64, "measure_batch_size": 8},
           ("cpu", 1): {"prefill_ms_p50": 9.0, "decode_ms_p50": 1.75, "kv_cache_mb": 0.75, "seq_length": 64,
                        "prefill_ratio_ref": 0.72, "prefill_ratio_ref_lo": 0.7, "prefill_ratio_ref_hi": 0.74,
                        "decode_ratio_ref": 0.99, "decode_ratio_ref_lo": 0.95, "decode_ratio_ref_hi": 1.03}}
    sweep = SweepData(write_results(tmp_path / "decoder", extra=gen))
    table = generation_table(sweep)
    assert table["trial"].tolist() == ["#1", "#0"]  # the cpu trials that measured generation, fastest decode first
    one, zero = table.iloc[0], table.iloc[1]
    assert zero[label("prefill_ms_p50")] == "12.5" and zero[label("decode_ms_p50")] == "2.25"
    assert zero[label("kv_cache_mb")] == "1.5" and zero["decode at depths"] == "2.25 / 2.5 / - ms at 64 / 256 / - (cap 256)"
    assert zero["decode / reference [95%]"] == "-"  # not paired
    assert one["prefill / reference [95%]"] == "0.720 [0.700, 0.740], faster"
    assert one["decode / reference [95%]"] == "0.990 [0.950, 1.030], indistinguishable"
    page = render(sweep)
    assert "Generation (decoders)" in page and "plot-generation" in page and "0.720 [0.700, 0.740], faster" in page
    assert generation_table(SweepData(results)).empty  # no generation figures: no section (render skips it)
