"""AdaMoE's null experts: m experts beside the n true ones that output zero and cost nothing.

The router has n + m rows (``router_options.num_null`` = m); the softmax and the rule run over
all n + m, so a token whose mass sits on null experts keeps fewer true ones. ``null_topk`` takes the
top-k (``MoEConfig.top_k``) of the n + m, as AdaMoE; ``null_threshold`` XMoE's threshold rule,
with the null experts inside the cumulative mass. A null pick is ranked but never wanted: it
becomes no (token, expert) pair, so the statistics and the FLOPs count the true experts
computed. The true picks are combined with their probabilities renormalised over the true
picks (AdaMoE's rule; a token with no true pick outputs zero), and the balance loss counts the
top-1 choice over all n + m, which pushes the null experts toward their share of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from xmoe.config import RouterOptions, _is_int, _require
from xmoe.registry import ROUTERS
from xmoe.routing.selection import Selection
from xmoe.routing.threshold import ThresholdOptions, ThresholdRouter
from xmoe.routing.topk import TopKRouter

if TYPE_CHECKING:
    from xmoe.config import MoEConfig


@dataclass(frozen=True)
class NullOptions(RouterOptions):
    """What the null-expert routers add to their rule's options.

    Args:
        num_null: m >= 0, the null experts ranked beside the ``num_experts`` true ones; with 0
            the rule is the plain one with the kept weights renormalised.
    """

    num_null: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            _is_int(self.num_null) and self.num_null >= 0,
            "router_options.num_null",
            self.num_null,
            "an integer >= 0",
        )


@dataclass(frozen=True)
class NullTopKOptions(NullOptions):
    """Options of the ``null_topk`` router: ``num_null``, with ``top_k`` bounded by n + m."""

    def check_for(self, config: MoEConfig) -> None:
        require_null_top_k(config.top_k, config)


@dataclass(frozen=True)
class NullThresholdOptions(NullOptions, ThresholdOptions):
    """Options of the ``null_threshold`` router: ``num_null`` and the threshold router's, but
    no k* controller (it would count null picks as experts computed)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.target_experts is None,
            "router_options.target_experts",
            self.target_experts,
            "None for router='null_threshold' (its controller would count null picks)",
        )


def require_null_top_k(value: object, config: MoEConfig) -> None:
    """``value`` is a k the ``null_topk`` router can keep: an integer in [1, n + m]."""
    num_null = config.router_options.num_null
    _require(
        _is_int(value) and 1 <= value <= config.num_experts + num_null,
        "top_k",
        value,
        f"an integer in [1, num_experts + router_options.num_null = "
        f"{config.num_experts} + {num_null}]",
    )


def true_picks(ranked: Selection, num_true: int) -> Selection:
    """``ranked`` (a rule's choice over true and null experts, ids >= ``num_true`` null) with
    only the true picks wanted, weighted by their weights divided by the sum over them."""
    wanted_SK = ranked.wanted_SK & (ranked.expert_idx_SK < num_true)
    kept_SK = ranked.weight_SK * wanted_SK
    # a token whose picks are all null has nothing to renormalise: zeros, not 0/0
    total_S1 = kept_SK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(kept_SK.dtype).tiny)
    return Selection(ranked.expert_idx_SK, ranked.probs_SK, wanted_SK, kept_SK / total_S1)


class NullExperts:
    """What both null-expert routers add to their rule (a mixin before the rule's class): the
    m extra router rows, and only true picks wanted."""

    config: MoEConfig

    @classmethod
    def num_logits(cls, config: MoEConfig) -> int:
        return config.num_experts + config.router_options.num_null

    def select(self, probs_SE: torch.Tensor) -> Selection:
        return true_picks(super().select(probs_SE), self.config.num_experts)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_null={self.config.router_options.num_null}"


@ROUTERS.register("null_topk")
class NullTopKRouter(NullExperts, TopKRouter):
    """AdaMoE: the ``top_k`` most probable of n true and m null experts."""

    Options = NullTopKOptions

    def set_top_k(self, top_k: int) -> None:
        """Keep the ``top_k`` best of the n + m experts from now on.

        Raises:
            ConfigError: ``top_k`` is not an integer in [1, n + m] (nothing changes then).
        """
        require_null_top_k(top_k, self.config)
        self.top_k = top_k


@ROUTERS.register("null_threshold")
class NullThresholdRouter(NullExperts, ThresholdRouter):
    """XMoE's threshold rule over n true and m null experts: the smallest prefix of the
    ranking whose mass reaches t, null experts included."""

    Options = NullThresholdOptions
