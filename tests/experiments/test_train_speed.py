"""The routers suite's training speeds: every row's trained model stepping on the same batches,
interleaved in one process, cached under the settings that made them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from xmoe.experiments import train_speed
from xmoe.experiments.router_suite import row_config
from xmoe.training import trainer
from xmoe.training.config import apply_overrides
from xmoe.training.trainer import load_token_data, train

ROWS = ["top2", "thor"]  # thor: two forward passes per step


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    data = None
    for row in ROWS:
        config = apply_overrides(row_config(row, "tiny"), ["max_steps=2", "eval_interval=2"])
        data = data or load_token_data(config, progress=False)
        train(config, out / row / "seed0", data=data, progress=False)
    other = apply_overrides(row_config("top2", "tiny"), ["max_steps=1", "batch_size=4"])
    train(other, out / "top2-b4" / "seed0", data=data, progress=False)
    bf16 = apply_overrides(row_config("top2", "tiny"), ["max_steps=1", "precision=bf16",
                                                        "grad_clip=0"])  # fmt: skip
    train(bf16, out / "top2-bf16" / "seed0", data=data, progress=False)
    return out, data


def test_every_row_steps_the_same_batches_and_the_result_is_cached(suite, monkeypatch):
    out, data = suite
    calls = []
    real_step = train_speed.train_step

    def counted(model, optimizer, batches, loss_of, **kwargs):
        batches = list(batches)
        calls.append((id(model), [b[0].clone() for b in batches]))
        return real_step(model, optimizer, batches, loss_of, **kwargs)

    monkeypatch.setattr(train_speed, "train_step", counted)
    speeds = train_speed.training_speeds(ROWS, out, data, steps=2, rounds=3)
    assert list(speeds) == ROWS and all(math.isfinite(s) and s > 0 for s in speeds.values())
    models = list(dict.fromkeys(model for model, _ in calls))
    assert len(models) == 2
    for model in models:  # one warm-up step, then steps x rounds timed
        assert sum(m == model for m, _ in calls) == 1 + 2 * 3
    cached = json.loads((out / "train_speed.json").read_text())
    assert cached["tokens_per_second"] == speeds

    calls.clear()  # same settings: read back, nothing trained
    assert train_speed.training_speeds(ROWS, out, data, steps=2, rounds=3) == speeds
    assert calls == []
    train_speed.training_speeds(ROWS, out, data, steps=1, rounds=1)  # other settings: timed again
    assert len(calls) == 2 * (1 + 1)


def test_rows_step_the_same_batches(suite, monkeypatch):
    out, data = suite
    seen = {}
    real_step = train_speed.train_step

    def record(model, optimizer, batches, loss_of, **kwargs):
        batches = list(batches)
        seen.setdefault(id(model), []).append(batches[0][0].clone())
        return real_step(model, optimizer, batches, loss_of, **kwargs)

    monkeypatch.setattr(train_speed, "train_step", record)
    train_speed.training_speeds(ROWS, out, data, steps=2, rounds=2)
    first, second = seen.values()
    assert len(first) == len(second) == 1 + 2 * 2
    assert all((a == b).all() for a, b in zip(first, second, strict=True))
    assert not (first[1] == first[2]).all()  # two different batches per round


def test_rows_step_under_their_own_precision_and_clip(suite, monkeypatch):
    """A bf16 row's steps run under autocast and a row with grad_clip=0 clips nothing, as their
    trainer steps them, so the timing is of the training the row does."""
    out, data = suite
    seen = []
    real_step, real_loss = train_speed.train_step, trainer.lm_step_loss

    def record_step(model, optimizer, batches, loss_of, **kwargs):
        seen.append(("clip", kwargs["max_norm"]))
        return real_step(model, optimizer, batches, loss_of, **kwargs)

    def record_loss(model, *batch):
        seen.append(("autocast", torch.is_autocast_enabled("cpu")))
        return real_loss(model, *batch)

    monkeypatch.setattr(train_speed, "train_step", record_step)
    monkeypatch.setattr(trainer, "lm_step_loss", record_loss)
    train_speed.training_speeds(["top2", "top2-bf16"], out, data, steps=1, rounds=1)
    # per round: top2 (fp32, clip 1.0), then top2-bf16 (autocast, no clip); two rounds
    assert seen == [("clip", 1.0), ("autocast", False), ("clip", math.inf), ("autocast", True)] * 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": []}, r"rows=\[\] is invalid"),
        ({"steps": 0}, "steps=0 is invalid: it must be >= 1"),
        ({"rounds": -1}, "rounds=-1 is invalid: it must be >= 1"),
        (
            {"rows": ["top2", "top2-b4"]},
            r"train on different batch shapes \[\(4, 32\), \(8, 32\)\]",
        ),
    ],
)
def test_bad_settings_are_named(suite, kwargs, message):
    out, data = suite
    with pytest.raises(ValueError, match=message):
        train_speed.training_speeds(**{"rows": ROWS, "out": out, "data": data, **kwargs})
