"""The transformers causal-LM families ``sparsify`` converts: one :class:`Family` entry each in
``xmoe.registry.FAMILIES``, keyed by the dense model's ``config.model_type``.

A family names its classes, where its MLPs are and how to read an MLP's dense SwiGLU weights;
everything else (the sparse classes, their registration with transformers, loading) is derived
from the entry, so a new family with a Llama-shaped MLP is one line here, and one with another
MLP layout is one entry with its own :attr:`Family.dense_weights`.

Shape legend: I FFN width, D hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from xmoe.conversion.architecture import UnsupportedModelError
from xmoe.registry import FAMILIES

DenseWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""An MLP's dense weights, detached: (I, D) gate, (I, D) up, (D, I) down."""


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """``layer.mlp`` of every decoder layer in ``model.model.layers``, in layer order.

    Raises:
        UnsupportedModelError: the model has no ``model.layers``.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers to convert")
    return [getattr(layer, "mlp", None) for layer in layers]


def swiglu_weights(mlp: nn.Module) -> DenseWeights:
    """The weights of a bias-free SwiGLU MLP with ``nn.Linear`` ``gate_proj``, ``up_proj`` and
    ``down_proj`` (transformers' ``LlamaMLP`` layout).

    Raises:
        UnsupportedModelError: another layout, or biases.
    """
    projections = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in projections):
        raise UnsupportedModelError(
            f"mlp {type(mlp).__name__} lacks nn.Linear gate_proj/up_proj/down_proj (a SwiGLU MLP)"
        )
    if any(p.bias is not None for p in projections):
        raise UnsupportedModelError("MLP biases are not supported")
    gate, up, down = (p.weight.detach() for p in projections)
    return gate, up, down


@dataclass(frozen=True)
class Family:
    """How ``sparsify`` reads one family of dense causal LMs.

    Attributes:
        config_cls: the dense config class; the sparse config class subclasses it.
        model_cls: the dense ``*ForCausalLM`` class; the sparse model class subclasses it.
        mlps: ``model -> [MLP module per decoder layer]``, for the dense model and the sparse
            one built from it (whose MLPs at the same places are SparseMLPs).
        dense_weights: ``MLP -> (gate_ID, up_ID, down_DI)`` of a dense MLP computing
            ``down(silu(gate x) * up x)``; raises :class:`UnsupportedModelError` on another layout.
    """

    config_cls: type
    model_cls: type
    mlps: Callable[[nn.Module], list[nn.Module]] = decoder_mlps
    dense_weights: Callable[[nn.Module], DenseWeights] = swiglu_weights


FAMILIES.register("llama")(Family(LlamaConfig, LlamaForCausalLM))
FAMILIES.register("mistral")(Family(MistralConfig, MistralForCausalLM))
FAMILIES.register("qwen2")(Family(Qwen2Config, Qwen2ForCausalLM))
