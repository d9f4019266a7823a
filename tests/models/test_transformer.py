"""The decoder LM: shapes, caching, masks, MoE placement, thresholds and config errors."""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch

from xmoe import ConfigError, MoEConfig
from xmoe.models import ModelConfig, TransformerLM
from xmoe.models.transformer import check_input_ids


def _config(moe: bool = True, **overrides) -> ModelConfig:
    values = {"vocab_size": 50, "d_model": 32, "num_layers": 4, "num_heads": 4}
    values |= {"max_seq_len": 48, "d_ff": 64}
    values |= overrides
    moe_config = MoEConfig(d_model=values["d_model"], num_experts=8, d_expert=16) if moe else None
    return ModelConfig(**values, moe=moe_config)


def _model(seed: int = 0, **kwargs) -> TransformerLM:
    torch.manual_seed(seed)
    model = TransformerLM(_config(**kwargs))
    # a trained-looking router: peaked probabilities, so thresholds matter
    for layer in model.moe_layers:
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    return model.eval()


def test_moe_blocks_every_second_and_outputs():
    model = _model()
    assert [block.is_moe for block in model.blocks] == [False, True, False, True]
    ids = torch.randint(0, 50, (3, 10))
    out = model(ids, ids)
    assert out.logits.shape == (3, 10, 50)
    assert out.loss.shape == () and len(out.routing) == 2 and out.aux_loss.shape == ()
    assert model.moe_flops_per_token(out.routing) > 0


def test_dense_model_has_no_routing_and_counts_dense_flops():
    model = _model(moe=False)
    out = model(torch.randint(0, 50, (2, 5)))
    assert out.routing == [] and float(out.aux_loss) == 0.0
    assert model.moe_flops_per_token(out.routing) == 2 * 4 * 32 * 64


def test_causal_prefix_independence():
    """Logits at position i never depend on later tokens."""
    model = _model()
    ids = torch.randint(0, 50, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    torch.testing.assert_close(model(ids).logits[:, :8], model(changed).logits[:, :8])


def test_left_padding_with_mask_matches_unpadded():
    model = _model()
    ids = torch.randint(1, 50, (1, 7))
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 3), torch.ones(1, 7)), dim=1)
    positions = (mask.cumsum(1) - 1).clamp_min(0).long()
    alone = model(ids).logits
    inside = model(padded, attention_mask=mask, position_ids=positions).logits[:, 3:]
    torch.testing.assert_close(inside, alone, rtol=1e-5, atol=1e-5)


def test_lower_threshold_never_adds_experts():
    model = _model()
    ids = torch.randint(0, 50, (4, 16))
    counts = []
    for threshold in (1.0, 0.9, 0.7, 0.5, 0.2):
        model.set_threshold(threshold)
        out = model(ids)
        counts.append(torch.stack([s.kept_per_token for s in out.routing]))
        assert all(layer.router.threshold == threshold for layer in model.moe_layers)
    for more, fewer in itertools.pairwise(counts):
        assert bool((fewer <= more).all())
    assert counts[0].float().mean() > counts[-1].float().mean()
    with pytest.raises(ConfigError, match="threshold"):
        model.set_threshold(1.5)


def test_capacity_applies_in_training_only_by_default():
    torch.manual_seed(0)
    config = _config()
    config = dataclasses.replace(config, moe=dataclasses.replace(config.moe, capacity_factor=0.5))
    model = TransformerLM(config)
    ids = torch.randint(0, 50, (4, 16))
    model.train()
    assert float(model(ids).routing[0].drop_fraction) > 0
    model.eval()
    assert float(model(ids).routing[0].drop_fraction) == 0
    model.set_capacity_at_eval(True)
    assert float(model(ids).routing[0].drop_fraction) > 0


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"num_heads": 5}, "num_heads"),
        ({"moe_every": 9}, "moe_every"),
        ({"dropout": 1.0}, "dropout"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"dense_activation": "tanh"}, "dense_activation"),
    ],
)
def test_bad_model_config_names_the_field(overrides, name):
    with pytest.raises(ConfigError, match=name):
        _config(**overrides)


