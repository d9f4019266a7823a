"""MoE++ (router "moepp", expert kind "moepp"): zero/copy/constant experts beside FFN experts,
the gating residual over depth and the heterogeneous balance loss."""

from __future__ import annotations

import itertools

import pytest
import torch

from xmoe import ConfigError, MoEConfig, MoELayer
from xmoe.distributed.sharding import expert_parameter_names
from xmoe.models import TransformerLM
from xmoe.training.config import apply_overrides
from xmoe.training.step import StepLoss, train_step

from helpers import assert_engines_agree, compare_with_reference, hf_tiny_round_trip, make_layer
from reference import _expert, layer_params

POOL = {"constant_experts": 2, "copy_experts": 1, "zero_experts": 1}
BASE = dict(d_model=12, num_experts=8, d_expert=5, top_k=2)


def _pool_config(**overrides) -> MoEConfig:
    values = {**BASE, "router": "moepp", "experts": "moepp", "expert_options": POOL}
    return MoEConfig(**{**values, **overrides})


@pytest.mark.parametrize("backend", ["auto", "loop", "batched"])
@pytest.mark.parametrize(
    "num_tokens,capacity_factor,with_state",
    [(11, None, True), (11, 1.0, True), (1, None, True), (7, None, False)],
)
def test_moepp_matches_per_token_reference(backend, num_tokens, capacity_factor, with_state):
    """Fresh random inputs through a pool of FFN, constant, copy and zero experts, top-2 with
    renormalised weights (the MoE++ setting): overflowing capacity, one token, an expert left
    without tokens, with and without the previous layer's logits."""
    config = _pool_config(
        backend=backend, capacity_factor=capacity_factor, min_capacity=1, renormalize=True
    )
    layer = make_layer(config, seed=num_tokens)
    torch.manual_seed(10 + num_tokens)
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    state = torch.randn(num_tokens, 8, dtype=torch.float64) if with_state else None
    out, ref = compare_with_reference(layer, x, state)
    load = out.routing.expert_load.tolist()
    assert load == [sum(e == i for row in ref.kept for e in row) for i in range(8)]
    if num_tokens > 1:
        roles = config.expert_options.roles(8)
        assert len({roles[e] for row in ref.kept for e in row}) > 1  # kinds mix in the call


def test_ties_and_a_zero_expert_renormalised():
    """All probabilities equal (a zero router, no state): ties go to the lower expert id; a
    token whose top-2 holds a zero expert gives its whole weight to the other expert."""
    zeros = {"constant_experts": 0, "copy_experts": 0, "zero_experts": 5}
    config = _pool_config(renormalize=True, expert_options=zeros)
    layer = make_layer(config, seed=3)
    with torch.no_grad():
        layer.router.weight.zero_()
    x = torch.randn(5, 12, dtype=torch.float64)
    _, ref = compare_with_reference(layer, x, None)
    assert ref.wanted == [[0, 1]] * 5
    with torch.no_grad():  # expert 7, a zero expert, first for every token
        layer.router.weight[7, 0] = 50.0
    x[:, 0] = 1.0
    out, ref = compare_with_reference(layer, x, None)
    assert ref.wanted == [[7, 0]] * 5
    ffn = {n.replace("experts.ffn.", "experts."): p for n, p in layer_params(layer).items()}
    alone = torch.stack([_expert(ffn, config, 0, x[s]) for s in range(5)])
    torch.testing.assert_close(out.hidden_states, alone, rtol=1e-10, atol=1e-12)


def _copy_weights(source: MoELayer, target: MoELayer) -> None:
    with torch.no_grad():
        target.router.weight.copy_(source.router.weight)
        ffn = getattr(source.experts, "ffn", source.experts)
        for name, param in getattr(target.experts, "ffn", target.experts).named_parameters():
            param.copy_(getattr(ffn, name))


@pytest.mark.parametrize("pool", ["ffn", "moepp"])
def test_no_zero_computation_experts_and_g0_is_topk_exactly(pool):
    """A pool of FFN experts only (a plain one, or MoE++'s with every count 0) and G = 0 gives
    top-k's outputs, losses, statistics and gradients bit for bit, whatever the state."""
    empty = {"constant_experts": 0, "copy_experts": 0, "zero_experts": 0}
    options = empty if pool == "moepp" else None
    moepp = make_layer(
        MoEConfig(**BASE, router="moepp", experts=pool, expert_options=options), dtype=torch.float32
    )
    topk = make_layer(MoEConfig(**BASE, router="topk"), dtype=torch.float32)
    _copy_weights(moepp, topk)
    with torch.no_grad():
        moepp.router.gate_map.zero_()
    x = torch.randn(16, 12)
    state = torch.randn(16, 8)
    got, want = moepp(x, state), topk(x)
    assert torch.equal(got.hidden_states, want.hidden_states)
    assert got.aux_losses.keys() == want.aux_losses.keys()
    for name, value in want.aux_losses.items():
        assert torch.equal(got.aux_losses[name], value), name
    assert got.routing.expert_load.tolist() == want.routing.expert_load.tolist()
    (got.hidden_states.sum() + got.aux_loss).backward()
    (want.hidden_states.sum() + want.aux_loss).backward()
    assert torch.equal(moepp.router.weight.grad, topk.router.weight.grad)
    for name, param in getattr(moepp.experts, "ffn", moepp.experts).named_parameters():
        assert torch.equal(param.grad, getattr(topk.experts, name).grad), name


