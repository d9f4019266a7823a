"""Per-call routing statistics, computed on first access (all detached).

Building them eagerly cost a dozen small kernels per call, which shows at decode sizes; the
router's decisions are kept and each statistic is derived when read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property, partial

import torch

from xmoe.flops import routed_flops_per_token
from xmoe.routing.pairs import RoutedPairs


def layer_mean(values: Sequence[float]) -> float:
    """The mean over MoE layers of one per-layer number: every layer counts once, however many
    tokens it saw. The one averaging rule of the statistics (:meth:`RoutingStats.mean`)."""
    if not values:
        raise ValueError("layer_mean needs at least one layer's value, got none")
    return sum(values) / len(values)


def wanted_load(expert_idx_SK: torch.Tensor, wanted_SK: torch.Tensor, num_experts: int):
    """(E,) int64 wanted pairs per expert, without a host read (ids of unwanted choices, which
    may be null experts outside the E, add nothing)."""
    ids_N = torch.where(wanted_SK, expert_idx_SK, 0).reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=ids_N.device)
    return counts_E.index_add_(0, ids_N, wanted_SK.reshape(-1).long())


class RoutingStats:
    """What the router decided in one call.

    Attributes (tensors, computed on first access):
        wanted_per_token: (S,) experts each token's rule selected, before capacity.
        kept_per_token: (S,) experts each token was computed with, after capacity.
        expert_load: (E,) kept pairs per expert.
        top1_load: (E,) tokens whose most probable expert is e (of the experts the rule ranks,
            which may include null experts: a token whose top-1 is one counts for none).
        drop_fraction: scalar, fraction of wanted (token, expert) pairs dropped by capacity.
        top1_drop_fraction: scalar, fraction of tokens whose first choice was dropped.
        tokens_with_drop_fraction: scalar, fraction of tokens that lost at least one expert.
        flops_per_token: scalar, forward MoE FLOPs per token actually computed: each kept pair
            times its expert's FLOPs, summed and divided by S, plus the router (and any shared
            experts) per token.

    ``expert_flops`` is the forward FLOPs of one pair per expert, an (E,) int64 tensor (the
    expert kind's :meth:`~xmoe.experts.kind.ExpertKind.flops_per_pair_E`) or one int for every
    expert; ``dense_flops`` what every token costs besides its pairs (the router, shared experts).
    """

    def __init__(
        self,
        wanted_SK: torch.Tensor,
        kept_SK: torch.Tensor,
        expert_load_E: torch.Tensor | Callable[[], torch.Tensor],
        top1_expert_S: torch.Tensor,
        expert_flops: int | torch.Tensor,
        dense_flops: int,
        top1_kept_S: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self._wanted_SK = wanted_SK.detach()
        self._kept_SK = kept_SK.detach()
        self._top1_expert_S = top1_expert_S.detach()
        # whether each token's top-1 choice escaped capacity (one the rule sends to no expert,
        # a null expert, cannot be dropped); None: its rank-0 pair survived. It and the load
        # may be given as functions, called when first read.
        self._top1_kept = top1_kept_S
        self._expert_load = expert_load_E
        self._expert_flops = expert_flops
        self._dense_flops = dense_flops

    @cached_property
    def expert_load(self) -> torch.Tensor:
        load = self._expert_load
        return (load() if callable(load) else load).detach()

    @cached_property
    def _top1_kept_S(self) -> torch.Tensor | None:
        kept = self._top1_kept
        return (kept() if callable(kept) else kept).detach() if kept is not None else None

    @classmethod
    def from_pairs(
        cls, pairs: RoutedPairs, expert_flops: int | torch.Tensor, dense_flops: int
    ) -> RoutingStats:
        """The statistics of one call's routed pairs (top-1: the selection's
        :meth:`~xmoe.routing.Selection.top1_of`); ``expert_flops``: per pair, or (E,) per expert
        of the layer's kind."""
        selection = pairs.selection
        if pairs.capacity is None:  # nothing dropped: load and top-1 from the selection, later
            # (closing over no tensor with an autograd graph: the statistics outlive the call)
            expert_idx_SK, wanted_SK = selection.expert_idx_SK, pairs.wanted_SK
            load = partial(wanted_load, expert_idx_SK, wanted_SK, pairs.num_experts)
            top1_kept = partial(torch.ones_like, wanted_SK[:, 0])
        else:
            load = pairs.plan.counts_E
            top1_kept = selection.top1_of(pairs.kept_SK | ~pairs.wanted_SK)
        return cls(
            pairs.wanted_SK,
            pairs.kept_SK,
            load,
            selection.top1_expert_S,
            expert_flops,
            dense_flops,
            top1_kept,
        )

    @cached_property
    def wanted_per_token(self) -> torch.Tensor:
        return self._wanted_SK.sum(dim=1)

    @cached_property
    def kept_per_token(self) -> torch.Tensor:
        return self._kept_SK.sum(dim=1)

    @property
    def _num_tokens(self) -> int:
        return max(self._wanted_SK.shape[0], 1)

    @cached_property
    def top1_load(self) -> torch.Tensor:
        # a top-1 choice outside the E experts (a null expert) loads none of them
        num_experts = self.expert_load.numel()
        return torch.bincount(self._top1_expert_S, minlength=num_experts)[:num_experts]

    @cached_property
    def drop_fraction(self) -> torch.Tensor:
        return 1.0 - self.kept_per_token.sum() / self.wanted_per_token.sum().clamp_min(1)

    @cached_property
    def top1_drop_fraction(self) -> torch.Tensor:
        top1_kept_S = self._kept_SK[:, 0] if self._top1_kept_S is None else self._top1_kept_S
        return (~top1_kept_S).sum() / self._num_tokens

    @cached_property
    def tokens_with_drop_fraction(self) -> torch.Tensor:
        return (self.kept_per_token < self.wanted_per_token).sum() / self._num_tokens

    @cached_property
    def flops_per_token(self) -> torch.Tensor:
        load_E, expert_flops = self.expert_load, self._expert_flops
        if isinstance(expert_flops, torch.Tensor):  # the kind's (E,) costs live on the host
            expert_flops = expert_flops.to(load_E.device)
        return routed_flops_per_token(load_E, self._num_tokens, expert_flops, self._dense_flops)

    @property
    def experts_per_token(self) -> float:
        """Mean experts computed per token (after capacity)."""
        return self.kept_per_token.float().mean().item()

    @property
    def experts_wanted_per_token(self) -> float:
        """Mean experts the rule selected per token (before capacity)."""
        return self.wanted_per_token.float().mean().item()

    @staticmethod
    def mean(stats: Sequence[RoutingStats]) -> LayerMeanStats:
        """The statistics of several MoE layers on the same tokens (one model call), averaged
        over the layers; the one place that combines layers."""
        return LayerMeanStats(stats)

    def summary(self) -> dict[str, float]:
        """The scalar statistics as Python floats (for logs and tables)."""
        load = self.top1_load.float()
        return {
            "experts_wanted_per_token": self.experts_wanted_per_token,
            "experts_per_token": self.experts_per_token,
            "drop_fraction": float(self.drop_fraction),
            "top1_drop_fraction": float(self.top1_drop_fraction),
            "tokens_with_drop_fraction": float(self.tokens_with_drop_fraction),
            "top1_load_cv": float(load.std(unbiased=False) / load.mean().clamp_min(1e-12)),
            "flops_per_token": float(self.flops_per_token),
        }


