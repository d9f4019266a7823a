"""SMoE-Dropout: a random router that is never trained, and a k that grows during training.

The router is a randomly initialised linear map, frozen (``weight.requires_grad`` is False, so
no optimizer ever changes it). Each token keeps its top-k experts by router logit, combined with
the softmax over the selected logits (the kept probabilities divided by their sum). In training
mode k grows from ``k_start`` to ``k_end`` over ``grow_steps`` optimizer steps (advanced by
:meth:`end_step`) along one of the SMoE-Dropout code's increasing schedules
(:data:`SCHEDULES`, linear by default); in eval mode k is the router's ``top_k``
(``MoEConfig.top_k``, then ``set_top_k``), so any k can be chosen at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from xmoe.config import _is_int, _require, _require_choice
from xmoe.registry import ROUTERS
from xmoe.routing.selection import Selection, ranked_topk
from xmoe.routing.topk import TopKOptions, TopKRouter

if TYPE_CHECKING:
    from xmoe.config import MoEConfig


SCHEDULES = ("linear", "cosine", "exponential", "step")
"""How k grows in training (:func:`scheduled_k`), after the SMoE-Dropout code's
``linear_increase`` (floored here, where the code rounds), ``cosine_increase``, ``exp_increase``
and ``multi_step_increase``."""

EXP_BASE, EXP_DECAYS = 0.99, 300
"""The code's ``exp_increase``: the gap to ``k_end`` shrinks by 0.99 per 1/300 of the growth."""


@dataclass(frozen=True)
class SMoEDropoutOptions(TopKOptions):
    """Options of the SMoE-Dropout router.

    Args:
        k_start: experts per token at training step 0, in [1, num_experts]; None for
            ``MoEConfig.top_k``.
        k_end: experts per token from step ``grow_steps`` on, in [k_start, num_experts]; None
            for num_experts (the paper ends fully dense).
        grow_steps: optimizer steps of the growth (>= 0; 0 trains at ``k_end``).
        schedule: how k grows over them, one of :data:`SCHEDULES` (:func:`scheduled_k`).
    """

    k_start: int | None = None
    k_end: int | None = None
    grow_steps: int = 1000
    schedule: str = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("k_start", "k_end"):
            value = getattr(self, name)
            _require(
                value is None or (_is_int(value) and value >= 1),
                f"router_options.{name}",
                value,
                "None or an integer >= 1",
            )
        _require(
            _is_int(self.grow_steps) and self.grow_steps >= 0,
            "router_options.grow_steps",
            self.grow_steps,
            "an integer >= 0",
        )
        _require_choice("router_options.schedule", self.schedule, SCHEDULES)

    def check_for(self, config: MoEConfig) -> None:
        super().check_for(config)
        start, end = self.k_range(config)
        _require(
            start <= config.num_experts,
            "router_options.k_start",
            self.k_start,
            f"None or an integer in [1, num_experts={config.num_experts}]",
        )
        _require(
            start <= end <= config.num_experts,
            "router_options.k_end",
            self.k_end,
            f"None or an integer in [k_start={start}, num_experts={config.num_experts}]",
        )

    def k_range(self, config: MoEConfig) -> tuple[int, int]:
        """(k at step 0, k after the growth), the defaults resolved."""
        start = config.top_k if self.k_start is None else self.k_start
        return start, config.num_experts if self.k_end is None else self.k_end


def scheduled_k(start: int, end: int, grow_steps: int, step: int, schedule: str = "linear") -> int:
    """k at optimizer step ``step`` < ``grow_steps``, with progress ``u = step / grow_steps``
    (then ``end`` from ``grow_steps`` on):

    * ``linear``: ``start + floor((end - start) · u)``;
    * ``cosine``: ``end - round((end - start) · cos(π u / 2))``;
    * ``exponential``: ``end - round((end - start) · 0.99^floor(300 u))``;
    * ``step``: k doubles from ``start`` (capped at ``end``) in equal parts of the growth, as
      the code's 1, 2, 4, 8, 16 of 16 experts.
    """
    if step >= grow_steps:
        return end
    gap = end - start
    if schedule == "cosine":
        return end - round(gap * math.cos(math.pi * step / (2 * grow_steps)))
    if schedule == "exponential":
        return end - round(gap * EXP_BASE ** (EXP_DECAYS * step // grow_steps))
    if schedule == "step":
        levels = [start]
        while levels[-1] < end:
            levels.append(min(2 * levels[-1], end))
        return levels[len(levels) * step // grow_steps]
    return start + gap * step // grow_steps


@ROUTERS.register("smoe_dropout")
class SMoEDropoutRouter(TopKRouter):
    """Top-k on a frozen random router; k grows over training (see the module docstring).
    ``schedule_step`` (a buffer, saved with the model) counts the optimizer steps taken."""

    Options = SMoEDropoutOptions

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.weight.requires_grad_(False)  # random and fixed: no optimizer may change it
        self.register_buffer("schedule_step", torch.zeros((), dtype=torch.int64))
        self._train_k = self._k_at(0)  # mirrors schedule_step, so select never reads it

    def _k_at(self, step: int) -> int:
        options = self.options
        return scheduled_k(
            *options.k_range(self.config), options.grow_steps, step, options.schedule
        )

    @property
    def train_k(self) -> int:
        """Experts per token in training mode at the current step of the schedule."""
        return self._train_k

    def select(self, probs_SE: torch.Tensor) -> Selection:
        k = self._train_k if self.training else self.top_k
        probs_SK, expert_idx_SK = ranked_topk(probs_SE, k)
        wanted_SK = torch.ones_like(expert_idx_SK, dtype=torch.bool)
        weight_SK = probs_SK / probs_SK.sum(dim=-1, keepdim=True)  # softmax over the selected
        return Selection(expert_idx_SK, probs_SK, wanted_SK, weight_SK)

    @torch.no_grad()
    def end_step(self) -> None:
        """Advance the k schedule by one optimizer step."""
        self.schedule_step += 1
        self._train_k = self._k_at(int(self.schedule_step))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._train_k = self._k_at(int(self.schedule_step))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", train_k={self._train_k}"
