"""Multi-objective successive halving with measure-first screening (``scheduler.kind:
mo_successive_halving``).

Optuna cannot prune multi-objective studies (``Trial.report`` raises for more than one
direction) and Ray Tune's ASHA ranks one metric, so the rung decisions are made here, in the
spirit of Syne Tune's MOASHA (Salinas et al., 2021): at every rung a trial is ranked among the
trials of its pool that reached that rung before it, by non-dominated sorting (Optuna's) on
(first objective at the rung, cost objectives), fronts broken by an epsilon-net that keeps the
selection spread along the front; the top ``1 / reduction_factor`` go on. Asynchronous like
ASHA: a trial is judged when it arrives, against whoever is there; nobody waits for a rung to
fill.

The first objective at a rung is an estimate (accuracy on a finite eval split), so the ranking
only counts differences beyond its noise: with standard errors reported, two trials whose first
objectives are within ``noise_z`` standard errors of their difference tie on it, and the costs
decide (:func:`tolerant_ranks`). Without that, a rung ranks eval noise whenever the
configurations learn alike at that budget, and prunes cheap configurations for a 1-2 point
accuracy gap no larger than the split's sampling error.

Before a trial trains, it measures its untrained model (the cost objectives do not depend on
training) and asks :meth:`RungBook.screen`: a configuration that violates the pool's
constraints, or that ``screen_dominated_by`` finished trials beat in every cost objective, stops
there (``screened``).

The book is a plain class; the controller runs it as one Ray actor per sweep (workers report to
it through a :class:`RungClient`) and rebuilds it from the Parquet rows when it resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from optuna.study._multi_objective import _fast_non_domination_rank

__all__ = ["PoolRules", "RungBook", "RungClient", "nondominated_order", "epsilon_net", "tolerant_ranks"]


def epsilon_net(points: np.ndarray) -> list[int]:
    """An order of ``points`` (n, m; minimized, normalized) that spreads out: the point best in
    the first objective, then repeatedly the point farthest (Euclidean) from those already
    chosen. MOASHA's epsilon-net tie-break; hand-written because no library we use has it."""
    n = len(points)
    if n == 0:
        return []
    chosen = [int(np.argmin(points[:, 0]))]
    dist = np.linalg.norm(points - points[chosen[0]], axis=1)
    dist[chosen[0]] = -1.0
    while len(chosen) < n:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
        dist[chosen] = -1.0
    return chosen


def tolerant_ranks(points: np.ndarray, tolerance: np.ndarray) -> np.ndarray:
    """Non-domination ranks (0 = the front) of ``points`` (n, m; every objective minimized) when
    the first objective only counts beyond its noise: ``a`` dominates ``b`` when ``a`` is no
    worse in every other objective, its first objective is not worse than ``b``'s by more than
    ``tolerance[a, b]``, and it is better somewhere (in the first objective by more than the
    tolerance, or in another objective). With zero tolerance this is Pareto dominance. The
    relation has no cycles (one would need equal costs and each first objective beyond the
    next by more than the tolerance), so peeling off fronts ends."""
    p = np.asarray(points, dtype=float)
    tol = np.nan_to_num(np.asarray(tolerance, dtype=float), nan=0.0)
    first, costs = p[:, :1], p[:, 1:]
    no_worse = (costs[:, None, :] <= costs[None, :, :]).all(-1)
    cheaper = (costs[:, None, :] < costs[None, :, :]).any(-1)
    within = first <= first.T + tol
    clearly_better = first < first.T - tol
    dominates = no_worse & within & (clearly_better | cheaper)  # [a, b]: a dominates b
    np.fill_diagonal(dominates, False)
    ranks = np.full(len(p), -1)
    remaining, rank = np.ones(len(p), dtype=bool), 0
    while remaining.any():
        front = remaining & ~dominates[remaining].any(axis=0)
        ranks[front] = rank
        remaining &= ~front
        rank += 1
    return ranks


