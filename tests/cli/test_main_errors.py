"""Inputs that used to end the CLI in a traceback (or a hang): each is now one ``xmoe: error:``
line naming the value and exit status 1, or, for extreme temperatures, works."""

from __future__ import annotations

import pytest
import torch
from safetensors import SafetensorError

from tests.training.test_rundir import _text_run, tiny_config
from xmoe.cli.main import main
from xmoe.hf.generation import scale_logits
from xmoe.models import TransformerLM
from xmoe.training.config import apply_overrides
from xmoe.training.memory import run_memory_bytes
from xmoe.training.presets import preset
from xmoe.training.trainer import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run on synthetic data (prompts are token ids), one step, no export."""
    path = tmp_path_factory.mktemp("run")
    train(tiny_config(max_steps=1), path, progress=False)
    return path


def _one_error(capsys, *expected: str) -> str:
    """The single ``xmoe: error:`` line printed, which must contain every ``expected``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("xmoe: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _train(tmp_path, *overrides: str) -> int:
    out = tmp_path / "out"
    return main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", *overrides])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("batch_size=99999999999999999999999", "batch_size=99999999999999999999999"),
        ("seed=18446744073709551616", "seed=18446744073709551616 is invalid"),
        ("seed=-1", "[0, 2**63 - 1]"),
        ("grad_accum_steps=1000000000", "grad_accum_steps=1000000000 is invalid"),
        ("model.vocab_size=99999999999999999999999", "model.vocab_size=99999999999999999999999"),
        ("model.vocab_size=" + "9" * 400, "needs at least inf GiB"),
    ],
)
def test_train_refuses_out_of_range_integers(tmp_path, capsys, override, expected):
    assert _train(tmp_path, override) == 1
    _one_error(capsys, expected)


def test_train_refuses_a_model_too_large_for_memory_before_allocating(tmp_path, capsys):
    # 8e12 parameters: refused from the config alone (allocating would take 32 TB)
    assert _train(tmp_path, "model.d_model=1000000", "moe.d_model=1000000") == 1
    line = _one_error(capsys, "model.d_model=1000000", "GiB", "8,000,456,000,000 parameters")
    assert "needs at least" in line


@pytest.mark.parametrize("overrides", [[], ["moe.activation=swiglu", "model.tie_embeddings=false"]])
def test_memory_estimate_counts_every_weight_matrix(overrides):
    config = apply_overrides(preset("tiny"), overrides)
    model = TransformerLM(config.model)
    matrices = sum(
        p.numel()
        for name, p in model.named_parameters()
        if not name.endswith(("bias", "b1", "b2")) and "norm" not in name
    )
    assert config.model.matrix_params == matrices
    batch = config.batch_size * (config.seq_len + 1) * 8
    logits = config.batch_size * config.seq_len * config.model.vocab_size * 4
    assert run_memory_bytes(config) == 16 * matrices + batch + logits


@pytest.mark.parametrize("threads", ["100000", "0", "-3"])
def test_threads_out_of_range(capsys, threads):
    assert main(["--threads", threads, "layer-demo"]) == 1
    _one_error(capsys, f"--threads={threads} is invalid", "per CPU")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--tokens", "99999999999999999999"], "num_tokens (--tokens)=99999999999999999999"),
        (["--tokens", "0"], "[1, 65536]"),
        (["--steps", "-1"], "steps=-1 is invalid"),
        (["--seed", "18446744073709551616"], "seed=18446744073709551616 is invalid"),
    ],
)
def test_layer_demo_refuses_out_of_range_settings(capsys, argv, expected):
    assert main(["layer-demo", *argv]) == 1
    _one_error(capsys, expected)


def test_generate_with_extreme_temperatures(run, capsys):
    argv = ["generate", str(run), "--prompt", "1 2 3", "--max-new-tokens", "4"]
    assert main([*argv, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*argv, "--temperature", "1e-45"]) == 0  # as greedy, not inf / inf
    assert capsys.readouterr().out == greedy
    assert main([*argv, "--temperature", "1e300"]) == 0  # near-uniform, not -inf / inf
    ids = [int(i) for i in capsys.readouterr().out.split()]
    assert len(ids) == 7 and all(0 <= i < 64 for i in ids)


def test_scale_logits_is_finite_for_every_finite_temperature():
    logits = torch.tensor([[1.0, 3.0, float("-inf"), 3.0, -2.0]])
    for temperature in (5e-324, 1e-45, 0.7, 1e300, 1.7e308):
        probs = scale_logits(logits, temperature).softmax(-1)
        assert torch.isfinite(probs).all() and probs[0, 2] == 0, temperature
    assert scale_logits(logits, 1e-45).softmax(-1).tolist() == [[0.0, 0.5, 0.0, 0.5, 0.0]]
    assert torch.allclose(scale_logits(logits, 0.5).softmax(-1), (logits / 0.5).softmax(-1))


def test_generate_refuses_a_prompt_that_is_not_utf8(tmp_path, capsys):
    run = _text_run(tmp_path, ["the cat sat on the mat", "to be or not to be"], vocab_size=320)
    # what Python makes of the argv bytes b"the \xff cat" (surrogateescape)
    assert main(["generate", str(run), "--prompt", "the \udcff cat"]) == 1
    _one_error(capsys, "prompt is not valid UTF-8", "byte 0xff at character 4")


def test_generate_refuses_an_out_of_range_seed(run, capsys):
    argv = ["generate", str(run), "--prompt", "1 2", "--seed", "18446744073709551616"]
    assert main(argv) == 1
    _one_error(capsys, "seed=18446744073709551616 is invalid")


def test_export_disk_full_names_the_directory(run, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils

    def disk_full(*args, **kwargs):  # what safetensors raises on ENOSPC
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 1
    _one_error(capsys, f"could not write the export into {out}", "No space left on device")
    # a new target is staged beside it and renamed into place only when complete
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left
