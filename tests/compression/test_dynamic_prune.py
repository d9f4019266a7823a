from __future__ import annotations

import pytest
import torch

from tests.compression.lm import ids, logits_of, tiny_lm
from xmoe.compression import CompressionError, compress


def _experts_per_token(model) -> float:
    with torch.no_grad():
        routing = model(ids()).routing
    return float(sum(float(stats.kept_per_token.double().mean()) for stats in routing))


def test_beta_zero_is_the_identity():
    model = tiny_lm()
    before = logits_of(model, ids())
    compress(model, [("dynamic-prune", {"beta": 0.0})], ids())
    torch.testing.assert_close(logits_of(model, ids()), before, rtol=0, atol=0)


def test_beta_drops_weak_second_experts_and_keeps_the_weight():
    model = tiny_lm()
    full = _experts_per_token(model)
    compress(model, [("dynamic-prune", {"beta": 0.5})], ids())
    pruned = _experts_per_token(model)
    assert 2.0 < pruned < full == 4.0  # two layers of top-2: some tokens lost an expert
    compress(model, [("dynamic-prune", {"beta": 1.0})], ids())
    assert _experts_per_token(model) == 2.0  # every second expert weighs at most the first
    router = model.moe_layers[0].router
    x = torch.randn(6, 16, dtype=torch.float64)
    selection = router(x).selection
    assert selection.wanted_SK[:, 1].sum() == 0
    inner = router.inner(x).selection  # the dropped weight went to the first expert
    torch.testing.assert_close(selection.weight_SK[:, 0], inner.weight_SK.sum(dim=1))


def test_bad_beta_is_named():
    with pytest.raises(
        CompressionError, match=r"beta=1.5 is invalid: it must be a number in \[0, 1\]"
    ):
        compress(tiny_lm(), [("dynamic-prune", {"beta": "1.5"})], ids())
