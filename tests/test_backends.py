"""Fast path and fallbacks agree; dtypes, autocast and devices behave."""

from __future__ import annotations

import pytest
import torch

from xmoe import MoEConfig
from xmoe.dispatch import ENGINES, DispatchPlan, choose_engine

from helpers import make_layer, use_host_reads


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


@pytest.mark.parametrize("host_reads", [True, False], ids=["host", "sync_free"])
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_wgrad_into_a_given_buffer(monkeypatch, engine, host_reads):
    """``wgrad(..., out_EKM)`` writes every expert of the buffer, zeros for empty experts, and
    equals the float64 per-expert sum."""
    use_host_reads(monkeypatch, host_reads)
    expert_N = torch.tensor([0, 0, 2, 2, 2, 4])  # experts 1, 3 and 5 get no rows
    counts_E = torch.bincount(expert_N, minlength=6)
    plan = DispatchPlan(torch.arange(6), expert_N, counts_E, num_tokens=6)
    a_NK, g_NM = torch.randn(6, 4), torch.randn(6, 8)  # grouped_mm: 16-byte rows
    expected = torch.zeros(6, 4, 8, dtype=torch.float64)
    for n, e in enumerate(expert_N.tolist()):
        expected[e] += torch.outer(a_NK[n].double(), g_NM[n].double())
    out_EKM = torch.full((6, 4, 8), float("nan"))
    got = ENGINES[engine].wgrad(a_NK, g_NM, plan, out_EKM)
    assert got.data_ptr() == out_EKM.data_ptr()
    torch.testing.assert_close(out_EKM.double(), expected, rtol=1e-5, atol=1e-6)
