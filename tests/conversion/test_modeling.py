"""Sparsified model directories saved before SparseMLP was an MoELayer (expert weights named
``mlp.w_gate_up`` / ``mlp.w_down``) load through ``from_pretrained``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM

from tests.conversion.test_sparsify import logits, tiny_llama, token_ids
from xmoe.conversion import load_sparsified, register, sparsify
from xmoe.storage import read_verified, save_verified


def test_a_directory_of_the_earlier_layout_loads(tmp_path):
    sparse = sparsify(tiny_llama(), 8, router="oracle", threshold=0.7, active_fraction=None)
    sparse.save_pretrained(tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    tensors, metadata, _ = read_verified(path)
    assert "model.layers.0.mlp.experts.w1" in tensors
    earlier = {
        k.replace("mlp.experts.w1", "mlp.w_gate_up").replace("mlp.experts.w2", "mlp.w_down"): v
        for k, v in tensors.items()
    }
    save_verified(path, earlier, metadata)
    expected = logits(sparse, token_ids())
    register()
    for load in (load_sparsified, AutoModelForCausalLM.from_pretrained):
        torch.testing.assert_close(logits(load(tmp_path), token_ids()), expected, rtol=0, atol=0)
