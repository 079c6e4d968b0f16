"""The text tasks in a pretrained vocabulary (``text_lm``, ``masked_text``, ``omninet.tasks.text``)
and Parquet ``input_ids`` for ``lm``: each scores exactly the tokens it claims, the splits are
disjoint and deterministic, the eval hash is stable, every refusal is one line.

The tokenizers are trained here, offline, with the ``tokenizers`` library on generated text
(no download): a GPT-2-like byte-level BPE (no framing, ``<|endoftext|>``), a Llama-like one
(``<s>`` in front of a sequence) and a BERT-like one (``[CLS] ... [SEP]``, ``[MASK]``, ``[PAD]``).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from omninet.scores import paired_difference
from omninet.tasks import IGNORE_INDEX, TokenMeter, build_task
from omninet.tasks.byte_lm import path_fraction
from omninet.tasks.masked_bytes import BERT_MASK, BERT_RANDOM

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega def return import class self None True False for while if else").split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + ("\n" if rng.random() < 0.1 else "") for _ in range(words))


def _train(path: Path, specials: list[str], *, post: processors.PostProcessor | None = None,
           config: dict | None = None) -> Path:
    """A byte-level BPE (vocab 300) trained on generated text, saved as ``path/tokenizer.json``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    tok.train_from_iterator([_text(rng, 200) for _ in range(50)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if post is not None:
        tok.post_processor = post(tok)
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("tokenizers")
    gpt = _train(base / "gpt", ["<|endoftext|>"])
    llama = _train(base / "llama", ["<unk>", "<s>", "</s>"], config={"bos_token": "<s>", "eos_token": "</s>"},
                   post=lambda t: processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))]))
    bert = _train(base / "bert", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], post=lambda t: processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", t.token_to_id("[CLS]")), ("[SEP]", t.token_to_id("[SEP]"))]))
    return {"gpt": gpt, "llama": llama, "bert": bert}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 text files of 40-400 words; returns (root, {relative path: text})."""
    root = tmp_path_factory.mktemp("corpus")
    rng, texts = random.Random(1), {}
    for i in range(40):
        rel = f"{'a' if i % 2 else 'b'}/doc{i:02d}.txt"
        (root / rel).parent.mkdir(exist_ok=True)
        texts[rel] = _text(rng, rng.randrange(40, 400))
        (root / rel).write_text(texts[rel], encoding="utf-8")
    return root, texts


def _task(tokenizers_dir, corpus, kind="gpt", **over):
    root, _ = corpus
    name = "masked_text" if kind == "bert" else "text_lm"
    return build_task({"name": name, "tokenizer": str(tokenizers_dir[kind]), "root": str(root), "pattern": "**/*.txt",
                       "max_length": 32, "eval_fraction": 0.25, **over})


def _expected_stream(task, texts, split):
    """The split's documents in path-hash order, tokenized, joined by the separator."""
    files = sorted((path_fraction(rel), rel) for rel in texts)
    frac = task.config.eval_fraction
    files = [rel for f, rel in files if (f < frac) == (split == "eval")]
    out = []
    for rel in files:
        if out and task.tokenizer.separator_id is not None:
            out.append(task.tokenizer.separator_id)
        out += task.tokenizer.encode(texts[rel])
    return out


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_causal_windows_score_the_next_tokens(tokenizers_dir, corpus, kind):
    task = _task(tokenizers_dir, corpus, kind)
    tok = task.tokenizer
    p = len(tok.prefix)
    assert (task.kind, task.causal, task.default_arch, task.unit) == ("lm", True, "decoder", "token")
    assert p == (1 if kind == "llama" else 0) and tok.suffix == () and task.vocab_size == 300
    sep = "<|endoftext|>" if kind == "gpt" else "</s>"
    assert tok.separator_id == tok.token_id(sep)
    for split in ("train", "eval"):
        data, expected = task.split(split), _expected_stream(task, corpus[1], split)
        assert len(data) == (len(expected) - task.body) // task.step + 1 > 0
        targets = []
        for i in range(len(data)):
            ids, labels = data.raw(i)
            assert len(ids) == len(labels) == 32 and ids[:p] == list(tok.prefix)
            window = ids + labels[-1:]  # prefix + body: the labels are the next tokens
            assert labels == [IGNORE_INDEX] * max(p - 1, 0) + window[max(p, 1):]
            assert window[p:] == expected[i * task.step: i * task.step + task.body]
            targets += [x for x in labels if x != IGNORE_INDEX]
        # every token of the stream (after the first, without a prefix) is a target exactly once
        assert targets == expected[1 - min(p, 1): len(targets) + 1 - min(p, 1)]


