"""Top-k routing: every token keeps its k most probable experts."""

from __future__ import annotations

import torch

from xmoe.registry import ROUTERS
from xmoe.routing.base import Router
from xmoe.routing.selection import Selection, ranked_topk


@ROUTERS.register("topk")
class TopKRouter(Router):
    """Keeps the ``top_k`` largest probabilities (ties toward the lower expert id)."""

    def select(self, probs_SE: torch.Tensor) -> Selection:
        probs_SK, expert_idx_SK = ranked_topk(probs_SE, self.config.top_k)
        wanted_SK = torch.ones_like(expert_idx_SK, dtype=torch.bool)
        return Selection(expert_idx_SK, probs_SK, wanted_SK)
