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
from omninet.seed import AdvancedTransformer

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
