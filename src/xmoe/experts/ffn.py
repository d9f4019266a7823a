"""Stacked expert FFN weights and their compute over a dispatch plan."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from xmoe.config import MoEConfig
from xmoe.dispatch import DispatchPlan
from xmoe.experts.fused import expert_ffn
from xmoe.experts.kind import ExpertKind
from xmoe.experts.weights import ExpertWeights
from xmoe.registry import EXPERT_KINDS

SEPARATE_UP_KEY = "experts.w3"
"""How a state-dict name of gated experts ended when it held their up projection apart from the
gate: the layout before 0.1.0 (today ``w1`` holds ``[gate | up]``), which is not loaded."""


def separate_up_error(
    names: Iterable[str], source: object, up_key: str = SEPARATE_UP_KEY
) -> str | None:
    """The one-line error for weights read from ``source`` (a file or directory) whose tensor
    ``names`` hold an up projection apart from its gate (a name ending with ``up_key``), or None
    when none does. That layout lived three days before 0.1.0: such weights are refused rather
    than upgraded, and never loaded wrong."""
    key = next((name for name in sorted(names) if name.endswith(up_key)), None)
    if key is None:
        return None
    return (
        f"{source}: expert weights in the pre-0.1.0 layout (separate up tensor {key!r}; gate "
        "and up are now one tensor); re-train or re-export with this version"
    )


@EXPERT_KINDS.register("ffn")
class FFNExperts(ExpertKind):
    """E two-layer FFN experts ``d_model -> d_expert -> d_model`` stored as stacked tensors.

    Parameters: ``w1`` (E, d_model, F), ``w2`` (E, d_expert, d_model), and ``b1`` (E, F) and
    ``b2`` (E, d_model) when ``bias``. F is ``d_expert`` for plain experts; for the gated
    ``swiglu`` expert ``(silu(x·gate) * (x·up))·w2`` it is ``2·d_expert``: ``w1[..., :d_expert]``
    is the gate, ``w1[..., d_expert:]`` the up projection, so both are one matmul (the layout of
    transformers' ``gate_up_proj``, transposed).

    E is ``config.num_experts`` unless ``num_experts`` is given (a layer's shared experts).
    """

    def __init__(self, config: MoEConfig, num_experts: int | None = None) -> None:
        super().__init__(config, num_experts)
        num_experts, d_model, d_expert = self.num_experts, config.d_model, config.d_expert
        first_width = 2 * d_expert if config.gated else d_expert
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, first_width))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        self.b1 = nn.Parameter(torch.empty(num_experts, first_width)) if config.bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model)) if config.bias else None
        # every pair costs one FFN's FLOPs. Built once (read per call), on the host even when
        # the module is built on the meta device (transformers' loading)
        self._flops_E = torch.full(
            (num_experts,), config.expert_flops, dtype=torch.int64, device="cpu"
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for weight in (self.w1, self.w2):
            nn.init.normal_(weight, mean=0.0, std=self.config.init_std)
            if self.config.init == "identical":
                weight.copy_(weight[:1].expand_as(weight))
        for bias in (self.b1, self.b2):
            if bias is not None:
                nn.init.zeros_(bias)

    def weights(self) -> ExpertWeights:
        """The parameters as one :class:`ExpertWeights` (no copies)."""
        return ExpertWeights(self.w1, self.b1, self.w2, self.b2, self.config.activation)

    def flops_per_pair_E(self) -> torch.Tensor:
        return self._flops_E

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
        c = self.config
        return expert_ffn(
            x_SD, self.weights().to(x_SD.dtype), plan, weight_N, c.expert_ffn, c.backend
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"num_experts={self.num_experts}, d_model={c.d_model}, d_expert={c.d_expert}, "
            f"activation={c.activation!r}, bias={c.bias}"
        )
