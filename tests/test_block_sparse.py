"""Block-sparse attention: layout properties and equality with the eager reference given the
equivalent dense mask (values and gradients), causality, padding, long inputs, the hybrid
kernel (the benchmark's smoke mode runs in tests/test_benchmarks.py)."""

from __future__ import annotations

import math

import pytest
import torch

from omninet.attention import KERNELS
from omninet.attention.block_sparse import BACKWARD_BUDGETS, BlockSparseLayout, block_sparse_attention
from omninet.attention.dense import eager_attention, sdpa_attention
from omninet.config import AttentionConfig, BlockSparseConfig, ModelConfig, PositionConfig
from omninet.positions import Alibi, RelativeBias


def layout(**overrides) -> BlockSparseLayout:
    cfg = dict(block_size=16, sparsity_factor=0.75, min_seq_length=0, random_blocks=1)
    cfg.update(overrides)
    return BlockSparseLayout(BlockSparseConfig(**cfg), layer_idx=0)


def qkv(nq, nk, *, b=2, h=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, nk, d, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def compare_with_eager(state, nq, nk, *, causal=False, mask=None, bias=None, b=2):
    """block_sparse(q, k, v, mask) == eager(q, k, v, equivalent_mask): mask & dense_mask, and for
    key padding minus the all-padding query blocks (zeros); values and grads."""
    q, k, v = qkv(nq, nk, b=b)
    scale = 0.25
    out, _ = block_sparse_attention(q, k, v, mask=mask, bias=bias, causal=causal, scale=scale, state=state)
    dm = state.equivalent_mask(mask, nq, nk, causal=causal)
    ref, _ = eager_attention(q.float(), k.float(), v.float(), mask=dm,
                             bias=None if bias is None else (lambda a, b: bias(a, b).float()), causal=causal, scale=scale)
    torch.testing.assert_close(out.float(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    g_out = torch.autograd.grad(out, (q, k, v), grad)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = eager_attention(qf, kf, vf, mask=dm,
                             bias=None if bias is None else (lambda a, b: bias(a, b).float()), causal=causal, scale=scale)
    g_ref = torch.autograd.grad(ref, (qf, kf, vf), grad.float())
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a.float(), b, rtol=1e-4, atol=1e-5)
    return dm


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [128, 200])  # a whole number of blocks, and not
def test_matches_eager_with_equivalent_mask(n, causal):
    dm = compare_with_eager(layout(), n, n, causal=causal)
    assert 0 < dm.float().mean() < (0.5 if causal else 0.9)  # really sparse


def test_density_one_equals_dense():
    state = layout(sparsity_factor=0.0)
    q, k, v = qkv(100, 100)
    for causal in (False, True):
        out, _ = block_sparse_attention(q, k, v, causal=causal, scale=0.25, state=state)
        ref, _ = sdpa_attention(q, k, v, causal=causal, scale=0.25)
        torch.testing.assert_close(out, ref)
        assert bool(state.dense_mask(100, 100, causal=causal).sum() == (5050 if causal else 10000))


def test_full_rows_at_tiny_sparsity_equal_dense():
    state = layout(sparsity_factor=0.01)  # ceil(0.99 * nb) == nb blocks per row
    q, k, v = qkv(64, 64)
    out, _ = block_sparse_attention(q, k, v, scale=0.25, state=state)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, scale=0.25)[0])


def test_padding_mask_and_general_mask_are_gathered():
    n = 150
    pad = torch.ones(2, 1, 1, n, dtype=torch.bool)
    pad[0, ..., 100:] = False
    pad[1, ..., :10] = False
    compare_with_eager(layout(), n, n, mask=pad)
    compare_with_eager(layout(), n, n, mask=pad, causal=True)
    general = torch.rand(2, 4, n, n, generator=torch.Generator().manual_seed(1)) > 0.6  # per head, per query
    compare_with_eager(layout(), n, n, mask=general)


def test_rows_left_without_keys_are_zero_and_finite():
    n = 64
    mask = torch.ones(2, 1, n, n, dtype=torch.bool)
    mask[:, :, 40:, :] = False  # these query rows see nothing
    q, k, v = qkv(n, n)
    out, _ = block_sparse_attention(q, k, v, mask=mask, scale=0.25, state=layout())
    assert torch.all(out[:, :, 40:] == 0)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("kind", ["relative", "alibi"])
def test_lazy_bias_per_gathered_block(kind):
    cfg = ModelConfig(num_heads=4, hidden_size=64, position=PositionConfig(kind=kind))
    source = (RelativeBias(cfg, causal=False) if kind == "relative" else Alibi(cfg)).double()
    calls = []

    def bias(q_pos, k_pos):
        calls.append((len(q_pos), len(k_pos)))
        return source(q_pos, k_pos)

    n = 160
    compare_with_eager(layout(), n, n, bias=source)
    q, k, v = qkv(n, n)
    state = layout()
    calls.clear()
    with torch.no_grad():
        block_sparse_attention(q, k, v, bias=bias, scale=0.25, state=state)
    # Per block of 16 queries against one slab (run of key blocks) of its keys: never the full
    # (N x N) bias, and every pair of the layout exactly once per sequence of the batch.
    assert all(c[0] <= 16 for c in calls) and sum(c[1] == n for c in calls) == q.shape[0]  # the global row
    assert sum(a * b for a, b in calls) == q.shape[0] * int(state.dense_mask(n, n, causal=False).sum())


