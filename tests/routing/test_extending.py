"""Extending the core with a router is one file plus one registry entry: the toy router below is
that file's worth of code (its options, its tunable, its rule), registered inside each test. No
other code knows it, yet configs validate its options, the trainer trains it, and live_config()
and HF save_pretrained record the value its layers hold."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch

from xmoe import ConfigError, MoEConfig
from xmoe.config import RouterOptions, _is_number, _require
from xmoe.models import TransformerLM
from xmoe.registry import ROUTERS
from xmoe.routing import Router, Selection, ranked_topk
from xmoe.training.presets import preset
from xmoe.training.trainer import load_model, train

from helpers import make_layer, register_for_test
from reference import _expert, layer_params

NAME = "min_prob"


@dataclass(frozen=True)
class MinProbOptions(RouterOptions):
    """Args: min_prob: a token keeps every expert whose probability is at least this."""

    min_prob: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            _is_number(self.min_prob) and 0 < self.min_prob <= 1,
            "router_options.min_prob",
            self.min_prob,
            "a number in (0, 1]",
        )


class MinProbRouter(Router):
    """Keeps the experts whose probability is at least ``min_prob`` (the best one always)."""

    Options = MinProbOptions
    tunable_names = ("min_prob",)

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.min_prob = config.router_options.min_prob

    def set_min_prob(self, min_prob: float) -> None:
        """Keep experts down to ``min_prob`` from now on (checked as the option is)."""
        dataclasses.replace(self.options, min_prob=min_prob)
        self.min_prob = min_prob

    def select(self, probs_SE: torch.Tensor) -> Selection:
        probs_SE_sorted, expert_idx_SE = ranked_topk(probs_SE, probs_SE.shape[-1])
        wanted_SE = probs_SE_sorted.detach() >= self.min_prob
        wanted_SE[:, 0] = True
        return Selection(expert_idx_SE, probs_SE_sorted, wanted_SE, probs_SE_sorted)


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    register_for_test(monkeypatch, ROUTERS, NAME, MinProbRouter)


def _moe(**options) -> MoEConfig:
    return MoEConfig(d_model=16, num_experts=8, d_expert=8, router=NAME, router_options=options)


def _per_token_reference(layer, x_SD: torch.Tensor, min_prob: float):
    """Each token's kept experts and Σ p_e · FFN_e(x) over them, one token at a time."""
    params = layer_params(layer)
    probs_SE = torch.softmax(x_SD @ params["router.weight"].t(), dim=-1).detach()
    kept, rows = [], []
    for s in range(x_SD.shape[0]):
        best = int(probs_SE[s].argmax())
        experts = {e for e in range(8) if probs_SE[s, e] >= min_prob} | {best}
        kept.append(len(experts))
        outputs = [probs_SE[s, e] * _expert(params, layer.config, e, x_SD[s]) for e in experts]
        rows.append(sum(outputs))
    return kept, torch.stack(rows)


def test_its_options_are_validated_with_named_errors():
    assert _moe().router_options == MinProbOptions(min_prob=0.2)
    named = r"^router_options\.min_prob=.* is invalid: .* must be a number in \(0, 1\]$"
    for bad in (0, 1.5, float("nan"), "0.2", None):
        with pytest.raises(ConfigError, match=named):
            _moe(min_prob=bad)
    with pytest.raises(ConfigError, match=r"unknown MinProbOptions field\(s\) \['top_p'\]"):
        _moe(top_p=0.5)


