"""Top-k routing: every token keeps its k most probable experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from xmoe.config import RouterOptions, require_top_k
from xmoe.registry import ROUTERS
from xmoe.routing.base import Router
from xmoe.routing.selection import Selection, ranked_topk

if TYPE_CHECKING:
    from xmoe.config import MoEConfig


@dataclass(frozen=True)
class TopKOptions(RouterOptions):
    """The options every router has; the recipe's ``top_k`` is bounded by num_experts here,
    since only this router reads it."""

    def check_for(self, config: MoEConfig) -> None:
        require_top_k(config.top_k, config.num_experts)


@ROUTERS.register("topk")
class TopKRouter(Router):
    """Keeps the ``top_k`` largest probabilities (ties toward the lower expert id)."""

    Options = TopKOptions
    tunable_names = ("top_k",)

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.top_k = config.top_k

    def set_top_k(self, top_k: int) -> None:
        """Keep ``top_k`` experts per token from now on.

        Raises:
            ConfigError: ``top_k`` is not an integer in [1, num_experts] (nothing changes then).
        """
        require_top_k(top_k, self.config.num_experts)
        self.top_k = top_k

    def select(self, probs_SE: torch.Tensor) -> Selection:
        probs_SK, expert_idx_SK = ranked_topk(probs_SE, self.top_k)
        wanted_SK = torch.ones_like(expert_idx_SK, dtype=torch.bool)
        return Selection(expert_idx_SK, probs_SK, wanted_SK, probs_SK)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", top_k={self.top_k}"
