"""The expert FFN through the Triton kernels (``expert_ffn="triton"``), forward and every
gradient, against a float64 per-pair reference and xmoe's plain path, and the whole layer through
the kernels against the layer without them; under triton's CPU interpreter (``conftest.py``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.test_ops import CASES, random_plan
from xmoe import MoEConfig
from xmoe.dispatch.plan import DispatchPlan
from xmoe.experts.ffn_function import XmoeFFN
from xmoe.experts.weights import ExpertWeights
from xmoe.kernels.configs import Tiles, interpreting
from xmoe.registry import EXPERT_FFN

from helpers import assert_close_grads, make_layer

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    not interpreting(), reason="CPU tensors under triton's interpreter, off where a GPU is"
)

NAMES = ("x", "weight", "w1", "b1", "w2", "b2")


def _operands(case: str, activation: str, bias: bool, dtype=torch.float64):
    """x, weights, weight_N (all requiring gradients) for ``case``'s plan."""
    num_tokens, num_experts, _, d_model, width, _ = CASES[case]
    hidden = width // 2 if activation == "swiglu" else width
    generator = torch.Generator().manual_seed(3)

    def randn(*shape, std=1.0):
        t = torch.randn(*shape, generator=generator, dtype=torch.float64) * std
        return t.to(dtype).requires_grad_(True)

    plan = random_plan(case)
    x = randn(num_tokens, d_model)
    w1, w2 = randn(num_experts, d_model, width, std=0.3), randn(num_experts, hidden, d_model)
    b1 = randn(num_experts, width, std=0.1) if bias else None
    b2 = randn(num_experts, d_model, std=0.1) if bias else None
    weight_N = torch.rand(plan.num_pairs, generator=generator, dtype=torch.float64)
    return x, ExpertWeights(w1, b1, w2, b2, activation), plan, weight_N.to(dtype).requires_grad_()


def reference_ffn(x_SD, weights: ExpertWeights, plan: DispatchPlan, weight_N):
    """``Σ_{pairs of s} weight · FFN_e(x_s)`` in plain autograd ops, pair by pair."""
    expert_N = plan.expert_idx_N
    h_NF = torch.bmm(x_SD[plan.token_idx_N].unsqueeze(1), weights.w1[expert_N]).squeeze(1)
    if weights.b1 is not None:
        h_NF = h_NF + weights.b1[expert_N]
    if weights.activation == "swiglu":
        gate_NH, up_NH = h_NF.chunk(2, dim=-1)
        a_NH = F.silu(gate_NH) * up_NH
    else:
        a_NH = getattr(F, weights.activation)(h_NF)
    y_ND = torch.bmm(a_NH.unsqueeze(1), weights.w2[expert_N]).squeeze(1)
    if weights.b2 is not None:
        y_ND = y_ND + weights.b2[expert_N]
    out_SD = x_SD.new_zeros(plan.num_tokens, x_SD.shape[1])
    return out_SD.index_add(0, plan.token_idx_N, weight_N.unsqueeze(1) * y_ND)


def _run(fn, x_SD, weights: ExpertWeights, plan, weight_N):
    """Output and {name: gradient} of ``fn`` under a fixed random cotangent."""
    out_SD = fn(x_SD, weights, plan, weight_N)
    cotangent = torch.randn(out_SD.shape, generator=torch.Generator().manual_seed(9))
    inputs = {"x": x_SD, "weight": weight_N, **dict(zip(NAMES[2:], weights.tensors(), strict=True))}
    inputs = {name: t for name, t in inputs.items() if t is not None}
    grads = torch.autograd.grad((out_SD * cotangent.to(out_SD.dtype)).sum(), list(inputs.values()))
    return out_SD, dict(zip(inputs, grads, strict=True))


def _triton(x_SD, weights, plan, weight_N):
    return EXPERT_FFN["triton"].forward(x_SD, weights, plan, weight_N, "auto")


def _plain(x_SD, weights, plan, weight_N):
    return XmoeFFN.forward(x_SD, weights, plan, weight_N, "loop")


def _leaf64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().double().requires_grad_()


def _check_against_reference_and_plain(operands, rtol: float, atol: float) -> None:
    out, grads = _run(_triton, *operands)
    x_SD, weights, plan, weight_N = operands
    double = [_leaf64(x_SD), weights, plan, _leaf64(weight_N)]
    double[1] = ExpertWeights(*map(_leaf64, weights.tensors()), weights.activation)
    ref_out, ref_grads = _run(reference_ffn, *double)
    plain_out, plain_grads = _run(_plain, *double)
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
    torch.testing.assert_close(plain_out, ref_out, rtol=1e-10, atol=1e-12)
    assert_close_grads(grads, ref_grads, rtol=rtol, atol=atol)
    assert_close_grads(plain_grads, ref_grads, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("swiglu", True), ("gelu", False)])
def test_uneven_routing_matches_reference_and_plain_path(activation, bias):
    """Uneven loads, empty experts, dropped pairs, widths not multiples of the tile; float64."""
    _check_against_reference_and_plain(_operands("uneven", activation, bias), 1e-10, 1e-12)


