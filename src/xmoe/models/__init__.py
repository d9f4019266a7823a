"""Language models built from xmoe layers."""

from xmoe.models.attention import KeyValueCache
from xmoe.models.config import ModelConfig
from xmoe.models.transformer import LMOutput, TransformerLM

__all__ = ["KeyValueCache", "LMOutput", "ModelConfig", "TransformerLM"]
