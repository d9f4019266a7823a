"""SMoE-Dropout's router: the per-token reference of its rule, the frozen random router under
the trainer's step, the k schedule, any k at inference, and more experts never hurting."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from xmoe import ConfigError, MoEConfig, MoELayer
from xmoe.dispatch import ENGINES
from xmoe.routing.smoe_dropout import scheduled_k

from helpers import assert_close_grads, make_layer, run_both, train_tiny_lm, use_host_reads
from reference import reference_forward

CASES = [
    # (capacity_factor, num_tokens, extra config)
    (None, 40, {"top_k": 3}),
    (None, 1, {"top_k": 2}),
    (1.0, 40, {"top_k": 3}),  # over-subscribed experts drop pairs (weights stay over the wanted)
    (0.25, 40, {"top_k": 2, "min_capacity": 1}),
    (None, 30, {"top_k": 4, "renormalize": True}),
]


def _config(**fields) -> MoEConfig:
    return MoEConfig(d_model=12, num_experts=10, d_expert=6, router="smoe_dropout", **fields)


def _without_router_grad(layer_grads, ref_grads):
    """The frozen router gets no gradient; the reference's (trainable) copy does."""
    assert layer_grads.pop("router.weight") is None
    ref_grads.pop("router.weight")


@pytest.mark.parametrize("path", ["auto", "sync_free", "loop"])
@pytest.mark.parametrize("capacity_factor,num_tokens,extra", CASES)
def test_matches_reference_float64(monkeypatch, path, capacity_factor, num_tokens, extra):
    """Training mode at step 0 (k_start defaults to top_k): top-k, softmax over the selected."""
    use_host_reads(monkeypatch, path != "sync_free")
    config = _config(
        capacity_factor=capacity_factor, backend="loop" if path == "loop" else "auto", **extra
    )
    layer = make_layer(config, seed=num_tokens)
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    out, ref, layer_grads, ref_grads = run_both(layer, x)
    torch.testing.assert_close(out.hidden_states, ref.hidden_states, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-10, atol=1e-12)
    assert out.routing.kept_per_token.tolist() == [len(k) for k in ref.kept]
    assert float(out.routing.flops_per_token) == pytest.approx(ref.flops_per_token)
    _without_router_grad(layer_grads, ref_grads)
    assert_close_grads(layer_grads, ref_grads, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("path", ["decode", *sorted(ENGINES)])
def test_any_k_at_inference_on_every_dispatch_path(monkeypatch, path):
    """Eval mode uses the router's top_k (set_top_k), whatever the schedule is at."""
    use_host_reads(monkeypatch, True)
    backend = "auto" if path == "decode" else path
    config = MoEConfig(
        d_model=16, num_experts=8, d_expert=8, router="smoe_dropout", top_k=2, backend=backend,
        router_options={"k_start": 1, "k_end": 8, "grow_steps": 4},
    )  # fmt: skip
    layer = make_layer(config, dtype=torch.float32, seed=7).eval()
    layer.router.set_top_k(5)
    x = torch.randn(1 if path == "decode" else 24, 16)
    with torch.no_grad():
        out = layer(x)
    ref = reference_forward(
        dataclasses.replace(config, top_k=5),
        {n: p.detach().double() for n, p in layer.named_parameters()},
        x.double(),
    )
    assert out.routing.kept_per_token.tolist() == [5] * x.shape[0]
    torch.testing.assert_close(out.hidden_states.double(), ref.hidden_states, rtol=1e-4, atol=1e-5)


def test_k_follows_the_linear_schedule_and_survives_a_round_trip():
    config = _config(top_k=2, router_options={"k_start": 2, "k_end": 8, "grow_steps": 4})
    layer = make_layer(config)
    x = torch.randn(6, 12, dtype=torch.float64)
    seen = []
    for _ in range(6):
        seen.append(int(layer(x).routing.kept_per_token[0]))
        layer.router.end_step()
    assert seen == [2, 3, 5, 6, 8, 8]
    assert seen == [scheduled_k(2, 8, 4, step) for step in range(6)]
    assert int(layer.eval()(x).routing.kept_per_token[0]) == 2  # eval: top_k
    restored = MoELayer(config)
    restored.load_state_dict(layer.state_dict())
    assert int(restored.router.schedule_step) == 6
    assert restored.router.train_k == 8


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", [2, 3, 5, 6, 8, 8]),
        ("cosine", [2, 2, 4, 6, 8, 8]),  # 8 - round(6 cos(π step / 8))
        ("exponential", [2, 5, 7, 7, 8, 8]),  # 8 - round(6 · 0.99^(75 step))
        ("step", [2, 2, 4, 8, 8, 8]),  # k doubles: 2, 4, 8 over thirds of the growth
    ],
)
def test_each_schedule_grows_k_from_k_start_to_k_end(schedule, expected):
    options = {"k_start": 2, "k_end": 8, "grow_steps": 4, "schedule": schedule}
    layer = make_layer(_config(top_k=2, router_options=options))
    x = torch.randn(3, 12, dtype=torch.float64)
    seen = []
    for _ in range(6):
        seen.append(int(layer(x).routing.kept_per_token[0]))
        layer.router.end_step()
    assert seen == expected


