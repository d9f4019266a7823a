"""Selection rules, ties and capacity priority."""

from __future__ import annotations

import pytest
import torch

from xmoe import MoEConfig, MoELayer
from xmoe.routing import RoutingStats, ranked_topk

from helpers import make_layer, run_both


def _select(config: MoEConfig, probs: list[list[float]]):
    layer = MoELayer(config)
    selection = layer.router.select(torch.tensor(probs, dtype=torch.float32))
    return [
        row[mask].tolist()
        for row, mask in zip(selection.expert_idx_SK, selection.wanted_SK, strict=True)
    ]


@pytest.mark.parametrize("threshold,expected", [(0.9, 3), (0.8, 2), (0.5, 1), (0.51, 2), (1.0, 4)])
def test_threshold_example_from_the_paper(threshold, expected):
    config = MoEConfig(d_model=4, num_experts=4, d_expert=4, threshold=threshold)
    (chosen,) = _select(config, [[0.05, 0.5, 0.15, 0.3]])
    assert chosen == [1, 3, 2, 0][:expected]


def test_threshold_one_keeps_every_positive_probability_only():
    config = MoEConfig(d_model=4, num_experts=4, d_expert=4, threshold=1.0)
    (chosen,) = _select(config, [[0.0, 0.7, 0.3, 0.0]])
    assert chosen == [1, 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("repeats", [1, 1100])  # a small call sorts; a large fp32 one uses keys
def test_ranked_topk_breaks_ties_toward_lower_index(dtype, repeats):
    probs = torch.tensor([[0.2, 0.3, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]], dtype=dtype)
    values, idx = ranked_topk(probs.repeat(repeats, 1), 3)
    assert idx.tolist() == [[1, 3, 0], [0, 1, 2]] * repeats
    assert values.dtype == dtype


def test_ranked_topk_fp32_key_agrees_with_stable_sort():
    """The fp32 bit-key ranking and the float64 stable sort give the same order, ties included."""
    for rows in (500, 20):  # the key path and the small-call sort path
        probs = torch.randint(0, 6, (rows, 33)).float().softmax(-1)  # many exact ties per row
        for k in (1, 5, 33):
            _, idx32 = ranked_topk(probs, k)
            _, idx64 = ranked_topk(probs.double(), k)
            assert torch.equal(idx32, idx64)


@pytest.mark.parametrize(
    "router,extra", [("topk", {"top_k": 2}), ("threshold", {"threshold": 0.5})]
)
def test_tied_experts_resolve_like_the_reference(router, extra):
    """Experts 2, 5, 7 have zero router rows, so for positive tokens they tie at the top."""
    config = MoEConfig(d_model=6, num_experts=8, d_expert=4, router=router, **extra)
    layer = make_layer(config)
    with torch.no_grad():
        layer.router.weight.copy_(-torch.rand(8, 6).double() - 0.5)
        layer.router.weight[[2, 5, 7]] = 0.0
    x = torch.rand(5, 6, dtype=torch.float64) + 0.1
    out, ref, _, _ = run_both(layer, x)
    assert all(w == [2, 5] for w in ref.wanted)
    assert out.routing.expert_load.tolist() == [0, 0, 5, 0, 0, 5, 0, 0]
    torch.testing.assert_close(out.hidden_states, ref.hidden_states)


def test_capacity_ties_keep_the_earliest_tokens():
    """Identical tokens tie in priority: an expert keeps the first C of them."""
    config = MoEConfig(
        d_model=4,
        num_experts=2,
        d_expert=4,
        router="topk",
        top_k=1,
        capacity_factor=1.0,
        min_capacity=1,
    )
    layer = make_layer(config)
    x = torch.randn(1, 4, dtype=torch.float64).expand(6, 4)
    out = layer(x)
    assert out.routing.kept_per_token.tolist() == [1, 1, 1, 0, 0, 0]
    assert torch.count_nonzero(out.hidden_states[3:]) == 0


def test_capacity_prefers_first_choices_over_later_ones():
    """A second choice with a high probability still loses to any first choice."""
    config = MoEConfig(
        d_model=2,
        num_experts=2,
        d_expert=4,
        router="topk",
        top_k=2,
        capacity_factor=0.5,
        min_capacity=1,
    )
    layer = make_layer(config)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # token 0 prefers expert 0 (weakly); token 1 prefers expert 1 strongly
    x = torch.tensor([[0.1, 0.0], [0.0, 5.0]], dtype=torch.float64)
    out = layer(x)  # C = max(ceil(2/2*0.5), 1) = 1 per expert
    assert out.routing.kept_per_token.tolist() == [1, 1]
    assert out.routing.expert_load.tolist() == [1, 1]


def test_capacity_formula_and_clamp():
    config = MoEConfig(d_model=4, num_experts=8, d_expert=4, capacity_factor=2.0, min_capacity=4)
    assert config.capacity(100) == 25  # ceil(100 / 8 * 2)
    assert config.capacity(8) == 4  # min_capacity
    assert config.capacity(3) == 3  # never above S
    assert MoEConfig(d_model=4, num_experts=8, d_expert=4).capacity(100) is None


def test_aux_loss_is_one_for_uniform_routing_and_scaled_by_coef():
    config = MoEConfig(d_model=4, num_experts=4, d_expert=4, aux_loss_coef=0.5)
    layer = make_layer(config)
    with torch.no_grad():
        layer.router.weight.zero_()
    out = layer(torch.randn(8, 4, dtype=torch.float64))
    # uniform p; ties send every top-1 to expert 0: E * sum(1/E * [1,0,0,0]) = 1
    assert out.aux_loss.item() == pytest.approx(0.5)


def _stats(kept: list[list[int]], wanted: list[list[int]]) -> RoutingStats:
    kept_SK, wanted_SK = (torch.tensor(m, dtype=torch.bool) for m in (kept, wanted))
    top1_S = torch.zeros(kept_SK.shape[0], dtype=torch.long)
    return RoutingStats(wanted_SK, kept_SK, kept_SK.sum(0), top1_S, 10, 1)


def test_routing_stats_mean_weighs_every_layer_once():
    first = _stats([[1, 1], [1, 0], [1, 0]], [[1, 1], [1, 0], [1, 1]])  # 4 of 5 pairs kept
    second = _stats([[1, 0], [1, 0], [1, 1]], [[1, 0], [1, 0], [1, 1]])  # dropless
    mean = RoutingStats.mean([first, second])
    assert mean.experts_per_token == pytest.approx(4 / 3)
    assert mean.experts_wanted_per_token == pytest.approx((5 / 3 + 4 / 3) / 2)
    assert mean.drop_fraction == pytest.approx((0.2 + 0.0) / 2)
    assert mean.kept_per_token.tolist() == [1.5, 1.0, 1.5]
    assert mean.summary() == {
        "experts_per_token": mean.experts_per_token,
        "experts_wanted_per_token": mean.experts_wanted_per_token,
        "drop_fraction": mean.drop_fraction,
    }
    assert RoutingStats.mean([first]).summary() == {
        k: v for k, v in first.summary().items() if k in mean.summary()
    }
    with pytest.raises(ValueError, match="at least one layer"):
        RoutingStats.mean([])