def test_kv_cache_queries_match_the_full_sequence():
    """Nq < Nk (decoding against a cache): rows equal the last rows of the full computation."""
    state, n = layout(min_seq_length=40), 170
    q, k, v = qkv(n, n)
    full, _ = block_sparse_attention(q, k, v, causal=True, scale=0.25, state=state)
    for nq in (1, 7, 33):
        part, _ = block_sparse_attention(q[:, :, -nq:], k, v, causal=True, scale=0.25, state=state)
        torch.testing.assert_close(part, full[:, :, -nq:])
    compare_with_eager(state, 29, n, causal=True)


def test_causal_rows_do_not_depend_on_length():
    """A causal row's blocks depend on its index only, so cached decoding equals recomputation."""
    state = layout(random_blocks=2)
    short, long = state.block_layout(6, causal=True), state.block_layout(20, causal=True)
    assert torch.equal(long[:6, :6], short)


def test_causality():
    state, n = layout(), 180
    q, k, v = qkv(n, n)
    out, _ = block_sparse_attention(q, k, v, causal=True, scale=0.25, state=state)
    t = 97
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, t + 1 :] += 5.0
    v2[:, :, t + 1 :] -= 3.0
    out2, _ = block_sparse_attention(q, k2, v2, causal=True, scale=0.25, state=state)
    torch.testing.assert_close(out[:, :, : t + 1], out2[:, :, : t + 1])
    assert not torch.allclose(out[:, :, t + 1 :], out2[:, :, t + 1 :])


def test_layout_is_deterministic_and_seeded():
    a, b = layout(seed=3), layout(seed=3)
    for causal in (False, True):
        assert torch.equal(a.block_layout(32, causal), b.block_layout(32, causal))
    first = a.block_layout(32, False)
    q, k, v = qkv(512, 512, b=1, h=1)
    block_sparse_attention(q, k, v, scale=0.25, state=a)
    assert torch.equal(a.block_layout(32, False), first)  # not redrawn by a call
    other = BlockSparseLayout(BlockSparseConfig(block_size=16, sparsity_factor=0.75, min_seq_length=0, random_blocks=1,
                                                seed=3), layer_idx=5)
    assert not torch.equal(other.block_layout(32, False), first)  # another layer, another draw
    assert not torch.equal(layout(seed=4).block_layout(32, False), first)


@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.875, 0.95])
def test_density_and_coverage(sparsity):
    state = layout(sparsity_factor=sparsity, random_blocks=2, local_blocks=2)
    nb = 32
    blocks = state.block_layout(nb, causal=False)
    assert bool(blocks.diagonal().all()) and bool(blocks[:, 0].all())  # own block and the global block
    sparse_rows = blocks[1:]  # row 0 is a global row: it sees everything
    assert bool(blocks[0].all())
    assert torch.all(sparse_rows.sum(1) == max(1, math.ceil((1 - sparsity) * nb - 1e-9)))
    causal = state.block_layout(nb, causal=True)
    assert not bool(causal.triu(1).any()) and bool(causal.diagonal().all())
    for n in (33, 100, 300):  # every query row sees at least one key
        assert bool(state.dense_mask(n, n, causal=False).any(1).all())
        assert bool(state.dense_mask(n, n, causal=True).any(1).all())


def test_short_inputs_use_dense_attention():
    state = layout(min_seq_length=96)
    assert bool(state.dense_mask(96, 96, causal=False).all())
    assert not bool(state.dense_mask(97, 97, causal=False).all())
    q, k, v = qkv(96, 96)
    out, _ = block_sparse_attention(q, k, v, scale=0.25, state=state)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, scale=0.25)[0])
    dm = state.dense_mask(96, 96, causal=True)
    assert torch.equal(dm, torch.ones(96, 96, dtype=torch.bool).tril())


def test_need_weights_are_the_layout_weights():
    state, n = layout(), 96
    q, k, v = qkv(n, n)
    out, w = block_sparse_attention(q, k, v, scale=0.25, state=state, need_weights=True)
    assert w.shape == (2, 4, n, n)
    assert torch.all(w[..., ~state.dense_mask(n, n, causal=False)] == 0)
    torch.testing.assert_close(out.float(), block_sparse_attention(q, k, v, scale=0.25, state=state)[0].float())


