"""The package's layering, read from the code: an AST import graph of ``src/xmoe`` (top-level and
function-local imports, relative ones resolved) checked against the "may import" table of the
architecture spec (``shared/spec/architecture.md``, "Folders"), with no import cycle between
modules or between units.

A unit is a folder (``routing``, ``hf``, ...) or a top-level module (``config``, ``layer``,
``storage``, ...); ``xmoe`` is the package's own ``__init__``. Arrows point down the table, so a
unit may import what it lists and everything those may import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "xmoe"

_LOW = {
    "config",
    "registry",
    "flops",
    "device",
    "storage",
    "routing",
    "dispatch",
    "experts",
    "layer",
}
_BELOW_CLI = _LOW | {
    "models",
    "hf",
    "data",
    "training",
    "conversion",
    "distributed",
    "compression",
}

MAY_IMPORT: dict[str, set[str]] = {
    "config": {"registry", "flops"},  # one row with registry (and the FLOP formulas it states)
    "registry": set(),
    "routing": {"config", "registry"},
    "dispatch": {"config"},
    "experts": {"dispatch", "config"},
    "kernels": {"experts"},  # the spec's engines "(dispatch/ or kernels/)": Triton on CUDA
    "layer": {"routing", "dispatch", "experts"},
    "models": {"layer"},
    "hf": {"models", "data"},  # data: the tokenizer files
    "data": set(),  # stdlib, tokenizers
    "training": {"models", "data"},
    "conversion": {"layer", "models", "hf", "training"},
    "experiments": _BELOW_CLI,  # anything below cli
    "compression": {"layer", "models", "training", "storage"},  # beside conversion
    "runtime": {"layer"},
    "distributed": {"layer"},
    "cli": _BELOW_CLI | {"experiments", "demos"},  # anything
    # not in the spec's table:
    "flops": set(),  # arithmetic only: the one owner of FLOP and parameter-count formulas
    "device": set(),  # torch only: where host reads of tensors are cheap
    "storage": set(),  # stdlib, torch, safetensors: atomic writes and verified reads
    "demos": _BELOW_CLI | {"experiments"},  # what the CLI's demo commands run
    "xmoe": {"layer"},  # `import xmoe`: config, layer, routing, and nothing heavy
}
"""The spec's "may import" table: unit -> the units it may import directly."""

EXCEPTIONS: dict[tuple[str, str], str] = {
    ("routing", "device"): "threshold widening branches on host_reads_cheap; device imports torch",
    ("dispatch", "device"): "the plan's host segments branch on host_reads_cheap",
    (
        "routing",
        "dispatch",
    ): "route_pairs builds the DispatchPlan its RoutedPairs carry (the spec's "
    "route -> capacity -> RoutedPairs with the plan); dispatch never imports routing",
    ("data", "storage"): "atomic writes of the tokenizer and the token caches",
    ("hf", "storage"): "verified weight files; a model directory staged then put in place",
    ("training", "storage"): "verified checkpoints, atomic run files and the run's lock",
    ("distributed", "training"): "distributed/training.py runs the trainer on each rank with "
    "expert-parallel hooks; training never imports distributed",
    ("compression", "hf"): "a compressed XMoE transformers model subclasses XMoEForCausalLM "
    "and loads verified like it (compression sits beside conversion, which imports hf)",
    ("xmoe", "hf"): "import xmoe installs hf.autoregister's post-import hook, which registers "
    "with transformers when transformers loads; it imports no transformers itself",
}
"""Edges the table does not list, each with why it is sound (they extend the table)."""


