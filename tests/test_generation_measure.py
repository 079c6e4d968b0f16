"""A decoder trial's generation phase (issue 32 item 1): prefill, per-token decode, decode
tokens/s, decode at several cache depths and the KV cache land on the result; timed beside the
pool's reference, prefill and decode carry their paired ratios (issue 33 item 1); every figure
reaches the Parquet table, MLflow and Optuna and can be an objective or a constraint. Encoder
trials and ``measure.generation: false`` leave them None (never zero)."""

from __future__ import annotations

import dataclasses

import pytest

from omninet.sweep import record
from omninet.trial import RunContext, TrialConfig, TrialResult, run_trial
from omninet.trial import measure

GENERATION = ["prefill_ms_p50", "prefill_ms_p90", "decode_ms_p50", "decode_ms_p90", "decode_ms_p99",
              "decode_tokens_s", "decode_context", "decode_new_tokens", "kv_cache_mb", "kv_cache_formula_mb"]
# generation_min_seconds follows min_seconds: 0; one round of the latency loops, no calibration calls
# every generation field of TrialResult (GenerationReading, DepthReading, GenerationPairedReading, memory, error)
GENERATION_ALL = [f.name for cls in (measure.GenerationReading, measure.DepthReading, measure.GenerationPairedReading,
                                     measure.GenerationMemoryReading, measure.GenerationErrorReading)
                  for f in dataclasses.fields(cls)]
FAST = {"memory": False, "min_seconds": 0.0, "paired": False, "calibrate": False, "max_rounds": 1}


def trial(task: dict, model: dict | None = None, **measure) -> dict:
    return {"task": task, "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, **(model or {})},
            "train": {"steps": 2, "batch_size": 8, "lr": 3e-3, "warmup_steps": 1},
            "hardware": {"device": "cpu", "num_threads": 1}, "measure": {**FAST, **measure}}


DECODER = {"name": "copy", "length": 16}
ENCODER = {"name": "listops", "min_length": 5, "max_length": 40, "max_depth": 3, "num_train": 64, "num_eval": 16}


@pytest.mark.parametrize("kv_heads, memory", [(None, False), (2, True)])
def test_a_decoder_trial_measures_generation(kv_heads, memory):
    res = run_trial(trial(DECODER, {"num_kv_heads": kv_heads}, generation_tokens=8, memory=memory))
    assert res.status == "ok", res.error
    assert res.generation_error is None
    assert all(getattr(res, f) is not None and getattr(res, f) > 0 for f in GENERATION)
    assert res.prefill_ms_p50 <= res.prefill_ms_p90 and res.decode_ms_p50 <= res.decode_ms_p90 <= res.decode_ms_p99
    assert res.decode_new_tokens == 8 and res.decode_context + res.decode_new_tokens == res.seq_length
    # the measured cache equals the formula: 2 x layers x B x Hk x N x D x 4 bytes (fp32)
    cfg = TrialConfig.from_dict(trial(DECODER, {"num_kv_heads": kv_heads}))
    mc = cfg.model_config
    expect = 2 * mc.num_layers * res.measure_batch_size * mc.kv_heads * res.seq_length * mc.head_dim * 4 / 2**20
    assert res.kv_cache_mb == pytest.approx(expect) and res.kv_cache_formula_mb == pytest.approx(expect)
    peaks = [res.peak_memory_prefill_mb, res.peak_memory_generate_mb]  # measured with measure.memory only
    assert all(p is not None and p > res.kv_cache_mb for p in peaks) if memory else peaks == [None, None]


def test_an_encoder_trial_and_a_switched_off_one_leave_generation_none():
    for res in (run_trial(trial(ENCODER)), run_trial(trial(DECODER, generation=False))):
        assert res.status == "ok", res.error
        assert all(getattr(res, f) is None for f in GENERATION + ["generation_error", "peak_memory_generate_mb"])
        assert res.latency_p50_ms is not None  # the forward figures are still there


def test_generation_fields_are_columns_of_every_store():
    names = {f.name for f in dataclasses.fields(TrialResult)}
    assert set(GENERATION) <= names
    cols = record.columns()
    assert set(GENERATION) <= set(cols) and {"decode_ms_p50", "kv_cache_mb"} <= record.metric_names()
    assert record.labels()["decode_ms_p50"] == "decode per token p50 (ms)"