def test_long_sequence_runs_forward():
    state = BlockSparseLayout(BlockSparseConfig(block_size=128, sparsity_factor=0.875, min_seq_length=0))
    n = 8192 + 77  # beyond 8192 and not a whole number of blocks
    q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
    with torch.no_grad():
        out, _ = block_sparse_attention(q, k, v, scale=0.25, state=state)
        out_c, _ = block_sparse_attention(q, k, v, scale=0.25, state=state, causal=True)
    assert out.shape == (1, 1, n, 16) and torch.isfinite(out).all() and torch.isfinite(out_c).all()
    # spot-check one query row against the dense computation on its visible keys
    i = 5000
    visible = state.dense_mask(n, n, causal=False)[i]
    ref = torch.softmax((q[0, 0, i] @ k[0, 0, visible].T) * 0.25, -1) @ v[0, 0, visible]
    torch.testing.assert_close(out[0, 0, i], ref, rtol=1e-4, atol=1e-5)


def test_kernel_errors():
    q, k, v = qkv(64, 64)
    with pytest.raises(ValueError, match="BlockSparseLayout"):
        block_sparse_attention(q, k, v, scale=0.25, state=None)
    with pytest.raises(ValueError, match="Nq <= Nk"):
        block_sparse_attention(q, k[:, :, :40], v[:, :, :40], scale=0.25, state=layout())
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseConfig(block_size=24)
    with pytest.raises(ValueError, match="sparsity_factor"):
        BlockSparseConfig(sparsity_factor=1.0)


def test_make_state_reads_the_model_config_and_cross_is_dense():
    cfg = ModelConfig(arch="encoder_decoder", hidden_size=64, num_heads=4, num_layers=1, attention=AttentionConfig(
        kernel="block_sparse", block_sparse=BlockSparseConfig(block_size=16, min_seq_length=0)))
    spec = KERNELS["block_sparse"]
    state = spec.make_state(cfg, 0, False)
    assert state.block_size == 16 and not state.cross
    cross = spec.make_state(cfg, 1, True)
    q, k, v = qkv(40, 70)
    out, _ = spec.fn(q, k, v, scale=0.25, state=cross)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, scale=0.25)[0])


def test_model_trains_with_block_sparse_attention():
    from omninet.model import OmniNetModel

    cfg = ModelConfig(arch="decoder", vocab_size=50, hidden_size=32, num_heads=2, num_layers=2, max_seq_length=128,
                      dropout=0.0, attention=AttentionConfig(kernel="block_sparse", block_sparse=BlockSparseConfig(
                          block_size=16, min_seq_length=32)))
    model = OmniNetModel(cfg)
    ids = torch.randint(0, 50, (2, 100))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # KV-cached decoding equals recomputing the prefix (the causal layout is length-independent)
    model.eval()
    with torch.no_grad():
        full = model(ids[:, :90]).logits
        from omninet.model import KVCache

        cache = KVCache()
        model(ids[:, :60], cache=cache)
        for t in range(60, 90):
            step = model(ids[:, t : t + 1], cache=cache).logits
        torch.testing.assert_close(step[:, -1], full[:, 89], rtol=1e-4, atol=1e-4)


# ---- hybrid (the seed's default) --------------------------------------------------------------
def test_hybrid_dispatch():
    from omninet.attention.hybrid import HybridState

    cfg = ModelConfig(arch="encoder", hidden_size=64, num_heads=4, num_layers=4, max_seq_length=256,
                      attention=AttentionConfig(kernel="hybrid", block_sparse=BlockSparseConfig(
                          block_size=16, min_seq_length=64)))
    spec = KERNELS["hybrid"]
    states = [spec.make_state(cfg, i, False) for i in range(4)]
    assert all(isinstance(s, HybridState) for s in states)
    assert [s.linformer is not None for s in states] == [False, True, False, True]  # odd layers
    # sparse layer above the threshold: the block-sparse layout
    assert not bool(states[0].dense_mask(200, 200, causal=False).all())
    # Linformer layer: with identity projections and k >= N it equals dense attention
    cfg_lin = cfg.replace(attention=cfg.attention.replace(linformer=cfg.attention.linformer.replace(min_seq_length=64)))
    lin_state = spec.make_state(cfg_lin, 1, False).set_identity_()
    q, k, v = (t.float() for t in qkv(200, 200))
    out, _ = spec.fn(q, k, v, scale=0.25, state=lin_state)
    torch.testing.assert_close(out, eager_attention(q, k, v, scale=0.25)[0], rtol=1e-5, atol=1e-5)
    # short inputs: dense
    assert bool(states[1].dense_mask(60, 60, causal=False).all())
    # decoders never use Linformer; relative positions disable it too
    assert spec.make_state(cfg.replace(arch="decoder"), 1, False).linformer is None
    assert spec.make_state(cfg.replace(position=PositionConfig(kind="alibi")), 1, False).linformer is None


