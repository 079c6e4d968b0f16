"""Hugging Face checkpoints in and out, tested against transformers' own models on the same
weights: tiny random models of every family built from configs, offline."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the test oracle) is in the dev extra")

from omninet import OmniNetModel  # noqa: E402
from omninet.interop.hf import save_hf  # noqa: E402

TOL = 1e-4
V = 97


def _tiny(kind: str):
    t = transformers
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    if kind == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                              bos_token_id=0, eos_token_id=0))
    if kind == "llama":  # grouped K/V (4 query heads over 2 K/V heads), untied head, scaled rotary
        return t.LlamaForCausalLM(t.LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=False,
                                                max_position_embeddings=128, rope_theta=5000.0,
                                                rope_scaling={"rope_type": "linear", "factor": 2.0}))
    if kind == "qwen2":  # q/k/v biases, tied head
        return t.Qwen2ForCausalLM(t.Qwen2Config(**common, num_key_value_heads=1, tie_word_embeddings=True,
                                                max_position_embeddings=128))
    if kind == "bert":
        return t.BertForMaskedLM(t.BertConfig(**common, max_position_embeddings=64))
    if kind == "roberta":
        return t.RobertaForMaskedLM(t.RobertaConfig(**common, max_position_embeddings=66, pad_token_id=1))
    if kind == "bert_cls":
        return t.BertForSequenceClassification(t.BertConfig(**common, max_position_embeddings=64, num_labels=3))
    if kind == "roberta_cls":
        return t.RobertaForSequenceClassification(t.RobertaConfig(**common, max_position_embeddings=66, pad_token_id=1,
                                                                  num_labels=3))
    raise AssertionError(kind)


DECODERS = ("gpt2", "llama", "qwen2")
ENCODERS = ("bert", "roberta", "bert_cls", "roberta_cls")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's tiny random model, saved by transformers (weights randomized beyond
    their init so that biases and norms are not trivially 0 / 1)."""
    out = {}
    torch.manual_seed(0)
    for kind in DECODERS + ENCODERS:
        model = _tiny(kind).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        d = tmp_path_factory.mktemp(kind)
        model.save_pretrained(d)
        out[kind] = (model, d)
    return out


def _batch(kind):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding
    return ids, mask


def _ours_logits(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask.bool()).logits


def _theirs_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _with_kernel(model, kernel):
    if kernel == model.config.attention.kernel:
        return model
    other = OmniNetModel(model.config.replace(attention=model.config.attention.replace(kernel=kernel))).eval()
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", DECODERS + ENCODERS)
def test_imported_logits_equal_transformers(saved, kind, kernel):
    theirs, d = saved[kind]
    ours = _with_kernel(OmniNetModel.from_hf(d), kernel)
    ids, mask = _batch(kind)
    a, b = _ours_logits(ours, ids, mask), _theirs_logits(theirs, ids, mask)
    if a.dim() == 3:  # per token: compare real tokens (padding rows are whatever each library makes of them)
        real = mask.bool()
        assert (a[real] - b[real]).abs().max() <= TOL
        full = torch.ones_like(mask)
        assert (_ours_logits(ours, ids, full) - _theirs_logits(theirs, ids, full)).abs().max() <= TOL
    else:
        assert (a - b).abs().max() <= TOL


@pytest.mark.parametrize("kind", DECODERS)
def test_cached_decoding_step_equals_transformers(saved, kind):
    theirs, d = saved[kind]
    ours = OmniNetModel.from_hf(d)
    ids, _ = _batch(kind)
    prompt, nxt = ids[:, :10], ids[:, 10:11]
    with torch.no_grad():
        out = theirs(input_ids=prompt, use_cache=True)
        step_theirs = theirs(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True).logits
        o = ours(prompt, use_cache=True)
        step_ours = ours(nxt, cache=o.cache).logits
    assert (step_ours - step_theirs).abs().max() <= TOL
    if kind != "gpt2":  # the cache keeps the K/V heads only (grouped K/V: fewer than the query heads)
        k, _ = o.cache.self_kv[0]
        assert k.shape[1] == ours.config.kv_heads < ours.config.num_heads


