"""Which transformers models can be sparsified, and how to reach their MLPs: the families
registered in ``xmoe.registry.FAMILIES`` (:mod:`xmoe.conversion.families`)."""

from __future__ import annotations

from torch import nn

from xmoe.registry import FAMILIES

SPARSE_PREFIX = "xmoe_sparse_"
"""A sparsified model's ``model_type`` is this prefix plus its family's (``xmoe_sparse_llama``):
a fresh type keeps transformers from loading it as the dense model with missing MLP weights."""


class UnsupportedModelError(ValueError):
    """The model is not a causal LM with the MLP layout ``sparsify`` converts."""


def family_name(model: nn.Module) -> str:
    """The ``FAMILIES`` key of ``model``: its ``config.model_type``, or for a sparsified model
    the one it was converted from.

    Raises:
        UnsupportedModelError: naming the model and the registered families.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    name = model_type.removeprefix(SPARSE_PREFIX) if isinstance(model_type, str) else None
    if name not in FAMILIES or not isinstance(model, FAMILIES[name].model_cls):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported: sparsify "
            f"converts the causal LMs of the registered families {list(FAMILIES)}"
        )
    return name


def layer_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's MLP module of a supported model, dense or sparsified, in order."""
    return FAMILIES[family_name(model)].mlps(model)


def supported_mlps(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """``(family name, [MLP of each decoder layer])`` of a dense model ``sparsify`` converts.

    Raises:
        UnsupportedModelError: naming the model class and what is missing.
    """
    name = family_name(model)
    cls = type(model).__name__
    if model.config.model_type != name:
        raise UnsupportedModelError(f"{cls} is sparsified already: sparsify a dense model")
    hidden_act = getattr(model.config, "hidden_act", None)
    if hidden_act != "silu":
        raise UnsupportedModelError(
            f"{cls}: hidden_act={hidden_act!r}, sparsify needs 'silu' (SwiGLU)"
        )
    mlps = layer_mlps(model)
    for index, mlp in enumerate(mlps):
        try:
            FAMILIES[name].dense_weights(mlp)
        except UnsupportedModelError as error:
            raise UnsupportedModelError(f"{cls} layer {index}: {error}") from None
    return name, mlps
