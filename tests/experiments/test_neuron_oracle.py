"""The per-neuron oracle of the sparsify grid (experiments/neuron_oracle.py): the expert mode's
oracle router at H=1, as one masked dense FFN, on tiny random Llamas (float64)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tests.conversion.test_sparsify import FFN, logits, tiny_llama, token_ids
from xmoe.config import ConfigError
from xmoe.conversion import sparsify
from xmoe.experiments.neuron_oracle import (
    neuron_oracle_model,
    oracle_mlps,
    set_oracle_fraction,
)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_it_is_the_one_neuron_expert_oracle(fraction):
    dense = tiny_llama(initializer_range=0.2)  # MLPs large enough to matter
    ids = token_ids()
    experts = sparsify(dense, 1, "contiguous", router="oracle", active_fraction=fraction)
    oracle = neuron_oracle_model(dense, fraction)
    torch.testing.assert_close(logits(oracle, ids), logits(experts, ids), rtol=0, atol=1e-10)
    kept = experts.model.layers[0].mlp.experts_per_token.double().mean() / FFN
    assert float(oracle_mlps(oracle)[0].flops_fraction.mean()) == pytest.approx(float(kept))
    assert not torch.equal(logits(oracle, ids), logits(dense, ids))


def test_every_neuron_kept_is_the_dense_model_and_the_input_is_unchanged():
    dense = tiny_llama()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    oracle = neuron_oracle_model(dense, 0.5)
    set_oracle_fraction(oracle, 1.0)
    ids = token_ids()
    torch.testing.assert_close(logits(oracle, ids), logits(dense, ids), rtol=0, atol=1e-12)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())
    assert [m.flops_fraction.unique().tolist() for m in oracle_mlps(oracle)] == [[1.0]] * 2


def test_a_bad_fraction_is_named():
    with pytest.raises(ConfigError, match=r"active_fraction=1.5 is invalid"):
        neuron_oracle_model(tiny_llama(), 1.5)
