"""``dynamic-prune``: MC-MoE's online dynamic pruning (Huang et al. 2024).

At inference, a token drops every expert after its first whose combine weight is below
``beta`` times the first's (for top-2 routing: the second expert when ``w_2 < β·w_1``); the
dropped weight goes to the first expert, so the token's total routing weight is unchanged (the
paper renormalises its top-2 weights to one, which is the same for top-2 routers that do).
``beta=0`` is the identity. The paper's exception for important tokens (attention received
times the hidden state's norm) is not implemented: the layer does not see attention.

It wraps each MoE layer's router (:class:`DynamicPruneRouter`).

Shape legend: S tokens, K ranked experts per token, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from xmoe.compression.base import (
    CompressionError,
    CompressionPass,
    PassOptions,
    RouterWrapper,
    moe_layers,
)
from xmoe.registry import PASSES
from xmoe.routing.base import RouterOutput


class DynamicPruneRouter(RouterWrapper):
    """A router whose selections drop the weak experts after each token's first (module
    docstring)."""

    def __init__(self, inner: nn.Module, beta: float) -> None:
        super().__init__(inner)
        self.beta = beta

    def forward(self, x_SD: torch.Tensor, state: torch.Tensor | None = None) -> RouterOutput:
        out = self.inner(x_SD, state)
        selection = out.selection
        if self.beta == 0 or selection.weight_SK.shape[1] < 2:
            return out
        weight_SK = selection.weight_SK
        limit_S1 = self.beta * weight_SK[:, :1].detach()
        drop_SK = selection.wanted_SK & (weight_SK.detach() < limit_S1)
        drop_SK[:, 0] = False
        kept_SK = weight_SK.masked_fill(drop_SK, 0.0)
        moved_S = (weight_SK - kept_SK).sum(dim=1)
        first = torch.zeros_like(weight_SK)
        first[:, 0] = 1.0
        weight_SK = kept_SK + first * moved_S[:, None]
        pruned = replace(selection, wanted_SK=selection.wanted_SK & ~drop_SK, weight_SK=weight_SK)
        return replace(out, selection=pruned)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


@dataclass(frozen=True)
class DynamicPruneOptions(PassOptions):
    """Attributes: beta: drop an expert after the first whose weight is below beta times the
    first's, in [0, 1]."""

    beta: float = 0.5

    def __post_init__(self) -> None:
        valid = isinstance(self.beta, int | float) and not isinstance(self.beta, bool)
        if not valid or not 0 <= self.beta <= 1:
            raise CompressionError(
                f"dynamic-prune: beta={self.beta!r} is invalid: it must be a number in [0, 1]"
            )


@PASSES.register("dynamic-prune")
class DynamicPrune(CompressionPass):
    """MC-MoE's online dynamic pruning (module docstring); needs no calibration."""

    Options = DynamicPruneOptions

    @classmethod
    def apply(cls, model: nn.Module, options: DynamicPruneOptions, calibration: torch.Tensor):
        for layer in moe_layers(model):
            router = layer.router
            if isinstance(router, DynamicPruneRouter):  # a second pass sets the new beta
                router.beta = float(options.beta)
            else:
                layer.router = DynamicPruneRouter(router, float(options.beta))
        return model
