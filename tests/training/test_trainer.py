"""Training on the `tiny` preset: learning, exact resume, atomic checkpoints, deterministic eval,
the schedule, overrides and presets."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch

from xmoe import ConfigError
from xmoe.data import synthetic_token_data
from xmoe.models import TransformerLM, transformer
from xmoe.training.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from xmoe.training.config import apply_overrides
from xmoe.training.evaluate import evaluate
from xmoe.training.presets import PRESETS, preset
from xmoe.training.rundir import LOG_NAME
from xmoe.training.step import DivergenceError, StepLoss, train_step
from xmoe.training.trainer import comparable_config, learning_rate, load_model, train


def _tiny(**overrides):
    items = [f"{key}={value}" for key, value in overrides.items()]
    return apply_overrides(preset("tiny"), items)


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / LOG_NAME).read_text().splitlines()]
    return [(x["step"], x["loss"]) for x in lines if "loss" in x]


def test_loss_decreases_on_a_fixed_batch(tmp_path):
    """Overfitting one small batch of the synthetic stream: the loss must fall a lot."""
    data = synthetic_token_data(vocab_size=64, num_tokens=600)
    data.train = data.train[:41]  # a single 32-token window (+1 target): every batch repeats it
    config = _tiny(max_steps=40, batch_size=2, log_interval=1, warmup_fraction=0.0, lr=0.01)
    train(config, tmp_path, data=data, progress=False)
    losses = [loss for _, loss in _losses(tmp_path)]
    assert losses[-1] < 0.5 * losses[0]


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path):
    config = _tiny(max_steps=12, log_interval=1, eval_interval=4, checkpoint_interval=4)
    straight = tmp_path / "straight"
    train(config, straight, progress=False)
    stopped = tmp_path / "stopped"
    train(config, stopped, progress=False, stop_after=6)  # checkpoint at 4, and at 6 on stop
    train(config, stopped, progress=False, resume=True)
    assert _losses(stopped) == _losses(straight)
    assert len(_losses(straight)) == 12
    a, b = load_checkpoint(straight), load_checkpoint(stopped)
    assert a.meta["step"] == b.meta["step"] == 12
    for key, value in a.model_state.items():
        assert torch.equal(value, b.model_state[key]), key
    evals = [
        json.loads(x)["eval"]
        for x in (stopped / LOG_NAME).read_text().splitlines()
        if "eval" in json.loads(x)
    ]
    assert len(evals) == 3  # steps 4, 8, 12: none duplicated by the resume


def test_existing_run_needs_resume_and_same_config(tmp_path):
    train(_tiny(max_steps=2), tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="resume"):
        train(_tiny(max_steps=2), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="different config"):
        train(_tiny(max_steps=3), tmp_path, progress=False, resume=True)


def test_runs_written_before_expert_ffn_auto_still_compare_equal():
    """A run's recorded config holds ``expert_ffn="xmoe"`` (the default before ``"auto"``): it
    resumes and its cached results are reused under the new default; other fields still count."""
    config = _tiny().to_dict()
    assert config["model"]["moe"]["expert_ffn"] == "auto"
    recorded = json.loads(json.dumps(config))
    recorded["model"]["moe"]["expert_ffn"] = "xmoe"
    recorded["device"] = "cuda"
    assert comparable_config(recorded) == comparable_config(config)
    recorded["model"]["moe"]["top_k"] += 1
    assert comparable_config(recorded) != comparable_config(config)


def test_eval_is_deterministic(tmp_path):
    config = _tiny(max_steps=3)
    train(config, tmp_path, progress=False)
    model, config, _ = load_model(tmp_path)
    val = synthetic_token_data(vocab_size=64).val
    first = evaluate(model, val, 4, 32, max_batches=3)
    second = evaluate(model, val, 4, 32, max_batches=3)
    assert first == second and first.tokens == 3 * 4 * 32
    assert math.isclose(first.perplexity, math.exp(first.loss))


def test_eval_takes_the_loss_without_the_logits(monkeypatch):
    model = TransformerLM(_tiny().model)
    val = synthetic_token_data(vocab_size=64).val
    expected = evaluate(model, val, 4, 32, max_batches=2)

    def no_logits(*args, **kwargs):
        raise AssertionError("evaluate materialised the (B, T, V) logits")

    monkeypatch.setattr(transformer, "F", SimpleNamespace(linear=no_logits))
    fused = evaluate(model, val, 4, 32, max_batches=2)
    assert fused.loss == pytest.approx(expected.loss, rel=1e-6)
    assert fused.experts_per_token == expected.experts_per_token


def _small_checkpoint(value: float) -> Checkpoint:
    model = {"w": torch.full((256, 256), value)}
    return Checkpoint(model, None, {"torch": torch.get_rng_state()}, {"step": int(value)})


def test_checkpoint_round_trip_and_truncation(tmp_path):
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, _small_checkpoint(3.0))
    loaded = load_checkpoint(tmp_path)
    assert loaded.meta["step"] == 3 and torch.equal(
        loaded.model_state["w"], torch.full((256, 256), 3.0)
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError, match="not an xmoe checkpoint"):
        load_checkpoint(other)


def test_learning_rate_schedule():
    config = _tiny(max_steps=100, warmup_fraction=0.1, lr=1.0, min_lr_ratio=0.1)
    rates = [learning_rate(step, config) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)


def test_overrides_parse_types_and_reject_unknowns():
    config = apply_overrides(
        preset("tiny"),
        [
            "moe.capacity_factor=none",
            "model.d_model=64",
            "moe.d_model=64",
            "precision=bf16",
            "seed=3",
        ],
    )
    assert config.model.moe.capacity_factor is None and config.model.d_model == 64
    assert config.precision == "bf16" and config.seed == 3
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(preset("tiny"), ["lr"])
    with pytest.raises(ConfigError, match=r"moe\.d_model"):
        apply_overrides(preset("tiny"), ["model.d_model=64"])
    with pytest.raises(ConfigError, match="not a config section"):
        apply_overrides(preset("dense"), ["moe.threshold=0.5"])


def test_presets_hold_total_ffn_width_equal():
    widths = {}
    for name in PRESETS:
        config = preset(name)
        moe = config.model.moe
        if name not in ("dense", "tiny"):
            widths[name] = moe.num_experts * moe.d_expert
    assert set(widths.values()) == {8 * preset("dense").model.d_ff}
    with pytest.raises(ConfigError, match="preset"):
        preset("nope")


def test_bf16_autocast_training_learns_like_fp32(tmp_path):
    """On one repeated batch, bf16 autocast lowers the loss as fp32 does, step for step within
    bf16's rounding, and is not fp32 in disguise (its losses differ)."""
    data = synthetic_token_data(vocab_size=64, num_tokens=600)
    data.train = data.train[:41]  # a single 32-token window (+1 target): every batch repeats it
    losses = {}
    for precision in ("fp32", "bf16"):
        config = _tiny(
            max_steps=10, batch_size=2, log_interval=1, warmup_fraction=0.0, lr=0.01,
            eval_batches=1, precision=precision,
        )  # fmt: skip
        train(config, tmp_path / precision, data=data, progress=False)
        losses[precision] = [loss for _, loss in _losses(tmp_path / precision)]
    fp32, bf16 = losses["fp32"], losses["bf16"]
    assert bf16 != fp32
    assert bf16[-1] < 0.7 * bf16[0]
    assert bf16 == pytest.approx(fp32, rel=0.02)