def test_generation_settings_are_validated():
    with pytest.raises(ValueError, match="generation_reps"):
        TrialConfig.from_dict(trial(DECODER, generation_reps=5))
    with pytest.raises(ValueError, match="generation_tokens"):
        TrialConfig.from_dict(trial(DECODER, generation_tokens=0))


def test_decode_depths_are_capped_at_the_model_length():
    assert measure.decode_depths(32, 1024, 8) == [32, 128, 512]
    assert measure.decode_depths(32, 256, 8) == [32, 128, 256]  # 16N capped: measured at the cap
    assert measure.decode_depths(32, 100, 8) == [32, 100, None]  # 16N would repeat the cap: not measured twice
    assert measure.decode_depths(32, 32, 8) == [32, None, None]
    assert measure._slope_ms_per_1k([(32, 1.0), (128, 1.3), (512, 2.5)]) == pytest.approx(3.125)  # on one line
    assert measure._slope_ms_per_1k([(0, 1.0), (1000, 3.0), (2000, 2.0)]) == pytest.approx(0.5)  # sxy 1000 / sxx 2e6
    assert measure._slope_ms_per_1k([(32, 1.0)]) is None


@pytest.fixture(scope="module")
def paired_decoder():
    """A decoder trial timed beside its reference (itself), its model 4x its prompt long."""
    cfg = trial(DECODER, {"max_seq_length": 128}, generation_tokens=8, paired=True, latency_reps=20,
                pair_min_rounds=6, pair_max_rounds=7)
    return run_trial(cfg, context=RunContext(reference=TrialConfig.from_dict(cfg), reference_label="base"))


def test_a_paired_decoder_trial_measures_depths_and_generation_ratios(paired_decoder):
    res = paired_decoder
    assert res.status == "ok" and res.generation_error is None, (res.error, res.generation_error)
    assert res.latency_pairing == "base"
    # depths N = 32 and 4N = 128 = max_seq_length; 16N is capped to 128 too: not measured twice
    assert (res.decode_depth_1p, res.decode_depth_4p, res.decode_depth_16p, res.decode_depth_cap) == (32, 128, None, 128)
    assert res.decode_ms_1p > 0 and res.decode_ms_4p > 0 and res.decode_ms_16p is None
    assert res.decode_ms_per_1k_depth == pytest.approx(1000 * (res.decode_ms_4p - res.decode_ms_1p) / 96)
    for key in ("prefill_ratio_ref", "decode_ratio_ref"):
        assert 0 < getattr(res, f"{key}_lo") <= getattr(res, key) <= getattr(res, f"{key}_hi")
    assert res.prefill_ms_p50 > 0 and res.decode_reps >= 20  # the trial's own calls in the paired rounds


def _store_config(tmp_path, *, decoder: bool):
    """A sweep config whose objectives and constraints are generation figures (decoder), or
    accuracy alone (encoder); ``RecordedTrial``: the rows are fed by hand, no trial runs."""
    from omninet.sweep.config import load_config
    from omninet.sweep.results import RecordedTrial

    gen = {"objectives": [{"key": "accuracy", "direction": "maximize"},
                          {"key": "decode_ms_p50", "direction": "minimize"}, {"key": "kv_cache_mb", "direction": "minimize"}],
           "constraints": {"cpu": {"max_decode_ms": 1e6, "max_prefill_ms": 1e6, "max_kv_cache_mb": 1e6}}}
    return load_config({
        "name": "gen", "results_dir": str(tmp_path / "results"), "trial_fn": "omninet.sweep.testing:toy_trial",
        "estimate_fn": None, "trial": {"toy": {}}, "search_space": {"toy.x": {"low": 0.1, "high": 1.0}},
        "pools": [{"name": "cpu", "resources": {"CPU": 1}, "trials": 1}],
        "objectives": [{"key": "accuracy", "direction": "maximize"}], **(gen if decoder else {}),
    }, runner=RecordedTrial())


