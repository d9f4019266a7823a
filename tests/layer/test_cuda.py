"""The CUDA path against the float64 reference (skipped without a GPU).

fp32 on the GPU must match the per-token float64 loop tightly, outputs and every gradient. bf16
is compared with an fp32 CPU layer holding the same bf16-rounded weights and inputs, so that both
see the same router logits and make the same routing decisions; only the expert arithmetic
differs.
"""

from __future__ import annotations

import pytest
import torch

from xmoe import MoEConfig

from helpers import assert_close_grads, make_layer, run_both

pytestmark = pytest.mark.gpu

CASES = [
    # (router, capacity_factor, activation, bias, backend)
    ("threshold", None, "gelu", True, "auto"),
    ("threshold", 1.0, "swiglu", False, "auto"),
    ("topk", 1.5, "gelu", True, "loop"),
    ("threshold", 0.5, "relu", True, "batched"),
]


@pytest.mark.parametrize("router,capacity_factor,activation,bias,backend", CASES)
@pytest.mark.parametrize("num_tokens", [1, 200])
def test_cuda_fp32_matches_reference(
    router, capacity_factor, activation, bias, backend, num_tokens
):
    config = MoEConfig(
        d_model=32, num_experts=12, d_expert=16, router=router, threshold=0.8,
        capacity_factor=capacity_factor, min_capacity=1, activation=activation, bias=bias,
        backend=backend,
    )  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = False
    layer = make_layer(config, dtype=torch.float32)
    x = torch.randn(num_tokens, 32, dtype=torch.float64)
    _, ref, _, ref_grads = run_both(layer, x)  # float64 per-token loop on the CPU

    layer = layer.cuda()
    x_cuda = x.to("cuda", torch.float32).requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x_cuda)
    generator = torch.Generator().manual_seed(1)  # the cotangent run_both used
    cotangent = torch.randn(ref.hidden_states.shape, generator=generator, dtype=torch.float64)
    loss = (out.hidden_states * cotangent.to("cuda", torch.float32)).sum() + 3.0 * out.aux_loss
    loss.backward()
    grads = {"x": x_cuda.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    grads = {n: None if g is None else g.double().cpu() for n, g in grads.items()}

    hidden = out.hidden_states.double().cpu()
    torch.testing.assert_close(hidden, ref.hidden_states, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.aux_loss.double().cpu(), ref.aux_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(grads, ref_grads, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_cuda_bf16_matches_cpu_on_rounded_weights(activation):
    config = MoEConfig(d_model=64, num_experts=16, d_expert=32, activation=activation)
    layer = make_layer(config, dtype=torch.float32, router_std=0.3).to(torch.bfloat16)
    x = torch.randn(256, 64).to(torch.bfloat16)
    cotangent = torch.randn(256, 64)

    def forward_backward(layer, x):
        x = x.detach().clone().requires_grad_(True)
        out = layer(x)
        (out.hidden_states.float() * cotangent.to(x.device)).sum().backward()
        grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
        return out, {k: v.float().cpu() for k, v in grads.items()}

    expected, expected_grads = forward_backward(make_fp32_copy(layer), x.float())
    gpu_layer = layer.cuda()
    out, grads = forward_backward(gpu_layer, x.cuda())
    assert out.hidden_states.dtype == torch.bfloat16
    assert torch.equal(out.routing.kept_per_token.cpu(), expected.routing.kept_per_token)
    assert_close_scaled(out.hidden_states.float().cpu(), expected.hidden_states, "output")
    for name, grad in expected_grads.items():
        assert_close_scaled(grads[name], grad, name)


def assert_close_scaled(got, expected, name, tolerance=3e-2):
    """bf16 accuracy: every error within ``tolerance`` of the tensor's largest magnitude."""
    scale = expected.abs().max().clamp_min(1e-3)
    torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=tolerance, msg=name)


def make_fp32_copy(layer):
    copy = make_layer(layer.config, dtype=torch.float32)
    copy.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    return copy
