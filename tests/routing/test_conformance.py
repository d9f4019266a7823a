"""Every router in ``xmoe.registry.ROUTERS`` under the same checks, at a small config valid for it:
every engine agrees with ``loop`` (outputs and gradients), one-token decode calls equal the
batched call, the routing statistics are finite and non-negative, and a bad option name is
rejected by name. The table below names each router's config: registering a router without
adding it here fails these tests, so a new router is under test as soon as it is registered."""

from __future__ import annotations

import math

import pytest
import torch

from xmoe import ConfigError, MoEConfig
from xmoe.experts import FFNExperts
from xmoe.registry import ROUTERS

from helpers import assert_engines_agree, decode_calls_of, make_layer, register_for_test

BASE = {"d_model": 16, "num_experts": 4, "d_expert": 8}

# router -> (MoEConfig fields beside BASE, width of the routing state it takes, or None).
# Each config is per-token in eval mode, so that a decoded token routes as in a batch:
# expert_choice decodes with its eval_rule="topk" (its default rule ranks a call's tokens
# against each other), THOR with its deterministic ensemble (random draws differ per call).
SMALL_CONFIGS: dict[str, tuple[dict, int | None]] = {
    "threshold": ({"threshold": 0.8, "router_options": {"logit_scale": 2.0}}, None),
    "topk": ({"top_k": 2, "capacity_factor": 1.0, "min_capacity": 1}, None),
    "topp": ({"threshold": 0.6}, None),
    "dense_split": (  # a converted dense MLP's rule: the learned router's straight-through
        {"activation": "swiglu", "bias": False, "router_options": {"selection": "threshold"}},
        None,
    ),
    "deepseek": (
        {"top_k": 2, "num_shared_experts": 1, "router_options": {"device_groups": 2}},
        None,
    ),
    "deepseek_threshold": (
        {"num_shared_experts": 1, "router_options": {"device_groups": 2}},
        None,
    ),
    "null_topk": ({"top_k": 3, "router_options": {"num_null": 2}}, None),
    "null_threshold": ({"router_options": {"num_null": 2}}, None),
    "expert_choice": ({"capacity_factor": 2.0, "router_options": {"eval_rule": "topk"}}, None),
    "sigmoid": ({"capacity_factor": 1.0, "min_capacity": 1}, None),
    "smoe_dropout": ({"top_k": 2, "router_options": {"k_start": 1, "grow_steps": 4}}, None),
    "thor": ({"router_options": {"inference": "ensemble"}}, None),
    "moepp": (
        {
            "num_experts": 8,
            "top_k": 2,
            "renormalize": True,
            "experts": "moepp",
            "expert_options": {"constant_experts": 1, "copy_experts": 1, "zero_experts": 1},
        },
        8,  # the previous layer's logits, one per expert
    ),
    "recurrent": ({"top_k": 2, "router_options": {"state_dim": 4}}, 4),
    "recurrent_threshold": ({"router_options": {"state_dim": 4}}, 4),
}

NAMES = sorted(ROUTERS)


def _fields(name: str) -> tuple[dict, int | None]:
    if name not in SMALL_CONFIGS:
        pytest.fail(
            f"router {name!r} is registered in xmoe.registry.ROUTERS but has no entry in "
            "SMALL_CONFIGS of tests/routing/test_conformance.py: add a small config valid for it"
        )
    fields, state_width = SMALL_CONFIGS[name]
    return {**BASE, "router": name, **fields}, state_width


def _config(name: str, **changes) -> tuple[MoEConfig, int | None]:
    fields, state_width = _fields(name)
    return MoEConfig(**{**fields, **changes}), state_width


def test_the_table_names_only_registered_routers():
    assert sorted(set(SMALL_CONFIGS) - set(ROUTERS)) == []


def test_a_router_missing_from_the_table_fails_naming_it(monkeypatch):
    register_for_test(monkeypatch, ROUTERS, "unlisted", ROUTERS["topk"])
    with pytest.raises(pytest.fail.Exception, match=r"router 'unlisted' is registered .* add a"):
        _config("unlisted")


@pytest.mark.parametrize("name", NAMES)
def test_every_engine_agrees_with_loop(name):
    """Training mode: outputs and every gradient (router, experts, input) of each engine."""
    config, state_width = _config(name)
    torch.manual_seed(1)
    assert_engines_agree(config, state_width)


