"""AdaMoE's null experts (``null_topk``: top-k, ``null_threshold``: XMoE's rule over true and null):
the per-token reference, m=0 as plain top-k, null picks costing nothing, more null mass giving
fewer true experts, named errors, and the model, trainer and transformers round trip."""

from __future__ import annotations

import pytest
import torch

from xmoe import ConfigError, MoEConfig, MoELayer
from xmoe.dispatch import ENGINES
from xmoe.routing.null import true_picks
from xmoe.routing.selection import Selection

from helpers import (
    check_against_reference,
    decode_calls_of,
    make_layer,
    train_then_round_trip,
    use_host_reads,
)
from reference import layer_params, reference_forward

CASES = [
    # (router, num_null, capacity_factor, num_tokens, extra config)
    ("null_topk", 4, None, 40, {"top_k": 3}),
    ("null_topk", 4, 1.0, 40, {"top_k": 3}),  # over-subscribed experts drop pairs
    ("null_topk", 3, 0.5, 30, {"top_k": 4, "min_capacity": 1, "renormalize": True}),
    ("null_topk", 6, None, 1, {"top_k": 2}),
    ("null_topk", 2, None, 20, {"top_k": 12}),  # k = n + m: every true expert, renormalised
    ("null_threshold", 4, None, 40, {"threshold": 0.8}),
    ("null_threshold", 4, 1.0, 40, {"threshold": 0.6}),
    ("null_threshold", 2, None, 1, {}),
    ("null_threshold", 5, None, 12, {"threshold": 1.0}),
]


def _layer(router, num_null, dtype=torch.float64, seed=0, **extra) -> MoELayer:
    config = MoEConfig(
        d_model=12, num_experts=10, d_expert=6, router=router,
        router_options={"num_null": num_null}, **extra,
    )  # fmt: skip
    return make_layer(config, dtype=dtype, seed=seed)


