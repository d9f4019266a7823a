"""RMoE's recurrent router ("recurrent"): a GRU over depth carries routing state from one MoE
layer's router to the next; tokens stay parallel."""

from __future__ import annotations

import itertools

import pytest
import torch

from xmoe import ConfigError, MoEConfig, MoELayer
from xmoe.models import ModelConfig, TransformerLM
from xmoe.routing.threshold import normalized_logits

from helpers import assert_engines_agree, compare_with_reference, hf_tiny_round_trip, make_layer

BASE = dict(d_model=12, num_experts=8, d_expert=5, top_k=2, router="recurrent")
STATE = 6


def _config(**overrides) -> MoEConfig:
    return MoEConfig(**{**BASE, "router_options": {"state_dim": STATE}, **overrides})


@pytest.mark.parametrize("backend", ["auto", "loop", "batched"])
@pytest.mark.parametrize(
    "num_tokens,capacity_factor,with_state",
    [(11, None, True), (11, 1.0, True), (1, None, True), (7, None, False)],
)
def test_recurrent_matches_per_token_reference(backend, num_tokens, capacity_factor, with_state):
    """The GRU step, the logits from its state and top-k, token by token, against the layer:
    overflowing capacity, one token, an expert left without tokens, a first layer (no state)
    and a later one, in outputs, next states, losses, FLOPs and gradients (the state's too)."""
    config = _config(backend=backend, capacity_factor=capacity_factor, min_capacity=1)
    layer = make_layer(config, seed=num_tokens)
    torch.manual_seed(20 + num_tokens)
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    state = torch.randn(num_tokens, STATE, dtype=torch.float64) if with_state else None
    out, ref = compare_with_reference(layer, x, state)
    assert out.state.shape == (num_tokens, STATE)
    load = out.routing.expert_load.tolist()
    assert load == [sum(e == i for row in ref.kept for e in row) for i in range(8)]


@pytest.mark.parametrize("num_tokens,capacity_factor", [(11, None), (11, 1.0), (1, None)])
def test_the_threshold_rule_matches_per_token_reference(num_tokens, capacity_factor):
    """``recurrent_threshold``: the same recurrence, XMoE's mass threshold on its softmax."""
    config = _config(router="recurrent_threshold", threshold=0.6, capacity_factor=capacity_factor)
    layer = make_layer(config, seed=num_tokens, router_std=0.5)
    torch.manual_seed(30 + num_tokens)
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    state = torch.randn(num_tokens, STATE, dtype=torch.float64)
    _, ref = compare_with_reference(layer, x, state)
    if num_tokens > 1:
        assert len({len(row) for row in ref.wanted}) > 1  # tokens take different counts


def test_the_threshold_rule_takes_the_threshold_routers_options():
    """``logit_scale`` normalises the state's logits; ``set_threshold`` changes t."""
    plain = make_layer(_config(router="recurrent_threshold"), seed=4)
    scaled_config = _config(
        router="recurrent_threshold", router_options={"state_dim": STATE, "logit_scale": 2.5}
    )
    scaled = make_layer(scaled_config, seed=4)
    scaled.load_state_dict(plain.state_dict(), strict=False)  # all but the scale buffer
    x, state = torch.randn(9, 12, dtype=torch.float64), torch.randn(9, STATE)
    want = normalized_logits(plain.router.logits_and_state(x, state)[0], torch.tensor(2.5))
    torch.testing.assert_close(scaled.router.logits_and_state(x, state)[0], want)
    scaled.router.set_threshold(0.3)
    assert scaled.tunables()["threshold"] == 0.3


def test_ties_go_to_the_lower_expert_id():
    layer = make_layer(_config(), seed=1)
    with torch.no_grad():
        layer.router.weight.zero_()  # W_r = 0: every logit 0
    _, ref = compare_with_reference(layer, torch.randn(4, 12, dtype=torch.float64), None)
    assert ref.wanted == [[0, 1]] * 4


def test_the_state_flows_from_layer_to_layer():
    """Layer 2 routes the same input differently when layer 1's router weights change: its
    routing depends on layer 1's through the state (and a zero state gives a projected
    linear router)."""
    first, second = make_layer(_config(), seed=1), make_layer(_config(), seed=2)
    x, h = torch.randn(30, 12, dtype=torch.float64), torch.randn(30, 12, dtype=torch.float64)
    with torch.no_grad():
        before = second.route(h, first.route(x).state).probs_SE
        first.router.proj.mul_(-1.0)
        after = second.route(h, first.route(x).state).probs_SE
        alone = second.route(h).probs_SE
    assert not torch.allclose(before, after)
    changed = (before.argmax(dim=-1) != after.argmax(dim=-1)).sum()
    assert int(changed) > 0
    torch.testing.assert_close(second.router.probabilities(h), alone)


def _tiny_lm() -> TransformerLM:
    config = ModelConfig(
        vocab_size=32,
        d_model=12,
        num_layers=4,
        num_heads=2,
        max_seq_len=16,
        d_ff=16,
        moe=_config(capacity_factor=2.0),
        moe_every=1,
    )
    torch.manual_seed(0)
    return TransformerLM(config)


def test_the_model_carries_the_state_over_depth(monkeypatch):
    """TransformerLM hands each MoE layer the previous one's GRU state (none to the first),
    one row per token of the batch."""
    model = _tiny_lm()
    seen = []
    forward = MoELayer.forward

    def spy(layer, x, state=None):
        out = forward(layer, x, state)
        seen.append((state, out.state))
        return out

    monkeypatch.setattr(MoELayer, "forward", spy)
    model(torch.randint(0, 32, (2, 5)))
    assert len(seen) == 4 and seen[0][0] is None
    for (_, handed), (received, _) in itertools.pairwise(seen):
        assert received is handed and handed.shape == (10, STATE)


def test_a_few_training_steps_of_a_tiny_model():
    """Gradients reach every layer's projection, GRU cell and W_r (the state map from the
    second MoE layer on), and a few AdamW steps lower
    the training loss."""
    model = _tiny_lm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 32, (4, 12))
    losses = []
    for _ in range(5):
        out = model(ids[:, :-1], ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        if not losses:
            for i, layer in enumerate(model.moe_layers):
                for name, param in layer.router.named_parameters():
                    # the first layer's state is 0: its state map gets no gradient
                    assert (param.grad.abs().sum() > 0) == (i > 0 or name != "gru_hh"), name
        optimizer.step()
        optimizer.zero_grad()
        model.end_training_step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]


def test_every_engine_agrees():
    assert_engines_agree(_config(d_model=16, d_expert=8, capacity_factor=1.0), STATE)


def test_flops_and_bad_options():
    router = MoELayer(_config()).router
    gru = 2 * 2 * (3 * STATE * STATE)
    assert router.flops_per_token() == 2 * 12 * STATE + gru + 2 * STATE * 8
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ConfigError, match=r"router_options\.state_dim=.* an integer >= 1"):
            _config(router_options={"state_dim": bad})
        with pytest.raises(ConfigError, match=r"router_options\.state_dim=.* an integer >= 1"):
            _config(router="recurrent_threshold", router_options={"state_dim": bad})
    with pytest.raises(ConfigError, match=r"top_k=9 .* \[1, num_experts=8\]"):
        _config(top_k=9)


def test_hf_save_load_and_cached_generation(tmp_path):
    pytest.importorskip("transformers")
    moe = {**BASE, "d_model": 16, "d_expert": 8, "router_options": {"state_dim": 4}}
    hf_tiny_round_trip(tmp_path, moe, router_std=3.0)
