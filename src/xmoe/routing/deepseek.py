"""DeepSeekMoE's balance losses over routed experts (beside ``num_shared_experts`` shared ones).

Two routers, the same losses over two selection rules: ``deepseek`` keeps the top-k routed
experts with their raw softmax probabilities (TopK(mK - K_s), no renormalisation, as the paper),
``deepseek_threshold`` keeps XMoE's threshold set (shared experts + threshold-routed ones, a
combination no paper ran). Both replace the Switch loss with DeepSeekMoE's expert-level loss
``α₁ Σ_i f_i P_i`` (α₁ = ``aux_loss_coef``) with ``f_i = N'/(K'T) Σ_t 1[t selects i]``,
``P_i = mean_t s_{i,t}``, and add the device-level loss ``α₂ Σ_d f'_d P'_d`` over D contiguous
expert groups (the experts expert parallelism puts on one process), ``f'_d`` the mean of the
group's f_i and ``P'_d`` the sum of its P_i. N' is ``num_experts`` (the routed experts; shared
ones are not routed) and K'T the pairs the rule selected (before capacity), which is k·T for
top-k and the threshold rule's own count for the threshold router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from xmoe.config import RouterOptions, _is_int, _is_number, _require
from xmoe.registry import ROUTERS
from xmoe.routing.base import Router
from xmoe.routing.selection import Selection
from xmoe.routing.threshold import ThresholdOptions, ThresholdRouter
from xmoe.routing.topk import TopKOptions, TopKRouter

if TYPE_CHECKING:
    from xmoe.config import MoEConfig


@dataclass(frozen=True)
class DeepSeekLossOptions(RouterOptions):
    """The device-level loss's options (the expert-level loss's α₁ is ``aux_loss_coef``).

    Args:
        device_groups: D, the number of contiguous groups of routed experts (devices) the
            device-level loss balances; 1 disables it (one group is balanced by definition).
        device_balance_coef: α₂ of the device-level loss (>= 0; the paper sets it larger
            than α₁).
    """

    device_groups: int = 1
    device_balance_coef: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            _is_int(self.device_groups) and self.device_groups >= 1,
            "router_options.device_groups",
            self.device_groups,
            "an integer >= 1",
        )
        _require(
            _is_number(self.device_balance_coef) and self.device_balance_coef >= 0,
            "router_options.device_balance_coef",
            self.device_balance_coef,
            "a finite number >= 0",
        )

    def check_for(self, config: MoEConfig) -> None:
        super().check_for(config)
        _require(
            config.num_experts % self.device_groups == 0,
            "router_options.device_groups",
            self.device_groups,
            f"a divisor of num_experts={config.num_experts} (groups of equal size)",
        )


def expert_fraction(selection: Selection, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """(E,) DeepSeekMoE's ``f_i = N'/(K'T) Σ_t 1[t selects i]``: N' times expert i's share of
    the pairs the rule selected (before capacity); 1 for every expert when balanced.
    Counted by a weighted ``index_add_`` (no boolean indexing: no host sync on CUDA)."""
    wanted_N = selection.wanted_SK.reshape(-1).to(dtype)
    counts_E = torch.zeros(num_experts, dtype=dtype, device=wanted_N.device)
    counts_E.index_add_(0, selection.expert_idx_SK.reshape(-1), wanted_N)
    return num_experts * counts_E / counts_E.sum().clamp_min(1)


def expert_balance_loss(probs_SE: torch.Tensor, fraction_E: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE's expert-level balance loss ``Σ_i f_i P_i`` (without α₁); ``fraction_E``
    from :func:`expert_fraction`."""
    return (fraction_E * probs_SE.mean(dim=0)).sum()


def device_balance_loss(
    probs_SE: torch.Tensor, fraction_E: torch.Tensor, groups: int
) -> torch.Tensor:
    """DeepSeekMoE's device-level balance loss ``Σ_d f'_d P'_d`` (without α₂) over ``groups``
    contiguous equal groups of experts: ``f'_d`` the mean of the group's f_i, ``P'_d`` the sum
    of its P_i."""
    group_fraction_G = fraction_E.view(groups, -1).mean(dim=1)
    group_prob_G = probs_SE.mean(dim=0).view(groups, -1).sum(dim=1)
    return (group_fraction_G * group_prob_G).sum()


class DeepSeekLosses(Router):
    """Mixin replacing a router's Switch loss by DeepSeekMoE's expert- and device-level losses
    (other losses of the base router, e.g. the entropy loss, are kept)."""

    def losses(self, probs_SE: torch.Tensor, selection: Selection) -> dict[str, torch.Tensor]:
        losses = super().losses(probs_SE, selection)
        fraction_E = expert_fraction(selection, probs_SE.shape[1], probs_SE.dtype)
        losses["balance"] = self.config.aux_loss_coef * expert_balance_loss(probs_SE, fraction_E)
        options = self.options
        if options.device_groups > 1 and options.device_balance_coef > 0:
            losses["device_balance"] = options.device_balance_coef * device_balance_loss(
                probs_SE, fraction_E, options.device_groups
            )
        return losses


@dataclass(frozen=True)
class DeepSeekOptions(DeepSeekLossOptions, TopKOptions):
    """Options of ``deepseek``: the device-level loss's and top-k's."""


@dataclass(frozen=True)
class DeepSeekThresholdOptions(DeepSeekLossOptions, ThresholdOptions):
    """Options of ``deepseek_threshold``: the device-level loss's and the threshold router's."""


@ROUTERS.register("deepseek")
class DeepSeekRouter(DeepSeekLosses, TopKRouter):
    """DeepSeekMoE: top-k routed experts (raw probabilities) with its balance losses."""

    Options = DeepSeekOptions


@ROUTERS.register("deepseek_threshold")
class DeepSeekThresholdRouter(DeepSeekLosses, ThresholdRouter):
    """XMoE's threshold rule over the routed experts with DeepSeekMoE's balance losses."""

    Options = DeepSeekThresholdOptions
