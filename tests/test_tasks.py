"""Tests for omninet.tasks: ListOps labels against an independent evaluator, splits, batches,
metrics and per-unit scores, byte LM windows, masked bytes, synthetic tasks (MQAR among them),
Parquet datasets and config validation."""

from __future__ import annotations

import collections
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from omninet.scores import clustered_se_from_totals, eval_hash
from omninet.tasks import (BYTE_VOCAB_SIZE, EOS_ID, IGNORE_INDEX, LISTOPS_PRESETS, MASK_ID, MASKED_VOCAB_SIZE,
                           NUM_SPECIAL, SEP_ID, TASKS, ByteTokenizer, ListOpsConfig, build_task, evaluate_listops)
from omninet.tasks.masked_bytes import mask_positions

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


def _check_scores_agree(task, meter, rows):
    m, s = meter.compute(), meter.scores(task.eval_rows_hash(rows))
    assert s.unit == task.unit and s.rows == rows == m["rows"] and s.units == m["units"]
    assert s.accuracy == pytest.approx(m["accuracy"], abs=1e-12)
    assert s.loss_mean == pytest.approx(m["loss"], rel=1e-5)
    assert s.accuracy_se == pytest.approx(m["accuracy_se"]) and s.loss_se == pytest.approx(m["eval_loss_se"])
    correct, row = meter.unit_arrays()
    assert (correct == s.correct).all() and (row == s.row).all()
    right, units = meter.row_totals()
    assert right.size == units.size == rows and units.sum() == s.units and right.sum() == s.correct.sum()
    assert clustered_se_from_totals(right, units) == pytest.approx(s.accuracy_se)
    data = task.split("eval")
    assert s.eval_hash == eval_hash(data.raw(i)[0] for i in range(rows)) != task.eval_rows_hash(rows - 1)
    whole = eval_hash(data.raw(i)[0] for i in range(len(data)))
    assert task.eval_rows_hash() == task.eval_rows_hash(len(data)) == whole
    return m, s


def test_classification_meter_scores(quickstart):
    torch.manual_seed(0)
    meter = quickstart.new_meter()
    rows = 0
    for batch in quickstart.batches("eval", 64):
        logits = torch.randn(batch["labels"].shape[0], 10)
        logits[torch.arange(len(logits)), batch["labels"]] += 1.0  # better than chance
        meter.update(logits, batch)
        rows += len(logits)
        if rows >= 320:
            break
    m, s = _check_scores_agree(quickstart, meter, 320)
    assert m["units"] == m["count"] == 320 and (s.row == torch.arange(320).numpy()).all()  # one unit per row
    assert 0.2 < m["accuracy"] < 0.8 and 0 < m["accuracy_se"] < 0.05
    with pytest.raises(ValueError, match="rows"):
        quickstart.eval_rows_hash(len(quickstart.split("eval")) + 1)


def test_lm_meter_scores_rows_and_units():
    task = build_task({"name": "copy", "length": 4, "num_eval": 10})
    v = task.vocab_size
    meter = task.new_meter()
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7], [IGNORE_INDEX] * 4, [8, IGNORE_INDEX, 9, IGNORE_INDEX]])
    logits = torch.zeros(3, 4, v)
    logits[0, 1, 5] = logits[0, 2, 6] = logits[2, 0, 8] = 20.0  # right: 2 of row 0, 1 of row 2
    meter.update(logits, {"labels": labels})
    meter.update(torch.zeros(1, 4, v), {"labels": labels[:1]})  # row 3: 3 units, all wrong (argmax 0)
    m, s = meter.compute(), meter.scores()
    assert s.row.tolist() == [0, 0, 0, 2, 2, 3, 3, 3]  # row 1 had nothing to score but still counts
    assert s.correct.tolist() == [True, True, False, True, False, False, False, False]
    assert m["rows"] == 4 and m["units"] == m["tokens"] == 8 and m["accuracy"] == 3 / 8
    assert m["sequence_accuracy"] == 0.0
    assert s.loss[4] == pytest.approx(math.log(v)) and s.loss[0] < 1e-3  # nats per unit
    assert m["loss"] == pytest.approx(float(s.loss.astype("float64").mean()))
    right, units = meter.row_totals()
    assert right.tolist() == [2, 0, 1, 0] and units.tolist() == [3, 0, 2, 3]


