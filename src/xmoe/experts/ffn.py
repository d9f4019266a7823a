"""Stacked expert FFN weights and their compute over a dispatch plan."""

from __future__ import annotations

import torch
from torch import nn

from xmoe.config import MoEConfig
from xmoe.dispatch import DispatchPlan, choose_engine
from xmoe.experts.ffn_function import expert_ffn


class FFNExperts(nn.Module):
    """E two-layer FFN experts ``d_model -> d_expert -> d_model`` stored as stacked tensors.

    Parameters: ``w1`` (E, d_model, d_expert), ``w2`` (E, d_expert, d_model), ``b1`` (E, d_expert)
    and ``b2`` (E, d_model) when ``bias``, and ``w3`` (E, d_model, d_expert) for the gated
    ``swiglu`` expert ``(silu(x·w1) * (x·w3))·w2``.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        num_experts, d_model, d_expert = config.num_experts, config.d_model, config.d_expert
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        self.w3 = (
            nn.Parameter(torch.empty(num_experts, d_model, d_expert)) if config.gated else None
        )
        self.b1 = nn.Parameter(torch.empty(num_experts, d_expert)) if config.bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model)) if config.bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for weight in (self.w1, self.w2, self.w3):
            if weight is not None:
                nn.init.normal_(weight, mean=0.0, std=self.config.init_std)
                if self.config.init == "identical":
                    weight.copy_(weight[:1].expand_as(weight))
        for bias in (self.b1, self.b2):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(
        self, x_SD: torch.Tensor, plan: DispatchPlan, weight_N: torch.Tensor
    ) -> torch.Tensor:
        """Weighted expert outputs summed per token.

        Args:
            x_SD: (S, d_model) tokens in the compute dtype.
            plan: grouped rows (N pairs). weight_N: (N,) routing weights.

        Returns:
            (S, d_model) in the dtype of ``x_SD``.
        """
        dtype = x_SD.dtype
        params = [
            p if p is None else p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2, self.w3)
        ]
        engine = choose_engine(
            self.config.backend,
            dtype,
            x_SD.device,
            plan.num_pairs,
            self.config.d_model,
            self.config.d_expert,
        )
        w1, b1, w2, b2, w3 = params
        return expert_ffn(x_SD, weight_N, w1, b1, w2, b2, w3, plan, self.config.activation, engine)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"num_experts={c.num_experts}, d_model={c.d_model}, d_expert={c.d_expert}, "
            f"activation={c.activation!r}, bias={c.bias}"
        )