def test_masked_windows_score_only_masked_tokens(tokenizers_dir, corpus):
    task = _task(tokenizers_dir, corpus, "bert", max_length=48)
    tok = task.tokenizer
    vocab = {t: tok.token_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    assert (task.causal, task.default_arch, task.unit) == (False, "encoder", "token")
    assert (tok.prefix, tok.suffix) == ((vocab["[CLS]"],), (vocab["[SEP]"],))
    assert task.mask_id == vocab["[MASK]"] and task.pad_id == vocab["[PAD]"] and tok.separator_id == vocab["[SEP]"]
    assert task.describe()["mask_token"] == "[MASK]"
    special = {vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    assert tok.special_ids == special
    shown = {"mask": 0, "random": 0, "same": 0}
    for split in ("train", "eval"):
        data, expected = task.split(split), _expected_stream(task, corpus[1], split)
        assert len(data) == len(expected) // 46
        for i in range(len(data)):
            ids, labels = data.raw(i)
            body = expected[i * 46: (i + 1) * 46]
            assert len(ids) == 48 and ids[0] == vocab["[CLS]"] and ids[-1] == vocab["[SEP]"]
            masked = [j for j, x in enumerate(labels) if x != IGNORE_INDEX]
            candidates = [j + 1 for j, x in enumerate(body) if x not in special]
            assert len(masked) == min(max(1, round(0.15 * len(candidates))), len(candidates) - 1)
            assert set(masked) <= set(candidates)  # special tokens (the separator among them) never masked
            original = [*tok.prefix, *body, *tok.suffix]
            assert [labels[j] for j in masked] == [original[j] for j in masked]
            assert all(ids[j] == original[j] for j in range(48) if j not in masked)
            for j in masked:
                kind = "mask" if ids[j] == task.mask_id else "same" if ids[j] == original[j] else "random"
                assert kind != "random" or ids[j] not in special
                shown[kind] += 1
    total = sum(shown.values())
    assert total > 1000
    assert abs(shown["mask"] / total - BERT_MASK) < 0.04 and abs(shown["random"] / total - BERT_RANDOM) < 0.03
    plain = _task(tokenizers_dir, corpus, "bert", max_length=48, replace="mask")
    ids, labels = plain.split("eval").raw(0)
    assert all(ids[j] == plain.mask_id for j, x in enumerate(labels) if x != IGNORE_INDEX)


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_meter_scores_every_claimed_token_with_its_se(tokenizers_dir, corpus, kind):
    task = _task(tokenizers_dir, corpus, kind)
    torch.manual_seed(0)
    meters, claimed = [task.new_meter(), task.new_meter()], 0
    for batch in task.batches("eval", 8):
        claimed += int((batch["labels"] != IGNORE_INDEX).sum())
        for meter in meters:
            meter.update(torch.randn(*batch["labels"].shape, task.vocab_size), batch)
    assert isinstance(meters[0], TokenMeter)
    m, s = meters[0].compute(), meters[0].scores(task.eval_rows_hash())
    assert m["units"] == s.units == claimed and s.rows == len(task.split("eval")) and s.unit == "token"
    assert "bits_per_byte" not in m and m["loss"] == pytest.approx(s.loss_mean, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"])) and m["eval_loss_se"] == pytest.approx(s.loss_se)
    assert m["perplexity_se"] == pytest.approx(m["perplexity"] * s.loss_se) and 0 < m["accuracy_se"] < 0.05
    assert m["bits_per_token"] == pytest.approx(m["loss"] / math.log(2))
    d = paired_difference(s, meters[1].scores(task.eval_rows_hash()), metric="loss")  # the same tokens pair
    assert d.units == claimed and d.lo < d.diff < d.hi


@pytest.mark.slow  # a second Python process builds the same tasks
def test_splits_disjoint_deterministic_and_eval_hash_stable(tokenizers_dir, corpus):
    from omninet.tasks import text

    for kind in ("gpt", "bert"):
        task = _task(tokenizers_dir, corpus, kind)
        train, evals = task.split("train"), task.split("eval")
        eval_rows = [tuple(evals.raw(i)[0]) for i in range(len(evals))]
        assert not set(eval_rows) & {tuple(train.raw(i)[0]) for i in range(len(train))}
        text._token_streams.cache_clear()
        text._load_tokenizer.cache_clear()
        again = _task(tokenizers_dir, corpus, kind)
        assert [tuple(again.split("eval").raw(i)[0]) for i in range(len(evals))] == eval_rows
        assert again.eval_rows_hash() == task.eval_rows_hash()
        assert again.split("train").raw(3) == train.raw(3)
    # another process, another hash seed: the same eval sets (a sweep's controller and its workers)
    script = ("import sys; from omninet.tasks import build_task; "
              "print(*(build_task(dict(name=name, tokenizer=tok, root=sys.argv[1], pattern='**/*.txt', max_length=32, "
              "eval_fraction=0.25)).eval_rows_hash() for name, tok in zip(sys.argv[2::2], sys.argv[3::2])))")
    cases = [("text_lm", "gpt"), ("masked_text", "bert")]
    args = [x for name, kind in cases for x in (name, str(tokenizers_dir[kind]))]
    out = subprocess.run([sys.executable, "-c", script, str(corpus[0]), *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}, check=True).stdout.split()
    assert out == [_task(tokenizers_dir, corpus, kind).eval_rows_hash() for _, kind in cases]


def test_train_drops_windows_that_eval_has(tokenizers_dir, tmp_path):
    text = _text(random.Random(2), 300)
    for i in range(12):
        (tmp_path / f"same{i}.txt").write_text(text)  # every document the same: the streams repeat each other
    task = build_task({"name": "text_lm", "tokenizer": str(tokenizers_dir["gpt"]), "root": str(tmp_path),
                       "pattern": "*.txt", "max_length": 16, "eval_fraction": 0.3})
    train, evals = task.split("train"), task.split("eval")
    eval_rows = {tuple(evals.raw(i)[0]) for i in range(len(evals))}
    train_rows = [tuple(train.raw(i)[0]) for i in range(len(train))]
    tokens = task.facts["train"]["tokens"]
    assert len(train_rows) < (tokens - task.body) // task.step + 1 and not eval_rows & set(train_rows)


def test_padded_vocab_pad_id_and_encode(tokenizers_dir, corpus):
    task = _task(tokenizers_dir, corpus, "gpt", vocab_size=320, pad_id=7)
    assert (task.vocab_size, task.pad_id, task.tokenizer.vocab_size) == (320, 7, 300)
    assert _task(tokenizers_dir, corpus, "gpt").pad_id == task.tokenizer.separator_id  # no pad token: the separator
    llama = _task(tokenizers_dir, corpus, "llama")
    assert llama.encode("alpha beta") == [*llama.tokenizer.prefix, *llama.tokenizer.encode("alpha beta")]
    bert = _task(tokenizers_dir, corpus, "bert")
    ids = bert.encode("alpha [MASK] beta")
    assert ids[0] == bert.tokenizer.prefix[0] and ids[-1] == bert.tokenizer.suffix[0] and bert.mask_id in ids
    joined = _task(tokenizers_dir, corpus, "gpt", separator="")
    assert joined.tokenizer.separator_id is None and joined.describe()["separator"] is None
    assert joined.facts["eval"]["tokens"] == task.facts["eval"]["tokens"] - (task.facts["eval"]["documents"] - 1)


def test_padding_and_truncation_in_the_file_are_turned_off(tokenizers_dir, corpus, tmp_path):
    tok = Tokenizer.from_file(str(tokenizers_dir["gpt"] / "tokenizer.json"))
    tok.add_special_tokens(["<pad>"])
    tok.enable_padding(pad_id=tok.token_to_id("<pad>"), pad_token="<pad>")
    tok.enable_truncation(max_length=8)
    tok.save(str(tmp_path / "tokenizer.json"))
    padded, plain = _task({"gpt": tmp_path}, corpus, "gpt"), _task(tokenizers_dir, corpus, "gpt")
    assert padded.pad_id == tok.token_to_id("<pad>") == 300 and padded.vocab_size == 301
    evals = padded.split("eval")  # documents tokenized whole, never padded or cut
    assert len(evals) == len(plain.split("eval")) and all(evals.raw(i) == plain.split("eval").raw(i) for i in range(len(evals)))


def test_default_corpus_is_the_standard_library(tokenizers_dir):
    task = build_task({"name": "text_lm", "tokenizer": str(tokenizers_dir["gpt"] / "tokenizer.json"),
                       "max_bytes": 60_000, "max_length": 64})
    facts = task.describe()
    assert facts["path"] == sysconfig.get_paths()["stdlib"] and facts["source"] == "files"
    assert facts["bytes_train"] == 54_000 and facts["bytes_eval"] == 6_000 and facts["documents_eval"] >= 1


def _write(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_parquet_text_column(tokenizers_dir, tmp_path):
    rng = random.Random(3)
    texts = [_text(rng, rng.randrange(20, 120)) for _ in range(80)]
    path = _write(tmp_path / "t.parquet", text=texts + [""], split=["eval" if i % 4 == 0 else "train" for i in range(81)])
    for kind, name in (("gpt", "text_lm"), ("bert", "masked_text")):
        task = build_task({"name": name, "tokenizer": str(tokenizers_dir[kind]), "parquet": path, "max_length": 24})
        assert task.facts["eval"]["documents"] == 20 and task.facts["train"]["documents"] == 60
        tok, sep = task.tokenizer, task.tokenizer.separator_id
        expected = []
        for t in texts[::4]:
            expected += ([sep] if expected else []) + tok.encode(t)
        assert task.facts["eval"]["tokens"] == len(expected)
        ids, labels = task.split("eval").raw(0)
        if name == "text_lm":
            assert ids == expected[:24] and labels == expected[1:25]
        else:
            restored = [x if y == IGNORE_INDEX else y for x, y in zip(ids, labels)]
            assert restored == [*tok.prefix, *expected[:22], *tok.suffix]
    hashed = _write(tmp_path / "h.parquet", text=texts)
    task = build_task({"name": "text_lm", "tokenizer": str(tokenizers_dir["gpt"]), "parquet": hashed,
                       "max_length": 24, "eval_fraction": 0.3})
    assert 10 < task.facts["eval"]["documents"] < 40 and task.facts["eval"]["documents"] + task.facts["train"]["documents"] == 80


def test_parquet_input_ids_for_lm(tokenizers_dir, tmp_path):
    tok = Tokenizer.from_file(str(tokenizers_dir["gpt"] / "tokenizer.json"))
    rng = random.Random(4)
    rows = [tok.encode(_text(rng, rng.randrange(5, 40))).ids for _ in range(60)]
    path = _write(tmp_path / "ids.parquet", input_ids=rows, split=["eval" if i % 5 == 0 else "train" for i in range(60)])
    task = build_task({"name": "parquet", "path": path, "kind": "lm", "vocab_size": 320, "max_length": 16})
    assert (task.kind, task.source_column, task.vocab_size) == ("lm", "input_ids", 320)
    ids, labels = task.split("eval").raw(1)
    kept = rows[5][:17]  # one document, cut at max_length + 1
    assert ids == kept[:-1] and labels == kept[1:]
    batch = next(task.batches("eval", 12))
    meter = task.new_meter()
    meter.update(torch.zeros(*batch["labels"].shape, 320), batch)
    m = meter.compute()
    assert isinstance(meter, TokenMeter) and m["units"] == int((batch["labels"] != IGNORE_INDEX).sum())
    assert m["perplexity"] == pytest.approx(320, rel=1e-5)
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=100\).*vocab_size to the model") as err:
        build_task({"name": "parquet", "path": path, "kind": "lm", "vocab_size": 100})
    assert "\n" not in str(err.value)


def _one_line_error(config, match):
    with pytest.raises(ValueError, match=match) as err:
        build_task(config)
    assert "\n" not in str(err.value), str(err.value)


def test_refusals(tokenizers_dir, corpus, tmp_path):
    root = str(corpus[0])
    base = {"name": "text_lm", "tokenizer": str(tokenizers_dir["gpt"]), "root": root, "pattern": "**/*.txt",
            "max_length": 32}
    _one_line_error({**base, "tokenizer": str(tmp_path)}, r"TextLMConfig\.tokenizer=.*no tokenizer\.json there")
    _one_line_error({**base, "tokenizer": str(tmp_path / "missing.json")}, r"tokenizer=.*no tokenizer\.json")
    (tmp_path / "bad.json").write_text("{not json")
    _one_line_error({**base, "tokenizer": str(tmp_path / "bad.json")}, r"not a tokenizers file")
    _one_line_error({**base, "name": "masked_text"}, r"MaskedTextConfig: the tokenizer .* has no mask token.*set mask_token")
    _one_line_error({**base, "name": "masked_text", "tokenizer": str(tokenizers_dir["bert"]), "mask_token": "<m>"},
                    r"MaskedTextConfig\.mask_token='<m>' is not a token")
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(20):
        (empty / f"e{i}.txt").write_text("")
    _one_line_error({**base, "root": str(empty), "pattern": "*.txt"}, r"TextLMConfig: the train split holds no text")
    _one_line_error({**base, "parquet": _write(tmp_path / "e.parquet", text=["", ""]), "root": None},
                    r"split holds no text.*point parquet at text")
    _one_line_error({**base, "max_length": 100_000}, r"TextLMConfig\.max_length=100000: the train split has only "
                                                     r"\d+ tokens .*raise max_bytes, add text, or lower max_length")
    _one_line_error({**base, "max_bytes": 300}, r"the eval split has only .*fewer than one window")
    _one_line_error({**base, "vocab_size": 100}, r"TextLMConfig\.vocab_size=100 is smaller than the tokenizer's 300")
    _one_line_error({**base, "pad_id": 400}, r"TextLMConfig\.pad_id=400 is outside the vocabulary")
    _one_line_error({**base, "separator": "<sep>"}, r"TextLMConfig\.separator='<sep>' is not a token")
    _one_line_error({**base, "parquet": str(tmp_path / "x.parquet")}, r"give root .* or parquet .*not both")
    _one_line_error({**base, "parquet": str(tmp_path / "x.parquet"), "root": None}, r"parquet=.*does not exist")
    _one_line_error({**base, "parquet": _write(tmp_path / "n.parquet", body=["x"]), "root": None},
                    r"needs a 'text' column of strings")
    _one_line_error({**base, "root": str(tmp_path / "nope")}, r"TextLMConfig\.root=.*is not a directory")
    _one_line_error({**base, "toknizer": "x"}, r"unknown key.*tokniz")
    _one_line_error({"name": "text_lm"}, r"missing required key.*'tokenizer'")
    _one_line_error({**base, "name": "masked_text", "mask_rate": 1.0}, r"MaskedTextConfig\.mask_rate must be in")
    _one_line_error({**base, "name": "masked_text", "tokenizer": str(tokenizers_dir["bert"]), "max_length": 3},
                    r"max_length=3 leaves fewer than 2 text tokens")


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_a_trial_trains_and_scores_tokens(tokenizers_dir, corpus, kind):
    from omninet.trial import TrialConfig, run_trial

    root, _ = corpus
    name = "masked_text" if kind == "bert" else "text_lm"
    cfg = {"task": {"name": name, "tokenizer": str(tokenizers_dir[kind]), "root": str(root), "pattern": "**/*.txt",
                    "max_length": 32, "eval_fraction": 0.25, "vocab_size": 304},
           "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
           "train": {"steps": 8, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2},
           "hardware": {"device": "cpu", "num_threads": 1}, "measure": {"memory": False}}
    mc = TrialConfig.from_dict(cfg).model_config
    assert (mc.arch, mc.vocab_size) == ("encoder" if kind == "bert" else "decoder", 304)
    res = run_trial(cfg)
    assert res.status == "ok", res.error
    assert res.eval_unit == "token" and res.eval_units > 100 and res.bits_per_byte is None
    assert 0 < res.eval_loss_se < 0.5 and res.scores.units == res.eval_units


def test_same_ids_as_transformers(tokenizers_dir, corpus):
    transformers = pytest.importorskip("transformers")
    for kind in ("gpt", "llama", "bert"):
        task = _task(tokenizers_dir, corpus, kind)
        theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizers_dir[kind] / "tokenizer.json"))
        for text in list(corpus[1].values())[:5] + ["naïve café → ∑ alpha\n\tbeta"]:
            assert task.tokenizer.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]
            ours = [*task.tokenizer.prefix, *task.tokenizer.encode(text), *task.tokenizer.suffix]
            assert ours == theirs(text)["input_ids"]  # the framing is the one transformers adds


def test_configs_round_trip(tokenizers_dir):
    from omninet.tasks import MaskedTextConfig, TextLMConfig

    for cls, extra in ((TextLMConfig, {}), (MaskedTextConfig, {"mask_rate": 0.2, "replace": "mask"})):
        cfg = cls.from_dict({"tokenizer": str(tokenizers_dir["bert"]), "vocab_size": 512, **extra})
        assert cfg.to_dict()["name"] == cls.task_name and cls.from_dict(cfg.to_dict()) == cfg