def test_seed_flags_build_the_documented_kernels():
    from omninet.advanced import AdvancedTransformer

    for sparse, lin, kernel in [(True, False, "block_sparse"), (False, True, "linformer"), (True, True, "hybrid")]:
        model = AdvancedTransformer(num_layers=2, hidden_size=32, num_heads=2, ff_dim=64, max_seq_length=1200,
                                    use_sparse_attention=sparse, use_linformer=lin, dropout=0.0,
                                    device_config={"device": "cpu"})
        assert model.config.attention.kernel == kernel
        x = torch.randn(1, 1100, 32)
        out, weights = model(hidden_states=x)
        assert out.shape == x.shape and torch.isfinite(out).all() and weights is None


# ---- the benchmark's smoke mode: tests/test_benchmarks.py (run with the other smokes) ----------


# ---- the chunked path: slabs, log-sum-exp merges, the recomputing backward, memory -----------
def slab_budget(state, n_blocks, *, h=4, d=16, itemsize=8):
    """A chunk budget that cuts slabs at ``n_blocks`` key blocks (see block_sparse.plan._budget)."""
    state.chunk_bytes = (state.block_size + 2 * n_blocks * state.block_size) * h * d * itemsize
    return state


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_blocks", [1, 2, 3])
@pytest.mark.parametrize("nq, nk", [(128, 128), (200, 200), (37, 170), (7, 7)])
def test_chunk_boundaries_match_eager(n_blocks, nq, nk, causal):
    """Slabs cut at 1, 2, 3 key blocks (a query block's keys span several chunks and are merged
    by log-sum-exp), odd lengths, cached-decoding offsets, padding; values and gradients."""
    state = slab_budget(layout(random_blocks=2), n_blocks)
    pad = torch.ones(2, 1, 1, nk, dtype=torch.bool)
    pad[0, ..., nk * 2 // 3 :] = False
    for mask in (None, pad):
        compare_with_eager(state, nq, nk, causal=causal, mask=mask)


def test_tiny_input_below_the_global_rows_is_dense():
    """Regression: N below global_blocks * block_size and not a multiple of it crashed in _build_plan."""
    state = BlockSparseLayout(BlockSparseConfig(block_size=16, min_seq_length=0, global_blocks=1), causal=False)
    q = torch.randn(1, 2, 7, 8)
    out, _ = block_sparse_attention(q, q, q, scale=8**-0.5, state=state)
    torch.testing.assert_close(out, sdpa_attention(q, q, q, scale=8**-0.5)[0])


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    state = slab_budget(layout(sparsity_factor=0.5), 1, h=2, d=4)
    q, k, v = qkv(40, 40, b=1, h=2, d=4)
    pad = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    pad[..., 35:] = False
    for mask in (None, pad):
        fn = lambda q, k, v: block_sparse_attention(q, k, v, mask=mask, causal=causal, scale=0.5, state=state)[0]
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


def test_dropout_uses_the_same_mask_in_forward_and_backward():
    """Dropout redraws nothing in backward: with the seed fixed per call, the analytic gradient
    equals the numerical one (gradcheck), and the output differs from no dropout."""
    state = slab_budget(layout(sparsity_factor=0.5), 1, h=2, d=4)
    q, k, v = qkv(40, 40, b=1, h=2, d=4)

    def fn(q, k, v):
        torch.manual_seed(0)  # the call's dropout seed comes from the global generator
        return block_sparse_attention(q, k, v, causal=True, scale=0.5, dropout_p=0.3, state=state)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)
    plain = block_sparse_attention(q, k, v, causal=True, scale=0.5, state=state)[0]
    assert not torch.allclose(fn(q, k, v), plain)


def _matches_eager_in_float64(q, k, v, mask, state):
    """block_sparse(q, k, v, mask) == eager with the equivalent mask, values and gradients, for
    inputs as given (any strides), in float64."""
    n = q.shape[-2]
    out, _ = block_sparse_attention(q, k, v, mask=mask, scale=0.25, state=state)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qf, kf, vf = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref, _ = eager_attention(qf, kf, vf, mask=state.equivalent_mask(mask, n, n), scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for a, e in zip(got, torch.autograd.grad(ref, (qf, kf, vf), grad)):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_blocks", [None, 1])  # the default budget, and one cutting calls into single blocks
def test_gathered_groups_match_eager(monkeypatch, chunk_blocks):
    """Short rows (at most GATHER_MAX_BLOCKS key blocks) run as gathered calls in the forward: a
    group's slabs copied into one run of keys and the batch rows with the same group in one call,
    cut at the budget (the backward, on the slab path, reads the same lse); (B, N, H, D)-strided
    inputs like the model's, a padded row between two unpadded ones; values and gradients
    against eager."""
    import omninet.attention.block_sparse.executor as bs

    calls = []
    real = bs._gathered_calls
    monkeypatch.setattr(bs, "_gathered_calls", lambda *a: calls.append(a[:2]) or real(*a))
    state = layout(sparsity_factor=0.5, random_blocks=0)  # n=128: 8 blocks, 4 a row
    if chunk_blocks:
        state.chunk_bytes = 640 * 4 * 16 * 8  # 640 token rows: forward calls of one block (a quarter budget)
    b, h, n, d = 3, 4, 128, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, n, h, d, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
               for _ in range(3))
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    mask[1, ..., 100:] = False
    for m in (None, mask):
        calls.clear()
        _matches_eager_in_float64(q, k, v, m, state)
        # rows with the same group share calls, also where padding gives a row a plan of its own
        assert calls and any(n_rows > 1 for _, n_rows in calls)
        if m is not None:  # the groups that row 1's padding changed are its own
            assert any(b0 == 1 and n_rows == 1 for b0, n_rows in calls)


