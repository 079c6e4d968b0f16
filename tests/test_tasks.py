"""Tests for omninet.tasks: ListOps labels against an independent evaluator, splits, batches,
metrics, byte LM windows, synthetic tasks, Parquet datasets and config validation."""

from __future__ import annotations

import collections
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from omninet.tasks import (BYTE_VOCAB_SIZE, EOS_ID, IGNORE_INDEX, LISTOPS_PRESETS, NUM_SPECIAL, SEP_ID, TASKS,
                           ByteTokenizer, ListOpsConfig, build_task, evaluate_listops)

# ----------------------------------------------------------------------------- ListOps


@pytest.fixture(scope="module")
def quickstart():
    return build_task({"name": "listops", "preset": "quickstart"})


@pytest.fixture(scope="module")
def lra():
    return build_task({"name": "listops", "preset": "lra", "num_eval": 2000})


def _check_listops_split(task, split, count, *, as_string=False):
    data = task.split(split)
    cfg = task.config
    for i in range(count):
        ids, label = data.raw(i)
        assert cfg.min_length <= len(ids) <= cfg.max_length
        tokens = task.decode(ids)
        assert evaluate_listops(" ".join(tokens) if as_string else tokens) == label


def test_listops_quickstart_labels_and_lengths(quickstart):
    _check_listops_split(quickstart, "eval", 2000, as_string=True)
    _check_listops_split(quickstart, "train", 1000)
    lengths = [len(quickstart.split("eval").raw(i)[0]) for i in range(2000)]
    assert max(lengths) > 40  # the range is used, not just its bottom


def test_listops_lra_labels_and_lengths(lra):
    assert (lra.config.min_length, lra.config.max_length, lra.config.max_depth, lra.config.max_args) == (501, 1999, 10, 10)
    _check_listops_split(lra, "eval", 2000)
    lengths = [len(lra.split("eval").raw(i)[0]) for i in range(2000)]
    assert max(lengths) > 1500 and min(lengths) < 700


def test_listops_parens_form_matches_lra_layout():
    task = build_task({"name": "listops", "parens": True, "num_eval": 500})
    for i in range(500):
        ids, label = task.split("eval").raw(i)
        tokens = task.decode(ids)
        assert 20 <= len(tokens) <= 100
        assert tokens.count("(") == tokens.count(")")
        assert evaluate_listops(tokens) == label
        without = [t for t in tokens if t not in "()"]
        assert evaluate_listops(without) == label


@pytest.mark.parametrize("expr,value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 3 [MAX 1 0 ] 5 ]", 1),
    ("[MED 1 2 3 4 ]", 2),  # int(median) truncates 2.5 as int(np.median) does in LRA
    ("[MED 7 1 3 ]", 3),
    ("[SM 5 6 7 ]", 8),
    ("[SM [MAX 9 2 ] [MED 4 8 6 ] 3 ]", 8),
    ("( ( ( [MAX 2 ) 9 ) ] )", 9),  # LRA's to_string layout
    ("7", 7),
])
def test_evaluator_known_values(expr, value):
    assert evaluate_listops(expr) == value


@pytest.mark.parametrize("expr", ["[MAX 2 9", "[MAX 2 9 ] ]", "[MAX 2 9 ] 3", "[FOO 1 2 ]", "( [MIN 1 2 ]", "]", ""])
def test_evaluator_rejects_malformed(expr):
    with pytest.raises(ValueError):
        evaluate_listops(expr)


def test_listops_determinism_and_seeds():
    def sample(seed):
        task = build_task({"name": "listops", "seed": seed, "num_eval": 200})
        return ([task.split("eval").raw(i) for i in range(200)], [task.split("train").raw(i) for i in range(200)])

    assert sample(0) == sample(0)
    eval_a, train_a = sample(0)
    eval_b, train_b = sample(1)
    assert eval_a != eval_b and train_a != train_b
    # train example i does not depend on which examples were read before it
    task = build_task({"name": "listops", "num_eval": 200})
    assert task.split("train").raw(150) == train_a[150]


def test_listops_train_eval_disjoint(quickstart):
    evals = {tuple(quickstart.split("eval").raw(i)[0]) for i in range(len(quickstart.split("eval")))}
    assert len(evals) == len(quickstart.split("eval"))  # eval is deduplicated
    train = {tuple(quickstart.split("train").raw(i)[0]) for i in range(3000)}
    assert not evals & train


