"""Checkpoint integrity (issue 22): the fallback window never loses the good checkpoint, digests
cover the safetensors header, readers verify only what they read, damaged and missing files are
reported, and the thread count is recorded for bit-identical resume."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import types
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as serialize_tensors

import xmoe.storage
from tests.training.test_checkpoint_crashes import Driver
from tests.training.test_rundir import _copy_run, _damage, _tensor_spans, _text_run, tiny_config
from xmoe.cli.main import main
from xmoe.storage import DIGESTS_KEY, DamagedFileError, read_verified, tensor_crc32
from xmoe.training.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from xmoe.training.rundir import RunDir, tokenizer_fingerprint
from xmoe.training.trainer import load_model, train

PREVIOUS_NAME = "checkpoint.prev.safetensors"


def _small(value: float) -> Checkpoint:
    return Checkpoint({"w": torch.full((64, 64), value)}, None, {}, {"step": int(value)})


def _fallback_window(directory: Path) -> Path:
    """A run directory whose latest checkpoint (step 2) is damaged and whose previous one
    (step 1) is good: the state a resume falls back from."""
    directory.mkdir()
    save_checkpoint(directory / CHECKPOINT_NAME, _small(1.0))
    save_checkpoint(directory / CHECKPOINT_NAME, _small(2.0))
    _damage(directory / CHECKPOINT_NAME, "flip")
    return directory


def _resumable_step(directory: Path) -> int:
    """The step a resume (a writer under the lock) finds; raises if it finds none."""
    run = RunDir(directory)
    with warnings.catch_warnings(), run.lock():
        warnings.simplefilter("ignore")
        return run.load_checkpoint(writer=True).meta["step"]


# --- item 1: the fallback window ----------------------------------------------------------------


@pytest.mark.slow
def test_kill_at_every_point_of_the_first_save_after_a_fallback_keeps_a_good_checkpoint(tmp_path):
    """Latest damaged, previous good; a resume killed at each crash point of its first save
    (k = 1, 2, ... until one completes): a resume always finds a good checkpoint afterwards."""
    driver = Driver()
    try:
        kill_at, kills = 1, 0
        while True:
            run = _fallback_window(tmp_path / f"run{kill_at}")
            answer = driver(job="resume-save", path=str(run), value=3, kill_at=kill_at)
            assert _resumable_step(run) in (1, 3), kill_at
            if not answer["killed"]:
                assert answer["exit"] == 0
                break
            kills += 1
            kill_at += 1
            shutil.rmtree(run)
    finally:
        driver.close()
    assert kills >= 8
    assert load_checkpoint(run).meta["step"] == 3
    assert load_checkpoint(run / PREVIOUS_NAME, fallback=False).meta["step"] == 1
    assert (run / "checkpoint.damaged-1.safetensors").is_file()  # kept, not deleted


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _os_with(**failing) -> types.SimpleNamespace:
    """``os`` for one module of ours, with some calls replaced (by :func:`_disk_full`)."""
    return types.SimpleNamespace(**{**vars(os), **failing})


def test_disk_full_on_the_first_save_after_a_fallback_keeps_the_good_checkpoint(
    tmp_path, monkeypatch
):
    run_path = _fallback_window(tmp_path / "run")
    run = RunDir(run_path)
    with run.lock():
        with pytest.warns(UserWarning, match="moved it aside to checkpoint.damaged-1"):
            assert run.load_checkpoint(writer=True).meta["step"] == 1
        monkeypatch.setattr(xmoe.storage, "os", _os_with(write=_disk_full))
        with pytest.raises(OSError, match="No space left"):
            run.save_checkpoint(_small(3.0))
        monkeypatch.undo()
    assert _resumable_step(run_path) == 1
    assert not [p.name for p in run_path.iterdir() if ".tmp" in p.name]


def test_each_damaged_latest_is_moved_aside_under_a_name_of_its_own(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(max_steps=6, checkpoint_interval=2, eval_batches=1)
    train(config, run, progress=False, stop_after=4)
    for number in (1, 2):
        _damage(run / CHECKPOINT_NAME, "flip")
        damaged = (run / CHECKPOINT_NAME).read_bytes()
        with pytest.warns(UserWarning, match=f"moved it aside to checkpoint.damaged-{number}"):
            train(config, run, progress=False, resume=True, stop_after=4 + number)
        assert (run / f"checkpoint.damaged-{number}.safetensors").read_bytes() == damaged
    assert load_checkpoint(run).meta["step"] == 6


# --- item 5: the digest covers the header -------------------------------------------------------


def _retype_first_f32(path: Path) -> str:
    """Change the first ``"dtype":"F32"`` of a safetensors header to ``I32`` (same size);
    returns the name of the tensor hit."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    at = data.index(b'"dtype":"F32"', 8, 8 + length)
    data[at + 9 : at + 10] = b"I"
    path.write_bytes(bytes(data))
    header = json.loads(data[8 : 8 + length])
    return next(n for n, v in header.items() if n != "__metadata__" and v["dtype"] == "I32")


