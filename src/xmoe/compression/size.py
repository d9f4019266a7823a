"""Honest size accounting: what a compressed model takes, measured, not computed from a formula."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xmoe.compression.base import moe_layers


@dataclass(frozen=True)
class ModelSize:
    """Attributes:
    disk_bytes: bytes on disk of the saved directory's files (``os.stat``), or None unsaved.
    resident_bytes: bytes of the storages behind all of the model's parameters and buffers.
    expert_bytes: the same for the routed experts of its MoE layers (packed codes, scales,
        biases; the routers and shared experts are not counted).
    """

    disk_bytes: int | None
    resident_bytes: int
    expert_bytes: int


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view or a shared tensor counts once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def model_size(model: nn.Module, directory: str | os.PathLike | None = None) -> ModelSize:
    """The measured :class:`ModelSize` of ``model`` (saved in ``directory``, if given)."""
    disk = None
    if directory is not None:
        disk = sum(os.stat(p).st_size for p in Path(directory).rglob("*") if p.is_file())
    experts = [t for layer in moe_layers(model) for t in _tensors(layer.experts)]
    return ModelSize(disk, storage_bytes(_tensors(model)), storage_bytes(experts))
