"""Command-line options made from a settings dataclass, so a command restates none of its fields:
:func:`add_options` adds ``--field-name`` per field (type, choices and help from the class),
:func:`from_options` builds the dataclass from the options given (its own checks name a bad
value), and :class:`CommandParser` defers both imports until its command is used."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ENTRY = re.compile(r"(\w+(?:, \w+)*): (.*)")
_ROLE = re.compile(r":\w+:`~?([^`]*)`")  # :data:`PARTITIONS` -> PARTITIONS in the help


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser that adds its dataclass options on first use (parsing or help), so
    building the ``xmoe`` parser imports no settings module: ``xmoe train`` does not load what
    ``xmoe sparsify`` needs (transformers)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: list[Callable[[], None]] = []

    def options_from(self, target: str, **kwargs: Any) -> None:
        """Add the fields of dataclass ``target`` (``"package.module:Class"``) as options
        (:func:`add_options` ``kwargs``) on first use."""
        self._deferred.append(lambda: add_options(self, _load(target), **kwargs))

    def complete(self) -> CommandParser:
        """Add the deferred options now; returns the parser."""
        while self._deferred:
            self._deferred.pop(0)()
        return self

    def parse_known_args(self, args=None, namespace=None):
        self.complete()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.complete()
        return super().format_help()


def _load(target: str) -> type:
    """``"package.module:Class"`` -> the class, imported now."""
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's entry in the ``Args:`` section of ``cls``'s docstring (continuation lines,
    indented deeper, joined; ``a, b: text`` documents both)."""
    lines = inspect.getdoc(cls).splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.strip() == "Args:"), len(lines))
    docs: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines[start:]:
        depth = len(line) - len(line.lstrip())
        if not line.strip() or depth == 0:
            break  # the section ends at its first blank or unindented line
        indent = depth if indent is None else indent
        match = _ENTRY.fullmatch(line.strip())
        if depth == indent and match:
            names = match[1].split(", ")
            docs.update(dict.fromkeys(names, match[2]))
        else:
            docs.update({name: f"{docs[name]} {line.strip()}" for name in names})
    return docs


def add_options(
    parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = (), prefix: str = ""
) -> None:
    """One ``--field-name`` option per field of dataclass ``cls`` (but ``exclude``), default None
    (the dataclass default). A nested dataclass field ``recovery`` adds its fields as
    ``--recovery-tokens``...; a bool adds ``--name/--no-name``; a tuple takes any number of
    values (``A:B:C`` each for a tuple of tuples); ``field(metadata={"choices": ...})`` gives the
    choices."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        name, kind = prefix + field.name, _without_none(hints[field.name])
        if dataclasses.is_dataclass(kind):
            add_options(parser, kind, prefix=f"{name}_")
            continue
        help_text = _ROLE.sub(r"\1", docs.get(field.name, "")).replace("``", "")
        if field.default not in (dataclasses.MISSING, None):
            help_text += f" (default: {_shown(field.default)})"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            required=field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING,
            choices=field.metadata.get("choices"),
            help=help_text.strip().replace("%", "%%"),
            **_parsing(kind),
        )


def from_options(
    cls: type,
    args: argparse.Namespace,
    *,
    exclude: tuple[str, ...] = (),
    prefix: str = "",
    **values: Any,
) -> Any:
    """``cls(**values, **options given)``: only the options :func:`add_options` added (the same
    ``exclude`` and ``prefix``) that the command line gave (not None), so every other field keeps
    the dataclass default and the dataclass checks the values, naming a bad one."""
    return cls(**_given(cls, args, exclude, prefix), **values)


def _given(cls: type, args: argparse.Namespace, exclude: tuple[str, ...], prefix: str) -> dict:
    """The fields of ``cls`` whose options (``prefix`` + name) were given, by field name."""
    hints = typing.get_type_hints(cls)
    given: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        name, kind = prefix + field.name, _without_none(hints[field.name])
        if dataclasses.is_dataclass(kind):
            nested = _given(kind, args, (), f"{name}_")
            if nested:
                given[field.name] = kind(**nested)
        elif getattr(args, name, None) is not None:
            value = getattr(args, name)
            given[field.name] = tuple(value) if isinstance(value, list) else value
    return given


def _without_none(kind: Any) -> Any:
    """``X | None`` -> ``X``: None is what an option not given means."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (kind,) = [arg for arg in typing.get_args(kind) if arg is not type(None)]
    return kind


def _parsing(kind: Any) -> dict[str, Any]:
    """The ``add_argument`` keywords that parse a value of type ``kind``."""
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if typing.get_origin(item) is tuple:
            parts = typing.get_args(item)
            metavar = ":".join(part.__name__.upper() for part in parts)
            return {"nargs": "*", "type": _joined(parts, metavar), "metavar": metavar}
        return {"nargs": "*", "type": item}
    if kind in (int, float, str, Path):
        return {"type": kind}
    raise TypeError(f"no command-line option for a field of type {kind}")


def _joined(parts: tuple[type, ...], metavar: str) -> Callable[[str], tuple]:
    """A parser of ``metavar`` (``INT:STR:FLOAT``, e.g. ``16:clustered:0.5``) into a tuple."""

    def parse(text: str) -> tuple:
        values = text.split(":")
        try:
            if len(values) != len(parts):
                raise ValueError
            return tuple(part(value) for part, value in zip(parts, values, strict=True))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {metavar}") from None

    return parse


def _shown(default: Any) -> str:
    """A default as typed on the command line: ``(16, 64)`` -> ``16 64``."""
    if isinstance(default, tuple):
        return " ".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in default)
    return str(default)
