"""The per-neuron oracle of the sparsify grid (H=1): each token keeps the neurons whose outputs
are largest, ranked on the dense FFN it has just computed. Not deployable (the ranking costs the
dense FFN); it bounds what any per-neuron selection at that fraction can keep, beside the
H=4/16/64 expert oracles.

It is the expert mode's oracle router at ``expert_size=1`` (a SparseMLP whose expert i is neuron
i, ranked by its true output norm ``|h_i|·‖W_down[:, i]‖``), computed as one masked dense FFN
instead of 1536 one-neuron experts through the dispatch (40 s a layer per 1024 tokens of
SmolLM2-135M's shape there, under a second here); the tests hold the two to each other.

Shape legend: S tokens, D hidden size, I FFN width.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.conversion.config import SparsifyConfig
from xmoe.conversion.families import decoder_mlps, swiglu_weights


class NeuronOracleMLP(nn.Module):
    """A dense SwiGLU MLP (the wrapped ``mlp``, its weights shared) that keeps, per token, the
    top ceil(f·I) neurons by ``|h_i|·‖W_down[:, i]‖`` and zeroes the others before down.

    After each forward: ``flops_fraction`` (S,), each token's FFN-FLOP fraction as the expert
    oracles count it (gate, up and down of the kept neurons only: k / I).
    """

    def __init__(self, mlp: nn.Module, fraction: float) -> None:
        super().__init__()
        _, _, down_DI = swiglu_weights(mlp)  # refuses another MLP layout
        self.mlp = mlp
        self.register_buffer("down_norm_I", torch.linalg.vector_norm(down_DI, dim=0))
        self.fraction = fraction
        self.flops_fraction: torch.Tensor | None = None

    @property
    def fraction(self) -> float:
        return self._fraction

    @fraction.setter
    def fraction(self, value: float) -> None:
        width = self.down_norm_I.numel()
        # the expert mode's own validation and k = ceil(f·E) rounding, at E = I
        self.top_k = SparsifyConfig(expert_size=1, active_fraction=value).top_k(width)
        self._fraction = value

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        h = F.silu(mlp.gate_proj(hidden_states)) * mlp.up_proj(hidden_states)
        score = h.abs() * self.down_norm_I.to(h.dtype)
        keep = torch.zeros_like(h, dtype=torch.bool)
        keep.scatter_(-1, score.topk(self.top_k, dim=-1).indices, True)
        tokens = h.shape[:-1].numel()
        self.flops_fraction = torch.full((tokens,), self.top_k / h.shape[-1], dtype=torch.float64)
        return mlp.down_proj(torch.where(keep, h, 0))


def neuron_oracle_model(dense: nn.Module, fraction: float) -> nn.Module:
    """A copy of ``dense`` (a causal LM with ``model.layers[i].mlp``, the layout
    :func:`~xmoe.conversion.families.decoder_mlps` reads) whose MLPs are
    :class:`NeuronOracleMLP` at ``fraction``; ``dense`` is left unchanged."""
    model = copy.deepcopy(dense)
    decoder_mlps(model)  # names a model without model.layers
    for layer in model.model.layers:
        layer.mlp = NeuronOracleMLP(layer.mlp, fraction)
    return model.eval()


def set_oracle_fraction(model: nn.Module, fraction: float) -> None:
    """Keep ``fraction`` of the neurons in every :class:`NeuronOracleMLP` of ``model``."""
    for module in oracle_mlps(model):
        module.fraction = fraction


def oracle_mlps(model: nn.Module) -> list[NeuronOracleMLP]:
    """The :class:`NeuronOracleMLP` modules of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, NeuronOracleMLP)]


__all__ = ["NeuronOracleMLP", "neuron_oracle_model", "oracle_mlps", "set_oracle_fraction"]