def nondominated_order(points: np.ndarray, tolerance: np.ndarray | None = None) -> list[int]:
    """Indices of ``points`` (n, m; every objective minimized) best first: by non-dominated
    front (Optuna's fast non-dominated sort; :func:`tolerant_ranks` with a ``tolerance`` (n, n)
    on the first objective), within a front by :func:`epsilon_net` on values normalized to
    [0, 1] over all points."""
    points = np.asarray(points, dtype=float)
    if len(points) == 0:
        return []
    ranks = _fast_non_domination_rank(points) if tolerance is None else tolerant_ranks(points, tolerance)
    span = points.max(axis=0) - points.min(axis=0)
    normalized = (points - points.min(axis=0)) / np.where(span > 0, span, 1.0)
    order: list[int] = []
    for rank in sorted(set(int(r) for r in ranks)):
        members = np.flatnonzero(ranks == rank)
        order += [int(members[i]) for i in epsilon_net(normalized[members])]
    return order


@dataclass
class PoolRules:
    """What the book needs to know about a pool: its rungs (training steps), the reduction
    factor, the first objective's direction, the cost objectives (minimized), the pool's
    constraints on measured figures and the screening rule."""

    rungs: list[int]
    reduction_factor: int = 3
    maximize: bool = True
    cost_keys: list[str] = field(default_factory=lambda: ["peak_memory_infer_mb", "latency_p50_ms"])
    limits: dict[str, float] = field(default_factory=dict)  # measured key -> upper bound
    screen_dominated_by: int | None = 3
    cost_margin: float = 0.05
    noise_z: float = 1.0  # first objectives within this many standard errors of their difference tie at a rung


