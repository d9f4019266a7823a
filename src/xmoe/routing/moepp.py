"""MoE++ routing: top-k with a gating residual over depth, zero experts and the heterogeneous
balance loss.

The router of a pool with zero-computation experts (``MoEConfig.experts="moepp"``,
:mod:`xmoe.experts.moepp`; it also routes a plain FFN pool):

* gating residual: ``z_l = W_l·x + G_l·z_{l-1}``, with ``z_{l-1}`` the previous MoE layer's
  logits (its routing state, :meth:`xmoe.MoELayer.route`) and ``G_l`` a learned E x E map;
  the first MoE layer has none;
* top-k over the softmax of ``z_l``; a zero expert's combine weight is 0 (with
  ``renormalize``, as MoE++ routes, the token's other experts share its weight);
* heterogeneous balance loss (the paper's Eq. 7): ``Σ_e η_e f_e P_e`` over every selected
  (token, expert) pair, η_e 1 for FFN experts and τ for zero-computation ones (τ < 1 lets
  more tokens reach them).

Without zero-computation experts and with G = 0 it is the top-k router exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.config import _is_number, _require, _require_bool
from xmoe.flops import router_flops
from xmoe.registry import ROUTERS
from xmoe.routing.deepseek import expert_balance_loss, expert_fraction
from xmoe.routing.selection import Selection
from xmoe.routing.topk import TopKOptions, TopKRouter

if TYPE_CHECKING:
    from xmoe.config import MoEConfig


@dataclass(frozen=True)
class MoEPPRouterOptions(TopKOptions):
    """Options of the MoE++ router.

    Args:
        gating_residual: add ``G·z_{l-1}`` (the previous MoE layer's logits through a learned
            E x E map, ``router.gate_map``) to the logits.
        tau: τ, the balance-loss weight of zero-computation experts, a number >= 0 (0.75, the
            MoE++ paper's choice).
    """

    gating_residual: bool = True
    tau: float = 0.75

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_bool("router_options.gating_residual", self.gating_residual)
        _require(
            _is_number(self.tau) and self.tau >= 0,
            "router_options.tau",
            self.tau,
            "a finite number >= 0",
        )


def heterogeneous_balance_loss(
    probs_SE: torch.Tensor, fraction_E: torch.Tensor, eta_E: torch.Tensor
) -> torch.Tensor:
    """MoE++'s heterogeneous balance loss (its Eq. 7) ``Σ_e η_e · f_e · P_e``, without the
    coefficient: ``P_e = mean_s p[s, e]``, ``eta_E[e]`` the weight η_e of expert e's term.

    ``fraction_E`` is :func:`~xmoe.routing.deepseek.expert_fraction`, Eq. 7's
    ``f_e = E/(kS) · #{(s, j): token s selects e}``: every one of the k selections of every
    token counts, so a uniform load gives f_e = 1 (not only the top-1 choice, as in the Switch
    loss). Pairs are counted as selected, before capacity: a pair dropped by capacity still
    counts, as in the paper's f_e ("token selects expert") and its released code, which routes
    dropless. With every η_e = 1 it is DeepSeekMoE's expert-level balance loss.
    """
    return expert_balance_loss(probs_SE, eta_E * fraction_E)


def role_runs(roles: tuple[str, ...], wanted: Callable[[str], bool]) -> list[tuple[int, int]]:
    """The ``[start, stop)`` runs of consecutive expert ids whose role ``wanted`` accepts: what
    masks are built from on the tensors' device, by comparisons (no host-to-device copy)."""
    runs: list[tuple[int, int]] = []
    for e, role in enumerate(roles):
        if not wanted(role):
            continue
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


@ROUTERS.register("moepp")
class MoEPPRouter(TopKRouter):
    """Top-k with MoE++'s gating residual, zero experts and heterogeneous balance loss.

    Parameters: ``weight`` (E, d_model) and, with ``gating_residual``, ``gate_map`` (E, E).
    Routing state: its logits (S, E), which the next MoE layer's router adds through its G.
    """

    Options = MoEPPRouterOptions

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        num_experts = config.num_experts
        roles = config.expert_options.roles(num_experts)
        # what the rule reads of the pool (no runs in a plain FFN pool: nothing changes)
        self.zero_runs = role_runs(roles, lambda role: role == "zero")
        self.zero_computation_runs = role_runs(roles, lambda role: role != "ffn")
        if self.options.gating_residual:
            self.gate_map = nn.Parameter(torch.empty(num_experts, num_experts))
            self._reset_gate_map()
        else:
            self.gate_map = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "gate_map", None) is not None:  # not yet built in Router.__init__
            self._reset_gate_map()

    @torch.no_grad()
    def _reset_gate_map(self) -> None:
        """``nn.Linear``'s default init, as the MoE++ code builds G."""
        bound = 1.0 / math.sqrt(self.config.num_experts)
        nn.init.uniform_(self.gate_map, -bound, bound)

    def flops_per_token(self) -> int:
        extra = router_flops(self.config.num_experts, self.config.num_experts)
        return super().flops_per_token() + (extra if self.gate_map is not None else 0)

    def logits_and_state(
        self, x_SD: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits_SE = self.logits(x_SD)
        if self.gate_map is None:
            return logits_SE, None
        if state is not None:
            gate_map = self.gate_map.to(logits_SE.dtype)
            logits_SE = logits_SE + F.linear(state.to(logits_SE.dtype), gate_map)
        return logits_SE, logits_SE

    def select(self, probs_SE: torch.Tensor) -> Selection:
        selection = super().select(probs_SE)
        if not self.zero_runs:
            return selection
        expert_idx_SK = selection.expert_idx_SK
        zero_SK = torch.zeros_like(expert_idx_SK, dtype=torch.bool)
        for start, stop in self.zero_runs:
            zero_SK |= (expert_idx_SK >= start) & (expert_idx_SK < stop)
        weight_SK = selection.probs_SK.masked_fill(zero_SK, 0.0)
        return dataclasses.replace(selection, weight_SK=weight_SK)

    def losses(self, probs_SE: torch.Tensor, selection: Selection) -> dict[str, torch.Tensor]:
        losses = super().losses(probs_SE, selection)
        # without zero-computation experts the top-k router's loss is kept (MoE++ reduces to
        # top-k); with them Eq. 7 holds for every τ, 1 included, so the loss is continuous in τ
        if self.zero_computation_runs:
            num_experts = self.config.num_experts
            eta_E = probs_SE.new_ones(num_experts)
            for start, stop in self.zero_computation_runs:
                eta_E[start:stop] = self.options.tau
            fraction_E = expert_fraction(selection, num_experts, probs_SE.dtype)
            loss = heterogeneous_balance_loss(probs_SE, fraction_E, eta_E)
            losses["balance"] = self.config.aux_loss_coef * loss
        return losses

    def extra_repr(self) -> str:
        options = self.options
        extra = f", gating_residual={options.gating_residual}, tau={options.tau}"
        return super().extra_repr() + extra
