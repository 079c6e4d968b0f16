"""OmniNet: efficient-attention transformers whose savings are real, and a platform to pick
the best configuration for your hardware."""

from omninet.config import (
    AttentionConfig,
    BlockSparseConfig,
    HeadsConfig,
    LinformerConfig,
    ModelConfig,
    PositionConfig,
)
from omninet.model import KVCache, ModelOutput, OmniNetModel
from omninet.advanced import AdvancedTransformer

__version__ = "0.1.0"

__all__ = [
    "AdvancedTransformer",
    "AttentionConfig",
    "BlockSparseConfig",
    "HeadsConfig",
    "KVCache",
    "LinformerConfig",
    "ModelConfig",
    "ModelOutput",
    "OmniNetModel",
    "PositionConfig",
]

_LAZY = {
    "run_trial": "omninet.trial",
    "TrialConfig": "omninet.trial",
    "TrialResult": "omninet.trial",
    "tune": "omninet.sweep.api",
    "SweepResult": "omninet.sweep.results",
}


def __getattr__(name):
    """The trial runner and the sweep API pull in ray/optuna/mlflow: import them on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'omninet' has no attribute {name!r}")