def test_every_generation_field_reaches_every_store_and_can_be_an_objective(paired_decoder, tmp_path):
    from test_record import _recorded

    result = paired_decoder.to_dict()
    row, store, frozen, client = _recorded(tmp_path, _store_config(tmp_path, decoder=True), result)
    measured = {k: v for k, v in result.items() if k in GENERATION_ALL and v is not None}
    assert set(measured) == set(GENERATION_ALL) - {"decode_ms_16p", "decode_depth_16p", "generation_error",
                                                  "peak_memory_prefill_mb", "peak_memory_generate_mb"}
    parquet, metrics = store.row("cpu", 0), {m.key: m.value for m in client.metrics}
    for key, value in measured.items():
        assert parquet[key] == value and frozen.user_attrs[key] == value, key
        assert isinstance(value, bool) or metrics[key] == value, key  # every number is a metric
    assert parquet["decode_ms_16p"] is None and "decode_ms_16p" not in {**frozen.user_attrs, **metrics}
    assert frozen.values == [result["accuracy"], result["decode_ms_p50"], result["kv_cache_mb"]]
    limits = {k: frozen.constraints[k] for k in ("prefill", "decode", "kv_cache")}  # Optuna's constraints
    assert limits == pytest.approx({"prefill": result["prefill_ms_p50"] - 1e6, "decode": result["decode_ms_p50"] - 1e6,
                                    "kv_cache": result["kv_cache_mb"] - 1e6})
    assert row["constraint_decode"] == pytest.approx(result["decode_ms_p50"] - 1e6) and row["feasible"]


def test_an_encoder_row_holds_no_generation_figure_in_any_store(tmp_path):
    from test_record import _recorded

    result = run_trial(trial(ENCODER)).to_dict()
    row, store, frozen, client = _recorded(tmp_path, _store_config(tmp_path, decoder=False), result)
    parquet, metrics = store.row("cpu", 0), {m.key for m in client.metrics}
    assert row["status"] == "ok"
    for key in GENERATION_ALL:
        assert parquet[key] is None, key  # null, not zero
        assert key not in frozen.user_attrs and key not in metrics, key


def test_a_generation_objective_or_limit_on_an_encoder_sweep_is_refused(tmp_path):
    from omninet.sweep import SweepConfigError
    from omninet.sweep.config import load_config

    base = {"name": "enc", "results_dir": str(tmp_path / "enc"), "trial": trial(ENCODER),
            "search_space": {"train.lr": {"low": 1e-3, "high": 1e-2}}, "pools": [{"name": "cpu", "trials": 1}]}
    with pytest.raises(SweepConfigError, match="'decode_ms_p50' is measured for decoders only"):
        load_config({**base, "objectives": [{"key": "accuracy", "direction": "maximize"},
                                            {"key": "decode_ms_p50", "direction": "minimize"}]})
    with pytest.raises(SweepConfigError, match="the kv_cache limit bounds 'kv_cache_mb', which is measured for decoders"):
        load_config({**base, "constraints": {"cpu": {"max_kv_cache_mb": 10.0}}})
    dec = {**base, "trial": trial(DECODER, generation=False)}
    with pytest.raises(SweepConfigError, match="trial.measure.generation is false"):
        load_config({**dec, "constraints": {"cpu": {"max_decode_ms": 10.0}}})
    load_config({**base, "trial": trial(DECODER), "constraints": {"cpu": {"max_decode_ms": 10.0}}})  # a decoder: fine


def test_a_sink_window_decoder_measures_generation_across_evictions():
    """A ring buffer cannot crop back past a block it evicted: the decode loop restores the
    prefilled cache instead, so a bounded decoder (block 16, window 2 blocks; its 20-token decode
    window crosses a block start, which evicts a block the window's first depth needs) measures generation, and its cache
    stays the ring's size."""
    bounded = {"position": {"kind": "rotary"}, "attention": {"kernel": "block_sparse", "block_sparse": {
        "pattern": "sink_window", "block_size": 16, "window_blocks": 2, "sink_blocks": 1}}}
    task = {"name": "copy", "length": 96}
    res = run_trial(trial(task, bounded, generation_tokens=20))
    assert res.status == "ok", res.error
    assert res.generation_error is None and res.decode_ms_p50 > 0
    depth = res.seq_length - 20  # the window crosses a block start: the next block evicts one the depth needs
    assert res.decode_context == depth and depth % 16 and depth // 16 < res.seq_length // 16
    mc = TrialConfig.from_dict(trial(task, bounded)).model_config
    ring = 2 * mc.num_layers * res.measure_batch_size * mc.kv_heads * (1 + 2) * 16 * mc.head_dim * 4 / 2**20
    assert res.kv_cache_mb == pytest.approx(ring)