@pytest.mark.parametrize("kind", DECODERS + ENCODERS)
def test_round_trip_through_save_hf(saved, kind, tmp_path):
    theirs, d = saved[kind]
    ours = OmniNetModel.from_hf(d)
    save_hf(ours, tmp_path / "out")
    back = type(theirs).from_pretrained(tmp_path / "out").eval()
    ids, mask = _batch(kind)
    full = torch.ones_like(mask)
    assert (_theirs_logits(back, ids, full) - _theirs_logits(theirs, ids, full)).abs().max() <= TOL


def test_import_builds_parameters_once_and_keeps_ties(saved):
    _, d = saved["qwen2"]
    model = OmniNetModel.from_hf(d)
    assert model.lm_head.weight is model.embed.weight  # tied as in the checkpoint
    assert not any(p.is_meta for p in model.parameters())
    assert model.config.kv_heads == 1 and model.config.qkv_bias
    llama = OmniNetModel.from_hf(saved["llama"][1])
    assert llama.lm_head.weight is not llama.embed.weight
    assert llama.config.position.rope_scaling.kind == "linear"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_pruned_heads_export_as_zeros_with_equal_logits(saved, kind, tmp_path):
    theirs, d = saved[kind]
    ours = OmniNetModel.from_hf(d)
    ours.prune_heads({0: [0, 1], 1: [3]})  # llama: layer 0 loses K/V head 0's whole group; layer 1 keeps both
    ids, mask = _batch(kind)
    full = torch.ones_like(mask)
    expect = _ours_logits(ours, ids, full)
    save_hf(ours, tmp_path / "out")
    back = type(theirs).from_pretrained(tmp_path / "out").eval()
    assert (_theirs_logits(back, ids, full) - expect).abs().max() <= TOL


def test_gqa_pruning_equals_the_masked_computation(saved):
    """Pruning query heads (and the K/V head of a group left empty) gives the outputs of the
    unpruned model with those heads masked out."""
    _, d = saved["llama"]
    ours = OmniNetModel.from_hf(d)
    ids, _ = _batch("llama")
    hm = torch.ones(2, 4)
    hm[0, :2] = 0
    hm[1, 3] = 0
    with torch.no_grad():
        masked = ours(ids, head_mask=hm).logits
        ours.prune_heads({0: [0, 1], 1: [3]})
        pruned = ours(ids).logits
    layer0, layer1 = ours.attention_layers()
    assert layer0.num_kv_heads == 1 and layer0.kv_ids.tolist() == [1] and layer1.num_kv_heads == 2
    assert layer0.qkv.weight.shape[0] == (2 + 2 * 1) * 8
    assert (pruned - masked).abs().max() <= 1e-5
    # cached decoding on the pruned model equals its full forward
    with torch.no_grad():
        o = ours(ids[:, :10], use_cache=True)
        step = ours(ids[:, 10:11], cache=o.cache).logits[:, -1]
        assert (step - ours(ids[:, :11]).logits[:, -1]).abs().max() <= 1e-5


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _one_line_error(call, *words):
    with pytest.raises(ValueError) as exc:
        call()
    msg = str(exc.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_refusals_are_one_line(saved, tmp_path):
    import shutil

    _, d = saved["gpt2"]
    for name, edit, words in [
        ("unknown", dict(model_type="mamba"), ["model_type", "mamba"]),
        ("remote", dict(auto_map={"AutoModel": "x.Y"}), ["auto_map", "remote code"]),
    ]:
        c = tmp_path / name
        shutil.copytree(d, c)
        _edit_config(c, **edit)
        _one_line_error(lambda c=c: OmniNetModel.from_hf(c), *words)
    pick = tmp_path / "pickle"
    shutil.copytree(d, pick)
    (pick / "model.safetensors").unlink()
    (pick / "pytorch_model.bin").write_bytes(b"not read")
    _one_line_error(lambda: OmniNetModel.from_hf(pick), "pytorch_model.bin", "never unpickles")
    shape = tmp_path / "shape"
    shutil.copytree(d, shape)
    _edit_config(shape, n_inner=64)  # the checkpoint's MLP is 128 wide
    _one_line_error(lambda: OmniNetModel.from_hf(shape), "mlp.c_fc.weight", "shape")
    _one_line_error(lambda: OmniNetModel.from_hf(tmp_path / "nothing"), "config.json")


def test_export_refuses_what_hf_cannot_express(saved, tmp_path):
    _, d = saved["gpt2"]
    ours = OmniNetModel.from_hf(d)
    sparse = _with_kernel(ours, "block_sparse")
    _one_line_error(lambda: save_hf(sparse, tmp_path / "x"), "block_sparse", "save_pretrained", "export_onnx")


def test_cli_import_then_export_carries_tokenizer_and_logits(saved, tmp_path, capsys):
    import shutil

    from omninet.cli import main

    theirs, d = saved["llama"]
    src = tmp_path / "src"
    shutil.copytree(d, src)
    (src / "tokenizer.json").write_text('{"stand-in": true}')
    assert main(["import-hf", str(src), str(tmp_path / "omni")]) == 0
    assert (tmp_path / "omni" / "tokenizer.json").is_file() and (tmp_path / "omni" / "model.safetensors").is_file()
    assert main(["export-hf", str(tmp_path / "omni"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "tokenizer.json").read_text() == '{"stand-in": true}'
    back = type(theirs).from_pretrained(tmp_path / "back").eval()
    ids, mask = _batch("llama")
    assert (_theirs_logits(back, ids, mask) - _theirs_logits(theirs, ids, mask)).abs().max() <= TOL
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "omni"), str(tmp_path / "back")]) == 2  # not empty: refused
    assert "not empty" in capsys.readouterr().err


