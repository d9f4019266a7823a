"""THOR's stochastic experts: no router; random experts, and two passes kept consistent.

There is nothing to learn and no ``weight``: in training mode each call (a layer's batch) sends
every token to one expert drawn uniformly at random, weight 1, as THOR's code draws one expert
per layer per batch. Each training step runs the micro-batch twice, each pass with its own
draws, and adds the symmetric-KL consistency loss between the two passes' predictions with
coefficient ``consistency_coef`` (:func:`xmoe.training.step.lm_step_loss`). In eval mode a
token goes to one random expert (``inference="random"``, THOR's cheap inference) or to all
experts, each weighted 1/E (``inference="ensemble"``, E times the FLOPs).

The draws use torch's global generator on the tokens' device: ``torch.manual_seed`` makes them
repeatable, and the trainer's checkpoints restore that generator's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from xmoe.config import RouterOptions, _is_number, _require, _require_choice
from xmoe.registry import ROUTERS
from xmoe.routing.base import Router, router_dtype
from xmoe.routing.selection import Selection

if TYPE_CHECKING:
    from xmoe.config import MoEConfig

THOR_INFERENCE = ("random", "ensemble")


@dataclass(frozen=True)
class THOROptions(RouterOptions):
    """Options of the THOR router.

    Args:
        consistency_coef: α ≥ 0 of the consistency loss (THOR's IWSLT script: 5); 0 trains with
            one pass and no consistency loss.
        inference: ``"random"`` (one random expert per token) or ``"ensemble"`` (every expert,
            weighted 1/E).
        entropy_coef: must be 0: there are no router probabilities to sharpen.
    """

    consistency_coef: float = 5.0
    inference: str = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            _is_number(self.consistency_coef) and self.consistency_coef >= 0,
            "router_options.consistency_coef",
            self.consistency_coef,
            "a finite number >= 0",
        )
        _require_choice("router_options.inference", self.inference, THOR_INFERENCE)
        _require(
            self.entropy_coef == 0,
            "router_options.entropy_coef",
            self.entropy_coef,
            "0 (THOR has no router probabilities)",
        )

    def check_for(self, config: MoEConfig) -> None:
        _require(
            config.capacity_factor is None,
            "capacity_factor",
            config.capacity_factor,
            "None with router='thor' (a training batch goes to one expert: any capacity drops it)",
        )


@ROUTERS.register("thor")
class THORRouter(Router):
    """Random experts, no parameters (see the module docstring). Its probabilities are uniform
    (1/E) and it has no auxiliary loss: there is no router to balance."""

    Options = THOROptions
    has_weight = False

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        del self.weight  # nothing to learn: THOR has no router

    def reset_parameters(self) -> None:
        """Nothing to initialise."""

    def logits(self, x_SD: torch.Tensor) -> torch.Tensor:
        """(S, E) zeros: every expert is equally likely. They are a sum over none of ``x_SD``'s
        features, so they stay on x's autograd graph as a learned router's logits do: the
        layer's zero aux loss then carries the graph even when no token reaches the layer (its
        output is empty then, and a backward through both alone would find no graph)."""
        zeros_S1 = x_SD[:, :0].to(router_dtype(x_SD.dtype)).sum(dim=1, keepdim=True)
        return zeros_S1.expand(-1, self.config.num_experts)

    def select(self, probs_SE: torch.Tensor) -> Selection:
        num_tokens, num_experts = probs_SE.shape
        if not self.training and self.options.inference == "ensemble":
            expert_idx_SK = torch.arange(num_experts, device=probs_SE.device).expand(num_tokens, -1)
        else:  # one draw per call in training (THOR's per batch), per token at inference
            draws = 1 if self.training else num_tokens
            expert_S1 = torch.randint(num_experts, (draws, 1), device=probs_SE.device)
            expert_idx_SK = expert_S1.expand(num_tokens, 1)
        expert_idx_SK = expert_idx_SK.contiguous()
        probs_SK = probs_SE.gather(1, expert_idx_SK)
        wanted_SK = torch.ones_like(expert_idx_SK, dtype=torch.bool)
        weight_SK = torch.full_like(probs_SK, 1.0 / expert_idx_SK.shape[1])  # 1/k
        return Selection(expert_idx_SK, probs_SK, wanted_SK, weight_SK)

    def losses(self, probs_SE: torch.Tensor, selection: Selection) -> dict[str, torch.Tensor]:
        return {}

    def consistency_coef(self) -> float:
        return float(self.options.consistency_coef)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", inference={self.options.inference!r}"
