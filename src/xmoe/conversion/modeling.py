"""Transformers classes of sparsified models: save_pretrained / from_pretrained round trips.

A sparsified Llama is its own ``model_type`` (``xmoe_sparse_llama``; Qwen2:
``xmoe_sparse_qwen2``): the config is the base config plus ``xmoe_sparsify`` (the
:class:`~xmoe.conversion.SparsifyConfig` fields), and the model class is the base class whose
decoder layers' MLPs are :class:`~xmoe.conversion.SparseMLP`. A fresh ``model_type`` keeps
``AutoModelForCausalLM`` from silently loading the directory as a dense Llama with missing
MLP weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from xmoe.config import ConfigError
from xmoe.conversion.config import SparsifyConfig
from xmoe.conversion.sparse_mlp import SEPARATE_UP_KEY, SparseMLP
from xmoe.hf.verified import VerifiedWeightsMixin

SETTINGS_KEY = "xmoe_sparsify"
"""Config attribute holding the conversion settings (a dict of SparsifyConfig fields)."""

WEIGHT_CONFIG_FIELDS = frozenset(
    {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"}
    | {"num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps"}
    | {"rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings", "attention_bias"}
    | {"mlp_bias", f"{SETTINGS_KEY}.expert_size"}
)
"""config.json fields that decide how a sparsified model's weights are read (a change refuses
the load; the selection rule, router and combine may change with a warning)."""


def install_sparse_mlps(model: Any, config: Any) -> None:
    """Replace every decoder layer's MLP of ``model`` by an (uninitialised) SparseMLP built
    from ``config.xmoe_sparsify``."""
    settings = SparsifyConfig.from_dict(getattr(config, SETTINGS_KEY))
    num_experts = settings.num_experts(config.intermediate_size)
    for layer in model.model.layers:
        layer.mlp = SparseMLP(config.hidden_size, settings, num_experts)


class SavesModuleSettingsMixin:
    """``save_pretrained`` records ``xmoe_sparsify`` from the SparseMLPs' settings as they are
    now (``set_threshold`` and the other knobs change the modules, never the config)."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        held = [m.settings for m in self.modules() if isinstance(m, SparseMLP)]
        if any(settings != held[0] for settings in held):
            raise ConfigError(
                "the SparseMLPs hold different settings: one config records a single "
                "xmoe_sparsify (set them model-wide before saving)"
            )
        setattr(self.config, SETTINGS_KEY, held[0].to_dict())
        return super().save_pretrained(save_directory, *args, **kwargs)


class SparseLlamaConfig(LlamaConfig):
    """A :class:`~transformers.LlamaConfig` with ``xmoe_sparsify`` (the conversion settings)."""

    model_type = "xmoe_sparse_llama"


class SparseLlamaForCausalLM(SavesModuleSettingsMixin, VerifiedWeightsMixin, LlamaForCausalLM):
    """``LlamaForCausalLM`` whose MLPs are :class:`~xmoe.conversion.SparseMLP`; its weights and
    config are verified on load (:class:`~xmoe.hf.verified.VerifiedWeightsMixin`) and its
    settings saved from the modules (:class:`SavesModuleSettingsMixin`)."""

    config_class = SparseLlamaConfig
    weight_config_fields = WEIGHT_CONFIG_FIELDS
    separate_up_key = SEPARATE_UP_KEY

    def __init__(self, config: SparseLlamaConfig) -> None:
        super().__init__(config)
        install_sparse_mlps(self, config)


class SparseQwen2Config(Qwen2Config):
    """A :class:`~transformers.Qwen2Config` with ``xmoe_sparsify``."""

    model_type = "xmoe_sparse_qwen2"


class SparseQwen2ForCausalLM(SavesModuleSettingsMixin, VerifiedWeightsMixin, Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` whose MLPs are :class:`~xmoe.conversion.SparseMLP`, verified on load."""

    config_class = SparseQwen2Config
    weight_config_fields = WEIGHT_CONFIG_FIELDS
    separate_up_key = SEPARATE_UP_KEY

    def __init__(self, config: SparseQwen2Config) -> None:
        super().__init__(config)
        install_sparse_mlps(self, config)


SPARSE_CLASSES: dict[str, tuple[type, type]] = {
    "llama": (SparseLlamaConfig, SparseLlamaForCausalLM),
    "qwen2": (SparseQwen2Config, SparseQwen2ForCausalLM),
}
"""Base ``model_type`` -> (sparse config class, sparse model class)."""


def register() -> None:
    """Register the sparse model types with ``AutoConfig`` / ``AutoModelForCausalLM``
    (idempotent), so ``AutoModelForCausalLM.from_pretrained`` loads a sparsified directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_cls, model_cls in SPARSE_CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def load_sparsified(directory: str | os.PathLike[str], **kwargs: Any):
    """Load a model written by ``sparsify(...).save_pretrained(directory)``.

    Args:
        directory: the saved model directory.
        kwargs: passed to ``from_pretrained`` (``dtype=...``, ``device_map=...``).

    Raises:
        ValueError: the directory holds no sparsified model.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"{directory} holds no config.json: not a saved model directory")
    model_type = json.loads(path.read_text()).get("model_type")
    by_type = {cfg.model_type: model_cls for cfg, model_cls in SPARSE_CLASSES.values()}
    if model_type not in by_type:
        raise ValueError(
            f"{directory} holds model_type={model_type!r}, not a sparsified model "
            f"({sorted(by_type)})"
        )
    return by_type[model_type].from_pretrained(directory, **kwargs)
