"""End to end with the real trial runner (omninet.trial): the shipped quickstart sweep,
shrunk to a few short trials, on an embedded local Ray with a simulated GPU pool."""

from __future__ import annotations

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
    cfg["trial"]["task"].update(num_train=400, num_eval=64)
    cfg["trial"]["train"].update(max_seconds=2, eval_max_examples=64)
    cfg["sampler"] = {"kind": "random", "seed": 3}
    assert not ray.is_initialized()
    result = run_sweep(cfg, num_cpus=2)
    assert not ray.is_initialized()  # the embedded Ray is shut down again
    assert result.audit() == []
    df = result.trials()
    assert sorted(df.groupby("pool").size().items()) == [("cpu", 2), ("gpu", 2)]
    assert set(df.status) <= set(trial.STATUSES)
    assert (df.status == "ok").sum() >= 2, df[["pool", "status", "error"]].to_string()
    ok = df[df.status == "ok"]
    assert (ok.latency_p50_ms > 0).all() and (ok.peak_memory_infer_mb > 0).all() and (ok.num_params > 0).all()
    assert ok.loss_curve.map(len).min() >= 1
    assert df[df.pool == "gpu"].simulated.all() and (df[df.pool == "gpu"].device.dropna() == "cpu").all()
    # a recommended config builds with the runner's own config class
    pool = ok.pool.iloc[0]
    config = SweepResult.load(tmp_path / "quickstart").recommend(pool)
    built = trial.TrialConfig.from_dict(config)
    assert built.model_config.attention.kernel == config["model"]["attention"]["kernel"]
