"""Which transformers models can be sparsified, and how to reach their MLPs."""

from __future__ import annotations

from torch import nn

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
"""``config.model_type`` of the causal LMs whose decoder layers hold a bias-free SwiGLU
``mlp`` (gate_proj, up_proj, down_proj, SiLU)."""


class UnsupportedModelError(ValueError):
    """The model is not a causal LM with the MLP layout ``sparsify`` converts."""


def supported_mlps(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """``(model_type, [layer.mlp for each decoder layer])`` of a supported causal LM.

    Raises:
        UnsupportedModelError: naming the model class and what is missing.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not name.endswith("ForCausalLM"):
        raise UnsupportedModelError(
            f"{name} (model_type={model_type!r}) is not supported: sparsify converts "
            f"*ForCausalLM models of model_type {list(SUPPORTED_MODEL_TYPES)}"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UnsupportedModelError(f"{name} has no model.layers to convert")
    mlps = []
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        projections = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in projections):
            raise UnsupportedModelError(
                f"{name} layer {index}: mlp {type(mlp).__name__} lacks nn.Linear "
                "gate_proj/up_proj/down_proj (a SwiGLU MLP)"
            )
        if any(p.bias is not None for p in projections):
            raise UnsupportedModelError(f"{name} layer {index}: MLP biases are not supported")
        if getattr(config, "hidden_act", None) != "silu":
            raise UnsupportedModelError(
                f"{name}: hidden_act={getattr(config, 'hidden_act', None)!r}, sparsify needs "
                "'silu' (SwiGLU)"
            )
        mlps.append(mlp)
    return model_type, mlps