def test_cli_export_of_a_sparse_model_exits_2_in_one_line(saved, tmp_path, capsys):
    from omninet.cli import main

    ours = _with_kernel(OmniNetModel.from_hf(saved["gpt2"][1]), "block_sparse")
    ours.save_pretrained(tmp_path / "sparse")
    assert main(["export-hf", str(tmp_path / "sparse"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "block_sparse" in err and "export_onnx" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kernel", ["sdpa", "eager", "block_sparse", "linformer", "hybrid"])
def test_every_kernel_takes_grouped_kv_heads(kernel):
    """A model with 2 K/V heads for 4 query heads equals the plain multi-head model whose K/V
    projections repeat each K/V head for its group, under every registered kernel."""
    from omninet.config import ModelConfig

    arch = "decoder" if kernel in ("sdpa", "eager", "block_sparse") else "encoder"
    common = dict(arch=arch, vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, dropout=0.0, max_seq_length=64,
                  position={"kind": "rotary"},
                  attention={"kernel": kernel, "block_sparse": {"block_size": 16, "min_seq_length": 0, "sparsity_factor": 0.5},
                             "linformer": {"k": 8, "min_seq_length": 0}})
    torch.manual_seed(0)
    gqa = OmniNetModel(ModelConfig(**common, num_kv_heads=2)).eval()
    mha = OmniNetModel(ModelConfig(**common)).eval()
    state = gqa.state_dict()
    D = 8
    for i in range(2):
        stack = "decoder" if arch == "decoder" else "encoder"
        w = state[f"{stack}.blocks.{i}.attn.qkv.weight"]  # rows [q 4D; k 2D; v 2D]
        q, k, v = w[: 4 * D], w[4 * D : 6 * D], w[6 * D :]
        rep = lambda t: t.view(2, D, -1).repeat_interleave(2, dim=0).reshape(4 * D, -1)  # noqa: E731
        state[f"{stack}.blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
        b = state.get(f"{stack}.blocks.{i}.attn.qkv.bias")
        if b is not None:
            state[f"{stack}.blocks.{i}.attn.qkv.bias"] = torch.cat(
                [b[: 4 * D], rep(b[4 * D : 6 * D, None])[:, 0], rep(b[6 * D :, None])[:, 0]])
    mha.load_state_dict(state)
    ids = torch.randint(0, V, (2, 48))
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[1, 40:] = False
    with torch.no_grad():
        a, b = gqa(ids, attention_mask=mask).logits, mha(ids, attention_mask=mask).logits
    assert (a - b)[mask].abs().max() <= 1e-5
