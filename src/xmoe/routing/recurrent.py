"""RMoE's layerwise recurrent router: a GRU over depth carries routing state between MoE layers.

Each MoE layer projects its input to a small width, ``x' = W_p·x``, updates the routing state
with a GRU cell, ``h_l = GRU(x', h_{l-1})`` (``h`` = 0 before the first MoE layer), and routes on
logits from the state, ``z_l = W_r·h_l``: top-k (``"recurrent"``, RMoE's rule) or XMoE's mass
threshold (``"recurrent_threshold"``, with the threshold router's options). The recurrence runs
over depth, not over the sequence: every token keeps its own state, so tokens stay parallel.
``h_l`` is the routing state the layer hands the next MoE layer (:meth:`xmoe.MoELayer.route`).

RMoE shares one GRU across layers; here each MoE layer's router owns its GRU cell, the same
recurrence with L times the (small) GRU parameters, because the model's weight files hold no
tensors shared between layers.

Shape legend: S tokens, D d_model, H state width, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.config import _is_int, _require
from xmoe.flops import router_flops
from xmoe.registry import ROUTERS
from xmoe.routing.base import Router, autocast_off, router_dtype
from xmoe.routing.threshold import ThresholdOptions, ThresholdRouter, normalized_logits
from xmoe.routing.topk import TopKOptions, TopKRouter

if TYPE_CHECKING:
    from xmoe.config import MoEConfig

_GRU = ("gru_ih", "gru_hh", "gru_b_ih", "gru_b_hh")  # torch.nn.GRUCell's layout (gates r, z, n)


def _require_state_dim(value: object) -> None:
    _require(_is_int(value) and value >= 1, "router_options.state_dim", value, "an integer >= 1")


@dataclass(frozen=True)
class RecurrentOptions(TopKOptions):
    """Options of the recurrent router.

    Args:
        state_dim: H, the width of the projected input and of the GRU state (>= 1).
    """

    state_dim: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_state_dim(self.state_dim)


@dataclass(frozen=True)
class RecurrentThresholdOptions(ThresholdOptions):
    """The threshold router's options and ``state_dim`` (as :class:`RecurrentOptions`)."""

    state_dim: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_state_dim(self.state_dim)


class RecurrentLogits(Router):
    """The recurrence, before a selection rule (a base listed before the rule's router class).

    Parameters: ``proj`` (H, D) W_p, the GRU cell's ``gru_ih`` (3H, H), ``gru_hh`` (3H, H),
    ``gru_b_ih`` (3H,), ``gru_b_hh`` (3H,) as ``torch.nn.GRUCell``'s, and ``weight`` (E, H)
    W_r. Routing state: h (S, H).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        size = self.options.state_dim
        self.weight = nn.Parameter(torch.empty(config.num_experts, size))
        self.proj = nn.Parameter(torch.empty(size, config.d_model))
        self.gru_ih = nn.Parameter(torch.empty(3 * size, size))
        self.gru_hh = nn.Parameter(torch.empty(3 * size, size))
        self.gru_b_ih = nn.Parameter(torch.empty(3 * size))
        self.gru_b_hh = nn.Parameter(torch.empty(3 * size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W_r as every router's weight; W_p and the GRU cell as ``nn.Linear`` and
        ``nn.GRUCell`` initialise theirs."""
        super().reset_parameters()
        if not hasattr(self, "proj"):  # Router.__init__ resets before the cell is built
            return
        bound = 1.0 / math.sqrt(self.config.d_model)
        nn.init.uniform_(self.proj, -bound, bound)
        bound = 1.0 / math.sqrt(self.options.state_dim)
        for name in _GRU:
            nn.init.uniform_(getattr(self, name), -bound, bound)

    def flops_per_token(self) -> int:
        size, config = self.options.state_dim, self.config
        gru = 2 * router_flops(size, 3 * size)  # the input's and the state's (3H, H) maps
        return router_flops(config.d_model, size) + gru + router_flops(size, config.num_experts)

    def logits(self, x_SD: torch.Tensor) -> torch.Tensor:
        """(S, E) logits of a first MoE layer (a zero state)."""
        return self.logits_and_state(x_SD)[0]

    def logits_and_state(
        self, x_SD: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = router_dtype(x_SD.dtype, self.weight.dtype)
        with autocast_off(x_SD):
            x_SH = F.linear(x_SD.to(dtype), self.proj.to(dtype))
            h_SH = torch.zeros_like(x_SH) if state is None else state.to(dtype)
            h_SH = torch.gru_cell(x_SH, h_SH, *(getattr(self, n).to(dtype) for n in _GRU))
            logits_SE = F.linear(h_SH, self.weight.to(dtype))
        if getattr(self.options, "logit_scale", None) is not None:  # the threshold option
            logits_SE = normalized_logits(logits_SE, self.logit_scale)
        return logits_SE, h_SH

    def extra_repr(self) -> str:
        return super().extra_repr() + f", state_dim={self.options.state_dim}"


@ROUTERS.register("recurrent")
class RecurrentRouter(RecurrentLogits, TopKRouter):
    """Top-k on logits of a GRU state carried over depth (RMoE)."""

    Options = RecurrentOptions


@ROUTERS.register("recurrent_threshold")
class RecurrentThresholdRouter(RecurrentLogits, ThresholdRouter):
    """XMoE's threshold rule on logits of a GRU state carried over depth (RMoE's router with
    the threshold rule; ``set_threshold`` applies)."""

    Options = RecurrentThresholdOptions
