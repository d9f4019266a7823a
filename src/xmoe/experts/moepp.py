"""MoE++'s heterogeneous expert pool: FFN experts beside zero-computation experts.

The pool's E experts are, in this order (as the MoE++ code lays them out): the FFN experts,
``constant_experts`` constant experts ``E(x) = a₁·x + a₂·v`` with a learned vector v and
``[a₁, a₂] = softmax(W_c·x)`` (W_c a learned 2 x d_model map), ``copy_experts`` copy experts
``E(x) = x`` and ``zero_experts`` zero experts ``E(x) = 0``. A pair routed to a copy or zero
expert costs no FLOPs, one routed to a constant expert O(d_model) (:func:`xmoe.flops`
counts it), so tokens that need little computation can take fewer FFN experts.

Shape legend: S tokens, N pairs, D d_model, C constant experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xmoe.config import ConfigError, ExpertOptions, MoEConfig, _is_int, _require
from xmoe.dispatch import DispatchPlan
from xmoe.experts.ffn import FFNExperts
from xmoe.experts.kind import ExpertKind
from xmoe.flops import constant_expert_flops
from xmoe.registry import EXPERT_KINDS

_COUNTS = ("constant_experts", "copy_experts", "zero_experts")  # the pool's order after FFNs


@dataclass(frozen=True)
class MoEPPOptions(ExpertOptions):
    """How many of the pool's ``num_experts`` are zero-computation experts (the rest, at least
    one, are FFN experts). The defaults are the MoE++ 7B model's: 2 constant, 1 copy, 1 zero.

    Args:
        constant_experts: experts ``a₁·x + a₂·v`` (>= 0).
        copy_experts: experts ``x`` (>= 0).
        zero_experts: experts ``0`` (>= 0).
    """

    constant_experts: int = 2
    copy_experts: int = 1
    zero_experts: int = 1

    def __post_init__(self) -> None:
        for name in _COUNTS:
            value = getattr(self, name)
            _require(
                _is_int(value) and value >= 0, f"expert_options.{name}", value, "an integer >= 0"
            )

    @property
    def num_zero_computation(self) -> int:
        return sum(getattr(self, name) for name in _COUNTS)

    def check_for(self, config: MoEConfig) -> None:
        total = self.num_zero_computation
        if total >= config.num_experts:
            raise ConfigError(
                f"expert_options={self.to_dict()} is invalid: constant_experts + copy_experts + "
                f"zero_experts = {total} must be below num_experts={config.num_experts} (the "
                "pool needs at least one FFN expert)"
            )

    def roles(self, num_experts: int) -> tuple[str, ...]:
        counts = [getattr(self, name) for name in _COUNTS]
        tail = ("constant",) * counts[0] + ("copy",) * counts[1] + ("zero",) * counts[2]
        return ("ffn",) * (num_experts - len(tail)) + tail


def _rows(plan: DispatchPlan, first: int, stop: int) -> tuple[torch.Tensor, DispatchPlan]:
    """(N,) bool the plan's rows to experts in [first, stop), and the plan of those rows with
    expert ids counted from ``first`` (plan order kept, so a sorted plan stays sorted)."""
    keep_N = (plan.expert_idx_N >= first) & (plan.expert_idx_N < stop)
    part = DispatchPlan(
        plan.token_idx_N[keep_N],
        plan.expert_idx_N[keep_N] - first,
        plan.counts_E[first:stop],
        plan.num_tokens,
        plan.sorted_by_expert,
    )
    return keep_N, part


@EXPERT_KINDS.register("moepp")
class MoEPPExperts(ExpertKind):
    """MoE++'s pool (``MoEConfig.experts="moepp"``, counts in ``expert_options``).

    Parameters: the FFN experts under ``ffn.`` (as :class:`FFNExperts`), and for the constant
    experts ``constant`` (C, D), the vectors v, and ``constant_gate`` (C, 2, D), the maps W_c.
    """

    Options = MoEPPOptions

    def __init__(self, config: MoEConfig, num_experts: int | None = None) -> None:
        super().__init__(config, num_experts)
        options: MoEPPOptions = config.expert_options
        self.roles = options.roles(self.num_experts)
        self.num_ffn = self.roles.count("ffn")
        self.num_constant = options.constant_experts
        self.num_copy = options.copy_experts
        self.ffn = FFNExperts(config, self.num_ffn)
        d_model = config.d_model
        self.constant = nn.Parameter(torch.empty(self.num_constant, d_model))
        self.constant_gate = nn.Parameter(torch.empty(self.num_constant, 2, d_model))
        flops_E = [
            {"ffn": config.expert_flops, "constant": constant_expert_flops(d_model)}.get(role, 0)
            for role in self.roles
        ]
        self._flops_E = torch.tensor(flops_E, dtype=torch.int64, device="cpu")
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """FFN experts as :class:`FFNExperts`; v ~ N(0, 1) and W_c as ``nn.Linear``'s default,
        as the MoE++ code initialises them."""
        self.ffn.reset_parameters()
        nn.init.normal_(self.constant)
        bound = 1.0 / self.config.d_model**0.5
        nn.init.uniform_(self.constant_gate, -bound, bound)

    def flops_per_pair_E(self) -> torch.Tensor:
        return self._flops_E

    def sharded_parameters(self) -> list[str]:
        raise ConfigError(
            "experts='moepp' is invalid under expert parallelism: the pool's roles are positions "
            "in the whole pool, which a shard of it does not keep"
        )

    def forward(
        self, x_SD: torch.Tensor, plan: DispatchPlan, weight_N: torch.Tensor
    ) -> torch.Tensor:
        ffn_N, ffn_plan = _rows(plan, 0, self.num_ffn)
        y_SD = self.ffn(x_SD, ffn_plan, weight_N[ffn_N])
        first_copy = self.num_ffn + self.num_constant
        constant_N, constant_plan = _rows(plan, self.num_ffn, first_copy)
        copy_N, copy_plan = _rows(plan, first_copy, first_copy + self.num_copy)
        out_parts = [
            self._constant(x_SD, constant_plan, weight_N[constant_N]),
            x_SD.index_select(0, copy_plan.token_idx_N) * weight_N[copy_N, None].to(x_SD.dtype),
        ]
        token_N = torch.cat([constant_plan.token_idx_N, copy_plan.token_idx_N])
        # zero experts add nothing
        return y_SD.index_add(0, token_N, torch.cat(out_parts))

    def _constant(
        self, x_SD: torch.Tensor, plan: DispatchPlan, weight_N: torch.Tensor
    ) -> torch.Tensor:
        """(N, D) ``weight · (a₁·x + a₂·v)`` of the constant experts' pairs."""
        x_ND = x_SD.index_select(0, plan.token_idx_N)
        gate_N2D = self.constant_gate.to(x_SD.dtype).index_select(0, plan.expert_idx_N)
        a_N2 = torch.einsum("nd,nkd->nk", x_ND, gate_N2D).softmax(dim=-1)
        v_ND = self.constant.to(x_SD.dtype).index_select(0, plan.expert_idx_N)
        mixed_ND = a_N2[:, :1] * x_ND + a_N2[:, 1:] * v_ND
        return mixed_ND * weight_N[:, None].to(x_SD.dtype)

    def extra_repr(self) -> str:
        options = self.config.expert_options
        counts = ", ".join(f"{name}={getattr(options, name)}" for name in _COUNTS)
        return f"num_experts={self.num_experts}, ffn_experts={self.num_ffn}, {counts}"