def _linear_step(micro_batches, accumulation, loss_of=None):
    """A (weight, stats) after one SGD train_step of a seeded 3->1 linear map."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_of = loss_of or (lambda xy: StepLoss(((model(xy[0]) - xy[1]) ** 2).mean()))
    stats = train_step(model, optimizer, micro_batches, loss_of, accumulation=accumulation)
    return model.weight.detach().clone(), stats


def test_train_step_accumulates_micro_batches_as_one_batch():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)
    whole, whole_stats = _linear_step([(x, y)], 1)
    halves, half_stats = _linear_step([(x[:4], y[:4]), (x[4:], y[4:])], 2)
    torch.testing.assert_close(halves, whole)
    assert half_stats.loss == pytest.approx(whole_stats.loss)
    assert (
        half_stats.grad_norm == pytest.approx(whole_stats.grad_norm) and whole_stats.grad_norm > 0
    )


def test_train_step_refuses_a_nonfinite_loss_before_the_update():
    before, _ = _linear_step([], 1)  # no micro-batch: the weights as initialised
    x = torch.ones(2, 3)
    with pytest.raises(DivergenceError, match="recovery step 3: loss nan"):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        nan_loss = lambda batch: StepLoss(model(batch).sum() * float("nan"))  # noqa: E731
        train_step(model, optimizer, [x], nan_loss, what="recovery step 3")
    assert torch.equal(model.weight.detach(), before)
