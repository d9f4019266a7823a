"""Language models built from xmoe layers."""

from xmoe.models.config import ModelConfig
from xmoe.models.transformer import KeyValueCache, LMOutput, TransformerLM

__all__ = ["KeyValueCache", "LMOutput", "ModelConfig", "TransformerLM"]
