"""Linformer attention: identity equivalence with dense attention, padding invariance,
adaptive k, sharing modes and their parameter counts, and the causal config error."""

from __future__ import annotations

import math

import pytest
import torch

from omninet.attention import KERNELS
from omninet.attention.dense import eager_attention, sdpa_attention
from omninet.attention.linformer import LinformerProjection, linformer_attention
from omninet.config import AttentionConfig, LinformerConfig, ModelConfig, PositionConfig
from omninet.model import OmniNetModel


def config(**linformer) -> ModelConfig:
    lin = dict(k=64, min_seq_length=0)
    lin.update(linformer)
    return ModelConfig(arch="encoder", vocab_size=100, hidden_size=32, num_heads=2, num_layers=3, max_seq_length=128,
                       dropout=0.0, attention=AttentionConfig(kernel="linformer", linformer=LinformerConfig(**lin)))


def state(**linformer) -> LinformerProjection:
    return KERNELS["linformer"].make_state(config(**linformer), 0, False)


def qkv(n, *, b=2, h=2, d=16, nq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, nq or n, d, generator=g), torch.randn(b, h, n, d, generator=g),
            torch.randn(b, h, n, d, generator=g))


@pytest.mark.parametrize("sharing", ["headwise", "kv", "layerwise"])
def test_identity_projection_with_k_at_least_n_equals_dense(sharing):
    st = state(k=128, sharing=sharing).set_identity_()
    for n in (40, 100, 128):
        q, k, v = (t.requires_grad_() for t in qkv(n))
        out, _ = linformer_attention(q, k, v, scale=0.25, state=st)
        ref, _ = eager_attention(q, k, v, scale=0.25)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_identity_equivalence_holds_with_padding():
    st = state(k=128).set_identity_()
    q, k, v = qkv(90)
    pad = torch.ones(2, 1, 1, 90, dtype=torch.bool)
    pad[0, ..., 60:] = False
    out, _ = linformer_attention(q, k, v, mask=pad, scale=0.25, state=st)
    torch.testing.assert_close(out, eager_attention(q, k, v, mask=pad, scale=0.25)[0], rtol=1e-5, atol=1e-5)


def test_padded_positions_contribute_nothing():
    st = state(k=16)  # learned (random) projections, k < real length
    q, k, v = qkv(100)
    pad = torch.ones(2, 1, 1, 100, dtype=torch.bool)
    pad[:, ..., 70:] = False
    out, _ = linformer_attention(q, k, v, mask=pad, scale=0.25, state=st)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 70:] = torch.randn_like(k2[:, :, 70:]) * 10
    v2[:, :, 70:] = torch.randn_like(v2[:, :, 70:]) * 10
    out2, _ = linformer_attention(q, k2, v2, mask=pad, scale=0.25, state=st)
    torch.testing.assert_close(out, out2)
    # and the padded sequence equals its unpadded self (same k)
    short, _ = linformer_attention(q, k[:, :, :70], v[:, :, :70], scale=0.25, state=st)
    torch.testing.assert_close(out, short, rtol=1e-5, atol=1e-5)


def test_adaptive_k():
    st = state(k=48, adaptive=True, compression=4)
    assert [st.rank(n) for n in (1, 10, 100, 128)] == [1, 3, 25, 32]
    st = state(k=20, adaptive=True, compression=2)
    assert [st.rank(n) for n in (10, 40, 100)] == [5, 20, 20]
    fixed = state(k=48)
    assert [fixed.rank(n) for n in (10, 100)] == [10, 48]  # never more rows than keys
    q, k, v = qkv(100)
    out, w = linformer_attention(q, k, v, scale=0.25, state=state(k=48, adaptive=True), need_weights=True)
    assert out.shape == q.shape and w.shape == (2, 2, 100, 100)
    torch.testing.assert_close(w @ v, out, rtol=1e-4, atol=1e-5)  # the effective weights reproduce the output


