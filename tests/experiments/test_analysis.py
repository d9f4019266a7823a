"""Adaptivity measurement: per-token expert counts and loads over validation windows."""

from __future__ import annotations

import numpy as np
import torch

from xmoe.data import eval_batches, synthetic_token_data
from xmoe.experiments.analysis import measure_adaptivity
from xmoe.models import TransformerLM
from xmoe.routing import RoutingStats
from xmoe.training.presets import preset


def test_adaptivity_counts_routing_without_the_output_projection(monkeypatch):
    torch.manual_seed(0)
    model = TransformerLM(preset("tiny").model).eval()
    val = synthetic_token_data(vocab_size=64).val
    with torch.no_grad():  # the counts of a full model call on the same windows
        kept = [
            RoutingStats.mean(model(x_BT).routing).kept_per_token.reshape(-1)
            for x_BT, _ in eval_batches(val, 4, 32, 2)
        ]

    def no_projection():
        raise AssertionError("measure_adaptivity computed the logits it never reads")

    monkeypatch.setattr(model, "output_weight", no_projection)
    adaptivity = measure_adaptivity(model, val, 4, 32, max_batches=2)
    assert adaptivity.experts.shape == (8 * 32,)
    np.testing.assert_array_equal(adaptivity.experts, torch.cat(kept).numpy())
