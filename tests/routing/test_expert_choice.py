"""Expert-choice routing: the per-expert reference, exact balance by construction, tokens with
no expert, the eval-mode top-k rule and the named error for calls too small to route, and the
model, trainer and transformers round trip."""

from __future__ import annotations

import pytest
import torch

from xmoe import ConfigError, MoEConfig
from xmoe.dispatch import ENGINES
from xmoe.routing.expert_choice import expert_choice_mask

from helpers import (
    check_against_reference,
    decode_calls_of,
    make_layer,
    train_then_round_trip,
    use_host_reads,
)

CASES = [
    # (capacity_factor, num_tokens, extra config)
    (2.0, 40, {"min_capacity": 1}),  # C = 8 of 40 tokens per expert
    (1.0, 40, {"min_capacity": 1, "renormalize": True}),
    (1.5, 7, {}),  # C = min_capacity = 4 of 7
    (10.0, 1, {}),  # one token, C = 1: every expert takes it
    (0.5, 30, {"min_capacity": 1, "activation": "swiglu"}),  # C = 2: most tokens get none
]


def _layer(capacity_factor, dtype=torch.float64, seed=0, **extra):
    config = MoEConfig(
        d_model=12, num_experts=10, d_expert=6, router="expert_choice",
        capacity_factor=capacity_factor, **extra,
    )  # fmt: skip
    return make_layer(config, dtype=dtype, seed=seed)


@pytest.mark.parametrize("path", ["auto", "sync_free", "loop"])
@pytest.mark.parametrize("capacity_factor,num_tokens,extra", CASES)
def test_matches_reference_float64(monkeypatch, capacity_factor, num_tokens, extra, path):
    use_host_reads(monkeypatch, path != "sync_free")
    backend = "loop" if path == "loop" else "auto"
    layer = _layer(capacity_factor, seed=num_tokens, backend=backend, **extra)
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    out = check_against_reference(layer, x, rtol=1e-10, atol=1e-12)
    assert out.aux_losses == {}  # balanced by construction: no balance loss


def test_ties_go_to_the_lower_token_index():
    """Identical tokens tie in every expert's ranking: the earlier ones are taken."""
    layer = _layer(1.0, min_capacity=1)
    x = torch.randn(20, 12, dtype=torch.float64)
    x[10:] = x[0]  # tokens 0 and 10..19 are the same token
    check_against_reference(layer, x, rtol=1e-10, atol=1e-12)
    chosen = expert_choice_mask(layer.router.probabilities(x), capacity=2)
    assert not chosen[11:].any()  # token 0 then token 10 win every tie


@pytest.mark.parametrize("host_reads", [True, False], ids=["host", "sync_free"])
@pytest.mark.parametrize("backend", sorted(ENGINES))
def test_fp32_engines_match_reference(monkeypatch, backend, host_reads):
    use_host_reads(monkeypatch, host_reads)
    config = MoEConfig(
        d_model=16, num_experts=12, d_expert=8, router="expert_choice", capacity_factor=2.0,
        min_capacity=1, backend=backend,
    )  # fmt: skip
    layer = make_layer(config, dtype=torch.float32, seed=7)
    out = check_against_reference(layer, torch.randn(64, 16), rtol=1e-4, atol=1e-5)
    assert out.hidden_states.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0, 4.0])
def test_every_expert_takes_exactly_c_tokens(capacity_factor, training):
    layer = _layer(capacity_factor, min_capacity=1).train(training)
    out = layer(torch.randn(40, 12, dtype=torch.float64))
    capacity = int(40 * capacity_factor / 10)
    assert out.routing.expert_load.tolist() == [capacity] * 10
    assert out.routing.experts_per_token == pytest.approx(capacity_factor)
    assert float(out.routing.drop_fraction) == 0.0


def test_a_token_no_expert_takes_outputs_zero():
    layer = _layer(0.5, min_capacity=1)
    x = torch.randn(30, 12, dtype=torch.float64)
    out = layer(x)
    none_S = out.routing.kept_per_token == 0
    assert none_S.any() and (~none_S).any()
    assert torch.equal(out.hidden_states[none_S], torch.zeros(int(none_S.sum()), 12))
    assert float(out.routing.top1_drop_fraction) == 0.0  # not taken is not dropped


def test_eval_rule_topk_routes_each_token_alone(monkeypatch):
    """Eval mode with ``eval_rule="topk"``: the round(γ) most probable experts of each token,
    as the top-k router with the same weights; a single token is routed; training keeps
    expert choice."""
    layer = _layer(2.5, router_options={"eval_rule": "topk"}).eval()
    topk = make_layer(MoEConfig(d_model=12, num_experts=10, d_expert=6, router="topk", top_k=3))
    topk.load_state_dict(layer.state_dict())
    x = torch.randn(9, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x).hidden_states, topk.eval()(x).hidden_states)
    decode_calls = decode_calls_of(monkeypatch)
    with torch.no_grad():
        one = layer(x[:1])
    assert decode_calls == [1]  # one token, no gradient: the decode path
    torch.testing.assert_close(one.hidden_states, topk(x[:1]).hidden_states)
    assert one.routing.kept_per_token.tolist() == [3]
    trained = layer.train()(torch.randn(40, 12, dtype=torch.float64))
    assert trained.routing.expert_load.tolist() == [10] * 10


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_too_small_a_call_is_a_named_error(training):
    layer = _layer(2.0).train(training)
    with pytest.raises(ValueError, match=r"S=4 tokens: .*2\.0 · 4 / 10 >= 1 .*eval_rule='topk'"):
        layer(torch.randn(4, 12, dtype=torch.float64))
    assert layer(torch.randn(0, 12, dtype=torch.float64)).hidden_states.shape == (0, 12)
    layer(torch.randn(5, 12, dtype=torch.float64))  # 2 · 5 / 10 = 1 token per expert


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({}, r"^capacity_factor=None is invalid: .*router='expert_choice'"),
        (
            {"capacity_factor": 1.0, "router_options": {"eval_rule": "x"}},
            "router_options.eval_rule",
        ),
        (
            {"capacity_factor": 1.0, "router_options": {"num_null": 1}},
            "unknown ExpertChoiceOptions",
        ),
    ],
)
def test_bad_options_are_named(extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        MoEConfig(d_model=8, num_experts=4, d_expert=4, router="expert_choice", **extra)


def test_router_losses_but_balance_still_apply():
    layer = _layer(1.0, router_options={"entropy_coef": 0.1, "z_loss_coef": 0.01})
    out = layer(torch.randn(20, 12, dtype=torch.float64))
    assert out.aux_losses.keys() == {"entropy", "z"}


def test_trains_and_round_trips_through_transformers(tmp_path):
    pytest.importorskip("transformers")
    overrides = {"router": "expert_choice", "router_options.eval_rule": "topk"}
    train_then_round_trip(tmp_path, overrides)
