"""Ranking of experts per token, with deterministic tie-breaking.

Shape legend: S tokens, E experts, K ranked experts kept per token (K <= E).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_INDEX_BITS = 20  # room for E < 2**20 experts in the low bits of the fp32 sort key

SMALL_SORT_ELEMENTS = 4096
"""Up to this many probabilities (S x E), one stable full sort is cheaper than building the
int64 tie-break keys for ``topk`` (decode-sized calls are dominated by per-op overhead)."""


@dataclass
class Selection:
    """The experts each token wants, best first.

    Attributes:
        expert_idx_SK: (S, K) int64 expert ids sorted by descending probability; equal
            probabilities are ordered by ascending expert id.
        probs_SK: (S, K) their router probabilities (differentiable): what capacity priority
            and the losses read.
        wanted_SK: (S, K) bool, the experts the rule selects: a prefix per row for the
            ranking rules, with gaps where a ranked choice is computed by no expert (a null
            expert).
        weight_SK: (S, K) the factors the experts' outputs are combined with (differentiable
            where they depend on the router). Kept apart from ``probs_SK`` because rules
            combine differently (1/k, sigmoid gates, renormalised over real experts,
            unweighted); the built-in routers combine with their probabilities.
    """

    expert_idx_SK: torch.Tensor
    probs_SK: torch.Tensor
    wanted_SK: torch.Tensor
    weight_SK: torch.Tensor

    def top1_of(self, values_SK: torch.Tensor) -> torch.Tensor:
        """(S,) each token's entry of ``values_SK`` at its top-1 choice of a real expert, the
        one statistics and the balance loss count. The ranking is best first, so this is
        column 0; a rule whose column 0 is not the choice they should count overrides it
        (AdaMoE's null experts are counted: their balance loss is over real and null)."""
        return values_SK[:, 0]

    @property
    def top1_expert_S(self) -> torch.Tensor:
        """(S,) int64 each token's top-1 expert (see :meth:`top1_of`)."""
        return self.top1_of(self.expert_idx_SK)


def ranked_topk(probs_SE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable experts per token, ties broken toward the lower expert id.

    ``torch.topk`` leaves the order of equal values unspecified, so for fp32 probabilities the
    ranking runs on an int64 key holding the float's bits (monotone for non-negative floats) above
    the reversed expert id. Wider dtypes (the reference and gradcheck path) and small calls
    (at most :data:`SMALL_SORT_ELEMENTS` probabilities) take a stable full sort, whose order of
    equal values is the same.

    Args:
        probs_SE: (S, E) non-negative probabilities, fp32 or float64.
        k: number of experts to return, 1 <= k <= E.

    Returns:
        ``(probs_SK, expert_idx_SK)``; ``probs_SK`` keeps the autograd graph of ``probs_SE``.
    """
    num_experts = probs_SE.shape[-1]
    small = probs_SE.numel() <= SMALL_SORT_ELEMENTS
    if probs_SE.dtype == torch.float32 and num_experts < 2**_INDEX_BITS and not small:
        bits_SE = probs_SE.detach().view(torch.int32).to(torch.int64)
        reversed_id_E = torch.arange(
            num_experts - 1, -1, -1, device=probs_SE.device, dtype=torch.int64
        )
        key_SE = (bits_SE << _INDEX_BITS) | reversed_id_E
        key_SK = key_SE.topk(k, dim=-1, sorted=True).values
        expert_idx_SK = (num_experts - 1) - (key_SK & ((1 << _INDEX_BITS) - 1))
    else:
        order_SE = torch.sort(probs_SE.detach(), dim=-1, descending=True, stable=True).indices
        expert_idx_SK = order_SE[:, :k]
    return probs_SE.gather(1, expert_idx_SK), expert_idx_SK