def test_unit_declarations_and_meters():
    cases = [({"name": "listops", "num_eval": 10}, "example", "encoder", False),
             ({"name": "associative_recall", "num_eval": 10}, "example", "encoder", False),
             ({"name": "copy", "num_eval": 10}, "token", "decoder", True),
             ({"name": "mqar", "num_eval": 10}, "query", "decoder", True),
             ({"name": "mqar", "num_eval": 10, "causal": False}, "query", "encoder", False),
             ({"name": "masked_bytes", "max_bytes": 50_000}, "token", "encoder", False)]
    for config, unit, arch, causal in cases:
        task = build_task(config)
        assert (task.unit, task.default_arch, task.causal) == (unit, arch, causal), config
        assert task.new_meter().unit == unit and task.describe()["unit"] == unit
    for name in ("associative_recall", "copy", "byte_lm", "mqar", "masked_bytes"):  # declared on the class
        cls = TASKS[name]
        assert isinstance(cls.unit, str) and isinstance(cls.default_arch, str) and isinstance(cls.causal, bool)


def test_mqar_meter_scores_queries():
    task = build_task({"name": "mqar", "seq_length": 64, "num_pairs": 8, "num_queries": 5, "num_eval": 40})
    meter = task.new_meter()
    torch.manual_seed(0)
    for batch in task.batches("eval", 16):
        meter.update(torch.randn(*batch["labels"].shape, task.vocab_size), batch)
    m, s = _check_scores_agree(task, meter, 40)
    assert m["units"] == 40 * 5 and (torch.from_numpy(s.row).bincount() == 5).all()


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


# ----------------------------------------------------------------------------- masked bytes


def _masked(root, **over):
    return build_task({"name": "masked_bytes", "root": str(root), "pattern": "**/*.txt", "max_length": 32,
                       "max_bytes": 100_000, "eval_fraction": 0.25, **over})


def _expected_masked(n_bytes, rate):
    return min(max(1, round(rate * n_bytes)), n_bytes - 1)


@pytest.mark.parametrize("span", [1.0, 3.0])
def test_masked_bytes_scores_what_it_masks(corpus, span):
    root, _ = corpus
    task = _masked(root, mask_rate=0.2, mask_span=span)
    plain = build_task({"name": "byte_lm", "root": str(root), "pattern": "**/*.txt", "max_length": 32,
                        "max_bytes": 100_000, "eval_fraction": 0.25})
    assert task.vocab_size == MASKED_VOCAB_SIZE and task.kind == "lm" and task.max_length == 32
    assert task.tokenizer.decode([MASK_ID, NUM_SPECIAL + 65], skip_special=False) == "<mask>A"
    for name in ("train", "eval"):
        data = task.split(name)
        for i in range(min(len(data), len(plain.split(name)))):
            ex = data[i]
            ids, labels = ex["input_ids"], ex["labels"]
            original = plain.split(name)[i]["input_ids"]  # the same window of the same stream
            scored = labels != IGNORE_INDEX
            bytes_ = original >= NUM_SPECIAL
            assert int(scored.sum()) == _expected_masked(int(bytes_.sum()), 0.2)
            assert (labels[scored] == original[scored]).all() and bytes_[scored].all()  # only bytes are scored
            assert (ids[scored] == MASK_ID).all() and (ids[~scored] == original[~scored]).all()
    again = _masked(root, mask_rate=0.2, mask_span=span)
    assert all(again.split("eval").raw(i) == task.split("eval").raw(i) for i in range(len(again.split("eval"))))
    other = _masked(root, mask_rate=0.2, mask_span=span, seed=1)
    assert any(other.split("train").raw(i) != task.split("train").raw(i) for i in range(5))
    assert not {rel for _, rel in task.files["train"]} & {rel for _, rel in task.files["eval"]}