def test_disjointness_enforced_in_a_tiny_space():
    # 4 operators x 100 digit pairs = 400 possible sequences: without redraws ~1/4 of train would collide.
    task = build_task({"name": "listops", "min_length": 4, "max_length": 4, "max_depth": 2, "max_args": 2,
                       "num_eval": 100, "num_train": 400})
    evals = {tuple(task.split("eval").raw(i)[0]) for i in range(100)}
    assert len(evals) == 100
    train = [tuple(task.split("train").raw(i)[0]) for i in range(400)]
    assert not evals & set(train)
    assert all(evaluate_listops(task.decode(t)) == task.split("train").raw(i)[1] for i, t in enumerate(train))


def test_listops_class_balance_and_majority_baseline(quickstart):
    counts = collections.Counter(quickstart.split("eval").raw(i)[1] for i in range(2000))
    assert set(counts) == set(range(10))
    assert max(counts.values()) / 2000 < 0.3 and min(counts.values()) / 2000 > 0.03
    train_counts = collections.Counter(quickstart.split("train").raw(i)[1] for i in range(5000))
    mode = max(sorted(train_counts), key=lambda k: train_counts[k])
    assert quickstart.majority_baseline == pytest.approx(counts[mode] / 2000)
    assert 0.1 < quickstart.majority_baseline < 0.3


# ----------------------------------------------------------------------------- batches and metrics


def test_classification_batches(quickstart):
    batches = list(quickstart.batches("eval", 512))
    assert [b["labels"].shape[0] for b in batches] == [512, 512, 512, 464]
    b = batches[0]
    assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.bool
    lengths = b["attention_mask"].sum(1)
    assert b["input_ids"].shape[1] == int(lengths.max())  # padded to the batch's longest row
    for row in range(8):
        n = int(lengths[row])
        ids, label = quickstart.split("eval").raw(row)  # eval is not shuffled by default
        assert b["input_ids"][row, :n].tolist() == ids and int(b["labels"][row]) == label
        assert (b["input_ids"][row, n:] == quickstart.pad_id).all() and not b["attention_mask"][row, n:].any()
    assert len(list(quickstart.batches("eval", 512, drop_last=True))) == 3
    assert next(quickstart.batches("eval", 4, pad_to=128))["input_ids"].shape == (4, 128)
    fixed = build_task({"name": "listops", "padding": "max_length", "num_eval": 10})
    assert next(fixed.batches("eval", 4))["input_ids"].shape == (4, 100)
    with pytest.raises(ValueError, match="pad_to"):
        next(quickstart.batches("eval", 512, pad_to=10))
    with pytest.raises(ValueError, match="batch_size"):
        next(quickstart.batches("eval", 0))
    with pytest.raises(ValueError, match="split"):
        quickstart.split("test")


def test_shuffle_is_seeded(quickstart):
    first = lambda seed: next(quickstart.batches("train", 16, seed=seed))["labels"].tolist()  # noqa: E731
    assert first(3) == first(3)
    orders = {tuple(first(s)) for s in range(4)}
    assert len(orders) > 1


def test_classification_metrics_known_case(quickstart):
    batch = {"labels": torch.tensor([0, 1, 2, 3])}
    logits = torch.full((4, 10), -5.0)
    logits[0, 0] = logits[1, 1] = logits[2, 0] = logits[3, 3] = 5.0
    m = quickstart.metrics(logits, batch)
    assert m["accuracy"] == 0.75 and m["count"] == 4
    meter = quickstart.new_meter()
    meter.update(logits[:2], {"labels": batch["labels"][:2]})
    meter.update(logits[2:], {"labels": batch["labels"][2:]})
    assert meter.compute() == pytest.approx(m)
    with pytest.raises(ValueError, match="logits"):
        quickstart.metrics(torch.zeros(3, 10), batch)


