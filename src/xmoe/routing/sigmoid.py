"""DSMoE's sigmoid gates: each expert opens on its own, with a straight-through hard mask.

Every expert e has an independent gate ``g_e = σ(w_e · x)`` (no softmax). Forward, the hard mask
``m_e = 1[g_e > τ]`` decides which experts a token runs and the kept experts are combined with
``g_e · m_e``; backward, the mask passes the sigmoid's gradient (straight-through estimator:
``m_e = hard + g_e − stop_grad(g_e)``). An L1 loss on the gates (``sparsity_coef``) closes gates,
trading quality for compute. A token with no open gate keeps its best expert (the section does
not say; keeping one matches the other rules, where the first expert is always kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xmoe.config import RouterOptions, _is_number, _require
from xmoe.registry import ROUTERS
from xmoe.routing.base import Router
from xmoe.routing.selection import Selection, ranked_topk


@dataclass(frozen=True)
class SigmoidOptions(RouterOptions):
    """Options of the sigmoid router.

    Args:
        gate_threshold: τ in (0, 1): an expert runs for a token iff its gate exceeds τ (DSMoE's
            0.5 by default).
        sparsity_coef: λ ≥ 0 of the sparsity loss ``λ · mean_{s,e} g_{s,e}`` (L1 of the gates,
            which are positive); raising it lowers the fraction of open gates. 0.01 is our
            choice, not the paper's.
    """

    gate_threshold: float = 0.5
    sparsity_coef: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            _is_number(self.gate_threshold) and 0 < self.gate_threshold < 1,
            "router_options.gate_threshold",
            self.gate_threshold,
            "a number in (0, 1)",
        )
        _require(
            _is_number(self.sparsity_coef) and self.sparsity_coef >= 0,
            "router_options.sparsity_coef",
            self.sparsity_coef,
            "a finite number >= 0",
        )


def straight_through_mask(gate_SK: torch.Tensor, open_SK: torch.Tensor) -> torch.Tensor:
    """The hard mask ``open_SK`` (0/1) in value, with the gates' gradient (an STE)."""
    return open_SK.to(gate_SK.dtype) + gate_SK - gate_SK.detach()


@ROUTERS.register("sigmoid")
class SigmoidRouter(Router):
    """Keeps every expert whose gate ``σ(w_e · x)`` exceeds ``gate_threshold`` (at least the best
    one), combined with gate × straight-through mask. ``probs_SE`` are the gates (they do not sum
    to 1): capacity priority, statistics and the balance loss read them."""

    Options = SigmoidOptions

    def probabilities(self, x_SD: torch.Tensor) -> torch.Tensor:
        return self.logits(x_SD).sigmoid()

    def select(self, probs_SE: torch.Tensor) -> Selection:
        gate_SK, expert_idx_SK = ranked_topk(probs_SE, probs_SE.shape[-1])
        open_SK = gate_SK.detach() > self.options.gate_threshold
        open_SK[:, 0] = True  # a token with no open gate keeps its best expert
        weight_SK = gate_SK * straight_through_mask(gate_SK, open_SK)
        return Selection(expert_idx_SK, gate_SK, open_SK, weight_SK)

    def losses(self, probs_SE: torch.Tensor, selection: Selection) -> dict[str, torch.Tensor]:
        losses = super().losses(probs_SE, selection)
        if self.options.sparsity_coef > 0:
            losses["sparsity"] = self.options.sparsity_coef * probs_SE.mean()
        return losses

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gate_threshold={self.options.gate_threshold}"