class LayerMeanStats:
    """:class:`RoutingStats` of several MoE layers on the same S tokens, each statistic the mean
    over layers (what the training log, the evaluation and the demos report for a model).

    Attributes:
        experts_per_token, experts_wanted_per_token, drop_fraction: floats, the layers' own
            values (as :meth:`RoutingStats.summary` gives them) averaged with :func:`layer_mean`.
        kept_per_token: (S,) float32, experts each token was computed with, mean over layers.
    """

    def __init__(self, stats: Sequence[RoutingStats]) -> None:
        if not stats:
            raise ValueError("RoutingStats.mean needs at least one layer's statistics, got none")
        self.layers = list(stats)

    @cached_property
    def experts_per_token(self) -> float:
        return layer_mean([s.experts_per_token for s in self.layers])

    @cached_property
    def experts_wanted_per_token(self) -> float:
        return layer_mean([s.experts_wanted_per_token for s in self.layers])

    @cached_property
    def drop_fraction(self) -> float:
        return layer_mean([float(s.drop_fraction) for s in self.layers])

    @cached_property
    def kept_per_token(self) -> torch.Tensor:
        return torch.stack([s.kept_per_token.float() for s in self.layers]).mean(dim=0)

    def summary(self) -> dict[str, float]:
        """The scalars the training log records for a step."""
        return {
            "experts_per_token": self.experts_per_token,
            "experts_wanted_per_token": self.experts_wanted_per_token,
            "drop_fraction": self.drop_fraction,
        }