class RungBook:
    """Every pool's rung records, measure-first costs and finished trials (the actor's state)."""

    def __init__(self, rules: dict[str, PoolRules]) -> None:
        self.rules = rules
        self.costs: dict[str, dict[int, tuple[float, ...]]] = {p: {} for p in rules}
        self.rung: dict[str, dict[int, dict[int, float]]] = {p: {} for p in rules}  # pool -> step -> trial -> value
        self.noise: dict[str, dict[int, dict[int, float]]] = {p: {} for p in rules}  # ... -> its standard error
        self.finished: dict[str, set[int]] = {p: set() for p in rules}  # trials that trained to the budget

    # -- measure first --------------------------------------------------------------------------
    def screen(self, pool: str, trial: int, measured: dict[str, Any]) -> str | None:
        """The reason to stop ``trial`` before training, or None. Its costs are kept for its rungs."""
        rules = self.rules[pool]
        for key, limit in rules.limits.items():
            value = measured.get(key)
            if _finite(value) and value > limit:
                return f"screened: measured {key} {value:.4g} > the pool's limit {limit:.4g} (before training)"
        costs = tuple(float(measured[k]) if _finite(measured.get(k)) else math.inf for k in rules.cost_keys)
        self.costs[pool][trial] = costs
        need = rules.screen_dominated_by
        if need is None:
            return None
        cheaper = 1.0 + rules.cost_margin
        by = sorted(t for t in self.finished[pool] if t != trial and t in self.costs[pool]
                    and all(c * cheaper <= own for c, own in zip(self.costs[pool][t], costs)))
        if len(by) >= need:
            return (f"screened: cost-dominated by {len(by)} finished trials (#{', #'.join(map(str, by[:5]))}), each more "
                    f"than {rules.cost_margin:.0%} cheaper in {', '.join(rules.cost_keys)}; it would have to beat all of "
                    "them to reach the front")
        return None

    # -- rungs ----------------------------------------------------------------------------------
    def report(self, pool: str, trial: int, step: int, value: float, noise: float | None = None) -> str | None:
        """Records ``trial``'s first objective at rung ``step`` (and its standard error
        ``noise``, when known); the reason to stop it, or None when it is among the top
        ``1 / reduction_factor`` of the trials at this rung."""
        rules = self.rules[pool]
        records = self.rung[pool].setdefault(int(step), {})
        records[trial] = float(value)
        errors = self.noise[pool].setdefault(int(step), {})
        if _finite(noise):
            errors[trial] = float(noise)
        trials = sorted(records)
        points = np.array([[(-records[t] if rules.maximize else records[t])
                            if math.isfinite(records[t]) else math.inf, *self.costs[pool].get(t, ())] for t in trials])
        tolerance = None
        if rules.noise_z > 0 and errors:
            se = np.array([errors.get(t, 0.0) for t in trials])
            tolerance = rules.noise_z * np.sqrt(se[:, None] ** 2 + se[None, :] ** 2)
        order = [trials[i] for i in nondominated_order(points, tolerance)]
        keep = max(1, math.ceil(len(trials) / rules.reduction_factor))
        position = order.index(trial)
        if position < keep:
            return None
        ties = "" if tolerance is None else (f"; first objectives within {rules.noise_z:g} standard error(s) of their "
                                             f"difference tie (this one's: {errors.get(trial, 0.0):.3g})")
        return (f"pruned at rung {step} steps: ranked {position + 1} of {len(trials)} by non-dominated sorting on "
                f"(first objective {value:.4g}, {', '.join(rules.cost_keys)}){ties}; the top {keep} go on")

    def finish(self, pool: str, trial: int, costs: dict[str, Any] | None = None) -> None:
        """``trial`` trained to the full budget (its costs, when the book has not seen them)."""
        rules = self.rules[pool]
        if costs is not None and trial not in self.costs[pool]:
            self.costs[pool][trial] = tuple(float(costs[k]) if _finite(costs.get(k)) else math.inf
                                            for k in rules.cost_keys)
        self.finished[pool].add(trial)

    def restore(self, pool: str, trial: int, row: dict[str, Any], steps: list[int], values: list[float],
                noises: list[float | None] | None = None) -> None:
        """A recorded trial, from its Parquet row (a resumed controller's new book)."""
        rules = self.rules[pool]
        if all(_finite(row.get(k)) for k in rules.cost_keys):
            self.costs[pool][trial] = tuple(float(row[k]) for k in rules.cost_keys)
        noises = [*(noises or []), *[None] * len(steps)]  # records written before rung_noise have none
        for step, value, noise in zip(steps, values, noises):
            self.rung[pool].setdefault(int(step), {})[trial] = float(value) if value is not None else math.nan
            if _finite(noise):
                self.noise[pool].setdefault(int(step), {})[trial] = float(noise)
        if row.get("status") == "ok":
            self.finished[pool].add(trial)

    def state(self, pool: str) -> dict[str, Any]:
        return {"rungs": {s: dict(r) for s, r in sorted(self.rung[pool].items())}, "finished": sorted(self.finished[pool]),
                "costs": dict(self.costs[pool])}


@dataclass
class RungClient:
    """What a trial's runner holds (``RunContext.scheduler``): its pool, number and rungs, and
    the book (a Ray actor handle under a sweep, or a plain :class:`RungBook`)."""

    book: Any
    pool: str
    trial: int
    rungs: list[int]
    remeasure: bool = False
    limits: dict[str, float] = field(default_factory=dict)  # the pool's limits on measured figures (a latency probe)

    def _call(self, name: str, *args):
        method = getattr(self.book, name)
        if hasattr(method, "remote"):
            import ray  # heavy: ray

            return ray.get(method.remote(*args))
        return method(*args)

    def screen(self, measured: dict[str, Any]) -> str | None:
        plain = {k: v for k, v in measured.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return self._call("screen", self.pool, self.trial, plain)

    def report(self, step: int, value: float, noise: float | None = None) -> str | None:
        """``noise``: the standard error of ``value`` (the binomial one of an accuracy on n eval examples)."""
        return self._call("report", self.pool, self.trial, int(step), float(value),
                          None if noise is None else float(noise))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