def test_bits_per_byte_known_cases():
    task = build_task({"name": "copy", "length": 4, "num_eval": 10})
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7]])
    batch = {"labels": labels}
    v = task.vocab_size
    uniform = task.metrics(torch.zeros(1, 4, v), batch)
    assert uniform["bits_per_byte"] == pytest.approx(math.log2(v))
    assert uniform["tokens"] == 3
    # two equal top logits on the target and one other id: p(target) = 1/2 -> exactly 1 bit per byte
    logits = torch.full((1, 4, v), -1e4)
    for i, t in enumerate([9, 5, 6, 7]):
        logits[0, i, t] = 0.0
        logits[0, i, 200] = 0.0
    half = task.metrics(logits, batch)
    assert half["bits_per_byte"] == pytest.approx(1.0)
    assert half["loss"] == pytest.approx(math.log(2))
    logits[0, 0] = torch.randn(v) * 50  # an ignored position changes nothing
    assert task.metrics(logits, batch)["bits_per_byte"] == pytest.approx(1.0)
    logits[0, 1:, 200] = -1e4  # now every scored target is the argmax
    sharp = task.metrics(logits, batch)
    assert sharp["next_byte_accuracy"] == 1.0 and sharp["sequence_accuracy"] == 1.0 and sharp["bits_per_byte"] < 1e-6


# ----------------------------------------------------------------------------- byte LM


@pytest.fixture()
def corpus(tmp_path):
    texts = {}
    for i in range(40):
        sub = tmp_path / ("pkg" if i % 2 else "docs") / f"f{i:02d}.txt"
        sub.parent.mkdir(exist_ok=True)
        text = f"file {i}: " + "héllo wörld, " * (i + 5) + "\n"
        sub.write_text(text, encoding="utf-8")
        texts[sub.relative_to(tmp_path).as_posix()] = text
    (tmp_path / "skip").mkdir()
    (tmp_path / "skip" / "ignored.txt").write_text("IGNORED " * 100)
    return tmp_path, texts


def test_byte_lm_windows(corpus):
    root, texts = corpus
    cfg = {"name": "byte_lm", "root": str(root), "pattern": "**/*.txt", "exclude": ["skip/*"],
           "max_length": 32, "max_bytes": 100_000, "eval_fraction": 0.25}
    task = build_task(cfg)
    assert task.kind == "lm" and task.vocab_size == BYTE_VOCAB_SIZE and task.num_classes is None
    files = {name: [rel for _, rel in task.files[name]] for name in ("train", "eval")}
    assert set(files["train"]) | set(files["eval"]) == set(texts)  # every file, skip/ excluded
    assert not set(files["train"]) & set(files["eval"])
    assert files == {n: [rel for _, rel in build_task(cfg).files[n]] for n in files}  # deterministic
    for name in ("train", "eval"):
        data = task.split(name)
        stream = []
        for i in range(len(data)):
            ex = data[i]
            ids, labels = ex["input_ids"], ex["labels"]
            assert ids.shape == labels.shape == (32,)
            targets = torch.cat([ids[1:], labels[-1:]])  # labels are the next token
            scored = labels != IGNORE_INDEX
            assert (labels[scored] == targets[scored]).all()
            assert (targets[~scored] == EOS_ID).all()
            stream += ids.tolist()
        docs = ByteTokenizer().decode(stream, skip_special=False).split("<eos>")
        expected = [texts[rel] for rel in files[name]]
        assert docs[:-1] == expected[: len(docs) - 1]  # files in hash order, whole
        assert expected[len(docs) - 1].startswith(docs[-1])  # the last window stops mid-file


def test_byte_lm_budget_and_default_corpus(corpus):
    root, _ = corpus
    small = build_task({"name": "byte_lm", "root": str(root), "pattern": "**/*.txt", "max_length": 16,
                        "max_bytes": 400, "eval_fraction": 0.25})
    small.split("train"), small.split("eval")
    assert small.bytes_read == {"train": 300, "eval": 100}
    stdlib = build_task({"name": "byte_lm", "max_bytes": 200_000, "max_length": 64})
    assert len(stdlib.files["train"]) > 100 and len(stdlib.files["eval"]) > 10
    batch = next(stdlib.batches("train", 8))
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 64)
    assert all("site-packages" not in rel for _, rel in stdlib.files["train"])


