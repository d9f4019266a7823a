"""xmoe inside transformers: Auto classes, save/load, generate with the KV cache, batch
independence, the threshold knob, config validation and strict loading."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

import xmoe  # noqa: F401  (registers the Auto classes)
from xmoe import ConfigError
from xmoe.cli.export import export_run
from xmoe.hf import XMoEConfig, XMoEForCausalLM, XMoEModel, register
from xmoe.models import TransformerLM


def _config(**overrides) -> XMoEConfig:
    values = {"vocab_size": 60, "d_model": 32, "num_layers": 2, "num_heads": 2}
    values |= {"max_seq_len": 64, "d_ff": 64}
    values["moe"] = {"d_model": 32, "num_experts": 8, "d_expert": 16}
    values |= overrides
    return XMoEConfig(**values)


def _model(dtype=torch.float32, seed=0, **overrides) -> XMoEForCausalLM:
    torch.manual_seed(seed)
    model = XMoEForCausalLM(_config(**overrides)).to(dtype).eval()
    for layer in model.model.lm.moe_layers:  # peaked, trained-looking routers
        torch.nn.init.normal_(layer.router.weight, std=1.0)
    return model


def test_auto_classes_resolve():
    register()
    register()  # idempotent
    values = {k: v for k, v in _config().to_dict().items() if k != "model_type"}
    config = AutoConfig.for_model("xmoe", **values)
    assert isinstance(config, XMoEConfig)
    assert isinstance(AutoModelForCausalLM.from_config(config), XMoEForCausalLM)
    assert isinstance(AutoModel.from_config(config), XMoEModel)


def test_save_load_round_trip_identical_logits(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 60, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    base = AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(
        base(ids).last_hidden_state, model.model(ids).last_hidden_state, rtol=0, atol=0
    )


def test_outputs_carry_aux_loss_and_experts_per_token():
    model = _model()
    ids = torch.randint(0, 60, (3, 7))
    out = model(ids, labels=ids)
    assert len(out.experts_per_token) == 1 and out.experts_per_token[0].shape == (3, 7)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    dense = _model(moe=None)
    assert dense(ids).experts_per_token == ()


@pytest.mark.parametrize("moe", [True, False])
def test_generate_with_and_without_cache_match(moe):
    model = _model() if moe else _model(moe=None)
    prompt = torch.randint(1, 60, (2, 5))
    common = {"max_new_tokens": 15, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(prompt, use_cache=True, **common)
    uncached = model.generate(prompt, use_cache=False, **common)
    assert cached.shape == (2, 20) and torch.equal(cached, uncached)


def test_sequence_generates_the_same_alone_and_in_a_padded_batch():
    model = _model(dtype=torch.float64)
    short = torch.randint(1, 60, (1, 4))
    long = torch.randint(1, 60, (1, 9))
    batch = torch.cat((torch.cat((torch.zeros(1, 5, dtype=torch.long), short), 1), long))
    mask = (torch.arange(9) >= torch.tensor([[5], [0]])).long()
    common = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    together = model.generate(batch, attention_mask=mask, **common)
    alone_short = model.generate(short, **common)
    alone_long = model.generate(long, **common)
    assert torch.equal(together[0, 5:], alone_short[0])
    assert torch.equal(together[1], alone_long[0])


def test_set_threshold_changes_experts_monotonically_and_is_saved(tmp_path):
    model = _model()
    ids = torch.randint(0, 60, (4, 16))
    counts = []
    for threshold in (1.0, 0.9, 0.6, 0.3):
        model.set_threshold(threshold)
        counts.append(model(ids).experts_per_token[0].float())
    for more, fewer in itertools.pairwise(counts):
        assert bool((fewer <= more).all())
    assert counts[-1].mean() < counts[0].mean()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["moe"]["threshold"] == 0.3
    assert (
        AutoModelForCausalLM.from_pretrained(tmp_path).model.lm.moe_layers[0].router.threshold
        == 0.3
    )


def test_set_threshold_is_router_state_saved_from_the_modules(tmp_path):
    """set_threshold changes routing through the routers alone (no config object is replaced
    or written); the model's live config rebuilds it for a state_dict, and save_pretrained
    records it, so both reload running at the new t."""
    model = _model()
    lm = model.model.lm
    ids = torch.randint(0, 60, (2, 16))
    hf_moe, lm_config = dict(model.config.moe), lm.config
    layer_configs = [layer.config for layer in lm.moe_layers]
    before = model(ids)
    model.set_threshold(0.3)
    after = model(ids)
    assert sum(after.experts_per_token).sum() < sum(before.experts_per_token).sum()
    assert model.config.moe == hf_moe and lm.config is lm_config
    assert lm_config.moe.threshold == 0.9
    assert [layer.config for layer in lm.moe_layers] == layer_configs
    assert all(layer.config is layer.router.config for layer in lm.moe_layers)

    rebuilt = TransformerLM(lm.live_config())
    rebuilt.load_state_dict(lm.state_dict())
    assert torch.equal(rebuilt.eval()(ids).logits, after.logits)

    model.save_pretrained(tmp_path)
    loaded = XMoEForCausalLM.from_pretrained(tmp_path).eval()
    assert all(layer.router.threshold == 0.3 for layer in loaded.model.lm.moe_layers)
    assert torch.equal(loaded(ids).logits, after.logits)


def test_save_refuses_layers_that_hold_different_thresholds(tmp_path):
    model = _model(num_layers=4)
    assert len(model.model.lm.moe_layers) == 2
    model.model.lm.moe_layers[0].router.set_threshold(0.5)
    with pytest.raises(ConfigError, match=r"hold different \['threshold'\]"):
        model.save_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, 1.5, None])
def test_bad_threshold_is_rejected_before_model_or_config_change(bad):
    model = _model()
    with pytest.raises(ConfigError, match=r"^threshold="):
        model.set_threshold(bad)
    assert model.config.moe["threshold"] == 0.9
    assert model.model.lm.live_config().moe.threshold == 0.9
    assert all(layer.router.threshold == 0.9 for layer in model.model.lm.moe_layers)


def test_set_threshold_on_a_dense_model_changes_nothing():
    model = XMoEModel(_config(moe=None))
    with pytest.raises(ConfigError, match="threshold-routed"):
        model.set_threshold(0.5)
    assert model.config.moe is None


@pytest.mark.parametrize("cls", [XMoEModel, XMoEForCausalLM])
def test_bad_input_ids_fail_clearly(cls):
    model = cls(_config()).eval()
    with pytest.raises(
        ValueError, match=r"^input_ids\.shape=\(7,\) is invalid: .*\(batch, seq_len\)"
    ):
        model(torch.zeros(7, dtype=torch.long))
    with pytest.raises(TypeError, match=r"^input_ids\.dtype=torch\.float32 is invalid"):
        model(torch.zeros(1, 7))
    with pytest.raises(ValueError, match=r"^input_ids range \[0, 60\] is invalid: .*vocab_size=60"):
        model(torch.tensor([[0, 60]]))


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"num_heads": 5}, "num_heads"),
        ({"moe": {"d_model": 32, "num_experts": 8, "d_expert": 16, "threshold": 2.0}}, "threshold"),
        ({"moe": {"d_model": 32, "num_experts": 0, "d_expert": 16}}, "num_experts"),
        ({"moe_every": 0}, "moe_every"),
        ({"moe": {"d_model": 32, "d_expert": 16}}, "num_experts"),
        ({"moe": ["threshold"]}, "dict"),
        ({"dropout": float("nan")}, "dropout"),
        ({"rope_theta": True}, "rope_theta"),
    ],
)
def test_bad_config_fails_at_construction(overrides, name):
    with pytest.raises(ConfigError, match=name):
        _config(**overrides)


def test_missing_or_mismatched_weights_fail_clearly(tmp_path):
    _model().save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    missing = next(k for k in weights if "router" in k)
    save_file(
        {k: v for k, v in weights.items() if k != missing},
        str(tmp_path / "model.safetensors"),
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match="missing"):
        AutoModelForCausalLM.from_pretrained(tmp_path)

    other = tmp_path / "other"
    _model().save_pretrained(other)
    config = json.loads((other / "config.json").read_text())
    config["d_ff"] = 48  # the dense FFN no longer fits the stored weights
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises((ValueError, RuntimeError), match=r"mismatch|size"):
        AutoModelForCausalLM.from_pretrained(other)


def test_trained_run_exports_to_auto_classes(tmp_path):
    from tokenizers import Tokenizer

    from xmoe.cli.main import main
    from xmoe.data import train_tokenizer

    run = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--max-steps", "2", "--out", str(run), "--no-progress"]
    assert main([*args, "model.vocab_size=300"]) == 0
    model = AutoModelForCausalLM.from_pretrained(run).eval()  # `xmoe train` already exported
    from xmoe.training import load_model

    lm, _, _ = load_model(run)
    ids = torch.randint(0, 300, (1, 8))
    assert torch.equal(model(ids).logits, lm(ids).logits)

    text = "To be, or not to be, that is the question. " * 20
    train_tokenizer([text], vocab_size=300).save(str(run / "tokenizer.json"))
    export_run(run, tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    expected = Tokenizer.from_file(str(run / "tokenizer.json")).encode("not to be").ids
    assert tokenizer("not to be")["input_ids"] == expected
    assert tokenizer.eos_token == "<|endoftext|>"


def test_directory_of_the_older_gated_layout_is_refused(tmp_path):
    """Saved before 0.1.0, when gate and up were not yet one ``w1`` (a separate ``experts.w3``,
    gate-only bias)."""
    moe = {"d_model": 32, "num_experts": 8, "d_expert": 16, "activation": "swiglu"}
    _model(moe=moe).save_pretrained(tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    old = {}
    for key, value in load_file(path).items():
        if key.endswith("experts.w1"):
            old[key], old[key[:-2] + "w3"] = (t.contiguous() for t in value.chunk(2, dim=-1))
        elif key.endswith("experts.b1"):
            old[key] = value[..., :16].contiguous()
        else:
            old[key] = value
    save_file(old, path, metadata={"format": "pt"})
    expected = f"{tmp_path}: expert weights in the pre-0.1.0 layout (separate up tensor "
    expected += "'model.lm.blocks.1.ffn.experts.w3'"
    refused = pytest.raises(ValueError, match=re.escape(expected))
    with pytest.warns(UserWarning, match="loaded unverified"), refused:
        XMoEForCausalLM.from_pretrained(tmp_path)
