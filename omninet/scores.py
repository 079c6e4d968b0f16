"""Per-unit eval scores and the paired statistics that compare two trials on them.

A *unit* is what a task scores once: an ``example`` (classification: one label per eval row),
a ``token`` (a language model's next or masked byte) or a ``query`` (one associative-recall
query). Units of one eval row are not independent (a row that is hard is hard for all its
tokens), so every standard error and interval here is *clustered by row*: rows are the
independent draws, units are summed within their row.

    s = UnitScores(unit="token", correct=..., loss=..., row=...)   # from Task.new_meter().scores()
    s.accuracy, s.accuracy_se                # value and its clustered standard error
    d = paired_difference(a, b)              # a - b on the eval rows both scored
    d.diff, d.lo, d.hi, d.p_value            # 95% paired-bootstrap interval; McNemar p for examples

All trials of a sweep evaluate the same eval rows in the same order (``eval_hash`` names that
order), and an evaluation sized by a target standard error stops after a number of whole rows,
so two trials always share a prefix of rows: the pairing is on that prefix.

Dimensions: U scored units, R eval rows, Bs bootstrap resamples.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["UNITS", "UnitScores", "PairedDifference", "paired_difference", "mcnemar_exact", "combine_seeds",
           "clustered_se", "clustered_se_from_totals", "eval_hash", "BOOTSTRAP_SAMPLES"]

UNITS = ("example", "token", "query")
BOOTSTRAP_SAMPLES = 2000
Z975 = 1.959963984540054


def eval_hash(ids: Iterable[Iterable[int]]) -> str:
    """A short hash of eval rows' token ids in order: equal for two trials iff they scored the
    same rows in the same order."""
    h = hashlib.sha256()
    for row in ids:
        h.update(np.asarray(row, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _row_sums(values: np.ndarray, row: np.ndarray, rows: int) -> np.ndarray:
    return np.bincount(row, weights=values.astype(np.float64), minlength=rows)  # [R]


def clustered_se(values: np.ndarray, row: np.ndarray) -> float:
    """Standard error of the mean of ``values`` over units, clustered by ``row`` (the ratio
    estimator's linearization: sqrt(R / (R - 1) * sum_r (s_r - m n_r)^2) / U). With one unit per
    row it is the ordinary standard error of a mean. NaN with fewer than two rows."""
    if values.size == 0:
        return math.nan
    rows = int(row.max()) + 1
    return clustered_se_from_totals(_row_sums(values, row, rows), np.bincount(row, minlength=rows))


def clustered_se_from_totals(sums: np.ndarray, counts: np.ndarray) -> float:
    """``clustered_se`` from per-row totals: ``sums[r]`` of the values and ``counts[r]`` units
    of row r (rows without units are left out). What a running evaluation checks per batch."""
    n = np.asarray(counts, dtype=np.float64)
    keep = n > 0
    s, n = np.asarray(sums, dtype=np.float64)[keep], n[keep]
    r = int(keep.sum())
    if r < 2:
        return math.nan
    m = s.sum() / n.sum()
    return math.sqrt(r / (r - 1) * float(((s - m * n) ** 2).sum())) / float(n.sum())


@dataclass
class UnitScores:
    """One trial's eval scores, one entry per scored unit, in eval order: ``correct`` (bool),
    ``loss`` (nats, float32) and ``row`` (the eval row each unit belongs to: non-decreasing
    ints from 0). ``eval_hash`` names the ordered eval rows they came from."""

    unit: str
    correct: np.ndarray  # [U] bool
    loss: np.ndarray  # [U] float32
    row: np.ndarray  # [U] int32
    eval_hash: str | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        self.correct = np.asarray(self.correct, dtype=bool).reshape(-1)
        self.loss = np.asarray(self.loss, dtype=np.float32).reshape(-1)
        self.row = np.asarray(self.row, dtype=np.int32).reshape(-1)
        if not (self.correct.size == self.loss.size == self.row.size):
            raise ValueError(f"scores: correct, loss and row must have one entry per unit; got "
                             f"{self.correct.size}, {self.loss.size}, {self.row.size}")
        if self.row.size and (self.row[0] < 0 or np.any(np.diff(self.row) < 0)):
            raise ValueError("scores: row must be non-decreasing from 0 (units in eval order)")

    @property
    def units(self) -> int:
        return int(self.correct.size)

    @property
    def rows(self) -> int:
        """Eval rows scored (a row with nothing to score still counts when a later row does)."""
        return int(self.row[-1]) + 1 if self.row.size else 0

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if self.units else math.nan

    @property
    def accuracy_se(self) -> float:
        return clustered_se(self.correct, self.row)

    @property
    def loss_mean(self) -> float:
        return float(self.loss.astype(np.float64).mean()) if self.units else math.nan

    @property
    def loss_se(self) -> float:
        return clustered_se(self.loss, self.row)

    def prefix(self, rows: int) -> "UnitScores":
        """The units of the first ``rows`` eval rows."""
        stop = int(np.searchsorted(self.row, rows, side="left"))
        return UnitScores(self.unit, self.correct[:stop], self.loss[:stop], self.row[:stop], self.eval_hash)

    def summary(self) -> dict[str, float | int | str | None]:
        """The flat facts a trial records next to its metric."""
        return {"eval_unit": self.unit, "eval_units": self.units, "eval_rows": self.rows,
                "accuracy_se": _finite_or_none(self.accuracy_se), "eval_loss_se": _finite_or_none(self.loss_se),
                "eval_hash": self.eval_hash}

    # -- storage: a compact artifact (bit-packed correctness, float16 loss, row as run lengths) --
    def to_bytes(self) -> bytes:
        rows = self.rows
        counts = np.bincount(self.row, minlength=rows).astype(np.int32) if rows else np.zeros(0, np.int32)
        buf = io.BytesIO()
        np.savez_compressed(buf, unit=np.array(self.unit), correct=np.packbits(self.correct),
                            units=np.array(self.units, dtype=np.int64), loss=self.loss.astype(np.float16),
                            units_per_row=counts, eval_hash=np.array(self.eval_hash or ""))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "UnitScores":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            units = int(z["units"])
            correct = np.unpackbits(z["correct"], count=units).astype(bool)
            row = np.repeat(np.arange(z["units_per_row"].size, dtype=np.int32), z["units_per_row"])
            return cls(str(z["unit"]), correct, z["loss"].astype(np.float32), row, str(z["eval_hash"]) or None)

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "UnitScores":
        return cls.from_bytes(Path(path).read_bytes())


def _finite_or_none(v: float) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: ``b`` units right under A
    only, ``c`` under B only. Under H0 each discordant unit is A's with probability 1/2, so
    p = min(1, 2 P[Binomial(b + c, 1/2) <= min(b, c)])."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    # sum_{i<=k} C(n, i) / 2^n in log space (n can be large)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return min(1.0, 2.0 * tail)


@dataclass
class PairedDifference:
    """``a - b`` of one metric on the same eval rows: the difference, its clustered standard
    error, a 95% interval (``method``: 'bootstrap' over rows, or 't over seeds'), McNemar's exact
    p for 0/1 example scores, and what the interval covers: 'eval' (which eval rows were drawn;
    one training run of each side) or 'eval+seed' (training seeds too)."""

    metric: str
    diff: float
    se: float
    lo: float
    hi: float
    rows: int
    units: int
    method: str
    covers: str
    p_value: float | None = None
    discordant: tuple[int, int] | None = None
    seeds: int = 1

    @property
    def distinguishable(self) -> bool:
        """The 95% interval excludes 0."""
        return bool(self.lo > 0 or self.hi < 0)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "diff": self.diff, "se": _finite_or_none(self.se), "lo": self.lo,
                "hi": self.hi, "rows": self.rows, "units": self.units, "method": self.method, "covers": self.covers,
                "p_value": self.p_value, "discordant": list(self.discordant) if self.discordant else None,
                "seeds": self.seeds, "distinguishable": self.distinguishable}


def _aligned(a: UnitScores, b: UnitScores) -> tuple[UnitScores, UnitScores]:
    if a.unit != b.unit:
        raise ValueError(f"paired_difference: the two trials scored different units ({a.unit!r} vs {b.unit!r})")
    if a.eval_hash and b.eval_hash and a.eval_hash != b.eval_hash:
        raise ValueError("paired_difference: the two trials evaluated different eval sets (eval_hash differs); "
                         "only trials of one task and eval split can be paired")
    rows = min(a.rows, b.rows)
    a, b = a.prefix(rows), b.prefix(rows)
    if a.units != b.units or not np.array_equal(a.row, b.row):
        raise ValueError("paired_difference: the two trials scored different units on the same rows; "
                         "they do not share an eval set")
    return a, b


def paired_difference(a: UnitScores, b: UnitScores, *, metric: str = "accuracy", samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> PairedDifference:
    """``a - b`` in ``metric`` ('accuracy' or 'loss') on the eval rows both scored, with a 95%
    paired bootstrap interval: rows are resampled with replacement and both trials' units of a
    drawn row move together (so the row's difficulty cancels). For 0/1 accuracy the exact
    McNemar p over the discordant units comes with it (exact for example units; for token or
    query units it treats units as independent, so read the interval instead)."""
    a, b = _aligned(a, b)
    if metric == "accuracy":
        va, vb = a.correct.astype(np.float64), b.correct.astype(np.float64)
    elif metric == "loss":
        va, vb = a.loss.astype(np.float64), b.loss.astype(np.float64)
    else:
        raise ValueError(f"metric must be 'accuracy' or 'loss', got {metric!r}")
    rows, units = a.rows, a.units
    if units == 0:
        raise ValueError("paired_difference: no scored unit in common")
    d = va - vb  # [U]
    diff = float(d.mean())
    se = clustered_se(d, a.row)
    s = _row_sums(d, a.row, rows)  # [R] per-row summed differences
    n = np.bincount(a.row, minlength=rows).astype(np.float64)  # [R]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, rows, size=(samples, rows))  # [Bs, R]
    boot = s[draws].sum(1) / np.maximum(n[draws].sum(1), 1.0)  # [Bs]
    lo, hi = (float(x) for x in np.quantile(boot, [0.025, 0.975]))
    p_value = discordant = None
    if metric == "accuracy":
        only_a = int((a.correct & ~b.correct).sum())
        only_b = int((b.correct & ~a.correct).sum())
        discordant, p_value = (only_a, only_b), mcnemar_exact(only_a, only_b)
    return PairedDifference(metric, diff, se, lo, hi, rows, units, "bootstrap", "eval", p_value, discordant)


def _t975(dof: int) -> float:
    table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]
    return table[dof - 1] if 1 <= dof <= len(table) else (2.0 if dof <= 30 else Z975)


def combine_seeds(per_seed: list[PairedDifference]) -> PairedDifference:
    """Several training seeds of one configuration, each paired with the reference: the mean
    difference with a t-interval over seeds, which covers training variance as well as the
    eval draw (each seed's difference carries both). One seed: returned as it is ('eval')."""
    if not per_seed:
        raise ValueError("combine_seeds: no paired difference given")
    if len(per_seed) == 1:
        return per_seed[0]
    diffs = np.array([p.diff for p in per_seed])
    k = len(diffs)
    mean = float(diffs.mean())
    se = float(diffs.std(ddof=1) / math.sqrt(k))
    # the eval part alone can be larger than the spread of k few seeds shows: never narrower than it
    eval_se = math.sqrt(sum((p.se if math.isfinite(p.se) else 0.0) ** 2 for p in per_seed)) / k
    se = max(se, eval_se)
    half = _t975(k - 1) * se
    first = per_seed[0]
    return PairedDifference(first.metric, mean, se, mean - half, mean + half, min(p.rows for p in per_seed),
                            min(p.units for p in per_seed), "t over seeds", "eval+seed", seeds=k)
