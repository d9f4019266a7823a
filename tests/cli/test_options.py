"""Options made from the settings dataclasses: each command's option set is its dataclass's
fields, values reach the dataclass untouched, and a bad value is named by the dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field

import pytest

pytest.importorskip("transformers")

from xmoe.cli.main import build_parser, main
from xmoe.cli.options import add_options, field_docs, from_options
from xmoe.cli.sparsify import GRID_EXCLUDE
from xmoe.conversion.config import SparsifyConfig
from xmoe.conversion.recovery import RecoveryConfig
from xmoe.experiments.sparsify_settings import EvalSettings

SPARSIFY_OWN = {"model", "out", "force", "calibration_tokens", "seq_len", "calibration_text",
                "no_progress"}  # fmt: skip
"""``xmoe sparsify``'s options that are not SparsifyConfig fields (sparsify_directory's)."""


def _command(name: str) -> argparse.ArgumentParser:
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[name].complete()


def _dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.dest != "help"}


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_sparsify_options_are_the_config_fields():
    options = _dests(_command("sparsify"))
    recovery = {f"recovery_{name}" for name in _names(RecoveryConfig) | {"checkpoint"}}
    assert set(options) == _names(SparsifyConfig) | SPARSIFY_OWN | recovery
    assert not options["expert_size"].required and options["expert_size"].type is int
    assert options["sites"].choices == ("gate_up", "down", "gate") and options["sites"].nargs == "*"
    assert options["mode"].choices == ("experts", "neurons")
    assert options["partition"].choices == ("contiguous", "clustered")
    assert options["combine"].choices == ("unweighted", "weighted")
    docs = field_docs(SparsifyConfig)
    assert all(options[name].help.startswith(docs[name][:20]) for name in ("seed", "router_lr"))


def test_grid_options_are_the_settings_fields():
    options = _dests(_command("sparsify-grid"))
    recovery = {f"recovery_{name}" for name in _names(RecoveryConfig)}
    assert set(options) == (_names(EvalSettings) - {"recovery", *GRID_EXCLUDE}) | recovery
    assert all(action.help for action in options.values())  # every field is documented
    assert options["routers"].choices == ("trained", "oracle")
    assert options["recover"].nargs == "*" and options["fractions"].type is float


def test_grid_values_reach_the_settings(monkeypatch):
    import xmoe.experiments.sparsify_grid as evaluation

    made = []
    monkeypatch.setattr(evaluation, "run_eval", lambda settings: made.append(settings) or _Path())
    monkeypatch.setattr(sys, "argv", ["xmoe", "sparsify-grid", "--recover"])
    argv = ["sparsify-grid", "--recover", "--expert-sizes", "64", "4", "--recovery-tokens", "512",
            "--no-recovery-train-experts", "--no-progress", "--out", "run"]  # fmt: skip
    assert main(argv) == 0
    (settings,) = made
    assert settings.recover == () and settings.expert_sizes == (64, 4)
    assert settings.recovery == RecoveryConfig(tokens=512, train_experts=False)
    assert not settings.progress and str(settings.out) == "run"
    assert settings.command == "xmoe sparsify-grid --recover"
    assert settings.fractions == EvalSettings().fractions  # not given: the dataclass default
    assert main(["sparsify-grid", "--recover", "16:clustered:0.5", "8:contiguous:1"]) == 0
    assert made[1].recover == ((16, "clustered", 0.5), (8, "contiguous", 1.0))


class _Path:
    """What the stubbed run_eval returns: enough for the command's message."""

    def with_suffix(self, suffix: str):
        return argparse.Namespace(name=f"report{suffix}")


_SPARSIFY = ["sparsify", "m", "--out", "o", "--expert-size"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sparsify-grid", "--fractions", "2"],
         "fractions=(2.0,) is invalid: give numbers in (0, 1]"),
        (["sparsify-grid", "--recovery-lr", "0"], "lr=0.0 is invalid: lr must be a number > 0"),
        ([*_SPARSIFY, "0"], "expert_size=0 is invalid: expert_size must be an int >= 1"),
        ([*_SPARSIFY, "8", "--router-lr", "-1"],
         "router_lr=-1.0 is invalid: router_lr must be a number > 0"),
        ([*_SPARSIFY, "8", "--active-fraction", "0.5", "--threshold", "0.5"],
         "active_fraction=0.5, threshold=0.5 is invalid: set exactly one of active_fraction "
         "(top-k) and threshold (mass rule)"),
    ],
)  # fmt: skip
def test_a_bad_value_is_named_by_the_dataclass(argv, message, capsys):
    assert main(argv) == 1
    assert capsys.readouterr().err == f"xmoe: error: {message}\n"


def test_threshold_alone_selects_the_mass_rule():
    parser = argparse.ArgumentParser()
    add_options(parser, SparsifyConfig)
    given = from_options(SparsifyConfig, parser.parse_args(["--expert-size", "8", "--threshold",
                                                            ".7"]))  # fmt: skip
    assert (given.active_fraction, given.threshold) == (None, 0.7)
    plain = from_options(SparsifyConfig, parser.parse_args(["--expert-size", "8"]))
    assert plain == SparsifyConfig(expert_size=8, active_fraction=0.5)


@dataclass(frozen=True)
class _Inner:
    """Nested.

    Args:
        steps: how many.
    """

    steps: int = 3


@dataclass(frozen=True)
class _Toy:
    """A settings class a command has never seen.

    Args:
        width: a new field, documented
            over two lines.
        scale: a float or None.
        kinds: some of ``a``, ``b``.
        pairs: ``(size, kind)`` pairs.
        verbose: a flag.
        inner: nested settings.
    """

    width: int
    scale: float | None = None
    kinds: tuple[str, ...] = field(default=("a",), metadata={"choices": ("a", "b")})
    pairs: tuple[tuple[int, str], ...] = ((1, "a"),)
    verbose: bool = True
    inner: _Inner = field(default_factory=_Inner)


def test_a_new_field_appears_without_touching_the_cli():
    parser = argparse.ArgumentParser()
    add_options(parser, _Toy)
    assert _dests(parser)["width"].help == "a new field, documented over two lines."
    assert _dests(parser)["kinds"].help == "some of a, b. (default: a)"
    argv = ["--width", "4", "--kinds", "b", "a", "--pairs", "2:b", "--no-verbose",
            "--inner-steps", "5"]  # fmt: skip
    toy = from_options(_Toy, parser.parse_args(argv))
    assert toy == _Toy(width=4, kinds=("b", "a"), pairs=((2, "b"),), verbose=False,
                       inner=_Inner(steps=5))  # fmt: skip
    assert from_options(_Toy, parser.parse_args(["--width", "1"])) == _Toy(width=1)
    for bad in (["--width", "1", "--kinds", "c"], ["--width", "1", "--pairs", "2"], []):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
