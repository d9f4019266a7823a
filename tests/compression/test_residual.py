from __future__ import annotations

import copy

import pytest
import torch

from tests.compression.lm import greedy, ids, logits_of, tiny_lm
from xmoe.compression import (
    CompressionError,
    compress,
    load_compressed,
    model_size,
    save_compressed,
)
from xmoe.compression.merge import permute_neurons
from xmoe.compression.residual import ResidualExperts


@pytest.mark.parametrize(
    ("activation", "options"),
    [
        ("gelu", {"rank": 8}),
        ("swiglu", {"rank": 16}),
        ("gelu", {"method": "prune", "keep": 1.0}),
        ("gelu", {"rank": 8, "barycentre": "zero"}),
    ],
)
def test_no_compression_reproduces_the_model_exactly(activation, options):
    model = tiny_lm(activation=activation)
    before = logits_of(model, ids())
    compress(model, [("residual", options)], ids(seed=2))
    assert all(isinstance(layer.experts, ResidualExperts) for layer in model.moe_layers)
    torch.testing.assert_close(logits_of(model, ids()), before, rtol=1e-10, atol=1e-10)


def _permuted_copies(model) -> None:
    """Every expert of every layer becomes expert 0 with its hidden neurons shuffled."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.moe_layers:
            experts = layer.experts
            for e in range(1, experts.num_experts):
                shuffle = torch.randperm(8, generator=generator)
                first, bias, second = permute_neurons(
                    experts.w1[0], experts.b1[0], experts.w2[0], shuffle
                )
                experts.w1[e], experts.b1[e], experts.w2[e] = first, bias, second


def test_alignment_finds_the_barycentre_and_leaves_the_function_unchanged():
    model, baseline = tiny_lm(), tiny_lm()
    _permuted_copies(model)
    _permuted_copies(baseline)
    before = logits_of(model, ids())
    # aligned, the experts are one expert: the residuals vanish and rank 1 is exact
    compress(model, [("residual", {"rank": 1})], ids(seed=2))
    experts = model.moe_layers[0].experts
    assert experts.w1_u.abs().max() < 1e-12 and experts.w2_u.abs().max() < 1e-12  # U·S
    torch.testing.assert_close(logits_of(model, ids()), before, rtol=1e-10, atol=1e-10)
    # without the barycentre (per-expert SVD, the naive baseline) rank 1 loses the experts
    compress(baseline, [("residual", {"rank": 1, "barycentre": "zero"})], ids(seed=2))
    assert not torch.allclose(logits_of(baseline, ids()), before, atol=1e-3)


def test_bytes_shrink_as_rank_falls_and_the_output_reloads_and_generates(tmp_path):
    dense = model_size(tiny_lm()).expert_bytes
    sizes = []
    for rank in (4, 2, 1):
        model = compress(tiny_lm(), [("residual", {"rank": rank, "iterations": 2})], ids())
        sizes.append(model_size(model).expert_bytes)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
    assert sizes[2] < dense / 2  # rank 1 of 8 (the biases stay as they were)
    held = {tuple(t.shape) for t in model.moe_layers[0].experts.state_dict().values()}
    assert (8, 16, 8) not in held and (8, 8, 16) not in held  # factors, not a dense copy
    options = {"method": "prune", "keep": 0.25, "barycentre": "zero"}
    pruned = compress(tiny_lm(), [("residual", options)], ids())
    assert model_size(pruned).expert_bytes < dense / 2  # a 1-bit mask and the kept quarter
    passes = [
        ("merge", {"groups": 4}),
        ("residual", {"method": "prune", "keep": 0.5, "iterations": 2}),
    ]
    model = compress(tiny_lm(), passes, ids(seed=2))
    assert isinstance(model.moe_layers[1].experts.inner, ResidualExperts)
    out = save_compressed(model, tmp_path / "out", passes=passes)
    loaded, _ = load_compressed(out)
    torch.testing.assert_close(logits_of(loaded, ids()), logits_of(model, ids()), rtol=0, atol=0)
    assert greedy(loaded, [1, 2, 3], steps=3) == greedy(model, [1, 2, 3], steps=3)
    assert model_size(loaded, out).expert_bytes == model_size(model).expert_bytes


def test_bad_residual_options_are_named():
    with pytest.raises(CompressionError, match="residual: rank=0 is invalid with method='svd'"):
        compress(tiny_lm(), [("residual", {})], ids())
    with pytest.raises(CompressionError, match="rank=9 is more than MoE layer 0's full rank 8"):
        compress(tiny_lm(), [("residual", {"rank": "9"})], ids())
    with pytest.raises(CompressionError, match=r"keep=0\.0 is invalid: it must be a fraction"):
        compress(tiny_lm(), [("residual", {"method": "prune", "keep": "0"})], ids())
    with pytest.raises(CompressionError, match="barycentre='mean' is invalid: it must be one of"):
        compress(tiny_lm(), [("residual", {"rank": 2, "barycentre": "mean"})], ids())
    with pytest.raises(CompressionError, match="iterations=0 is invalid: it must be an integer"):
        compress(tiny_lm(), [("residual", {"rank": 2, "iterations": 0})], ids())
    with pytest.raises(CompressionError, match="method='lowrank' is invalid"):
        compress(tiny_lm(), [("residual", {"method": "lowrank"})], ids())
    once = compress(tiny_lm(), [("residual", {"rank": 1, "barycentre": "zero"})], ids())
    with pytest.raises(CompressionError, match="residual: MoE layer 0 holds ResidualExperts"):
        compress(once, [("residual", {"rank": 1})], ids())


def test_magnitude_pruning_without_a_barycentre_keeps_each_experts_largest_entries():
    model = tiny_lm()
    w1 = model.moe_layers[0].experts.w1.detach().clone()
    options = {"method": "prune", "keep": 0.25, "barycentre": "zero"}
    compress(model, [("residual", options)], ids())
    kept = model.moe_layers[0].experts.matrix("w1")
    flat, held = w1.flatten(1), kept.flatten(1)
    threshold = flat.abs().topk(32, dim=1).values[:, -1:]  # a quarter of 16 x 8
    torch.testing.assert_close(held, torch.where(flat.abs() >= threshold, flat, 0.0))


def test_the_barycentre_beats_per_expert_svd_at_no_more_bytes():
    """Experts that are one expert, neurons shuffled, plus noise: ResMoE at rank 1 stays closer to
    the layer's function than per-expert SVD at rank 2, in fewer measured bytes."""
    original = tiny_lm()
    _permuted_copies(original)
    with torch.no_grad():
        for layer in original.moe_layers:
            noise = torch.randn(layer.experts.w1.shape, generator=torch.Generator().manual_seed(5))
            layer.experts.w1.add_(0.02 * noise.double())
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    expected = original.moe_layers[0](x).hidden_states.detach()
    error, size = {}, {}
    for name, options in (("resmoe", {"rank": 1}), ("svd", {"rank": 2, "barycentre": "zero"})):
        model = compress(copy.deepcopy(original), [("residual", options)], ids())
        error[name] = float((model.moe_layers[0](x).hidden_states.detach() - expected).norm())
        size[name] = model_size(model).expert_bytes
    assert size["resmoe"] <= size["svd"] and error["resmoe"] < error["svd"] / 2