def module_name(path: Path) -> str:
    parts = ["xmoe", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "xmoe"


def imported_modules(
    source: str, module: str, is_package: bool, modules: set[str]
) -> Iterator[tuple[str, int]]:
    """``(xmoe module, line)`` of every import in ``source`` (the text of ``module``), wherever it
    sits (top level, function, ``TYPE_CHECKING``); ``from a import b`` names ``a.b`` when that
    is a module, else ``a``; relative imports are resolved against ``module``'s package."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(alias.name, node.lineno, modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package[: len(package) - node.level + 1]
                base = ".".join([*stem, base] if base else stem)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                yield from _known(name if name in modules else base, node.lineno, modules)


def _known(name: str, line: int, modules: set[str]) -> Iterator[tuple[str, int]]:
    """The longest prefix of ``name`` that is an xmoe module (nothing for other packages)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            yield ".".join(parts[:end]), line
            return


@cache
def import_graph() -> dict[str, list[tuple[str, int]]]:
    """module -> the xmoe modules it imports, with the line of each import."""
    files = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    modules = set(files)
    return {
        name: sorted(
            set(imported_modules(path.read_text(), name, path.name == "__init__.py", modules))
        )
        for name, path in files.items()
    }


def allowed(source: str) -> set[str]:
    """The units ``source`` may import: its row, the exceptions, and theirs (transitively)."""
    edges = {u: set(row) for u, row in MAY_IMPORT.items()}
    for importer, imported in EXCEPTIONS:
        edges[importer].add(imported)
    seen: set[str] = set()
    todo = list(edges.get(source, ()))
    while todo:
        target = todo.pop()
        if target not in seen:
            seen.add(target)
            todo.extend(edges.get(target, ()))
    return seen


def cycles(graph: dict[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _edges() -> Iterator[tuple[str, str, int]]:
    for module, targets in import_graph().items():
        for target, line in targets:
            yield module, target, line


def test_the_graph_sees_local_and_relative_imports():
    """A positive control: the reader finds imports inside functions and resolves ``from .``."""
    modules = {"xmoe.routing", "xmoe.routing.base", "xmoe.routing.pairs", "xmoe.config"}
    source = (
        "def f():\n    from . import base\n    from .pairs import x\n    from .. import config\n"
    )
    found = list(imported_modules(source, "xmoe.routing.topk", False, modules))
    assert found == [("xmoe.routing.base", 2), ("xmoe.routing.pairs", 3), ("xmoe.config", 4)]
    # cli.main imports the trainer only inside a function (_expected_errors: DivergenceError)
    assert "xmoe.training.trainer" in {target for target, _ in import_graph()["xmoe.cli.main"]}


def test_every_unit_has_a_row_and_the_table_points_down():
    units = {unit(module) for module in import_graph()}
    assert units <= set(MAY_IMPORT), f"units missing from MAY_IMPORT: {units - set(MAY_IMPORT)}"
    assert all(u not in allowed(u) for u in MAY_IMPORT), "the table has a cycle"


def test_no_upward_or_sideways_imports():
    wrong = [
        f"{module} -> {target} (line {line}): {unit(module)} may not import {unit(target)}"
        for module, target, line in _edges()
        if unit(module) != unit(target) and unit(target) not in allowed(unit(module))
    ]
    assert not wrong, "imports against the spec's table:\n" + "\n".join(wrong)


def test_every_exception_is_still_needed():
    used = {(unit(module), unit(target)) for module, target, _ in _edges()}
    assert set(EXCEPTIONS) <= used, f"exceptions no import needs: {set(EXCEPTIONS) - used}"


def test_no_import_cycles():
    graph = {
        module: [target for target, _ in targets] for module, targets in import_graph().items()
    }
    units: dict[str, set[str]] = {}
    for module, target, _ in _edges():
        if unit(module) != unit(target):
            units.setdefault(unit(module), set()).add(unit(target))
    assert cycles(graph) == [], "module import cycles"
    assert cycles(units) == [], "unit import cycles"


MAX_POSITIONAL_TENSORS = 6
"""The most tensors a function may take positionally; more go into a named object (as
``ExpertWeights``), so that no caller can pass them in the wrong order."""

_TENSOR_TYPES = {"torch.Tensor", "Tensor", "torch.LongTensor", "torch.FloatTensor"}


def is_tensor_annotation(annotation: ast.expr | None) -> bool:
    """Whether a parameter's annotation is a tensor: ``torch.Tensor`` or ``Tensor`` (or one of
    torch's typed tensor aliases), alone or ``| None`` / ``Optional[...]``, quoted or not."""
    if annotation is None:
        return False
    text = ast.unparse(annotation).replace(" ", "").strip("'\"")
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional[") : -1]
    types = set(text.split("|")) - {"None"}
    return bool(types) and types <= _TENSOR_TYPES


def positional_tensor_counts(source: str) -> Iterator[tuple[str, int, int]]:
    """``(function, line, count)`` for every function in ``source``: how many of its
    positional parameters are annotated as tensors."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            positional = [*node.args.posonlyargs, *node.args.args]
            count = sum(is_tensor_annotation(arg.annotation) for arg in positional)
            yield node.name, node.lineno, count


def test_the_tensor_counter_reads_annotations():
    """A positive control: each tensor annotation form counts; keyword-only ones do not."""
    source = (
        "def f(self, a: torch.Tensor, b: Tensor | None, c: 'torch.Tensor', d: Optional[Tensor],\n"
        "      e: torch.LongTensor, n: int, t: tuple[torch.Tensor], *, k: torch.Tensor): ...\n"
    )
    assert list(positional_tensor_counts(source)) == [("f", 1, 5)]


def test_no_function_takes_more_than_six_positional_tensors():
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {name} takes {count} positional tensors"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, line, count in positional_tensor_counts(path.read_text())
        if count > MAX_POSITIONAL_TENSORS
    ]
    assert not wrong, f"more than {MAX_POSITIONAL_TENSORS} positional tensors:\n" + "\n".join(wrong)
