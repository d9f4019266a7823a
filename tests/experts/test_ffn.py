"""Gated experts store gate and up side by side in ``w1`` and run them as one matmul: the
activation's explicit backward, the matmul count, and state dicts of the pre-0.1.0 layout (a
separate ``w3``) refused, never loaded wrong."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from xmoe import MoEConfig, MoELayer
from xmoe.dispatch.engines import LoopEngine
from xmoe.experts import ExpertWeights, expert_ffn, ffn_over_plan
from xmoe.experts.activations import ACTIVATION_FNS
from xmoe.experts.ffn import separate_up_error
from xmoe.routing import route_pairs

from helpers import make_layer


def test_swiglu_backward_matches_autograd():
    torch.manual_seed(0)
    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(7, 5, dtype=torch.float64)
    swiglu = ACTIVATION_FNS["swiglu"]
    gate, up = h[:, :5], h[:, 5:]
    expected = F.silu(gate) * up
    torch.testing.assert_close(swiglu.forward(h), expected, rtol=0, atol=0)
    (expected_grad,) = torch.autograd.grad(expected, h, grad)
    torch.testing.assert_close(swiglu.backward(grad, h.detach()), expected_grad)
    torch.autograd.gradcheck(lambda t: swiglu.forward(t), (h,))


class _CountingEngine(LoopEngine):
    calls: ClassVar[list[str]] = []

    @classmethod
    def mm(cls, a_NK, b_EKM, plan):
        cls.calls.append(f"mm{b_EKM.shape[1]}x{b_EKM.shape[2]}")
        return LoopEngine.mm(a_NK, b_EKM, plan)

    @classmethod
    def wgrad(cls, a_NK, g_NM, plan, out_EKM=None):
        cls.calls.append(f"wgrad{a_NK.shape[1]}x{g_NM.shape[1]}")
        return LoopEngine.wgrad(a_NK, g_NM, plan, out_EKM)


def test_gated_first_layer_is_one_matmul_forward_and_backward():
    d_model, d_expert, num_experts = 8, 4, 3
    layer = make_layer(
        MoEConfig(d_model=d_model, num_experts=num_experts, d_expert=d_expert, activation="swiglu")
    )
    x = torch.randn(6, d_model, dtype=torch.float64, requires_grad=True)
    selection = layer.router(x).selection
    pairs = route_pairs(selection, num_experts)
    plan = pairs.plan
    e = layer.experts
    _CountingEngine.calls = []
    out = ffn_over_plan(x, e.weights(), plan, pairs.weight_N, _CountingEngine)
    assert _CountingEngine.calls == ["mm8x8", "mm4x8"]  # [gate | up] is 2·d_expert wide
    _CountingEngine.calls = []
    out.sum().backward()
    assert sorted(_CountingEngine.calls) == ["mm8x4", "mm8x8", "wgrad4x8", "wgrad8x8"]


class _MatmulCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_decode_path_runs_two_matmuls_per_selected_expert():
    config = MoEConfig(d_model=16, num_experts=8, d_expert=4, activation="swiglu", threshold=0.9)
    layer = make_layer(config).eval()
    x = torch.randn(1, 16, dtype=torch.float64)
    with torch.no_grad():
        routing = layer(x).routing
        with _MatmulCounter() as counter:
            layer(x)
    experts = int((routing.expert_load > 0).sum())
    assert experts >= 2
    assert counter.count == 1 + 2 * experts  # the router, then first and second layer each


def _old_layout(state: dict, d_expert: int) -> dict:
    """What a gated layer's state dict looked like before the fusion (separate up matrix,
    bias on the gate branch only)."""
    old = {}
    for key, value in state.items():
        if key.endswith("experts.w1"):
            old[key] = value[..., :d_expert].clone()
            old[key[: -len("w1")] + "w3"] = value[..., d_expert:].clone()
        elif key.endswith("experts.b1"):
            old[key] = value[..., :d_expert].clone()
        else:
            old[key] = value.clone()
    return old


def test_older_layout_state_dict_is_refused():
    config = MoEConfig(d_model=8, num_experts=4, d_expert=6, activation="swiglu")
    model = torch.nn.ModuleDict({"a": MoELayer(config), "b": MoELayer(config)})
    new = model.state_dict()
    old = _old_layout(new, 6)
    assert separate_up_error(new, "model.safetensors") is None
    assert separate_up_error(old, "model.safetensors") == (
        "model.safetensors: expert weights in the pre-0.1.0 layout (separate up tensor "
        "'a.experts.w3'; gate and up are now one tensor); re-train or re-export with this version"
    )
    with pytest.raises(RuntimeError, match=r"experts\.w3"):
        model.load_state_dict(old)


def test_expert_ffn_refuses_a_first_layer_of_the_wrong_width():
    layer = make_layer(MoEConfig(d_model=8, num_experts=4, d_expert=6, activation="swiglu"))
    x = torch.randn(3, 8, dtype=torch.float64)
    pairs = route_pairs(layer.router(x).selection, 4)
    plan = pairs.plan
    e = layer.experts
    with pytest.raises(ValueError, match="must be 12 wide"):
        expert_ffn(
            x, ExpertWeights(e.w1[..., :6], None, e.w2, None, "swiglu"), plan, pairs.weight_N
        )