@pytest.mark.parametrize("path", ["auto", "sync_free", "loop"])
@pytest.mark.parametrize("router,num_null,capacity_factor,num_tokens,extra", CASES)
def test_matches_reference_float64(
    monkeypatch, router, num_null, capacity_factor, num_tokens, extra, path
):
    use_host_reads(monkeypatch, path != "sync_free")
    backend = "loop" if path == "loop" else "auto"
    layer = _layer(
        router, num_null, seed=num_tokens, capacity_factor=capacity_factor, backend=backend,
        **extra,
    )  # fmt: skip
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    check_against_reference(layer, x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("router", ["null_topk", "null_threshold"])
def test_ties_between_true_and_null_experts_go_to_the_lower_id(router):
    """Every null row copies a true row: each null expert ties a true one, which ranks first
    (the lower id); a capacity overflow and an expert no token picks are exercised too."""
    layer = _layer(router, 3, seed=2, top_k=3, threshold=0.7, capacity_factor=1.0, min_capacity=1)
    with torch.no_grad():
        layer.router.weight[10:] = layer.router.weight[[4, 7, 9]]
    x = torch.randn(6, 12, dtype=torch.float64)
    out = check_against_reference(layer, x, rtol=1e-10, atol=1e-12)
    assert float(out.routing.drop_fraction) > 0
    assert (out.routing.expert_load == 0).any()


@pytest.mark.parametrize("router", ["null_topk", "null_threshold"])
def test_one_token_inference_takes_the_decode_path(monkeypatch, router):
    decode_calls = decode_calls_of(monkeypatch)
    layer = _layer(router, 4, top_k=3).eval()
    x = torch.randn(1, 12, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
    assert decode_calls == [1]
    expected = reference_forward(layer.config, layer_params(layer), x).hidden_states
    torch.testing.assert_close(out.hidden_states, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("host_reads", [True, False], ids=["host", "sync_free"])
@pytest.mark.parametrize("backend", sorted(ENGINES))
@pytest.mark.parametrize("router", ["null_topk", "null_threshold"])
def test_fp32_engines_match_reference(monkeypatch, router, backend, host_reads):
    use_host_reads(monkeypatch, host_reads)
    config = MoEConfig(
        d_model=16, num_experts=12, d_expert=8, router=router, top_k=4, threshold=0.8,
        router_options={"num_null": 4}, backend=backend, capacity_factor=1.5,
    )  # fmt: skip
    layer = make_layer(config, dtype=torch.float32, seed=7)
    out = check_against_reference(layer, torch.randn(64, 16), rtol=1e-4, atol=1e-5)
    assert out.hidden_states.dtype == torch.float32


def _run(config: MoEConfig, x: torch.Tensor):
    """Output and the gradients of x and every parameter, of one training call."""
    layer = make_layer(config, seed=4)
    x_in = x.clone().requires_grad_(True)
    out = layer(x_in)
    (out.hidden_states.square().sum() + out.aux_loss).backward()
    return out, [x_in.grad, *(p.grad for p in layer.parameters())]


@pytest.mark.parametrize(
    ("null", "plain"), [("null_topk", "topk"), ("null_threshold", "threshold")]
)
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_no_null_experts_is_the_plain_rule_renormalised(null, plain, capacity_factor):
    """m = 0: the same router weights (same seed), outputs, losses, statistics and gradients
    as the plain rule with the kept weights renormalised (Mixtral's top-k, AdaMoE's base):
    bit for bit dropless; under capacity, where only ``renormalize`` renormalises after the
    drops, to rounding."""
    common = {"d_model": 12, "num_experts": 8, "d_expert": 6, "top_k": 3, "threshold": 0.7}
    common["capacity_factor"] = capacity_factor
    x = torch.randn(25, 12, dtype=torch.float64)
    dropless = capacity_factor is None
    got, got_grads = _run(
        MoEConfig(**common, router=null, router_options={"num_null": 0}, renormalize=not dropless),
        x,
    )
    want, want_grads = _run(MoEConfig(**common, router=plain, renormalize=True), x)
    tolerance = {"rtol": 0, "atol": 0} if dropless else {"rtol": 1e-12, "atol": 1e-14}
    torch.testing.assert_close(got.hidden_states, want.hidden_states, **tolerance)
    assert got.aux_losses.keys() == want.aux_losses.keys()
    torch.testing.assert_close(got.aux_loss, want.aux_loss, **tolerance)
    assert got.routing.summary() == want.routing.summary()
    assert dropless or float(got.routing.drop_fraction) > 0
    for mine, theirs in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(mine, theirs, **tolerance)


def test_null_picks_cost_nothing_and_output_zero():
    layer = _layer("null_topk", 6, top_k=2).eval()
    with torch.no_grad():
        layer.router.weight[10:] *= 10.0  # null experts win most tokens
    x = torch.randn(50, 12, dtype=torch.float64)
    out = layer(x)
    kept_S = out.routing.kept_per_token
    assert (kept_S == 0).any() and (kept_S > 0).any()
    assert torch.equal(out.hidden_states[kept_S == 0], torch.zeros(int((kept_S == 0).sum()), 12))
    config = layer.config
    expected = float(kept_S.sum()) / 50 * config.expert_flops + 2 * 12 * (10 + 6)
    assert float(out.routing.flops_per_token) == pytest.approx(expected)
    assert config.router_flops == 2 * 12 * 16  # the router ranks the null experts too
    assert int(out.routing.expert_load.sum()) == int(kept_S.sum())  # no pair for a null pick
    assert int(out.routing.top1_load.sum()) < 50  # tokens whose top-1 is null load no expert
    assert float(out.routing.top1_drop_fraction) == 0.0


def test_true_picks_renormalise_over_true_experts_only():
    """Per token: ids 0-1 true, 2-3 null; weights are the true picks' share of their sum."""
    expert_idx_SK = torch.tensor([[2, 0, 1], [0, 3, 2], [3, 2, 1]])
    probs_SK = torch.tensor([[0.5, 0.3, 0.1], [0.6, 0.3, 0.1], [0.4, 0.3, 0.2]])
    ranked = Selection(expert_idx_SK, probs_SK, torch.ones(3, 3, dtype=torch.bool), probs_SK)
    picks = true_picks(ranked, num_true=2)
    wanted = [[False, True, True], [True, False, False], [False, False, True]]
    assert picks.wanted_SK.tolist() == wanted
    torch.testing.assert_close(
        picks.weight_SK, torch.tensor([[0.0, 0.75, 0.25], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    )
    assert torch.equal(picks.probs_SK, probs_SK)  # capacity priority and losses read these


def _true_experts_per_token(layer, logits_SE, null_shift):
    shifted_SE = logits_SE.clone()
    shifted_SE[:, layer.config.num_experts :] += null_shift
    return layer.router.select(shifted_SE.softmax(dim=-1)).wanted_SK.sum(dim=1)


def test_more_null_mass_means_fewer_true_experts():
    """Top-k: raising the null logits moves null experts up each token's ranking, so no
    token gains a true expert. Threshold: a token may (its null mass can come from below the
    cut), but the mean falls."""
    logits_SE = torch.randn(400, 16, dtype=torch.float64) * 2.0
    shifts = (-3.0, 0.0, 1.0, 3.0)
    topk = _layer("null_topk", 6, top_k=4)
    counts = [_true_experts_per_token(topk, logits_SE, shift) for shift in shifts]
    for fewer, more in zip(counts[1:], counts, strict=False):
        assert bool((fewer <= more).all()) and fewer.sum() < more.sum()
    threshold = _layer("null_threshold", 6, threshold=0.8)
    means = [_true_experts_per_token(threshold, logits_SE, s).double().mean() for s in shifts]
    assert means == sorted(means, reverse=True) and means[-1] < means[0] - 1


def test_balance_loss_counts_null_experts():
    """The Switch loss over all n + m: with every token's top-1 a null expert, the null share
    carries the loss."""
    layer = _layer("null_topk", 2, top_k=2)
    probs_SE = torch.full((4, 12), 0.05, dtype=torch.float64)
    probs_SE[:, 11] = 0.5
    losses = layer.router.losses(probs_SE, layer.router.select(probs_SE))
    expected = layer.config.aux_loss_coef * 12 * 0.5  # E' · P_null · f_null (f_null = 1)
    torch.testing.assert_close(losses["balance"], torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    ("router", "extra", "fragment"),
    [
        ("null_topk", {"router_options": {"num_null": -1}}, r"router_options\.num_null=-1"),
        ("null_topk", {"router_options": {"num_null": 1.5}}, r"router_options\.num_null=1\.5"),
        ("null_topk", {"router_options": {"num_null": 2}, "top_k": 9}, r"top_k=9 .*6 \+ 2\]"),
        (
            "null_threshold",
            {"router_options": {"num_null": 2, "logit_scale": 1.0, "target_experts": 2.0}},
            r"router_options\.target_experts=2\.0 .*null_threshold",
        ),
        ("null_topk", {"router_options": {"logit_scale": 1.0}}, "unknown NullTopKOptions field"),
    ],
)
def test_bad_options_are_named(router, extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        MoEConfig(d_model=8, num_experts=6, d_expert=4, router=router, **extra)


def test_tunables_bounded_by_true_and_null_experts():
    layer = _layer("null_topk", 2, top_k=2)
    layer.router.set_top_k(12)
    assert layer.tunables()["top_k"] == 12
    with pytest.raises(ConfigError, match=r"^top_k=13 is invalid: .*10 \+ 2\]"):
        layer.router.set_top_k(13)
    threshold = _layer("null_threshold", 2)
    assert threshold.router.uses_threshold
    threshold.router.set_threshold(0.5)
    assert threshold.tunables()["threshold"] == 0.5
    assert "num_null=2" in repr(layer)


@pytest.mark.parametrize("router", ["null_topk", "null_threshold"])
def test_trains_and_round_trips_through_transformers(tmp_path, router):
    pytest.importorskip("transformers")
    overrides = {"router": router, "router_options.num_null": 2, "top_k": 3}
    train_then_round_trip(tmp_path, overrides)
