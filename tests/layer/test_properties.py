"""Properties the layer must have whatever its weights."""

from __future__ import annotations

import torch

from xmoe import MoEConfig, MoELayer

from helpers import make_layer
from reference import dense_ffn, layer_params


def test_threshold_one_dropless_uses_every_positive_expert():
    config = MoEConfig(d_model=8, num_experts=16, d_expert=4, threshold=1.0)
    layer = make_layer(config, router_std=0.5)
    x = torch.randn(50, 8, dtype=torch.float64)
    out = layer(x)
    positive = (layer.router.probabilities(x) > 0).sum(dim=1)
    assert torch.equal(out.routing.kept_per_token, positive)
    assert torch.equal(out.routing.kept_per_token, torch.full((50,), 16))


def test_single_expert_equals_dense_ffn():
    for activation in ("gelu", "relu", "silu", "swiglu"):
        config = MoEConfig(d_model=8, num_experts=1, d_expert=16, activation=activation)
        layer = make_layer(config)
        x = torch.randn(7, 8, dtype=torch.float64)
        expected = dense_ffn(layer_params(layer), config, x)
        torch.testing.assert_close(layer(x).hidden_states, expected)


def test_lowering_threshold_never_adds_experts():
    config = MoEConfig(d_model=8, num_experts=32, d_expert=4)
    layer = make_layer(config, router_std=0.7)
    x = torch.randn(200, 8)
    previous = None
    for t in (1.0, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0.05):
        layer.router.set_threshold(t)
        wanted = layer(x).routing.wanted_per_token
        if previous is not None:
            assert bool((wanted <= previous).all()), t
        previous = wanted
    assert previous.max() == 1 and wanted.float().mean() < 32


def test_permuting_experts_with_router_rows_changes_nothing():
    config = MoEConfig(
        d_model=8, num_experts=12, d_expert=8, activation="swiglu", capacity_factor=1.0
    )
    layer = make_layer(config, dtype=torch.float32)
    x = torch.randn(40, 8)
    before = layer(x)
    perm = torch.randperm(12)
    with torch.no_grad():
        layer.router.weight.copy_(layer.router.weight[perm])
        for p in layer.experts.parameters():
            p.copy_(p[perm])
    after = layer(x)
    torch.testing.assert_close(after.hidden_states, before.hidden_states, rtol=1e-5, atol=1e-6)
    assert torch.equal(after.routing.expert_load, before.routing.expert_load[perm])
    torch.testing.assert_close(after.aux_loss, before.aux_loss)


def test_identical_init_copies_expert_zero():
    layer = MoELayer(MoEConfig(d_model=8, num_experts=4, d_expert=4, init="identical"))
    for p in (layer.experts.w1, layer.experts.w2):
        assert torch.equal(p, p[:1].expand_as(p))
    independent = MoELayer(MoEConfig(d_model=8, num_experts=4, d_expert=4))
    assert not torch.equal(independent.experts.w1[0], independent.experts.w1[1])


def test_parameter_names_and_shapes():
    config = MoEConfig(d_model=8, num_experts=4, d_expert=6, activation="swiglu")
    shapes = {n: tuple(p.shape) for n, p in MoELayer(config).named_parameters()}
    assert shapes == {
        "router.weight": (4, 8),
        "experts.w1": (4, 8, 12),  # [gate | up]
        "experts.w2": (4, 6, 8),
        "experts.b1": (4, 12),
        "experts.b2": (4, 8),
    }
    no_bias = MoELayer(MoEConfig(d_model=8, num_experts=4, d_expert=6, bias=False))
    assert {n for n, _ in no_bias.named_parameters()} == {
        "router.weight",
        "experts.w1",
        "experts.w2",
    }