def test_it_routes_per_its_rule_and_set_min_prob_touches_no_config():
    config = _moe(min_prob=0.3)
    layer = make_layer(config).eval()
    x = torch.randn(12, 16, dtype=torch.float64)
    for min_prob in (0.3, 0.08):
        if min_prob != 0.3:
            layer.router.set_min_prob(min_prob)
        out = layer(x)
        kept, expected = _per_token_reference(layer, x, min_prob)
        assert out.routing.kept_per_token.tolist() == kept
        torch.testing.assert_close(out.hidden_states, expected, rtol=1e-10, atol=1e-12)
    assert sum(kept) > 12  # the lower bound keeps more than the best expert somewhere
    assert layer.config is config and config.router_options.min_prob == 0.3
    assert layer.tunables() == {"capacity_at_eval": False, "min_prob": 0.08}
    with pytest.raises(ConfigError, match=r"^router_options\.min_prob=2 is invalid"):
        layer.router.set_min_prob(2)
    assert layer.router.min_prob == 0.08
    out = layer.train()(x)  # its probabilities are combined, so the LM loss reaches the router
    (out.hidden_states.sum() + out.aux_loss).backward()
    assert bool(layer.router.weight.grad.abs().sum() > 0)


def test_live_config_records_the_held_value_and_the_trainer_trains_it(tmp_path):
    base = preset("tiny")
    moe = dataclasses.replace(base.model.moe, router=NAME, router_options={"min_prob": 0.15})
    model_config = dataclasses.replace(base.model, num_layers=4, moe=moe)
    config = dataclasses.replace(
        base, model=model_config, batch_size=4, max_steps=2, eval_interval=2, eval_batches=1
    )
    result = train(config, tmp_path / "run", progress=False)
    assert result.steps == 2 and math.isfinite(result.train_loss)
    model, _, _ = load_model(tmp_path / "run")
    assert [layer.router.min_prob for layer in model.moe_layers] == [0.15, 0.15]
    model.moe_layers[0].router.set_min_prob(0.05)
    with pytest.raises(ConfigError, match=r"hold different \['min_prob'\]"):
        model.live_config()
    model.moe_layers[1].router.set_min_prob(0.05)
    live = model.live_config()
    assert live.moe.router_options == MinProbOptions(min_prob=0.05)
    assert model.config.moe.router_options.min_prob == 0.15  # the recipe is never rewritten
    assert live.moe.tunable("min_prob") == 0.05
    rebuilt = TransformerLM(live)
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 16))
    assert torch.equal(rebuilt.eval()(ids).logits, model(ids).logits)


def test_hf_save_pretrained_writes_the_held_value(tmp_path):
    pytest.importorskip("transformers")
    from xmoe.hf import XMoEConfig, XMoEForCausalLM

    moe = {"d_model": 32, "num_experts": 8, "d_expert": 16, "router": NAME}
    config = XMoEConfig(
        vocab_size=60, d_model=32, num_layers=2, num_heads=2, max_seq_len=64, d_ff=64, moe=moe
    )
    model = XMoEForCausalLM(config).eval()
    for layer in model.model.lm.moe_layers:
        torch.nn.init.normal_(layer.router.weight, std=1.0)
        layer.router.set_min_prob(0.1)
    model.save_pretrained(tmp_path)
    loaded = XMoEForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.moe["router_options"]["min_prob"] == 0.1
    assert [layer.router.min_prob for layer in loaded.model.lm.moe_layers] == [0.1]
    ids = torch.randint(0, 60, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


class ExpertsSeenRouter(MinProbRouter):
    """A rule that needs the layer's experts (``needs_experts``): it records what it is handed."""

    needs_experts = True

    def forward(self, x_SD, state=None, experts=None):
        self.seen = experts
        return super().forward(x_SD, state)


def test_a_router_that_needs_the_experts_is_handed_the_layers(monkeypatch):
    register_for_test(monkeypatch, ROUTERS, "sees_experts", ExpertsSeenRouter)
    config = MoEConfig(d_model=16, num_experts=8, d_expert=8, router="sees_experts")
    layer = make_layer(config)
    layer(torch.randn(3, 16, dtype=torch.float64))
    assert layer.router.seen is layer.experts
    layer.router.seen = None
    layer.route(torch.randn(2, 16, dtype=torch.float64))
    assert layer.router.seen is layer.experts
