"""Tests for omninet.scores against hand-computed cases: McNemar's exact p, the clustered standard
error, paired bootstrap differences, the stored artifact, prefix pairing and seed combination."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omninet.scores import (UnitScores, clustered_se, clustered_se_from_totals, combine_seeds, eval_hash,
                            mcnemar_exact, paired_difference)


def _examples(correct, loss=None, **kw) -> UnitScores:
    correct = np.asarray(correct, dtype=bool)
    loss = np.zeros(correct.size) if loss is None else loss
    return UnitScores("example", correct, loss, np.arange(correct.size), **kw)


@pytest.mark.parametrize("b,c,p", [
    (1, 6, 2 * (1 + 7) / 128),  # P[Bin(7, 1/2) <= 1] = (C(7,0) + C(7,1)) / 2^7
    (6, 1, 2 * (1 + 7) / 128),
    (0, 5, 2 / 32),
    (3, 3, 1.0),  # 2 * P[Bin(6, 1/2) <= 3] = 2 * 42/64 > 1 -> 1
    (0, 0, 1.0),
    (2, 8, 2 * (1 + 10 + 45) / 1024),
])
def test_mcnemar_exact_small_tables(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_large_counts_stay_finite():
    p = mcnemar_exact(4000, 4200)
    assert 0.0 < p < 0.05 and mcnemar_exact(100_000, 100_000) == pytest.approx(1.0)


def test_clustered_se_one_unit_per_row_is_the_standard_error_of_the_mean():
    rng = np.random.default_rng(0)
    values = rng.random(50)
    assert clustered_se(values, np.arange(50)) == pytest.approx(values.std(ddof=1) / math.sqrt(50), rel=1e-12)
    bits = rng.random(200) < 0.3
    s = _examples(bits)
    assert s.accuracy_se == pytest.approx(bits.std(ddof=1) / math.sqrt(200), rel=1e-12)


def test_clustered_se_hand_case():
    # rows 0, 1, 2 with 2, 1, 3 units: totals s = [1, 1, 2], mean m = 4/6, residuals s - m n = [-1/3, 1/3, 0]
    # -> sqrt(3/2 * 2/9) / 6
    values, row = np.array([1, 0, 1, 1, 1, 0.0]), np.array([0, 0, 1, 2, 2, 2])
    expected = math.sqrt(1.5 * 2 / 9) / 6
    assert clustered_se(values, row) == pytest.approx(expected, rel=1e-12)
    assert clustered_se_from_totals(np.array([1.0, 1, 0, 2]), np.array([2, 1, 0, 3])) == pytest.approx(expected)
    assert math.isnan(clustered_se(np.array([1.0, 0.0]), np.array([0, 0])))  # one row: no spread to see
    assert math.isnan(clustered_se(np.zeros(0), np.zeros(0, dtype=int)))


def test_identical_scores_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    correct = rng.random(300) < 0.6
    a = UnitScores("token", correct, rng.random(300), np.repeat(np.arange(30), 10))
    d = paired_difference(a, a)
    assert (d.diff, d.lo, d.hi, d.se) == (0.0, 0.0, 0.0, 0.0)
    assert d.p_value == 1.0 and d.discordant == (0, 0) and not d.distinguishable
    assert (d.rows, d.units, d.method, d.covers) == (30, 300, "bootstrap", "eval")
    loss = paired_difference(a, a, metric="loss")
    assert (loss.diff, loss.lo, loss.hi, loss.p_value) == (0.0, 0.0, 0.0, None)


def test_paired_difference_known_case():
    a = _examples([1, 1, 1, 0, 1, 0, 1, 1])
    b = _examples([1, 0, 0, 0, 1, 1, 0, 1])
    d = paired_difference(a, b)
    assert d.diff == pytest.approx(2 / 8) and d.discordant == (3, 1)
    assert d.p_value == pytest.approx(mcnemar_exact(3, 1)) == pytest.approx(2 * 5 / 16)
    per_row = np.array([0, 1, 1, 0, 0, -1, 1, 0.0])
    assert d.se == pytest.approx(per_row.std(ddof=1) / math.sqrt(8))
    assert d.lo <= d.diff <= d.hi


def test_bootstrap_interval_covers_the_true_difference():
    # u ~ U(0, 1) per row; A is right when u < 0.7, B when u < 0.6: the true difference is 0.1 and
    # a row where B is right is always right for A (strongly paired, as two similar models are).
    covered, rows = 0, 400
    for sim in range(40):
        rng = np.random.default_rng(100 + sim)
        u = rng.random(rows)
        a, b = _examples(u < 0.7), _examples(u < 0.6)
        d = paired_difference(a, b, samples=1000, seed=sim)
        covered += d.lo <= 0.1 <= d.hi
        assert d.lo > 0 and d.distinguishable and d.p_value < 1e-4
    assert covered >= 34  # 95% nominal: 38 expected of 40, 34 is 2.5 sd below


def test_bootstrap_interval_clustered_tokens():
    # tokens of a row share the row's difficulty; the interval is over rows, so it is about as wide
    # as the row-level spread says, and it covers the true difference
    rng = np.random.default_rng(7)
    rows, per = 300, 20
    hard = np.repeat(rng.random(rows), per)  # [U] a row's difficulty
    noise = rng.random(rows * per)
    row = np.repeat(np.arange(rows), per)
    a = UnitScores("token", noise > hard * 0.9, np.zeros(rows * per), row)
    b = UnitScores("token", noise > hard * 0.9 + 0.05, np.zeros(rows * per), row)
    d = paired_difference(a, b)
    assert d.lo < 0.05 < d.hi and d.rows == rows and d.units == rows * per


def test_to_bytes_round_trip():
    rng = np.random.default_rng(3)
    row = np.sort(rng.integers(0, 40, 500))
    row[row == 7] = 8  # row 7 scored nothing: it still has its place
    row -= row[0]
    s = UnitScores("query", rng.random(500) < 0.5, rng.random(500) * 5, row, "abc123")
    back = UnitScores.from_bytes(s.to_bytes())
    assert back.unit == "query" and back.eval_hash == "abc123" and back.rows == s.rows
    assert (back.correct == s.correct).all() and (back.row == s.row).all()
    assert np.allclose(back.loss, s.loss, rtol=1e-3, atol=1e-3)  # stored as float16
    none = UnitScores.from_bytes(_examples([1, 0, 1]).to_bytes())
    assert none.eval_hash is None and none.correct.tolist() == [True, False, True]
    empty = UnitScores.from_bytes(UnitScores("token", [], [], []).to_bytes())
    assert empty.units == 0 and empty.rows == 0


def test_save_load(tmp_path):
    s = _examples([1, 0, 0, 1], eval_hash="h")
    s.save(tmp_path / "sub" / "scores.npz")
    back = UnitScores.load(tmp_path / "sub" / "scores.npz")
    assert back.correct.tolist() == s.correct.tolist() and back.eval_hash == "h"


def test_prefix_pairing_when_one_trial_scored_more_rows():
    rng = np.random.default_rng(5)
    row = np.repeat(np.arange(10), 3)
    full = UnitScores("token", rng.random(30) < 0.5, rng.random(30), row, "same")
    short = UnitScores("token", rng.random(18) < 0.5, rng.random(18), row[:18], "same")  # stopped after 6 rows
    d = paired_difference(full, short)
    assert d.rows == 6 and d.units == 18
    assert d.diff == pytest.approx(full.correct[:18].mean() - short.correct.mean())
    assert d.diff == pytest.approx(-paired_difference(short, full).diff)
    assert full.prefix(6).units == 18 and full.prefix(100).units == 30


def test_pairing_refuses_other_eval_sets():
    a = _examples([1, 0, 1], eval_hash="x")
    with pytest.raises(ValueError, match="eval_hash"):
        paired_difference(a, _examples([1, 0, 1], eval_hash="y"))
    with pytest.raises(ValueError, match="different units"):
        paired_difference(a, UnitScores("token", [1, 0, 1], [0, 0, 0], [0, 1, 2]))
    with pytest.raises(ValueError, match="different units on the same rows"):
        paired_difference(UnitScores("token", [1, 0, 1], [0, 0, 0], [0, 0, 1]),
                          UnitScores("token", [1, 0, 1], [0, 0, 0], [0, 1, 1]))
    with pytest.raises(ValueError, match="metric"):
        paired_difference(a, a, metric="f1")


def test_combine_seeds_covers_eval_and_seed():
    rng = np.random.default_rng(11)
    ref = _examples(rng.random(200) < 0.5)
    per_seed = [paired_difference(_examples(rng.random(200) < 0.5 + 0.05 * k), ref) for k in range(4)]
    c = combine_seeds(per_seed)
    diffs = np.array([p.diff for p in per_seed])
    assert c.covers == "eval+seed" and c.method == "t over seeds" and c.seeds == 4
    assert c.diff == pytest.approx(diffs.mean())
    eval_se = math.sqrt(sum(p.se ** 2 for p in per_seed)) / 4
    assert c.se == pytest.approx(max(diffs.std(ddof=1) / 2, eval_se))
    assert c.hi - c.diff == pytest.approx(3.182 * c.se)  # t(0.975, 3 dof)
    assert combine_seeds(per_seed[:1]) is per_seed[0] and per_seed[0].covers == "eval"
    with pytest.raises(ValueError, match="no paired difference"):
        combine_seeds([])


def test_unit_scores_checks_and_eval_hash():
    with pytest.raises(ValueError, match="unit must be one of"):
        UnitScores("sentence", [1], [0], [0])
    with pytest.raises(ValueError, match="one entry per unit"):
        UnitScores("token", [1, 0], [0], [0, 0])
    with pytest.raises(ValueError, match="non-decreasing"):
        UnitScores("token", [1, 0], [0, 0], [1, 0])
    assert eval_hash([[1, 2], [3]]) == eval_hash([np.array([1, 2]), (3,)]) != eval_hash([[1], [2, 3]])
    summary = _examples([1, 0], eval_hash="h").summary()
    assert summary["eval_unit"] == "example" and summary["eval_units"] == 2 and summary["eval_rows"] == 2
