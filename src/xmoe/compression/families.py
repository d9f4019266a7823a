"""The models ``compress`` acts on: one entry each in :data:`xmoe.registry.COMPRESS_FAMILIES`.

A family gives the passes the model's MoE layers as xmoe :class:`~xmoe.layer.MoELayer` s and
calls it as they call a :class:`~xmoe.models.TransformerLM` (``model(ids, targets)`` with
``.logits`` and ``.loss``), and it saves and loads the compressed model the way the input was:

- ``xmoe_lm``: a :class:`~xmoe.models.TransformerLM` (a run directory's model), written as a
  compressed model directory (:mod:`xmoe.compression.saving`).
- ``xmoe``, ``mixtral``, ``qwen3_moe``, ``olmoe``: transformers causal LMs, keyed by their
  ``config.model_type``. The compressed model is its own ``model_type``
  (``xmoe_compressed_<family>``): the family's classes whose MoE blocks are :class:`MoEBlock` s
  rebuilt, as the passes left them, from ``config.xmoe_compression``, so ``save_pretrained`` /
  ``from_pretrained`` (safetensors, verified) round-trip it and ``generate`` runs on it. The
  transformers MoE blocks (a top-k softmax router ``gate`` and a fused ``experts`` module with
  ``gate_up_proj`` (E, 2I, D) and ``down_proj`` (E, D, I), the layout Mixtral, Qwen3-MoE and
  OLMoE share in transformers 5) become xmoe MoE layers computing the same function.

Shape legend: E experts, I expert width, D hidden size, B sequences, T tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from xmoe.compression.base import CompressionError
from xmoe.compression.saving import (
    WEIGHTS_NAME,
    is_compressed_run,
    load_compressed_lm,
    rebuild,
    save_compressed_lm,
    structure,
)
from xmoe.config import MoEConfig
from xmoe.hf.configuration import XMoEConfig
from xmoe.hf.modeling import XMoEForCausalLM
from xmoe.hf.verified import VerifiedWeightsMixin
from xmoe.layer import MoELayer
from xmoe.models import TransformerLM
from xmoe.registry import COMPRESS_FAMILIES
from xmoe.storage.model_dirs import check_model_target, staged_model_directory

COMPRESSED_PREFIX = "xmoe_compressed_"
"""The ``model_type`` of a compressed transformers model is this plus its family's name."""

SETTINGS_KEY = "xmoe_compression"
"""Config attribute of a compressed transformers model: ``{"structure", "passes"}``."""


class MoEBlock(nn.Module):
    """An xmoe MoE layer in a transformers decoder layer's MLP slot: (B, T, D) -> (B, T, D)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.moe = MoELayer(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden_states).hidden_states


def _is_fused_moe_block(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers 5 MoE block: a ``gate`` router with ``weight`` and
    ``top_k``, and fused ``experts`` with ``gate_up_proj`` and ``down_proj``."""
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (
        isinstance(getattr(gate, "weight", None), torch.Tensor)
        and hasattr(gate, "top_k")
        and isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(experts, "down_proj", None), torch.Tensor)
    )


def block_moe_config(block: nn.Module, activation: str) -> MoEConfig:
    """The xmoe MoE layer computing what the transformers MoE ``block`` computes: softmax
    top-k routing, renormalised over the kept experts where the block does (``norm_topk_prob``;
    Mixtral's router always does), SwiGLU experts without biases."""
    if activation != "silu":
        raise CompressionError(
            f"hidden_act={activation!r} is not supported: the MoE experts must be SwiGLU (silu)"
        )
    num_experts, d_model = block.gate.weight.shape
    return MoEConfig(
        d_model=d_model, num_experts=num_experts, d_expert=block.experts.down_proj.shape[2],
        router="topk", top_k=block.gate.top_k, activation="swiglu", bias=False,
        renormalize=bool(getattr(block.gate, "norm_topk_prob", True)), aux_loss_coef=0.0,
    )  # fmt: skip


@torch.no_grad()
def convert_blocks(model: nn.Module) -> None:
    """Replace every transformers MoE block of ``model`` with a :class:`MoEBlock` holding its
    weights (``w1[e] = gate_up_proj[e]ᵀ``: gate then up, as xmoe's SwiGLU reads them)."""
    activation = getattr(model.config, "hidden_act", "silu")
    for parent in list(model.modules()):
        for name, block in list(parent.named_children()):
            if not _is_fused_moe_block(block):
                continue
            weight = block.experts.gate_up_proj
            replacement = MoEBlock(block_moe_config(block, activation)).to(
                weight.device, weight.dtype
            )
            layer = replacement.moe
            layer.router.weight.copy_(block.gate.weight)
            layer.experts.w1.copy_(weight.transpose(1, 2))
            layer.experts.w2.copy_(block.experts.down_proj.transpose(1, 2))
            setattr(parent, name, replacement)