@pytest.mark.parametrize("strided", [False, True])  # (B, H, N, D) inputs, and (B, N, H, D)-strided like the model's
@pytest.mark.parametrize("small_budget", [False, True])  # the default budget, and one row per row-batched call
def test_row_batched_slabs_and_window_sums_match_eager(monkeypatch, strided, small_budget):
    """Slabs without a mask of their own that a group's blocks share (and one-block groups) run
    as one call for the batch rows that have the group; a sliding window's dk, dv are one index_add_;
    values and gradients against eager, with a padded row between two unpadded ones."""
    import omninet.attention.block_sparse.executor as bs
    import omninet.attention.block_sparse.plan as plan

    rows, windows = [], []
    real_span, real_index = bs._span, bs._window_index
    monkeypatch.setattr(plan, "TILE_ROWS", 16)  # block by block (tiles: test_tiled_sliding_windows_match_eager)
    monkeypatch.setattr(bs, "_span", lambda t, b, n, *a: rows.append(n) or real_span(t, b, n, *a))
    monkeypatch.setattr(bs, "_window_index", lambda *a: windows.append(a) or real_index(*a))
    state = layout(sparsity_factor=0.5, random_blocks=0)  # n=256: 16 blocks, 8 a row: global, shared and sliding slabs
    if small_budget:
        state.chunk_bytes = 300 * 4 * 16 * 8  # 300 token rows
    b, h, n, d = 3, 4, 256, 16
    g = torch.Generator().manual_seed(5)
    shape = (b, n, h, d) if strided else (b, h, n, d)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    q, k, v = ((t.transpose(1, 2) if strided else t).requires_grad_() for t in (q, k, v))
    mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
    mask[1, ..., 200:] = False
    for m in (None, mask):
        rows.clear(), windows.clear()
        _matches_eager_in_float64(q, k, v, m, state)
        assert windows  # the sliding window's gradient sums took the index_add_ path
        assert max(rows) == 3  # rows with the same group share calls (padding leaves row 1's first groups as they are)


@pytest.mark.slow  # 6-17 s each on 2 cores
@pytest.mark.parametrize("block_size,sparsity,strided", [(16, 0.5, False), (16, 0.5, True), (16, 0.75, False),
                                                         (32, 0.5, True)])  # strided: (B, N, H, D) like the model's
def test_tiled_sliding_windows_match_eager(monkeypatch, block_size, sparsity, strided):
    """Sliding groups run as tiles of several blocks against the union of their windows, each
    sub-block masked to its own window (``band``), with the blocks left over as a group of
    their own; dk, dv of the overlapping tiles are summed by index_add_ in gcd(L, step)-row
    units. Values and gradients against eager, with end padding on one row."""
    import omninet.attention.block_sparse.executor as bs
    from omninet.attention.block_sparse.plan import _budget

    windows = []
    real_index = bs._window_index
    monkeypatch.setattr(bs, "_window_index", lambda *a: windows.append(a) or real_index(*a))
    n, b, h, d = 1536 + 3 * block_size, 2, 4, 16  # windows of at least TILE_MIN_WINDOW blocks
    state = layout(block_size=block_size, sparsity_factor=sparsity, random_blocks=0)
    tokens, bwd_blocks = _budget(torch.zeros(b, h, n, d), block_size, state.chunk_bytes)
    plan = state.plan(n, n, False, 1 << 30, tokens, False)
    tiled = [g for g in plan.groups if any(s.band for s in g.slabs)]
    assert tiled and all(g.r > block_size for g in tiled)
    g = torch.Generator().manual_seed(11)
    shape = (b, n, h, d) if strided else (b, h, n, d)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    q, k, v = ((t.transpose(1, 2) if strided else t).requires_grad_() for t in (q, k, v))
    for m in (None, end_padding(b, n, [n, n - 300])):
        windows.clear()
        _matches_eager_in_float64(q, k, v, m, state)
        assert windows  # the tiles' overlapping dk, dv were summed by index_add_


