"""A per-pool cost model: configuration features and shape -> latency and memory, fitted online
on the pool's measured trials (``cost_model:`` in the sweep YAML).

- **Features** come from the trial runner (``runner.cost_features(config)``: for OmniNet, work
  and byte counts per kernel and precision, ``omninet.trial.cost``); a runner without them is
  described by its searched parameters (numbers as they are, choices one-hot).
- **Regressor**: scikit-learn, a non-negative ridge regression on those features (a roofline: the
  weights are this pool's seconds per multiply-add and bytes per counted byte), fitted to
  relative error (weights 1 / y^2), so a pool is described by a handful of trials.
- **Latency** is learned from and judged against the calibrated latency at the pool's reference
  speed when trials record it (``MEASURED_AS``): the raw p50 carries the host's speed drift.
  The latency ratio to the pool's reference (``latency_ratio_ref``, paired timing) is a target
  of its own on the latency's features (``FEATURES_OF``), so a ``max_latency_ratio`` constraint
  screens on a predicted ratio.
- **Validation**: every ``holdout_every``-th measured trial of a pool is held out: never fitted,
  only predicted. ``validation()`` fits on the fit split and reports, per target, the mean
  absolute percentage error and the shares within +-10% and +-15% on the held-out split (the
  way nn-Meter reports it). A trial screened on a prediction has no measurement and is in
  neither split; its prediction and the model's held-out error are recorded with it.
- **Seeding**: a pool with fewer than ``min_fit`` fitted trials of its own predicts with the
  ``seed_from`` pool's model times a per-pool scale, the geometric mean of measured / predicted
  over the trials it has measured (fit split).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CostModel", "Sample", "measured_value", "param_features"]

TARGETS = ("latency_p50_ms", "peak_memory_infer_mb", "peak_memory_train_mb", "latency_ratio_ref")
# A target described by another's features: the latency ratio to the pool's reference (timed side
# by side, ``measure.paired``) is the configuration's time over one fixed model's, so the same
# roofline counts predict it, with weights in units of the reference's time; it is learned from
# the ratios themselves, which carry neither the host's drift nor the moment of measurement.
FEATURES_OF = {"latency_ratio_ref": "latency_p50_ms"}
# What a target is learned from and judged against, first available: latency at the pool's
# reference speed (calibrated, ``latency_p50_norm_ms``), so the model fits the configuration and
# not the machine's speed drift at the moment each trial measured; else the raw p50.
MEASURED_AS = {"latency_p50_ms": ("latency_p50_norm_ms", "latency_p50_ms")}
RIDGE_ALPHA = 1e-3  # on max-abs-scaled counts with weights 1 / y^2: a light pull toward the shared weights


def measured_value(measured, target: str) -> float | None:
    """The measured value of ``target`` in a result (dict or row), see ``MEASURED_AS``."""
    for key in MEASURED_AS.get(target, (target,)):
        v = measured.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            return float(v)
    return None


def param_features(params: dict[str, Any]) -> dict[str, dict[str, float]]:
    """A runner without cost features: searched numbers as they are, choices one-hot."""
    feats: dict[str, float] = {}
    for path, value in params.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            feats[path] = float(value)
        else:
            feats[f"{path}={value}"] = 1.0
    return {t: dict(feats) for t in TARGETS}


@dataclass
class Sample:
    trial: int
    features: dict[str, dict[str, float]]
    measured: dict[str, float]
    split: str  # 'fit' | 'holdout'


@dataclass
class _Pool:
    samples: list[Sample] = field(default_factory=list)
    models: dict[str, Any] = field(default_factory=dict)  # target -> fitted pipeline (fit split)
    fitted_on: int = -1  # fit-split size the models were fitted on


class CostModel:
    """All pools' models. ``spec``: the sweep's ``CostModelSpec``."""

    def __init__(self, spec, pools: list[str]) -> None:
        self.spec = spec
        self.pools = {p: _Pool() for p in pools}

    # -- data -----------------------------------------------------------------------------------
    def split_for(self, pool: str) -> str:
        """The split of the pool's next measured trial: every ``holdout_every``-th is held out."""
        n = len(self.pools[pool].samples)
        return "holdout" if n % self.spec.holdout_every == self.spec.holdout_every - 1 else "fit"

    def observe(self, pool: str, trial: int, features: dict[str, dict[str, float]], measured: dict[str, Any],
                split: str | None = None) -> str | None:
        """Adds a measured trial (``split`` as recorded when restoring); returns its split, or
        None when it measured nothing the model predicts."""
        values = {t: v for t in TARGETS if (v := measured_value(measured, t)) is not None}
        if not values:
            return None
        ps = self.pools[pool]
        if any(s.trial == trial for s in ps.samples):
            return next(s.split for s in ps.samples if s.trial == trial)
        split = split or self.split_for(pool)
        ps.samples.append(Sample(trial, features, values, split))
        return split

    def fit_split(self, pool: str) -> list[Sample]:
        return [s for s in self.pools[pool].samples if s.split == "fit"]

    def holdout_split(self, pool: str) -> list[Sample]:
        return [s for s in self.pools[pool].samples if s.split == "holdout"]

    # -- models ---------------------------------------------------------------------------------
    @staticmethod
    def _fit(samples: list[Sample], target: str):
        from sklearn.feature_extraction import DictVectorizer
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import MaxAbsScaler

        rows = [s for s in samples if target in s.measured]
        if len(rows) < 2:
            return None
        X = [s.features[FEATURES_OF.get(target, target)] for s in rows]
        y = [s.measured[target] for s in rows]
        # ridge: a few trials and many (collinear) counts; positive: every count costs, none saves
        model = make_pipeline(DictVectorizer(sparse=False), MaxAbsScaler(), Ridge(alpha=RIDGE_ALPHA, positive=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weights = 1.0 / np.square(y)  # relative error ...
            weights *= len(weights) / weights.sum()  # ... with mean 1, so alpha means the same in any unit
            model.fit(X, y, ridge__sample_weight=weights)
        return model

    def _models(self, pool: str) -> dict[str, Any]:
        ps = self.pools[pool]
        fit = self.fit_split(pool)
        if ps.fitted_on != len(fit):
            ps.models = {t: self._fit(fit, t) for t in TARGETS}
            ps.fitted_on = len(fit)
        return ps.models

    def predict(self, pool: str, features: dict[str, dict[str, float]]) -> dict[str, Any] | None:
        """{target: predicted value, ..., 'source': 'own' | 'seeded:<pool>', 'fit_trials': n,
        'scale': {...}} or None while neither the pool nor its seed has ``min_fit`` fitted trials."""
        own = len(self.fit_split(pool))
        seed = self.spec.seed_from
        if own >= self.spec.min_fit or seed is None or seed == pool:
            if own < 2:
                return None
            models = self._models(pool)
            out = {t: _predict(m, _features(features, t)) for t, m in models.items() if m is not None}
            return {**out, "source": "own", "fit_trials": own, "trusted": own >= self.spec.min_fit}
        if len(self.fit_split(seed)) < self.spec.min_fit:
            return None
        models = self._models(seed)
        scale = self.scale(pool)
        out = {t: _predict(m, _features(features, t)) * scale.get(t, 1.0) for t, m in models.items() if m is not None}
        return {**out, "source": f"seeded:{seed}", "fit_trials": own, "scale": scale,
                "trusted": bool(scale)}

    def scale(self, pool: str) -> dict[str, float]:
        """Per target: the geometric mean of measured / predicted-by-the-seed-pool over the pool's
        fit split (the learned per-pool scale); empty before the pool measured anything."""
        seed = self.spec.seed_from
        models = self._models(seed)
        out = {}
        for target, model in models.items():
            logs = [math.log(s.measured[target] / p) for s in self.fit_split(pool) if target in s.measured and model
                    for p in [_predict(model, _features(s.features, target))] if p > 0]
            if logs:
                out[target] = math.exp(sum(logs) / len(logs))
        return out

    # -- validation -----------------------------------------------------------------------------
    def validation(self, pool: str) -> dict[str, dict[str, float]]:
        """Per target, on the held-out split, predicted by the model fitted on the fit split
        (``predict``, so a seeded pool is validated as it predicts): n, MAPE, shares within
        +-10% and +-15%, and the held-out trial numbers."""
        out: dict[str, dict[str, Any]] = {}
        held = self.holdout_split(pool)
        for target in TARGETS:
            errors, trials = [], []
            for s in held:
                if target not in s.measured:
                    continue
                pred = self.predict(pool, s.features)
                if pred is None or target not in pred:
                    continue
                errors.append(abs(pred[target] - s.measured[target]) / s.measured[target])
                trials.append(s.trial)
            if errors:
                out[target] = {"n": len(errors), "mape": sum(errors) / len(errors),
                               "within_10": sum(e <= 0.10 for e in errors) / len(errors),
                               "within_15": sum(e <= 0.15 for e in errors) / len(errors),
                               "fit_trials": len(self.fit_split(pool)), "holdout_trials": trials}
        return out


def _features(features: dict[str, dict[str, float]], target: str) -> dict[str, float]:
    return features[FEATURES_OF.get(target, target)]


def _predict(model, features: dict[str, float]) -> float:
    return max(0.0, float(model.predict([features])[0]))
