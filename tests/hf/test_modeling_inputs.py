"""Inputs the transformers model must refuse (odd attention masks, generating past max_seq_len)
and a config.json that no longer matches the weights saved with it."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM

import xmoe  # noqa: F401  (registers the Auto classes)
from xmoe.hf import XMoEConfig, XMoEForCausalLM
from xmoe.storage import DamagedFileError


def _model(**overrides) -> XMoEForCausalLM:
    values = {"vocab_size": 60, "d_model": 32, "num_layers": 2, "num_heads": 2, "d_ff": 64}
    values |= {"max_seq_len": 16, "moe": {"d_model": 32, "num_experts": 8, "d_expert": 16}}
    torch.manual_seed(0)
    return XMoEForCausalLM(XMoEConfig(**(values | overrides))).eval()


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (torch.tensor([[1.0, 0.5, 1.0], [1.0, 1.0, 1.0]]), r"attention_mask holds 0\.5"),
        (torch.tensor([[1, 2, 1], [1, 1, 1]]), "attention_mask holds 2"),
        (torch.tensor([[1, 1, 1], [0, 0, 0]]), "attention_mask row 1 is all 0"),
        (torch.tensor([[True, True], [False, False]]), "attention_mask row 1 is all 0"),
        (torch.full((2, 1, 3, 3), 2), "attention_mask holds 2"),  # 4-D integer: 0/1 too
    ],
)
def test_attention_masks_other_than_0_1_or_without_a_token_are_refused(mask, message):
    model = _model()
    ids = torch.randint(0, 60, (2, mask.shape[-1]))
    with pytest.raises(ValueError, match=message):
        model(ids, attention_mask=mask)


def test_valid_masks_still_work():
    model = _model()
    ids = torch.randint(0, 60, (2, 3))
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    for mask in (left_padded, left_padded.bool(), left_padded.float()):
        assert torch.isfinite(model(ids, attention_mask=mask).logits).all()
    additive = torch.zeros(2, 1, 3, 3).masked_fill(torch.ones(3, 3).triu(1).bool(), -1e9)
    assert torch.isfinite(model(ids, attention_mask=additive).logits).all()


def test_generate_past_max_seq_len_fails_before_the_first_forward():
    model = _model()
    calls = []
    model.model.register_forward_pre_hook(lambda *_: calls.append(1))
    ids = torch.randint(0, 60, (1, 10))
    with pytest.raises(ValueError, match=r"10 tokens\) \+ 7 new tokens = 17 exceeds .*=16"):
        model.generate(ids, max_new_tokens=7, do_sample=False)
    assert calls == []  # refused up front, not after generating
    assert model.generate(ids, max_new_tokens=6, do_sample=False).shape == (1, 16)


def _edit_config(directory, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for name, value in changes.items():
        *parents, leaf = name.split("__")
        target = config
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    path.write_text(json.dumps(config, indent=2))


def test_a_config_json_edited_since_the_weights_were_saved_is_reported(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 60, (1, 8))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unedited: loads without a word
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits,
                           model(ids).logits)  # fmt: skip

    _edit_config(tmp_path, moe__threshold=0.1)  # a routing setting: loads, with a warning
    with pytest.warns(UserWarning, match=r"moe\.threshold=0\.1 \(saved with 0\.9\)"):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.moe["threshold"] == 0.1

    _edit_config(tmp_path, moe__threshold=0.9, num_heads=4)  # same shapes, other weights' meaning
    with pytest.raises(DamagedFileError, match=r"config mismatch: .*num_heads=4 \(saved with 2\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="num_heads=4"):  # transformers' opt-out: a warning
        AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