@pytest.mark.parametrize("L,step", [(128, 32), (544, 64), (96, 64), (48, 16)])
def test_window_sums_in_gcd_units_equal_a_loop(L, step):
    """``_add_block_windows`` of c overlapping windows (a tiled window's L need not be a multiple
    of its step: units of gcd(L, step) rows) equals adding block by block."""
    from omninet.attention.block_sparse.executor import _add_block_windows, _grad_buffer
    from omninet.attention.block_sparse.plan import _Slab

    c, H, D, b, k0 = 5, 4, 16, 1, 16
    n = k0 + (c - 1) * step + L + 8
    dst = _grad_buffer(torch.zeros(2, H, n, D, dtype=torch.float64))
    src = torch.randn(c, L, H, D, dtype=torch.float64).transpose(1, 2)  # the flash kernel's (c, H, L, D) layout
    want = dst.clone()
    for j in range(c):
        want[b, :, k0 + j * step : k0 + j * step + L] += src[j]
    _add_block_windows(dst, b, _Slab(k0, k0 + L, step), c, src)
    torch.testing.assert_close(dst, want)


def _peak_extra_mb(state, n, *, grad, heads=4, d=32, mask=None):
    """Peak tensor memory of one call beyond its unavoidable O(N) tensors (output and
    log-sum-exp; with grad also dq, dk, dv and the backward's lse copy), in MB."""
    from omninet.trial.measure import peak_memory_mb

    q, k, v = (torch.randn(1, heads, n, d, requires_grad=grad) for _ in range(3))
    g = torch.randn_like(q)

    def run():
        with torch.set_grad_enabled(grad):
            out = block_sparse_attention(q, k, v, mask=mask, scale=0.125, state=state)[0]
            if grad:
                out.backward(g)

    run()
    token = heads * d * 4
    fixed = n * token + n * heads * 4 + (3 * n * token + n * heads * 4 if grad else 0)
    return peak_memory_mb(run) - fixed / 2**20


