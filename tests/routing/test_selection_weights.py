"""Selections carry combine weights apart from probabilities: a registered router whose weights
differ from its probabilities combines with its weights on every dispatch path."""

from __future__ import annotations

import pytest
import torch

from xmoe import MoEConfig
from xmoe.experts import decode
from xmoe.registry import ENGINES, ROUTERS
from xmoe.routing import RoutingStats, Selection, route_pairs
from xmoe.routing.topk import TopKRouter

from helpers import make_layer, register_for_test, use_host_reads
from reference import _expert, layer_params

TOP_K = 3


class _UniformTopK(TopKRouter):
    """A test-only router, one file's worth: top-k by probability, each kept expert weighted
    1/k (THOR-style), so weights and probabilities differ."""

    def select(self, probs_SE: torch.Tensor) -> Selection:
        ranked = super().select(probs_SE)
        weight_SK = torch.full_like(ranked.probs_SK, 1.0 / self.top_k)
        return Selection(ranked.expert_idx_SK, ranked.probs_SK, ranked.wanted_SK, weight_SK)


def _per_token_reference(layer, x_SD: torch.Tensor) -> torch.Tensor:
    """Σ over each token's top-k experts of FFN_e(x) / k, one token at a time."""
    params = layer_params(layer)
    probs_SE = layer.router.probabilities(x_SD).detach()
    rows = []
    for s in range(x_SD.shape[0]):
        experts = torch.sort(probs_SE[s], descending=True, stable=True).indices[:TOP_K]
        rows.append(sum(_expert(params, layer.config, int(e), x_SD[s]) for e in experts) / TOP_K)
    return torch.stack(rows)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("path", ["decode", *ENGINES])
def test_weights_not_probabilities_are_combined(monkeypatch, path, renormalize):
    use_host_reads(monkeypatch, True)
    register_for_test(monkeypatch, ROUTERS, "uniform_topk", _UniformTopK)
    calls = []
    real_decode_ffn = decode.decode_ffn
    monkeypatch.setattr(decode, "decode_ffn", lambda *a: calls.append(1) or real_decode_ffn(*a))
    backend = "auto" if path == "decode" else path
    config = MoEConfig(
        d_model=16, num_experts=8, d_expert=8, router="uniform_topk", top_k=TOP_K,
        backend=backend, renormalize=renormalize,
    )  # fmt: skip
    # fp32 and 16-wide rows: what every built-in engine runs on the CPU
    layer = make_layer(config, dtype=torch.float32, seed=3).eval()
    num_tokens = 1 if path == "decode" else 9
    x = torch.randn(num_tokens, 16)
    with torch.no_grad():
        out = layer(x)
    assert calls == ([1] if path == "decode" else [])
    expected = _per_token_reference(layer, x.double())
    torch.testing.assert_close(out.hidden_states.double(), expected, rtol=1e-5, atol=1e-6)
    # the probabilities are not uniform, so combining with them would differ
    probs_SK = layer.router(x).selection.probs_SK
    assert not torch.allclose(probs_SK, torch.full_like(probs_SK, 1.0 / TOP_K))


def test_capacity_priority_reads_probabilities_not_weights():
    """Two tokens want expert 0, capacity 1: the more probable pair wins, though its weight is
    the smaller one."""
    expert_idx_SK = torch.tensor([[0], [0]])
    probs_SK = torch.tensor([[0.4], [0.9]])
    weight_SK = torch.tensor([[0.8], [0.1]])
    wanted_SK = torch.ones(2, 1, dtype=torch.bool)
    pairs = route_pairs(Selection(expert_idx_SK, probs_SK, wanted_SK, weight_SK), 2, capacity=1)
    assert pairs.kept_SK.tolist() == [[False], [True]]
    assert pairs.weight_N.tolist() == pytest.approx([0.1])


class _LeadingNull(Selection):
    """A selection whose column 0 is a null expert (id 2; the real experts are 0 and 1): each
    token's top-1 choice of a real expert is column 1."""

    def top1_of(self, values_SK: torch.Tensor) -> torch.Tensor:
        return values_SK[:, 1]


def test_statistics_read_the_selections_top1():
    expert_idx_SK = torch.tensor([[2, 1], [2, 0], [2, 1]])
    wanted_SK = torch.ones(3, 2, dtype=torch.bool)
    probs_SK = torch.tensor([[0.5, 0.3], [0.6, 0.3], [0.5, 0.4]])
    selection = _LeadingNull(expert_idx_SK, probs_SK, wanted_SK, probs_SK)
    # capacity 1: expert 1 drops token 0 (the less probable), null expert 2 two of its three
    pairs = route_pairs(selection, 3, capacity=1)
    stats = RoutingStats.from_pairs(pairs, expert_flops=10, dense_flops=1)
    assert stats.top1_load.tolist() == [1, 2, 0]
    assert float(stats.top1_drop_fraction) == pytest.approx(1 / 3)
    assert selection.top1_expert_S.tolist() == [1, 0, 1]
