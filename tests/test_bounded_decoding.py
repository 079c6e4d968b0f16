"""Bounded sparse decoding (issue 32 item 3): the sink + window layout, its ring-buffer KV
cache, and the KV term of the memory model.

A ``sink_window`` decoder's cached greedy decoding must equal its full forward under the same
layout across evictions (every position kind, batch > 1, grouped K/V, reorder), hold exactly the
keys its next query sees, and keep its memory flat however long it generates."""

from __future__ import annotations

import pytest
import torch

from omninet.attention.block_sparse import BlockSparseLayout
from omninet.attention.block_sparse.ring import CacheWindow
from omninet.config import BlockSparseConfig, ModelConfig
from omninet.hardware.memory import memory_breakdown
from omninet.model import KVCache, OmniNetModel, kv_cache_bytes

BS, SINKS, WINDOW = 16, 1, 2  # a ring of (1 + 2) * 16 = 48 slots


def _config(kind="rotary", *, kv_heads=None, max_len=512, pattern="sink_window", kernel="block_sparse"):
    return ModelConfig(arch="decoder", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                       max_seq_length=max_len, dropout=0.0, position={"kind": kind},
                       attention={"kernel": kernel, "block_sparse": {"block_size": BS, "pattern": pattern,
                                                                     "window_blocks": WINDOW, "sink_blocks": SINKS}})


def _model(kind="rotary", **kw):
    torch.manual_seed(0)
    return OmniNetModel(_config(kind, **kw)).eval()


# ---- the layout -----------------------------------------------------------------------------
def test_config_refuses_what_the_pattern_cannot_mean():
    with pytest.raises(ValueError, match="window_blocks must be >= 1"):
        BlockSparseConfig(pattern="sink_window", window_blocks=0)
    with pytest.raises(ValueError, match="sink_blocks must be >= 0"):
        BlockSparseConfig(sink_blocks=-1)
    with pytest.raises(ValueError, match="causal pattern"):
        ModelConfig(arch="encoder", attention={"kernel": "block_sparse", "block_sparse": {"pattern": "sink_window"}})
    with pytest.raises(ValueError, match="one of 'proportional', 'sink_window'"):
        BlockSparseConfig(pattern="window")


def test_rows_are_sinks_plus_last_blocks_and_dense_exactly_until_they_are_all():
    layout = BlockSparseLayout(BlockSparseConfig(block_size=BS, pattern="sink_window", sink_blocks=2, window_blocks=3),
                               causal=True)
    rows = layout.rows(10, True)
    assert rows[0] == (0,) and rows[4] == (0, 1, 2, 3, 4)  # still every block before it: dense, no cut-over
    assert rows[5] == (0, 1, 3, 4, 5) and rows[9] == (0, 1, 7, 8, 9)
    assert layout.dense_below(5 * BS, True) and not layout.dense_below(5 * BS + 1, True)
    assert layout.cache_window == CacheWindow(sink=2 * BS, window_blocks=3, block_size=BS)


@pytest.mark.parametrize("n", [256, 1024])
def test_prefill_plan_computes_only_sink_and_window_keys(n):
    """The block-sparse kernel's plan lists, per query block, at most (sinks + window) blocks of
    keys: the prefill's work per query is fixed by w, not by N."""
    layout = BlockSparseLayout(BlockSparseConfig(block_size=BS, pattern="sink_window", sink_blocks=SINKS,
                                                 window_blocks=WINDOW), causal=True)
    plan = layout.plan(n, n, True, 1 << 30, 1 << 20, False)
    per_block = [sum(s.k1 - s.k0 for s in g.slabs) for g in plan.groups]
    assert max(per_block) == (SINKS + WINDOW) * BS
    assert sum(g.c for g in plan.groups) == n // BS  # every query block is computed


# ---- cached decoding equals the full forward ------------------------------------------------
def _decode_all(model, ids, prefill, chunk, reorder=None):
    """Logits (B, N, V) of ``ids`` through a cache: a prefill, one multi-token chunk, then one
    token per call; ``reorder`` (step, index) reverses the batch rows at that step."""
    cache = KVCache()
    with torch.no_grad():
        out = [model(ids[:, :prefill], cache=cache).logits, model(ids[:, prefill:chunk], cache=cache).logits]
        for t in range(chunk, ids.shape[1]):
            if reorder is not None and t == reorder[0]:
                cache.reorder(reorder[1])
                ids, out = ids[reorder[1]], [o[reorder[1]] for o in out]
            out.append(model(ids[:, t : t + 1], cache=cache).logits)
    return torch.cat(out, 1), ids, cache