@pytest.mark.parametrize("padded", [False, True])  # no mask; 25% end padding (the staircase slabs of its windows)
@pytest.mark.parametrize("grad", [False, pytest.param(True, marks=pytest.mark.slow)])  # backward: ~10-30 s
def test_working_set_stays_bounded_as_n_grows(grad, padded):
    """Profiler memory timeline: at a fixed chunk budget and density the memory beyond the
    O(N) tensors does not grow with N (the old path gathered O(N * density * N) keys; the
    first staircase masks of end-padded rows grew with the window squared)."""
    budget = 256 * 1024 if not padded else 8 * 2**20  # padded: the default budget, where staircases are shared calls
    extra = []
    for n in (1024, 2048, 4096, 8192) if padded else (512, 1024, 2048, 4096):  # padded: until groups fill the budget
        state = BlockSparseLayout(BlockSparseConfig(block_size=16, sparsity_factor=0.5 if padded else 0.875,
                                                    min_seq_length=0))
        state.chunk_bytes = budget
        extra.append(_peak_extra_mb(state, n, grad=grad, mask=end_padding(1, n, [n - n // 4]) if padded else None))
    mb = budget / 2**20 * (BACKWARD_BUDGETS if grad else 1)  # a backward group may hold BACKWARD_BUDGETS budgets
    # Within the budget at every N, and flat over the last doubling of N (gathering O(N * density * N) keys
    # would double it).
    assert max(extra) <= 1.5 * mb and abs(extra[-1] - extra[-2]) <= 0.25 * mb, extra


def test_same_peak_on_first_and_tenth_call():
    """No persistent buffer: the 1st and the 10th call measure the same peak."""
    from omninet.trial.measure import peak_memory_mb

    state = BlockSparseLayout(BlockSparseConfig(block_size=16, sparsity_factor=0.75, min_seq_length=0))
    q, k, v = (torch.randn(1, 4, 1000, 32) for _ in range(3))
    run = lambda: block_sparse_attention(q, k, v, scale=0.125, state=state)
    with torch.no_grad():
        first = peak_memory_mb(run)
        for _ in range(8):
            run()
        tenth = peak_memory_mb(run)
    assert first == pytest.approx(tenth, rel=0.01) and first > 0


@pytest.mark.parametrize("causal", [False, True])
def test_consecutive_calls_of_other_sizes_and_layers_are_independent(causal):
    """Consecutive calls of different sizes and layers (plans cached per layer) each equal eager."""
    small, large = layout(), layout(block_size=32, sparsity_factor=0.5)
    with torch.no_grad():
        for state, n, seed in ((large, 256, 1), (small, 96, 2), (large, 160, 3), (small, 128, 4)):
            q, k, v = (t.float() for t in qkv(n, n, seed=seed))
            out, _ = block_sparse_attention(q, k, v, causal=causal, scale=0.25, state=state)
            ref, _ = eager_attention(q, k, v, mask=state.dense_mask(n, n, causal=causal), causal=causal, scale=0.25)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- key padding folded into the layout (issue 25) --------------------------------------------
def end_padding(b, n, lengths):
    mask = torch.zeros(b, 1, 1, n, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, ..., :length] = True
    return mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.875, 0.95])
def test_padded_rows_match_eager_at_every_sparsity_and_block(sparsity, block_size, causal):
    """End padding (lengths: a row whose last blocks are all padding, one whose length cuts a
    block), a hole and left padding (part-padding blocks under the key mask): values and grads
    against eager under ``equivalent_mask``, which zeroes the query blocks that are all padding."""
    n = 4 * block_size + 37
    state = layout(block_size=block_size, sparsity_factor=sparsity, random_blocks=1)
    lengths = end_padding(3, n, [n, n // 2 + 3, block_size + 1])
    holes = torch.ones(3, 1, 1, n, dtype=torch.bool)
    holes[0, ..., block_size // 2 : block_size + 5] = False  # part of block 0 and 1
    holes[1, ..., : 2 * block_size + 3] = False  # left padding: two whole blocks and a part
    holes[2, ..., n - 9 :] = False  # end padding, found without lengths
    for mask in (lengths, holes):
        dm = compare_with_eager(state, n, n, causal=causal, mask=mask, b=3)
        assert not bool(dm[1].all())
    dead = state.equivalent_mask(lengths, n, n, causal=causal)[2, 0].any(-1)  # (N,) rows computed
    assert not bool(dead[2 * block_size :].any()) and bool(dead[: block_size + 1].all())


@pytest.mark.parametrize("chunk_bytes", [None, 48 * 1024])  # the staircase as one shared call, and per block
@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_sliding_windows_across_a_rows_length_are_one_group_and_match_eager(sparsity, chunk_bytes):
    """A row's length cuts the sliding windows of its last blocks: they stay one group (the
    window's exact head slides, the rest is one staircase slab over real keys), values and
    grads match eager, and keys past the length are still never read (NaN there is harmless)."""
    from omninet.attention.block_sparse.padding import _row_padding
    from omninet.attention.block_sparse.plan import _budget

    n, bs = 16 * 24 + 5, 16
    state = layout(block_size=bs, sparsity_factor=sparsity, random_blocks=0)
    if chunk_bytes:
        state.chunk_bytes = chunk_bytes
    mask = end_padding(3, n, [n, 16 * 17 + 7, 16 * 13])
    pads = _row_padding(mask, 3, n, bs)
    tokens, _ = _budget(torch.zeros(3, 4, n, 16), bs, state.chunk_bytes)
    plan = state.plan(n, n, False, 1 << 30, tokens, False, pads[1])
    stairs = [g for g in plan.groups for s in g.slabs if s.stair]
    assert stairs and all(g.c > 1 for g in stairs)
    assert max(s.k1 for g in plan.groups for s in g.slabs) <= pads[1]
    compare_with_eager(state, n, n, mask=mask, b=3)
    q, k, v = qkv(n, n, b=3)
    out = block_sparse_attention(q, k, v, mask=mask, scale=0.25, state=state)[0]
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for row, length in ((1, 16 * 17 + 7), (2, 16 * 13)):
        k2[row, :, length:] = v2[row, :, length:] = float("nan")
    q2, k2, v2 = (t.requires_grad_() for t in (q2, k2, v2))
    out2 = block_sparse_attention(q2, k2, v2, mask=mask, scale=0.25, state=state)[0]
    torch.testing.assert_close(out2, out)
    for a, b in zip(torch.autograd.grad(out2, (q2, k2, v2), torch.ones_like(out)), grads):
        torch.testing.assert_close(a.nan_to_num(0.0), b)


def test_padding_is_never_read_and_dead_blocks_are_zero():
    """Keys and values past a row's length are not computed on (NaN there changes nothing) and
    query blocks that are all padding return zeros (NaN queries there stay out), both passes."""
    n, state = 200, layout(sparsity_factor=0.5)
    mask = end_padding(2, n, [n, 90])
    q, k, v = qkv(n, n)
    out = block_sparse_attention(q, k, v, mask=mask, scale=0.25, state=state)[0]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (k2, v2):
        t[1, :, 90:] = float("nan")
    q2[1, :, 96:] = float("nan")  # blocks 6.. are all padding (block 5 holds real rows 80-89)
    q2, k2, v2 = (t.requires_grad_() for t in (q2, k2, v2))
    out2 = block_sparse_attention(q2, k2, v2, mask=mask, scale=0.25, state=state)[0]
    torch.testing.assert_close(out2, out)
    assert bool((out2[1, :, 96:] == 0).all())
    for a, b in zip(torch.autograd.grad(out2, (q2, k2, v2), g), grads):
        torch.testing.assert_close(a, b)


def test_padding_skips_key_and_query_blocks_in_the_plan():
    """The plan of a padded row computes only its real blocks: fewer (query, key) pairs, in
    proportion, and its dead query blocks are listed, not planned."""
    from omninet.attention.block_sparse.padding import _row_padding
    from omninet.attention.block_sparse.plan import _budget

    n, state = 1024, layout(sparsity_factor=0.75, random_blocks=0)
    q = torch.randn(2, 4, n, 16)
    tokens, _ = _budget(q, 16, state.chunk_bytes)
    pads = _row_padding(end_padding(2, n, [n, 256]), 2, n, 16)
    assert pads == (None, 256)
    full, short = (state.plan(n, n, False, 1 << 30, tokens, False, p) for p in pads)

    def pairs(plan):
        return sum(g.c * g.r * (s.k1 - s.k0) for g in plan.groups for s in g.slabs)

    assert short.dead == ((256, n),) and not full.dead
    assert max(s.k1 for g in short.groups for s in g.slabs) <= 256
    assert pairs(short) < 0.3 * pairs(full)


def test_all_true_mask_is_no_mask():
    state, n = layout(), 160
    q, k, v = (t.float().detach() for t in qkv(n, n))
    plain = block_sparse_attention(q, k, v, scale=0.25, state=state)[0]
    ones = torch.ones(2, 1, 1, n, dtype=torch.bool)
    assert torch.equal(block_sparse_attention(q, k, v, mask=ones, scale=0.25, state=state)[0], plain)


def test_key_lengths_read_the_mask_as_it_is_now():
    """Lengths are read from the mask each time (no cache on the tensor): a mask changed in
    place reads anew."""
    from omninet.attention.block_sparse import key_lengths

    mask = end_padding(2, 50, [50, 20])
    assert key_lengths(mask) == (50, 20)
    assert "_omninet_key_lengths" not in mask.__dict__
    mask[1, ..., 30] = True  # a hole now: not end padding
    assert key_lengths(mask) is None


@pytest.mark.parametrize("lengths", [[120, 70], [120, 120]])  # end padding, and none (an all-True mask)
def test_key_padding_read_once_gives_the_same_call(lengths):
    """``KeyPadding.of(mask)`` passed as ``key_padding`` (what a model reads once per forward)
    gives bitwise what the kernel computes from the mask itself, values and gradients; a hole
    (left padding) has per-block classes instead of lengths; ``select`` keeps the rows it picks;
    a key_padding that does not describe the mask is refused."""
    from omninet.attention.block_sparse import KeyPadding

    n, state = 120, layout(sparsity_factor=0.5)
    mask = end_padding(2, n, lengths)
    padding = KeyPadding.of(mask)
    assert padding.lengths == tuple(lengths) and padding.keys.shape == (2, n)
    q, k, v = qkv(n, n)
    out = block_sparse_attention(q, k, v, mask=mask, scale=0.25, state=state)[0]
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    out2 = block_sparse_attention(q, k, v, mask=mask, scale=0.25, state=state, key_padding=padding)[0]
    assert torch.equal(out2, out)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out2.sum(), (q, k, v)), grads))
    hole = mask.clone()
    hole[1, ..., :20] = False
    assert KeyPadding.of(hole).lengths is None and KeyPadding.of(hole).row_padding(2, 16)[1][0] == 0
    picked = padding.select(torch.tensor([1]))
    assert picked.lengths == (lengths[1],) and torch.equal(picked.keys, mask[1:].reshape(1, n))
    with pytest.raises(ValueError, match="key_padding"):
        block_sparse_attention(q, k, v, scale=0.25, state=state, key_padding=padding)  # no mask
    with pytest.raises(ValueError, match="KeyPadding.of takes a key-padding mask"):
        KeyPadding.of(torch.ones(2, 4, n, n, dtype=torch.bool))


def test_model_drops_all_true_masks_and_passes_lengths_once():
    """OmniNetModel decides the kernels' mask once: None for an all-True mask (every kernel),
    and an end-padding mask reaches every layer with one ``KeyPadding`` read once (the same
    value in every layer, its lengths already computed)."""
    import dataclasses

    from omninet.model import OmniNetModel

    seen = []
    for kernel in ("sdpa", "block_sparse"):
        cfg = ModelConfig(arch="encoder", vocab_size=50, hidden_size=32, num_heads=2, num_layers=2, num_classes=3,
                          max_seq_length=128, dropout=0.0, attention=AttentionConfig(
                              kernel=kernel, block_sparse=BlockSparseConfig(block_size=16, min_seq_length=0)))
        torch.manual_seed(0)
        model = OmniNetModel(cfg).eval()
        for m in model.modules():
            if hasattr(m, "spec") and hasattr(m, "kernel_state"):
                fn = m.spec.fn

                def spy(*a, fn=fn, **kw):
                    seen.append(kw.get("key_padding"))
                    assert (kw.get("mask") is None) == (seen[-1] is None)
                    return fn(*a, **kw)

                m.spec = dataclasses.replace(m.spec, fn=spy)
        ids = torch.randint(0, 50, (2, 100))
        seen.clear()
        with torch.no_grad():
            a = model(ids, attention_mask=torch.ones(2, 100, dtype=torch.bool)).logits
            assert seen == [None, None]
            torch.testing.assert_close(a, model(ids).logits, rtol=0, atol=0)
            seen.clear()
            model(ids, attention_mask=torch.arange(100)[None, :] < torch.tensor([[100], [61]]))
        assert len(seen) == 2 and seen[0] is seen[1] and seen[0].lengths == (100, 61)
