"""The OmniNet model: conformance across kernels and positions, cache, checkpointing,
persistence, validation and the seed API."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conformance import ALL_KERNELS, POSITIONS, kernel_compatible, small_config
from omninet import AdvancedTransformer, ModelConfig, OmniNetModel
from omninet.attention import KERNELS

TOL = dict(rtol=1e-5, atol=1e-5)
ARCHS = ["encoder", "decoder", "encoder_decoder"]


def build(kernel="sdpa", arch="decoder", position="learned", seed=0, **kw):
    torch.manual_seed(seed)
    return OmniNetModel(small_config(kernel, arch=arch, position=position, **kw)).eval()


def _layout_eager(q, k, v, *, mask=None, causal=False, state=None, **kw):
    """The eager reference under the layout's equivalent dense mask (``state.dense_mask``)."""
    layout = state.dense_mask(q.shape[-2], k.shape[-2], causal=causal).to(q.device)
    return KERNELS["eager"].fn(q, k, v, mask=layout if mask is None else mask & layout, causal=causal, **kw)


def eager_twin(model):
    """The same model with every layout-based kernel (block-sparse) replaced by eager under
    that layer's layout mask, and every other kernel by plain eager: the reference for a
    sparse model that really runs its sparse path (small_config: min_seq_length=0)."""
    for m in model.modules():
        if hasattr(m, "spec") and hasattr(m, "kernel_state"):
            layout = m.kernel_state is not None and hasattr(m.kernel_state, "dense_mask")
            m.spec = dataclasses.replace(m.spec, fn=_layout_eager if layout else KERNELS["eager"].fn)
    return model