def test_moe_width_must_match_model():
    with pytest.raises(ConfigError, match=r"moe\.d_model"):
        ModelConfig(vocab_size=10, d_model=32, num_heads=2, moe=MoEConfig(64, 4, 8))


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), ()])
def test_input_ids_of_wrong_rank_rejected(shape):
    ids = torch.zeros(shape, dtype=torch.long)
    expected = rf"^input_ids\.shape={re.escape(str(tuple(shape)))} is invalid: .*\(batch, seq_len\)"
    with pytest.raises(ValueError, match=expected):
        _model()(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.int16, torch.uint8])
def test_input_ids_of_non_index_dtype_rejected(dtype):
    with pytest.raises(TypeError, match=rf"^input_ids\.dtype={dtype} is invalid: .*integer"):
        _model()(torch.zeros(2, 3, dtype=dtype))


def test_int32_input_ids_accepted():
    model = _model()
    ids = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(model(ids.int()).logits, model(ids).logits)


@pytest.mark.parametrize(("low", "high"), [(0, 50), (-1, 5), (-5, 60)])
def test_out_of_range_input_ids_rejected_on_cpu(low, high):
    ids = torch.tensor([[low, 1, 2], [3, 4, high]])
    message = rf"^input_ids range \[{low}, {high}\] is invalid: .*\[0, vocab_size=50\)"
    with pytest.raises(ValueError, match=message):
        _model()(ids)


def test_input_ids_range_checked_only_on_cpu():
    """Off the CPU the range check would need a host sync, so it is skipped."""
    check_input_ids(torch.full((1, 2), 99, dtype=torch.long, device="meta"), 50)
    with pytest.raises(ValueError, match="vocab_size=50"):
        check_input_ids(torch.full((1, 2), 99, dtype=torch.long), 50)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        check_input_ids([[1, 2]], 50)


def test_bad_threshold_changes_nothing_and_good_one_sets_the_routers_only():
    model = _model()
    config = model.config
    layer_configs = [layer.config for layer in model.moe_layers]
    for bad in (float("nan"), float("inf"), True, 0.0, "0.5"):
        with pytest.raises(ConfigError, match=r"^threshold="):
            model.set_threshold(bad)
    assert all(layer.router.threshold == 0.9 for layer in model.moe_layers)
    model.set_threshold(0.5)
    assert all(layer.router.threshold == 0.5 for layer in model.moe_layers)
    # the recipe is never re-installed: no config object is replaced or changed
    assert model.config is config and config.moe.threshold == 0.9
    for layer, layer_config in zip(model.moe_layers, layer_configs, strict=True):
        assert layer.config is layer.router.config is layer.experts.config is layer_config
    assert model.live_config().moe.threshold == 0.5


def test_too_long_input_rejected():
    with pytest.raises(ValueError, match="max_seq_len"):
        _model()(torch.zeros(1, 49, dtype=torch.long))


def test_expert_usage_counts_what_the_layers_computed():
    from xmoe.models.usage import ExpertUsage

    model = _model()
    ids = torch.randint(0, 50, (2, 9))
    with ExpertUsage(model) as usage:
        out = model(ids)
        model(ids[:, :3])
    kept = [s.kept_per_token.float() for s in out.routing]
    assert usage.tokens == [18 + 6] * 2
    first_call = sum(float(k.sum()) for k in kept)
    assert sum(usage.pairs) > first_call  # the second call was counted too
    model(ids)  # hooks are gone after the block
    assert usage.tokens == [24, 24]


def test_loss_without_logits_matches_the_logits_loss_and_gradients():
    model = _model().train()
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    results = []
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(ids, targets, return_logits=return_logits)
        (out.loss + out.aux_loss).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (with_logits, grads), (without, fused_grads) = results
    assert with_logits.logits.shape == (3, 10, 50) and without.logits is None
    torch.testing.assert_close(without.loss, with_logits.loss, rtol=1e-6, atol=0)
    assert grads.keys() == fused_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
