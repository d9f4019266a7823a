"""Training checkpoints: one safetensors file, written atomically.

The file holds the model (``model.*``), the optimizer state (``optim.<param>.<key>``) and the
RNG states (``rng.*``); everything else (step, configs, optimizer hyper-parameters) is JSON in
the safetensors metadata. It is written to a temporary name in the same directory, flushed to
disk, then renamed over the target, so a crash at any moment leaves either the previous
checkpoint or the new one, never a partial file under the real name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "xmoe-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not an xmoe checkpoint."""


@dataclass
class Checkpoint:
    """What a checkpoint file holds.

    Attributes:
        model_state: the model's ``state_dict``.
        optimizer_state: the optimizer's ``state_dict`` (or None if not saved).
        rng_state: named RNG state tensors (``torch``, ``data``).
        meta: JSON-able metadata: ``step``, ``train_config`` and anything the trainer adds.
    """

    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    rng_state: dict[str, torch.Tensor]
    meta: dict[str, Any]


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], info: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entries in info["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(path: str | os.PathLike, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically; returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in checkpoint.model_state.items()}
    tensors |= {f"rng.{k}": v.contiguous() for k, v in checkpoint.rng_state.items()}
    meta = dict(checkpoint.meta)
    if checkpoint.optimizer_state is not None:
        optim_tensors, optim_info = _split_optimizer_state(checkpoint.optimizer_state)
        tensors |= optim_tensors
        meta["optimizer"] = optim_info
    metadata = {"format": FORMAT, "meta": json.dumps(meta)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by writers that were killed
        stale.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file (or a run directory's checkpoint); raises :class:`CheckpointError`
    with the reason when the file is missing, truncated or of another format."""
    path = resolve_checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an xmoe checkpoint (format={metadata.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    meta = json.loads(metadata["meta"])
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    rng_state = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    optim_info = meta.pop("optimizer", None)
    optimizer_state = None
    if optim_info is not None:
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        optimizer_state = _join_optimizer_state(optim_tensors, optim_info)
    return Checkpoint(model_state, optimizer_state, rng_state, meta)
