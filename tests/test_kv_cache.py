"""The preallocated KV cache: cached greedy decoding equals the full forward, the buffer grows
in chunks (not every step), reorder(), generation's fixed-length mode and last-position
prefill, and the KV bytes against ``kv_cache_bytes``."""

from __future__ import annotations

import pytest
import torch

from conformance import small_config
from omninet import OmniNetModel
from omninet.model import KVCache, kv_cache_bytes

MAX_DIFF = 1e-5


def build(position="rotary", arch="decoder", seed=0, **kw):
    torch.manual_seed(seed)
    return OmniNetModel(small_config("sdpa", arch=arch, position=position, **kw)).eval()


def ids(b=3, n=9, seed=1):
    return torch.randint(1, 97, (b, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_cached(model, prompt, steps, cache):
    """Greedy decoding through ``cache``; returns the ids and the logits of each new position (B, steps, V)."""
    logits = [model(prompt, cache=cache, logits_to_keep=1).logits]
    seq = prompt
    for _ in range(steps):
        seq = torch.cat([seq, logits[-1][:, -1].argmax(-1, keepdim=True)], dim=1)
        logits.append(model(seq[:, -1:], cache=cache).logits)
    return seq, torch.cat(logits[:-1], dim=1)


@pytest.mark.parametrize("position", ["rotary", "learned", "alibi", "relative"])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_cached_greedy_decoding_equals_full_forward(position, kv_heads):
    model = build(position, num_kv_heads=kv_heads)
    prompt = ids()
    cache = KVCache()  # no capacity: grows by doubling across the decode (9 -> 18 -> 36 tokens)
    seq, cached = greedy_cached(model, prompt, 20, cache)
    with torch.no_grad():
        full = model(seq).logits[:, prompt.shape[1] - 1 : -1]  # the logits that chose each new token
    assert (cached - full).abs().max() <= MAX_DIFF
    assert cache.length(0) == seq.shape[1]


@pytest.mark.parametrize("position", ["rotary", "learned", "alibi"])
def test_reorder_keeps_the_selected_rows(position):
    model = build(position, num_kv_heads=2)
    prompt = ids(b=3)
    cache = KVCache(capacity=12)
    seq, _ = greedy_cached(model, prompt, 3, cache)
    keep = torch.tensor([2, 0])
    cache.reorder(keep)
    seq, more = seq[keep], ids(b=2, n=8, seed=5)
    with torch.no_grad():  # past the capacity (12): the reordered buffers grow too
        steps = [model(more[:, t : t + 1], cache=cache).logits for t in range(8)]
        full = model(torch.cat([seq, more], dim=1)).logits[:, seq.shape[1] :]
    assert (torch.cat(steps, dim=1) - full).abs().max() <= MAX_DIFF
    assert cache.self_kv[0][0].shape[0] == 2


def test_cross_attention_cache_is_kept_and_reordered():
    model = build("rotary", arch="encoder_decoder", num_kv_heads=2)
    x, tgt = ids(b=3, n=7), ids(b=3, n=6, seed=3)
    with torch.no_grad():
        full = model(x, decoder_input_ids=tgt).logits
        out = model(x, decoder_input_ids=tgt[:, :2], use_cache=True)
        out.cache.reorder(torch.tensor([1, 2]))
        steps = []
        for t in range(2, 6):
            steps.append(model(decoder_input_ids=tgt[1:, t : t + 1], encoder_hidden_states=out.encoder_hidden_states[1:],
                               cache=out.cache).logits)
    assert (torch.cat(steps, dim=1) - full[1:, 2:]).abs().max() <= MAX_DIFF
    assert out.cache.nbytes() == kv_cache_bytes(model.config, 2, 6, memory_tokens=7)


def test_buffer_is_written_in_place_between_growth_points():
    model = build("rotary")
    layers = model.config.num_layers
    cache = KVCache()
    with torch.no_grad():
        model(ids(b=2, n=5), cache=cache)
        ptrs, allocs = [], []
        for t in range(35):
            model(ids(b=2, n=1, seed=t), cache=cache)
            ptrs.append(cache.self_kv[0][0].data_ptr())
            allocs.append(cache.allocations)
    # room for 5 -> 10 -> 20 -> 40 tokens: three growths over 35 steps, each of every layer's buffer
    assert cache.allocations == 4 * layers
    grown = [i for i in range(1, 35) if allocs[i] != allocs[i - 1]]
    assert len(grown) == 2 and allocs[0] == 2 * layers  # the first step grew 5 -> 10
    assert all(ptrs[i] == ptrs[i - 1] for i in range(1, 35) if i not in grown)
    sized = KVCache(capacity=40)  # sized up front (generate: prompt + max_new_tokens): one allocation per layer
    with torch.no_grad():
        model(ids(b=2, n=5), cache=sized)
        for t in range(35):
            model(ids(b=2, n=1, seed=t), cache=sized)
    assert sized.allocations == layers and sized.allocated_bytes() == sized.nbytes()


def test_generate_fixed_length_and_last_position_prefill():
    model = build("alibi")
    x = ids(b=1, n=6)
    greedy = model.generate(x, max_new_tokens=8)
    eos = int(greedy[0, 7])  # a token the greedy run emits: with EOS it would stop there
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    fixed = model.generate(x, max_new_tokens=8, eos_token_id=eos, ignore_eos=True)
    hook.remove()
    assert fixed.shape == (1, 6 + 8) and torch.equal(fixed, greedy)
    assert seen == [1] * 8  # the prefill formed one position's logits, not (B, N, V)
    assert model.generate(x, max_new_tokens=8, eos_token_id=eos).shape[1] < 14


def test_logits_to_keep():
    model = build("learned")
    x = ids()
    with torch.no_grad():
        full = model(x).logits
        assert (model(x, logits_to_keep=1).logits - full[:, -1:]).abs().max() <= MAX_DIFF  # a (B, 1, V) matmul may round differently
        assert torch.equal(model(x, logits_to_keep=0).logits, full)
    with pytest.raises(ValueError, match="logits_to_keep=0"):
        model(x, labels=x, logits_to_keep=1)
    with pytest.raises(ValueError, match="logits_to_keep must be"):
        model(x, logits_to_keep=-1)


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_equal_the_formula(kv_heads, dtype):
    model = build("rotary", num_kv_heads=kv_heads).to(dtype)
    cfg = model.config
    B, N, steps = 3, 9, 4
    cache = KVCache()
    greedy_cached(model, ids(b=B, n=N), steps, cache)
    tokens = N + steps
    k = cache.self_kv[0][0]
    assert k.dtype == dtype and k.shape == (B, cfg.kv_heads, tokens, cfg.head_dim)
    bytes_per = torch.empty((), dtype=dtype).element_size()
    assert cache.nbytes() == kv_cache_bytes(cfg, B, tokens, dtype) \
        == 2 * cfg.num_layers * B * cfg.kv_heads * tokens * cfg.head_dim * bytes_per


def test_kv_bytes_after_grouped_pruning():
    model = build("rotary", num_kv_heads=2)  # 4 query heads, groups {0, 1} and {2, 3}
    model.prune_heads({0: [0, 1], 1: [1]})  # layer 0 loses a whole group (one K/V head left), layer 1 none
    cache = KVCache()
    greedy_cached(model, ids(b=2, n=5), 2, cache)
    assert [cache.self_kv[i][0].shape[1] for i in range(2)] == [1, 2]
    assert cache.nbytes() == kv_cache_bytes(model.config, 2, 7)
    assert kv_cache_bytes(build("rotary", arch="encoder").config, 2, 7) == 0


def test_cache_under_autograd_keeps_gradients():
    model = build("rotary").train()
    x = ids(b=2, n=6)
    cache = KVCache()
    a = model(x[:, :4], cache=cache).logits
    b = model(x[:, 4:], cache=cache).logits
    (a.sum() + b.sum()).backward()  # earlier steps' K/V are not overwritten in place
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(torch.cat([a, b], 1), model(x).logits, rtol=1e-5, atol=1e-5)


def test_crop_decodes_again_from_the_same_prompt():
    model = build("rotary", num_kv_heads=2)
    prompt, more = ids(b=2, n=7), ids(b=2, n=3, seed=4)
    cache = KVCache(capacity=10)
    with torch.no_grad():
        model(prompt, cache=cache)
        first = model(more, cache=cache).logits
        ptr = cache.self_kv[0][0].data_ptr()
        cache.crop(7)
        again = model(more, cache=cache).logits
    assert cache.length(0) == 10 and cache.self_kv[0][0].data_ptr() == ptr and cache.allocations == 2
    assert torch.equal(first, again)


def test_logits_to_keep_behind_static_shape_buckets():
    from omninet.shapes import BucketedModel

    model = build("rotary")
    bucketed = BucketedModel(model, buckets=[16, 32])
    x = ids(b=2, n=11)  # padded to 16 inside
    with torch.no_grad():
        full = model(x).logits
        for keep in (1, 3, 11):
            got = bucketed(x, logits_to_keep=keep).logits
            assert got.shape == (2, keep, 97) and (got - full[:, -keep:]).abs().max() <= MAX_DIFF
