"""XMoE threshold routing: the smallest set of best experts whose mass reaches t.

Options (``ThresholdOptions``): logit normalisation with a scale s, a compute target k* that
adapts s between training steps, and those every router has (init, entropy loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from xmoe.config import RouterOptions, _is_int, _is_number, _require, require_threshold
from xmoe.device import host_reads_cheap
from xmoe.registry import ROUTERS
from xmoe.routing.base import Router
from xmoe.routing.selection import SMALL_SORT_ELEMENTS, Selection, ranked_topk

if TYPE_CHECKING:
    from xmoe.config import MoEConfig

_FIRST_GUESS = 8  # experts ranked per token before widening; most trained tokens need fewer
SCALE_RANGE = (1e-2, 1e3)  # the controller keeps s inside this range
NORM_EPS = 1e-6


@dataclass(frozen=True)
class ThresholdOptions(RouterOptions):
    """Options of the threshold (and top-p) router.

    Args:
        logit_scale: None for plain logits z; s > 0 for per-token normalised logits
            ``s · (z - mean(z)) / std(z)``, so that s alone sets how peaked routing is, whatever
            the scale of the router weights (as Skywork-MoE's gating normalisation). s is a
            buffer (``router.logit_scale``): it is saved and loaded with the model.
        target_experts: None, or k* in [1, E]: after each training step s is multiplied by
            ``(wanted / k*) ** controller_rate``, where ``wanted`` is the mean number of experts
            the rule selected per token in that step, so the mean converges to k*. No gradient;
            frozen in eval mode. Needs ``logit_scale`` (its starting value).
        target_start: None, or k* at step 0, decaying linearly to ``target_experts`` over
            ``target_decay_steps`` steps (a dense start).
        target_decay_steps: length of that decay in optimizer steps (>= 0).
        controller_rate: exponent of the multiplicative update, in (0, 1].
    """

    logit_scale: float | None = None
    target_experts: float | None = None
    target_start: float | None = None
    target_decay_steps: int = 0
    controller_rate: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = SCALE_RANGE
        _require(
            self.logit_scale is None
            or (_is_number(self.logit_scale) and low <= self.logit_scale <= high),
            "router_options.logit_scale",
            self.logit_scale,
            f"None or a number in [{low}, {high}]",
        )
        for name in ("target_experts", "target_start"):
            value = getattr(self, name)
            _require(
                value is None or (_is_number(value) and value >= 1),
                f"router_options.{name}",
                value,
                "None or a number >= 1",
            )
        _require(
            self.target_experts is None or self.logit_scale is not None,
            "router_options.target_experts",
            self.target_experts,
            "None unless router_options.logit_scale is set (the controller adapts s)",
        )
        _require(
            self.target_start is None or self.target_experts is not None,
            "router_options.target_start",
            self.target_start,
            "None unless router_options.target_experts is set",
        )
        _require(
            _is_int(self.target_decay_steps) and self.target_decay_steps >= 0,
            "router_options.target_decay_steps",
            self.target_decay_steps,
            "an integer >= 0",
        )
        _require(
            _is_number(self.controller_rate) and 0 < self.controller_rate <= 1,
            "router_options.controller_rate",
            self.controller_rate,
            "a number in (0, 1]",
        )

    def check_for(self, config: MoEConfig) -> None:
        for name in ("target_experts", "target_start"):
            value = getattr(self, name)
            _require(
                value is None or value <= config.num_experts,
                f"router_options.{name}",
                value,
                f"at most num_experts={config.num_experts}",
            )


def normalized_logits(logits_SE: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale · (z - mean(z)) / std(z)`` over each token's E logits (population std)."""
    centered_SE = logits_SE - logits_SE.mean(dim=-1, keepdim=True)
    std_S1 = centered_SE.pow(2).mean(dim=-1, keepdim=True).add(NORM_EPS).sqrt()
    return centered_SE / std_S1 * scale.to(logits_SE.dtype)


def controller_scale(scale: float, wanted: float, target: float, rate: float) -> float:
    """One controller update of s: ``s · (wanted / target) ** rate``, kept in SCALE_RANGE."""
    low, high = SCALE_RANGE
    return min(high, max(low, scale * (wanted / target) ** rate))


def decayed_target(options: ThresholdOptions, step: int) -> float:
    """k* at optimizer step ``step``: linear from ``target_start`` to ``target_experts``."""
    if options.target_start is None or step >= options.target_decay_steps:
        return options.target_experts
    fraction = step / options.target_decay_steps
    return options.target_start + (options.target_experts - options.target_start) * fraction


def mass_prefix_rule(
    ranked_probs_SK: torch.Tensor, threshold: float, at_most: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cumulative-mass rule over K probabilities ranked best first: rank j is kept iff the
    mass of the strictly better ranks is below ``threshold`` (at most it, with ``at_most``:
    top-p), so the first rank is always kept. Sums are float64 prefix sums: the decision must
    not hinge on fp32 rounding. For t >= 1 (strict rule) a rank is kept iff it has mass.

    Returns:
        (S, K) bool, a prefix per row: the ranks kept; and (S,) whether the rule would also
        keep a (K+1)-th rank (a ranking over fewer than all experts must then widen).
    """
    if threshold >= 1.0 and not at_most:
        # mass before j is below 1 exactly when some probability remains at j
        return ranked_probs_SK > 0, ranked_probs_SK[:, -1] > 0
    inclusive_SK = ranked_probs_SK.detach().to(torch.float64).cumsum(dim=-1)
    # the mass of the strictly better ranks; -inf before the first, which the rule keeps (a
    # pad: indexed assignments are costly per-call ops at decode sizes)
    before_SK = F.pad(inclusive_SK[:, :-1], (1, 0), value=-math.inf)
    keeps = torch.le if at_most else torch.lt
    return keeps(before_SK, threshold), keeps(inclusive_SK[:, -1], threshold)


def mass_prefix_mask(
    ranked_probs_SK: torch.Tensor, threshold: float, at_most: bool = False
) -> torch.Tensor:
    """(S, K) bool: the ranks :func:`mass_prefix_rule` keeps (the one threshold rule, for
    callers that rank their own probabilities)."""
    return mass_prefix_rule(ranked_probs_SK, threshold, at_most)[0]


@ROUTERS.register("threshold")
class ThresholdRouter(Router):
    """Keeps sorted position j iff the mass of the strictly better experts is below t.

    The first expert is always kept. Ranking uses ``topk`` on a growing width (8, 32, ...,
    E) rather than a full sort over E, widening only while some token still needs more experts,
    so the result is exact with no cap on experts per token.
    """

    Options = ThresholdOptions
    uses_threshold = True
    tunable_names = ("threshold",)
    at_most: ClassVar[bool] = False
    """Keep a rank whose better ranks hold exactly t too (:func:`mass_prefix_rule`)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.threshold = float(config.threshold)
        options = self.options
        if options.logit_scale is not None:
            self.register_buffer("logit_scale", torch.tensor(float(options.logit_scale)))
        if options.target_experts is not None:
            self.register_buffer("controller_step", torch.zeros((), dtype=torch.int64))
            self.register_buffer("_wanted_sum", torch.zeros((), dtype=torch.float64), False)
            self.register_buffer("_token_count", torch.zeros((), dtype=torch.int64), False)

    def set_threshold(self, threshold: float) -> None:
        """Change t (p for top-p) from now on: an inference-time knob, no retraining.

        Raises:
            ConfigError: ``threshold`` is not a number in (0, 1] (nothing changes then).
        """
        require_threshold(threshold)
        self.threshold = float(threshold)

    def logits(self, x_SD: torch.Tensor) -> torch.Tensor:
        logits_SE = super().logits(x_SD)
        if self.options.logit_scale is None:
            return logits_SE
        return normalized_logits(logits_SE, self.logit_scale)

    def select(self, probs_SE: torch.Tensor) -> Selection:
        threshold = self.threshold
        num_experts = probs_SE.shape[-1]
        # one ranking over all E: cheapest for small calls, and off the host-read devices it
        # avoids the host sync each widening decision would cost
        full = (
            threshold >= 1.0
            or probs_SE.numel() <= SMALL_SORT_ELEMENTS
            or not host_reads_cheap(probs_SE.device)
        )
        width = num_experts if full else min(num_experts, _FIRST_GUESS)
        while True:
            probs_SK, expert_idx_SK = ranked_topk(probs_SE, width)
            wanted_SK, next_wanted_S = mass_prefix_rule(probs_SK, threshold, self.at_most)
            if width == num_experts or not bool(next_wanted_S.any()):
                break
            width = min(num_experts, width * 4)
        if self.training and self.options.target_experts is not None:
            self._wanted_sum += wanted_SK.sum()
            self._token_count += wanted_SK.shape[0]
        return Selection(expert_idx_SK, probs_SK, wanted_SK, probs_SK)

    @torch.no_grad()
    def end_step(self) -> None:
        """The k* controller: move s toward the scale that gives ``target_experts`` per token."""
        options = self.options
        if options.target_experts is None or int(self._token_count) == 0:
            return
        wanted = float(self._wanted_sum) / int(self._token_count)
        target = decayed_target(options, int(self.controller_step))
        scale = controller_scale(float(self.logit_scale), wanted, target, options.controller_rate)
        self.logit_scale.fill_(scale)
        self.controller_step += 1
        self._wanted_sum.zero_()
        self._token_count.zero_()

    def extra_repr(self) -> str:
        extra = f", threshold={self.threshold}"
        if hasattr(self, "logit_scale"):
            extra += f", logit_scale={float(self.logit_scale):.3g}"
        return super().extra_repr() + extra
