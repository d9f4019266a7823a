"""`xmoe sparsify --out` keeps the promises of `xmoe export`: refuses files, run directories and
(without --force) non-empty directories, writes staged, and its weights and config are verified
when they load."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from xmoe.cli.main import main
from xmoe.conversion import load_sparsified
from xmoe.storage import DamagedFileError
from xmoe.training.checkpoint import CHECKPOINT_NAME
from xmoe.training.rundir import CONFIG_NAME, TOKENIZER_NAME

TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
TINY |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    """A tiny random dense Llama with a (word-level) tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).eval().save_pretrained(directory)
    backend = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, 64)}}))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(directory)
    return directory


def _sparsify(dense_dir: Path, out: Path, *extra: str) -> int:
    argv = ["sparsify", str(dense_dir), "--out", str(out), "--expert-size", "16"]
    return main([*argv, "--router", "oracle", "--no-progress", *extra])


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes but the (empty, unheld) lock file a write into the directory leaves."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != ".lock")
    return {p.name: p.read_bytes() for p in files}


def _temporaries(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*") if ".tmp" in p.name]


def test_out_over_an_existing_run_is_refused_and_the_run_untouched(dense_dir, tmp_path, capsys):
    run = tmp_path / "run"  # the files of a trained and exported run (contents do not matter)
    run.mkdir()
    for name in (CHECKPOINT_NAME, CONFIG_NAME, TOKENIZER_NAME, "config.json", "model.safetensors"):
        (run / name).write_bytes(os.urandom(64))
    before = _snapshot(run)
    for extra in ((), ("--force",)):
        assert _sparsify(dense_dir, run, *extra) == 1
        assert f"sparsify output {run} is an xmoe run directory" in capsys.readouterr().err
    assert _snapshot(run) == before and sorted(os.listdir(run)) == sorted(before)


def test_out_naming_a_file_or_a_non_empty_directory_is_refused(dense_dir, tmp_path, capsys):
    a_file = tmp_path / "model.bin"
    a_file.write_text("keep me")
    assert _sparsify(dense_dir, a_file) == 1
    assert f"xmoe: error: sparsify output {a_file} is a file" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"

    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert _sparsify(dense_dir, full) == 1
    assert "is not empty; pass force=True (--force)" in capsys.readouterr().err
    assert _snapshot(full) == {"notes.txt": b"mine"}
    assert _sparsify(dense_dir, full, "--force") == 0
    assert (full / "notes.txt").read_text() == "mine"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(_snapshot(full))
    load_sparsified(full)


def _tensor_span(path: Path, name: str) -> tuple[int, int]:
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8 : 8 + header_len])[name]["data_offsets"]
    return 8 + header_len + start, 8 + header_len + end


@pytest.mark.parametrize("damage", ["flip", "random"])
def test_a_damaged_output_is_refused_on_load(dense_dir, tmp_path, damage):
    out = tmp_path / "sparse"
    assert _sparsify(dense_dir, out) == 0
    weights = out / "model.safetensors"
    name = "model.layers.0.mlp.experts.w2"
    start, end = _tensor_span(weights, name)
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[start + 5] ^= 0x10
    else:
        data[start:end] = torch.randint(0, 256, (end - start,), dtype=torch.uint8).numpy().tobytes()
    weights.write_bytes(bytes(data))
    for load in (load_sparsified, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(DamagedFileError, match=f"tensor '{name}' is damaged"):
            load(out)


def test_a_config_edited_since_the_conversion_is_reported(dense_dir, tmp_path):
    out = tmp_path / "sparse"
    assert _sparsify(dense_dir, out) == 0
    path = out / "config.json"
    original = json.loads(path.read_text())
    edited = json.loads(path.read_text())
    edited["xmoe_sparsify"]["active_fraction"] = 0.25  # a selection setting: a warning
    path.write_text(json.dumps(edited))
    with pytest.warns(UserWarning, match=r"xmoe_sparsify\.active_fraction=0\.25 \(saved with 0\.5"):
        load_sparsified(out)
    original["rms_norm_eps"] = 0.5  # how the weights are read: refused
    path.write_text(json.dumps(original))
    with pytest.raises(DamagedFileError, match=r"config mismatch: .*rms_norm_eps=0\.5"):
        load_sparsified(out)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_failure_mid_write_leaves_no_output_and_no_temporaries(dense_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    parent = tmp_path / "models"
    parent.mkdir()
    stale = parent / f".sparse.tmp-{_dead_pid()}-0badc0de"  # what a killed conversion leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    out = parent / "sparse"
    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
        assert _sparsify(dense_dir, out) == 1  # weights written, then the tokenizer fails
    assert os.listdir(parent) == []  # no output that looks complete, no temporary left

    assert _sparsify(dense_dir, out) == 0
    before = _snapshot(out)
    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
        assert _sparsify(dense_dir, out, "--force") == 1
    assert _snapshot(out) == before and not _temporaries(out)  # the earlier output intact
    assert sorted(os.listdir(parent)) == ["sparse"]


def test_default_calibration_covers_both_domains(dense_dir, monkeypatch):
    """Without a text file the windows come half from each domain's training documents (the
    documents are sorted KJV first, so the first tokens alone would be KJV only)."""
    import xmoe.data.corpus as corpus
    from xmoe.conversion.pipeline import calibration_windows

    def documents(domain: str, word: str, names: tuple[str, ...]) -> list[corpus.Document]:
        held_out = [corpus.Document(name, domain, "w1 w2") for name in names]
        return [*held_out, corpus.Document("train", domain, " ".join([word] * 400))]

    kjv = documents(corpus.KJV, "w3", corpus.VALIDATION_BOOKS)
    shakespeare = documents(corpus.SHAKESPEARE, "w4", corpus.VALIDATION_WORKS)
    monkeypatch.setattr(corpus, "load_documents", lambda: kjv + shakespeare)
    windows = calibration_windows(dense_dir, 160, 32, None)
    assert windows.shape == (5, 32)
    assert sorted(windows[:, 0].tolist()) == [3, 3, 3, 4, 4]  # each window from one domain
    assert all(len(set(window.tolist())) == 1 for window in windows)