class CausalLMView(nn.Module):
    """A transformers causal LM called as the passes call a TransformerLM: ``(ids, targets=None)``
    -> ``.logits`` (B, T, V) and ``.loss`` (mean next-token cross-entropy given ``targets``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return SimpleNamespace(logits=logits, loss=loss)


@dataclass(frozen=True)
class LMFamily:
    """xmoe's own :class:`TransformerLM` (its MoE layers are the passes' already)."""

    model_cls: type = TransformerLM

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def view(self, model: nn.Module) -> nn.Module:
        return model

    def save(self, model: nn.Module, out: Path, *, passes: list, force: bool, **extra) -> Path:
        """:func:`~xmoe.compression.saving.save_compressed_lm` (``extra``: ``run_meta``,
        ``tokenizer_file``)."""
        return save_compressed_lm(model, out, passes=passes, force=force, **extra)


@dataclass(frozen=True)
class TransformersFamily:
    """A transformers causal LM family: its config and ``*ForCausalLM`` classes, and the config
    fields that decide how its saved weights are read (a change refuses the load)."""

    config_cls: type
    model_cls: type
    weight_fields: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return self.config_cls.model_type

    def prepare(self, model: nn.Module) -> nn.Module:
        """``model`` as its compressed class (eval mode; a compressed model as it is): a copy,
        same dtype and device, whose MoE blocks are :class:`MoEBlock` s. ``model`` itself has
        its blocks converted in place, as a TransformerLM's layers are compressed in place."""
        config_cls, model_cls = compressed_classes(self.name)
        if isinstance(model, model_cls):
            return model.eval()
        convert_blocks(model)
        settings = {k: v for k, v in model.config.to_dict().items() if k != "model_type"}
        parameter = next(model.parameters())
        compressed = model_cls(config_cls.from_dict(settings)).to(parameter.device, parameter.dtype)
        compressed.load_state_dict(model.state_dict())
        return compressed.eval()

    def view(self, model: nn.Module) -> nn.Module:
        return CausalLMView(model)

    def save(
        self, model: nn.Module, out: Path, *, passes: list, force: bool, tokenizer: Any = None
    ) -> Path:
        """``model.save_pretrained`` (and ``tokenizer``'s, if given) into a staging folder put in
        place as ``out`` when complete, the passes' structure and record in
        ``config.xmoe_compression``."""
        check_model_target(out, force=force, what="compress target")
        layout = {"structure": structure(model), "passes": [[n, dict(o)] for n, o in passes]}
        setattr(model.config, SETTINGS_KEY, layout)
        with staged_model_directory(out, "xmoe compress") as staging:
            model.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
        return out


@cache
def _compressed_classes(name: str, family: TransformersFamily) -> tuple[type, type]:
    """Made once per entry: transformers' registration and ``isinstance`` need the same classes
    every time."""

    class CompressedConfig(family.config_cls):
        model_type = f"{COMPRESSED_PREFIX}{name}"

        def __init__(self, **kwargs: Any) -> None:
            # an own __init__ keeps transformers from making the subclass a dataclass whose
            # generated __init__ would skip the base's (XMoEConfig's reads its own fields)
            super().__init__(**kwargs)

    verified = issubclass(family.model_cls, VerifiedWeightsMixin)  # XMoE's classes are already
    bases = (family.model_cls,) if verified else (VerifiedWeightsMixin, family.model_cls)

    class CompressedForCausalLM(*bases):
        config_class = CompressedConfig
        weight_config_fields = (
            getattr(family.model_cls, "weight_config_fields", frozenset())
            | family.weight_fields
            | {"model_type", SETTINGS_KEY}
        )

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            convert_blocks(self)
            layout = getattr(config, SETTINGS_KEY, None)
            if layout is not None:
                rebuild(self, layout["structure"])

    pairs = ((CompressedConfig, family.config_cls), (CompressedForCausalLM, family.model_cls))
    for cls, base in pairs:
        cls.__name__ = cls.__qualname__ = f"Compressed{base.__name__}"  # as save_pretrained records
        cls.__doc__ = f"``{base.__name__}`` with compressed xmoe MoE layers (``{SETTINGS_KEY}``)."
    return CompressedConfig, CompressedForCausalLM


