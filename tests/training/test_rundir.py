"""Runs you can trust: verified checkpoints and exports, fallback to the previous checkpoint, a
crash-consistent log, divergence that never overwrites a good checkpoint, and the CLI's errors."""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from xmoe.cli.main import main
from xmoe.data import TokenData, synthetic_token_data
from xmoe.data.tokenizer import train_tokenizer
from xmoe.storage import DamagedFileError, read_verified
from xmoe.training.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from xmoe.training.config import apply_overrides
from xmoe.training.evaluate import evaluate, perplexity
from xmoe.training.presets import preset
from xmoe.training.rundir import RunDir
from xmoe.training.trainer import DivergenceError, load_model, train


def tiny_config(**overrides):
    return apply_overrides(preset("tiny"), [f"{k}={v}" for k, v in overrides.items()])


def _tensor_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of every tensor of a safetensors file."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    return {
        name: (base + info["data_offsets"][0], base + info["data_offsets"][1])
        for name, info in header.items()
        if name != "__metadata__"
    }


def _damage(path: Path, how: str) -> str | None:
    """Damage a safetensors file; returns the name of the tensor hit, if one was."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
        return None
    if how == "zero-file":
        path.write_bytes(bytes(len(data)))
        return None
    name, (start, end) = max(_tensor_spans(path).items(), key=lambda kv: kv[1][1] - kv[1][0])
    middle = (start + end) // 2
    if how == "flip":
        data[middle] ^= 0x10
    elif how == "zero-block":
        block = slice(max(start, middle - 2048), min(end, middle + 2048))
        data[block] = bytes(block.stop - block.start)
        if data == bytearray(path.read_bytes()):  # the block was zero already: flip instead
            data[middle] ^= 0x10
    path.write_bytes(bytes(data))
    return name


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run with two checkpoints (steps 3 and 6) and its transformers export."""
    from xmoe.cli.export import export_run

    run = tmp_path_factory.mktemp("run")
    train(tiny_config(max_steps=6, checkpoint_interval=3), run, progress=False)
    export_run(run)
    return run


def _copy_run(source: Path, target: Path) -> Path:
    target.mkdir()
    for item in source.iterdir():
        if item.is_file():
            (target / item.name).write_bytes(item.read_bytes())
    return target


@pytest.mark.parametrize("how", ["flip", "zero-block", "truncate", "zero-file"])
def test_damaged_checkpoint_is_refused_with_the_tensor_named(trained_run, tmp_path, how):
    run = _copy_run(trained_run, tmp_path / "run")
    path = run / CHECKPOINT_NAME
    hit = _damage(path, how)
    expected = f"tensor '{hit}' is damaged" if hit else "not a readable safetensors file"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path, fallback=False)
    with pytest.warns(UserWarning, match=r"using the previous checkpoint .*\(step 3\)"):
        assert load_checkpoint(run).meta["step"] == 3


def test_edited_metadata_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / CHECKPOINT_NAME, _small_checkpoint(12.0))
    data = path.read_bytes()
    assert data.count(b'\\"step\\": 12') == 1
    path.write_bytes(data.replace(b'\\"step\\": 12', b'\\"step\\": 13'))
    with pytest.raises(CheckpointError, match="metadata is damaged"):
        load_checkpoint(path)


def _small_checkpoint(value: float) -> Checkpoint:
    model = {"w": torch.full((64, 64), value)}
    return Checkpoint(model, None, {"torch": torch.get_rng_state()}, {"step": int(value)})


def test_both_checkpoints_damaged_is_an_error_naming_both(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path / "run")
    _damage(run / CHECKPOINT_NAME, "flip")
    _damage(run / "checkpoint.prev.safetensors", "flip")
    with pytest.raises(CheckpointError, match=r"damaged.*the previous one too.*damaged"):
        load_checkpoint(run)


def test_resume_falls_back_to_the_previous_checkpoint(tmp_path):
    config = tiny_config(max_steps=8, checkpoint_interval=2, log_interval=1)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(config, straight, progress=False)
    train(config, broken, progress=False, stop_after=6)  # checkpoints at 4 (prev) and 6
    _damage(broken / CHECKPOINT_NAME, "flip")
    with pytest.warns(UserWarning, match=r"previous checkpoint .*\(step 4\)"):
        train(config, broken, progress=False, resume=True)
    assert _losses(broken) == _losses(straight)
    a, b = load_checkpoint(straight), load_checkpoint(broken)
    for key, value in a.model_state.items():
        assert torch.equal(value, b.model_state[key]), key


