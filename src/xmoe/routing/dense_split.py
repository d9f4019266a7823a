"""Routing of a dense SwiGLU MLP split into neuron-group experts (MoEfication, the experts mode
of ``xmoe sparsify``): the rule of every :class:`~xmoe.conversion.SparseMLP`.

Options (``DenseSplitOptions``), each also a tunable the router holds (:meth:`set_rule`):

* ``scoring``: ``learned``, the softmax of the bias-free linear map ``weight`` (fitted to the
  oracle on calibration inputs), or ``oracle``, each expert's share of the token's total
  expert-output L2 norm, computed from the layer's experts (every expert's gate and up run: a
  measurement, not a speed-up).
* ``selection``: ``topk``, the ``top_k`` best experts (ties toward the lower id), or
  ``threshold``, the smallest best-first prefix whose score mass reaches ``threshold`` (the
  threshold router's rule, :func:`~xmoe.routing.threshold.mass_prefix_mask`).
* ``combine``: ``unweighted``, each selected expert adds exactly its slice of the dense FFN (so
  selecting every expert is the dense MLP), or ``weighted``, ``E · p`` (a uniform router is the
  dense FFN at t = 1: the XMoE route; learned scores only).

Shape legend: S tokens, D d_model, E experts, H neurons per expert, K ranked experts per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from xmoe.config import (
    RouterOptions,
    _require,
    _require_choice,
    require_threshold,
    require_top_k,
)
from xmoe.registry import ROUTERS
from xmoe.routing.base import Router, RouterOutput, autocast_off, router_dtype
from xmoe.routing.expert_norms import expert_output_norms, norm_shares
from xmoe.routing.selection import Selection, ranked_topk
from xmoe.routing.threshold import mass_prefix_mask

if TYPE_CHECKING:
    from xmoe.config import MoEConfig

SCORINGS = ("learned", "oracle")
SELECTIONS = ("topk", "threshold")
COMBINES = ("unweighted", "weighted")


@dataclass(frozen=True)
class DenseSplitOptions(RouterOptions):
    """Options of the ``dense_split`` router (see the module docstring).

    Args:
        scoring: one of :data:`SCORINGS`; ``oracle`` needs bias-free SwiGLU FFN experts.
        selection: one of :data:`SELECTIONS`: ``MoEConfig.top_k`` or ``MoEConfig.threshold``.
        combine: one of :data:`COMBINES`; ``weighted`` needs ``scoring="learned"``.
    """

    scoring: str = "learned"
    selection: str = "topk"
    combine: str = "unweighted"

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_choice("router_options.scoring", self.scoring, SCORINGS)
        _require_choice("router_options.selection", self.selection, SELECTIONS)
        _require_choice("router_options.combine", self.combine, COMBINES)
        _require(
            self.combine == "unweighted" or self.scoring == "learned",
            "router_options.combine",
            self.combine,
            "'unweighted' with scoring='oracle' (the weighted combine scales experts by a "
            "learned router's probabilities)",
        )

    def check_for(self, config: MoEConfig) -> None:
        require_rule(config, self.scoring, self.selection, config.top_k)


def require_rule(config: MoEConfig, scoring: str, selection: str, top_k: int) -> None:
    """The checks of a rule that need the layer's config: k in [1, E] for top-k, and experts
    the oracle can score (it reads their gate, up and down projections)."""
    if selection == "topk":
        require_top_k(top_k, config.num_experts)
    if scoring == "oracle":
        _require(
            config.experts == "ffn" and config.activation == "swiglu" and not config.bias,
            "router_options.scoring",
            scoring,
            "'learned' unless the experts are bias-free SwiGLU FFN experts (experts='ffn', "
            "activation='swiglu', bias=False): the oracle ranks them by their outputs",
        )


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


@ROUTERS.register("dense_split")
class DenseSplitRouter(Router):
    """Scores (learned or oracle), selects (top-k or threshold) and combines (unweighted or
    ``E · p``) the neuron-group experts of a converted dense MLP; see the module docstring.

    The balance loss is the Switch loss of the learned softmax (``aux_loss_coef``); the oracle
    has no losses (there is nothing to learn). The oracle's FLOPs are counted as every expert's
    FFN per token (an upper bound: it runs every gate and up, and the down norms' Gram form).
    """

    Options = DenseSplitOptions
    uses_threshold = True
    needs_experts = True
    tunable_names = ("top_k", "threshold", "scoring", "selection", "combine")

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        options = self.options
        self.top_k = config.top_k
        self.threshold = float(config.threshold)
        self.scoring, self.selection, self.combine = (
            options.scoring,
            options.selection,
            options.combine,
        )

    def set_top_k(self, top_k: int) -> None:
        """Keep ``top_k`` experts per token under ``selection="topk"`` from now on.

        Raises:
            ConfigError: ``top_k`` is not an integer in [1, num_experts] (nothing changes then).
        """
        require_top_k(top_k, self.config.num_experts)
        self.top_k = top_k

    def set_threshold(self, threshold: float) -> None:
        """Keep the mass ``threshold`` under ``selection="threshold"`` from now on.

        Raises:
            ConfigError: ``threshold`` is not a number in (0, 1] (nothing changes then).
        """
        require_threshold(threshold)
        self.threshold = float(threshold)

    def threshold_decides(self) -> bool:
        """Only under ``selection="threshold"``; top-k ignores the threshold."""
        return self.selection == "threshold"

    def set_rule(self, scoring: str, selection: str, combine: str) -> None:
        """Score, select and combine this way from now on (the weights are unchanged).

        Raises:
            ConfigError: a value its option refuses, or a rule this layer cannot run (nothing
                changes then).
        """
        dataclasses.replace(self.options, scoring=scoring, selection=selection, combine=combine)
        require_rule(self.config, scoring, selection, self.top_k)
        self.scoring, self.selection, self.combine = scoring, selection, combine

    def scores(self, x_SD: torch.Tensor, experts: Any) -> torch.Tensor:
        """(S, E) scores summing to 1 per token (fp32 or wider): the learned softmax, or the
        oracle's output-norm shares of ``experts`` (the layer's FFN experts)."""
        if self.scoring == "learned":
            return self.probabilities(x_SD)
        if experts is None:
            raise ValueError(
                "scoring='oracle' ranks the layer's experts by their outputs: call the router "
                "as router(x_SD, experts=layer.experts) (MoELayer does)"
            )
        gate_up, down = experts.w1, experts.w2
        width = down.shape[1]
        with torch.no_grad(), autocast_off(x_SD):
            x_SD = x_SD.to(gate_up.dtype)
            norms_SE = expert_output_norms(x_SD, gate_up[..., :width], gate_up[..., width:], down)
        return norm_shares(norms_SE.to(router_dtype(x_SD.dtype)))

    def forward(
        self, x_SD: torch.Tensor, state: torch.Tensor | None = None, experts: Any = None
    ) -> RouterOutput:
        if self.scoring == "learned":
            return super().forward(x_SD, state)
        shares_SE = self.scores(x_SD, experts)
        return RouterOutput(shares_SE, self.select(shares_SE), {})

    def select(self, probs_SE: torch.Tensor) -> Selection:
        topk = self.selection == "topk"
        selection = select_experts(
            probs_SE, self.top_k if topk else None, None if topk else self.threshold
        )
        return dataclasses.replace(selection, weight_SK=self.combine_weights(selection.probs_SK))

    def combine_weights(self, prob_SK: torch.Tensor) -> torch.Tensor:
        """(S, K) the factor each ranked pair's expert output is multiplied by (the selection's
        ``weight_SK``; elementwise in the scores ``prob_SK``).

        ``unweighted``: exactly 1 in value, so each selected expert adds its slice of the dense
        FFN. While autograd records (recovery fine-tuning of a learned router) it is
        ``p / stop_grad(p)``: still 1 in value, but the LM loss reaches the router through it
        (a straight-through estimate; top-k alone passes no gradient to the router).
        ``weighted``: ``E · p`` (XMoE route: a uniform router is the dense FFN at t=1).
        """
        if self.combine == "weighted":
            return prob_SK * self.config.num_experts
        if self.scoring == "learned" and torch.is_grad_enabled() and prob_SK.requires_grad:
            return prob_SK / prob_SK.detach().clamp_min(torch.finfo(prob_SK.dtype).tiny)
        return torch.ones_like(prob_SK, requires_grad=False).detach()

    def losses(self, probs_SE: torch.Tensor, selection: Selection) -> dict[str, torch.Tensor]:
        return super().losses(probs_SE, selection) if self.scoring == "learned" else {}

    def flops_per_token(self) -> int:
        if self.scoring == "learned":
            return super().flops_per_token()
        return self.config.num_experts * self.config.expert_flops  # no logits: every expert

    def extra_repr(self) -> str:
        rule = f"top_k={self.top_k}" if self.selection == "topk" else f"threshold={self.threshold}"
        return super().extra_repr() + (
            f", scoring={self.scoring!r}, {rule}, combine={self.combine!r}"
        )
