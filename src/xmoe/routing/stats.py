"""Per-call routing statistics (all detached; reading them as numbers syncs once)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xmoe.routing.pairs import RoutedPairs


@dataclass
class RoutingStats:
    """What the router decided in one call.

    Attributes:
        wanted_per_token: (S,) experts each token's rule selected, before capacity.
        kept_per_token: (S,) experts each token was computed with, after capacity.
        expert_load: (E,) kept pairs per expert.
        top1_load: (E,) tokens whose most probable expert is e.
        drop_fraction: scalar, fraction of wanted (token, expert) pairs dropped by capacity.
        top1_drop_fraction: scalar, fraction of tokens whose first choice was dropped.
        tokens_with_drop_fraction: scalar, fraction of tokens that lost at least one expert.
        flops_per_token: scalar, forward MoE FLOPs per token actually computed: kept pairs times
            the expert's FLOPs, plus the router, divided by S.
    """

    wanted_per_token: torch.Tensor
    kept_per_token: torch.Tensor
    expert_load: torch.Tensor
    top1_load: torch.Tensor
    drop_fraction: torch.Tensor
    top1_drop_fraction: torch.Tensor
    tokens_with_drop_fraction: torch.Tensor
    flops_per_token: torch.Tensor

    @classmethod
    @torch.no_grad()
    def from_pairs(
        cls,
        pairs: RoutedPairs,
        top1_expert_S: torch.Tensor,
        expert_flops: int,
        router_flops: int,
    ) -> RoutingStats:
        wanted_S = pairs.wanted_SK.sum(dim=1)
        kept_S = pairs.kept_SK.sum(dim=1)
        num_tokens = max(wanted_S.numel(), 1)
        num_wanted = wanted_S.sum().clamp_min(1)
        num_kept = kept_S.sum()
        return cls(
            wanted_per_token=wanted_S,
            kept_per_token=kept_S,
            expert_load=pairs.counts_E,
            top1_load=torch.bincount(top1_expert_S, minlength=pairs.counts_E.numel()),
            drop_fraction=1.0 - num_kept / num_wanted,
            top1_drop_fraction=(~pairs.kept_SK[:, 0]).sum() / num_tokens,
            tokens_with_drop_fraction=(kept_S < wanted_S).sum() / num_tokens,
            flops_per_token=(num_kept * expert_flops) / num_tokens + router_flops,
        )

    @property
    def experts_per_token(self) -> float:
        """Mean experts computed per token (after capacity)."""
        return self.kept_per_token.float().mean().item()

    @property
    def experts_wanted_per_token(self) -> float:
        """Mean experts the rule selected per token (before capacity)."""
        return self.wanted_per_token.float().mean().item()

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
