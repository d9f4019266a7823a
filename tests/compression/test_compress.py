from __future__ import annotations

import os

import pytest
import torch

from tests.compression.lm import ids, logits_of, tiny_lm
from xmoe.compression import (
    CompressionError,
    compress,
    load_compressed,
    model_size,
    parse_pass,
    save_compressed,
)
from xmoe.models import ModelConfig, TransformerLM
from xmoe.registry import PASSES


def test_every_pass_is_registered():
    assert {"merge", "reduce", "residual", "dynamic-prune", "quantize", "prune"} <= set(PASSES)


def test_pass_text_is_parsed():
    assert parse_pass("quantize:bits=3,group_size=32") == (
        "quantize",
        {"bits": "3", "group_size": "32"},
    )
    assert parse_pass("dynamic-prune") == ("dynamic-prune", {})
    with pytest.raises(CompressionError, match="must be KEY=VALUE"):
        parse_pass("merge:groups")


def test_passes_compose_and_the_output_saves_loads_and_is_measured(tmp_path):
    model = tiny_lm()
    passes = [("merge", {"groups": 4}), ("quantize", {"bits": 4}), ("dynamic-prune", {})]
    compress(model, passes, ids(seed=2))
    expected = logits_of(model, ids())
    out = save_compressed(model, tmp_path / "out", passes=passes)
    loaded, recorded = load_compressed(out)
    torch.testing.assert_close(logits_of(loaded, ids()), expected, rtol=0, atol=0)
    assert recorded == [[name, options] for name, options in passes]
    size = model_size(loaded, out)
    assert size.disk_bytes == sum(os.stat(p).st_size for p in out.iterdir())
    experts = [layer.experts for layer in loaded.moe_layers]
    held = sum(t.untyped_storage().nbytes() for e in experts for t in e.state_dict().values())
    assert size.expert_bytes == held


def test_a_model_without_moe_layers_and_unknown_passes_are_named():
    dense = TransformerLM(ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2))
    with pytest.raises(CompressionError, match="has no MoE layers"):
        compress(dense, [("merge", {"groups": 2})], ids())
    with pytest.raises(CompressionError, match="unknown compression pass 'fold'"):
        compress(tiny_lm(), [("fold", {})], ids())
    with pytest.raises(CompressionError, match=r"calibration must be a non-empty \(B, T\)"):
        compress(tiny_lm(), [("merge", {"groups": 2})], torch.zeros(3))


def test_a_failed_save_leaves_no_output_directory(tmp_path, monkeypatch):
    import xmoe.compression.saving as saving

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "save_verified", fail)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(tiny_lm(), tmp_path / "out", passes=[])
    assert list(tmp_path.iterdir()) == []
