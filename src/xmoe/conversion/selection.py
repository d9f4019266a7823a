"""Which experts each token computes: top-k or the cumulative-mass threshold rule.

Shape legend: S tokens, E experts.
"""

from __future__ import annotations

import torch

from xmoe.routing import Selection, ranked_topk
from xmoe.routing.threshold import mass_prefix_mask


def select_experts(
    scores_SE: torch.Tensor, top_k: int | None = None, threshold: float | None = None
) -> Selection:
    """Rank experts by score and mark the ones the rule selects.

    Args:
        scores_SE: (S, E) non-negative scores summing to 1 per token (router softmax, or the
            oracle's normalised output norms).
        top_k: keep the k best experts (ties toward the lower id), or
        threshold: keep the smallest prefix of the ranking whose mass reaches t: the
            threshold router's rule (:func:`~xmoe.routing.threshold.mass_prefix_mask`).

    Returns:
        a :class:`~xmoe.routing.Selection` with K = k (top-k) or E (threshold), weighted by
        the scores (a caller that combines otherwise replaces ``weight_SK``).
    """
    if (top_k is None) == (threshold is None):
        raise ValueError("select_experts needs exactly one of top_k and threshold")
    if top_k is not None:
        probs_SK, expert_idx_SK = ranked_topk(scores_SE, top_k)
        wanted_SK = torch.ones_like(expert_idx_SK, dtype=torch.bool)
        return Selection(expert_idx_SK, probs_SK, wanted_SK, probs_SK)
    probs_SE, expert_idx_SE = ranked_topk(scores_SE, scores_SE.shape[1])
    wanted_SE = mass_prefix_mask(probs_SE, threshold)
    return Selection(expert_idx_SE, probs_SE, wanted_SE, probs_SE)
