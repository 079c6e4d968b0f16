"""Head importance, physical pruning, pruning schedules and per-input head gating (issue 4)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conformance import ALL_KERNELS, POSITIONS, kernel_compatible, small_config
from omninet import OmniNetModel
from omninet.attention import KERNELS, KernelSpec
from omninet.heads import (
    IterativePruner,
    compute_head_importance,
    online_head_importance,
    prune_by_importance,
    prune_model,
    set_online_importance,
)

TOL = dict(rtol=1e-5, atol=1e-5)
ARCHS = ["encoder", "decoder", "encoder_decoder"]
H = 4  # small_config: hidden 32, 4 heads, 2 layers


def build(kernel="sdpa", arch="encoder", position="learned", seed=0, **kw):
    torch.manual_seed(seed)
    return OmniNetModel(small_config(kernel, arch=arch, position=position, **kw)).eval()


def ids(b=2, n=24, seed=1):
    return torch.randint(1, 97, (b, n), generator=torch.Generator().manual_seed(seed))


def run(model, x, **kw):
    if model.config.arch == "encoder_decoder":
        kw.setdefault("decoder_input_ids", x[:, :-3])
    return model(x, **kw)


def lm_batches(n=3, b=4, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(1, 97, (b, seq), generator=g)
        out.append({"input_ids": x, "labels": torch.roll(x, -1, dims=1)})
    return out


def clone(model):
    twin = OmniNetModel(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


# ---- physical pruning -------------------------------------------------------------------
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_equals_head_mask_zeros(arch, position):
    model, unpruned = build(arch=arch, position=position), build(arch=arch, position=position)  # same seed
    x = ids()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 18:] = False
    plan = {0: [1, 3], 1: [0]} if arch != "encoder_decoder" else {0: [1, 3], 2: [2], 3: [0, 1, 2]}
    head_mask = torch.ones(model.config.total_layers, H)
    for layer, heads in plan.items():
        head_mask[layer, heads] = 0
    ref = run(unpruned, x, attention_mask=mask, head_mask=head_mask).logits
    model.prune_heads(plan)
    assert model.attention_layers()[0].num_heads == 2
    torch.testing.assert_close(run(model, x, attention_mask=mask).logits, ref, **TOL)
    head_mask[0, 0] = 0.5  # a head_mask on the pruned model is still indexed by original head id
    ref = run(unpruned, x, attention_mask=mask, head_mask=head_mask).logits
    torch.testing.assert_close(run(model, x, attention_mask=mask, head_mask=head_mask).logits, ref, **TOL)


def test_head_specific_mask_is_restricted_to_remaining_heads():
    model = build(position="relative")
    x = ids(n=12)
    mask = torch.rand(2, H, 12, 12, generator=torch.Generator().manual_seed(3)) > 0.3
    mask |= torch.eye(12, dtype=torch.bool)
    head_mask = torch.ones(2, H)
    head_mask[0, [0, 2]] = 0
    ref = model(x, attention_mask=mask, head_mask=head_mask).logits
    model.prune_heads({0: [0, 2]})
    torch.testing.assert_close(model(x, attention_mask=mask).logits, ref, **TOL)


def test_parameter_counts_drop_by_the_removed_heads():
    model = build()
    C, D = 32, 8
    per_head = 3 * D * C + 3 * D + D * C  # q/k/v rows (+ bias) and o_proj columns
    before = model.num_parameters()
    model.prune_heads({0: [0, 1], 1: [3]})
    assert model.num_parameters() == before - 3 * per_head
    attn = model.attention_layers()[0]
    assert attn.qkv.weight.shape == (3 * 2 * D, C) and attn.o_proj.weight.shape == (C, 2 * D)
    assert attn.head_ids.tolist() == [2, 3]
    model.prune_heads({1: [0]})  # half of every layer's heads gone: half the projection params
    proj = sum(a.qkv.weight.numel() + a.o_proj.weight.numel() for a in model.attention_layers())
    assert proj == 2 * (4 * C * C) // 2
    assert model.config.heads.pruned_heads == {0: [0, 1], 1: [0, 3]}


def test_save_load_of_a_pruned_gated_model(tmp_path):
    model = build(position="alibi", heads={"active_heads": 2})
    model.prune_heads({0: [3], 1: [0, 2]})
    x = ids()
    ref = model(x).logits
    model.save_pretrained(tmp_path)
    again = OmniNetModel.from_pretrained(tmp_path).eval()
    assert again.config.heads.pruned_heads == {0: [3], 1: [0, 2]}
    assert [a.head_ids.tolist() for a in again.attention_layers()] == [[0, 1, 2], [1, 3]]
    assert again.attention_layers()[1].router.proj.weight.shape == (2, 32)
    torch.testing.assert_close(again(x).logits, ref, rtol=0, atol=0)
    again.prune_heads({0: [1]})  # pruning continues from the loaded state
    assert again.config.heads.pruned_heads[0] == [1, 3]


# ---- importance -------------------------------------------------------------------------
def _make_useless(model, useless):
    with torch.no_grad():
        for layer, h in useless.items():
            attn = model.attention_layers()[layer]
            attn.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_useless_heads_score_zero_and_rank_last_under_both_scorings(arch):
    kw = {"num_classes": 3} if arch == "encoder" else {}
    model = build(arch=arch, heads={"online_importance": True}, **kw)
    useless = {0: 2, 1: 1}
    _make_useless(model, useless)
    if arch == "encoder":
        batches = [{"input_ids": ids(b=4, seed=s), "labels": torch.tensor([0, 1, 2, 1])} for s in range(3)]
    else:
        batches = lm_batches()
    grads = compute_head_importance(model, batches)
    with torch.no_grad():
        for b in batches:
            model(b["input_ids"])
    online = online_head_importance(model)
    for imp in (grads, online):
        assert imp.shape == (2, H) and bool((imp >= 0).all())
        for layer, h in useless.items():
            assert imp[layer, h] == 0
            assert int(imp[layer].argmin()) == h
            assert bool((imp[layer][torch.arange(H) != h] > 1e-6).all())
    torch.testing.assert_close(grads.norm(dim=1), torch.ones(2))  # L2-normalized per layer
    torch.testing.assert_close(model.attention_layers()[0].importance, grads[0])
    assert all(p.grad is None for p in model.parameters())  # scoring leaves .grad alone


def test_online_importance_is_switchable_and_an_ema():
    model = build(heads={"online_importance": True, "importance_decay": 0.5})
    attn = model.attention_layers()[0]
    with torch.no_grad():
        model(ids(seed=1))
        first = attn.online_importance.clone()
        model(ids(seed=2))
        second = attn.online_importance.clone()
        set_online_importance(model, False)
        model(ids(seed=3))
    assert attn.online_updates == 2 and not torch.equal(first, second)
    torch.testing.assert_close(attn.online_importance, second)
    set_online_importance(model, True, reset=True)
    assert attn.online_updates == 0 and float(attn.online_importance.abs().sum()) == 0
    # EMA: second = 0.5 * first + 0.5 * contribution of batch 2
    model2 = build(heads={"online_importance": True})
    with torch.no_grad():
        model2(ids(seed=2))
    torch.testing.assert_close(second, 0.5 * first + 0.5 * model2.attention_layers()[0].online_importance)


def test_online_importance_costs_little_and_off_by_default():
    x = ids(b=2, n=64)
    base = build()
    assert not base.attention_layers()[0].track_importance
    on = build(heads={"online_importance": True})
    with FlopCounterMode(display=False) as f0:
        base(x)
    with FlopCounterMode(display=False) as f1:
        on(x)
    assert f1.get_total_flops() == f0.get_total_flops()  # no extra matmuls: only norms


# ---- schedules --------------------------------------------------------------------------
def test_prune_by_importance_is_global_and_keeps_one_head_per_layer():
    model = build(num_layers=3)
    imp = torch.tensor([[0.9, 0.1, 0.8, 0.7], [0.05, 0.04, 0.03, 0.02], [0.5, 0.6, 0.55, 0.58]])
    plan = prune_by_importance(model, imp, 0.5)  # 6 of 12 heads
    assert plan == {1: [3, 2, 1], 0: [1], 2: [0, 2]}
    assert [a.num_heads for a in model.attention_layers()] == [3, 1, 2]
    assert prune_by_importance(model, imp, 0.5) == {}  # already there
    plan = prune_by_importance(model, imp, 0.9)  # 11 of 12 is out of reach: one head per layer stays
    assert [a.num_heads for a in model.attention_layers()] == [1, 1, 1]
    assert model.attention_layers()[0].head_ids.tolist() == [0]


def test_prune_model_reports_accuracy_before_and_after():
    model = build(arch="decoder")
    evals = lm_batches(n=2, seed=9)

    def accuracy(m):
        with torch.no_grad():
            hits = [(m(b["input_ids"]).logits.argmax(-1) == b["labels"]).float().mean() for b in evals]
        return float(torch.stack(hits).mean())

    report = prune_model(model, lm_batches(), prune_ratio=0.5, eval_fn=accuracy)
    assert report.heads_before == 8 and report.heads_after == 4 and report.ratio == 0.5
    assert report.params_after < report.params_before
    assert report.accuracy_before == pytest.approx(accuracy(build(arch="decoder")))
    assert report.accuracy_after == pytest.approx(accuracy(model))
    assert sum(map(len, report.pruned.values())) == 4
    assert set(report.to_dict()["pruned"]) <= {"0", "1"}


def test_iterative_pruner_prunes_in_slices_inside_a_training_loop():
    model = build(arch="decoder").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = itertools.cycle(lm_batches(n=4))
    pruner = IterativePruner(model, target_ratio=0.5, rounds=2, every=3, calibration_batches=2, optimizer=opt,
                             eval_fn=lambda m: 0.0)
    heads_left = []
    for _ in range(8):
        batch = next(data)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()  # must keep working after parameters are replaced
        pruner.step(data)
        heads_left.append(sum(a.num_heads for a in model.attention_layers()))
    assert heads_left == [8, 8, 6, 6, 6, 4, 4, 4]
    assert pruner.done and [r.step for r in pruner.history] == [3, 6]
    assert model.training  # scoring restored the mode
    live = {id(p) for p in model.parameters()}
    assert all(id(p) in live for g in opt.param_groups for p in g["params"])


# ---- gating -----------------------------------------------------------------------------
def _gated_reference(attn, x, mask=None, bias=None):
    """Every head computed, unselected ones zeroed, selected ones scaled by the gate."""
    gate = attn.router(x, mask)
    q, k, v, _ = attn._project(x, None, None, None, None)
    from omninet.heads import attend

    out, _ = attend(attn.spec, q, k, v, index=None, head_ids=attn.head_ids, total_heads=attn.total_heads, mask=mask,
                    bias=bias, causal=False, scale=attn.scale, dropout_p=0.0, need_weights=False, state=attn.kernel_state)
    w = torch.zeros(x.shape[0], attn.num_heads).scatter(1, gate.index, gate.weight[:, :, 0, 0])
    out = out * w[:, :, None, None]
    return attn.o_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)), gate


@pytest.mark.parametrize("position", ["learned", "relative", "alibi"])
def test_sequence_gating_computes_exactly_the_selected_heads(position):
    model = build(position=position, heads={"active_heads": 2})
    attn = model.attention_layers()[0]
    with torch.no_grad():
        attn.router.proj.weight.normal_(0, 3.0)  # sharp, input-dependent choices
    x = torch.randn(6, 10, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(6, 1, 1, 10, dtype=torch.bool)
    mask[2, ..., 7:] = False
    bias = model.encoder.bias
    ref, gate = _gated_reference(attn, x, mask, bias)
    assert gate.index.shape == (6, 2) and len({tuple(r) for r in gate.index.tolist()}) > 1  # groups differ
    out, _ = attn(x, mask=mask, bias=bias)
    torch.testing.assert_close(out, ref, **TOL)


def _spy(attn, seen):
    fn = attn.spec.fn

    def spy(q, k, v, **kw):
        seen.append(tuple(q.shape))
        return fn(q, k, v, **kw)

    attn.spec = KernelSpec("spy", spy)


def test_gating_runs_only_the_selected_heads_shapes_and_flops():
    x = ids(b=2, n=64)
    dense, gated = build(num_layers=1), build(num_layers=1, heads={"active_heads": 2})
    seen = []
    _spy(gated.attention_layers()[0], seen)
    with FlopCounterMode(display=False) as f_dense:
        dense(x)
    with FlopCounterMode(display=False) as f_gated:
        gated(x)
    assert seen == [(2, 2, 64, 8)]  # (B, k, N, D): the kernel sees only the active heads

    def attention_flops(counter, model):
        per_module = counter.get_flop_counts()
        return sum(sum(v.values()) for name, v in per_module.items() if name.endswith(".attn"))

    ratio = attention_flops(f_gated, gated) / attention_flops(f_dense, dense)
    assert 0.45 < ratio < 0.55, ratio  # k/H = 1/2, plus the tiny router


def test_router_gets_gradients_and_balance_loss_reaches_the_loss():
    model = build(arch="encoder", num_classes=3, heads={"active_heads": 2, "balance_loss_weight": 0.1}).train()
    x, y = ids(b=4), torch.tensor([0, 1, 2, 0])
    out = model(x, labels=y)
    assert out.aux_loss is not None and out.aux_loss.ndim == 0
    assert 0 < float(out.aux_loss.detach()) <= 0.1 * 2 * H  # 2 layers x weight x (1 balanced .. H collapsed)
    plain = torch.nn.functional.cross_entropy(out.logits, y)
    torch.testing.assert_close(out.loss, plain + out.aux_loss)
    out.loss.backward()
    for attn in model.attention_layers():
        g = attn.router.proj.weight.grad
        assert g is not None and float(g.abs().sum()) > 0
        assert float(attn.qkv.weight.grad.abs().sum()) > 0
    model.eval()
    assert model(x, labels=y).aux_loss is None


def test_token_gating_in_a_decoder_is_causal_and_trains():
    model = build(arch="decoder", position="rotary", heads={"active_heads": 1, "gating": "token"}).train()
    x = ids(b=2, n=16)
    out = model(x, labels=torch.roll(x, -1, 1))
    out.loss.backward()
    assert float(model.attention_layers()[0].router.proj.weight.grad.abs().sum()) > 0
    model.eval()
    x2 = x.clone()
    x2[:, 10:] = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits[:, :10], model(x2).logits[:, :10], **TOL)
        step = model(x[:, :6], use_cache=True)
        torch.testing.assert_close(model(x[:, 6:7], cache=step.cache).logits[:, -1], model(x[:, :7]).logits[:, -1], **TOL)


def test_sequence_router_ignores_padding():
    model = build(heads={"active_heads": 2})
    router = model.attention_layers()[0].router
    with torch.no_grad():
        router.proj.weight.normal_(0, 3.0)
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[:, ..., 6:] = False
    x2 = x.clone()
    x2[:, 6:] = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1))
    a, b = router(x, mask), router(x2, mask)
    assert torch.equal(a.index, b.index)
    torch.testing.assert_close(a.weight, b.weight)
    assert not torch.equal(router(x, None).weight, router(x2, None).weight)


@pytest.mark.parametrize("position", ["learned", "relative"])
@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_sequence_gating_composes_with_every_kernel(kernel, position):
    if not kernel_compatible(kernel, position=position):
        pytest.skip(f"{kernel} rejects position={position} by design")
    heads = {"active_heads": 2}
    model = build(kernel, position=position, num_classes=3, heads=heads).train()
    with torch.no_grad():
        for attn in model.attention_layers():
            attn.router.proj.weight.normal_(0, 3.0)  # sequences pick different head sets
    x = ids(b=3, n=64)
    out = model(x, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    assert torch.isfinite(out.logits).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    if KERNELS[kernel].exact and kernel != "block_sparse":
        ref = OmniNetModel(small_config("eager", position=position, num_classes=3, heads=heads)).train()
        ref.load_state_dict(model.state_dict())
        torch.testing.assert_close(ref(x).logits, model(x).logits, **TOL)


def test_gating_with_checkpointing_and_pruning_below_active_heads():
    model = build(gradient_checkpointing=True, num_classes=3, heads={"active_heads": 3}).train()
    model.prune_heads({0: [0, 1, 2]})  # one head left in layer 0: the router clamps k to 1
    out = model(ids(b=2), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert model.attention_layers()[1].router.proj.weight.grad is not None


# ---- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "heads, message",
    [
        ({0: [4]}, r"head ids \[4\] out of range \[0, 4\)"),
        ({0: [-1]}, r"out of range"),
        ({5: [0]}, r"layer 5 out of range"),
        ({0: [0, 1, 2, 3]}, r"remove every head"),
    ],
)
def test_prune_heads_rejects_bad_ids(heads, message):
    model = build()
    with pytest.raises(ValueError, match=message):
        model.prune_heads(heads)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(heads={"active_heads": 5}), r"active_heads \(5\) must be <= num_heads \(4\)"),
        (dict(heads={"active_heads": 0}), r"active_heads must be >= 1"),
        (dict(heads={"pruned_heads": {0: [0, 1, 2, 3]}}), r"removes every head"),
        (dict(heads={"pruned_heads": {0: [7]}}), r"head ids must be distinct and in \[0, 4\)"),
    ],
)
def test_heads_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_config(**kwargs)


def test_sequence_gating_refuses_causal_decoders():
    with pytest.raises(ValueError, match=r"gating='sequence'.*use gating='token'"):
        OmniNetModel(small_config(arch="decoder", heads={"active_heads": 2}))


def test_schedule_functions_reject_bad_input():
    model = build(arch="decoder")
    with pytest.raises(ValueError, match=r"importance must be a tensor of shape \[num_layers=2, num_heads=4\]"):
        prune_by_importance(model, torch.ones(3, 4), 0.5)
    with pytest.raises(ValueError, match=r"prune_ratio must be a number in \[0, 1\)"):
        prune_by_importance(model, torch.ones(2, 4), 1.0)
    with pytest.raises(ValueError, match=r"NaN"):
        prune_by_importance(model, torch.full((2, 4), float("nan")), 0.5)
    with pytest.raises(ValueError, match=r"batches is empty"):
        compute_head_importance(model, [])
    with pytest.raises(ValueError, match=r"no loss; put labels"):
        compute_head_importance(model, [{"input_ids": ids()}])
    with pytest.raises(ValueError, match=r"each batch must be a dict"):
        compute_head_importance(model, [ids()])
    with pytest.raises(ValueError, match=r"target_ratio must be in \(0, 1\)"):
        IterativePruner(model, target_ratio=0.0, rounds=1, every=1)
    with pytest.raises(ValueError, match=r"every must be >= 1"):
        IterativePruner(model, target_ratio=0.5, rounds=1, every=0)
    assert [a.num_heads for a in model.attention_layers()] == [4, 4]


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_pruning_equals_head_mask_for_every_kernel(kernel):
    position = "alibi" if kernel_compatible(kernel, position="alibi") else "learned"
    if not kernel_compatible(kernel, position=position):
        pytest.skip(f"{kernel} rejects the encoder config by design")
    model, unpruned = build(kernel, position=position), build(kernel, position=position)
    x = ids(b=2, n=64)
    head_mask = torch.ones(2, H)
    head_mask[0, [0, 3]] = 0
    head_mask[1, 2] = 0
    ref = unpruned(x, head_mask=head_mask).logits
    model.prune_heads({0: [0, 3], 1: [2]})
    torch.testing.assert_close(model(x).logits, ref, **TOL)


class _Opaque(torch.nn.Module):
    """Stands in for a linear whose weight cannot be gathered (e.g. a quantized one)."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def test_gating_falls_back_to_select_after_projection_for_opaque_linears():
    model = build(heads={"active_heads": 2})
    attn = model.attention_layers()[0]
    with torch.no_grad():
        attn.router.proj.weight.normal_(0, 3.0)
    x = torch.randn(4, 10, 32, generator=torch.Generator().manual_seed(0))
    ref, _ = attn(x)
    attn.qkv, attn.o_proj = _Opaque(attn.qkv), _Opaque(attn.o_proj)
    torch.testing.assert_close(attn(x)[0], ref, **TOL)


def test_attention_weights_under_gating_are_the_selected_heads():
    model = build(position="relative", heads={"active_heads": 2})
    with torch.no_grad():
        for attn in model.attention_layers():
            attn.router.proj.weight.normal_(0, 3.0)
    x = ids(b=4, n=12)
    out = model(x, output_attentions=True)
    assert [tuple(w.shape) for w in out.attentions] == [(4, 2, 12, 12)] * 2
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(4, 2, 12))
    torch.testing.assert_close(out.logits, model(x).logits, **TOL)
