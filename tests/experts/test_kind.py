"""Expert kinds: the registry, ``ExpertWeights``, shared experts and a heterogeneous pool."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from xmoe import ConfigError, MoEConfig, MoELayer
from xmoe.dispatch import DispatchPlan
from xmoe.distributed.sharding import expert_parameter_names
from xmoe.experts import ExpertKind, ExpertWeights, FFNExperts
from xmoe.registry import EXPERT_KINDS

from helpers import make_layer, register_for_test, use_host_reads
from reference import _expert, layer_params, reference_forward

BASE = dict(d_model=12, num_experts=6, d_expert=5)


def test_ffn_is_the_default_kind_and_bad_kinds_are_named():
    assert EXPERT_KINDS["ffn"] is FFNExperts
    layer = MoELayer(MoEConfig(**BASE))
    assert type(layer.experts) is FFNExperts and layer.shared_experts is None
    with pytest.raises(ConfigError, match=r"experts='moe\+\+' is invalid: .*one of \[.*'ffn'"):
        MoEConfig(**BASE, experts="moe++")
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=r"num_shared_experts=.* an integer >= 0"):
            MoEConfig(**BASE, num_shared_experts=bad)


def test_expert_weights_slice_cast_and_check_width():
    experts = FFNExperts(MoEConfig(**BASE, activation="swiglu"))
    weights = experts.weights()
    assert weights.w1 is experts.w1 and weights.to(torch.float32) is weights
    part = weights.slice(slice(2, 4))
    assert part.w1.shape == (2, 12, 10) and part.b2.shape == (2, 12)
    assert part.to(torch.float64).w2.dtype == torch.float64
    with pytest.raises(ValueError, match=r"activation='swiglu'.* must be 10 wide"):
        ExpertWeights(experts.w1[..., :5], None, experts.w2, None, "swiglu")


def test_no_shared_experts_keeps_todays_parameters_and_flops():
    layer = MoELayer(MoEConfig(**BASE))
    assert set(layer.state_dict()) == {
        "router.weight",
        "experts.w1",
        "experts.b1",
        "experts.w2",
        "experts.b2",
    }
    out = layer(torch.randn(9, 12))
    pairs = int(out.routing.kept_per_token.sum())
    expected = (pairs * layer.config.expert_flops) / 9 + layer.config.router_flops
    assert float(out.routing.flops_per_token) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("num_tokens,backend", [(9, "auto"), (1, "auto"), (9, "loop")])
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("swiglu", False)])
def test_shared_experts_match_per_token_reference(num_tokens, backend, activation, bias):
    """Every token passes through every shared expert unweighted, on top of its routed experts,
    with and without autograd (one token at ``auto`` without it takes the decode path);
    gradients reach the shared weights; each token's shared FLOPs are counted."""
    config = MoEConfig(
        **BASE, activation=activation, bias=bias, backend=backend, num_shared_experts=2
    )
    layer = make_layer(config, seed=num_tokens)
    with torch.no_grad():
        for param in layer.shared_experts.parameters():
            param.normal_(0.0, 0.3)
    params = layer_params(layer)
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    x_ref = x.clone().requires_grad_(True)
    # the routed experts alone, plus the shared ones written out here
    ref = reference_forward(dataclasses.replace(config, num_shared_experts=0), params, x_ref)
    shared = {
        name.replace("shared_experts.", "experts."): p
        for name, p in params.items()
        if name.startswith("shared_experts.")
    }
    shared_SD = torch.stack(
        [sum(_expert(shared, config, j, x_ref[s]) for j in range(2)) for s in range(num_tokens)]
    )
    expected = ref.hidden_states + shared_SD
    full = reference_forward(config, params, x.clone())  # the reference counts them too
    torch.testing.assert_close(full.hidden_states, expected.detach(), rtol=1e-12, atol=1e-12)

    x_layer = x.clone().requires_grad_(True)
    out = layer(x_layer)
    torch.testing.assert_close(out.hidden_states, expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        inference = layer(x).hidden_states
    torch.testing.assert_close(inference, expected.detach(), rtol=1e-10, atol=1e-12)

    cotangent = torch.randn_like(expected)
    (expected * cotangent).sum().backward()
    (out.hidden_states * cotangent).sum().backward()
    torch.testing.assert_close(x_layer.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for name, param in layer.shared_experts.named_parameters():
        ref_grad = params[f"shared_experts.{name}"].grad
        torch.testing.assert_close(param.grad, ref_grad, rtol=1e-10, atol=1e-12)
    shared_flops = 2 * config.expert_flops
    assert float(out.routing.flops_per_token) == pytest.approx(ref.flops_per_token + shared_flops)
    assert full.flops_per_token == pytest.approx(ref.flops_per_token + shared_flops)


def test_shared_experts_stay_whole_under_expert_parallelism():
    layer = MoELayer(MoEConfig(**BASE, num_shared_experts=1))
    assert expert_parameter_names(layer) == [
        "experts.w1",
        "experts.w2",
        "experts.b1",
        "experts.b2",
    ]


class _FFNPlusZero(ExpertKind):
    """A test-only kind, one file's worth: a heterogeneous pool whose first half are FFN
    experts and second half zero experts (MoE++): a pair routed to a zero expert outputs 0 and
    costs no FLOPs."""

    def __init__(self, config: MoEConfig, num_experts: int | None = None) -> None:
        super().__init__(config, num_experts)
        self.num_ffn = self.num_experts // 2
        self.ffn = FFNExperts(config, self.num_ffn)

    def reset_parameters(self) -> None:
        self.ffn.reset_parameters()

    def flops_per_pair_E(self) -> torch.Tensor:
        zeros = torch.zeros(self.num_experts - self.num_ffn, dtype=torch.int64)
        return torch.cat([self.ffn.flops_per_pair_E(), zeros])

    def forward(self, x_SD, plan, weight_N):
        keep_N = plan.expert_idx_N < self.num_ffn  # the FFN experts' rows, in plan order
        ffn_plan = DispatchPlan(
            plan.token_idx_N[keep_N],
            plan.expert_idx_N[keep_N],
            plan.counts_E[: self.num_ffn],
            plan.num_tokens,
            plan.sorted_by_expert,
        )
        return self.ffn(x_SD, ffn_plan, weight_N[keep_N])


@pytest.mark.parametrize("backend,host_reads", [("auto", True), ("loop", True), ("auto", False)])
def test_a_registered_heterogeneous_pool(monkeypatch, backend, host_reads):
    """One class plus one registry entry: FFN experts beside zero experts equal an FFN layer
    whose zero experts have all-zero weights, in outputs and gradients, and the statistics
    count 0 FLOPs for the pairs routed to the zero experts."""
    use_host_reads(monkeypatch, host_reads)
    register_for_test(monkeypatch, EXPERT_KINDS, "ffn_plus_zero", _FFNPlusZero)
    config = MoEConfig(**BASE, router="topk", top_k=3, backend=backend, experts="ffn_plus_zero")
    pool = make_layer(config, seed=2)
    assert pool.experts.sharded_parameters() == ["ffn.w1", "ffn.w2", "ffn.b1", "ffn.b2"]
    plain = make_layer(dataclasses.replace(config, experts="ffn"), seed=2)
    with torch.no_grad():
        plain.router.weight.copy_(pool.router.weight)
        for name, param in plain.experts.named_parameters():
            param.zero_()[:3] = getattr(pool.experts.ffn, name)

    x = torch.randn(20, 12, dtype=torch.float64)
    out, want = pool(x), plain(x)
    torch.testing.assert_close(out.hidden_states, want.hidden_states, rtol=1e-12, atol=1e-12)
    (out.hidden_states.sum() + want.hidden_states.sum()).backward()
    for name, param in pool.experts.ffn.named_parameters():
        grad = getattr(plain.experts, name).grad[:3]
        torch.testing.assert_close(param.grad, grad, rtol=1e-12, atol=1e-12)

    load = out.routing.expert_load
    assert load.tolist() == want.routing.expert_load.tolist() and int(load[3:].sum()) > 0
    ffn_pairs = int(load[:3].sum())
    expected = (ffn_pairs * config.expert_flops) / 20 + config.router_flops
    assert float(out.routing.flops_per_token) == pytest.approx(expected)
    assert float(out.routing.flops_per_token) < float(want.routing.flops_per_token)
