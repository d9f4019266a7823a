from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.compression.lm import ids, logits_of, tiny_lm
from xmoe.compression import CompressionError, compress, model_size
from xmoe.compression.quantize import (
    WIDTHS,
    QuantizedExperts,
    allocate_bits,
    dequantize_groups,
    pack_bits,
    quantize_groups,
    unpack_bits,
)


@pytest.mark.parametrize("bits", WIDTHS)
def test_packing_round_trips_in_real_bytes(bits):
    codes = torch.randint(0, 1 << bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-37 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 37), codes)


@pytest.mark.parametrize("bits", WIDTHS)
def test_quantize_dequantize_error_is_within_half_a_step(bits):
    values = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    codes, scale, zero = quantize_groups(values, bits, 64)
    restored = dequantize_groups(codes, scale, zero, len(values))
    step = scale.repeat_interleave(64)[: len(values)]
    assert bool(((restored - values).abs() <= step / 2 * (1 + 1e-9)).all())
    assert codes.max() <= (1 << bits) - 1
    constant = torch.full((10,), 0.25, dtype=torch.float64)  # a constant group is exact
    assert torch.equal(dequantize_groups(*quantize_groups(constant, bits, 4), 10), constant)


def test_the_integer_program_meets_the_budget_and_equals_brute_force():
    rng = np.random.default_rng(0)
    size = np.array([10, 20, 30])
    widths = WIDTHS
    # loss falls with width, as a quantisation loss does
    cost = np.sort(rng.random((3, len(widths))), axis=1)[:, ::-1] * rng.random((3, 1))
    for budget in (2 * 60, 3 * 60, 3.5 * 60, 5 * 60, 8 * 60):
        chosen = allocate_bits(cost, size, widths, budget)
        assert sum(s * b for s, b in zip(size, chosen, strict=True)) <= budget
        best = min(
            sum(cost[j, widths.index(b)] for j, b in enumerate(combo))
            for combo in itertools.product(widths, repeat=3)
            if sum(s * b for s, b in zip(size, combo, strict=True)) <= budget
        )
        total = sum(cost[j, widths.index(b)] for j, b in enumerate(chosen))
        assert total == pytest.approx(best, rel=1e-9, abs=1e-12)
    with pytest.raises(CompressionError, match="below the smallest possible 120"):
        allocate_bits(cost, size, widths, 119)


def test_quantized_experts_are_packed_and_compute_from_their_codes():
    model = tiny_lm()
    ffn_bytes = model_size(model).expert_bytes
    originals = [(layer.experts.w1.clone(), layer.experts.w2.clone()) for layer in model.moe_layers]
    compress(model, [("quantize", {"bits": 3, "group_size": 16})], ids(seed=2))
    experts = [layer.experts for layer in model.moe_layers]
    assert all(isinstance(e, QuantizedExperts) for e in experts)
    bits = [b for e in experts for b in e.bits]
    assert sum(bits) <= 3 * len(bits)  # every expert has the same number of weights
    assert len(set(bits)) > 1  # mixed precision: the program spends bits where they pay
    assert experts[0].w1_codes.dtype == torch.uint8
    assert model_size(model).expert_bytes < 0.35 * ffn_bytes  # float64 -> ~3 bits + scales
    # the decoded weights are within half a step of the originals ...
    for quantized, (w1, w2) in zip(experts, originals, strict=True):
        for name, weight in (("w1", w1), ("w2", w2)):
            step = getattr(quantized, f"{name}_scale").repeat_interleave(16, dim=1)
            error = (quantized.dequantized(name) - weight).flatten(1)
            assert bool((error.abs() <= step[:, : error.shape[1]] / 2 * (1 + 1e-9)).all())
    # ... and they are what the layer computes with
    reference = tiny_lm()
    with torch.no_grad():
        for layer, quantized in zip(reference.moe_layers, experts, strict=True):
            layer.experts.w1.copy_(quantized.dequantized("w1"))
            layer.experts.w2.copy_(quantized.dequantized("w2"))
    torch.testing.assert_close(logits_of(model, ids()), logits_of(reference, ids()))


def test_eight_bits_are_close_and_the_budget_below_two_bits_is_named():
    model = tiny_lm()
    before = logits_of(model, ids())
    compress(model, [("quantize", {"bits": 8})], ids(seed=2))
    torch.testing.assert_close(logits_of(model, ids()), before, rtol=0, atol=2e-2)
    with pytest.raises(CompressionError, match=r"bits=1.5 is invalid: .* in \[2, 8\]"):
        compress(tiny_lm(), [("quantize", {"bits": "1.5"})], ids())
    with pytest.raises(CompressionError, match="already quantized"):
        compress(model, [("quantize", {"bits": 4})], ids())


def test_uniform_allocation_is_the_baseline_option():
    model = compress(tiny_lm(), [("quantize", {"bits": "3", "allocation": "uniform"})], ids())
    assert {b for layer in model.moe_layers for b in layer.experts.bits} == {3}
    with pytest.raises(CompressionError, match=r"bits=2\.5 is invalid with allocation='uniform'"):
        compress(tiny_lm(), [("quantize", {"bits": 2.5, "allocation": "uniform"})], ids())
