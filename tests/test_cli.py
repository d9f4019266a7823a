"""The command line parses and the demo runs end to end on a tiny budget."""

from __future__ import annotations

import pytest

from xmoe.cli.main import build_parser, main


def test_demo_runs_and_reports(capsys):
    assert main(["demo", "--tokens", "64", "--steps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "XMoE / top-2 MoE FLOPs per token" in printed
    assert "experts per token of the first 24 held-out tokens" in printed


def test_help_lists_demo():
    assert "demo" in build_parser().format_help()


def test_bad_threads_rejected():
    with pytest.raises(SystemExit, match="--threads"):
        main(["--threads", "0", "demo"])
