"""Conformance suite: every registered attention kernel, against the eager reference.

New kernels are enrolled automatically by registering (see tests/conformance.py).
"""

from __future__ import annotations

import pytest
import torch

from conformance import ALL_KERNELS, make_state, qkv, reference_mask
from omninet.attention import KERNELS
from omninet.positions import Alibi, RelativeBias
from omninet.config import ModelConfig, PositionConfig

EAGER = KERNELS["eager"].fn
TOL = dict(rtol=1e-5, atol=1e-5)


def run(kernel, q, k, v, state, **kw):
    kw.setdefault("scale", q.shape[-1] ** -0.5)
    return KERNELS[kernel].fn(q, k, v, state=state, **kw)[0]


def reference(kernel, q, k, v, state, *, mask=None, causal=False, bias=None):
    layout = getattr(state, "sparse", state)  # hybrid's block-sparse layers run its BlockSparseLayout
    if hasattr(layout, "equivalent_mask") and not (hasattr(state, "uses_linformer") and
                                                    state.uses_linformer(k.shape[-2], causal)):
        # block-sparse layouts: mask & layout, minus query blocks that are all padding (zeros)
        mask = layout.equivalent_mask(mask, q.shape[-2], k.shape[-2], causal=causal)
    else:
        dense = reference_mask(state, q.shape[-2], k.shape[-2])
        if dense is not None:
            mask = dense if mask is None else mask & dense
    return EAGER(q, k, v, mask=mask, bias=bias, causal=causal, scale=q.shape[-1] ** -0.5)[0]


def exact_kernels():
    return [k for k in ALL_KERNELS if KERNELS[k].exact]


def position_bias(kind: str, causal: bool):
    cfg = ModelConfig(hidden_size=32, num_heads=4, num_layers=1, position=PositionConfig(kind=kind))
    torch.manual_seed(0)
    module = RelativeBias(cfg, causal=causal) if kind == "relative" else Alibi(cfg)
    if kind == "relative":
        torch.nn.init.normal_(module.table.weight)
    return module


@pytest.mark.parametrize("kernel", exact_kernels())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias_kind", [None, "relative", "alibi"])
def test_matches_eager_values_and_gradients(kernel, causal, bias_kind):
    spec = KERNELS[kernel]
    if (causal and not spec.supports_causal) or (bias_kind and not spec.supports_bias):
        pytest.skip(f"{kernel} does not support this combination (declared in its registration)")
    state = make_state(kernel, causal=causal)
    bias = position_bias(bias_kind, causal) if bias_kind else None
    q, k, v = qkv(nq=80, nk=80)
    pad = torch.ones(2, 1, 1, 80, dtype=torch.bool)
    pad[1, ..., 70:] = False
    out = run(kernel, q, k, v, state, mask=pad, causal=causal, bias=bias)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = reference(kernel, q2, k2, v2, state, mask=pad, causal=causal, bias=bias)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, **TOL)


@pytest.mark.parametrize("kernel", exact_kernels())
@pytest.mark.parametrize("causal", [False, True])
def test_padded_batch_matches_eager(kernel, causal):
    """A bucket of padded rows (the trial runner's and the server's batches): one full row, one
    whose last query blocks are all padding, one cut inside a block; values and gradients."""
    spec = KERNELS[kernel]
    if causal and not spec.supports_causal:
        pytest.skip(f"{kernel} does not run causal attention (declared in its registration)")
    state = make_state(kernel, causal=causal)
    n = 100
    q, k, v = qkv(b=3, nq=n, nk=n)
    pad = (torch.arange(n)[None, :] < torch.tensor([[n], [40], [75]]))[:, None, None, :]
    out = run(kernel, q, k, v, state, mask=pad, causal=causal)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = reference(kernel, q2, k2, v2, state, mask=pad, causal=causal)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, **TOL)


@pytest.mark.parametrize("kernel", [k for k in ALL_KERNELS if KERNELS[k].supports_causal])
def test_causality(kernel):
    state = make_state(kernel, causal=True)
    q, k, v = qkv(nq=64, nk=64, requires_grad=False)
    out = run(kernel, q, k, v, state, causal=True)
    t = 37
    k2, v2 = k.clone(), v.clone()
    k2[..., t + 1 :, :] += torch.randn_like(k2[..., t + 1 :, :])
    v2[..., t + 1 :, :] += torch.randn_like(v2[..., t + 1 :, :])
    out2 = run(kernel, q, k2, v2, state, causal=True)
    torch.testing.assert_close(out[..., : t + 1, :], out2[..., : t + 1, :], **TOL)
    assert not torch.allclose(out[..., t + 1 :, :], out2[..., t + 1 :, :])


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_padding_is_respected(kernel):
    state = make_state(kernel)
    q, k, v = qkv(nq=64, nk=64, requires_grad=False)
    pad = torch.ones(2, 1, 1, 64, dtype=torch.bool)
    pad[:, ..., 50:] = False
    out = run(kernel, q, k, v, state, mask=pad)
    k2, v2 = k.clone(), v.clone()
    k2[..., 50:, :] = torch.randn_like(k2[..., 50:, :]) * 5
    v2[..., 50:, :] = torch.randn_like(v2[..., 50:, :]) * 5
    torch.testing.assert_close(out, run(kernel, q, k2, v2, state, mask=pad), **TOL)


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_rows_without_visible_keys_are_zero_and_gradients_finite(kernel):
    state = make_state(kernel)
    q, k, v = qkv(nq=32, nk=32)
    mask = torch.ones(2, 1, 32, 32, dtype=torch.bool)
    mask[0, :, 5] = False  # query 5 of sequence 0 sees nothing
    # Low-rank kernels take padding masks only; block-sparse layouts (and hybrid's block-sparse
    # layers, such as layer 0) take general masks.
    general = KERNELS[kernel].exact or (hasattr(state, "uses_linformer") and not state.uses_linformer(32, False))
    if not general:
        mask = torch.ones(2, 1, 1, 32, dtype=torch.bool)
    out = run(kernel, q, k, v, state, mask=mask)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    if mask.shape[-2] == 32:
        assert out[0, :, 5].abs().max() == 0


@pytest.mark.parametrize("kernel", ALL_KERNELS)
def test_deterministic(kernel):
    state = make_state(kernel)
    q, k, v = qkv(requires_grad=False)
    torch.testing.assert_close(run(kernel, q, k, v, state), run(kernel, q, k, v, state), rtol=0, atol=0)


def test_cached_decoding_alignment_is_bottom_right():
    """A single query against a longer key set (KV cache) sees every key when causal."""
    q, k, v = qkv(nq=1, nk=20, requires_grad=False)
    full = EAGER(q, k, v, causal=False, scale=0.25)[0]
    for name in exact_kernels():
        state = make_state(name, causal=True)
        if KERNELS[name].supports_causal and reference_mask(state, 1, 20) is None:
            torch.testing.assert_close(run(name, q, k, v, state, causal=True), full, **TOL)


def test_need_weights_from_eager_sum_to_one():
    q, k, v = qkv(requires_grad=False)
    out, w = EAGER(q, k, v, scale=0.25, need_weights=True, causal=True)
    assert w.shape == (2, 4, 64, 64)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 64))
    assert w.triu(1).abs().max() == 0
