from __future__ import annotations

import pytest
import torch

from tests.compression.lm import logits_of, tiny_lm
from xmoe.compression import CompressionError, compress
from xmoe.compression.base import collect_routing


def _domain_ids(low: int, seed: int) -> torch.Tensor:
    """Windows of one toy domain: tokens [low, low + 16) of the 32."""
    return torch.randint(low, low + 16, (4, 16), generator=torch.Generator().manual_seed(seed))


def two_domain_lm():
    """The tiny LM with two disjoint domains: tokens 0-15 ("kjv") carry +5 in feature 0,
    tokens 16-31 ("shakespeare") -5, and every router sends a positive feature 0 to experts 0-3
    and a negative one to experts 4-7: each domain uses half of every layer's experts."""
    model = tiny_lm()
    with torch.no_grad():
        model.embed.weight[:16, 0] = 5.0
        model.embed.weight[16:, 0] = -5.0
        for layer in model.moe_layers:
            layer.router.weight[:4, 0] = 20.0
            layer.router.weight[4:, 0] = -20.0
    domains = {"kjv": _domain_ids(0, seed=1), "shakespeare": _domain_ids(16, seed=2)}
    return model, domains


def test_reducing_on_one_domain_keeps_that_domain_and_not_the_other():
    model, domains = two_domain_lm()
    kjv, shakespeare = _domain_ids(0, seed=3), _domain_ids(16, seed=4)
    for stats in collect_routing(model, torch.cat([kjv, domains["kjv"]])):
        assert stats.counts_E[4:].sum() == 0  # kjv never selects experts 4-7
    before = {name: logits_of(model, ids) for name, ids in (("kjv", kjv), ("sh", shakespeare))}
    mixed = torch.cat(list(domains.values()))
    reduce = [("reduce", {"groups": 4, "domain": "kjv"})]
    compress(model, reduce, mixed, domains=domains)
    assert all(layer.experts.inner.num_experts == 4 for layer in model.moe_layers)
    # the kjv-chosen groups fold experts 4-7 (never used on kjv) into kjv's four: the kjv
    # function is kept exactly, and shakespeare, whose experts were merged away, changes
    torch.testing.assert_close(logits_of(model, kjv), before["kjv"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(logits_of(model, shakespeare), before["sh"], atol=1e-3)
    # the same reduction chosen on shakespeare's windows keeps shakespeare instead
    other, _ = two_domain_lm()
    compress(other, [("reduce", {"groups": 4, "domain": "shakespeare"})], mixed, domains=domains)
    torch.testing.assert_close(logits_of(other, shakespeare), before["sh"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(logits_of(other, kjv), before["kjv"], atol=1e-3)


def test_bad_reduce_options_are_named():
    model, domains = two_domain_lm()
    calibration = domains["kjv"]
    with pytest.raises(CompressionError, match=r"reduce: domain='bible' is invalid: the calibra"):
        compress(
            model, [("reduce", {"groups": 2, "domain": "bible"})], calibration, domains=domains
        )
    with pytest.raises(CompressionError, match=r"reduce: domain='kjv' is invalid: .* domains \[\]"):
        compress(model, [("reduce", {"groups": 2, "domain": "kjv"})], calibration)
    with pytest.raises(CompressionError, match="reduce: groups=9 is more than MoE layer 0's"):
        compress(model, [("reduce", {"groups": 9, "domain": "kjv"})], calibration, domains=domains)
    with pytest.raises(
        CompressionError, match=r"reduce: .*missing 1 required keyword-only .*domain"
    ):
        compress(model, [("reduce", {"groups": 2})], calibration, domains=domains)
    with pytest.raises(
        CompressionError, match="reduce: domain='' is invalid: it must name a corpus"
    ):
        compress(model, [("reduce", {"groups": 2, "domain": ""})], calibration, domains=domains)