def test_mask_positions_spans():
    for length, rate, span in [(100, 0.15, 3.0), (256, 0.15, 1.0), (64, 0.5, 4.0), (10, 0.9, 2.0), (2, 0.1, 5.0)]:
        for seed in range(20):
            pos = mask_positions(random.Random(seed), length, rate, span)
            k = _expected_masked(length, rate)
            assert len(pos) == len(set(pos)) == k and pos == sorted(pos) and 0 <= pos[0] and pos[-1] < length
            if span > 1:
                spans = 1 + sum(b != a + 1 for a, b in zip(pos, pos[1:]))
                assert spans == min(max(1, round(k / span)), length - k + 1)
    starts = collections.Counter(mask_positions(random.Random(s), 50, 0.1, 1.0)[0] for s in range(500))
    assert starts[0] > 0  # the first position can be masked


def test_masked_bytes_bert_rule(corpus):
    root, _ = corpus
    task = _masked(root, replace="bert", mask_rate=0.3)
    counts = collections.Counter()
    for i in range(len(task.split("train"))):
        ex = task.split("train")[i]
        scored = ex["labels"] != IGNORE_INDEX
        ids, labels = ex["input_ids"][scored], ex["labels"][scored]
        counts["mask"] += int((ids == MASK_ID).sum())
        counts["same"] += int((ids == labels).sum())
        counts["other"] += int(((ids != MASK_ID) & (ids != labels)).sum())
        assert ((ids == MASK_ID) | (ids >= NUM_SPECIAL)).all()
    total = sum(counts.values())
    assert total > 500
    assert abs(counts["mask"] / total - 0.8) < 0.05 and abs(counts["same"] / total - 0.1) < 0.04
    assert abs(counts["other"] / total - 0.1) < 0.04


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


def _check_mqar(task, count):
    cfg = task.config
    queries = cfg.num_pairs if cfg.num_queries is None else cfg.num_queries
    for split in ("eval", "train"):
        for i in range(count):
            ids, labels = task.split(split).raw(i)
            assert len(ids) == len(labels) == cfg.seq_length == task.max_length
            keys, values = ids[0:2 * cfg.num_pairs:2], ids[1:2 * cfg.num_pairs:2]
            assert len(set(keys)) == cfg.num_pairs and all(task.FIRST_KEY <= k < task.first_value for k in keys)
            bound = dict(zip(keys, values))
            assert all(x == IGNORE_INDEX for x in labels[:2 * cfg.num_pairs])
            scored = [p for p, x in enumerate(labels) if x != IGNORE_INDEX]
            assert len(scored) == queries
            for p in scored:
                q = p if cfg.causal else p - 1  # the query key's position
                assert (q - 2 * cfg.num_pairs) % 2 == 0 and ids[q] in bound
                assert labels[p] == bound[ids[q]]
                if cfg.causal:
                    assert ids[q + 1] == labels[p]  # the next token: a causal model sees it only after
                else:
                    assert ids[p] == task.MASK and labels[p] not in ids[2 * cfg.num_pairs:]  # never visible
            rest = [t for p, t in enumerate(ids[2 * cfg.num_pairs:], 2 * cfg.num_pairs)
                    if p not in scored and (p - 1 if cfg.causal else p + 1) not in scored]
            assert set(rest) <= {task.FILL}


@pytest.mark.parametrize("config", [
    {"seq_length": 64, "num_pairs": 8},
    {"seq_length": 65, "num_pairs": 4, "num_queries": 3, "distance": "uniform", "value_vocab": 2},
    {"seq_length": 64, "num_pairs": 8, "causal": False},
    {"seq_length": 40, "num_pairs": 10, "key_vocab": 10, "distance": "power", "power_a": 2.0},
])
def test_mqar_labels(config):
    task = build_task({"name": "mqar", "num_eval": 300, **config})
    assert task.kind == "lm" and task.unit == "query"
    assert task.vocab_size == 3 + task.config.key_vocab + task.config.value_vocab
    _check_mqar(task, 300)
    batch = next(task.batches("eval", 8))
    assert batch["input_ids"].shape == (8, task.config.seq_length) and batch["attention_mask"].all()


