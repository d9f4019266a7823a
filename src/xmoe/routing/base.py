"""The router: a bias-free linear map to expert probabilities, a selection rule, and the router's
own auxiliary losses."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.config import RouterOptions
from xmoe.routing.losses import entropy_loss, switch_balance_loss, z_loss
from xmoe.routing.selection import Selection

if TYPE_CHECKING:
    from xmoe.config import MoEConfig


def router_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 or wider: float64 anywhere in ``dtypes`` keeps the router in float64."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def autocast_off(x_SD: torch.Tensor):
    """A context with autocast off on ``x_SD``'s device (entered only when it is on, since the
    context's entry is not free): routing decisions must not depend on bf16 rounding."""
    device_type = x_SD.device.type
    on = torch.is_autocast_enabled(device_type)
    return torch.autocast(device_type, enabled=False) if on else nullcontext()


@dataclass
class RouterOutput:
    """What a router returns for S tokens.

    Attributes:
        probs_SE: (S, E) router probabilities (fp32 or float64).
        selection: the experts each token wants, best first.
        losses: named auxiliary losses, each a scalar already scaled by its coefficient
            (training mode only; empty in eval mode). The layer sums them.
        state: the routing state this router hands the next MoE layer's router (per token,
            first dimension S), or None for a router that carries none over depth.
    """

    probs_SE: torch.Tensor
    selection: Selection
    losses: dict[str, torch.Tensor]
    state: torch.Tensor | None = None


