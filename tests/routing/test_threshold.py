"""Router options against plain float64 formulas: normalised logits, the k* controller, the
entropy loss, the top-p rule; routers own their options and name their losses."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from xmoe import ConfigError, MoEConfig, MoELayer
from xmoe.registry import ROUTERS
from xmoe.routing import entropy_loss
from xmoe.routing.threshold import controller_scale, decayed_target, normalized_logits
from xmoe.training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from xmoe.training.config import apply_overrides
from xmoe.training.presets import preset

BASE = {"d_model": 16, "num_experts": 12, "d_expert": 8}


def _layer(**options) -> MoELayer:
    router = options.pop("router", "threshold")
    threshold = options.pop("threshold", 0.9)
    torch.manual_seed(0)
    config = MoEConfig(**BASE, router=router, threshold=threshold, router_options=options)
    return MoELayer(config)


def test_normalized_logits_match_the_formula():
    z = torch.randn(7, 12, dtype=torch.float64)
    expected = torch.stack(
        [3.7 * (row - row.mean()) / math.sqrt(((row - row.mean()) ** 2).mean() + 1e-6) for row in z]
    )
    got = normalized_logits(z, torch.tensor(3.7, dtype=torch.float64))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    layer = _layer(logit_scale=2.5).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    plain = x @ layer.router.weight.t()
    torch.testing.assert_close(
        layer.router.probabilities(x), normalized_logits(plain, torch.tensor(2.5)).softmax(-1)
    )


def test_normalized_router_is_invariant_to_the_weight_scale():
    layer = _layer(logit_scale=3.0)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)  # logit variance >> the eps under the sqrt
    x = torch.randn(9, 16)
    before = layer.router.probabilities(x)
    with torch.no_grad():
        layer.router.weight.mul_(50.0)
    torch.testing.assert_close(layer.router.probabilities(x), before, rtol=1e-4, atol=1e-6)


def test_controller_update_and_decay_formulas():
    assert controller_scale(2.0, wanted=8.0, target=4.0, rate=0.5) == pytest.approx(2.0 * 2**0.5)
    assert controller_scale(2.0, wanted=2.0, target=4.0, rate=1.0) == pytest.approx(1.0)
    assert controller_scale(999.0, wanted=1e9, target=1.0, rate=1.0) == 1e3  # kept in range
    options = ROUTERS["threshold"].Options(
        logit_scale=1.0, target_experts=4.0, target_start=12.0, target_decay_steps=8
    )
    assert [decayed_target(options, s) for s in (0, 4, 8, 100)] == [12.0, 8.0, 4.0, 4.0]


def test_controller_converges_to_the_target_on_a_stream():
    layer = _layer(logit_scale=0.5, target_experts=3.0, controller_rate=0.5)
    layer.train()
    generator = torch.Generator().manual_seed(1)
    for _ in range(80):
        layer(torch.randn(256, 16, generator=generator))
        layer.router.end_step()
    wanted = layer(torch.randn(2048, 16, generator=generator)).routing.experts_wanted_per_token
    assert wanted == pytest.approx(3.0, rel=0.1)
    assert int(layer.router.controller_step) == 80


def test_eval_mode_never_changes_the_scale():
    layer = _layer(logit_scale=1.5, target_experts=2.0)
    layer.eval()
    for _ in range(5):
        layer(torch.randn(64, 16))
        layer.router.end_step()
    assert float(layer.router.logit_scale) == 1.5 and int(layer.router.controller_step) == 0


def test_scale_and_step_survive_a_checkpoint_round_trip(tmp_path):
    layer = _layer(logit_scale=1.0, target_experts=2.0)
    layer.train()
    for _ in range(3):
        layer(torch.randn(64, 16))
        layer.router.end_step()
    scale = float(layer.router.logit_scale)
    assert scale != 1.0
    path = save_checkpoint(tmp_path / "c.safetensors", Checkpoint(layer.state_dict(), None, {}, {}))
    fresh = _layer(logit_scale=1.0, target_experts=2.0)
    fresh.load_state_dict(load_checkpoint(path).model_state)
    assert float(fresh.router.logit_scale) == scale and int(fresh.router.controller_step) == 3


def test_entropy_loss_value_and_gradient():
    probs = torch.softmax(torch.randn(6, 5, dtype=torch.float64), dim=-1)
    expected = -(probs * probs.log()).sum(-1).mean()
    torch.testing.assert_close(entropy_loss(probs), expected)
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: entropy_loss(z.softmax(-1)), (logits,))


def test_layer_returns_named_losses_scaled_by_their_coefficients():
    layer = _layer(entropy_coef=0.3).double()
    layer.train()
    x = torch.randn(20, 16, dtype=torch.float64)
    out = layer(x)
    probs = layer.router.probabilities(x)
    assert set(out.aux_losses) == {"balance", "entropy"}
    torch.testing.assert_close(out.aux_losses["entropy"], 0.3 * entropy_loss(probs))
    torch.testing.assert_close(out.aux_loss, out.aux_losses["balance"] + out.aux_losses["entropy"])
    layer.eval()
    assert layer(x).aux_losses == {}


def _brute_force(probs: list[float], threshold: float, inclusive_rule: bool) -> set[int]:
    """Sorted by probability (ties: lower id first); keep j iff the strictly better mass is
    <= threshold (top-p) or < threshold (XMoE); always keep the first."""
    order = sorted(range(len(probs)), key=lambda e: (-probs[e], e))
    kept, mass = set(), 0.0
    for rank, expert in enumerate(order):
        if rank == 0 or (mass <= threshold if inclusive_rule else mass < threshold):
            kept.add(expert)
        mass += probs[expert]
    return kept


@pytest.mark.parametrize("threshold", [0.2, 0.4, 0.75, 1.0])
def test_topp_rule_matches_brute_force(threshold):
    layer = _layer(router="topp", threshold=threshold).double()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)
    probs = layer.router.probabilities(torch.randn(40, 16, dtype=torch.float64))
    selection = layer.router.select(probs)
    for s in range(probs.shape[0]):
        wanted = set(selection.expert_idx_SK[s][selection.wanted_SK[s]].tolist())
        assert wanted == _brute_force(probs[s].tolist(), threshold, inclusive_rule=True)


def test_topp_and_threshold_differ_exactly_at_the_boundary():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0]], dtype=torch.float64)
    for router, expected in (("threshold", 1), ("topp", 2)):
        layer = _layer(router=router, threshold=0.5).double()
        assert int(layer.router.select(probs).wanted_SK.sum()) == expected


def test_topp_defaults_to_the_entropy_loss():
    assert ROUTERS["topp"].Options().entropy_coef > 0
    assert ROUTERS["threshold"].Options().entropy_coef == 0


def test_linear_init_matches_nn_linear_scale():
    layer = _layer(init="linear")
    bound = 1 / math.sqrt(16)
    assert layer.router.weight.abs().max() <= bound and layer.router.weight.std() > bound / 3


@pytest.mark.parametrize(
    "options,fragment",
    [
        ({"logit_scale": -1.0}, "router_options.logit_scale"),
        ({"logit_scale": float("nan")}, "router_options.logit_scale"),
        ({"target_experts": 2.0}, "unless router_options.logit_scale"),
        ({"logit_scale": 1.0, "target_experts": 13.0}, "at most num_experts=12"),
        ({"logit_scale": 1.0, "target_experts": 2.0, "controller_rate": 0.0}, "controller_rate"),
        ({"entropy_coef": -0.1}, "router_options.entropy_coef"),
        ({"init": "xavier"}, "router_options.init"),
        ({"nope": 1}, "unknown ThresholdOptions field"),
        ([1, 2], "router_options=[1, 2] is invalid"),
    ],
)
def test_bad_router_options_are_named(options, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        MoEConfig(**BASE, router_options=options)


def test_options_round_trip_and_overrides():
    config = MoEConfig(**BASE, router_options={"logit_scale": 2.0, "target_experts": 3.0})
    assert MoEConfig.from_dict(config.to_dict()) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.router_options.logit_scale = 5.0
    train = apply_overrides(preset("tiny"), ["moe.router_options.logit_scale=3.7"])
    assert train.model.moe.router_options.logit_scale == 3.7
    switched = apply_overrides(train, ["moe.router=topk", "moe.router_options.entropy_coef=0.05"])
    assert switched.model.moe.router == "topk"
    assert switched.model.moe.router_options == ROUTERS["topk"].Options(entropy_coef=0.05)


def test_a_router_is_registered_lazily_by_name():
    assert {"threshold", "topk", "topp"} <= set(ROUTERS)
    with pytest.raises(KeyError, match="unknown router 'nope'"):
        ROUTERS["nope"]


def test_topk_router_owns_top_k():
    torch.manual_seed(0)
    config = MoEConfig(d_model=8, num_experts=4, d_expert=4, router="topk", top_k=2)
    layer = MoELayer(config).eval()
    x = torch.randn(10, 8)
    assert bool((layer(x).routing.kept_per_token == 2).all())
    layer.router.set_top_k(3)
    assert bool((layer(x).routing.kept_per_token == 3).all())
    assert layer.config is layer.router.config is config and config.top_k == 2
    assert layer.tunables() == {"capacity_at_eval": False, "top_k": 3}
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ConfigError, match=r"^top_k=.* is invalid: .*\[1, num_experts=4\]"):
            layer.router.set_top_k(bad)
    assert layer.router.top_k == 3


@pytest.mark.parametrize("router", ["threshold", "topp"])
def test_threshold_routers_own_their_threshold(router):
    layer = _layer(router=router)
    assert layer.tunables() == {"capacity_at_eval": False, "threshold": 0.9}
    for bad in (0.0, 1.5, float("nan"), "0.5"):
        with pytest.raises(ConfigError, match=r"^threshold=.* is invalid: .*\(0, 1\]"):
            layer.router.set_threshold(bad)
    layer.router.set_threshold(0.5)
    assert layer.router.threshold == 0.5 and layer.config.threshold == 0.9
    assert "threshold=0.5" in repr(layer)
