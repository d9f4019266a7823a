"""Name -> class registries, so that a new router is one new file plus one registry entry.

A registry knows, for each built-in name, the module that registers it, and imports that module
on first use: ``xmoe.config`` can validate a router name and its options without importing the
routers (no import cycle), and the routers import ``xmoe.config`` freely.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping of names to classes, filled by the :meth:`register` decorator.

    Args:
        kind: what the entries are, for error messages.
        modules: name -> module whose import registers that name (imported on first lookup).
    """

    def __init__(self, kind: str, modules: Mapping[str, str] | None = None) -> None:
        self._kind = kind
        self._modules = dict(modules or {})
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self._kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return decorator

    def __getitem__(self, name: str) -> T:
        if name not in self._entries and name in self._modules:
            importlib.import_module(self._modules[name])
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self._kind} {name!r}; registered: {sorted(self)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self._entries) | set(self._modules)))

    def __len__(self) -> int:
        return len(set(self._entries) | set(self._modules))


ROUTERS: Registry = Registry(
    "router",
    {
        "dense_split": "xmoe.routing.dense_split",
        "deepseek": "xmoe.routing.deepseek",
        "deepseek_threshold": "xmoe.routing.deepseek",
        "expert_choice": "xmoe.routing.expert_choice",
        "null_topk": "xmoe.routing.null",
        "null_threshold": "xmoe.routing.null",
        "sigmoid": "xmoe.routing.sigmoid",
        "smoe_dropout": "xmoe.routing.smoe_dropout",
        "thor": "xmoe.routing.thor",
        "threshold": "xmoe.routing.threshold",
        "topk": "xmoe.routing.topk",
        "topp": "xmoe.routing.topp",
        "moepp": "xmoe.routing.moepp",
        "recurrent": "xmoe.routing.recurrent",
        "recurrent_threshold": "xmoe.routing.recurrent",
    },
)
"""Routers by the name a config's ``router`` field gives (``xmoe.routing.Router`` subclasses)."""

ENGINES: Registry = Registry(
    "engine",
    {name: "xmoe.dispatch.engines" for name in ("batched", "grouped", "loop")},
)
"""Grouped-matmul engines by the name a config's ``backend`` field gives
(``xmoe.dispatch.engines.Engine`` subclasses); ``backend="auto"`` asks each of them."""

EXPERT_KINDS: Registry = Registry(
    "expert kind", {"ffn": "xmoe.experts.ffn", "moepp": "xmoe.experts.moepp"}
)
"""Expert kinds by the name a config's ``experts`` field gives
(``xmoe.experts.kind.ExpertKind`` subclasses)."""

EXPERT_FFN: Registry = Registry(
    "expert FFN", {"xmoe": "xmoe.experts.ffn_function", "triton": "xmoe.kernels.ffn"}
)
"""Fused expert FFN implementations by the name a config's ``expert_ffn`` field gives
(``xmoe.experts.fused.ExpertFFN`` subclasses), as transformers' ``ExpertsInterface``."""

FAMILIES: Registry = Registry(
    "model family",
    {name: "xmoe.conversion.families" for name in ("llama", "mistral", "qwen2")},
)
"""transformers causal-LM families that ``xmoe.conversion.sparsify`` converts, by the dense
model's ``config.model_type`` (``xmoe.conversion.families.Family`` instances)."""

PASSES: Registry = Registry(
    "compression pass",
    {
        "merge": "xmoe.compression.merge",
        "reduce": "xmoe.compression.reduce",
        "dynamic-prune": "xmoe.compression.dynamic_prune",
        "residual": "xmoe.compression.residual",
        "quantize": "xmoe.compression.quantize",
        "prune": "xmoe.compression.prune",
    },
)
"""Post-training compression passes by the name ``xmoe compress --pass NAME:...`` gives
(``xmoe.compression.base.CompressionPass`` subclasses), applied in sequence by
``xmoe.compression.compress``."""

COMPRESS_FAMILIES: Registry = Registry(
    "compression family",
    {
        name: "xmoe.compression.families"
        for name in ("xmoe_lm", "xmoe", "mixtral", "qwen3_moe", "olmoe")
    },
)
"""The models ``xmoe.compression.compress`` acts on: ``xmoe_lm`` (an xmoe ``TransformerLM``) and
transformers causal-LM families by ``config.model_type`` (``xmoe.compression.families``
entries: how the passes see the model's MoE layers, and how its compressed form is saved)."""
