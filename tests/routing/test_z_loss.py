"""The router z-loss (ST-MoE), an option of every softmax router: its value and gradient against
the plain formula, its name in the layer's losses, and a default that changes nothing."""

from __future__ import annotations

import pytest
import torch

from xmoe import ConfigError, MoEConfig, MoELayer

BASE = {"d_model": 16, "num_experts": 6, "d_expert": 8}
# router -> (the config fields it needs, its own options)
SOFTMAX_ROUTERS = {
    "threshold": ({}, {}),
    "topk": ({}, {}),
    "topp": ({}, {}),
    "null_topk": ({}, {"num_null": 2}),
    "null_threshold": ({}, {"num_null": 2}),
    "expert_choice": ({"capacity_factor": 1.0}, {}),
}


def _layer(router: str, **options) -> MoELayer:
    torch.manual_seed(0)
    fields, own = SOFTMAX_ROUTERS[router]
    config = MoEConfig(**BASE, **fields, router=router, router_options={**own, **options})
    layer = MoELayer(config).double()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 2.0)  # logsumexp far from 0
    return layer


def _formula(logits_SE: torch.Tensor) -> torch.Tensor:
    """mean over tokens of log(Σ_e exp z_e)², one token at a time."""
    return torch.stack([row.exp().sum().log() ** 2 for row in logits_SE]).mean()


@pytest.mark.parametrize("router", SOFTMAX_ROUTERS)
def test_z_loss_value_and_gradient_match_the_formula(router):
    layer = _layer(router, z_loss_coef=0.3)
    x = torch.randn(7, 16, dtype=torch.float64)
    z = layer(x).aux_losses["z"]
    (grad,) = torch.autograd.grad(z, layer.router.weight)

    weight = layer.router.weight.detach().clone().requires_grad_(True)
    logits_SE = x @ weight.t()
    # the threshold family may transform its logits; these are plain
    assert getattr(layer.router.options, "logit_scale", None) is None
    expected = 0.3 * _formula(logits_SE)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_z_loss_reads_the_logits_the_softmax_sees():
    layer = _layer("threshold", z_loss_coef=1.0, logit_scale=2.0)
    x = torch.randn(5, 16, dtype=torch.float64)
    expected = _formula(layer.router.logits(x))
    torch.testing.assert_close(layer(x).aux_losses["z"], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("router", SOFTMAX_ROUTERS)
def test_default_z_loss_changes_nothing(router):
    x = torch.randn(9, 16, dtype=torch.float64)
    plain, zero = _layer(router), _layer(router, z_loss_coef=0.0)
    out_plain, out_zero = plain(x), zero(x)
    assert "z" not in out_plain.aux_losses
    assert out_zero.aux_losses.keys() == out_plain.aux_losses.keys()
    assert torch.equal(out_plain.hidden_states, out_zero.hidden_states)
    assert torch.equal(out_plain.aux_loss, out_zero.aux_loss)


def test_z_loss_is_added_to_the_aux_loss_in_training_only():
    layer = _layer("topk", z_loss_coef=0.5)
    x = torch.randn(4, 16, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(out.aux_loss, out.aux_losses["balance"] + out.aux_losses["z"])
    assert layer.eval()(x).aux_losses == {}


@pytest.mark.parametrize("bad", [-0.1, float("inf"), "1", True])
def test_bad_z_loss_coef_is_named(bad):
    with pytest.raises(ConfigError, match=r"^router_options\.z_loss_coef=.* is invalid: .*>= 0"):
        MoEConfig(**BASE, router_options={"z_loss_coef": bad})