def ids(b=2, n=24, seed=1, vocab=97):
    return torch.randint(1, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def forward(model, x, **kw):
    if model.config.arch == "encoder_decoder":
        kw.setdefault("decoder_input_ids", x[:, :-3])
    return model(x, **kw)


@pytest.mark.parametrize("kernel", [k for k in ALL_KERNELS if KERNELS[k].exact and k != "eager"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_model_matches_eager_model(kernel, position, arch):
    if not kernel_compatible(kernel, arch=arch, position=position):
        pytest.skip(f"{kernel} rejects arch={arch} position={position} by design (config error)")
    model = build(kernel, arch, position).train()  # dropout is 0: train mode only enables grads paths
    ref = eager_twin(build(kernel, arch, position)).train()  # same weights (same seed), eager kernels
    x = ids()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 20:] = False
    out, out_ref = forward(model, x, attention_mask=mask), forward(ref, x, attention_mask=mask)
    torch.testing.assert_close(out.logits, out_ref.logits, **TOL)
    if kernel == "block_sparse":  # the layout really is sparse at this length: plain eager differs
        plain = build("eager", arch, position)
        plain.load_state_dict(model.state_dict())
        assert not torch.allclose(forward(plain.train(), x, attention_mask=mask).logits, out.logits, **TOL)
    out.logits.pow(2).mean().backward()
    out_ref.logits.pow(2).mean().backward()
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        if p.grad is not None or p_ref.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kernel", [k for k in ALL_KERNELS if KERNELS[k].supports_causal])
@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_is_causal(kernel, position):
    model = build(kernel, "decoder", position)
    x = ids(n=40)
    t = 23
    y = x.clone()
    y[:, t + 1 :] = ids(n=40, seed=7)[:, t + 1 :]
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], **TOL)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize("kernel", ALL_KERNELS)
@pytest.mark.parametrize("position", POSITIONS)
def test_encoder_padding_respected_and_gradients_finite(kernel, position):
    if not kernel_compatible(kernel, arch="encoder", position=position):
        pytest.skip(f"{kernel} rejects position={position} by design")
    model = build(kernel, "encoder", position, num_classes=3).train()
    x = ids(n=40)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, 30:] = False
    y = x.clone()
    y[:, 30:] = ids(n=40, seed=9)[:, 30:]
    a = model(x, attention_mask=mask)
    b = model(y, attention_mask=mask)
    torch.testing.assert_close(a.logits, b.logits, **TOL)
    a.logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_left_padded_causal_rows_are_finite():
    model = build("sdpa", "decoder").train()
    x = ids()
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[0, :5] = False  # left padding: query 0 of row 0 sees no real key
    out = model(x, attention_mask=mask)
    assert torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_kv_cache_equals_full_recompute(position, arch):
    model = build("sdpa", arch, position)
    x = ids(n=20)
    tgt = ids(n=12, seed=3)
    if arch == "decoder":
        full = model(x).logits
        out = model(x[:, :8], use_cache=True)
        steps = [out.logits]
        for t in range(8, 20):
            out = model(x[:, t : t + 1], cache=out.cache)
            steps.append(out.logits)
    else:
        full = model(x, decoder_input_ids=tgt).logits
        out = model(x, decoder_input_ids=tgt[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 12):
            out = model(decoder_input_ids=tgt[:, t : t + 1], encoder_hidden_states=out.encoder_hidden_states,
                        cache=out.cache)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_generate_greedy_matches_recompute_loop(arch):
    model = build("sdpa", arch, "rotary")
    x = ids(b=2, n=6)
    out = model.generate(x, max_new_tokens=5)
    seq = x if arch == "decoder" else torch.zeros(2, 1, dtype=torch.long)
    for _ in range(5):
        logits = model(seq).logits if arch == "decoder" else model(x, decoder_input_ids=seq).logits
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_eos_topk_and_sampling():
    model = build("sdpa", "decoder", "alibi")
    x = ids(b=1, n=4)
    greedy = model.generate(x, max_new_tokens=6)
    assert torch.equal(model.generate(x, max_new_tokens=6, temperature=1.0, top_k=1), greedy)
    new = greedy[0, 4:]
    eos = int(new[2])
    first = int((new == eos).nonzero()[0])
    stopped = model.generate(x, max_new_tokens=6, eos_token_id=eos)
    assert stopped.shape[1] == 4 + first + 1 and int(stopped[0, -1]) == eos
    g1, g2 = (model.generate(x, max_new_tokens=6, temperature=1.5, generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(g1, g2)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(x, temperature=-1.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_same_gradients(arch):
    plain = build("sdpa", arch, "relative").train()
    ckpt = build("sdpa", arch, "relative", gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = ids()
    for m in (plain, ckpt):
        forward(m, x).logits.pow(2).mean().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tmp_path, arch):
    model = build("sdpa", arch, "relative", num_classes=4 if arch == "encoder" else None)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = OmniNetModel.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    x = ids()
    torch.testing.assert_close(forward(loaded, x).logits, forward(model, x).logits, rtol=0, atol=0)
    if model.lm_head is not None:
        assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()  # tying survives


def test_from_pretrained_rejects_a_non_model_directory(tmp_path):
    with pytest.raises(ValueError, match="config.json and model.safetensors"):
        OmniNetModel.from_pretrained(tmp_path)


def test_head_mask_shapes_and_effect():
    model = build("sdpa", "encoder", num_classes=3)
    x = ids()
    base = model(x).logits
    torch.testing.assert_close(model(x, head_mask=torch.ones(4)).logits, base, rtol=0, atol=0)
    hm = torch.ones(2, 4)
    hm[0, 1] = 0
    assert not torch.allclose(model(x, head_mask=hm).logits, base)
    with pytest.raises(ValueError, match=r"head_mask must have shape \[num_heads=4\]"):
        model(x, head_mask=torch.ones(3))


def test_learned_positions_refuse_long_inputs_rotary_and_alibi_extrapolate():
    with pytest.raises(ValueError, match="rotary' or 'alibi'"):
        build("sdpa", "decoder", "learned")(ids(n=129))
    for kind in ("rotary", "alibi", "relative"):
        out = build("sdpa", "decoder", kind)(ids(n=200)).logits
        assert out.shape == (2, 200, 97) and torch.isfinite(out).all()


# ---- configuration ----------------------------------------------------------------------

def test_config_round_trips_through_json():
    cfg = small_config("sdpa", position="rotary", num_classes=5, heads={"pruned_heads": {1: [0, 2]}})
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg and again.heads.pruned_heads == {1: [0, 2]}
    assert json.loads(cfg.to_json())["attention"]["block_sparse"]["block_size"] == 16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=30, num_heads=4), r"hidden_size \(30\) must be divisible by num_heads \(4\); try num_heads="),
        (dict(num_layers="2"), r"ModelConfig.num_layers: expected an integer"),
        (dict(dropout=True), r"ModelConfig.dropout: expected a number"),
        (dict(arch="rnn"), r"ModelConfig.arch: must be one of"),
        (dict(attention={"kernel": "nope"}), r"kernel 'nope' is not registered; choose one of"),
        (dict(attention={"kernal": "sdpa"}), r"unknown key\(s\) 'kernal'"),
        (dict(position={"kind": "sinusoid"}), r"PositionConfig.kind: must be one of"),
        (dict(heads={"active_heads": 9}, num_heads=4, hidden_size=32), r"active_heads \(9\) must be <= num_heads"),
        (dict(heads={"pruned_heads": {0: [0, 1, 2, 3]}}, num_heads=4, hidden_size=32), r"removes every head"),
    ],
)
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_unknown_top_level_key_is_an_error():
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'hiden_size'"):
        ModelConfig.from_dict({"hiden_size": 64})


