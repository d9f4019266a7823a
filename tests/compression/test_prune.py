from __future__ import annotations

import pytest
import torch

from tests.compression.lm import ids, logits_of, tiny_lm
from xmoe.compression import CompressionError, compress, load_compressed, save_compressed
from xmoe.compression.prune import calibration_loss, removal_loss, wrap_routers


def test_greedy_pruning_loses_no_more_than_random_pruning():
    calibration = ids(4, 16, seed=2)
    greedy = compress(tiny_lm(num_experts=4), [("prune", {"experts": 2})], calibration)
    greedy_loss = calibration_loss(greedy, calibration)
    baselines = [{"method": "random", "seed": seed} for seed in range(4)] + [
        {"method": "magnitude"}
    ]
    for baseline in baselines:
        model = compress(
            tiny_lm(num_experts=4), [("prune", {"experts": 2, **baseline})], calibration
        )
        assert greedy_loss <= calibration_loss(model, calibration), baseline


def test_one_round_removes_the_lowest_single_removal_losses_and_keeps_a_layer_alive():
    calibration = ids(4, 16, seed=3)
    model = tiny_lm(num_experts=4)
    routers = wrap_routers(model, 0)
    losses = {
        (layer, e): removal_loss(model, routers, (layer, e), calibration)
        for layer in range(len(routers))
        for e in range(4)
    }
    # one round of 3: the three lowest scores, unless that would empty a layer
    expected, kept = [], {layer: 4 for layer in range(len(routers))}
    for choice in sorted(losses, key=lambda c: (losses[c], c)):
        if len(expected) < 3 and kept[choice[0]] > 1:
            expected.append(choice)
            kept[choice[0]] -= 1
    pruned = compress(
        tiny_lm(num_experts=4), [("prune", {"experts": 3, "per_round": 3})], calibration
    )
    removed = [
        (layer, e)
        for layer, moe in enumerate(pruned.moe_layers)
        for e in (~moe.router.alive_E).nonzero().squeeze(1).tolist()
    ]
    assert sorted(removed) == sorted(expected)
    # a round larger than the budget, and more than a layer can give: still exact counts
    pruned = compress(
        tiny_lm(num_experts=4), [("prune", {"experts": 6, "per_round": 50})], calibration
    )
    alive = [int(moe.router.alive_E.sum()) for moe in pruned.moe_layers]
    assert sum(4 - a for a in alive) == 6 and min(alive) >= 1


def test_per_round_one_removes_the_argmin_of_fresh_scores_each_time():
    calibration = ids(4, 16, seed=2)
    model = tiny_lm(num_experts=4)
    routers = wrap_routers(model, 0)
    for _ in range(3):  # the reference loop: rescore every alive expert, remove the lowest
        choices = [
            (layer, e)
            for layer, r in enumerate(routers)
            if int(r.alive_E.sum()) > 1
            for e in r.alive_E.nonzero().squeeze(1).tolist()
        ]
        layer, e = min(choices, key=lambda c: (removal_loss(model, routers, c, calibration), c))
        routers[layer].alive_E[e] = False
    pruned = compress(
        tiny_lm(num_experts=4), [("prune", {"experts": 3, "per_round": 1})], calibration
    )
    for router, moe in zip(routers, pruned.moe_layers, strict=True):
        assert torch.equal(router.alive_E, moe.router.alive_E)


def test_pruned_experts_are_never_selected_nor_held_and_the_model_round_trips(tmp_path):
    passes = [("prune", {"experts": 3, "method": "magnitude"})]
    model = compress(tiny_lm(), passes, ids(seed=2))
    alive = [layer.router.alive_E for layer in model.moe_layers]
    assert sum(int((~a).sum()) for a in alive) == 3
    x = torch.randn(40, 16, dtype=torch.float64)
    for layer, alive_E in zip(model.moe_layers, alive, strict=True):
        selection = layer.router(x).selection
        assert bool(alive_E[selection.expert_idx_SK[selection.wanted_SK]].all())
        assert layer.experts.inner.num_experts == int(alive_E.sum())
    out = save_compressed(model, tmp_path / "out", passes=passes)
    loaded, _ = load_compressed(out)
    torch.testing.assert_close(logits_of(loaded, ids()), logits_of(model, ids()), rtol=0, atol=0)


@pytest.mark.parametrize("router", ["topk", "threshold", "sigmoid", "null_topk"])
def test_a_removed_expert_is_never_selected_by_any_router(router):
    model = tiny_lm(router=router)
    x = torch.randn(40, 16, dtype=torch.float64)
    busiest = int(model.moe_layers[0].router(x).selection.top1_expert_S.mode().values)
    routers = wrap_routers(model, 1)
    routers[0].alive_E[busiest] = False
    selection = routers[0](x).selection
    chosen = selection.expert_idx_SK[selection.wanted_SK]
    assert busiest not in chosen.tolist() and len(chosen) > 0


def test_kept_experts_whose_full_softmax_underflows_still_share_the_weight():
    # expert 0's logit beats every other by ~1e5: the full softmax gives the others exactly 0
    model = tiny_lm()
    (router, _) = wrap_routers(model, 1)
    x = torch.ones(4, 16, dtype=torch.float64)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0] = 1e4
        router.weight[5, 0] = 1.0  # expert 5 leads among the others by logit 1
    assert bool((router.inner(x).probs_SE[:, 1:] == 0).all())
    router.alive_E[0] = False
    output = router(x)
    assert bool(torch.isfinite(output.probs_SE).all())
    torch.testing.assert_close(output.probs_SE.sum(dim=-1), torch.ones(4, dtype=torch.float64))
    assert output.probs_SE[0, 0] == 0 and output.selection.top1_expert_S.tolist() == [5] * 4
    assert bool(torch.isfinite(output.selection.weight_SK).all())


def test_bad_prune_budgets_and_order_are_named():
    with pytest.raises(CompressionError, match="method='oracle' is invalid"):
        compress(tiny_lm(), [("prune", {"experts": 1, "method": "oracle"})], ids())
    with pytest.raises(
        CompressionError, match="per_round=0 is invalid: it must be an integer >= 1"
    ):
        compress(tiny_lm(), [("prune", {"experts": 1, "per_round": 0})], ids())
    with pytest.raises(CompressionError, match="experts=15 is more than the 14 that can go"):
        compress(tiny_lm(), [("prune", {"experts": 15})], ids())
    merged = compress(tiny_lm(), [("merge", {"groups": 4})], ids())
    with pytest.raises(CompressionError, match="prune before the other passes"):
        compress(merged, [("prune", {"experts": 1})], ids())
