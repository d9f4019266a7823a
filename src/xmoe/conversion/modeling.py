"""Transformers classes of sparsified models: save_pretrained / from_pretrained round trips.

A sparsified model of each family in ``xmoe.registry.FAMILIES`` is its own ``model_type``
(``xmoe_sparse_llama``, ``xmoe_sparse_qwen2``, ...): the config is the base config plus
``xmoe_sparsify`` (the :class:`~xmoe.conversion.SparsifyConfig` fields), and the model class is
the base class whose MLPs are :class:`~xmoe.conversion.SparseMLP` (or, in the ``neurons`` mode,
:class:`~xmoe.conversion.neuron_mlp.NeuronMLP`, its thresholds buffers saved with the weights);
:func:`sparse_classes` makes both from the family's entry. A fresh ``model_type`` keeps
``AutoModelForCausalLM`` from silently loading the directory as a dense model with missing MLP
weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from torch import nn

from xmoe.config import ConfigError
from xmoe.conversion.architecture import SPARSE_PREFIX
from xmoe.conversion.config import SparsifyConfig
from xmoe.conversion.families import Family
from xmoe.conversion.neuron_mlp import NeuronMLP
from xmoe.conversion.sparse_mlp import LEGACY_KEYS, SEPARATE_UP_KEY, SparseMLP
from xmoe.hf.verified import VerifiedWeightsMixin
from xmoe.registry import FAMILIES

SETTINGS_KEY = "xmoe_sparsify"
"""Config attribute holding the conversion settings (a dict of SparsifyConfig fields)."""

WEIGHT_CONFIG_FIELDS = frozenset(
    {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"}
    | {"num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps"}
    | {"rope_theta", "rope_parameters", "rope_scaling", "tie_word_embeddings", "attention_bias"}
    | {"mlp_bias", f"{SETTINGS_KEY}.expert_size", f"{SETTINGS_KEY}.mode"}
    | {f"{SETTINGS_KEY}.{name}" for name in ("target_flops", "scoring", "allocation", "sites")}
)
"""config.json fields that decide how a sparsified model's weights are read (a change refuses
the load; the selection rule, router and combine may change with a warning). The neurons mode's
settings are among them: its threshold buffers were calibrated for them."""


LEGACY_KEY_MAPPING = {rf"\.{old}$": f".{new}" for old, new in LEGACY_KEYS.items()}
"""transformers' ``key_mapping`` of a SparseMLP's legacy weight names (:data:`LEGACY_KEYS`) to
today's: ``from_pretrained`` of a sparse class passes it, so directories saved before SparseMLP
was an MoELayer load too (transformers saves a model so loaded in the layout it was read in)."""


class SavesModuleSettingsMixin:
    """``save_pretrained`` records ``xmoe_sparsify`` from the sparse MLPs' settings as they are
    now (``set_threshold`` and the other knobs change the modules, never the config)."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        held = [m.settings for m in self.modules() if isinstance(m, (SparseMLP, NeuronMLP))]
        if any(settings != held[0] for settings in held):
            raise ConfigError(
                "the SparseMLPs hold different settings: one config records a single "
                "xmoe_sparsify (set them model-wide before saving)"
            )
        setattr(self.config, SETTINGS_KEY, held[0].to_dict())
        return super().save_pretrained(save_directory, *args, **kwargs)


def _replace_mlps(model: Any, family: Family, make: Callable[[], nn.Module]) -> None:
    """Put ``make()`` wherever ``family.mlps(model)`` finds an MLP (found by identity, so the
    family says where its MLPs are and nothing here assumes an attribute name)."""
    targets = {id(mlp) for mlp in family.mlps(model)}
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if id(child) in targets:
                setattr(parent, child_name, make())


@cache
def _sparse_classes(name: str, family: Family) -> tuple[type, type]:
    """Made once per entry (keyed by the entry too, so a re-registered name gets new classes):
    transformers' registration and ``isinstance`` need the same classes every time."""

    class SparseConfig(family.config_cls):
        model_type = f"{SPARSE_PREFIX}{name}"

    class SparseForCausalLM(SavesModuleSettingsMixin, VerifiedWeightsMixin, family.model_cls):
        config_class = SparseConfig
        weight_config_fields = WEIGHT_CONFIG_FIELDS
        separate_up_key = SEPARATE_UP_KEY

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
            """Verified ``from_pretrained`` that also maps :data:`LEGACY_KEY_MAPPING` (a
            ``key_mapping`` given here applies as well)."""
            kwargs["key_mapping"] = LEGACY_KEY_MAPPING | (kwargs.get("key_mapping") or {})
            return super().from_pretrained(*args, **kwargs)

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            settings = SparsifyConfig.from_dict(getattr(config, SETTINGS_KEY))
            width, ffn = config.hidden_size, config.intermediate_size
            if settings.mode == "neurons":
                _replace_mlps(self, family, lambda: NeuronMLP(width, ffn, settings))
            else:
                num_experts = settings.num_experts(ffn)
                _replace_mlps(self, family, lambda: SparseMLP(width, settings, num_experts))

    for cls, base in ((SparseConfig, family.config_cls), (SparseForCausalLM, family.model_cls)):
        cls.__name__ = cls.__qualname__ = f"Sparse{base.__name__}"  # as save_pretrained records
        cls.__doc__ = (
            f"``{base.__name__}`` whose MLPs are SparseMLPs or NeuronMLPs (``{SETTINGS_KEY}``)."
        )
    return SparseConfig, SparseForCausalLM


def sparse_classes(name: str) -> tuple[type, type]:
    """(sparse config class, sparse model class) of the family ``name`` (``"llama"`` gives
    ``SparseLlamaConfig``, ``SparseLlamaForCausalLM``): subclasses of the family's classes with
    ``model_type`` ``xmoe_sparse_<name>`` and ``xmoe_sparsify`` in the config, whose MLPs are
    :class:`~xmoe.conversion.SparseMLP`; weights and config are verified on load
    (:class:`~xmoe.hf.verified.VerifiedWeightsMixin`) and settings saved from the modules
    (:class:`SavesModuleSettingsMixin`).

    Raises:
        KeyError: ``name`` is not in ``FAMILIES``, listing those that are.
    """
    return _sparse_classes(name, FAMILIES[name])


def register() -> None:
    """Register the sparse model types of every family with ``AutoConfig`` /
    ``AutoModelForCausalLM`` (idempotent), so ``AutoModelForCausalLM.from_pretrained`` loads a
    sparsified directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in FAMILIES:
        config_cls, model_cls = sparse_classes(name)
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
    name = model_type.removeprefix(SPARSE_PREFIX) if isinstance(model_type, str) else None
    if model_type == name or name not in FAMILIES:
        raise ValueError(
            f"{directory} holds model_type={model_type!r}, not a sparsified model "
            f"({[SPARSE_PREFIX + known for known in FAMILIES]})"
        )
    return sparse_classes(name)[1].from_pretrained(directory, **kwargs)
