"""Crash safety, deterministically: processes SIGKILLed at every file-system step of a checkpoint
save, and training runs killed at many points and resumed (tests/crash_driver.py), and two
trainers on one run directory."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.training.test_rundir import tiny_config
from xmoe.storage import LockedError
from xmoe.training.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from xmoe.training.rundir import RunDir
from xmoe.training.trainer import train

DRIVER = Path(__file__).parents[1] / "crash_driver.py"


class Driver:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(DRIVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def __call__(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def driver():
    started = Driver()
    yield started
    started.close()


def _assert_consistent(loaded) -> None:
    step = loaded.meta["step"]
    assert torch.equal(loaded.model_state["w"], torch.full((1024, 1024), float(step)))


@pytest.mark.slow
def test_kill_at_every_point_of_a_save_leaves_only_verified_files(driver, tmp_path):
    """Saves of steps 1, 2, 3, ... each killed at its k-th crash point, k = 1, 2, ... until
    one completes: the real name and the previous checkpoint always verify; any other file is
    either refused or consistent; the next save leaves no temporary file behind."""
    path = tmp_path / CHECKPOINT_NAME
    kills = 0
    for value in (1, 2, 3):
        kill_at = 1
        while True:
            answer = driver(job="save", path=str(path), value=value, kill_at=kill_at)
            if not answer["killed"]:
                assert answer["exit"] == 0
                break
            kills += 1
            kill_at += 1
            if path.exists():
                _assert_consistent(load_checkpoint(path, fallback=False))
            previous = tmp_path / "checkpoint.prev.safetensors"
            if previous.exists():
                _assert_consistent(load_checkpoint(previous, fallback=False))
            for other in tmp_path.iterdir():
                if other in (path, previous):
                    continue
                with contextlib.suppress(CheckpointError):  # cut mid-write: refused
                    _assert_consistent(load_checkpoint(other, fallback=False))
        assert load_checkpoint(path).meta["step"] == value
        left = {p.name for p in tmp_path.iterdir()}  # the completed save swept the rest
        assert left <= {CHECKPOINT_NAME, "checkpoint.prev.safetensors"}, left
    assert kills >= 3 * 8  # every save has at least this many crash points


def _cli_args(out: Path) -> list[str]:
    return [
        "train", "--preset", "tiny", "--out", str(out), "--no-progress", "--max-steps", "14",
        "checkpoint_interval=3", "log_interval=1", "eval_interval=5", "eval_batches=2",
        "--resume",
    ]  # fmt: skip


def _comparable_log(run: Path) -> list[dict]:
    records = RunDir(run).read_log()
    for record in records:
        record.pop("tokens_per_second", None)  # wall-clock speed
    return records


@pytest.mark.slow
def test_training_killed_ten_times_resumes_bit_identically(driver, tmp_path):
    """`xmoe train --resume` killed at ten different crash points (while starting, mid-step,
    mid-log, mid-checkpoint), then resumed to the end: losses, weights, optimizer state and RNG
    states equal an uninterrupted run bit for bit, and the log holds each step once."""
    straight = tmp_path / "straight"
    reference = driver(job="train", argv=_cli_args(straight))
    assert reference["exit"] == 0, reference
    total = reference["points"]
    stopped = tmp_path / "stopped"
    kills = 0
    for fraction in (0.004, 0.03, 0.05, 0.08, 0.09, 0.06, 0.1, 0.07, 0.04, 0.09):  # sum < 1
        kill_at = max(1, int(fraction * total))
        kills += driver(job="train", argv=_cli_args(stopped), kill_at=kill_at)["killed"]
    finished = driver(job="train", argv=_cli_args(stopped))
    assert finished["exit"] == 0, finished
    assert kills >= 10

    a, b = load_checkpoint(straight), load_checkpoint(stopped)
    assert a.meta == b.meta
    for field in ("model_state", "rng_state"):
        for key, value in getattr(a, field).items():
            assert torch.equal(value, getattr(b, field)[key]), (field, key)
    for index, entries in a.optimizer_state["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, b.optimizer_state["state"][index][key]), (index, key)
    assert _comparable_log(stopped) == _comparable_log(straight)
    steps = [r["step"] for r in RunDir(stopped).read_log() if "loss" in r]
    assert steps == list(range(1, 15))


@pytest.mark.slow
def test_second_trainer_fails_fast_and_first_finishes_intact(driver, tmp_path):
    from xmoe.cli.export import export_run

    run = tmp_path / "run"
    paused, release = tmp_path / "paused", tmp_path / "release"
    first = driver(
        job="train", argv=_cli_args(run), pause_after_steps=4, paused=str(paused),
        release=str(release), wait=False,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not paused.exists():  # waits for an event; the outcome never depends on the time
        assert time.monotonic() < deadline, "the first trainer never reached step 4"
        time.sleep(0.05)
    with pytest.raises(LockedError, match=f"pid {first['pid']}"):
        train(tiny_config(max_steps=14), run, progress=False, resume=True)
    with pytest.raises(LockedError, match="in use"):
        export_run(run)
    release.touch()
    result = driver(job="wait")
    assert result["exit"] == 0 and not result["killed"]
    steps = [r["step"] for r in RunDir(run).read_log() if "loss" in r]
    assert steps == list(range(1, 15))
    assert load_checkpoint(run).meta["step"] == 14
    same = tiny_config(
        max_steps=14, checkpoint_interval=3, log_interval=1, eval_interval=5, eval_batches=2
    )
    assert train(same, run, progress=False, resume=True).steps == 14  # the lock is free again


def test_lock_names_holder_and_is_released(tmp_path):
    run = RunDir(tmp_path)
    with run.lock("xmoe train"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            train(tiny_config(max_steps=2), tmp_path, progress=False)
        with pytest.raises(LockedError), RunDir(tmp_path).lock():
            pass
    train(tiny_config(max_steps=2), tmp_path, progress=False)
