"""Expert-choice routing (Zhou et al. 2022): each expert takes its C most probable tokens.

With p = softmax(W x) over experts for each of the S tokens of a call, expert e takes the C
tokens with the largest p[s, e] (ties toward the lower token index), where C is the layer's
capacity ``MoEConfig.capacity(S)``: ``ceil(capacity_factor · S / E)`` within [min_capacity, S].
Every expert gets exactly C tokens, so load is balanced by construction (no balance loss); a
token gets the experts that took it, from none (its output is then zero: the residual only) to
all, and each kept pair is combined with its probability p[s, e].

The selection keeps the per-token shape of the other rules: K = E columns, each token's experts
ranked by probability (column 0 is its top-1, which the statistics count), with ``wanted_SK``
marking the experts that took it.

C depends on the other tokens of the call: a call with fewer than E / capacity_factor tokens
(one decoded token) has no expert choice. ``router_options.eval_rule="topk"`` routes eval-mode
calls token by token instead (the round(capacity_factor) most probable experts, the same mean),
which is what generation with a KV cache needs; with the default ``"expert_choice"`` such a call
is a named error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from xmoe.config import RouterOptions, _require, _require_choice
from xmoe.registry import ROUTERS
from xmoe.routing.base import Router
from xmoe.routing.selection import Selection, ranked_topk

if TYPE_CHECKING:
    from xmoe.config import MoEConfig

EVAL_RULES = ("expert_choice", "topk")


@dataclass(frozen=True)
class ExpertChoiceOptions(RouterOptions):
    """Options of the ``expert_choice`` router.

    Args:
        eval_rule: ``"expert_choice"``: eval mode routes as training does (the call's tokens
            compete; a call of fewer than E / capacity_factor tokens is an error);
            ``"topk"``: eval mode gives each token its round(capacity_factor) most probable
            experts, independent of the other tokens (causal, and defined for one token).
    """

    eval_rule: str = "expert_choice"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_choice("router_options.eval_rule", self.eval_rule, EVAL_RULES)

    def check_for(self, config: MoEConfig) -> None:
        _require(
            config.capacity_factor is not None,
            "capacity_factor",
            config.capacity_factor,
            "a number > 0 for router='expert_choice' (each expert takes "
            "capacity_factor · S / E of a call's S tokens)",
        )


def expert_choice_mask(probs_SE: torch.Tensor, capacity: int) -> torch.Tensor:
    """(S, E) bool: whether expert e takes token s, each expert taking its ``capacity`` most
    probable tokens (ties toward the lower token index: a stable sort)."""
    token_EC = torch.sort(probs_SE.t(), dim=1, descending=True, stable=True).indices
    chosen_ES = torch.zeros(probs_SE.shape[::-1], dtype=torch.bool, device=probs_SE.device)
    return chosen_ES.scatter_(1, token_EC[:, :capacity], True).t()


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
    """Each expert takes the ``MoEConfig.capacity(S)`` tokens of a call it is most probable for
    (see the module's docstring)."""

    Options = ExpertChoiceOptions
    balance_loss = False

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        # the eval_rule="topk" k: the experts a token gets on average, rounded half up
        self.eval_top_k = max(1, min(config.num_experts, math.floor(config.capacity_factor + 0.5)))

    def select(self, probs_SE: torch.Tensor) -> Selection:
        num_tokens, num_experts = probs_SE.shape
        if not self.training and self.options.eval_rule == "topk":
            probs_SK, expert_idx_SK = ranked_topk(probs_SE, self.eval_top_k)
            wanted_SK = torch.ones_like(expert_idx_SK, dtype=torch.bool)
            return Selection(expert_idx_SK, probs_SK, wanted_SK, probs_SK)
        self._check_call_size(num_tokens)
        probs_SK, expert_idx_SK = ranked_topk(probs_SE, num_experts)
        chosen_SE = expert_choice_mask(probs_SE.detach(), self.config.capacity(num_tokens))
        return Selection(expert_idx_SK, probs_SK, chosen_SE.gather(1, expert_idx_SK), probs_SK)

    def _check_call_size(self, num_tokens: int) -> None:
        """Expert choice needs at least a token per expert on average (an empty call is none)."""
        gamma, num_experts = self.config.capacity_factor, self.config.num_experts
        if 0 < num_tokens * gamma < num_experts:
            raise ValueError(
                f"router='expert_choice' cannot route a call of S={num_tokens} tokens: each "
                f"expert must take capacity_factor · S / E = {gamma} · {num_tokens} / "
                f"{num_experts} >= 1 tokens; route small calls (decoding) token by token with "
                "router_options.eval_rule='topk'"
            )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eval_rule={self.options.eval_rule!r}"
