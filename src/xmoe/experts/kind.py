"""The expert-kind seam: what :class:`~xmoe.MoELayer` needs of the experts it routes to.

A kind is one file with an :class:`ExpertKind` subclass registered in
:data:`xmoe.registry.EXPERT_KINDS`; ``MoEConfig.experts`` names it. FFN experts are ``"ffn"``;
a pool may mix kinds (FFN experts beside zero-FLOP ones), since each kind reports the FLOPs of a
pair per expert.

Shape legend: S tokens, N kept pairs, D d_model, E experts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from xmoe.config import ExpertOptions, MoEConfig
from xmoe.dispatch.plan import DispatchPlan


class ExpertKind(nn.Module, ABC):
    """E experts over a dispatch plan. Built as ``Kind(config)``, or ``Kind(config, num_experts)``
    for a pool of another size than ``config.num_experts`` (a layer's shared experts).

    A subclass implements :meth:`forward`, :meth:`reset_parameters` and
    :meth:`flops_per_pair_E`; :meth:`sharded_parameters` defaults to every parameter. A kind
    with options sets ``Options`` (an :class:`~xmoe.config.ExpertOptions` subclass, validated
    with the config as ``MoEConfig.expert_options``).
    """

    Options: ClassVar[type[ExpertOptions]] = ExpertOptions

    def __init__(self, config: MoEConfig, num_experts: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts if num_experts is None else num_experts

    @abstractmethod
    def forward(
        self, x_SD: torch.Tensor, plan: DispatchPlan, weight_N: torch.Tensor
    ) -> torch.Tensor:
        """(S, D) ``Σ_{pairs of s} weight · expert_e(x_s)`` in ``x_SD``'s dtype; zeros for a
        token with no pair. ``plan`` holds N pairs over this pool's experts, ``weight_N`` (N,)
        their combine weights."""

    @abstractmethod
    def reset_parameters(self) -> None:
        """Draw the parameters anew (the layer's ``reset_parameters``)."""

    @abstractmethod
    def flops_per_pair_E(self) -> torch.Tensor:
        """(E,) int64 forward FLOPs of one (token, expert) pair per expert (:mod:`xmoe.flops`),
        which the routing statistics weight each expert's load by."""

    def sharded_parameters(self) -> list[str]:
        """Names (relative to this module) of the parameters stacked along the expert dimension,
        which expert parallelism slices; by default all of them."""
        return [name for name, _ in self.named_parameters()]

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype outside autocast: the parameters' (the default dtype if none)."""
        param = next(self.parameters(), None)
        return torch.get_default_dtype() if param is None else param.dtype


def run_shared(experts: ExpertKind, x_SD: torch.Tensor) -> torch.Tensor:
    """(S, D) every token through every expert of ``experts``, unweighted, summed: a layer's
    shared experts. One expert-major plan of S·E rows, so the same fused compute and engines
    run them as run the routed experts."""
    num_tokens, num_experts, device = x_SD.shape[0], experts.num_experts, x_SD.device
    plan = DispatchPlan(
        torch.arange(num_tokens, device=device).repeat(num_experts),
        torch.arange(num_experts, device=device).repeat_interleave(num_tokens),
        torch.full((num_experts,), num_tokens, device=device),
        num_tokens,
    )
    if num_tokens == 0:
        return x_SD.new_zeros(0, x_SD.shape[1])
    return experts(x_SD, plan, x_SD.new_ones(plan.num_pairs))