def test_the_step_schedule_is_the_codes_powers_of_two():
    """multi_step_increase of the SMoE-Dropout code: 1, 2, 4, 8, 16 of 16 experts."""
    assert [scheduled_k(1, 16, 5, step, "step") for step in range(6)] == [1, 2, 4, 8, 16, 16]


def test_defaults_grow_from_top_k_to_every_expert():
    options = _config(top_k=3).router_options
    assert options.k_range(_config(top_k=3)) == (3, 10)
    assert scheduled_k(3, 10, 0, 0) == 10  # no growth: k_end from the start


def test_the_router_never_changes_in_training():
    """The trainer's step and optimizer (weight decay included) leave the random router as it
    was initialised, while the experts train; the schedule counted every step."""
    initial, _, _ = train_tiny_lm(0, **{"moe.router": "smoe_dropout"})
    trained, _, _ = train_tiny_lm(3, **{"moe.router": "smoe_dropout"})
    for before, after in zip(initial.moe_layers, trained.moe_layers, strict=True):
        assert not after.router.weight.requires_grad
        assert torch.equal(before.router.weight, after.router.weight)
        assert not torch.equal(before.experts.w1, after.experts.w1)
        assert int(after.router.schedule_step) == 3


def test_more_experts_at_inference_never_hurt():
    """The spec's behavioural line at toy scale: trained with k growing 2 -> 8 of 8, eval loss
    is non-increasing in k (to 0.1%: the last experts' share is tiny) and clearly lower at k=8
    than at k=1."""
    model, config, data = train_tiny_lm(
        16, batch_size=4,
        **{"moe.router": "smoe_dropout", "moe.router_options.k_start": 2,
           "moe.router_options.grow_steps": 8},
    )  # fmt: skip
    model.eval()
    x = torch.as_tensor(data.val[: 16 * 33].astype("int64")).view(16, 33)
    losses = []
    for k in range(1, config.model.moe.num_experts + 1):
        for layer in model.moe_layers:
            layer.router.set_top_k(k)
        with torch.no_grad():
            losses.append(float(model(x[:, :-1], x[:, 1:]).loss))
    assert all(b <= a * (1 + 1e-3) for a, b in itertools.pairwise(losses))
    assert losses[-1] < losses[0] - 0.01


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"router_options": {"k_start": 0}}, "router_options.k_start=0 is invalid"),
        ({"router_options": {"k_start": 11}}, "router_options.k_start=11 is invalid"),
        ({"router_options": {"k_start": 4, "k_end": 3}}, "router_options.k_end=3 is invalid"),
        ({"router_options": {"k_end": 11}}, "router_options.k_end=11 is invalid"),
        ({"router_options": {"grow_steps": -1}}, "router_options.grow_steps=-1 is invalid"),
        ({"router_options": {"grow_steps": 1.5}}, "router_options.grow_steps=1.5 is invalid"),
        ({"router_options": {"schedule": "sqrt"}}, "router_options.schedule='sqrt' is invalid"),
        ({"top_k": 0}, "top_k=0 is invalid"),
    ],
)
def test_bad_options_are_named(fields, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _config(**fields)
