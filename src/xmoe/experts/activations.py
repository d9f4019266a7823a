"""Element-wise activations with their explicit derivatives, for hand-written backwards."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    """``forward(h)`` and ``backward(grad, h) = grad · forward'(h)``."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    backward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


ACTIVATION_FNS: dict[str, Activation] = {
    "gelu": Activation(
        lambda h: F.gelu(h, approximate="none"),
        lambda grad, h: torch.ops.aten.gelu_backward(grad, h, approximate="none"),
    ),
    "relu": Activation(F.relu, lambda grad, h: torch.ops.aten.threshold_backward(grad, h, 0)),
    "silu": Activation(F.silu, lambda grad, h: torch.ops.aten.silu_backward(grad, h)),
}
"""Plain (non-gated) activations. The gated ``swiglu`` uses ``silu`` on its gate branch."""
