"""The sparsify grid's cache: a cached converted model of the pre-0.1.0 layout (separate
``w_gate`` / ``w_up``) is rebuilt, never loaded with its up projections skipped; the last neuron
conversion is reused as a copy; the cells live beside the report, not in the run directory."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import xmoe.conversion.real_model as real_model
import xmoe.experiments.sparsify_runner as sparsify_runner
from xmoe.experiments.sparsify_runner import cached_cells
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
    settings = EvalSettings(out=tmp_path / "run", docs=tmp_path / "docs", router_steps=2,
                            progress=False, eval_batch=2, seq_len=16)  # fmt: skip
    return sparsify_runner.Runner(settings)


def test_a_cached_model_of_the_pre_fusion_layout_is_rebuilt(tmp_path, monkeypatch):
    runner = _runner(tmp_path, monkeypatch)
    expected = runner.converted(8, "clustered").state_dict()
    path = tmp_path / "run" / "models" / "clustered-H8.safetensors"
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


def test_cells_live_beside_the_report_and_survive_a_lost_run_directory(tmp_path, monkeypatch):
    """The run directory (windows, models, checkpoints: large, uncommitted) can vanish between
    sessions; the cells are stored beside the report, so a new runner still finds them."""
    runner = _runner(tmp_path, monkeypatch)
    runner.store("dense", {"kind": "dense", "ppl": {"kjv": 16.0}})
    assert (tmp_path / "docs" / "sparsify_cells" / "dense.json").is_file()
    shutil.rmtree(tmp_path / "run")
    again = _runner(tmp_path, monkeypatch)
    assert again.cached("dense")["ppl"] == {"kjv": 16.0}
    assert [c["name"] for c in cached_cells(again.settings)] == ["dense"]
    quick = dataclasses.replace(again.settings, quick=True)  # its cells never reach the docs
    assert quick.cells_dir == tmp_path / "run" / "sparsify_cells"
