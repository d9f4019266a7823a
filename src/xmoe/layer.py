"""MoELayer: routing, dispatch and expert compute wired together (``route`` -> ``compute``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xmoe.config import MoEConfig, _require_bool
from xmoe.dispatch import Dispatcher, LocalDispatcher, batched_max_pairs
from xmoe.experts import FFNExperts, run_shared
from xmoe.experts.decode import decode_path
from xmoe.registry import EXPERT_KINDS, ROUTERS
from xmoe.routing import RoutedPairs, RoutingStats, route_pairs


@dataclass
class Routed:
    """What :meth:`MoELayer.route` decided for S tokens, the input of :meth:`MoELayer.compute`.

    Attributes:
        pairs: the kept (token, expert) pairs, their plan and combine weights.
        probs_SE: (S, E) router probabilities (differentiable).
        losses: the router's named auxiliary losses (empty in eval mode).
        stats: the call's :class:`~xmoe.routing.RoutingStats`.
        state: the routing state for the next MoE layer's router, or None (see
            :meth:`MoELayer.route`).
    """

    pairs: RoutedPairs
    probs_SE: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: RoutingStats
    state: torch.Tensor | None = None


@dataclass
class MoEOutput:
    """Output of :class:`MoELayer`.

    Attributes:
        hidden_states: same shape as the input.
        aux_loss: scalar sum of ``aux_losses`` (zero in eval mode).
        routing: per-call :class:`~xmoe.routing.RoutingStats`.
        aux_losses: the router's named auxiliary losses (``balance``, ``entropy``, ...), each
            already scaled by its coefficient; empty in eval mode.
        state: the routing state for the next MoE layer (None unless the router carries
            state over depth); pass it as that layer's ``state``.
    """

    hidden_states: torch.Tensor
    aux_loss: torch.Tensor
    routing: RoutingStats
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    state: torch.Tensor | None = None


class MoELayer(nn.Module):
    """A mixture-of-experts FFN that computes only the (token, expert) pairs it keeps.

    ``forward(x, state=None)`` takes ``(..., d_model)`` in any float dtype, treats every leading
    position as a token, and returns :class:`MoEOutput`; it is :meth:`route` then
    :meth:`compute`, which are public so that a runtime can act between them. ``state`` is the
    routing state the previous MoE layer returned (``MoEOutput.state``) for routers that carry
    state over depth (MoE++'s gating residual, RMoE's recurrent router); others ignore it.
    Parameters: ``router.weight`` (E, d_model), the routed experts under ``experts.`` (the
    kind ``config.experts`` names in :data:`xmoe.registry.EXPERT_KINDS`; by default
    :class:`~xmoe.experts.FFNExperts`) and, when ``num_shared_experts`` > 0, the always-on FFN
    experts under ``shared_experts.`` (else None).

    Capacity (``capacity_factor``) applies in training mode only, unless ``capacity_at_eval``;
    the router's losses are computed in training mode only (zero in eval mode).

    Compute dtype: the autocast dtype when autocast is on, else the parameters' dtype; the output
    is returned in the input's dtype outside autocast. The router always runs in fp32 or wider.

    ``dispatcher`` carries the kept pairs to the experts and back (:mod:`xmoe.distributed`): the
    local one by default; :func:`xmoe.distributed.expert_parallel` shards the experts over
    processes and installs an all-to-all one. Routing and combine stay on the token's process.
    """

    dispatcher: Dispatcher = LocalDispatcher(decode=decode_path)
    """Shared by every layer until replaced (stateless, never mutated)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config  # the recipe; tunables live in the modules from here on
        self.capacity_at_eval = config.capacity_at_eval
        self.router = ROUTERS[config.router](config)
        self.experts = EXPERT_KINDS[config.experts](config)
        shared = config.num_shared_experts
        self.shared_experts = FFNExperts(config, shared) if shared else None

    def set_capacity_at_eval(self, enabled: bool) -> None:
        """Apply the capacity in eval mode too (``MoEConfig.capacity_at_eval``)."""
        _require_bool("capacity_at_eval", enabled)
        self.capacity_at_eval = enabled

    def tunables(self) -> dict[str, Any]:
        """The tunables this layer and its router hold now, by name (:class:`MoEConfig`
        fields, or fields of the router's Options: :meth:`MoEConfig.with_tunables`)."""
        return {"capacity_at_eval": self.capacity_at_eval, **self.router.tunables()}

    def reset_parameters(self) -> None:
        self.router.reset_parameters()
        self.experts.reset_parameters()
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters()

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x.dtype={x.dtype} is invalid: x must be a floating-point tensor")
        if x.dim() < 1 or x.shape[-1] != self.config.d_model:
            raise ValueError(
                f"x.shape={tuple(x.shape)} is invalid: the last dimension must equal "
                f"d_model={self.config.d_model}"
            )
        if self.config.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or inf values (check_finite=True)")

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.experts.dtype

    def _check_state(self, state: torch.Tensor | None, num_tokens: int) -> None:
        if state is not None and (state.dim() < 1 or state.shape[0] != num_tokens):
            raise ValueError(
                f"state.shape={tuple(state.shape)} is invalid: the routing state holds one row "
                f"per token, so its first dimension must be {num_tokens}"
            )

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> MoEOutput:
        self._check_input(x)
        x_SD = x.reshape(-1, self.config.d_model)
        self._check_state(state, x_SD.shape[0])
        routed = self._route(x_SD, state)
        y_SD = self.compute(x_SD, routed)
        if routed.losses:
            aux_loss = torch.stack(list(routed.losses.values())).sum()
        elif torch.is_grad_enabled():  # eval mode: the losses only steer training
            aux_loss = routed.probs_SE.sum() * 0.0  # zero, on the autograd graph
        else:  # inference: one small op instead of a reduction
            aux_loss = routed.probs_SE.new_zeros(())
        output = y_SD.reshape(*x.shape[:-1], self.config.d_model)
        return MoEOutput(output, aux_loss, routed.stats, routed.losses, routed.state)

    def route(self, x_SD: torch.Tensor, state: torch.Tensor | None = None) -> Routed:
        """Route (S, d_model) tokens: the router's selection, capacity (in training mode, or
        with ``capacity_at_eval``), and the kept pairs' plan; nothing is computed by the
        experts yet (:meth:`compute` does, possibly more than once). ``state``: the previous
        MoE layer's routing state (``Routed.state``), (S, ...), or None."""
        self._check_input(x_SD)
        if x_SD.dim() != 2:
            raise ValueError(f"x_SD.shape={tuple(x_SD.shape)} is invalid: route takes (S, d_model)")
        self._check_state(state, x_SD.shape[0])
        return self._route(x_SD, state)

    def _route(self, x_SD: torch.Tensor, state: torch.Tensor | None) -> Routed:
        config = self.config
        if self.router.needs_experts:  # a rule that scores with the experts themselves
            routed = self.router(x_SD, state, experts=self.experts)
        else:
            routed = self.router(x_SD, state)
        capacity = (
            config.capacity(x_SD.shape[0]) if self.training or self.capacity_at_eval else None
        )
        # decode-sized calls skip the sort by expert: the batched engine gathers per pair
        unsorted = (
            batched_max_pairs(config.d_model, config.d_expert)
            if config.backend in ("auto", "batched")
            else 0
        )
        pairs = route_pairs(
            routed.selection, config.num_experts, capacity, config.renormalize, unsorted
        )
        flops_E = self.experts.flops_per_pair_E()
        # what every token costs whatever its routing: this router's own FLOPs, shared experts
        dense_flops = config.dense_flops - config.router_flops + self.router.flops_per_token()
        stats = RoutingStats.from_pairs(pairs, flops_E, dense_flops)
        return Routed(pairs, routed.probs_SE, routed.losses, stats, routed.state)

    def compute(self, x_SD: torch.Tensor, routed: Routed) -> torch.Tensor:
        """The (S, d_model) output of the routed pairs: dispatch -> experts -> combine, through
        :attr:`dispatcher`, in the compute dtype, plus the shared experts' output when there
        are any; returned in ``x_SD``'s dtype outside autocast.

        ``routed`` comes from :meth:`route` on the same S tokens (it may be reused)."""
        num_tokens = routed.pairs.kept_SK.shape[0]  # the plan is built only if a path reads it
        if tuple(x_SD.shape) != (num_tokens, self.config.d_model):
            raise ValueError(
                f"x_SD.shape={tuple(x_SD.shape)} is invalid: the routed pairs are of "
                f"{num_tokens} tokens, so x_SD must be ({num_tokens}, {self.config.d_model})"
            )
        tokens_SD = x_SD.to(self._compute_dtype(x_SD))
        y_SD = self.dispatcher(self.experts, tokens_SD, routed.pairs)
        if self.shared_experts is not None:
            y_SD = y_SD + run_shared(self.shared_experts, tokens_SD)
        if not torch.is_autocast_enabled(x_SD.device.type):
            y_SD = y_SD.to(x_SD.dtype)
        return y_SD

    def extra_repr(self) -> str:
        c = self.config  # the router's own repr shows its tunables
        return f"router={c.router!r}, capacity_factor={c.capacity_factor}"
