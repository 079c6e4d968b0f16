"""A decoder trial's generation phase (issue 32 item 1): prefill, per-token decode, decode
tokens/s and the KV cache land on the result (and so in every store); encoder trials and
``measure.generation: false`` leave them None."""

from __future__ import annotations

import dataclasses

import pytest

from omninet.sweep import record
from omninet.trial import TrialConfig, TrialResult, run_trial

GENERATION = ["prefill_ms_p50", "prefill_ms_p90", "decode_ms_p50", "decode_ms_p90", "decode_ms_p99",
              "decode_tokens_s", "decode_context", "decode_new_tokens", "kv_cache_mb", "kv_cache_formula_mb"]
FAST = {"memory": False, "min_seconds": 0.0, "paired": False}  # generation_min_seconds follows: 0


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
