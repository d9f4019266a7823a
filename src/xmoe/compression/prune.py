"""``prune``: greedy removal of routed experts by calibration loss (Mamba-Shedder's loop, §25 of
the related-systems spec, applied to experts).

``experts`` times, over every MoE layer's remaining experts, the expert whose removal raises the
calibration loss least is removed; each layer keeps at least one. With ``per_round`` > 1 the
``per_round`` lowest-scoring experts of a scoring round go together, which divides the
calibration forwards (one per candidate per round) by about ``per_round``: exact greedy costs
O(E²) forwards, hours for a 64-expert model on a CPU. ``method="magnitude"`` (the
smallest weights first) and ``method="random"`` are the naive baselines. A removed expert's router
probability is zeroed and the rest renormalised before selection (:class:`PrunedRouter`), and
the kept experts' weights alone are held (a :class:`~xmoe.compression.merge.MergedExperts`
whose groups are the kept experts). Prune before the other passes.

Shape legend: S tokens, E routed experts, L ranked logits (E, or more with null experts),
B sequences, T tokens per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xmoe.compression.base import (
    CompressionError,
    CompressionPass,
    PassOptions,
    RouterWrapper,
    check_calibration,
    moe_layers,
)
from xmoe.compression.merge import MergedExperts
from xmoe.experts import FFNExperts
from xmoe.layer import MoELayer
from xmoe.registry import PASSES
from xmoe.routing.base import Router, RouterOutput


class PrunedRouter(RouterWrapper):
    """A router that never selects the experts ``alive_E`` marks removed: their probabilities
    are zeroed before the wrapped router's selection rule, and a softmax is taken over the
    others' logits alone (as if the removed experts had never been; independent gates such as
    sigmoid ones stay as they are). Ranked columns beyond E (null experts) stay. It adds no training
    losses (a pruned model is for inference). Buffer: ``alive_E`` (E,) bool."""

    def __init__(self, inner: nn.Module, num_experts: int) -> None:
        super().__init__(inner)
        self.register_buffer("alive_E", torch.ones(num_experts, dtype=torch.bool))
        self.renormalize = type(inner).probabilities is Router.probabilities  # a softmax

    def forward(self, x_SD: torch.Tensor, state: torch.Tensor | None = None) -> RouterOutput:
        if self.renormalize:
            # a softmax over the kept logits alone: renormalising the full softmax's kept
            # probabilities would divide 0 by 0 where every one of them underflows to 0
            logits_SL, next_state = self.inner.logits_and_state(x_SD, state)
            probs_SL = logits_SL.masked_fill(~self._alive_L(logits_SL), -torch.inf).softmax(-1)
        else:
            probs_SL, next_state = self.inner.probabilities_and_state(x_SD, state)
            probs_SL = probs_SL * self._alive_L(probs_SL)
        return RouterOutput(probs_SL, self.inner.select(probs_SL), {}, next_state)

    def _alive_L(self, columns_SL: torch.Tensor) -> torch.Tensor:
        """(L,) bool: ``alive_E``, and True for the ranked columns beyond E (null experts,
        never pruned)."""
        extra = columns_SL.shape[1] - self.alive_E.shape[0]
        return torch.cat([self.alive_E, self.alive_E.new_ones(extra)])


@dataclass(frozen=True)
class PruneOptions(PassOptions):
    """Attributes:
    experts: how many routed experts to remove over all MoE layers, >= 1.
    method: ``"greedy"`` (by calibration loss), or the naive baselines ``"magnitude"`` (the
        smallest weight norm first) and ``"random"`` (drawn from ``seed``).
    seed: of the random method.
    per_round: experts removed per scoring round, >= 1 (1: exact greedy, one removal per round
        of scores).
    """

    experts: int
    method: str = "greedy"
    seed: int = 0
    per_round: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.experts, bool) or not isinstance(self.experts, int) or self.experts < 1:
            raise CompressionError(
                f"prune: experts={self.experts!r} is invalid: it must be an integer >= 1"
            )
        if self.method not in METHODS:
            raise CompressionError(
                f"prune: method={self.method!r} is invalid: it must be one of {METHODS}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise CompressionError(f"prune: seed={self.seed!r} is invalid: it must be an integer")
        if (
            isinstance(self.per_round, bool)
            or not isinstance(self.per_round, int)
            or self.per_round < 1
        ):
            raise CompressionError(
                f"prune: per_round={self.per_round!r} is invalid: it must be an integer >= 1"
            )


METHODS = ("greedy", "magnitude", "random")


@PASSES.register("prune")
class Prune(CompressionPass):
    """Expert removal (module docstring); options :class:`PruneOptions`."""

    Options = PruneOptions

    @classmethod
    @torch.no_grad()
    def apply(cls, model: nn.Module, options: PruneOptions, calibration: torch.Tensor):
        routers = wrap_routers(model, options.experts)
        generator = torch.Generator().manual_seed(options.seed)
        left = options.experts
        while left:
            choices = candidates(routers)
            scores = removal_scores(options.method, choices, model, routers, calibration, generator)
            left -= remove_lowest(
                routers, sorted(zip(scores, choices, strict=True)), min(left, options.per_round)
            )
        shrink_experts(model)
        return model


def remove_lowest(
    routers: list[PrunedRouter], ranked: list[tuple[float, tuple[int, int]]], count: int
) -> int:
    """Remove up to ``count`` experts of ``ranked`` ((score, (layer, expert)), lowest first),
    skipping one whose layer it would empty; returns how many went (at least one)."""
    removed = 0
    for _, (layer, expert) in ranked:
        if removed == count:
            break
        alive_E = routers[layer].alive_E
        if int(alive_E.sum()) > 1:
            alive_E[expert] = False
            removed += 1
    return removed


def removal_scores(
    method: str,
    choices: list[tuple[int, int]],
    model: nn.Module,
    routers: list[PrunedRouter],
    calibration: torch.Tensor,
    generator: torch.Generator,
) -> list[float]:
    """A score per ``(layer, expert)`` choice; the lowest goes next (ties to the first layer and
    expert): the calibration loss without it (greedy), its weights' norm (magnitude), or a
    draw (random)."""
    if method == "greedy":
        return [removal_loss(model, routers, choice, calibration) for choice in choices]
    if method == "magnitude":
        experts = [layer.experts for layer in moe_layers(model)]
        return [expert_norm(experts[layer], expert) for layer, expert in choices]
    return torch.rand(len(choices), generator=generator, dtype=torch.float64).tolist()


def expert_norm(experts: FFNExperts, expert: int) -> float:
    """The Frobenius norm of one expert's weight matrices (the magnitude baseline's score)."""
    return float(torch.cat([experts.w1[expert].flatten(), experts.w2[expert].flatten()]).norm())


def wrap_routers(model: nn.Module, remove: int) -> list[PrunedRouter]:
    """Every MoE layer's router wrapped in a :class:`PrunedRouter` (all experts alive), after
    checking that ``remove`` experts can go."""
    layers = moe_layers(model)
    for index, layer in enumerate(layers):
        if type(layer.experts) is not FFNExperts or isinstance(layer.router, RouterWrapper):
            raise CompressionError(
                f"prune: MoE layer {index} was compressed already (its experts are "
                f"{type(layer.experts).__name__}, its router {type(layer.router).__name__}); "
                "prune before the other passes"
            )
    removable = sum(layer.config.num_experts - 1 for layer in layers)
    if remove > removable:
        raise CompressionError(
            f"prune: experts={remove} is more than the {removable} that can go (each MoE "
            "layer keeps one)"
        )
    for layer in layers:
        layer.router = PrunedRouter(layer.router, layer.config.num_experts)
    return [layer.router for layer in layers]


def candidates(routers: list[PrunedRouter]) -> list[tuple[int, int]]:
    """``(layer, expert)`` of every expert that may go next (alive, not its layer's last)."""
    return [
        (index, e)
        for index, router in enumerate(routers)
        if int(router.alive_E.sum()) > 1
        for e in router.alive_E.nonzero().squeeze(1).tolist()
    ]


@torch.no_grad()
def calibration_loss(model: nn.Module, calibration_BT: torch.Tensor) -> float:
    """Mean next-token loss of ``model`` on the calibration windows."""
    check_calibration(calibration_BT)
    if calibration_BT.shape[1] < 2:
        raise CompressionError("prune: calibration windows must be at least 2 tokens long")
    device = next(model.parameters()).device
    batch = calibration_BT.to(device)
    return float(model(batch[:, :-1], batch[:, 1:]).loss)


def removal_loss(
    model: nn.Module, routers: list[PrunedRouter], candidate: tuple[int, int], calibration
) -> float:
    """The calibration loss with expert ``candidate`` removed too (restored after)."""
    alive_E = routers[candidate[0]].alive_E
    alive_E[candidate[1]] = False
    try:
        return calibration_loss(model, calibration)
    finally:
        alive_E[candidate[1]] = True


@torch.no_grad()
def shrink_experts(model: nn.Module) -> None:
    """Hold only the kept experts' weights: each layer's experts become a
    :class:`MergedExperts` whose groups are the kept experts (a removed expert maps to the first
    kept one, with zero probability: it is never selected unless fewer remain than a rule
    selects, and then it weighs nothing)."""
    for layer in moe_layers(model):
        _shrink(layer)


def _shrink(layer: MoELayer) -> None:
    experts, alive_E = layer.experts, layer.router.alive_E
    kept = alive_E.nonzero().squeeze(1)
    inner = FFNExperts(experts.config, len(kept)).to(experts.w1.device, experts.w1.dtype)
    for name in ("w1", "b1", "w2", "b2"):
        if getattr(inner, name) is not None:
            getattr(inner, name).copy_(getattr(experts, name)[kept])
    group_E = torch.zeros_like(alive_E, dtype=torch.int64)
    group_E[kept] = torch.arange(len(kept), device=kept.device)
    merged = MergedExperts(experts.config, inner).to(experts.w1.device)
    merged.group_E.copy_(group_E)
    layer.experts = merged
