"""XMoE threshold routing: the smallest set of best experts whose mass reaches t."""

from __future__ import annotations

import torch

from xmoe.routing import ROUTERS
from xmoe.routing.base import Router
from xmoe.routing.selection import SMALL_SORT_ELEMENTS, Selection, ranked_topk

_FIRST_GUESS = 8  # experts ranked per token before widening; most trained tokens need fewer


@ROUTERS.register("threshold")
class ThresholdRouter(Router):
    """Keeps sorted position j iff the mass of the strictly better experts is below t.

    The first expert is always kept. Ranking uses ``topk`` on a growing width (8, 32, ...,
    E) rather than a full sort over E, widening only while some token still needs more experts,
    so the result is exact with no cap on experts per token.
    """

    def select(self, probs_SE: torch.Tensor) -> Selection:
        threshold = float(self.config.threshold)
        num_experts = probs_SE.shape[-1]
        full = threshold >= 1.0 or probs_SE.numel() <= SMALL_SORT_ELEMENTS  # one sort is cheapest
        width = num_experts if full else min(num_experts, _FIRST_GUESS)
        while True:
            probs_SK, expert_idx_SK = ranked_topk(probs_SE, width)
            if threshold >= 1.0:
                # mass before j is below 1 exactly when some probability remains at j
                wanted_SK = probs_SK.detach() > 0
                break
            # float64 prefix sums: the decision must not hinge on fp32 rounding of the sum
            inclusive_SK = probs_SK.detach().to(torch.float64).cumsum(dim=-1)
            wanted_SK = torch.ones_like(inclusive_SK, dtype=torch.bool)
            wanted_SK[:, 1:] = inclusive_SK[:, :-1] < threshold
            if width == num_experts or not bool((inclusive_SK[:, -1] < threshold).any()):
                break
            width = min(num_experts, width * 4)
        wanted_SK[:, 0] = True
        return Selection(expert_idx_SK, probs_SK, wanted_SK)
