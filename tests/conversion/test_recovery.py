"""Recovery fine-tune, the XMoE-route combine and the ``sparsify-grid`` plumbing, on tiny
random Llama configs (no download, seconds)."""

from __future__ import annotations

import copy

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
from xmoe.conversion.recovery import RecoveryConfig, recover, trainable_parameters

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


def assert_same_state(model: torch.nn.Module, other: torch.nn.Module) -> None:
    """Every tensor of ``model``'s state dict equals ``other``'s, bit for bit, in order."""
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


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
    assert_same_state(straight, again)
    # a finished checkpoint only loads: no further steps
    done = converted(dense, partition="contiguous")
    assert recover(done, data, config, teacher=dense, checkpoint=path, progress=False).steps == 6
    other = RecoveryConfig(tokens=64, batch_size=2, seq_len=16)
    with pytest.raises(Exception, match="another recovery config"):
        recover(again, data, other, teacher=dense, checkpoint=path, progress=False)


def test_a_checkpoint_naming_the_experts_the_earlier_way_loads(tmp_path):
    """Written before SparseMLP was an MoELayer: ``mlp.w_gate_up`` / ``mlp.w_down``."""
    from xmoe.training.checkpoint import load_checkpoint, save_checkpoint

    dense = tiny_llama()
    config = RecoveryConfig(tokens=2 * 16, batch_size=2, seq_len=16)  # one step
    data, path = windows(8, 16), tmp_path / "recovery.ckpt"
    fresh = sparsify(dense, 8, router="oracle")
    trained = copy.deepcopy(fresh)
    recover(trained, data, config, teacher=dense, checkpoint=path, progress=False)
    checkpoint = load_checkpoint(path)
    checkpoint.model_state = {
        k.replace("mlp.experts.w1", "mlp.w_gate_up").replace("mlp.experts.w2", "mlp.w_down"): v
        for k, v in checkpoint.model_state.items()
    }
    assert "model.layers.0.mlp.w_gate_up" in checkpoint.model_state
    save_checkpoint(path, checkpoint)
    again = copy.deepcopy(fresh)
    assert recover(again, data, config, teacher=dense, checkpoint=path, progress=False).steps == 1
    for (name, a), b in zip(trained.state_dict().items(), again.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name


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
    assert_same_state(straight, again)
    experts = converted(dense, partition="contiguous")  # another kind of model: refused
    with pytest.raises(Exception, match="other tensors than this model's trainable ones"):
        recover(experts, data, config, teacher=dense, checkpoint=path, progress=False)


def test_a_longer_budget_extends_a_shorter_ones_checkpoint_exactly(tmp_path):
    dense = neurons_dense()
    base = {"batch_size": 2, "seq_len": 16, "lr": 1e-3, "checkpoint_every": 2}
    short, long = RecoveryConfig(tokens=2 * 32, **base), RecoveryConfig(tokens=5 * 32, **base)
    data = windows(8, 16)
    straight = neurons_converted(dense)
    full = recover(straight, data, long, teacher=dense, progress=False)
    first = tmp_path / "short.ckpt"
    recover(neurons_converted(dense), data, short, teacher=dense, checkpoint=first,
            progress=False)  # fmt: skip
    before = first.read_bytes()
    extended = neurons_converted(dense)
    result = recover(extended, data, long, teacher=dense, checkpoint=tmp_path / "long.ckpt",
                     extends=first, progress=False)  # fmt: skip
    assert result.resumed_from == 2 and result.steps == 5
    assert result.losses == full.losses  # bit for bit: the short run is the long one's prefix
    assert_same_state(straight, extended)
    assert first.read_bytes() == before  # only read
    # the long checkpoint now exists, so it is the one resumed (finished: no steps)
    again = recover(neurons_converted(dense), data, long, teacher=dense,
                    checkpoint=tmp_path / "long.ckpt", extends=first, progress=False)  # fmt: skip
    assert again.resumed_from == 5
    other_lr = RecoveryConfig(tokens=5 * 32, **base | {"lr": 2e-3})
    for config, start in ((short, tmp_path / "long.ckpt"), (other_lr, first)):  # longer; other
        with pytest.raises(Exception, match="another recovery config"):
            recover(neurons_converted(dense), data, config, teacher=dense,
                    checkpoint=tmp_path / "x.ckpt", extends=start, progress=False)  # fmt: skip


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


def test_recovery_config_validates():
    with pytest.raises(ConfigError, match="tokens"):
        RecoveryConfig(tokens=0)
    with pytest.raises(ConfigError, match="distill"):
        RecoveryConfig(distill=1.5)
    assert RecoveryConfig(tokens=1000, batch_size=2, seq_len=100).steps == 5


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
