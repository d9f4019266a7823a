"""The sparsify grid's model cache: a cached converted model of the pre-0.1.0 layout (separate
``w_gate`` / ``w_up``) is rebuilt, never loaded with its up projections skipped."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import xmoe.conversion.real_model as real_model
import xmoe.experiments.sparsify_runner as sparsify_runner
from xmoe.experiments.sparsify_settings import EvalSettings
from xmoe.storage import read_verified, save_verified

from helpers import pre_fusion_layout

TINY = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
TINY |= {"num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 32}


def _runner(tmp_path, monkeypatch) -> sparsify_runner.Runner:
    """A runner over a tiny random Llama and random calibration tokens (nothing downloaded)."""
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    monkeypatch.setattr(real_model, "load_real_model", lambda cache_dir: (dense, None, None))
    calibration = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    data = {"calibration": calibration}
    monkeypatch.setattr(sparsify_runner, "load_or_build_data", lambda *a: data)
    settings = EvalSettings(out=tmp_path, router_steps=2, progress=False, eval_batch=2, seq_len=16)
    return sparsify_runner.Runner(settings)


def test_a_cached_model_of_the_pre_fusion_layout_is_rebuilt(tmp_path, monkeypatch):
    runner = _runner(tmp_path, monkeypatch)
    expected = runner.converted(8, "clustered").state_dict()
    path = tmp_path / "models" / "clustered-H8.safetensors"
    tensors, meta, _ = read_verified(path)
    old = pre_fusion_layout(tensors)
    save_verified(path, old, meta)
    state = runner.converted(8, "clustered").state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert not any(key.endswith("w_up") for key in load_file(path))  # rewritten in today's layout


def test_the_last_neuron_conversion_is_reused_as_an_independent_copy(tmp_path, monkeypatch):
    """Recovery budgets share one conversion: a second call converts nothing and returns a
    copy that training in place cannot reach; another (method, F) converts again."""
    runner = _runner(tmp_path, monkeypatch)
    calls = []
    real = sparsify_runner.sparsify
    monkeypatch.setattr(
        sparsify_runner, "sparsify", lambda *a, **k: calls.append(k) or real(*a, **k)
    )
    first = runner.neuron_model("gate-first", 0.5)
    with torch.no_grad():
        for parameter in first.parameters():
            parameter.add_(1.0)
    second = runner.neuron_model("gate-first", 0.5)
    assert len(calls) == 1
    fresh = real(runner.dense, mode="neurons", target_flops=0.5, mlp_inputs=runner.mlp_inputs(),
                 progress=False, **sparsify_runner.NEURON_METHODS["gate-first"])  # fmt: skip
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name
    runner.neuron_model("wina-greedy", 0.5)
    runner.neuron_model("gate-first", 0.5)
    assert len(calls) == 3
