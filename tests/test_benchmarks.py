"""Every benchmark's smoke mode runs and writes well-formed JSON: named after itself, with the
machine it ran on (the CPU model) and finite measured figures. Speed targets are not asserted
here: they are checked by running the benchmarks, never by timed unit tests."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# name -> (smoke arguments, seconds it took alone with one thread on the 2-core CI machine; the
# fixture starts the longest first so the two lanes end together)
SMOKE = {
    "dense_vs_torch": (["--quick", "--reps", "2"], 4),
    "model_sparse": (["--quick"], 21),
    "head_pruning": (["--smoke"], 3),
    "precision": (["--smoke"], 2),
    "int8_accuracy": (["--quick"], 6),
    "platform_overhead": (["--trials", "2", "--burn-s", "0.2", "--reps", "1"], 26),
    "measurement_fidelity": (["--quick"], 33),
    "qat": (["--quick"], 7),
    "machine_drift": (["--quick"], 3),
    "paired_latency": (["--quick"], 8),
    "records_soak": (["--quick"], 21),
    "attention_kernels": (["--quick"], 26),
    "device_check": (["--dry"], 6),
    "trained_base": (["--quick"], 10),
    "hf_import": (["--quick"], 14),
    "generation_peer": (["--quick"], 20),
}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def _run_smoke(name: str, out: Path) -> subprocess.CompletedProcess:
    # One torch thread each: two smokes share the two cores instead of oversubscribing them.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *SMOKE[name][0], "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def smokes(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every smoke, two at a time (most of a smoke is interpreter and Ray start-up, imports and
    one-thread compute; run one by one they were the suite's largest cost)."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("smokes")
    with ThreadPoolExecutor(max_workers=2) as pool:
        longest_first = sorted(SMOKE, key=lambda name: -SMOKE[name][1])
        futures = {name: pool.submit(_run_smoke, name, root / f"{name}.json") for name in longest_first}
        return {name: (f.result(), root / f"{name}.json") for name, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_smoke_mode_writes_json(name, smokes):
    proc, out = smokes[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    result = json.loads(text)
    assert result.get("benchmark") == name
    assert _cpu_model() in text, "the benchmark must record the CPU it ran on"
    figures = _numbers(result)
    assert figures and all(math.isfinite(x) for x in figures) and any(x > 0 for x in figures)


@pytest.mark.slow  # reads the smokes (~2-3 minutes of subprocesses, all of them on first use)
def test_paired_latency_smoke_reports_raw_calibrated_and_paired_side_by_side(smokes):
    """Issue 33: per configuration, the spread of the raw p50, the calibrated p50 and the paired
    ratio over repeated runs, the A/A runs against 1, and what pairing costs a measurement."""
    doc = json.loads(smokes["paired_latency"][1].read_text())
    aa = doc["summary"]["reference (A/A)"]
    for figure in ("raw_p50_ms", "calibrated_p50_rel", "latency_ratio_ref"):
        assert aa[figure]["max_over_min"] >= 1.0
    assert aa["latency_ratio_ref"]["runs"] == 2 and "intervals_holding_1" in aa["latency_ratio_ref"]
    assert aa["measure_seconds"]["paired_over_unpaired"] > 0
    for run in doc["runs"]["reference (A/A)"]:
        paired = run["paired"]
        assert paired["latency_pairing"] == "enqueue[0]" and run["unpaired"]["latency_ratio_ref"] is None
        assert paired["latency_ratio_ref_lo"] <= paired["latency_ratio_ref"] <= paired["latency_ratio_ref_hi"]
    assert set(doc["targets"]) == {"aa_intervals_hold_1", "aa_median_halfwidth_at_most_3pct",
                                   "measure_seconds_paired_at_most_1.6x"}


@pytest.mark.slow  # reads the smokes (~2-3 minutes of subprocesses, all of them on first use)
def test_attention_kernels_smoke_has_every_kernel_and_mode(smokes):
    doc = json.loads(smokes["attention_kernels"][1].read_text())
    assert {"rows", "ratios", "targets", "environment", "config"} <= set(doc)
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    kernels = {r["kernel"] for r in ok}
    assert {"naive", "sdpa", "block_sparse_0.125", "block_sparse_0.5", "linformer_128", "linformer_256"} <= kernels
    assert {r["mode"] for r in ok} == {"fwd", "fwd_bwd"}
    for r in ok:
        assert r["median_ms"] > 0 and len(r["runs_ms"]) >= 3 and r["peak_mb"] > 0
    for t in doc["targets"].values():
        assert set(t) == {"value", "target", "met", "at_n"}


@pytest.mark.slow  # reads the smokes (~2-3 minutes of subprocesses, all of them on first use)
def test_attention_kernels_smoke_has_the_padding_suite(smokes):
    """Issue 25: masks none / all-True / 25% padding on half the rows, forward and
    forward+backward, ratios taken within one run, the four targets, the machine."""
    doc = json.loads(smokes["attention_kernels"][1].read_text())
    pad = doc["padding"]
    assert {r["mask"] for r in pad["rows"]} == {"none", "all_true", "pad25_half"}
    assert {r["mode"] for r in pad["rows"]} == {"fwd", "fwd_bwd"} and {r["kernel"] for r in pad["rows"]} == {
        "block_sparse", "sdpa"}
    for r in pad["rows"]:
        assert r["median_ms"] > 0 and len(r["runs_ms"]) >= 3
    assert all(r["vs_sdpa_same_mask"] > 0 for r in pad["ratios"])
    assert {r["mask"] for r in pad["ratios"] if "vs_own_no_mask" in r} == {"all_true", "pad25_half"}
    four = {"masked_vs_own_no_mask_worst", "masked_vs_sdpa_same_mask_worst_at_sparsity_ge_0.75",
            "fwd_bwd_vs_sdpa_worst_at_sparsity_0.5", "fwd_bwd_vs_sdpa_worst_at_sparsity_0.85"}
    assert set(pad["targets"]) == four | {"fwd_bwd_vs_sdpa_worst_at_n1024_sparsity_0.5",
                                          "fwd_bwd_vs_sdpa_worst_at_n1024_sparsity_0.85"}  # no N=1024 in smoke mode
    for name, t in pad["targets"].items():
        assert set(t) == {"value", "value_cpu", "target", "met"}
        assert t["value"] > 0 if name in four else t["value"] is None
    for r in pad["rows"]:  # the share of a call inside the flash kernel: what a second thread can split
        assert r["kernel"] == "sdpa" or 0 < r["in_kernel_fraction"] <= 1
    assert doc["machine"]["cpu_model"] == _cpu_model()


@pytest.mark.slow  # reads the smokes (~2-3 minutes of subprocesses, all of them on first use)
def test_model_sparse_smoke_has_the_padding_section(smokes):
    doc = json.loads(smokes["model_sparse"][1].read_text())
    pad = doc["padding"]
    modes = {(r["mode"], r["mask"]) for r in pad["rows"]}
    assert {("inference", m) for m in ("none", "all_true", "pad25_half")} <= modes
    assert {("train_step", m) for m in ("all_true", "pad25_half")} <= modes
    assert {r["variant"] for r in pad["rows"]} >= {"dense", "block_sparse_b16_s0.75", "block_sparse_b16_s0.5"}
    assert pad["ratios"] and all(r["vs_dense_same_mask"] > 0 for r in pad["ratios"])
    assert all(set(t) == {"value", "value_cpu", "target", "met"} for t in pad["targets"].values())
    assert doc["machine"]["cpu_model"] == _cpu_model()


@pytest.mark.slow  # reads the smokes (~2-3 minutes of subprocesses, all of them on first use)
def test_device_check_dry_run_covers_every_section(smokes):
    """The accelerator check stays runnable: its CPU dry run passes every section, and every
    registered kernel agrees with eager there (forward and backward, masked and not)."""
    from omninet.attention import KERNELS

    doc = json.loads(smokes["device_check"][1].read_text())
    assert doc["dry"] and doc["device"] == "cpu" and doc["device_name"] == _cpu_model()
    for name in ("kernels", "speed", "autocast", "trial", "serve"):
        assert doc[name]["status"] == "ok", (name, doc[name])
    assert {r["kernel"] for r in doc["kernels"]["rows"]} == set(KERNELS) and doc["kernels"]["all_ok"]
    assert doc["autocast"]["all_ok"] and {r["dtype"] for r in doc["autocast"]["rows"]} == {"bfloat16", "float16"}
    assert doc["trial"]["result"]["status"] == "ok" and len(doc["serve"]["predictions"]) == 2
    assert any(k.startswith("block_sparse_0.875") for k in doc["speed"]["time_vs_sdpa"])


def test_serving_bounds_weigh_each_request_by_its_bucket(monkeypatch) -> None:
    """The serving headline's bounds: the forward's batching gain over the request stream's own
    lengths (not the buckets' plain mean), and the same with the model-free stack's cost added."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("serving_benchmark", ROOT / "benchmarks" / "serving.py")
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    ceiling = [{"bucket": 16, "ms_per_seq_batch_1": 1.0, "ms_per_seq_full_batch": 0.1},
               {"bucket": 512, "ms_per_seq_batch_1": 5.0, "ms_per_seq_full_batch": 5.0}]
    # three long requests and one short: (3*5 + 1) / (3*5 + 0.1)
    bounds = serving.batching_bounds(ceiling, [300, 400, 512, 10], stack_peak_rps=200.0)
    assert bounds["request_share_per_bucket"] == {"16": 0.25, "512": 0.75}
    assert bounds["forward_bound_speedup"] == round(16 / 15.1, 2)
    assert bounds["stack_ms_per_request"] == 5.0
    assert bounds["amdahl_bound_speedup"] == round((5 + 4.0) / (5 + 15.1 / 4), 2)
    assert "amdahl_bound_speedup" not in serving.batching_bounds(ceiling, [16], stack_peak_rps=None)