def test_a_dtype_edited_in_the_header_is_refused_naming_the_tensor(tmp_path):
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, _small(1.0))
    hit = _retype_first_f32(path)
    with pytest.raises(CheckpointError, match=f"tensor '{hit}' is damaged.*dtype int32"):
        load_checkpoint(path, fallback=False)


def test_a_dtype_edited_in_an_export_header_is_refused(run_with_export, tmp_path):
    from transformers import AutoModelForCausalLM

    run = _copy_run(run_with_export, tmp_path / "run")
    hit = _retype_first_f32(run / "model.safetensors")
    with pytest.raises(DamagedFileError, match=f"tensor '{hit}' is damaged"):
        AutoModelForCausalLM.from_pretrained(run)


def test_files_with_the_older_digest_layout_load_verified_for_bytes_with_a_warning(tmp_path):
    tensors = {"w": torch.full((4, 4), 2.0)}
    digests = {"w": tensor_crc32(tensors["w"]), "__metadata__": f"{zlib.crc32(b'{}'):08x}"}
    path = tmp_path / "old.safetensors"  # as written before dtypes and shapes were recorded
    path.write_bytes(serialize_tensors(tensors, metadata={DIGESTS_KEY: json.dumps(digests)}))
    with pytest.warns(UserWarning, match="predates dtype and shape digests"):
        loaded, _, verified = read_verified(path)
    assert verified and torch.equal(loaded["w"], tensors["w"])
    _damage(path, "flip")
    with pytest.raises(DamagedFileError, match="tensor 'w' is damaged"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_verified(path)


# --- item 6: readers verify what they read ------------------------------------------------------


@pytest.fixture(scope="module")
def run_with_export(tmp_path_factory):
    """A tiny run of 9 steps stopped after 6: checkpoints at steps 3 (previous) and 6 (latest),
    and its export."""
    from xmoe.cli.export import export_run

    run = tmp_path_factory.mktemp("run")
    train(RESUMED, run, progress=False, stop_after=6)
    export_run(run)
    return run


RESUMED = tiny_config(max_steps=9, checkpoint_interval=3)
RESUME_ARGV = ["train", "--preset", "tiny", "--no-progress", "--max-steps", "9"]
RESUME_ARGV += ["checkpoint_interval=3", "--resume"]


def _damage_optimizer(path: Path) -> None:
    spans = {n: s for n, s in _tensor_spans(path).items() if n.startswith("optim.")}
    start, end = max(spans.values(), key=lambda span: span[1] - span[0])
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _assert_readers_work(run: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and in silence: nothing they read is damaged
        assert main(["eval", str(run), "--no-progress", "--batches", "1"]) == 0
        assert main(["generate", str(run), "--prompt", "1 2", "--max-new-tokens", "2"]) == 0
        assert load_model(run)[2]["step"] == 6
        AutoModelForCausalLM.from_pretrained(run)
    assert main(["export", str(run), "--out", str(run.parent / "exported")]) == 0
    assert "error" not in capsys.readouterr().err


def test_damaged_optimizer_state_blocks_no_reader(run_with_export, tmp_path, capsys):
    run = _copy_run(run_with_export, tmp_path / "run")
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        _damage_optimizer(run / name)
    _assert_readers_work(run, capsys)


def test_damaged_previous_checkpoint_blocks_no_reader(run_with_export, tmp_path, capsys):
    run = _copy_run(run_with_export, tmp_path / "run")
    _damage(run / PREVIOUS_NAME, "flip")
    _assert_readers_work(run, capsys)


def test_damaged_optimizer_state_stops_resume_saying_how_to_continue(
    run_with_export, tmp_path, capsys
):
    run = _copy_run(run_with_export, tmp_path / "run")
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        _damage_optimizer(run / name)
    argv = [*RESUME_ARGV, "--out", str(run)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the damaged previous checkpoint is reported
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Only the optimizer state is damaged" in err
    assert "step 6 verify" in err and "--fresh-optimizer" in err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "--fresh-optimizer"]) == 0
    assert any("resuming step 6 with a fresh optimizer state" in str(w.message) for w in caught)
    state = load_checkpoint(run)
    assert state.meta["step"] == 9 and state.optimizer_state is not None


def test_a_run_of_the_pre_fusion_expert_layout_is_refused_in_one_line(
    run_with_export, tmp_path, capsys
):
    """Gated experts saved before 0.1.0 held their up projection apart (``experts.w3``)."""
    run = _copy_run(run_with_export, tmp_path / "run")
    checkpoint = load_checkpoint(run)
    w1 = next(k for k in checkpoint.model_state if k.endswith("experts.w1"))
    checkpoint.model_state[w1[: -len("w1")] + "w3"] = checkpoint.model_state[w1].clone()
    for _ in range(2):  # the latest and, through the save's link, the previous checkpoint
        save_checkpoint(run / CHECKPOINT_NAME, checkpoint)
    with pytest.raises(CheckpointError, match=r"pre-0\.1\.0 layout \(separate up tensor"):
        load_checkpoint(run / PREVIOUS_NAME, fallback=False)
    assert main(["eval", str(run), "--no-progress", "--batches", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"xmoe: error: {run / CHECKPOINT_NAME}: expert weights in the pre-0.1.0")
    assert err.count("\n") == 1 and "re-train or re-export with this version" in err


# --- item 7: silent states ----------------------------------------------------------------------


def test_resume_reports_a_damaged_previous_checkpoint(run_with_export, tmp_path):
    run = _copy_run(run_with_export, tmp_path / "run")
    _damage(run / PREVIOUS_NAME, "flip")
    with pytest.warns(UserWarning, match=r"prev\.safetensors: tensor .* damaged.*no fallback"):
        train(RESUMED, run, progress=False, resume=True, stop_after=7)
    assert load_checkpoint(run / PREVIOUS_NAME, fallback=False).meta["step"] == 6  # replaced


def test_resume_refuses_a_run_whose_checkpoints_were_deleted(run_with_export, tmp_path, capsys):
    run = _copy_run(run_with_export, tmp_path / "run")
    for name in (CHECKPOINT_NAME, PREVIOUS_NAME):
        (run / name).unlink()
    assert main([*RESUME_ARGV, "--out", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("xmoe: error: ") and "checkpoints are gone" in err
    assert "log reaches step 6" in err and not (run / CHECKPOINT_NAME).exists()


def test_resume_before_the_first_checkpoint_says_it_starts_again(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    with pytest.warns(UserWarning, match="no checkpoint to resume.*starting from step 0"):
        train(tiny_config(max_steps=2), run, progress=False, resume=True)


def test_a_failed_link_of_the_previous_checkpoint_leaves_no_temporary(tmp_path, monkeypatch):
    import xmoe.training.checkpoint as checkpoint_module

    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, _small(1.0))
    monkeypatch.setattr(checkpoint_module, "os", _os_with(replace=_disk_full))
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, _small(2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    monkeypatch.setattr(checkpoint_module, "os", _os_with(link=_disk_full))  # no full copy
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, _small(2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


TEXTS = ["the cat sat on the mat", "a dog ran in the park", "to be or not to be"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return _text_run(tmp_path_factory.mktemp("text"), TEXTS, vocab_size=320)


def test_edited_tokenizer_merges_are_refused(text_run, tmp_path, capsys):
    run = _copy_run(text_run, tmp_path / "run")
    argv = ["generate", str(run), "--prompt", "the cat", "--max-new-tokens", "2"]
    assert main(["export", str(run)]) == 0  # keeps the run's own tokenizer.json
    assert main(argv) == 0
    tokenizer = json.loads((run / "tokenizer.json").read_text())
    merges = tokenizer["model"]["merges"]
    merges[0], merges[-1] = merges[-1], merges[0]  # same vocabulary, other tokenization
    (run / "tokenizer.json").write_text(json.dumps(tokenizer))
    capsys.readouterr()
    assert main(argv) == 1
    assert "file digest differs" in capsys.readouterr().err


def test_runs_that_recorded_the_vocabulary_fingerprint_still_load(text_run):
    run = RunDir(text_run)
    tokenizer = run.load_tokenizer()
    run.check_tokenizer(tokenizer, {"tokenizer_sha256": tokenizer_fingerprint(tokenizer)}, 320)
    with pytest.raises(CheckpointError, match="vocabulary digest differs"):
        run.check_tokenizer(tokenizer, {"tokenizer_sha256": "0" * 64}, 320)


# --- item 8: a missing tokenizer is reported as missing -----------------------------------------


def test_a_deleted_tokenizer_is_reported_as_missing(text_run, tmp_path, capsys):
    run = _copy_run(text_run, tmp_path / "run")
    (run / "tokenizer.json").unlink()
    for argv in (
        ["generate", str(run), "--prompt", "the cat", "--max-new-tokens", "2"],
        ["eval", str(run), "--no-progress", "--batches", "1"],
        ["export", str(run), "--out", str(tmp_path / "export")],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "tokenizer.json is missing: this run was trained with a tokenizer" in err, argv
        assert "synthetic" not in err
    assert not (tmp_path / "export").exists()


# --- item 12: the thread count ------------------------------------------------------------------


def test_resume_with_another_thread_count_warns(tmp_path):
    config = tiny_config(max_steps=4, checkpoint_interval=2)
    threads = torch.get_num_threads()
    train(config, tmp_path, progress=False, stop_after=2)
    assert load_checkpoint(tmp_path).meta["threads"] == threads
    other = threads + 1 if threads == 1 else threads - 1
    torch.set_num_threads(other)
    try:
        expected = f"thread count {threads} and resumes at {other}.*--threads {threads}"
        with pytest.warns(UserWarning, match=expected):
            train(config, tmp_path, progress=False, resume=True)
    finally:
        torch.set_num_threads(threads)
    assert load_checkpoint(tmp_path).meta["threads"] == other