@pytest.mark.parametrize("kind, kv_heads", [("rotary", None), ("rotary", 2), ("learned", 2), ("alibi", None),
                                            ("relative", 2)])
def test_cached_greedy_decoding_equals_full_forward_across_evictions(kind, kv_heads):
    model = _model(kind, kv_heads=kv_heads)
    ids = torch.randint(0, 97, (2, 120))  # 8 blocks through a 3-block ring: 5 evictions
    flip = torch.tensor([1, 0])
    got, ids, _ = _decode_all(model, ids, 21, 40, reorder=(90, flip))
    with torch.no_grad():
        full = model(ids).logits
    assert (got - full).abs().max() <= 1e-5
    # the layout is really sparse at this length: a dense model of the same weights differs
    dense = OmniNetModel(_config(kind, kv_heads=kv_heads, kernel="sdpa")).eval()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (dense(ids).logits - full).abs().max() > 1e-3


def test_greedy_generate_is_the_full_forwards_greedy_choice_at_every_step():
    model = _model("alibi")
    prompt = torch.randint(0, 97, (2, 30))
    out = model.generate(prompt, max_new_tokens=70, ignore_eos=True)  # 100 positions: 4 evictions
    with torch.no_grad():
        full = model(out).logits  # (B, N, V): position t's logits choose token t + 1
    assert torch.equal(full[:, 29:-1].argmax(-1), out[:, 30:])


# ---- the ring buffer ----------------------------------------------------------------------------
def test_ring_holds_exactly_the_keys_the_next_query_sees_after_each_eviction():
    model = _model("rotary", kv_heads=2)
    ids = torch.randint(0, 97, (2, 120))
    attn = model.decoder.blocks[0].attn
    with torch.no_grad():  # layer 0's keys after rotation, straight from the projections
        h = model.decoder.blocks[0].ln1(model.embed_tokens(ids))
        k = attn.qkv(h)[..., 4 * 8 :].view(2, 120, 2, 2, 8)[:, :, 0].transpose(1, 2)  # (B, Hk, N, D)
        k = model.decoder.rotary(k)
    window, cache = attn.cache_window, KVCache()
    with torch.no_grad():
        model(ids[:, :20], cache=cache)
        for t in range(20, 120):
            model(ids[:, t : t + 1], cache=cache)
            ring = cache.rings[0]
            if t % BS == 0:  # a block starts: the oldest window block was just evicted
                held = sorted(p for p in ring.pos.tolist() if p >= 0)
                assert held == list(range(SINKS * BS)) + list(range(window.start(t), t + 1))
                assert ring.visible.view(-1).tolist() == (ring.pos >= 0).tolist()
                for p in (0, window.start(t), t):
                    assert torch.allclose(ring.k[..., window.slot(p), :], k[..., p, :], atol=1e-6)
    assert cache.length(0) == 120 and ring.k.shape[-2] == window.capacity == (SINKS + WINDOW) * BS


def test_decode_step_reads_the_ring_without_building_a_mask():
    model = _model("rotary")
    cache = KVCache()
    ids = torch.randint(0, 97, (1, 100))
    with torch.no_grad():
        model(ids[:, :70], cache=cache)
        ring = cache.rings[1]
        buffers = (ring.k.data_ptr(), ring.visible.data_ptr())
        seen = ring.attend(torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8))
    assert seen.mask is ring.visible and seen.k is ring.k  # the step's mask is the ring's own, kept in place
    assert (ring.k.data_ptr(), ring.visible.data_ptr()) == buffers