@pytest.mark.parametrize("case", ["one_token", "all_dropped"])
def test_one_token_and_no_pairs_match_the_reference(case):
    _check_against_reference_and_plain(_operands(case, "swiglu", bias=True), 1e-10, 1e-12)


def test_fp32_in_small_tiles_matches_the_float64_reference(monkeypatch):
    """fp32 operands, tiles of 32: several row tiles per expert and reduction steps."""
    from xmoe.kernels import ffn

    monkeypatch.setattr(ffn, "tiles_for", lambda device, dtype: Tiles(32, 32, 32))
    operands = _operands("uneven", "gelu", bias=True, dtype=torch.float32)
    _check_against_reference_and_plain(operands, 1e-4, 1e-4)


@pytest.fixture
def bf16_dot(monkeypatch):
    """Test-only shim: the interpreter keeps bf16 as uint16 and multiplies it as integers in
    ``tl.dot``; upcast the operands to fp32 first, as the GPU's bf16 MMA (fp32 accumulation)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder

    real_dot = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype == tl.bfloat16 else t for t in (a, b))
        return real_dot(self, a, b, d, *args)

    monkeypatch.setattr(InterpreterBuilder, "create_dot", create_dot)


def test_bf16_matches_the_float64_reference(bf16_dot):
    """bf16 operands and outputs, fp32 accumulation (fp32 routing weights, as the layer's):
    within 2 % of each tensor's largest magnitude (bf16 keeps 8 bits; the plain path's bf16
    error here is about half that)."""
    x, weights, plan, _ = _operands("uneven", "swiglu", bias=True, dtype=torch.bfloat16)
    weight_N = torch.rand(plan.num_pairs, generator=torch.Generator().manual_seed(5))
    out, grads = _run(_triton, x, weights, plan, weight_N.requires_grad_())
    assert out.dtype == torch.bfloat16 and grads["weight"].dtype == torch.float32
    double = (_leaf64(x), ExpertWeights(*map(_leaf64, weights.tensors()), "swiglu"), plan)
    ref_out, ref_grads = _run(reference_ffn, *double, _leaf64(weight_N))
    for name, got, ref in [("out", out, ref_out), *((k, grads[k], ref_grads[k]) for k in grads)]:
        error = (got.double() - ref).abs().max()
        assert error <= 2e-2 * ref.abs().max(), f"{name}: {error} of {ref.abs().max()}"


def test_a_plan_in_token_order_is_grouped_first():
    """Decode-sized plans arrive unsorted (``sorted_by_expert=False``), weights in their order."""
    x, weights, plan, weight_N = _operands("uneven", "gelu", bias=True)
    order_N = torch.randperm(plan.num_pairs, generator=torch.Generator().manual_seed(4))
    shuffled = DispatchPlan(
        plan.token_idx_N[order_N], plan.expert_idx_N[order_N], plan.counts_E, plan.num_tokens,
        sorted_by_expert=False,
    )  # fmt: skip
    weight_shuffled = weight_N.detach()[order_N].requires_grad_()
    out, grads = _run(_triton, x, weights, shuffled, weight_shuffled)
    ref_out, ref_grads = _run(reference_ffn, x, weights, shuffled, weight_shuffled)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    assert_close_grads(grads, ref_grads, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation,bias", [("swiglu", True), ("gelu", False)])
def test_the_layer_through_the_kernels_equals_the_layer_without(activation, bias):
    """Training mode with capacity drops (float64): the same output and gradients; and an
    inference call of one token (an unsorted plan)."""
    config = MoEConfig(
        d_model=24, num_experts=6, d_expert=10, capacity_factor=1.0, activation=activation,
        bias=bias,
    )  # fmt: skip
    layers = [make_layer(config), make_layer(dataclasses.replace(config, expert_ffn="triton"))]
    x = torch.randn(30, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    for layer in layers:
        x_in = x.clone().requires_grad_(True)
        out = layer(x_in)
        (out.hidden_states.square().sum() + out.aux_loss).backward()
        grads = {"x": x_in.grad, **{n: p.grad for n, p in layer.named_parameters()}}
        with torch.no_grad():
            single = layer.eval()(x[:1]).hidden_states
        results.append((out.hidden_states, grads, single))
    (out, grads, single), (k_out, k_grads, k_single) = results
    torch.testing.assert_close(k_out, out, rtol=1e-10, atol=1e-12)
    assert_close_grads(k_grads, grads, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(k_single, single, rtol=1e-10, atol=1e-12)


def test_supports_only_cuda_or_the_interpreter(monkeypatch):
    triton_ffn, cpu = EXPERT_FFN["triton"], torch.device("cpu")
    assert triton_ffn.supports(torch.float32, cpu, 8, 24, 10)
    assert not triton_ffn.supports(torch.bfloat16, cpu, 8, 24, 10)  # wrong in the interpreter
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_ffn.supports(torch.float32, cpu, 8, 24, 10)
    layer = make_layer(MoEConfig(d_model=24, num_experts=6, d_expert=10, expert_ffn="triton"))
    with pytest.raises(ValueError, match=r"expert_ffn='triton' cannot run .*TRITON_INTERPRET=1"):
        layer(torch.randn(3, 24, dtype=torch.float64))
