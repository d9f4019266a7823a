"""The dense_split router (a converted dense MLP's rule) as an MoELayer router: named errors for
its options, its rule as tunables, and the oracle's scores from the layer's experts."""

from __future__ import annotations

import pytest
import torch

from xmoe import ConfigError, MoEConfig, MoELayer
from xmoe.routing.dense_split import DenseSplitOptions

BASE = {"d_model": 8, "num_experts": 4, "d_expert": 4, "router": "dense_split"}
SWIGLU = {"activation": "swiglu", "bias": False}


def _config(**changes) -> MoEConfig:
    return MoEConfig(**{**BASE, **SWIGLU, **changes})


@pytest.mark.parametrize(
    ("options", "fields", "message"),
    [
        ({"scoring": "norm"}, {}, r"router_options\.scoring='norm' is invalid: .*'learned'"),
        ({"selection": "topp"}, {}, r"router_options\.selection='topp' is invalid"),
        ({"combine": "mean"}, {}, r"router_options\.combine='mean' is invalid"),
        (
            {"scoring": "oracle", "combine": "weighted"},
            {},
            r"router_options\.combine='weighted' is invalid: .*'unweighted' with "
            r"scoring='oracle'",
        ),
        (
            {"scoring": "oracle"},
            {"activation": "gelu"},
            r"router_options\.scoring='oracle' is invalid: .*bias-free SwiGLU FFN experts",
        ),
        ({}, {"top_k": 5}, r"top_k=5 is invalid: .*\[1, num_experts=4\]"),
    ],
)
def test_bad_options_raise_named_errors(options, fields, message):
    with pytest.raises(ConfigError, match=message):
        _config(router_options=options, **fields)


def test_the_rule_is_a_set_of_tunables_a_saved_recipe_rebuilds():
    layer = MoELayer(_config(router_options={"selection": "threshold"}, threshold=0.5))
    router = layer.router
    assert router.threshold_decides()
    router.set_top_k(3)
    router.set_rule("learned", "topk", "weighted")
    assert not router.threshold_decides()  # top-k ignores t: a t sweep would change nothing
    held = layer.tunables()
    assert held == {
        "capacity_at_eval": False,
        "top_k": 3,
        "threshold": 0.5,
        "scoring": "learned",
        "selection": "topk",
        "combine": "weighted",
    }
    rebuilt = MoELayer(layer.config.with_tunables(held))
    assert rebuilt.tunables() == held
    assert rebuilt.config.router_options == DenseSplitOptions(selection="topk", combine="weighted")
    with pytest.raises(ConfigError, match=r"router_options\.combine='weighted' is invalid"):
        router.set_rule("oracle", "topk", "weighted")
    with pytest.raises(ConfigError, match=r"threshold=0 is invalid"):
        router.set_threshold(0)
    assert layer.tunables() == held  # nothing changed


def test_the_oracle_scores_the_layers_experts_and_has_no_losses():
    torch.manual_seed(0)
    layer = MoELayer(_config(router_options={"scoring": "oracle"}, top_k=2)).double().train()
    x = torch.randn(5, 8, dtype=torch.float64)
    w1, w2 = layer.experts.w1, layer.experts.w2
    outputs = torch.stack(
        [
            (torch.nn.functional.silu(x @ w1[e, :, :4]) * (x @ w1[e, :, 4:])) @ w2[e]
            for e in range(4)
        ]
    )  # (E, S, D)
    norms = outputs.norm(dim=-1).T
    expected = norms / norms.sum(dim=-1, keepdim=True)
    out = layer(x)
    assert out.aux_losses == {} and float(out.aux_loss) == 0.0
    routed = layer.route(x)
    torch.testing.assert_close(routed.probs_SE, expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"scoring='oracle' ranks the layer's experts"):
        layer.router(x)  # called without the experts MoELayer hands it
