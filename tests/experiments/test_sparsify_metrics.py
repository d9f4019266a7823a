"""The sparsify grid's measurements (experiments/sparsify_metrics.py) of neurons-mode models:
their FFN FLOPs are what their masks keep, never the dense count."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

from tests.conversion.test_sparsify import FFN, HIDDEN, TINY, logits, tiny_llama, token_ids
from xmoe.conversion import ffn_flops_fraction, sparsify
from xmoe.experiments.sparsify_data import DOMAINS
from xmoe.experiments.sparsify_metrics import measure_quality


def test_a_neurons_mode_model_counts_the_flops_its_masks_keep():
    dense = tiny_llama()
    sparse = sparsify(dense, calibration=token_ids(seed=2), mode="neurons", target_flops=0.5,
                      allocation="uniform")  # fmt: skip
    ids = token_ids(6, 16, seed=3)
    data = dict.fromkeys((f"eval_{d}" for d in DOMAINS), ids)  # one batch per domain, the same
    result = measure_quality(sparse, data, SimpleNamespace(eval_batch=6, progress=False), "n")
    logits(sparse, ids)
    assert result["ffn_flops_share"] == pytest.approx(ffn_flops_fraction(sparse), rel=1e-12)
    assert 0.3 < result["ffn_flops_share"] < 0.7  # near its target, far from dense
    assert result["experts_per_token"] is None
    dense_flops = 6 * HIDDEN * FFN * TINY["num_hidden_layers"]  # SwiGLU: three D×I matmuls
    assert result["ffn_flops"] == pytest.approx(result["ffn_flops_share"] * dense_flops)


def test_each_domain_gets_the_flop_share_its_own_tokens_pass():
    """The thresholds are shared, so two domains with different inputs get different shares;
    each is what a forward over that domain's tokens alone keeps, and the overall share is
    their token-weighted mean."""
    sparse = sparsify(tiny_llama(), calibration=token_ids(seed=2), mode="neurons",
                      target_flops=0.5)  # fmt: skip
    data = {
        f"eval_{DOMAINS[0]}": token_ids(6, 16, seed=3),
        f"eval_{DOMAINS[1]}": token_ids(3, 16, seed=4),
    }
    result = measure_quality(sparse, data, SimpleNamespace(eval_batch=4, progress=False), "n")
    shares = result["ffn_flops_share_by_domain"]
    for domain in DOMAINS:
        logits(sparse, data[f"eval_{domain}"])
        assert shares[domain] == pytest.approx(ffn_flops_fraction(sparse), rel=1e-12)
    assert shares[DOMAINS[0]] != shares[DOMAINS[1]]
    overall = (6 * shares[DOMAINS[0]] + 3 * shares[DOMAINS[1]]) / 9
    assert result["ffn_flops_share"] == pytest.approx(overall, rel=1e-12)
