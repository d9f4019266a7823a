"""MoELayer: routing, dispatch and expert compute wired together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xmoe.config import MoEConfig, _require_bool
from xmoe.dispatch import LOCAL_DISPATCHER, Dispatcher, DispatchPlan, batched_max_pairs
from xmoe.experts import FFNExperts, run_shared
from xmoe.experts.decode import decode_ffn, use_decode_path
from xmoe.registry import EXPERT_KINDS, ROUTERS
from xmoe.routing import RoutingStats, Selection, route_pairs


@dataclass
class MoEOutput:
    """Output of :class:`MoELayer`.

    Attributes:
        hidden_states: same shape as the input.
        aux_loss: scalar sum of ``aux_losses`` (zero in eval mode).
        routing: per-call :class:`~xmoe.routing.RoutingStats`.
        aux_losses: the router's named auxiliary losses (``balance``, ``entropy``, ...), each
            already scaled by its coefficient; empty in eval mode.
    """

    hidden_states: torch.Tensor
    aux_loss: torch.Tensor
    routing: RoutingStats
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class MoELayer(nn.Module):
    """A mixture-of-experts FFN that computes only the (token, expert) pairs it keeps.

    ``forward(x)`` takes ``(..., d_model)`` in any float dtype, treats every leading position as
    a token, and returns :class:`MoEOutput`. Parameters: ``router.weight`` (E, d_model), the
    routed experts under ``experts.`` (the kind ``config.experts`` names in
    :data:`xmoe.registry.EXPERT_KINDS`; by default :class:`~xmoe.experts.FFNExperts`) and, when
    ``num_shared_experts`` > 0, the always-on FFN experts under ``shared_experts.`` (else None).

    Capacity (``capacity_factor``) applies in training mode only, unless ``capacity_at_eval``;
    the router's losses are computed in training mode only (zero in eval mode).

    Compute dtype: the autocast dtype when autocast is on, else the parameters' dtype; the output
    is returned in the input's dtype outside autocast. The router always runs in fp32 or wider.

    ``dispatcher`` carries the kept pairs to the experts and back (:mod:`xmoe.distributed`): the
    local one by default; :func:`xmoe.distributed.expert_parallel` shards the experts over
    processes and installs an all-to-all one. Routing and combine stay on the token's process.
    """

    dispatcher: Dispatcher = LOCAL_DISPATCHER

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
        """The :class:`MoEConfig` fields this layer and its router hold now."""
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

    def forward(self, x: torch.Tensor) -> MoEOutput:
        self._check_input(x)
        config = self.config
        x_SD = x.reshape(-1, config.d_model)
        num_tokens = x_SD.shape[0]

        routed = self.router(x_SD)
        selection = routed.selection
        capacity = config.capacity(num_tokens) if self.training or self.capacity_at_eval else None
        tokens_SD = x_SD.to(self._compute_dtype(x))
        if self.dispatcher is LOCAL_DISPATCHER and use_decode_path(self.experts, x_SD, capacity):
            y_SD, stats = self._decode(tokens_SD, selection)
        else:
            y_SD, stats = self._dispatch_and_compute(tokens_SD, selection, capacity)
        if self.shared_experts is not None:
            y_SD = y_SD + run_shared(self.shared_experts, tokens_SD)
        if not torch.is_autocast_enabled(x.device.type):
            y_SD = y_SD.to(x.dtype)

        if routed.losses:
            aux_loss = torch.stack(list(routed.losses.values())).sum()
        elif torch.is_grad_enabled():  # eval mode: the losses only steer training
            aux_loss = routed.probs_SE.sum() * 0.0  # zero, on the autograd graph
        else:  # inference: one small op instead of a reduction
            aux_loss = routed.probs_SE.new_zeros(())
        output = y_SD.reshape(*x.shape[:-1], config.d_model)
        return MoEOutput(output, aux_loss, stats, routed.losses)

    def _decode(
        self, x_SD: torch.Tensor, selection: Selection
    ) -> tuple[torch.Tensor, RoutingStats]:
        """A handful of tokens at inference: every wanted pair, experts used in place."""
        config = self.config
        y_SD, counts_E = decode_ffn(
            x_SD,
            selection.expert_idx_SK,
            selection.probs_SK,
            selection.wanted_SK,
            self.experts,
            config.renormalize,
        )
        wanted_SK = selection.wanted_SK  # dropless: every wanted pair is kept
        top1_expert_S = selection.expert_idx_SK[:, 0]
        flops_E = self.experts.flops_per_pair_E()
        stats = RoutingStats(
            wanted_SK, wanted_SK, counts_E, top1_expert_S, flops_E, config.dense_flops
        )
        return y_SD, stats

    def _dispatch_and_compute(
        self, x_SD: torch.Tensor, selection: Selection, capacity: int | None
    ) -> tuple[torch.Tensor, RoutingStats]:
        """Kept pairs -> plan -> dispatcher (experts, combine): (S, D) output and statistics."""
        config = self.config
        # decode-sized calls skip the sort by expert: the batched engine gathers per pair
        unsorted = (
            batched_max_pairs(config.d_model, config.d_expert)
            if config.backend in ("auto", "batched")
            else 0
        )
        pairs = route_pairs(selection, config.num_experts, capacity, config.renormalize, unsorted)
        plan = DispatchPlan(
            pairs.token_idx_N,
            pairs.expert_idx_N,
            pairs.counts_E,
            x_SD.shape[0],
            pairs.sorted_by_expert,
        )
        # dispatch -> expert compute -> combine (local by default; all-to-all when sharded)
        y_SD = self.dispatcher(self.experts, x_SD, plan, pairs.weight_N)
        flops_E = self.experts.flops_per_pair_E()
        stats = RoutingStats.from_pairs(
            pairs, selection.expert_idx_SK[:, 0], flops_E, config.dense_flops
        )
        return y_SD, stats

    def extra_repr(self) -> str:
        c = self.config  # the router's own repr shows its tunables
        return f"router={c.router!r}, capacity_factor={c.capacity_factor}"
