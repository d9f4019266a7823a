"""Training checkpoints: one verified safetensors file, written atomically, with the previous one
kept beside it.

The file holds the model (``model.*``), the optimizer state (``optim.<param>.<key>``) and the
RNG states (``rng.*``); everything else (step, configs, optimizer hyper-parameters) is JSON in
the safetensors metadata, together with a CRC-32 of every tensor (:mod:`xmoe.storage`). A save
first links the current checkpoint to ``<name>.prev.safetensors``, then replaces the current one
atomically, so at every moment the real name holds a complete checkpoint, and a damaged latest
checkpoint can fall back to the one before it. A writer that falls back moves the damaged one
aside (``<name>.damaged-<n>.safetensors``) first, so the next save can never make it the
previous one: the good previous checkpoint stays until a new good one exists.
"""

from __future__ import annotations

import errno
import json
import os
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xmoe.experts.ffn import separate_up_error
from xmoe.storage import (
    DamagedFileError,
    atomic_write,
    fsync_directory,
    read_verified,
    serialize_verified,
    sweep_stale_temporaries,
    temporary_name,
)

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "xmoe-checkpoint-2"
UNVERIFIED_FORMATS = ("xmoe-checkpoint-1",)  # written before digests; loaded with a warning
ALL_PARTS = ("model", "rng", "optim")
"""The tensor groups of a checkpoint (name prefixes); a reader verifies only those it loads."""


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


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """Checkpoints hold CPU tensors, so they load on any device."""
    return tensor.detach().cpu().contiguous()


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = _on_cpu(value)
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


def previous_path(path: str | os.PathLike) -> Path:
    """Where the checkpoint before ``path`` is kept: ``checkpoint.prev.safetensors``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(
    path: str | os.PathLike, checkpoint: Checkpoint, keep_previous: bool = True
) -> Path:
    """Write ``checkpoint`` to ``path`` atomically; returns the path written.

    With ``keep_previous`` the checkpoint ``path`` held until now becomes
    :func:`previous_path` (a hard link, so the real name is never missing).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": _on_cpu(v) for k, v in checkpoint.model_state.items()}
    tensors |= {f"rng.{k}": _on_cpu(v) for k, v in checkpoint.rng_state.items()}
    meta = dict(checkpoint.meta)
    if checkpoint.optimizer_state is not None:
        optim_tensors, optim_info = _split_optimizer_state(checkpoint.optimizer_state)
        tensors |= optim_tensors
        meta["optimizer"] = optim_info
    data = serialize_verified(tensors, {"format": FORMAT, "meta": json.dumps(meta)})
    if keep_previous and path.exists():
        _link_previous(path)
    atomic_write(path, data)
    sweep_stale_temporaries(path.parent)  # left by writers that were killed
    return path


def _link_previous(path: Path) -> None:
    previous = previous_path(path)
    tmp = temporary_name(previous)
    try:
        os.link(path, tmp)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise  # disk full and the like: copying would fail the same way
        atomic_write(previous, path.read_bytes())  # a file system without hard links
        return
    try:
        os.replace(tmp, previous)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed save leaves no temporary behind
        raise
    fsync_directory(path.parent)


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to the first free ``<stem>.damaged-<n><suffix>`` (never over
    an earlier one) and return the new name; the caller holds the run's lock."""
    number = 1
    while True:
        target = path.with_name(f"{path.stem}.damaged-{number}{path.suffix}")
        try:
            os.link(path, target)  # fails if the name is taken, where a rename would replace
        except FileExistsError:
            number += 1
            continue
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if target.exists():
                number += 1
                continue
            os.rename(path, target)  # no hard links here; under the lock, nobody races us
        else:
            os.unlink(path)
        fsync_directory(path.parent)
        return target


def load_checkpoint(
    path: str | os.PathLike,
    fallback: bool = True,
    *,
    parts: Collection[str] = ALL_PARTS,
    writer: bool = False,
) -> Checkpoint:
    """Read and verify a checkpoint file (or a run directory's checkpoint).

    Only the tensor groups in ``parts`` (of :data:`ALL_PARTS`) are read and verified, so a
    reader of the model is not refused for a damaged optimizer state; the parts not read come
    back empty (``optimizer_state`` None, ``rng_state`` ``{}``).

    Raises :class:`CheckpointError` with the reason when the file is missing, damaged (naming
    the damaged tensor) or of another format. With ``fallback``, a missing or damaged
    checkpoint whose :func:`previous_path` verifies loads that one instead, with a warning.

    ``writer`` is for a caller that holds the run's lock and will save the next checkpoint
    (resume): a damaged latest checkpoint it falls back from is moved aside (:func:`set_aside`,
    so the next save cannot make it the previous one), and a damaged previous checkpoint is
    reported when the latest loads.
    """
    path = resolve_checkpoint_path(path)
    previous = previous_path(path)
    try:
        checkpoint = _load_verified(path, parts)
    except CheckpointError as error:
        if not fallback or not previous.is_file():
            raise
        try:
            checkpoint = _load_verified(previous, parts)
        except CheckpointError as previous_error:
            raise CheckpointError(f"{error}; the previous one too: {previous_error}") from None
        aside = f"; moved it aside to {set_aside(path).name}" if writer and path.is_file() else ""
        warnings.warn(
            f"{error}{aside}; using the previous checkpoint {previous.name} "
            f"(step {checkpoint.meta.get('step')})",
            stacklevel=2,
        )
        return checkpoint
    if writer and fallback and previous.is_file():
        try:
            _load_verified(previous, ALL_PARTS)
        except CheckpointError as error:
            warnings.warn(
                f"{error}: there is no fallback until the next save replaces it", stacklevel=2
            )
    return checkpoint


def _load_verified(path: Path, parts: Collection[str]) -> Checkpoint:
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        tensors, metadata, verified = read_verified(
            path, require_digests=False, select=lambda name: name.split(".", 1)[0] in parts
        )
    except DamagedFileError as error:
        raise CheckpointError(str(error)) from None
    file_format = metadata.get("format")
    if file_format not in (FORMAT, *UNVERIFIED_FORMATS):
        raise CheckpointError(
            f"{path} is not an xmoe checkpoint (format={file_format!r}, expected {FORMAT!r})"
        )
    if not verified:
        if file_format == FORMAT:
            raise CheckpointError(f"{path} has lost its digests: it is damaged")
        warnings.warn(f"{path} predates checkpoint digests: loaded unverified", stacklevel=3)
    meta = json.loads(metadata["meta"])
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    layout_error = separate_up_error(model_state, path)
    if layout_error is not None:
        raise CheckpointError(layout_error)
    rng_state = {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}
    optim_info = meta.pop("optimizer", None)
    optimizer_state = None
    if optim_info is not None and "optim" in parts:
        optim_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        optimizer_state = _join_optimizer_state(optim_tensors, optim_info)
    return Checkpoint(model_state, optimizer_state, rng_state, meta)