def test_byte_lm_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        build_task({"name": "byte_lm", "root": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="no file"):
        build_task({"name": "byte_lm", "root": str(tmp_path), "pattern": "*.txt"})
    with pytest.raises(ValueError, match="max_bytes"):
        build_task({"name": "byte_lm", "max_bytes": 100, "max_length": 256})


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café → ∑ 😀"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 1 and ids[-1] == EOS_ID and min(ids[1:-1]) >= NUM_SPECIAL
    assert tok.decode(ids) == text
    assert tok.encode_tensor(text).tolist() == ids[1:-1]
    assert tok.decode([SEP_ID], skip_special=False) == "<sep>"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([BYTE_VOCAB_SIZE])


# ----------------------------------------------------------------------------- synthetic tasks


def test_associative_recall_labels():
    task = build_task({"name": "associative_recall", "num_pairs": 24, "key_vocab": 32, "num_values": 8,
                       "num_eval": 2000})
    assert task.max_length == 50 and task.num_classes == 8 and task.vocab_size == 2 + 32 + 8
    data = task.split("eval")
    for i in range(2000):
        ids, label = data.raw(i)
        assert len(ids) == 50 and ids[-2] == task.SEP
        keys, values = ids[0:48:2], ids[1:48:2]
        assert len(set(keys)) == 24 and all(2 <= k < 34 for k in keys) and all(34 <= v < 42 for v in values)
        assert values[keys.index(ids[-1])] - task.first_value == label
    counts = collections.Counter(data.raw(i)[1] for i in range(2000))
    assert set(counts) == set(range(8)) and task.majority_baseline < 0.2
    evals = {tuple(data.raw(i)[0]) for i in range(2000)}
    assert not evals & {tuple(task.split("train").raw(i)[0]) for i in range(2000)}


def test_copy_task_labels():
    task = build_task({"name": "copy", "length": 20, "alphabet_size": 4, "num_eval": 100})
    assert task.max_length == 40 and task.kind == "lm"
    for i in range(100):
        ex = task.split("eval")[i]
        ids, labels = ex["input_ids"].tolist(), ex["labels"].tolist()
        s = ids[:20]
        assert ids[20] == SEP_ID and ids[21:] == s[:-1]
        assert labels[:20] == [IGNORE_INDEX] * 20 and labels[20:] == s
        assert set(s) <= set(ByteTokenizer().encode("abcd"))


# ----------------------------------------------------------------------------- Parquet


def _write(path, **columns):
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_parquet_input_ids_with_split_column(tmp_path):
    rng = random.Random(0)
    ids = [[rng.randrange(1, 50) for _ in range(rng.randrange(3, 12))] for _ in range(60)]
    labels = [sum(x) % 3 for x in ids]
    split = ["eval" if i % 5 == 0 else "train" for i in range(60)]
    path = _write(tmp_path / "d.parquet", input_ids=ids, label=labels, split=split)
    task = build_task({"name": "parquet", "path": path})
    assert task.kind == "classification" and task.num_classes == 3
    assert task.vocab_size == max(max(x) for x in ids) + 1 and task.pad_id == 0
    assert len(task.split("eval")) == 12 and len(task.split("train")) == 48
    assert task.split("eval").raw(1) == (ids[5], labels[5])
    batch = next(task.batches("eval", 12))
    assert batch["labels"].tolist() == labels[::5]
    assert batch["input_ids"].shape == (12, max(len(x) for x in ids[::5]))
    assert task.majority_baseline is not None


def test_parquet_text_hash_split_and_lm(tmp_path):
    texts = [f"example number {i} " * (1 + i % 4) for i in range(200)]
    path = _write(tmp_path / "t.parquet", text=texts, label=[i % 2 for i in range(200)])
    task = build_task({"name": "parquet", "path": path, "eval_fraction": 0.2, "max_length": 40})
    assert task.vocab_size == BYTE_VOCAB_SIZE and task.max_length == 40
    n_eval, n_train = len(task.split("eval")), len(task.split("train"))
    assert n_eval + n_train == 200 and 20 < n_eval < 60
    again = build_task({"name": "parquet", "path": path, "eval_fraction": 0.2, "max_length": 40})
    assert [again.split("eval").raw(i) for i in range(n_eval)] == [task.split("eval").raw(i) for i in range(n_eval)]
    ids, label = task.split("train").raw(0)
    assert ids in [ByteTokenizer().encode(t)[:40] for t in texts] and label in (0, 1)

    lm = build_task({"name": "parquet", "path": path, "kind": "lm", "max_length": 16})
    assert lm.kind == "lm" and lm.num_classes is None
    ex = lm.split("train")[0]
    assert ex["input_ids"][1:].tolist() == ex["labels"][:-1].tolist() and ex["input_ids"].shape == (16,)
    batch = next(lm.batches("train", 4))
    assert lm.metrics(torch.zeros(*batch["labels"].shape, lm.vocab_size), batch)["bits_per_byte"] == pytest.approx(
        math.log2(BYTE_VOCAB_SIZE))


def test_parquet_errors(tmp_path):
    no_label = _write(tmp_path / "a.parquet", text=["x y z"] * 10)
    with pytest.raises(ValueError, match="lacks column.*'label'"):
        build_task({"name": "parquet", "path": no_label})
    no_tokens = _write(tmp_path / "b.parquet", label=[0, 1])
    with pytest.raises(ValueError, match="lacks column.*'input_ids'"):
        build_task({"name": "parquet", "path": no_tokens})
    ids_only = _write(tmp_path / "c.parquet", input_ids=[[1, 2]] * 4, label=[0, 1, 0, 1])
    with pytest.raises(ValueError, match="lacks column.*'text'"):
        build_task({"name": "parquet", "path": ids_only, "kind": "lm"})
    bad_type = _write(tmp_path / "d.parquet", text=["a", "b"], label=["yes", "no"])
    with pytest.raises(ValueError, match="'label' must be an integer"):
        build_task({"name": "parquet", "path": bad_type})
    bad_split = _write(tmp_path / "e.parquet", text=["ab", "cd"], label=[0, 1], split=["train", "test"])
    with pytest.raises(ValueError, match="split"):
        build_task({"name": "parquet", "path": bad_split})
    with pytest.raises(ValueError, match="does not exist"):
        build_task({"name": "parquet", "path": str(tmp_path / "nope.parquet")})
    with pytest.raises(ValueError, match="missing required key"):
        build_task({"name": "parquet"})
    varied = _write(tmp_path / "f.parquet", input_ids=[[i, i + 1] for i in range(40)], label=[i % 2 for i in range(40)])
    with pytest.raises(ValueError, match="outside.*vocab_size=8"):
        build_task({"name": "parquet", "path": varied, "vocab_size": 8})
    with pytest.raises(ValueError, match="vocab_size applies to 'input_ids' only"):
        build_task({"name": "parquet", "path": bad_split, "vocab_size": 8})


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("config,match", [
    ({"name": "listops", "max_deep": 3}, "unknown key.*max_deep"),
    ({"name": "listops", "max_depth": "3"}, "max_depth.*expected int"),
    ({"name": "copy", "length": 2.5}, "length.*integer"),
    ({"name": "copy", "length": True}, "length.*integer"),
    ({"name": "listops", "parens": 1}, "parens"),
    ({"name": "listops", "preset": "huge"}, "preset"),
    ({"name": "listops", "min_length": 50, "max_length": 40}, "max_length"),
    ({"name": "listops", "min_length": 500, "max_depth": 3, "max_args": 5, "max_length": 900}, "unreachable"),
    ({"name": "listops", "max_args": 1}, "max_args"),
    ({"name": "listops", "padding": "left"}, "padding"),
    ({"name": "listopz"}, "task name must be one of"),
    ({"preset": "lra"}, "task name must be one of"),
    ({"name": "associative_recall", "num_pairs": 40, "key_vocab": 20}, "key_vocab"),
    ({"name": "copy", "alphabet_size": 100}, "alphabet_size"),
    ({"name": "copy", "length": 3, "alphabet_size": 4}, "distinct strings"),
    ({"name": "byte_lm", "eval_fraction": 1.5}, "eval_fraction"),
])
def test_config_validation(config, match):
    with pytest.raises(ValueError, match=match):
        build_task(config)


def test_config_presets_and_round_trip():
    cfg = ListOpsConfig.from_dict({"preset": "lra", "max_depth": 6})
    assert cfg.max_depth == 6 and cfg.min_length == LISTOPS_PRESETS["lra"]["min_length"]
    as_dict = cfg.to_dict()
    assert as_dict["name"] == "listops" and ListOpsConfig.from_dict(as_dict) == cfg
    for name, cls in TASKS.items():
        if name != "parquet":
            default = cls.config_class()
            assert cls.config_class.from_dict(default.to_dict()) == default
    with pytest.raises(ValueError, match="name"):
        ListOpsConfig.from_dict({"name": "copy"})