def compressed_classes(name: str) -> tuple[type, type]:
    """(config class, model class) of the compressed models of the transformers family
    ``name`` (``"mixtral"`` gives ``CompressedMixtralConfig``, ``CompressedMixtralForCausalLM``,
    ``model_type`` ``xmoe_compressed_mixtral``)."""
    family = compress_family(name)
    if not isinstance(family, TransformersFamily):
        raise CompressionError(f"compression family {name!r} is not a transformers family")
    return _compressed_classes(name, family)


def compress_family(name: str):
    """The entry of :data:`~xmoe.registry.COMPRESS_FAMILIES` named ``name``."""
    if name not in COMPRESS_FAMILIES:
        raise CompressionError(
            f"unknown compression family {name!r}; registered: {list(COMPRESS_FAMILIES)}"
        )
    return COMPRESS_FAMILIES[name]


def family_of(model: nn.Module) -> tuple[str, LMFamily | TransformersFamily]:
    """``(name, entry)`` of the family ``model`` belongs to (a compressed model's too)."""
    for name in COMPRESS_FAMILIES:
        family = COMPRESS_FAMILIES[name]
        if isinstance(model, family.model_cls):
            return name, family
    raise CompressionError(
        f"{type(model).__name__} is not of a compression family; registered: "
        f"{list(COMPRESS_FAMILIES)} ({', '.join(f.model_cls.__name__ for f in _entries())})"
    )


def _entries() -> list:
    return [COMPRESS_FAMILIES[name] for name in COMPRESS_FAMILIES]


def register() -> None:
    """Register every transformers family's compressed classes with ``AutoConfig`` /
    ``AutoModelForCausalLM`` (idempotent), so ``AutoModelForCausalLM.from_pretrained`` loads a
    compressed directory."""
    for name in COMPRESS_FAMILIES:
        if isinstance(COMPRESS_FAMILIES[name], TransformersFamily):
            config_cls, model_cls = compressed_classes(name)
            AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
            AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)


def save_compressed(
    model: nn.Module, out: str | os.PathLike, *, passes: list, force: bool = False, **extra
) -> Path:
    """Write a model ``compress`` returned into the directory ``out``, as its family saves
    (staged, put in place only when complete); ``passes`` (``(name, options)`` applied) are
    recorded, ``extra`` goes to the family's ``save`` (a transformers family's ``tokenizer``;
    a TransformerLM's ``run_meta`` and ``tokenizer_file``). Returns the directory."""
    _, family = family_of(model)
    return family.save(model, Path(out), passes=passes, force=force, **extra)


def load_compressed(path: str | os.PathLike) -> tuple[nn.Module, list]:
    """``(model in eval mode, passes recorded)`` of a directory :func:`save_compressed` wrote:
    a compressed TransformerLM, or a compressed transformers model (weights verified)."""
    path = Path(path)
    if is_compressed_run(path):
        return load_compressed_lm(path)
    config_path = path / "config.json"
    model_type = None
    if config_path.is_file():
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    name = model_type.removeprefix(COMPRESSED_PREFIX) if isinstance(model_type, str) else ""
    if not isinstance(model_type, str) or name == model_type or name not in COMPRESS_FAMILIES:
        raise CompressionError(
            f"{path} holds no compressed model (no {WEIGHTS_NAME}, and config.json's "
            f"model_type={model_type!r} is not {COMPRESSED_PREFIX}<family>)"
        )
    model = compressed_classes(name)[1].from_pretrained(path)
    return model.eval(), getattr(model.config, SETTINGS_KEY)["passes"]


_EXPERT_FIELDS = frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "hidden_act"})

COMPRESS_FAMILIES.register("xmoe_lm")(LMFamily())
COMPRESS_FAMILIES.register("xmoe")(TransformersFamily(XMoEConfig, XMoEForCausalLM))
COMPRESS_FAMILIES.register("mixtral")(
    TransformersFamily(
        MixtralConfig, MixtralForCausalLM,
        _EXPERT_FIELDS | {"intermediate_size", "num_local_experts", "num_experts_per_tok"},
    )
)  # fmt: skip
COMPRESS_FAMILIES.register("qwen3_moe")(
    TransformersFamily(
        Qwen3MoeConfig, Qwen3MoeForCausalLM,
        _EXPERT_FIELDS | {"moe_intermediate_size", "num_experts", "num_experts_per_tok"}
        | {"decoder_sparse_step", "mlp_only_layers", "norm_topk_prob"},
    )
)  # fmt: skip
COMPRESS_FAMILIES.register("olmoe")(
    TransformersFamily(
        OlmoeConfig, OlmoeForCausalLM,
        _EXPERT_FIELDS | {"intermediate_size", "num_experts", "num_experts_per_tok"}
        | {"norm_topk_prob"},
    )
)  # fmt: skip
register()