@pytest.mark.parametrize("name", NAMES)
def test_decoding_one_token_equals_the_batched_call(monkeypatch, name):
    """Eval mode, no autograd: each token alone (the decode path where the experts are FFN
    experts) gives its row of the batched call, its experts and its next routing state."""
    calls = decode_calls_of(monkeypatch)
    config, state_width = _config(name)
    layer = make_layer(config, seed=2).eval()
    torch.manual_seed(3)
    x = torch.randn(6, config.d_model, dtype=torch.float64)
    state = None if state_width is None else torch.randn(6, state_width, dtype=torch.float64)
    with torch.no_grad():
        batched = layer(x, state)
        assert calls == []  # the batched call takes the plan path
        for s in range(6):
            one = layer(x[s : s + 1], None if state is None else state[s : s + 1])
            torch.testing.assert_close(
                one.hidden_states[0], batched.hidden_states[s], rtol=1e-12, atol=1e-12
            )
            assert int(one.routing.kept_per_token[0]) == int(batched.routing.kept_per_token[s])
            if batched.state is not None:
                torch.testing.assert_close(one.state[0], batched.state[s], rtol=1e-12, atol=1e-12)
    assert len(calls) == (6 if isinstance(layer.experts, FFNExperts) else 0)


def _check_stats(out, config: MoEConfig) -> None:
    stats = out.routing
    summary = stats.summary()
    bad = {k: v for k, v in summary.items() if not (math.isfinite(v) and v >= 0)}
    assert not bad, bad
    assert summary["flops_per_token"] >= config.dense_flops - config.router_flops
    assert bool((stats.kept_per_token >= 0).all()) and bool((stats.expert_load >= 0).all())
    assert bool((stats.kept_per_token <= stats.wanted_per_token).all())
    assert int(stats.expert_load.sum()) == int(stats.kept_per_token.sum())
    assert math.isfinite(float(out.aux_loss.detach()))


@pytest.mark.parametrize("name", NAMES)
def test_statistics_are_finite_and_non_negative(name):
    """In training mode (capacity, losses) and in eval mode, on a call that leaves experts
    without tokens and on an empty call."""
    config, state_width = _config(name)
    layer = make_layer(config, seed=4)
    for num_tokens in (24, 2):
        x = torch.randn(num_tokens, config.d_model, dtype=torch.float64)
        state = None if state_width is None else torch.randn(num_tokens, state_width).double()
        _check_stats(layer.train()(x, state), config)
        with torch.no_grad():
            _check_stats(layer.eval()(x, state), config)


@pytest.mark.parametrize("name", NAMES)
def test_threshold_decides_exactly_when_the_threshold_changes_the_routing(name):
    """What ``xmoe reproduce`` sweeps t on: a router that says the threshold decides routes
    differently at t=0.3 and t=0.95; one with a threshold it ignores routes the same."""
    config, state_width = _config(name)
    layer = make_layer(config, seed=5).eval()
    x = torch.randn(64, config.d_model, dtype=torch.float64)
    state = None if state_width is None else torch.randn(64, state_width).double()

    def kept_at(threshold: float) -> torch.Tensor:
        if layer.router.uses_threshold:
            layer.router.set_threshold(threshold)
        with torch.no_grad():
            return layer(x, state).routing.kept_per_token

    changed = not torch.equal(kept_at(0.3), kept_at(0.95))
    assert changed == layer.router.threshold_decides()
    assert layer.router.uses_threshold or not layer.router.threshold_decides()


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_option_name_is_rejected_by_name(name):
    fields, _ = _fields(name)
    options = {**fields.get("router_options", {}), "no_such_option": 1}
    options_class = ROUTERS[name].Options.__name__
    message = rf"unknown {options_class} field\(s\) \['no_such_option'\]"
    with pytest.raises(ConfigError, match=message):
        MoEConfig(**{**fields, "router_options": options})


def test_an_unknown_router_is_rejected_by_name():
    with pytest.raises(ConfigError, match=r"router='no_such_router' is invalid: .*'topk'"):
        MoEConfig(**BASE, router="no_such_router")
