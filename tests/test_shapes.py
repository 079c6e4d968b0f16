"""Static-shape buckets: padded-and-masked outputs equal the unpadded ones, and compiling with
dynamic=False builds at most one graph per bucket over many random lengths."""

from __future__ import annotations

import random

import pytest
import torch

from omninet import AdvancedTransformer, ModelConfig, OmniNetModel
from omninet.shapes import BucketedModel, bucket_for, check_buckets, default_buckets, pad_batch

TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(arch="encoder", **kw):
    torch.manual_seed(0)
    extra = {"num_classes": 3} if arch == "encoder" else {}
    return OmniNetModel(ModelConfig(arch=arch, vocab_size=40, hidden_size=32, num_layers=2, num_heads=4,
                                    max_seq_length=64, dropout=0.0, **extra, **kw)).eval()


def test_default_buckets_and_bucket_for():
    assert default_buckets(64) == [16, 32, 64]
    assert default_buckets(100) == [16, 32, 64, 100]
    assert default_buckets(10) == [10]
    assert [bucket_for(n, [16, 32, 64]) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]
    with pytest.raises(ValueError, match="longer than the largest shape bucket"):
        bucket_for(65, [16, 32, 64])


@pytest.mark.parametrize("buckets, message", [
    ([32, 16], r"strictly increasing; sort them"),
    ([16, 16, 32], r"strictly increasing"),
    ([16, 128], r"goes above max_seq_length=64; use buckets <= 64"),
    ([], r"non-empty list"),
    ([0, 16], r"positive integers"),
    ("16,32", r"non-empty list"),
])
def test_bad_buckets_are_one_line_errors(buckets, message):
    with pytest.raises(ValueError, match=message) as info:
        check_buckets(buckets, 64)
    assert "\n" not in str(info.value) and "shape_buckets" in str(info.value)
    with pytest.raises(ValueError, match=message):
        BucketedModel(_model(), buckets)


@pytest.mark.parametrize("arch, position", [("encoder", "learned"), ("decoder", "learned"), ("decoder", "rotary"),
                                            ("encoder", "alibi")])
def test_padded_outputs_equal_the_unpadded_ones(arch, position):
    model = _model(arch, position={"kind": position})
    bucketed = BucketedModel(model, [16, 32, 64])
    g = torch.Generator().manual_seed(1)
    for n in (5, 16, 23):
        ids = torch.randint(1, 40, (3, n), generator=g)
        mask = torch.ones(3, n, dtype=torch.bool)
        mask[1, n - 2 :] = False
        labels = torch.randint(0, 3, (3,), generator=g) if arch == "encoder" else ids
        with torch.no_grad():
            ref = model(ids, attention_mask=mask, labels=labels)
            out = bucketed(ids, attention_mask=mask, labels=labels)
        assert out.logits.shape == ref.logits.shape
        torch.testing.assert_close(out.logits, ref.logits, **TOL)
        torch.testing.assert_close(out.loss, ref.loss, **TOL)
        if arch == "decoder":
            torch.testing.assert_close(out.hidden_states, ref.hidden_states, **TOL)


def test_seed_class_behind_buckets():
    torch.manual_seed(0)
    model = AdvancedTransformer(num_layers=2, hidden_size=32, num_heads=4, ff_dim=64, max_seq_length=64, dropout=0.0,
                                use_sparse_attention=False, use_linformer=False, device_config={"device": "cpu"}).eval()
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        ref, _ = model(hidden_states=x)
        out, weights = BucketedModel(model)(hidden_states=x, output_attentions=True)
    assert out.shape == (2, 21, 32) and weights[0].shape == (2, 4, 21, 21)
    torch.testing.assert_close(out, ref, **TOL)


def test_pad_batch_masks_and_ignores_the_padding():
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.ones(2, 5, dtype=torch.long)}
    out = pad_batch(batch, [8], pad_id=0)
    assert out["input_ids"].shape == (2, 8) and out["input_ids"][:, 5:].eq(0).all()
    assert out["attention_mask"][:, :5].all() and not out["attention_mask"][:, 5:].any()
    assert out["labels"][:, 5:].eq(-100).all() and "attention_mask" not in batch
    with pytest.raises(ValueError, match=r"\[B, N\] padding attention_mask"):
        pad_batch({**batch, "attention_mask": torch.ones(2, 1, 5, 5, dtype=torch.bool)}, [8])


def test_compile_static_builds_at_most_one_graph_per_bucket_over_20_random_lengths():
    graphs = []

    def counting_backend(gm, example_inputs):  # called once per compiled graph
        graphs.append(gm)
        return gm.forward

    import torch._dynamo

    torch._dynamo.reset()
    buckets = [16, 32, 64]
    model = BucketedModel(_model(), buckets, compile=True, backend=counting_backend)
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(20)]
    used = {bucket_for(n, buckets) for n in lengths}
    ref_model = _model()
    for n in lengths:
        ids = torch.randint(1, 40, (2, n), generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            out = model(ids)
            torch.testing.assert_close(out.logits, ref_model(ids).logits, **TOL)
    assert len(graphs) <= len(buckets) and len(graphs) == len(used)
    assert list(model.model.state_dict()) == list(ref_model.state_dict())  # compiled in place: same keys
    torch._dynamo.reset()


TASK = {"name": "listops", "min_length": 5, "max_length": 40, "max_depth": 3, "num_train": 256, "num_eval": 64}


def _trial(**hardware):
    return {"task": TASK, "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
            "train": {"steps": 4, "batch_size": 16, "lr": 3e-3, "warmup_steps": 1},
            "hardware": {"device": "cpu", "num_threads": 1, **hardware},
            "measure": {"memory": False, "min_seconds": 0.0, "warmup": 1, "latency_reps": 20, "throughput_reps": 20}}


def test_trial_pads_every_batch_to_its_bucket(monkeypatch):
    from omninet.trial import loop, run_trial

    lengths = []
    real_step = loop.step

    def spy(model, opt, batch, *a, **kw):
        lengths.append(batch["input_ids"].shape[1])
        return real_step(model, opt, batch, *a, **kw)

    monkeypatch.setattr(loop, "step", spy)
    a = run_trial(_trial(shape_buckets=[16, 32, 40]))
    assert a.status == "ok", a.error
    assert a.shape_buckets == "16,32,40" and set(lengths) <= {16, 32, 40}
    b = run_trial(_trial(shape_buckets="pow2"))
    assert b.status == "ok" and b.shape_buckets == "16,32,40"
    assert b.loss_curve == a.loss_curve  # deterministic, and the same buckets
    plain = run_trial(_trial())
    assert plain.loss_curve == pytest.approx(a.loss_curve, rel=1e-4)  # masked padding changes nothing real


@pytest.mark.parametrize("buckets, message", [([32, 16, 40], "strictly increasing"), ([16, 64], "above max_seq_length"),
                                              ([16, 32], "stops below the longest input")])
def test_trial_refuses_bad_buckets_before_running(buckets, message):
    from omninet.trial import run_trial

    res = run_trial(_trial(shape_buckets=buckets))
    assert res.status == "invalid" and message in res.error and res.steps == 0 and "\n" not in res.error
