"""XMoEConfig: the transformers ``PretrainedConfig`` of xmoe language models."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from transformers import PretrainedConfig

from xmoe.config import ConfigError, MoEConfig
from xmoe.models.config import ModelConfig

_MODEL_FIELDS = [f for f in dataclasses.fields(ModelConfig) if f.name != "moe"]


class XMoEConfig(PretrainedConfig):
    """A :class:`~xmoe.models.ModelConfig` as a transformers config (``model_type="xmoe"``).

    Takes the ModelConfig fields as keyword arguments (``moe`` as a dict of
    :class:`~xmoe.MoEConfig` fields, or None for a dense model) and validates them with the same
    rules at construction: a bad value raises :class:`xmoe.ConfigError` naming the field.

    ``tie_word_embeddings`` owns the tie setting (what transformers reads and
    ``save_pretrained`` writes); ``tie_embeddings`` is another name for the same attribute, so a
    value set later under either name (``XMoEConfig.from_pretrained(directory,
    tie_word_embeddings=False)``, or the attribute set) wins. Given both at construction, they
    must agree.
    ``use_cache`` (default True): forward returns the key/value cache.
    ``output_router_logits`` (default False): forward returns each MoE layer's router logits.
    """

    model_type = "xmoe"
    # outputs the Trainer's evaluation leaves out of the predictions (as Mixtral's only logits)
    keys_to_ignore_at_inference: ClassVar[list[str]] = [
        "past_key_values",
        "aux_loss",
        "lm_loss",
        "experts_per_token",
    ]
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "max_position_embeddings": "max_seq_len",
        "intermediate_size": "d_ff",
        "tie_embeddings": "tie_word_embeddings",  # one owner under ModelConfig's name too
    }

    def __init__(
        self,
        vocab_size: int = 8192,
        moe: dict[str, Any] | MoEConfig | None = None,
        eos_token_id: int | None = 0,
        pad_token_id: int | None = 0,
        use_cache: bool = True,
        output_router_logits: bool = False,
        **kwargs: Any,
    ) -> None:
        model_values = {f.name: kwargs.pop(f.name) for f in _MODEL_FIELDS if f.name in kwargs}
        tie_word_embeddings = kwargs.pop("tie_word_embeddings", None)
        if tie_word_embeddings is not None:
            tied = model_values.setdefault("tie_embeddings", tie_word_embeddings)
            if tied != tie_word_embeddings:
                raise ConfigError(
                    f"tie_word_embeddings={tie_word_embeddings!r} is invalid: it names the same "
                    f"setting as tie_embeddings={tied!r}, and the two disagree"
                )
        if isinstance(moe, MoEConfig):
            moe = moe.to_dict()
        checked = ModelConfig(
            vocab_size=vocab_size,
            moe=MoEConfig.from_dict(moe) if moe is not None else None,
            **model_values,
        )
        for field in _MODEL_FIELDS:  # tie_embeddings lands in tie_word_embeddings
            setattr(self, field.name, getattr(checked, field.name))
        self.moe = checked.moe.to_dict() if checked.moe is not None else None
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        self.use_cache = use_cache
        self.output_router_logits = output_router_logits

    def to_model_config(self) -> ModelConfig:
        """The validated :class:`~xmoe.models.ModelConfig` these settings describe."""
        values = {f.name: getattr(self, f.name) for f in _MODEL_FIELDS}
        moe = MoEConfig.from_dict(self.moe) if self.moe is not None else None
        return ModelConfig(moe=moe, **values)

    @classmethod
    def from_model_config(cls, config: ModelConfig, **kwargs: Any) -> XMoEConfig:
        values = config.to_dict()
        return cls(**values, **kwargs)
