"""Model directories (``xmoe export``, ``xmoe sparsify``, ``xmoe compress``) written into a
staging folder and put in place only when complete, on :mod:`xmoe.storage`'s atomic files and
directory locks."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from xmoe.storage import (
    DirectoryLock,
    fsync_directory,
    hold_for_writing,
    is_own_leftover,
    sweep_stale_temporaries,
    temporary_name,
)

_WEIGHT_FILE = re.compile(r"^model([-.].+)?\.safetensors(\.index\.json)?$")  # shards, variants


def is_weight_file(name: str) -> bool:
    """Whether a file name is one of a model directory's weights (``model.safetensors``, its
    shards, variants or shard index; a run directory's checkpoints are not)."""
    return _WEIGHT_FILE.match(name) is not None


def check_model_target(
    out: Path, *, force: bool, own: bool = False, what: str = "export target"
) -> None:
    """Refuse ``out`` as the folder to write a model directory into: a file always, a non-empty
    directory (other than a run's own, ``own``) unless ``force``; what a killed writer of ours
    left there (a staging folder, a lock file) does not count. ``what`` names it."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{what} {out} is a file; give a directory")
    users = [p for p in out.iterdir() if not is_own_leftover(p)] if out.is_dir() else []
    if not own and users and not force:
        raise FileExistsError(
            f"{what} {out} is not empty; pass force=True (--force) to overwrite the files there"
        )


@contextmanager
def staged_model_directory(out: Path, purpose: str) -> Iterator[Path]:
    """A staging folder to write a model directory into, put in place as ``out`` only when the
    block completes; an error or a kill never leaves a directory that looks complete.

    A new ``out`` is a sibling folder renamed into place at once (one left by a killed writer
    goes at the next call). Into an existing directory, held under its lock (``purpose`` names
    the holder), the files move one by one: the old weight files removed first and the new ones
    moved last, so an interrupted move leaves a directory without weights (refused on load),
    never new files beside old weights.
    """
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temporaries(out.parent)
        staging = temporary_name(out)
        try:
            staging.mkdir()
            yield staging
            os.rename(staging, out)  # fails if a non-empty `out` appeared meanwhile
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        fsync_directory(out.parent)
        return
    with hold_for_writing(DirectoryLock(out, purpose)):
        staging = temporary_name(out / "export")
        try:
            staging.mkdir()
            yield staging
            _move_model_files(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _move_model_files(staging: Path, out: Path) -> None:
    """Replace the model files in ``out`` by those in ``staging``, weights last."""
    for old in out.iterdir():
        if is_weight_file(old.name) and not old.is_dir():
            old.unlink()
    items = sorted(staging.iterdir(), key=lambda item: (is_weight_file(item.name), item.name))
    for item in items:
        os.replace(item, out / item.name)
    fsync_directory(out)
