from __future__ import annotations

import pytest
import torch

from tests.compression.lm import ids, logits_of, tiny_lm
from xmoe.compression import CompressionError, compress
from xmoe.compression.merge import (
    MergedExperts,
    alignment,
    neuron_features,
    permute_neurons,
)


def test_merging_identical_experts_is_a_no_op():
    model = tiny_lm()
    with torch.no_grad():
        for layer in model.moe_layers:
            for weight in (layer.experts.w1, layer.experts.w2, layer.experts.b1, layer.experts.b2):
                weight.copy_(weight[:1].expand_as(weight))
    before = logits_of(model, ids())
    flops = model.moe_flops_per_token(model(ids()).routing)
    compress(model, [("merge", {"groups": 3})], ids(seed=2))
    assert all(isinstance(layer.experts, MergedExperts) for layer in model.moe_layers)
    assert all(layer.experts.inner.num_experts == 3 for layer in model.moe_layers)
    torch.testing.assert_close(logits_of(model, ids()), before, rtol=1e-12, atol=1e-12)
    assert model.moe_flops_per_token(model(ids()).routing) == flops  # each pair costs one FFN


def test_merging_into_as_many_groups_as_experts_is_a_no_op():
    model = tiny_lm()
    before = logits_of(model, ids())
    compress(model, [("merge", {"groups": 8})], ids(seed=2))
    torch.testing.assert_close(logits_of(model, ids()), before, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_alignment_leaves_the_function_unchanged_and_finds_a_permutation(activation):
    model = tiny_lm(activation=activation)
    layer = model.moe_layers[0]
    experts = layer.experts
    x = torch.randn(10, 16, dtype=torch.float64)
    before = layer(x).hidden_states
    with torch.no_grad():
        shuffle = torch.randperm(8, generator=torch.Generator().manual_seed(3))
        w1, b1, w2 = permute_neurons(experts.w1[0], experts.b1[0], experts.w2[0], shuffle)
        experts.w1[1], experts.b1[1], experts.w2[1] = w1, b1, w2
        experts.b2[1] = experts.b2[0]
    reference = neuron_features(experts.w1[0], experts.b1[0], experts.w2[0])
    perm = alignment(reference, neuron_features(experts.w1[1], experts.b1[1], experts.w2[1]))
    aligned = permute_neurons(experts.w1[1], experts.b1[1], experts.w2[1], perm)
    torch.testing.assert_close(aligned[0], experts.w1[0], rtol=0, atol=0)
    torch.testing.assert_close(aligned[2], experts.w2[0], rtol=0, atol=0)
    # an aligned expert computes what it did: the layer's output is unchanged
    changed = layer(x).hidden_states
    with torch.no_grad():
        experts.w1[1], experts.b1[1], experts.w2[1] = aligned
    torch.testing.assert_close(layer(x).hidden_states, changed, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(changed, before)  # the shuffle made expert 1 a copy of expert 0


def test_merge_maps_every_expert_to_a_group_and_uses_fewer_bytes():
    from xmoe.compression import model_size

    model = tiny_lm()
    before = model_size(model).expert_bytes
    compress(model, [("merge", {"groups": 2})], ids(seed=2))
    layer = model.moe_layers[0]
    assert sorted(set(layer.experts.group_E.tolist())) == [0, 1]
    assert model_size(model).expert_bytes < before / 3
    out = model(ids(), ids(seed=5))
    assert torch.isfinite(out.loss)


def test_bad_merge_options_are_named():
    with pytest.raises(CompressionError, match="groups=9 is more than MoE layer 0's num_experts=8"):
        compress(tiny_lm(), [("merge", {"groups": "9"})], ids())
    with pytest.raises(CompressionError, match="groups=0 is invalid"):
        compress(tiny_lm(), [("merge", {"groups": 0})], ids())
    with pytest.raises(CompressionError, match="unknown option"):
        compress(tiny_lm(), [("merge", {"group": 2})], ids())


def test_the_naive_baselines_are_options():
    calibration = ids(seed=2)
    router = compress(tiny_lm(), [("merge", {"groups": 3})], calibration)
    random = compress(tiny_lm(), [("merge", {"groups": 3, "grouping": "random"})], calibration)
    router_E, random_E = (m.moe_layers[0].experts.group_E for m in (router, random))
    assert sorted(random_E.bincount().tolist()) == [2, 3, 3]  # balanced random groups
    assert not torch.equal(router_E, random_E)
    plain = compress(
        tiny_lm(), [("merge", {"groups": 3, "weighting": "uniform", "align": "false"})], calibration
    )
    experts = tiny_lm().moe_layers[0].experts
    plain_E = plain.moe_layers[0].experts.group_E
    members = plain_E == 0  # the plain average of the group's unaligned members
    torch.testing.assert_close(
        plain.moe_layers[0].experts.inner.w1[0], experts.w1[members].mean(dim=0)
    )
    with pytest.raises(CompressionError, match="grouping='kmeans' is invalid"):
        compress(tiny_lm(), [("merge", {"groups": 2, "grouping": "kmeans"})], calibration)
