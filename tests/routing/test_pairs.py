"""routing/pairs.py: the plan of a dropless call is built only when a dispatcher reads it."""

from __future__ import annotations

import gc
import weakref

import torch

from xmoe import MoEConfig, MoELayer


def _layer() -> MoELayer:
    torch.manual_seed(0)
    config = MoEConfig(d_model=16, num_experts=8, d_expert=8, router="topk", top_k=2)
    return MoELayer(config)


def test_a_one_token_inference_call_never_builds_the_plan():
    layer = _layer().eval()
    x = torch.randn(1, 16)
    with torch.no_grad():
        routed = layer.route(x)
        y = layer.compute(x, routed)
    assert "plan" not in vars(routed.pairs) and "weight_N" not in vars(routed.pairs)
    # the statistics still count what was computed, and equal the plan's counts
    load = routed.stats.expert_load
    assert int(load.sum()) == 2 and "plan" not in vars(routed.pairs)
    assert torch.equal(load, routed.pairs.plan.counts_E)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).hidden_states, y)


def test_a_batch_builds_the_plan_and_its_weights_carry_gradients():
    layer = _layer().train()
    x = torch.randn(12, 16, requires_grad=True)
    routed = layer.route(x)
    layer.compute(x, routed).sum().backward()
    assert "plan" in vars(routed.pairs)
    assert routed.pairs.weight_N.requires_grad
    assert layer.router.weight.grad is not None


def test_statistics_do_not_keep_the_call_alive():
    """The statistics outlive the call (logs, ``MoEOutput.routing``): they must not hold the
    routed pairs, whose selection carries the autograd graph."""
    layer = _layer().train()
    routed = layer.route(torch.randn(12, 16))
    probe = weakref.ref(routed.pairs)
    stats = routed.stats
    del routed
    gc.collect()
    assert probe() is None
    assert stats.expert_load.sum() == 24
