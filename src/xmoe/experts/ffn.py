"""Stacked expert FFN weights and their compute over a dispatch plan."""

from __future__ import annotations

import torch
from torch import nn

from xmoe.config import MoEConfig
from xmoe.dispatch import DispatchPlan
from xmoe.experts.fused import expert_ffn
from xmoe.experts.kind import ExpertKind
from xmoe.experts.weights import ExpertWeights
from xmoe.registry import EXPERT_KINDS

_SEPARATE_UP = "experts.w3"  # the up projection's key in the older gated layout


def fuse_gate_up_(state_dict: dict, gate_key: str, up_key: str, fused_key: str) -> None:
    """In place: replace a state dict's separate (E, D, H) gate and up matrices by the one
    (E, D, 2H) ``[gate | up]`` matrix that gated experts now store (a checkpoint written before
    the two projections became one matmul). Does nothing when ``up_key`` is absent."""
    if up_key not in state_dict or gate_key not in state_dict:
        return
    up = state_dict.pop(up_key)
    state_dict[fused_key] = torch.cat([state_dict.pop(gate_key), up], dim=-1)


def _fuse_experts_(state_dict: dict, prefix: str) -> None:
    bias_key = prefix + "b1"
    if prefix + "w3" in state_dict and bias_key in state_dict:
        gate_bias = state_dict[bias_key]  # the older layout had no bias on the up branch
        state_dict[bias_key] = torch.cat([gate_bias, torch.zeros_like(gate_bias)], dim=-1)
    fuse_gate_up_(state_dict, prefix + "w1", prefix + "w3", prefix + "w1")


def has_separate_up(state_dict: dict) -> bool:
    """Whether a whole model's state dict holds gated experts of the older layout."""
    return any(key.endswith(_SEPARATE_UP) for key in state_dict)


def upgrade_separate_up_(state_dict: dict) -> bool:
    """In place: every gated :class:`FFNExperts` of the older layout in a whole model's state
    dict (keys ``...w1``, ``...w3``, ``...b1``) in today's fused layout, equal in value (the
    up branch gets a zero bias). Returns whether any key changed."""
    prefixes = [key[: -len("w3")] for key in state_dict if key.endswith(_SEPARATE_UP)]
    for prefix in prefixes:
        _fuse_experts_(state_dict, prefix)
    return bool(prefixes)


def _load_separate_up(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    _fuse_experts_(state_dict, prefix)


@EXPERT_KINDS.register("ffn")
class FFNExperts(ExpertKind):
    """E two-layer FFN experts ``d_model -> d_expert -> d_model`` stored as stacked tensors.

    Parameters: ``w1`` (E, d_model, F), ``w2`` (E, d_expert, d_model), and ``b1`` (E, F) and
    ``b2`` (E, d_model) when ``bias``. F is ``d_expert`` for plain experts; for the gated
    ``swiglu`` expert ``(silu(x·gate) * (x·up))·w2`` it is ``2·d_expert``: ``w1[..., :d_expert]``
    is the gate, ``w1[..., d_expert:]`` the up projection, so both are one matmul (the layout of
    transformers' ``gate_up_proj``, transposed). State dicts of the older layout (a separate
    ``w3`` for the up projection, ``b1`` on the gate only) load unchanged in value.

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
        if config.gated:
            self.register_load_state_dict_pre_hook(_load_separate_up)

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
