"""The compression families: transformers' Mixtral, Qwen3-MoE and OLMoE (tiny random configs
built here) and xmoe's own transformers class, compressed, saved, loaded and generating."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from tests.compression.lm import ids, tiny_lm
from xmoe.compression import CompressionError, compress, load_compressed, save_compressed
from xmoe.compression.families import MoEBlock, compress_family
from xmoe.compression.prune import PrunedRouter
from xmoe.compression.residual import ResidualExperts
from xmoe.hf.export import hf_model_from_lm
from xmoe.registry import COMPRESS_FAMILIES

_SHARED = {
    "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "num_experts_per_tok": 2, "max_position_embeddings": 64,
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}  # fmt: skip


def mixtral(**extra):
    settings = {"intermediate_size": 8, "num_local_experts": 6}
    return MixtralForCausalLM(MixtralConfig(**_SHARED | settings | extra))


def qwen3_moe(**extra):
    settings = {"intermediate_size": 32, "moe_intermediate_size": 8, "num_experts": 6}
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**_SHARED | settings | {"head_dim": 8} | extra))


def olmoe(**extra):
    settings = {"intermediate_size": 8, "num_experts": 6}
    return OlmoeForCausalLM(OlmoeConfig(**_SHARED | settings | extra))


def xmoe_hf():
    return hf_model_from_lm(tiny_lm().float())


BUILDERS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "olmoe": olmoe, "xmoe": xmoe_hf}


def tiny(family: str, **extra):
    """A tiny random float32 model of ``family`` (config fields ``extra``) in eval mode, its
    router weights scaled up so that routing is decisive (``tiny_lm`` scales xmoe's)."""
    torch.manual_seed(0)
    model = BUILDERS[family](**extra).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate.weight"):
                parameter.mul_(20.0)
    return model


def greedy(model, prompt):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_every_family_is_registered():
    assert {"xmoe_lm", "xmoe", "mixtral", "qwen3_moe", "olmoe"} <= set(COMPRESS_FAMILIES)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_the_converted_moe_blocks_compute_what_the_transformers_blocks_did(family):
    native = tiny(family)
    expected = logits(native, ids())
    converted = compress_family(family).prepare(native)
    assert sum(isinstance(m, MoEBlock) for m in converted.modules()) == 2
    torch.testing.assert_close(logits(converted, ids()), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_compressed_models_save_load_and_generate_as_in_memory(family, tmp_path):
    passes = [("prune", {"experts": 2, "method": "magnitude"}), ("merge", {"groups": 3})]
    passes += [("dynamic-prune", {})]
    passes += [("quantize", {"bits": 4, "group_size": 16})]
    model = compress(tiny(family), passes, ids(seed=2))
    out = save_compressed(model, tmp_path / "out", passes=passes)
    assert (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"xmoe_compressed_{family}"
    loaded, recorded = load_compressed(out)
    assert recorded == [[name, options] for name, options in passes]
    torch.testing.assert_close(logits(loaded, ids()), logits(model, ids()), rtol=0, atol=0)
    prompt = ids(1, 4, seed=3)
    assert torch.equal(greedy(loaded, prompt), greedy(model, prompt))
    auto = AutoModelForCausalLM.from_pretrained(out)  # registered with transformers
    assert type(auto) is type(loaded)


def test_prune_then_merge_sees_the_pruned_model_and_keeps_routing_consistent():
    calibration = ids(seed=2)
    passes = [("prune", {"experts": 3, "method": "magnitude"})]
    pruned = compress(tiny("mixtral", num_hidden_layers=1), passes, calibration)
    expected = logits(pruned, calibration)
    (block,) = _blocks(pruned)
    alive_E = block.moe.router.alive_E.clone()
    # the merge groups the 3 experts the pruned layer holds: each in a group of its own is the
    # identity on the pruned model
    merged = compress(pruned, [("merge", {"groups": 3})], calibration)
    assert merged is pruned  # a compressed model is compressed further as it is
    torch.testing.assert_close(logits(merged, calibration), expected, rtol=1e-5, atol=1e-5)
    experts, router = block.moe.experts, block.moe.router
    assert isinstance(router, PrunedRouter) and torch.equal(router.alive_E, alive_E)
    assert experts.inner.num_experts == 3 and experts.group_E.shape == (6,)
    assert sorted(experts.group_E[alive_E].tolist()) == [0, 1, 2]
    selection = router(torch.randn(64, 16)).selection
    assert bool(alive_E[selection.expert_idx_SK[selection.wanted_SK]].all())


def test_prune_then_merge_to_fewer_groups_holds_the_groups_and_runs():
    calibration = ids(seed=2)
    passes = [("prune", {"experts": 2, "method": "magnitude"}), ("merge", {"groups": 2})]
    model = compress(tiny("olmoe"), passes, calibration)
    for block in _blocks(model):
        experts = block.moe.experts
        assert experts.inner.num_experts == 2 and experts.inner.w1.shape[0] == 2
        assert set(experts.group_E.tolist()) <= {0, 1}
    assert torch.isfinite(logits(model, calibration)).all()


def test_reduce_and_residual_compose_after_prune_on_a_transformers_family(tmp_path):
    # both merged branches' passes on a family: reduce calibrates on its domain's windows, and
    # residual compresses the FFN experts the pruned and reduced layers hold
    passes = [("prune", {"experts": 2, "method": "magnitude"})]
    passes += [("reduce", {"groups": 3, "domain": "a"})]
    passes += [("residual", {"method": "prune", "keep": 0.5, "iterations": 2})]
    domains = {"a": ids(seed=4), "b": ids(seed=5)}
    model = compress(tiny("qwen3_moe"), passes, ids(seed=2), domains=domains)
    for block in _blocks(model):
        assert type(block.moe.experts.inner) is ResidualExperts
        assert block.moe.experts.inner.num_experts == 3
    loaded, _ = load_compressed(save_compressed(model, tmp_path / "out", passes=passes))
    torch.testing.assert_close(logits(loaded, ids()), logits(model, ids()), rtol=0, atol=0)
    assert torch.isfinite(logits(model, ids())).all()


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


def test_models_outside_the_families_and_without_moe_layers_are_named(tmp_path):
    dense = LlamaForCausalLM(
        LlamaConfig(**{k: v for k, v in _SHARED.items() if k != "num_experts_per_tok"},
                    intermediate_size=8)
    )  # fmt: skip
    with pytest.raises(CompressionError, match="LlamaForCausalLM is not of a compression family"):
        compress(dense, [("merge", {"groups": 2})], ids())
    all_dense = qwen3_moe(mlp_only_layers=[0, 1])
    with pytest.raises(CompressionError, match="has no MoE layers"):
        compress(all_dense, [("merge", {"groups": 2})], ids())
    with pytest.raises(CompressionError, match="unknown compression family 'gpt2'"):
        compress_family("gpt2")
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(CompressionError, match="model_type='llama' is not xmoe_compressed_"):
        load_compressed(tmp_path / "dense")


def test_an_interrupted_save_leaves_no_output_directory(tmp_path, monkeypatch):
    model = compress(tiny("mixtral"), [("dynamic-prune", {})], ids())
    save = type(model).save_pretrained

    def half_written(directory, *args, **kwargs):
        save(model, directory, *args, **kwargs)  # every file written, then the fault
        raise OSError("killed while writing")

    monkeypatch.setattr(model, "save_pretrained", half_written)
    with pytest.raises(OSError, match="killed while writing"):
        save_compressed(model, tmp_path / "out", passes=[("dynamic-prune", {})])
    assert list(tmp_path.iterdir()) == []
