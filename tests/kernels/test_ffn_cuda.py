"""The layer through the compiled Triton kernels on a CUDA device against the same layer through
xmoe's plain path there (skipped without a GPU): fp32 tightly, bf16 within its rounding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from xmoe import MoEConfig

from helpers import make_layer

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")


def _run(layer, x):
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.hidden_states.float().square().sum() + out.aux_loss).backward()
    grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return out.hidden_states, grads


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("num_tokens", [1, 16, 300])
def test_the_kernels_on_cuda_equal_the_plain_path(dtype, tolerance, num_tokens):
    torch.backends.cuda.matmul.allow_tf32 = False
    config = MoEConfig(
        d_model=128, num_experts=12, d_expert=64, capacity_factor=1.0, activation="swiglu",
        bias=True, router="threshold", threshold=0.8,
    )  # fmt: skip
    x = torch.randn(num_tokens, 128, device="cuda").to(dtype)
    results = []
    for impl in ("xmoe", "triton"):
        layer = make_layer(dataclasses.replace(config, expert_ffn=impl), dtype=dtype).cuda()
        results.append(_run(layer, x))
    (out, grads), (k_out, k_grads) = results
    for name, got, want in [("out", k_out, out), *((n, k_grads[n], grads[n]) for n in grads)]:
        if want is None:
            assert got is None or not got.any(), name
            continue
        error = (got.float() - want.float()).abs().max()
        assert error <= tolerance * max(1.0, want.float().abs().max()), f"{name}: {error}"
