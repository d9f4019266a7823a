"""DSMoE's sigmoid router: the per-token reference of its rule (gates, hard mask, straight-through
gradient, sparsity loss) on every dispatch path, a token with no open gate, and the sparsity
coefficient trading compute for quality in training."""

from __future__ import annotations

import pytest
import torch

from xmoe import ConfigError, MoEConfig
from xmoe.dispatch import ENGINES
from xmoe.routing.sigmoid import straight_through_mask

from helpers import assert_close_grads, make_layer, run_both, train_tiny_lm, use_host_reads
from reference import _expert, layer_params

CASES = [
    # (capacity_factor, num_tokens, extra config, router_options)
    (None, 40, {}, {}),
    (None, 1, {}, {}),
    (1.0, 40, {}, {"sparsity_coef": 0.5}),  # over-subscribed experts drop pairs
    (0.25, 40, {"min_capacity": 1}, {}),  # heavy overflow
    (None, 30, {"renormalize": True}, {"gate_threshold": 0.9}),  # many tokens with no gate open
    (None, 20, {}, {"gate_threshold": 0.1, "sparsity_coef": 0.0}),
]


def _config(capacity_factor=None, extra=None, options=None, **more) -> MoEConfig:
    return MoEConfig(
        d_model=12, num_experts=10, d_expert=6, router="sigmoid", capacity_factor=capacity_factor,
        router_options=options or {}, **(extra or {}), **more,
    )  # fmt: skip


@pytest.mark.parametrize("path", ["auto", "sync_free", "loop"])
@pytest.mark.parametrize("capacity_factor,num_tokens,extra,options", CASES)
def test_matches_reference_float64(monkeypatch, path, capacity_factor, num_tokens, extra, options):
    use_host_reads(monkeypatch, path != "sync_free")
    backend = "loop" if path == "loop" else "auto"
    config = _config(capacity_factor, extra, options, backend=backend)
    layer = make_layer(config, seed=num_tokens)
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    out, ref, layer_grads, ref_grads = run_both(layer, x)

    torch.testing.assert_close(out.hidden_states, ref.hidden_states, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-10, atol=1e-12)
    assert out.routing.wanted_per_token.tolist() == [len(w) for w in ref.wanted]
    assert out.routing.kept_per_token.tolist() == [len(k) for k in ref.kept]
    assert float(out.routing.flops_per_token) == pytest.approx(ref.flops_per_token)
    assert_close_grads(layer_grads, ref_grads, rtol=1e-9, atol=1e-11)


def test_cases_exercise_what_they_claim():
    """Tokens want different numbers of experts, capacity drops pairs (one token leaves
    experts empty), and τ=0.9 leaves tokens with no open gate (they keep their best expert)."""
    layer = make_layer(_config(0.25, {"min_capacity": 1}), seed=40)
    out = layer(torch.randn(40, 12, dtype=torch.float64))
    assert len(set(out.routing.wanted_per_token.tolist())) > 2
    assert float(out.routing.drop_fraction) > 0.5
    one = make_layer(_config(), seed=1)(torch.randn(1, 12, dtype=torch.float64))
    assert (one.routing.expert_load == 0).any()
    strict = make_layer(_config(options={"gate_threshold": 0.9}), seed=30)
    x = torch.randn(30, 12, dtype=torch.float64)
    gates = strict.router.probabilities(x)
    closed = (gates <= 0.9).all(dim=-1)
    assert closed.any() and not closed.all()


def test_a_token_with_no_open_gate_keeps_its_best_expert():
    layer = make_layer(_config(), seed=2)
    with torch.no_grad():
        layer.router.weight.copy_(-layer.router.weight.abs())  # every logit <= 0 on x > 0
    x = torch.rand(5, 12, dtype=torch.float64)
    selection = layer.router(x).selection
    gates = layer.router.probabilities(x)
    assert (gates < 0.5).all()
    assert selection.wanted_SK.sum(dim=1).tolist() == [1] * 5
    assert selection.expert_idx_SK[:, 0].tolist() == gates.argmax(dim=1).tolist()
    # it is combined with its gate (below τ), not dropped and not weighted 1
    torch.testing.assert_close(selection.weight_SK[:, 0], gates.max(dim=1).values)