def test_mqar_determinism_splits_and_distance():
    base = {"name": "mqar", "seq_length": 128, "num_pairs": 8, "num_eval": 500}
    task = build_task(base)
    same = build_task(base)
    assert [task.split("eval").raw(i) for i in range(500)] == [same.split("eval").raw(i) for i in range(500)]
    assert task.split("train").raw(77) == same.split("train").raw(77)
    assert build_task({**base, "seed": 1}).split("eval").raw(0) != task.split("eval").raw(0)
    evals = {tuple(task.split("eval").raw(i)[0]) for i in range(500)}
    assert len(evals) == 500 and not evals & {tuple(task.split("train").raw(i)[0]) for i in range(1000)}

    def mean_slot(**over):
        t = build_task({**base, **over})
        labels = [t.split("eval").raw(i)[1] for i in range(500)]
        slots = [(p - 16) // 2 for row in labels for p, x in enumerate(row) if x != IGNORE_INDEX]
        return sum(slots) / len(slots)

    uniform = mean_slot(distance="uniform")
    assert abs(uniform - 27.5) < 1.5  # 8 of 56 slots, equally likely: mean 27.5
    assert mean_slot(distance="power", power_a=0.01) < uniform - 5 < uniform + 5 < mean_slot(power_a=3.0)


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
    labels_only = _write(tmp_path / "c.parquet", label=[0, 1, 0, 1])  # lm takes 'input_ids' (tests/test_text_tasks.py) or 'text'
    with pytest.raises(ValueError, match="lacks column.*'input_ids'.*needed for kind='lm'"):
        build_task({"name": "parquet", "path": labels_only, "kind": "lm"})
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
    ({"name": "mqar", "num_pairs": 0}, r"MQARConfig\.num_pairs must be >= 1"),
    ({"name": "mqar", "num_pairs": 16, "key_vocab": 8}, r"MQARConfig\.key_vocab=8 .*raise key_vocab"),
    ({"name": "mqar", "num_queries": 17}, r"MQARConfig\.num_queries must be in \[1, num_pairs=16\]"),
    ({"name": "mqar", "seq_length": 40, "num_pairs": 16}, r"MQARConfig\.seq_length=40 .*seq_length >= 64"),
    ({"name": "mqar", "power_a": 0.0}, r"MQARConfig\.power_a must be"),
    ({"name": "mqar", "distance": "log"}, r"MQARConfig\.distance.*'uniform', 'power'"),
    ({"name": "mqar", "value_vocab": 1}, r"MQARConfig\.value_vocab must be >= 2"),
    ({"name": "mqar", "num_eval": 0}, r"MQARConfig\.num_eval must be >= 1"),
    ({"name": "mqar", "causal": "yes"}, r"MQARConfig\.causal.*true or false"),
    ({"name": "masked_bytes", "mask_rate": 0.0}, r"MaskedBytesConfig\.mask_rate must be in \(0, 1\)"),
    ({"name": "masked_bytes", "mask_rate": 1.0}, r"MaskedBytesConfig\.mask_rate"),
    ({"name": "masked_bytes", "mask_span": 0.5}, r"MaskedBytesConfig\.mask_span must be >= 1"),
    ({"name": "masked_bytes", "replace": "random"}, r"MaskedBytesConfig\.replace.*'mask', 'bert'"),
    ({"name": "masked_bytes", "max_length": 1}, r"MaskedBytesConfig\.max_length must be >= 2"),
    ({"name": "masked_bytes", "eval_fraction": 0.0}, r"MaskedBytesConfig\.eval_fraction"),
])
def test_config_validation(config, match):
    with pytest.raises(ValueError, match=match) as err:
        build_task(config)
    assert "\n" not in str(err.value)  # one line


def test_config_presets_and_round_trip():
    cfg = ListOpsConfig.from_dict({"preset": "lra", "max_depth": 6})
    assert cfg.max_depth == 6 and cfg.min_length == LISTOPS_PRESETS["lra"]["min_length"]
    as_dict = cfg.to_dict()
    assert as_dict["name"] == "listops" and ListOpsConfig.from_dict(as_dict) == cfg
    for name, cls in TASKS.items():
        if name not in ("parquet", "text_lm", "masked_text"):  # these need a path (data, tokenizer)
            default = cls.config_class()
            assert cls.config_class.from_dict(default.to_dict()) == default
    with pytest.raises(ValueError, match="name"):
        ListOpsConfig.from_dict({"name": "copy"})
