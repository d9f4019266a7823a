"""The command line: parsing, and train / eval / generate / layer-demo end to end on `tiny`."""

from __future__ import annotations

import argparse
import json

from xmoe.cli.main import build_parser, main


def test_layer_demo_runs_and_reports(capsys):
    assert main(["layer-demo", "--tokens", "64", "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "XMoE / top-2 MoE FLOPs per token" in printed
    assert "experts per token of the first 24 held-out tokens" in printed


def test_help_lists_commands():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    names = ("demo", "layer-demo", "train", "eval", "generate", "export", "sparsify",
             "sparsify-grid", "compress", "compress-grid", "reproduce")  # fmt: skip
    assert tuple(commands.choices) == names
    assert "{" + ",".join(names) + "}" in parser.format_help()


def test_bad_threads_rejected(capsys):
    assert main(["--threads", "0", "layer-demo"]) == 1
    assert "--threads=0 is invalid" in capsys.readouterr().err


def test_train_eval_generate_on_tiny(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--max-steps", "6", "--out", str(out), "--no-progress"]
    assert main([*args, "lr=0.01", "moe.threshold=0.8"]) == 0
    assert "val perplexity" in capsys.readouterr().out
    config = json.loads((out / "train_config.json").read_text())
    assert config["lr"] == 0.01 and config["model"]["moe"]["threshold"] == 0.8

    assert main(args) == 1
    assert "exists: pass resume=True (--resume)" in capsys.readouterr().err

    assert main(["eval", str(out), "--threshold", "0.5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "experts/token" in printed

    assert main(["generate", str(out), "--prompt", "1 2 3", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 8  # 3 prompt ids + 5 new ids
    assert "tokens/s" in captured.err

    assert main(["generate", str(out), "--prompt", "hello"]) == 1
    assert "space-separated token ids" in capsys.readouterr().err


def test_train_rejects_bad_override(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path), "nope=1"]) == 1
    assert "unknown field 'nope'" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path), "lr=-1"]) == 1
    assert "lr=-1 is invalid" in capsys.readouterr().err
