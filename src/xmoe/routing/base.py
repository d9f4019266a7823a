"""The router: a bias-free linear map to expert probabilities, then a selection rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.config import MoEConfig
from xmoe.routing.selection import Selection


def router_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32 or wider: float64 anywhere in ``dtypes`` keeps the router in float64."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


class Router(nn.Module):
    """Base class of the routers in :data:`xmoe.routing.ROUTERS`.

    Holds ``weight`` of shape (E, d_model) (no bias). Subclasses implement :meth:`select`.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.config.init_std)

    def probabilities(self, x_SD: torch.Tensor) -> torch.Tensor:
        """Softmax router probabilities.

        Args:
            x_SD: (S, d_model) tokens, any float dtype.

        Returns:
            (S, E) probabilities in fp32, or float64 when the input or weight is float64.
            Autocast is disabled here: routing decisions must not depend on bf16 rounding.
        """
        dtype = router_dtype(x_SD.dtype, self.weight.dtype)
        with torch.autocast(device_type=x_SD.device.type, enabled=False):
            logits_SE = F.linear(x_SD.to(dtype), self.weight.to(dtype))
        return logits_SE.softmax(dim=-1)

    def select(self, probs_SE: torch.Tensor) -> Selection:
        """Choose the experts each token wants. Args: probs_SE (S, E). Returns a Selection."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"d_model={self.config.d_model}, num_experts={self.config.num_experts}"
