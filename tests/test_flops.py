"""xmoe.flops, the FLOP formulas behind every table, against what torch's FlopCounterMode counts
when the same matrices run (an independent count: it sees only the matmuls that execute)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from xmoe import MoEConfig, flops
from xmoe.models import ModelConfig
from xmoe.models.blocks import DenseFFN

from helpers import make_layer


def _counted(run) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@pytest.mark.parametrize("d_model,d_hidden", [(8, 16), (12, 5), (3, 7)])
@pytest.mark.parametrize("gated", [False, True])
def test_ffn_formula_counts_one_tokens_matmuls(d_model, d_hidden, gated):
    inputs = [nn.Linear(d_model, d_hidden) for _ in range(2 if gated else 1)]  # (gate,) up
    output = nn.Linear(d_hidden, d_model)
    x_1D = torch.randn(1, d_model)

    def ffn():
        hidden = [linear(x_1D) for linear in inputs]
        output(hidden[0] * hidden[-1])

    assert _counted(ffn) == flops.ffn_flops(d_model, d_hidden, gated)
    weights = [linear.weight for linear in (*inputs, output)]
    assert flops.ffn_params(d_model, d_hidden, gated) == sum(w.numel() for w in weights)


def test_formulas_pinned():
    """The numbers docs/ was made with: 2·2·D·H plain, 2·3·D·H gated, 2·D·E for the router."""
    assert flops.ffn_flops(64, 32, gated=False) == 8192
    assert flops.ffn_flops(64, 32, gated=True) == 12288
    assert flops.router_flops(64, 16) == 2048
    assert flops.routed_flops_per_token(6, 4, 100, 7) == 6 * 100 / 4 + 7


def test_dense_ffn_flops_match_the_module():
    config = ModelConfig(vocab_size=32, d_model=12, num_layers=2, num_heads=2, d_ff=20, moe=None)
    ffn = DenseFFN(config)
    assert _counted(lambda: ffn(torch.randn(1, 12))) == config.dense_ffn_flops


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_layer_statistics_count_what_the_layer_computes(activation, capacity_factor):
    """flops_per_token x tokens equals the matmul FLOPs of the call: router on every token plus
    each kept pair's expert (pairs dropped by capacity cost nothing)."""
    config = MoEConfig(
        d_model=8, num_experts=4, d_expert=6, threshold=0.8, activation=activation,
        capacity_factor=capacity_factor, backend="loop",
    )  # fmt: skip
    layer = make_layer(config, dtype=torch.float32)
    x_SD = torch.randn(24, 8)
    stats = layer(x_SD).routing
    counted = _counted(lambda: layer(x_SD))
    assert float(stats.flops_per_token) * 24 == pytest.approx(counted, rel=1e-6)
    pairs = int(stats.kept_per_token.sum())
    assert counted == pairs * config.expert_flops + 24 * config.router_flops
    if capacity_factor is not None:  # the case proves that dropped pairs are not counted
        assert pairs < int(stats.wanted_per_token.sum())


@pytest.mark.parametrize("gate_first", [False, True])
def test_masked_swiglu_fraction_is_what_the_kept_rows_count(gate_first):
    """Gate and up on the kept channels (up on the kept neurons too, gate-first), down on the
    kept neurons: the matmuls of the compacted weights, counted by torch."""
    d_model, d_hidden, kept_in, kept_neurons = 16, 24, 12, 6
    x, gate = torch.randn(1, kept_in), torch.randn(kept_in, d_hidden)
    up = torch.randn(kept_in, kept_neurons if gate_first else d_hidden)
    down = torch.randn(kept_neurons, d_model)
    counted = _counted(lambda: (x @ gate, x @ up, torch.randn(1, kept_neurons) @ down))
    fraction = flops.masked_swiglu_fraction(kept_in / d_model, kept_neurons / d_hidden, gate_first)
    assert counted == pytest.approx(fraction * flops.ffn_flops(d_model, d_hidden, gated=True))