class Router(nn.Module):
    """Base class of the routers in :data:`xmoe.registry.ROUTERS`.

    Holds ``weight`` of shape (:meth:`num_logits`, d_model), by default (E, d_model), no
    bias. A subclass sets ``Options`` (a :class:`~xmoe.config.RouterOptions` subclass,
    validated with the config) and implements
    :meth:`select`; it may transform :meth:`logits`, add losses in :meth:`losses` and adapt
    itself between training steps in :meth:`end_step`. Every router has the Switch balance
    loss (``aux_loss_coef``) unless :attr:`balance_loss` is off, and the optional entropy and
    z losses (``router_options.entropy_coef``, ``z_loss_coef``).

    The config is the recipe the router was built from; a tunable it reads (``threshold``,
    ``top_k``, or a field of its own ``Options``) is copied into the router at construction,
    changed through the router's own ``set_*`` method and reported by :meth:`tunables`, so
    nothing rewrites the config (:meth:`xmoe.config.MoEConfig.with_tunables` records them).
    """

    Options: ClassVar[type[RouterOptions]] = RouterOptions
    uses_threshold: ClassVar[bool] = False
    """Whether this router has a mass threshold (``set_threshold`` applies)."""
    balance_loss: ClassVar[bool] = True
    """Whether the Switch balance loss applies (a rule balanced by construction has none)."""
    tunable_names: ClassVar[tuple[str, ...]] = ()
    """The :class:`~xmoe.config.MoEConfig` fields, or fields of its ``Options``, this router
    reads, as attributes of its own (:meth:`~xmoe.config.MoEConfig.tunable` reads a recipe's)."""
    has_weight: ClassVar[bool] = True
    """Whether the router computes its linear map (``MoEConfig.router_flops`` counts it); a rule
    with no learned router (THOR) has no ``weight`` and costs 0."""
    needs_experts: ClassVar[bool] = False
    """Whether the rule scores tokens with the layer's routed experts (an oracle that ranks them
    by their true outputs): :class:`~xmoe.MoELayer` then calls it as
    ``router(x_SD, state, experts=layer.experts)``, its ``forward`` taking that keyword."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(self.num_logits(config), config.d_model))
        self.reset_parameters()

    @classmethod
    def num_logits(cls, config: MoEConfig) -> int:
        """Rows of ``weight``: one logit per expert the rule ranks. ``num_experts`` unless the
        rule also ranks experts that are not in the layer (AdaMoE's null experts)."""
        return config.num_experts

    @property
    def options(self) -> RouterOptions:
        return self.config.router_options

    def reset_parameters(self) -> None:
        if self.options.init == "linear":
            bound = 1.0 / math.sqrt(self.config.d_model)
            nn.init.uniform_(self.weight, -bound, bound)
        else:
            nn.init.normal_(self.weight, mean=0.0, std=self.config.init_std)

    def logits(self, x_SD: torch.Tensor) -> torch.Tensor:
        """(S, E) router logits in fp32 (float64 when the input or weight is float64).
        Autocast is disabled here: routing decisions must not depend on bf16 rounding."""
        dtype = router_dtype(x_SD.dtype, self.weight.dtype)
        with autocast_off(x_SD):
            return F.linear(x_SD.to(dtype), self.weight.to(dtype))

    def probabilities(self, x_SD: torch.Tensor) -> torch.Tensor:
        """(S, E) softmax of :meth:`logits` for (S, d_model) tokens of any float dtype."""
        return self.logits(x_SD).softmax(dim=-1)

    def logits_and_state(
        self, x_SD: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(S, E) logits given ``state`` (what the previous MoE layer's router returned, None at
        the first), and the state to hand the next MoE layer's router. A router that carries
        routing state over depth overrides this (its probabilities are then their softmax);
        the others ignore ``state`` and return :meth:`logits` and None."""
        return self.logits(x_SD), None

    def probabilities_and_state(
        self, x_SD: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(S, E) probabilities and the next state: :meth:`probabilities` and None, or for a
        router that overrides :meth:`logits_and_state`, the softmax of its logits."""
        if type(self).logits_and_state is Router.logits_and_state:
            return self.probabilities(x_SD), None
        logits_SE, next_state = self.logits_and_state(x_SD, state)
        return logits_SE.softmax(dim=-1), next_state

    def select(self, probs_SE: torch.Tensor) -> Selection:
        """Choose the experts each token wants. Args: probs_SE (S, E). Returns a Selection."""
        raise NotImplementedError

    def losses(self, probs_SE: torch.Tensor, selection: Selection) -> dict[str, torch.Tensor]:
        """Named auxiliary losses of a training call, scaled by their coefficients."""
        losses = {}
        if self.balance_loss:
            balance = switch_balance_loss(probs_SE, selection.top1_expert_S)
            losses["balance"] = self.config.aux_loss_coef * balance
        if self.options.entropy_coef > 0:
            losses["entropy"] = self.options.entropy_coef * entropy_loss(probs_SE)
        return losses

    def forward(self, x_SD: torch.Tensor, state: torch.Tensor | None = None) -> RouterOutput:
        probs_SE, next_state = self.probabilities_and_state(x_SD, state)
        selection = self.select(probs_SE)
        train = self.training and x_SD.shape[0] > 0  # losses only steer training
        losses = self.losses(probs_SE, selection) if train else {}
        if train and self.options.z_loss_coef > 0:
            # the logits again (one router matmul, only with the z-loss on): a subclass may
            # define its probabilities otherwise, so forward keeps asking probabilities()
            logits_SE = self.logits_and_state(x_SD, state)[0]
            losses["z"] = self.options.z_loss_coef * z_loss(logits_SE)
        return RouterOutput(probs_SE, selection, losses, next_state)

    def flops_per_token(self) -> int:
        """Forward FLOPs of this router on one token (:mod:`xmoe.flops`): its (E, d_model) map;
        a router that computes more (a residual map, a recurrent cell) adds its own."""
        return self.config.router_flops

    def tunables(self) -> dict[str, Any]:
        """``tunable_names`` with the values this router holds now (what a saved config must
        record to rebuild it as it is)."""
        return {name: getattr(self, name) for name in self.tunable_names}

    def threshold_decides(self) -> bool:
        """Whether the mass threshold decides this router's selection as it is now configured
        (so a threshold sweep changes its routing); a router with a threshold among other
        rules overrides it."""
        return self.uses_threshold

    def end_step(self) -> None:
        """Called once after each optimizer step (routers that adapt between steps)."""

    def consistency_coef(self) -> float:
        """α of a consistency loss between two forward passes of each training step (THOR's
        stochastic experts, :func:`xmoe.training.step.lm_step_loss`); 0: one pass."""
        return 0.0

    def extra_repr(self) -> str:
        return f"d_model={self.config.d_model}, num_experts={self.config.num_experts}"
