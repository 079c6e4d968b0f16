"""End to end with the real trial runner (omninet.trial): the shipped quickstart sweep,
shrunk to a few short trials, on an embedded local Ray with a simulated GPU pool."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
trial = pytest.importorskip("omninet.trial")

from omninet.sweep import SweepResult, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~2-3 minutes on 2 cores: real training, evaluation and measurement
def test_quickstart_sweep_with_the_real_runner(tmp_path) -> None:
    import ray

    cfg = yaml.safe_load((ROOT / "sweeps" / "quickstart.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "quickstart")
    for pool in cfg["pools"]:
        pool["trials"] = 2
    # a shorter task (one length: trained, evaluated and measured at 128 tokens), a base of a few
    # steps and one latency round: the quickstart's own figures are the benchmarks' business
    # (benchmarks/trained_base.py, benchmarks/measurement_fidelity.py)
    # and one stdlib package as the corpus (the same byte budget and window counts; listing the
    # whole stdlib, site-packages included, costs ~0.5 s at every task build)
    cfg["trial"]["task"].update(max_length=128, max_bytes=300_000, root=str(Path(sysconfig.get_paths()["stdlib"]) / "asyncio"))
    cfg["trial"]["train"].update(batch_size=8, eval_target_se=None, eval_max_examples=64)
    cfg["trial"]["measure"].update(max_rounds=1, min_seconds=0.1, pair_min_rounds=6, pair_max_rounds=8)
    cfg["base"]["train"] = {"steps": 20}
    cfg["finetune"]["steps"] = 3
    cfg["sampler"] = {"kind": "random", "seed": 3}
    cfg["repeats"] = {"count": 2, "scope": "all", "top": 1}  # the best searched configuration once more
    assert not ray.is_initialized()
    result = run_sweep(cfg, num_cpus=2)
    assert not ray.is_initialized()  # the embedded Ray is shut down again
    assert result.audit() == []
    df = result.trials()
    main = df[df.repeat_of.isna()]
    assert sorted(main.groupby("pool").size().items()) == [("cpu", 2), ("gpu", 2)]
    # the base ran first in every pool as its reference run: dense, no passes, the trials' own
    # fine-tune (the fair control); its zero-shot score is the untouched base's, the same on both pools
    first = main[main.trial_number == 0]
    assert (first["param.model.attention.kernel"] == "sdpa").all() and (first.role == "reference").all()
    assert (first.finetune_steps == cfg["finetune"]["steps"]).all() and first.accuracy_zero_shot.nunique() == 1
    assert (tmp_path / "quickstart" / "base" / "model.safetensors").is_file()
    derived = df[(df.status == "ok") & (df.role != "reference")]
    assert derived.derived.all() and derived.passes.str.startswith("load_base").all()
    assert derived.accuracy_diff_ref.notna().all() and derived.accuracy_zero_shot.notna().all()
    repeats = df[df.repeat_of.notna()]
    assert sorted(repeats.groupby("pool").size().items()) == [("cpu", 1), ("gpu", 1)]
    for _, rep in repeats.iterrows():  # same configuration, another seed
        orig = df[(df.pool == rep.pool) & (df.trial_number == rep.repeat_of)].iloc[0]
        assert rep.config_key == orig.config_key and rep.seed == orig.seed + 1
    agg = result.aggregate("cpu")
    assert (agg.runs == 2).sum() == 1 and agg.loc[agg.runs == 2, "accuracy_ci95"].notna().all()
    # measured at the deployment shape, isolated, with both memory counters and the history check
    assert (ok_shape := df[df.status == "ok"]).seq_length.eq(128).all() and ok_shape.measure_batch_size.eq(4).all()
    assert not ok_shape.measure_other_length.any() and (ok_shape.eval_unit == "token").all()
    assert ok_shape.eval_hash.nunique() == 1 and ok_shape.eval_rows.eq(64).all()  # every trial: the same eval rows
    shown = ok_shape[["pool", "trial_number", "measure_co_running", "measure_wait_s", "cores"]].to_string()
    assert ok_shape.measure_co_running.eq(0).all() and ok_shape.cores.notna().all(), shown
    assert (ok_shape.peak_rss_infer_mb > ok_shape.peak_memory_infer_mb).all()
    # calibrated latency: every trial of a pool on the scale of the pool's probed reference
    probes = json.loads((tmp_path / "quickstart" / "probe.json").read_text())
    for pool, rows in ok_shape.groupby("pool"):
        assert probes[pool]["calibration_ms"] > 0 and (rows.latency_calibration_ref_ms == probes[pool]["calibration_ms"]).all()
        assert (rows.latency_p50_norm_ms - rows.latency_p50_rel * rows.latency_calibration_ref_ms).abs().max() < 1e-9
        assert (rows.latency_calibration_ms > 0).all() and rows.latency_rel_cv.notna().all()
    assert ok_shape.memory_method.str.contains("rss").all()
    # every trial timed side by side with the base in its own worker: the objective, with its interval
    assert (ok_shape.latency_pairing == "base").all() and ok_shape.latency_ref_p50_ms.gt(0).all()
    for key in ("latency_ratio_ref", "throughput_ratio_ref"):
        assert (ok_shape[f"{key}_lo"] <= ok_shape[key]).all() and (ok_shape[key] <= ok_shape[f"{key}_hi"]).all()
    assert ok_shape.latency_rounds.between(7, 8).all()  # 20 calls of the trial in rounds of 3, at most 8 rounds
    # keep_models: pareto -> the front trials' trained weights, the served model is the trained one
    reopened = SweepResult.load(tmp_path / "quickstart")
    for pool in ("cpu", "gpu"):
        front = set(reopened.pareto_front(pool).trial_number)
        kept = {int(p.name[6:]) for p in (tmp_path / "quickstart" / "models" / f"pool={pool}").glob("trial-*")}
        assert kept == front
        rows = df[(df.pool == pool) & df.trial_number.isin(front)]
        fp32 = rows[rows.precision == "fp32"]  # bf16 trials evaluated under autocast; int8 keep fp32 weights
        record = (fp32 if not fp32.empty else rows).iloc[0]
        trained = reopened.load_model(pool, int(record.trial_number))
        assert trained.identity["trial"] == record.trial_number and trained.identity["pool"] == pool
        if not fp32.empty:
            again = trained.evaluate(max_examples=64, batch_size=128)["accuracy"]
            assert again == pytest.approx(record.accuracy, abs=1e-9)
    assert set(df.status) <= set(trial.STATUSES)
    assert (df.status == "ok").sum() >= 2, df[["pool", "status", "error"]].to_string()
    ok = df[df.status == "ok"]
    assert (ok.latency_p50_ms > 0).all() and (ok.peak_memory_infer_mb > 0).all() and (ok.num_params > 0).all()
    assert ok[ok.role != "reference"].loss_curve.map(len).min() >= 1
    assert df[df.pool == "gpu"].simulated.all() and (df[df.pool == "gpu"].device.dropna() == "cpu").all()
    # a recommended config builds with the runner's own config class
    pool = ok.pool.iloc[0]
    config = SweepResult.load(tmp_path / "quickstart").recommend(pool)
    built = trial.TrialConfig.from_dict(config)
    assert built.model_config.attention.kernel == config["model"]["attention"]["kernel"]
    # resumed with a larger budget: the base is found in the results and not trained again, and
    # each pool keeps its one reference run
    base_file = tmp_path / "quickstart" / "base" / "model.safetensors"
    stamp = base_file.stat().st_mtime_ns
    for p in cfg["pools"]:
        p["trials"] = 3
    again = run_sweep(cfg, num_cpus=2)
    assert base_file.stat().st_mtime_ns == stamp
    assert again.audit() == []
    more = again.trials()
    assert more[more.repeat_of.isna()].groupby("pool").size().to_dict() == {"cpu": 3, "gpu": 3}
    assert more[more.role == "reference"].groupby("pool").size().to_dict() == {"cpu": 1, "gpu": 1}
    assert more[(more.status == "ok") & (more.role != "reference")].accuracy_diff_ref.notna().all()