def test_every_engine_agrees():
    config = _pool_config(d_model=16, d_expert=8, capacity_factor=1.0, renormalize=True)
    assert_engines_agree(config, 8)


def test_flops_count_zero_and_copy_as_nothing_and_constant_as_order_d():
    config = _pool_config()
    layer = MoELayer(config)
    flops_E = layer.experts.flops_per_pair_E().tolist()
    assert flops_E == [config.expert_flops] * 4 + [4 * 12] * 2 + [0, 0]
    # the router counts its E x E gating map beside its (E, D) one
    assert layer.router.flops_per_token() == 2 * 12 * 8 + 2 * 8 * 8
    no_residual = MoELayer(_pool_config(router_options={"gating_residual": False}))
    assert no_residual.router.gate_map is None
    assert no_residual.router.flops_per_token() == config.router_flops


def test_tau_weights_the_zero_computation_experts_in_the_balance_loss():
    """τ scales only the zero-computation experts' terms: the loss is linear in τ, and τ = 1
    is the plain load balance loss over all k selections (DeepSeekMoE's expert-level one)."""
    x = torch.randn(40, 12, dtype=torch.float64)
    losses = {}
    for tau in (0.0, 0.5, 1.0):
        layer = make_layer(_pool_config(router_options={"tau": tau}), seed=1)
        losses[tau] = float(layer(x).aux_losses["balance"].detach())
    plain = make_layer(_pool_config(router="deepseek"), seed=1)
    with torch.no_grad():
        plain.router.weight.copy_(layer.router.weight)
    plain_loss = float(plain(x).aux_losses["balance"].detach())
    assert losses[1.0] == pytest.approx(plain_loss, rel=1e-12)
    assert losses[0.5] == pytest.approx((losses[0.0] + losses[1.0]) / 2, rel=1e-12)
    assert losses[0.0] < losses[1.0]


def test_balance_loss_is_eq7_over_every_selected_pair():
    """MoE++'s Eq. 7 token by token in float64: ``α Σ_i η_i f_i P_i`` with f_i counting all k
    selections of every token (E/(kS) per pair: 1 when uniform), not only the top-1 choice;
    a pair dropped by capacity still counts, so the loss is the same with and without it."""
    tau, coef = 0.3, 0.7
    fields = dict(top_k=3, aux_loss_coef=coef, router_options={"tau": tau})
    x = torch.randn(13, 12, dtype=torch.float64)
    losses = {}
    for capacity_factor in (0.5, None):
        layer = make_layer(_pool_config(**fields, capacity_factor=capacity_factor), seed=4)
        routed = layer.route(x)
        assert routed.pairs.kept_SK.all() == (capacity_factor is None)  # 0.5 drops pairs
        losses[capacity_factor] = float(routed.losses["balance"].detach())
    probs = routed.probs_SE.detach()
    roles = layer.config.expert_options.roles(8)
    counts = [0] * 8
    for s in range(13):
        for e in sorted(range(8), key=lambda e, s=s: (-float(probs[s, e]), e))[:3]:
            counts[e] += 1
    want = coef * sum(
        (1.0 if roles[e] == "ffn" else tau) * (8 * counts[e] / (3 * 13)) * float(probs[:, e].mean())
        for e in range(8)
    )
    assert losses[None] == pytest.approx(want, rel=1e-12)
    assert losses[0.5] == pytest.approx(want, rel=1e-12)


