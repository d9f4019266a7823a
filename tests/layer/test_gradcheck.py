"""torch.autograd.gradcheck through the whole layer (float64, loop back-end)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from xmoe import MoEConfig

from helpers import make_layer


@pytest.mark.parametrize(
    "extra",
    [
        {"router": "threshold", "threshold": 0.7},
        {"router": "topk", "top_k": 2, "capacity_factor": 1.0, "min_capacity": 1},
        {"router": "threshold", "activation": "swiglu", "renormalize": True},
        {
            "router": "threshold",
            "activation": "silu",
            "bias": False,
            "capacity_factor": 0.5,
            "min_capacity": 1,
        },
    ],
)
def test_gradcheck_layer(extra):
    config = MoEConfig(d_model=4, num_experts=5, d_expert=3, backend="loop", **extra)
    layer = make_layer(config)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, *params):
        out = functional_call(layer, dict(zip(names, params, strict=True)), (x,))
        return out.hidden_states, out.aux_loss

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)
