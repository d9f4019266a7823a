"""The grouped path off the CPU makes no host read: run it on CPU with host reads disabled and
fail on any ``.tolist()``, ``.item()`` or tensor-to-Python conversion during forward+backward.

Syncs inside C++ ops (``nonzero`` and boolean masks, whose output size is data-dependent) are not
visible here; :mod:`xmoe.device` lists them.
"""

from __future__ import annotations

import pytest
import torch

from xmoe import MoEConfig
from xmoe.experts import ffn_function

from helpers import make_layer, use_host_reads

HOST_READS = ("tolist", "item", "__bool__", "__int__", "__float__")


def _forbid_host_reads(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("host read of a tensor on the sync-free path")

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize(
    "router,extra",
    [("threshold", {"threshold": 0.9}), ("topk", {"top_k": 3}), ("topp", {"threshold": 0.8})],
)
@pytest.mark.parametrize(("activation", "bias"), [("gelu", True), ("swiglu", True)])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_grouped_forward_backward_reads_nothing_on_host(
    monkeypatch, router, extra, activation, bias, capacity_factor
):
    # big enough that the CPU path would widen the threshold ranking (S*E > 4096) and chunk
    monkeypatch.setattr(ffn_function, "CHUNK_ELEMENTS", 16 * 64)
    config = MoEConfig(
        d_model=16, num_experts=32, d_expert=8, router=router, backend="grouped",
        activation=activation, bias=bias, capacity_factor=capacity_factor, **extra,
    )  # fmt: skip
    layer = make_layer(config, dtype=torch.float32, router_std=0.3).train()
    x = torch.randn(256, 16, requires_grad=True)

    def step() -> torch.Tensor:
        out = layer(x)
        (out.hidden_states.square().sum() + out.aux_loss).backward()
        return out.hidden_states.detach()

    expected = step()
    with monkeypatch.context() as patch:
        _forbid_host_reads(patch)
        with pytest.raises(AssertionError, match="host read"):  # the CPU path does read
            step()
    use_host_reads(monkeypatch, False)
    with monkeypatch.context() as patch:
        _forbid_host_reads(patch)
        got = step()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