@pytest.mark.parametrize("how", ["flip", "zero-block", "truncate"])
def test_damaged_export_is_refused_by_from_pretrained(trained_run, tmp_path, how):
    from transformers import AutoModelForCausalLM

    run = _copy_run(trained_run, tmp_path / "run")
    AutoModelForCausalLM.from_pretrained(run)  # intact: loads
    hit = _damage(run / "model.safetensors", how)
    expected = f"tensor '{hit}' is damaged" if hit else "not a readable"
    with pytest.raises(DamagedFileError, match=expected):
        AutoModelForCausalLM.from_pretrained(run)


def test_cli_reports_damage_in_one_line(trained_run, tmp_path, capsys):
    run = _copy_run(trained_run, tmp_path / "run")
    for name in (CHECKPOINT_NAME, "checkpoint.prev.safetensors"):
        _damage(run / name, "flip")
    for argv in (
        ["eval", str(run), "--no-progress", "--batches", "1"],
        ["generate", str(run), "--prompt", "1 2", "--max-new-tokens", "2"],
        ["train", "--preset", "tiny", "--out", str(run), "--resume", "--no-progress"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("xmoe: error: ") and "is damaged" in err and "Traceback" not in err


def _losses(run):
    return [(r["step"], r["loss"]) for r in RunDir(run).read_log() if "loss" in r]


def test_log_is_truncated_to_the_checkpoint_and_survives_a_torn_line(tmp_path):
    config = tiny_config(max_steps=6, checkpoint_interval=2, log_interval=1)
    straight = tmp_path / "straight"
    train(config, straight, progress=False)

    run = tmp_path / "run"
    train(config, run, progress=False, stop_after=3)  # checkpoints at 2 and 3
    with open(run / "log.jsonl", "a") as log:  # a crash mid-line, after steps nobody saved
        log.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
    train(config, run, progress=False, resume=True)
    assert _losses(run) == _losses(straight)

    fresh = tmp_path / "fresh"  # a Ctrl-C before the first checkpoint: the log restarts
    fresh.mkdir()
    (fresh / "log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2))
    )
    train(config, fresh, progress=False, resume=True)
    assert _losses(fresh) == _losses(straight)


def test_divergence_stops_without_overwriting_the_checkpoint(tmp_path, capsys):
    config = tiny_config(max_steps=6, checkpoint_interval=1, warmup_fraction=0.0, lr=1e10)
    with pytest.raises(DivergenceError, match=r"step \d+: .*(loss nan|gradient norm|non-finite)"):
        train(config, tmp_path / "run", progress=False)
    if RunDir(tmp_path / "run").has_checkpoint:
        state = load_checkpoint(tmp_path / "run")
        assert all(torch.isfinite(v).all() for v in state.model_state.values())
    argv = ["train", "--preset", "tiny", "--out", str(tmp_path / "cli"), "--no-progress"]
    assert main([*argv, "lr=1e10", "warmup_fraction=0"]) == 1
    assert "xmoe: error: step" in capsys.readouterr().err


def test_huge_loss_gives_infinite_perplexity_not_an_exception():
    assert perplexity(1000.0) == math.inf and perplexity(2.0) == pytest.approx(math.exp(2.0))
    config = tiny_config(**{"model.init_std": 100})
    torch.manual_seed(0)
    from xmoe.models import TransformerLM

    model = TransformerLM(config.model)
    result = evaluate(model, synthetic_token_data(vocab_size=64).val, 2, 32, max_batches=1)
    assert result.perplexity == perplexity(result.loss)


def test_files_get_the_umask_mode(tmp_path):
    for mask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(mask)
        try:
            path = save_checkpoint(tmp_path / f"{mask}" / CHECKPOINT_NAME, _small_checkpoint(1.0))
        finally:
            os.umask(old)
        assert stat.S_IMODE(path.stat().st_mode) == mode


def test_export_refuses_files_and_foreign_directories(trained_run, tmp_path, capsys):
    run = _copy_run(trained_run, tmp_path / "run")
    target_file = tmp_path / "a_file"
    target_file.write_text("keep me")
    assert main(["export", str(run), "--out", str(target_file)]) == 1
    assert "is a file" in capsys.readouterr().err and target_file.read_text() == "keep me"

    other = _copy_run(trained_run, tmp_path / "other")
    before = (other / "model.safetensors").read_bytes()
    assert main(["export", str(run), "--out", str(other)]) == 1
    assert "not empty; pass force=True (--force)" in capsys.readouterr().err
    assert (other / "model.safetensors").read_bytes() == before
    assert main(["export", str(run), "--out", str(other), "--force"]) == 0

    assert main(["export", str(run)]) == 0  # into the run itself: always allowed
    assert main(["export", str(run), "--out", str(tmp_path / "new")]) == 0
    tensors, _, verified = read_verified(tmp_path / "new" / "model.safetensors")
    assert verified and tensors
    assert not [p for p in (tmp_path / "new").iterdir() if ".tmp-" in p.name]


def _text_run(tmp_path: Path, texts: list[str], vocab_size: int) -> Path:
    """A run trained on a real (tiny) BPE tokenizer."""
    tokenizer = train_tokenizer(texts, vocab_size=300)
    ids = np.array(tokenizer.encode(" ".join(texts * 40)).ids, dtype=np.uint16)
    data = TokenData(train=ids[:-200], val=ids[-200:], vocab_size=vocab_size, tokenizer=tokenizer)
    config = tiny_config(**{"max_steps": 2, "model.vocab_size": vocab_size})
    run = tmp_path / "text"
    train(config, run, progress=False, data=data)
    return run


def test_generate_checks_tokenizer_ids_and_temperature(tmp_path, capsys):
    texts = ["the cat sat on the mat", "a dog ran in the park", "to be or not to be"]
    run = _text_run(tmp_path, texts, vocab_size=320)
    argv = ["generate", str(run), "--prompt", "the cat", "--max-new-tokens", "3"]
    assert main(argv) == 0
    capsys.readouterr()
    for temperature in ("nan", "inf", "-1"):
        assert main([*argv, "--temperature", temperature]) == 1
        assert "temperature" in capsys.readouterr().err

    saved = (run / "tokenizer.json").read_text()
    foreign = train_tokenizer(["completely different words here", "zebra quartz"], vocab_size=300)
    (run / "tokenizer.json").write_text(foreign.to_str())
    assert main(argv) == 1
    assert "not the tokenizer this model was trained with" in capsys.readouterr().err
    assert main(["eval", str(run), "--no-progress"]) == 1
    assert "not the tokenizer" in capsys.readouterr().err

    big = train_tokenizer([" ".join(f"w{i}x{i * 7}" for i in range(400))], vocab_size=600)
    assert big.get_vocab_size() > 320
    (run / "tokenizer.json").write_text(big.to_str())
    assert main(argv) == 1
    assert "vocab_size=320" in capsys.readouterr().err
    (run / "tokenizer.json").write_text(saved)
    assert main(argv) == 0


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--max-steps", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 1
    assert capsys.readouterr().err.startswith("xmoe: error: ")
    with pytest.raises(FileExistsError, match="resume"):
        main(["--debug", *args])
    assert main(["eval", str(tmp_path / "missing")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "lr=inf"]) == 1
    assert "lr=inf is invalid" in capsys.readouterr().err


def test_ctrl_c_exits_130(monkeypatch, capsys):
    import xmoe.demos.layer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(xmoe.demos.layer, "run_demo", interrupted)
    assert main(["layer-demo"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_checkpoint_without_lock_cannot_be_written_through_rundir(tmp_path):
    with pytest.raises(RuntimeError, match="must be locked"):
        RunDir(tmp_path).save_checkpoint(_small_checkpoint(1.0))


def test_load_model_from_an_explicit_file_does_not_fall_back(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path / "run")
    _, _, meta = load_model(run / "checkpoint.prev.safetensors")
    assert meta["step"] == 3
    _damage(run / "checkpoint.prev.safetensors", "flip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match="damaged"):
            load_model(run / "checkpoint.prev.safetensors")
