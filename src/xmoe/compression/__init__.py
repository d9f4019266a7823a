"""Post-training compression of a trained MoE LM's experts: passes from
:data:`xmoe.registry.PASSES` (``merge``, ``reduce``, ``residual``, ``dynamic-prune``,
``quantize``, ``prune``) applied in sequence, to a model of a family in
:data:`xmoe.registry.COMPRESS_FAMILIES` (an xmoe ``TransformerLM``, or transformers' XMoE,
Mixtral, Qwen3-MoE and OLMoE causal LMs).

``compress(model, [("merge", {"groups": 4}), ("quantize", {"bits": 3})], calibration)``
returns the compressed model (a TransformerLM changed in place; a transformers model as its
family's compressed class); :func:`save_compressed` / :func:`load_compressed` write and read
it as its family does, and :func:`model_size` measures it. The families (and transformers) load
on first use (PEP 562), so reading a compressed run directory stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from xmoe.compression.base import CompressionError, check_calibration, moe_layers
from xmoe.compression.size import ModelSize, model_size
from xmoe.registry import PASSES

PassSpec = tuple[str, Mapping[str, Any]]
"""A pass's registered name and its options (values typed, or strings as on the command line)."""


def parse_pass(text: str) -> PassSpec:
    """``"merge:groups=8,foo=1"`` -> ``("merge", {"groups": "8", "foo": "1"})``."""
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CompressionError(f"pass {text!r}: option {item!r} must be KEY=VALUE")
        options[key.strip()] = value.strip()
    return name.strip(), options


def compress(
    model: nn.Module,
    passes: Sequence[PassSpec],
    calibration: torch.Tensor,
    *,
    domains: Mapping[str, torch.Tensor] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Apply ``passes`` to ``model`` (of a family in :data:`~xmoe.registry.COMPRESS_FAMILIES`)
    in order, given ``calibration`` (B, T) token ids; returns the compressed model in eval mode
    (a TransformerLM changed in place; a transformers model as its family's compressed class, a
    compressed one as it is, so that compress calls compose). A pass with a ``domain`` option
    (``reduce``) calibrates on ``domains[domain]`` (B, T) alone: the windows of one corpus
    domain. Every pass's options are checked before the first one runs."""
    from xmoe.compression.families import family_of

    _, family = family_of(model)
    model = family.prepare(model)
    moe_layers(model)
    check_calibration(calibration)
    resolved = []
    for name, options in passes:
        if name not in PASSES:
            raise CompressionError(f"unknown compression pass {name!r}; registered: {list(PASSES)}")
        entry = PASSES[name]
        parsed = entry.Options.parse(name, dict(options))
        resolved.append((entry, parsed, _calibration_of(name, parsed, calibration, domains or {})))
    model.eval()
    view = family.view(model)  # called as a TransformerLM; its MoE layers are the model's
    for entry, options, windows in tqdm(resolved, desc="compress", disable=not progress):
        view = entry.apply(view, options, windows)
    return model


def _calibration_of(
    name: str, options: Any, calibration: torch.Tensor, domains: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """The windows pass ``name`` calibrates on: its ``domain``'s, if it has that option."""
    domain = getattr(options, "domain", None)
    if domain is None:
        return calibration
    if domain not in domains:
        raise CompressionError(
            f"{name}: domain={domain!r} is invalid: the calibration data has domains "
            f"{sorted(domains)}"
        )
    check_calibration(domains[domain])
    return domains[domain]


_LAZY = {name: "xmoe.compression.families" for name in ("load_compressed", "save_compressed")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xmoe.compression' has no attribute {name!r}")


__all__ = [
    "CompressionError",
    "ModelSize",
    "compress",
    "load_compressed",
    "model_size",
    "parse_pass",
    "save_compressed",
]
