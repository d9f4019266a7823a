"""XMoEConfig: ``tie_word_embeddings`` is the one owner of the tie setting (``tie_embeddings``
names the same attribute), and the caller's value wins, as in transformers' common model test
``test_load_save_without_tied_weights``."""

from __future__ import annotations

import json

import pytest
import torch

from xmoe.hf import XMoEConfig, XMoEForCausalLM


def _config(**overrides) -> XMoEConfig:
    values = {"vocab_size": 60, "d_model": 32, "num_layers": 2, "num_heads": 2}
    values |= {"max_seq_len": 64, "d_ff": 64}
    values["moe"] = {"d_model": 32, "num_experts": 8, "d_expert": 16}
    return XMoEConfig(**values | overrides)


def _is_tied(model: XMoEForCausalLM) -> bool:
    """Whether the output projection is the embedding matrix (no separate parameter)."""
    output = model.get_output_embeddings()
    embedding = model.get_input_embeddings().weight
    if output is None:
        return True
    assert output.weight.data_ptr() != embedding.data_ptr()
    return False


@pytest.mark.parametrize("tied", [True, False])
def test_caller_tie_setting_wins_and_survives_save_load(tied, tmp_path):
    """The common test: a config created one way, then ``tie_word_embeddings`` set the other."""
    config = _config(tie_word_embeddings=tied)
    config.tie_word_embeddings = not tied
    assert config.tie_embeddings is (not tied)  # one attribute under both names
    torch.manual_seed(0)
    model = XMoEForCausalLM(config).eval()
    assert _is_tied(model) is (not tied)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tie_word_embeddings"] is (not tied) and "tie_embeddings" not in saved
    reloaded = XMoEForCausalLM.from_pretrained(tmp_path).eval()
    assert _is_tied(reloaded) is (not tied)
    state = reloaded.state_dict()
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    ids = torch.randint(0, 60, (2, 7))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("tied", [True, False])
def test_config_kwargs_override_the_saved_tie_setting(tied, tmp_path):
    _config(tie_word_embeddings=tied).save_pretrained(tmp_path)
    config = XMoEConfig.from_pretrained(tmp_path, tie_word_embeddings=not tied)
    assert config.to_model_config().tie_embeddings is (not tied)
    assert _is_tied(XMoEForCausalLM(config)) is (not tied)


def test_config_json_of_the_older_two_field_form_loads():
    """Directories saved before one field owned the setting hold both names, agreeing."""
    values = _config().to_dict() | {"tie_embeddings": False, "tie_word_embeddings": False}
    assert XMoEConfig(**values).to_model_config().tie_embeddings is False


def test_save_pretrained_records_the_tie_the_modules_hold(tmp_path):
    model = XMoEForCausalLM(_config(tie_word_embeddings=False))
    model.config.tie_word_embeddings = True  # the modules stay untied
    model.save_pretrained(tmp_path)
    assert _is_tied(XMoEForCausalLM.from_pretrained(tmp_path)) is False
