"""A new model family for ``sparsify`` is one ``FAMILIES`` entry: a toy family, registered only
inside the test, converts, saves and loads with nothing else added.

The toy is a transformers model type that transformers does not ship (``toy_fused``): a Llama
whose MLPs fuse gate and up into one projection (Phi-3's layout), so the entry brings its own
``dense_weights`` accessor.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM

from xmoe.conversion import (
    Family,
    UnsupportedModelError,
    load_sparsified,
    set_threshold,
    sparse_mlps,
    sparsify,
)
from xmoe.conversion.architecture import layer_mlps
from xmoe.registry import FAMILIES

from helpers import register_for_test

TINY = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


class ToyConfig(LlamaConfig):
    model_type = "toy_fused"


class FusedMLP(nn.Module):
    """``down(silu(gate x) * up x)`` with gate and up in one (2I, D) projection, bias-free."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        width = config.intermediate_size
        self.gate_up = nn.Linear(config.hidden_size, 2 * width, bias=False)
        self.down = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class ToyForCausalLM(LlamaForCausalLM):
    config_class = ToyConfig

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = FusedMLP(config)


def fused_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_ID, up_ID, down_DI) of a FusedMLP: the fused projection's two halves."""
    if not isinstance(mlp, FusedMLP):
        raise UnsupportedModelError(f"mlp {type(mlp).__name__} is not a FusedMLP")
    gate_ID, up_ID = mlp.gate_up.weight.detach().chunk(2)
    return gate_ID, up_ID, mlp.down.weight.detach()


TOY = Family(ToyConfig, ToyForCausalLM, dense_weights=fused_weights)
"""The whole of what the toy family adds to xmoe."""


def tiny_toy() -> ToyForCausalLM:
    torch.manual_seed(0)
    return ToyForCausalLM(ToyConfig(**TINY)).double().eval()


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids_BT).logits


def test_a_registered_family_sparsifies_saves_and_loads(monkeypatch, tmp_path):
    register_for_test(monkeypatch, FAMILIES, "toy_fused", TOY)
    dense = tiny_toy()
    sparse = sparsify(dense, 8, "clustered", ids(1), active_fraction=1.0, router_steps=5)
    assert type(sparse).__name__ == "SparseToyForCausalLM" and len(sparse_mlps(sparse)) == 2
    # the eval code reaches both models' MLPs through the entry
    assert layer_mlps(sparse) == sparse_mlps(sparse)
    assert [type(mlp) for mlp in layer_mlps(dense)] == [FusedMLP, FusedMLP]
    # every expert selected is the dense model: the accessor's weights, permuted, are exact
    torch.testing.assert_close(logits(sparse, ids(2)), logits(dense, ids(2)), rtol=0, atol=1e-12)

    set_threshold(sparse, 0.6)
    expected = logits(sparse, ids(2))
    sparse.save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "config.json").read_text())["model_type"] == "xmoe_sparse_toy_fused"
    )
    loaded = load_sparsified(tmp_path)
    assert type(loaded) is type(sparse)
    assert loaded.config.xmoe_sparsify["threshold"] == 0.6
    torch.testing.assert_close(logits(loaded, ids(2)), expected, rtol=0, atol=0)


def test_an_unregistered_family_or_layout_is_refused_by_name(monkeypatch):
    registered = re.escape(str(list(FAMILIES)))
    with pytest.raises(
        UnsupportedModelError,
        match=rf"^ToyForCausalLM \(model_type='toy_fused'\) is not supported.*{registered}$",
    ):
        sparsify(tiny_toy(), 8, router="oracle")
    # registered without its accessor: the default one names the layer and the layout it lacks
    register_for_test(monkeypatch, FAMILIES, "toy_fused", Family(ToyConfig, ToyForCausalLM))
    with pytest.raises(UnsupportedModelError, match="ToyForCausalLM layer 0: mlp FusedMLP lacks"):
        sparsify(tiny_toy(), 8, router="oracle")
