"""Expert activations with their explicit derivatives, for hand-written backwards.

A gated activation maps the first layer's (N, 2H) output ``[gate | up]`` (the two projections
computed as one matmul) to (N, H); a plain one maps (N, H) to (N, H).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    """``forward(h)`` and ``backward(grad, h) = grad · forward'(h)`` (shaped like ``h``)."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _halves(h_N2H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return h_N2H.chunk(2, dim=-1)


def _swiglu(h_N2H: torch.Tensor) -> torch.Tensor:
    gate_NH, up_NH = _halves(h_N2H)
    return F.silu(gate_NH).mul_(up_NH)


def _swiglu_backward(grad_NH: torch.Tensor, h_N2H: torch.Tensor) -> torch.Tensor:
    gate_NH, up_NH = _halves(h_N2H)
    dh_N2H = torch.empty_like(h_N2H)
    dgate_NH, dup_NH = _halves(dh_N2H)
    torch.mul(F.silu(gate_NH), grad_NH, out=dup_NH)
    torch.ops.aten.silu_backward.grad_input(grad_NH * up_NH, gate_NH, grad_input=dgate_NH)
    return dh_N2H


ACTIVATION_FNS: dict[str, Activation] = {
    "gelu": Activation(
        lambda h: F.gelu(h, approximate="none"),
        lambda grad, h: torch.ops.aten.gelu_backward(grad, h, approximate="none"),
    ),
    "relu": Activation(F.relu, lambda grad, h: torch.ops.aten.threshold_backward(grad, h, 0)),
    "silu": Activation(F.silu, lambda grad, h: torch.ops.aten.silu_backward(grad, h)),
    "swiglu": Activation(_swiglu, _swiglu_backward),
}
"""Every expert activation by its config name. ``swiglu`` is gated: ``silu(gate) * up``."""

ELEMENTWISE_ACTIVATIONS = ("gelu", "relu", "silu")
"""The keys of :data:`ACTIVATION_FNS` that keep the width (plain experts)."""
