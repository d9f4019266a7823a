"""Fast path and fallbacks agree; dtypes, autocast and devices behave."""

from __future__ import annotations

import pytest
import torch

from xmoe import MoEConfig
from xmoe.dispatch import choose_engine

from helpers import make_layer


def _forward_backward(layer, x, cotangent):
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    (out.hidden_states.float() * cotangent).sum().add(out.aux_loss).backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return out.hidden_states, grads


@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-2, 2e-2)]
)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_batched_and_loop_agree(dtype, rtol, atol, activation):
    results = {}
    x = torch.randn(96, 32).to(dtype)
    cotangent = torch.randn(96, 32)
    for backend in ("grouped", "loop", "batched"):
        config = MoEConfig(
            d_model=32,
            num_experts=16,
            d_expert=16,
            backend=backend,
            activation=activation,
            capacity_factor=2.0,
        )
        layer = make_layer(config, dtype=dtype, router_std=0.3)
        results[backend] = _forward_backward(layer, x, cotangent)
    ref_out, ref_grads = results["loop"]
    for backend in ("grouped", "batched"):
        out, grads = results[backend]
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref_out.float(), rtol=rtol, atol=atol)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(
                grads[name].float(), grad.float(), rtol=rtol, atol=atol, msg=f"{backend} {name}"
            )


def test_auto_backend_choice():
    cpu = torch.device("cpu")
    assert choose_engine("auto", torch.float32, cpu, 8, 64, 32).name == "batched"
    assert choose_engine("auto", torch.float32, cpu, 4096, 64, 32).name == "grouped"
    assert choose_engine("auto", torch.float64, cpu, 4096, 64, 32).name == "loop"
    assert choose_engine("auto", torch.float32, cpu, 4096, 62, 32).name == "loop"
    assert choose_engine("auto", torch.bfloat16, cpu, 4096, 64, 12).name == "loop"


def test_input_dtype_is_kept_and_router_runs_in_fp32():
    config = MoEConfig(d_model=16, num_experts=8, d_expert=8)
    layer = make_layer(config, dtype=torch.float32)
    x = torch.randn(50, 16)
    out32 = layer(x)
    out16 = layer(x.bfloat16())
    assert out16.hidden_states.dtype == torch.bfloat16
    assert layer.router.probabilities(x.bfloat16()).dtype == torch.float32
    torch.testing.assert_close(
        out16.hidden_states.float(), out32.hidden_states, rtol=5e-2, atol=5e-2
    )


def test_cpu_autocast_bf16():
    config = MoEConfig(d_model=16, num_experts=8, d_expert=8)
    layer = make_layer(config, dtype=torch.float32)
    x = torch.randn(50, 16, requires_grad=True)
    reference = layer(x).hidden_states
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.hidden_states.dtype == torch.bfloat16
    torch.testing.assert_close(out.hidden_states.float(), reference, rtol=5e-2, atol=5e-2)
    out.hidden_states.float().sum().backward()
    assert layer.experts.w1.grad.dtype == torch.float32 and x.grad is not None