# ---- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m(torch.randn(2, 8)), r"input_ids must be an integer tensor"),
        (lambda m: m(torch.ones(2, 3, 4, dtype=torch.long)), r"input_ids must have shape \[B, N\]"),
        (lambda m: m(torch.full((2, 8), 500)), r"outside \[0, vocab_size=97\)"),
        (lambda m: m(ids(n=8), attention_mask=torch.ones(2, 9, dtype=torch.bool)), r"must be \[B=2, N=8\]"),
        (lambda m: m(ids(n=8), attention_mask=torch.ones(2, 1, 5, 8, dtype=torch.bool)), r"does not broadcast"),
        (lambda m: m(ids(n=8), attention_mask=torch.ones(2, 8)), r"must be bool"),
        (lambda m: m(ids(n=8), attention_mask=torch.zeros(2, 8, dtype=torch.bool)), r"no real token"),
        (lambda m: m(ids(n=8), labels=torch.zeros(2, dtype=torch.long)), r"labels must have shape \[B, N\]"),
    ],
)
def test_bad_input_raises_before_compute(call, message):
    with pytest.raises(ValueError, match=message):
        call(build("sdpa", "decoder"))


# ---- the seed API -----------------------------------------------------------------------

def test_seed_api_call_matches_model_card():
    model = AdvancedTransformer(num_layers=2, hidden_size=64, num_heads=4, ff_dim=256, max_seq_length=128,
                                use_sparse_attention=False, use_linformer=False,
                                device_config={"device": "cpu", "precision": "fp32", "memory_threshold": 0.9}).eval()
    x = torch.randn(2, 16, 64)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 12:] = False
    output, attention_weights = model(hidden_states=x, attention_mask=mask, head_mask=None)
    assert output.shape == (2, 16, 64) and attention_weights is None
    again, weights = model(hidden_states=x, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(again, output, **TOL)
    assert len(weights) == 2 and weights[0].shape == (2, 4, 16, 16)
    assert weights[0][1, :, :, 12:].abs().max() == 0  # padded keys get no weight


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(device_config={"devcie": "cpu"}), r"device_config: unknown key\(s\) \['devcie'\]"),
        (dict(device_config={"memory_threshold": 2}), r"memory_threshold"),
        (dict(hidden_size=30), r"divisible by num_heads"),
    ],
)
def test_seed_api_validation(kwargs, message):
    base = dict(num_layers=1, hidden_size=32, num_heads=4, ff_dim=64, max_seq_length=32,
                use_sparse_attention=False, use_linformer=False)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        AdvancedTransformer(**base)


def test_seed_api_bad_inputs():
    model = AdvancedTransformer(num_layers=1, hidden_size=32, num_heads=4, ff_dim=64, max_seq_length=32,
                                use_sparse_attention=False, use_linformer=False)
    with pytest.raises(ValueError, match=r"hidden_states must be a float tensor \[B, N, hidden_size=32\]"):
        model(hidden_states=torch.randn(2, 8, 16))
    with pytest.raises(ValueError, match="must be floating point"):
        model(hidden_states=torch.ones(2, 8, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_seq_length=32"):
        model(hidden_states=torch.randn(1, 33, 32))


@pytest.mark.parametrize("sparse, linformer, kernel", [(True, True, "hybrid"), (True, False, "block_sparse"),
                                                        (False, True, "linformer")])
def test_seed_flags_select_real_kernels_and_weights_are_theirs(sparse, linformer, kernel):
    model = AdvancedTransformer(num_layers=2, hidden_size=32, num_heads=4, ff_dim=64, max_seq_length=64,
                                use_sparse_attention=sparse, use_linformer=linformer).eval()
    assert model.config.attention.kernel == kernel
    out, weights = model(hidden_states=torch.randn(1, 48, 32), output_attentions=True)
    assert out.shape == (1, 48, 32) and len(weights) == 2
    for w in weights:
        assert w.shape[:2] == (1, 4) and torch.isfinite(w).all()