def test_crop_rewinds_within_a_block_and_refuses_past_an_eviction():
    model = _model("rotary")
    ids = torch.randint(0, 97, (1, 120))
    with torch.no_grad():
        cache = KVCache()
        model(ids[:, :100], cache=cache)
        ref = model(ids[:, 100:101], cache=cache).logits[:, -1]
        model(ids[:, 101:103], cache=cache)
        cache.crop(100)  # same block as 102: nothing evicted in between
        again = model(ids[:, 100:101], cache=cache).logits[:, -1]
        assert (again - ref).abs().max() <= 1e-5
        model(ids[:, 101:115], cache=cache)  # block 7 starts at 112: block 5 (80..95) is evicted
        with pytest.raises(ValueError, match="evicted"):
            cache.crop(100)


def test_bounded_cache_refuses_padding_masks():
    model = _model("rotary")
    ids = torch.randint(0, 97, (2, 80))
    mask = torch.ones(2, 80, dtype=torch.bool)
    mask[0, :5] = False
    with torch.no_grad(), pytest.raises(ValueError, match="unpadded"):
        model(ids, attention_mask=mask, cache=KVCache())


# ---- memory ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_kv_formula_equals_measured_bytes_and_stays_flat(kv_heads):
    model = _model("rotary", kv_heads=kv_heads)
    cfg = model.config
    ids = torch.randint(0, 97, (2, 150))
    cache = KVCache()
    allocated = set()
    with torch.no_grad():
        model(ids[:, :30], cache=cache)
        assert cache.nbytes() == kv_cache_bytes(cfg, 2, 30)  # below the ring's capacity: the slots written
        for t in range(30, 150):
            model(ids[:, t : t + 1], cache=cache)
            allocated.add(cache.allocated_bytes())
            if t in (100, 149):
                assert cache.nbytes() == kv_cache_bytes(cfg, 2, t + 1)
    ring_tokens = (SINKS + WINDOW) * BS
    assert allocated == {kv_cache_bytes(cfg, 2, 10_000)}  # the same bytes from the first token to the last
    assert kv_cache_bytes(cfg, 2, 10_000) == 2 * 2 * 2 * (kv_heads or 4) * 8 * 4 * ring_tokens
    dense = _config("rotary", kv_heads=kv_heads, pattern="proportional")
    assert kv_cache_bytes(dense, 2, 10_000) == 2 * 2 * 2 * (kv_heads or 4) * 8 * 4 * 10_000


def test_memory_model_has_the_kv_term():
    bounded, dense = _config(), _config(pattern="proportional")
    kv = lambda c, n: memory_breakdown(c, batch_size=1, seq_len=64, kv_tokens=n)["kv_cache"]  # noqa: E731
    assert kv(bounded, 1024) == kv(bounded, 65536) == kv_cache_bytes(bounded, 1, 64)
    assert kv(dense, 65536) == 64 * kv(dense, 1024)
    assert "kv_cache" not in memory_breakdown(dense, batch_size=1, seq_len=64)
    with pytest.raises(ValueError, match="kv_tokens"):
        memory_breakdown(dense, batch_size=1, seq_len=64, kv_tokens=8, training=True)


# ---- generation ----------------------------------------------------------------------------------
def test_fixed_length_generation_returns_exactly_the_asked_length():
    model = _model("rotary")
    prompt = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        first = model(prompt).logits[:, -1].argmax(-1)
    out = model.generate(prompt, max_new_tokens=75, eos_token_id=int(first[0]), ignore_eos=True)
    assert out.shape == (2, 30 + 75)


def test_rotary_generates_past_the_trained_length_with_flat_memory_and_learned_refuses():
    model = _model("rotary", max_len=64)
    cache = KVCache()
    ids = torch.randint(0, 97, (1, 40))
    sizes = set()
    with torch.no_grad():
        nxt = model(ids, cache=cache).logits[:, -1:].argmax(-1)
        for _ in range(200):  # 3.75x the trained length
            nxt = model(nxt, cache=cache).logits[:, -1:].argmax(-1)
            sizes.add(cache.allocated_bytes())
    assert cache.length(0) == 240 and len(sizes) == 1 and torch.isfinite(model(nxt, cache=cache).logits).all()
    learned = _model("learned", max_len=64)
    with torch.no_grad(), pytest.raises(ValueError, match="exceeds max_seq_length=64 of learned positions"):
        learned.generate(ids, max_new_tokens=40, ignore_eos=True)
