"""The files of a run and of the caches: no link is followed out of a run directory, cached
tokens are verified, a killed export leaves nothing that blocks its rerun, and file errors say
what happened to which file (issue 22, items 2, 4 and 8)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training.test_rundir import tiny_config
from xmoe.cli.main import main
from xmoe.data import tokens
from xmoe.data.corpus import KJV, SHAKESPEARE, Document
from xmoe.storage import read_verified
from xmoe.training.checkpoint import CHECKPOINT_NAME
from xmoe.training.trainer import train


def _train_args(out: Path, steps: int = 2) -> list[str]:
    return ["train", "--preset", "tiny", "--max-steps", str(steps), "--out", str(out),
            "--no-progress"]  # fmt: skip


def _one_error_line(capsys) -> str:
    """The CLI's stderr, which must be exactly one ``xmoe: error:`` line; returns it."""
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("xmoe: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny two-step run."""
    run = tmp_path_factory.mktemp("run")
    train(tiny_config(max_steps=2), run, progress=False)
    return run


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# ----------------------------------------------------------------------------- item 2: links


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_linked_lock_is_refused_and_its_target_untouched(tmp_path, capsys, kind):
    outside = tmp_path / "precious.txt"
    outside.write_bytes(b"not xmoe's to truncate\n")
    run = tmp_path / "run"
    run.mkdir()
    if kind == "symlink":
        (run / ".lock").symlink_to(outside)
    else:
        os.link(outside, run / ".lock")
    assert main(_train_args(run)) == 1
    line = _one_error_line(capsys)
    assert str(run / ".lock") in line
    assert ("symbolic link" if kind == "symlink" else "hard links") in line
    assert outside.read_bytes() == b"not xmoe's to truncate\n"
    assert not (run / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("dangling", [True, False])
def test_a_linked_log_is_refused_and_its_target_untouched(tmp_path, capsys, dangling):
    outside = tmp_path / "elsewhere.jsonl"
    if not dangling:
        outside.write_bytes(b'{"step": 1, "mine": true}\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").symlink_to(outside)
    assert main(_train_args(run)) == 1
    line = _one_error_line(capsys)
    assert str(run / "log.jsonl") in line and "symbolic link" in line
    if dangling:
        assert not outside.exists() and not outside.is_symlink()
    else:
        assert outside.read_bytes() == b'{"step": 1, "mine": true}\n'
    assert (run / "log.jsonl").is_symlink()  # left for the user to look at, not replaced


# ----------------------------------------------------------------------------- item 4: caches


def _fake_corpus(monkeypatch) -> None:
    """prepare_corpus on a few sentences instead of the downloaded corpora."""
    words = ["the", "king", "said", "unto", "them", "that", "the", "play", "is", "done"]
    docs = [
        Document(f"doc{i}", KJV if i % 2 else SHAKESPEARE, " ".join(words[i:] + words[:i]) * 5)
        for i in range(6)
    ]
    monkeypatch.setattr(tokens, "load_documents", lambda cache: docs)
    monkeypatch.setattr(tokens, "split_documents", lambda docs: (docs[:4], docs[4:]))


@pytest.mark.parametrize("name", ["train.npy", "val.npy"])
def test_a_damaged_token_cache_is_rebuilt_not_used(tmp_path, monkeypatch, name):
    _fake_corpus(monkeypatch)
    first = tokens.prepare_corpus(tmp_path, vocab_size=300, progress=False)
    (path,) = (tmp_path / "tokens").glob(f"*/{name}")
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[-1] ^= 0x01  # one bit of the last token id: same length, still a valid .npy
    path.write_bytes(bytes(damaged))
    with pytest.warns(UserWarning, match=rf"token cache .* is damaged \(.*{name} does not match"):
        again = tokens.prepare_corpus(tmp_path, vocab_size=300, progress=False)
    assert np.array_equal(again.train, first.train) and np.array_equal(again.val, first.val)
    assert path.read_bytes() == good  # rebuilt in place


def test_a_killed_exports_leftovers_do_not_make_its_target_not_empty(trained_run, tmp_path):
    target = tmp_path / "new"
    staging = target / f".export.tmp-{_dead_pid()}-0123abcd"  # as a killed export leaves them
    staging.mkdir(parents=True)
    (staging / "config.json").write_text("{")
    (target / ".lock").write_text(f"pid {_dead_pid()} (xmoe export)\n")
    assert main(["export", str(trained_run), "--out", str(target)]) == 0
    assert not staging.exists()
    _, _, verified = read_verified(target / "model.safetensors")
    assert verified

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / ".lock").write_text("another tool's lock\n")  # not ours: still not empty
    assert main(["export", str(trained_run), "--out", str(foreign)]) == 1


# ----------------------------------------------------------------------------- item 8: messages


def test_permission_denied_is_reported_as_such(trained_run, monkeypatch, capsys):
    checkpoint = str(trained_run / CHECKPOINT_NAME)
    real_open = os.open

    def denied(path, *args, **kwargs):  # what a checkpoint of mode 000 does (we may be root)
        if os.fspath(path) == checkpoint:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), checkpoint)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    assert main(["eval", str(trained_run), "--no-progress"]) == 1
    line = _one_error_line(capsys)
    assert "Permission denied" in line and checkpoint in line and "No such file" not in line


def test_train_out_naming_a_safetensors_file_fails_before_training(tmp_path, capsys):
    out = tmp_path / "sub" / "model.safetensors"
    assert main(_train_args(out)) == 1
    line = _one_error_line(capsys)
    assert str(out) in line and "not a directory" in line
    assert not (tmp_path / "sub").exists()


def test_disk_full_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    real_write = os.write

    def full(fd, data):  # only the checkpoint is this large: the disk fills while saving it
        if len(data) > 100_000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    run = tmp_path / "run"
    assert main(_train_args(run)) == 1
    line = _one_error_line(capsys)
    assert "No space left on device" in line and str(run / CHECKPOINT_NAME) in line
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_a_verified_json_record_reads_back_and_a_damaged_one_is_named(tmp_path):
    from xmoe.storage import DamagedFileError, read_verified_json, write_verified_json

    path = write_verified_json(tmp_path / "cell.json", {"ppl": 12.5, "bytes": 1000})
    assert read_verified_json(path) == {"ppl": 12.5, "bytes": 1000}
    path.write_text(path.read_text().replace("12.5", "11.5"))
    with pytest.raises(DamagedFileError, match=r"cell.json is damaged \(the CRC-32"):
        read_verified_json(path)
    path.write_text('{"crc32": ')
    with pytest.raises(DamagedFileError, match=r"cell.json is damaged"):
        read_verified_json(path)
