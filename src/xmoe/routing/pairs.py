"""From selections to ragged (token, expert, weight) pairs sorted by expert, with capacity.

Shape legend: S tokens, K ranked experts per token, E experts, N kept pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from xmoe.dispatch.plan import DispatchPlan
from xmoe.routing.selection import Selection


@dataclass(frozen=True, eq=False)
class RoutedPairs:
    """The (token, expert) pairs to compute: what the router wanted and the plan of what it kept.

    Attributes:
        selection: the ranked experts per token the pairs come from (its ``wanted_SK`` is
            before capacity).
        num_experts: E.
        kept_SK: (S, K) bool, pairs that survived capacity.
        capacity: the per-expert capacity C applied, or None (dropless).
        renormalize: whether ``weight_N`` are each token's kept weights divided by their sum.
        plan: the kept pairs grouped by expert (:class:`~xmoe.dispatch.DispatchPlan`); within
            an expert by token (dropless) or by capacity priority, or token-major when not
            ``plan.sorted_by_expert`` (see ``route_pairs``'s ``max_unsorted_pairs``).
        weight_N: (N,) combine weights of the plan's rows (the selection's ``weight_SK``).

    ``plan`` and ``weight_N`` are built on first read: a decode-sized call whose dispatcher reads
    the selection alone (:func:`xmoe.experts.decode.decode_path`) never pays their dozen small
    ops, and ``weight_N`` joins the autograd graph where the compute reads it.
    """

    selection: Selection
    num_experts: int
    kept_SK: torch.Tensor
    capacity: int | None
    renormalize: bool
    _rows: Callable[[], tuple[torch.Tensor, torch.Tensor, bool]] = field(repr=False)
    """() -> (flat_N, expert_N, sorted_by_expert): the kept pairs' flat (token, rank) indices
    into the selection, in plan order, and their experts."""

    @cached_property
    def _kept_rows(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return self._rows()

    @cached_property
    def plan(self) -> DispatchPlan:
        flat_N, expert_N, sorted_by_expert = self._kept_rows
        num_tokens, num_ranks = self.kept_SK.shape
        token_N = torch.div(flat_N, num_ranks, rounding_mode="floor")
        counts_E = expert_counts(expert_N, self.num_experts)
        return DispatchPlan(token_N, expert_N, counts_E, num_tokens, sorted_by_expert)

    @cached_property
    def weight_N(self) -> torch.Tensor:
        flat_N = self._kept_rows[0]
        weight_N = self.selection.weight_SK.reshape(-1).index_select(0, flat_N)
        if not self.renormalize:
            return weight_N
        token_N = self.plan.token_idx_N
        total_S = torch.zeros(
            self.kept_SK.shape[0], dtype=weight_N.dtype, device=weight_N.device
        ).index_add(0, token_N, weight_N)
        # a token whose surviving weights are all zero keeps zeros instead of 0/0
        total_S = total_S.clamp_min(torch.finfo(total_S.dtype).tiny)
        return weight_N / total_S.index_select(0, token_N)

    @property
    def wanted_SK(self) -> torch.Tensor:
        """(S, K) bool, pairs the rule selected (before capacity)."""
        return self.selection.wanted_SK


def expert_counts(expert_N: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64 occurrences of each expert id in ``expert_N``. Unlike ``torch.bincount``,
    whose CUDA kernel reads the largest id on the host, the output size is known up front."""
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=expert_N.device)
    return counts_E.index_add_(0, expert_N, torch.ones_like(expert_N))


def route_pairs(
    selection: Selection,
    num_experts: int,
    capacity: int | None = None,
    renormalize: bool = False,
    max_unsorted_pairs: int = 0,
) -> RoutedPairs:
    """Flatten a selection into expert-sorted pairs and their plan, dropping over-capacity pairs.

    Over-subscribed experts keep their top-``capacity`` pairs by priority: lower rank first
    (every first choice beats every second choice), then higher probability, then lower token
    index. Drops are per pair: a token keeps the other experts it won. Pairs are weighted by
    the selection's ``weight_SK``.

    Args:
        selection: the ranked experts per token.
        num_experts: E.
        capacity: per-expert capacity C, or None for dropless routing.
        renormalize: divide each token's surviving weights by their sum.
        max_unsorted_pairs: dropless calls with at most this many pairs keep them in
            token-major order: an engine that gathers weights per pair needs no grouping, and
            decode-sized calls are dominated by the count of small ops.
    """
    wanted_SK = selection.wanted_SK
    if capacity is None:  # nothing dropped: the plan waits until a dispatcher reads it
        return RoutedPairs(
            selection,
            num_experts,
            wanted_SK,
            None,
            renormalize,
            lambda: _dropless_rows(selection, max_unsorted_pairs),
        )
    num_ranks = wanted_SK.shape[1]
    flat_N = wanted_SK.reshape(-1).nonzero().squeeze(1)  # token-major, rank-minor
    expert_N = selection.expert_idx_SK.reshape(-1).index_select(0, flat_N)
    prob_N = selection.probs_SK.detach().reshape(-1).index_select(0, flat_N)
    by_prob_N = torch.sort(prob_N, descending=True, stable=True).indices
    rank_N = flat_N % num_ranks
    group_N = (expert_N * num_ranks + rank_N).index_select(0, by_prob_N)
    order_N = by_prob_N.index_select(0, torch.sort(group_N, stable=True).indices)
    sorted_expert_N = expert_N.index_select(0, order_N)
    wanted_counts_E = expert_counts(sorted_expert_N, num_experts)
    starts_E = wanted_counts_E.cumsum(0) - wanted_counts_E
    position_N = torch.arange(order_N.numel(), device=order_N.device) - starts_E.index_select(
        0, sorted_expert_N
    )
    order_N = order_N[position_N < capacity]
    flat_N, expert_N = flat_N.index_select(0, order_N), expert_N.index_select(0, order_N)
    kept_SK = torch.zeros_like(wanted_SK)
    kept_SK.view(-1)[flat_N] = True
    rows = (flat_N, expert_N, True)
    return RoutedPairs(selection, num_experts, kept_SK, capacity, renormalize, lambda: rows)


def _dropless_rows(
    selection: Selection, max_unsorted_pairs: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Every wanted pair's flat index and expert, sorted by expert (stable: by token within
    one), or token-major when there are at most ``max_unsorted_pairs``."""
    flat_N = selection.wanted_SK.reshape(-1).nonzero().squeeze(1)  # token-major, rank-minor
    expert_N = selection.expert_idx_SK.reshape(-1).index_select(0, flat_N)
    if flat_N.shape[0] <= max_unsorted_pairs:
        return flat_N, expert_N, False
    order_N = torch.sort(expert_N, stable=True).indices
    return flat_N.index_select(0, order_N), expert_N.index_select(0, order_N), True
