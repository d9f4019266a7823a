"""Post-training compression of a trained MoE LM's experts: passes from
:data:`xmoe.registry.PASSES` (``merge``, ``reduce``, ``residual``, ``dynamic-prune``,
``quantize``, ``prune``) applied in sequence.

``compress(model, [("merge", {"groups": 4}), ("quantize", {"bits": 3})], calibration)``
changes ``model`` in place and returns it; :func:`save_compressed` / :func:`load_compressed`
write and read it, and :func:`model_size` measures it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from xmoe.compression.base import CompressionError, check_calibration, moe_layers
from xmoe.compression.saving import load_compressed, save_compressed
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
    """Apply ``passes`` to ``model`` (an xmoe ``TransformerLM``) in order, in place, given
    ``calibration`` (B, T) token ids; returns the model in eval mode. A pass with a ``domain``
    option (``reduce``) calibrates on ``domains[domain]`` (B, T) alone: the windows of one corpus
    domain. Every pass's options are checked before the first one runs."""
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
    for entry, options, windows in tqdm(resolved, desc="compress", disable=not progress):
        model = entry.apply(model, options, windows)
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


__all__ = [
    "CompressionError",
    "ModelSize",
    "compress",
    "load_compressed",
    "model_size",
    "parse_pass",
    "save_compressed",
]