def test_straight_through_mask_is_hard_forward_and_sigmoid_backward():
    z = torch.tensor([-2.0, -0.1, 0.3, 4.0], dtype=torch.float64, requires_grad=True)
    gate = z.sigmoid()
    mask = straight_through_mask(gate, gate.detach() > 0.5)
    assert mask.tolist() == [0.0, 0.0, 1.0, 1.0]
    mask.sum().backward()
    torch.testing.assert_close(z.grad, gate.detach() * (1 - gate.detach()))


@pytest.mark.parametrize("path", ["decode", *sorted(ENGINES)])
def test_every_fp32_dispatch_path_matches_reference(monkeypatch, path):
    use_host_reads(monkeypatch, True)
    backend = "auto" if path == "decode" else path
    config = MoEConfig(
        d_model=16, num_experts=8, d_expert=8, router="sigmoid", backend=backend,
        capacity_factor=None if path == "decode" else 1.5,
    )  # fmt: skip
    layer = make_layer(config, dtype=torch.float32, seed=7)
    x = torch.randn(1 if path == "decode" else 48, 16)
    out, ref, layer_grads, ref_grads = run_both(layer, x)
    assert out.routing.kept_per_token.tolist() == [len(k) for k in ref.kept]
    torch.testing.assert_close(out.hidden_states.double(), ref.hidden_states, rtol=1e-4, atol=1e-5)
    assert_close_grads(layer_grads, ref_grads, rtol=1e-4, atol=1e-5)


def _active_fraction(sparsity_coef: float, steps: int = 12) -> float:
    """Mean fraction of open gates on fresh tokens after ``steps`` seeded Adam steps of the
    router fitting the sum of all its experts (so the task alone opens gates). The tokens have
    a non-zero mean, as hidden states do: with no router bias, gates on zero-mean symmetric
    tokens average 1/2 whatever the weights."""
    layer = make_layer(_config(options={"sparsity_coef": sparsity_coef}), seed=3, router_std=0.3)
    params = {name: p.detach() for name, p in layer_params(layer).items()}
    optimizer = torch.optim.Adam(layer.router.parameters(), lr=0.08)
    generator = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(64, 12, dtype=torch.float64, generator=generator) + 0.5
        target = sum(_expert(params, layer.config, e, x) for e in range(10))
        out = layer(x)
        optimizer.zero_grad()
        ((out.hidden_states - target).pow(2).mean() + out.aux_loss).backward()
        optimizer.step()
    x = torch.randn(256, 12, dtype=torch.float64, generator=generator) + 0.5
    with torch.no_grad():
        return float(layer.eval()(x).routing.wanted_per_token.double().mean()) / 10


def test_raising_the_sparsity_coefficient_lowers_the_active_fraction():
    fractions = [_active_fraction(coef) for coef in (0.0, 0.3, 3.0)]
    assert fractions[0] > fractions[1] > fractions[2]
    assert fractions[0] - fractions[2] > 0.3


def test_trains_in_the_language_model():
    """A few trainer steps of the tiny LM: finite losses, the sparsity loss among them."""
    model, _, data = train_tiny_lm(3, **{"moe.router": "sigmoid"})
    x = torch.as_tensor(data.val[:33].astype("int64")).view(1, -1)
    out = model(x[:, :-1], x[:, 1:])
    assert torch.isfinite(out.loss) and set(out.aux_losses) == {"balance", "sparsity"}


def test_sparsity_loss_is_named_and_scaled():
    layer = make_layer(_config(options={"sparsity_coef": 0.25}), seed=1)
    x = torch.randn(9, 12, dtype=torch.float64)
    out = layer(x)
    gates = layer.router.probabilities(x)
    torch.testing.assert_close(out.aux_losses["sparsity"], 0.25 * gates.mean())
    off = make_layer(_config(options={"sparsity_coef": 0.0}), seed=1)
    assert "sparsity" not in off(x).aux_losses


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"gate_threshold": 1.0}, "router_options.gate_threshold=1.0 is invalid"),
        ({"gate_threshold": 0}, "router_options.gate_threshold=0 is invalid"),
        ({"gate_threshold": True}, "router_options.gate_threshold=True is invalid"),
        ({"sparsity_coef": -0.1}, "router_options.sparsity_coef=-0.1 is invalid"),
        ({"sparsity_coef": float("nan")}, "router_options.sparsity_coef=nan is invalid"),
    ],
)
def test_bad_options_are_named(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _config(options=options)
