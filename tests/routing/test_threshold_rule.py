"""One threshold rule: ``mass_prefix_rule`` against the rule written out per token, and every
front end that applies a mass threshold (the threshold and top-p routers, the sparsified MLPs'
selection, the transformers experts back-end) keeping what it keeps."""

from __future__ import annotations

import pytest
import torch

from xmoe import MoEConfig, MoELayer
from xmoe.routing.dense_split import select_experts
from xmoe.routing.threshold import mass_prefix_mask, mass_prefix_rule


def _written_out(ranked: list[float], threshold: float, at_most: bool) -> list[bool]:
    """Rank j is kept iff the mass of the better ranks is below t (at most t); the first always."""
    kept, before = [], 0.0
    for j, p in enumerate(ranked):
        kept.append(j == 0 or (before <= threshold if at_most else before < threshold))
        before += p
    return kept


@pytest.mark.parametrize("at_most", [False, True])
def test_the_rule_per_token_with_boundaries(at_most):
    ranked = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    for t in (0.25, 0.5, 0.7, 0.75, 0.9, 0.95):
        wanted, next_wanted = mass_prefix_rule(ranked, t, at_most)
        rows = zip(ranked.tolist(), wanted.tolist(), next_wanted.tolist(), strict=True)
        for row, got, more in rows:
            expected = _written_out([*row, 0.0], t, at_most)  # one rank more: the widening bit
            assert [*got, more] == expected, (t, row)
    # t = 1: the strict rule keeps exactly the ranks with mass; top-p's p = 1 keeps them all
    expected_at_one = [[True, True, True, at_most], [True] * 4]
    assert mass_prefix_mask(ranked, 1.0, at_most).tolist() == expected_at_one


def test_sums_are_float64():
    # the fp32 sum 0.2 + 0.1 rounds above t; the float64 sum of the same fp32 values does not
    ranked = torch.tensor([[0.2, 0.1, 0.1]], dtype=torch.float32)
    t = 0.300000008
    assert float(ranked[0, :2].sum()) > t > float(ranked[0, :2].double().sum())
    assert mass_prefix_mask(ranked, t).tolist() == [[True, True, True]]


@pytest.mark.parametrize("router", ["threshold", "topp"])
def test_routers_and_the_conversion_selection_keep_what_the_rule_keeps(router):
    torch.manual_seed(0)
    config = MoEConfig(d_model=16, num_experts=8, d_expert=8, router=router, threshold=0.6)
    layer = MoELayer(config).double().eval()
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)
    probs_SE = layer.router.probabilities(torch.randn(40, 16, dtype=torch.float64))
    selection = layer.router.select(probs_SE)
    ranked_SE = probs_SE.sort(dim=-1, descending=True).values
    expected_SE = mass_prefix_mask(ranked_SE, 0.6, router == "topp")
    width = selection.wanted_SK.shape[1]
    assert torch.equal(selection.wanted_SK, expected_SE[:, :width])
    assert not expected_SE[:, width:].any()
    if router == "threshold":
        assert torch.equal(select_experts(probs_SE, threshold=0.6).wanted_SK, expected_SE)