def _zero_computation_share(tau: float, steps: int = 30) -> float:
    """Share of fresh tokens' (token, expert) pairs, all k = 2 per token, that go to
    zero-computation experts, after ``steps`` seeded Adam steps (the trainer's step) of a pool
    of 8 FFN + 4 zero-computation experts (MoE++'s 0.6B/(8+4)E) whose router fits the
    heterogeneous balance loss alone."""
    config = _pool_config(num_experts=12, aux_loss_coef=1.0, router_options={"tau": tau})
    layer = make_layer(config, seed=0, router_std=0.3)
    optimizer = torch.optim.Adam(layer.router.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(64, 12, dtype=torch.float64, generator=generator)
        train_step(layer, optimizer, [x], lambda x: StepLoss(layer(x).aux_loss))
    x = torch.randn(512, 12, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        expert_idx_SK = layer.route(x).pairs.selection.expert_idx_SK
    return float((expert_idx_SK >= 8).double().mean())


def test_a_smaller_tau_sends_more_tokens_to_zero_computation_experts():
    """τ's defining property (MoE++ §3.3: "a smaller τ means that more tokens are assigned to
    the zero-computation experts"): the balance loss settles where η_e·f_e is equal, so the
    zero-computation experts take N_ZC / (τ·N_FFN + N_ZC) of all (token, expert) pairs, the
    paper's Table 1 ratio: 2/3 at τ = 1/4, 1/3 at τ = 1 (measured 0.69 and 0.33; seeds 1-3
    gave up to 0.72 and 0.39)."""
    shares = {tau: _zero_computation_share(tau) for tau in (0.25, 1.0)}
    assert shares[0.25] == pytest.approx(4 / (0.25 * 8 + 4), abs=0.08)
    assert shares[1.0] == pytest.approx(4 / (1.0 * 8 + 4), abs=0.08)


def test_bad_options_are_named():
    cases = [
        (dict(expert_options={"zero_experts": -1}), r"expert_options\.zero_experts=-1 .* >= 0"),
        (dict(expert_options={"copy_experts": 1.5}), r"expert_options\.copy_experts=1\.5"),
        (
            dict(expert_options={"constant_experts": 6, "copy_experts": 1, "zero_experts": 1}),
            r"= 8 must be below num_experts=8",
        ),
        (dict(expert_options={"bogus": 1}), r"unknown MoEPPOptions field\(s\) \['bogus'\]"),
        (dict(router_options={"tau": -0.1}), r"router_options\.tau=-0\.1 .* >= 0"),
        (dict(router_options={"gating_residual": 1}), r"router_options\.gating_residual=1"),
        (dict(top_k=9), r"top_k=9 .* \[1, num_experts=8\]"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            _pool_config(**overrides)
    layer = MoELayer(_pool_config())
    with pytest.raises(ConfigError, match=r"experts='moepp' is invalid under expert parallel"):
        expert_parameter_names(layer)
    with pytest.raises(ValueError, match=r"state\.shape=\(3, 8\) .* must be 4"):
        layer(torch.randn(4, 12), torch.randn(3, 8))


def _tiny_lm(**moe) -> TransformerLM:
    from xmoe.models import ModelConfig

    config = ModelConfig(
        vocab_size=32,
        d_model=12,
        num_layers=4,
        num_heads=2,
        max_seq_len=16,
        d_ff=16,
        moe=_pool_config(**moe),
    )
    torch.manual_seed(0)
    return TransformerLM(config)


def test_the_model_threads_each_layers_logits_to_the_next(monkeypatch):
    """TransformerLM hands every MoE layer the previous MoE layer's logits (None to the
    first; the dense block between passes them on), and the gating residual makes layer 2's
    routing depend on layer 1's router."""
    model = _tiny_lm()
    seen = []
    forward = MoELayer.forward

    def spy(layer, x, state=None):
        out = forward(layer, x, state)
        seen.append((state, out.state))
        return out

    monkeypatch.setattr(MoELayer, "forward", spy)
    ids = torch.randint(0, 32, (2, 5))
    model(ids)
    assert len(seen) == 2 and seen[0][0] is None
    for (_, handed), (received, _) in itertools.pairwise(seen):
        assert received is handed and handed.shape == (10, 8)
    monkeypatch.setattr(MoELayer, "forward", forward)

    second = model.moe_layers[1]
    h = torch.randn(10, 12)
    with torch.no_grad():
        before = second.route(h, seen[0][1]).probs_SE
        without = second.route(h).probs_SE
    assert not torch.allclose(before, without)


def test_a_few_training_steps_of_a_tiny_model():
    """Loss and aux losses backpropagate into every router and pool parameter (the gating
    maps, the constant experts) and a few AdamW steps lower the training loss."""
    model = _tiny_lm(renormalize=True, capacity_factor=2.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 32, (4, 12))
    losses = []
    for _ in range(5):
        out = model(ids[:, :-1], ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        if not losses:
            for layer in model.moe_layers[1:]:  # the first MoE layer gets no residual
                assert layer.router.gate_map.grad.abs().sum() > 0
            for layer in model.moe_layers:
                assert layer.experts.constant.grad.abs().sum() > 0
                assert layer.experts.constant_gate.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        model.end_training_step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]


def test_overrides_switch_the_pool_and_set_its_counts():
    from tests.training.test_rundir import tiny_config

    pool = tiny_config(**{"moe.experts": "moepp", "moe.expert_options.zero_experts": 2})
    assert pool.model.moe.expert_options.roles(8)[-3:] == ("copy", "zero", "zero")
    plain = apply_overrides(pool, ["moe.experts=ffn"])  # the pool's counts do not carry over
    assert plain.model.moe.expert_options.to_dict() == {}


def test_hf_save_load_and_cached_generation(tmp_path):
    pytest.importorskip("transformers")
    moe = {"d_model": 16, "num_experts": 8, "d_expert": 8, "router": "moepp", "top_k": 2}
    hf_tiny_round_trip(tmp_path, moe | {"experts": "moepp", "renormalize": True}, router_std=1.0)
