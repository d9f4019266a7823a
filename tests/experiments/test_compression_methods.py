"""The byte-fraction rows of `xmoe compress-grid` (experiments/compression_methods.py): how a
share of the expert bytes maps to each pass's options, biases included."""

from __future__ import annotations

from dataclasses import replace

from xmoe.experiments import compression_methods
from xmoe.experiments.compression_methods import Experts

EXPERTS = Experts(
    num_experts=64, layers=2, weights=2 * 128 * 64, rank_cost=2 * (128 + 64), element_bits=32,
    domain="kjv",
)  # fmt: skip


def test_a_byte_fraction_maps_to_each_pass_options():
    assert [compression_methods._groups(EXPERTS, f) for f in (0.75, 0.5, 0.25)] == [
        {"groups": 48}, {"groups": 32}, {"groups": 16}
    ]  # fmt: skip
    assert compression_methods._removed(EXPERTS, 0.25) == {"experts": 96}
    # 8 bits plus one fp32 scale and zero per 64 weights is 28% of fp32: out of 25%'s reach
    assert compression_methods._bits(EXPERTS, 0.75)["bits"] == 8
    assert compression_methods._bits(EXPERTS, 0.25)["bits"] == 4
    assert compression_methods._bits(EXPERTS, 0.05) is None
    # rank r of every expert's residual, plus one barycentre per layer, within the bytes
    bary = compression_methods._rank(EXPERTS, 0.5, barycentre=True)
    plain = compression_methods._rank(EXPERTS, 0.5, barycentre=False)
    assert 64 * bary["rank"] * EXPERTS.rank_cost + EXPERTS.weights <= 0.5 * 64 * EXPERTS.weights
    assert plain["rank"] > bary["rank"]
    # biases are held as trained: they take their share of the bytes first
    biased = replace(EXPERTS, kept=EXPERTS.weights // 4)  # 20% of each expert's elements
    assert compression_methods._bits(EXPERTS, 0.3)["bits"] == 8
    assert compression_methods._bits(biased, 0.3) == {"bits": 3, "group_size": 64}
    assert compression_methods._rank(biased, 0.5, barycentre=False)["rank"] < plain["rank"]