def test_any_length_up_to_max_seq_length():
    st = state(k=32)
    for n in (1, 7, 33, 128):
        q, k, v = qkv(n)
        out, _ = linformer_attention(q, k, v, scale=0.25, state=st)
        assert out.shape == q.shape and torch.isfinite(out).all()
    q, k, v = qkv(129)
    with pytest.raises(ValueError, match="max_seq_length"):
        linformer_attention(q, k, v, scale=0.25, state=st)


def test_sharing_modes_parameter_counts():
    n_max, k, layers = 128, 24, 3
    base = OmniNetModel(config().replace(attention=AttentionConfig(kernel="sdpa"))).num_parameters()
    extra = {s: OmniNetModel(config(k=k, sharing=s)).num_parameters() - base for s in ("headwise", "kv", "layerwise")}
    assert extra == {"headwise": layers * 2 * k * n_max, "kv": layers * k * n_max, "layerwise": k * n_max}
    model = OmniNetModel(config(k=k, sharing="layerwise"))
    states = [b.attn.kernel_state for b in model.encoder.blocks]
    assert states[0] is states[1] is states[2]
    other = OmniNetModel(model.config)  # a second model from the same config gets its own projection
    assert other.encoder.blocks[0].attn.kernel_state is not states[0]
    assert other.encoder.blocks[2].attn.kernel_state is other.encoder.blocks[0].attn.kernel_state


def test_designated_layers_only():
    model = OmniNetModel(config(layers=[2]))
    assert [b.attn.kernel_state is not None for b in model.encoder.blocks] == [False, False, True]
    with pytest.raises(ValueError, match="out of range"):
        OmniNetModel(config(layers=[5]))
    with pytest.raises(ValueError, match="distinct"):
        LinformerConfig(layers=[1, 1])


def test_short_inputs_use_dense_attention():
    st = state(k=8, min_seq_length=64)
    q, k, v = qkv(64)
    out, _ = linformer_attention(q, k, v, scale=0.25, state=st)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, scale=0.25)[0])
    q, k, v = qkv(65)
    out, _ = linformer_attention(q, k, v, scale=0.25, state=st)
    assert not torch.allclose(out, sdpa_attention(q, k, v, scale=0.25)[0], atol=1e-3)


def test_causal_is_an_error():
    with pytest.raises(ValueError, match="Linformer cannot be causal"):
        config().replace(arch="decoder")
    with pytest.raises(ValueError, match="Linformer cannot be causal"):
        ModelConfig(arch="encoder_decoder", attention=AttentionConfig(kernel="linformer"))
    q, k, v = qkv(32)
    with pytest.raises(ValueError, match="cannot be causal"):
        linformer_attention(q, k, v, causal=True, scale=0.25, state=state())
    with pytest.raises(ValueError, match="per-pair position biases"):
        config().replace(position=PositionConfig(kind="alibi"))
    with pytest.raises(ValueError, match="key-padding masks"):
        linformer_attention(q, k, v, mask=torch.ones(32, 32, dtype=torch.bool), scale=0.25, state=state())


def test_model_trains_and_padding_is_respected():
    cfg = config(k=16)
    model = OmniNetModel(cfg.replace(num_classes=3))
    ids = torch.randint(1, 100, (2, 50))
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 30:] = False
    out = model(ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    lin = model.encoder.blocks[0].attn.kernel_state
    assert lin.E.grad is not None and lin.E.grad[:, 50:].abs().sum() == 0  # columns beyond N are unused
    ids2 = ids.clone()
    ids2[1, 30:] = 7  # change only padded tokens
    model.eval()
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(ids2, attention_mask=mask).logits
    torch.testing.assert_close(a, b)


def test_cross_attention_uses_dense_state():
    cfg = config()
    assert KERNELS["linformer"].make_state(cfg, 0, True) is None
    assert math.isclose(state(k=64).E.std().item(), math.sqrt(2 / (64 + 128)), rel_tol=0.2)
