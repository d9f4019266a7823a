"""RunDir: a training run's directory, the one owner of its file names, lock and loading.

A run directory holds::

    checkpoint.safetensors        model + optimizer + RNG + step, verified (training.checkpoint)
    checkpoint.prev.safetensors   the checkpoint before it (fallback when the latest is damaged)
    train_config.json             the TrainConfig
    tokenizer.json                the BPE tokenizer (corpus runs)
    log.jsonl                     one JSON object per line: training metrics and evaluations
    .lock                         held (flock) by the one process writing the run
    config.json, model.safetensors, tokenizer files   the transformers export (``xmoe export``,
                                  :func:`xmoe.cli.export.export_run`)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from xmoe.storage import (
    DirectoryLock,
    LockedError,
    atomic_write_text,
    hold_for_writing,
    name_the_file,
    open_regular,
)
from xmoe.training.checkpoint import (
    ALL_PARTS,
    CHECKPOINT_NAME,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)

CONFIG_NAME = "train_config.json"
TOKENIZER_NAME = "tokenizer.json"
LOG_NAME = "log.jsonl"

__all__ = ["LockedError", "RunDir", "RunLog", "tokenizer_file_sha256", "tokenizer_fingerprint"]


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a ``tokenizers.Tokenizer``'s vocabulary (token -> id), order-independent."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocab.encode("utf-8")).hexdigest()


def tokenizer_file_sha256(tokenizer) -> str:
    """SHA-256 of the ``tokenizer.json`` bytes :meth:`RunDir.save_tokenizer` writes for
    ``tokenizer``: it covers the merges and every setting, not only the vocabulary."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


class RunLog:
    """``log.jsonl``, appended one record per line and flushed to disk on :meth:`sync`. A link
    in its place is refused, never followed (:func:`~xmoe.storage.open_regular`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        self._file: TextIO = os.fdopen(fd, "a", encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as error:  # disk full: say which file
            name_the_file(error, self.path)
            raise

    def sync(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as error:
            name_the_file(error, self.path)
            raise

    def close(self) -> None:
        self._file.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log; a torn or damaged line (a crash mid-write) is skipped. A link in
    its place is refused, as for writing."""
    try:
        fd = open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if number != len(lines):
                warnings.warn(f"{path}:{number}: skipped a damaged log line", stacklevel=2)
            continue
        records.append(record)
    return records


class RunDir:
    """The files of one run. ``RunDir(path)`` takes a run directory or a checkpoint file in one.

    Writing (training, export into the run) happens inside :meth:`lock`, which admits one process
    at a time and fails fast naming the holder's pid.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self._checkpoint_file = None  # a checkpoint file named explicitly: load that one
        if path.suffix == ".safetensors" and not path.is_dir():
            self._checkpoint_file, path = path, path.parent
        self.path = path
        self._lock = DirectoryLock(path, purpose="xmoe")

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    checkpoint_path = property(lambda self: self.path / CHECKPOINT_NAME)
    previous_checkpoint_path = property(lambda self: previous_path(self.checkpoint_path))
    config_path = property(lambda self: self.path / CONFIG_NAME)
    tokenizer_path = property(lambda self: self.path / TOKENIZER_NAME)
    log_path = property(lambda self: self.path / LOG_NAME)

    @property
    def has_checkpoint(self) -> bool:
        return self.checkpoint_path.exists() or self.previous_checkpoint_path.exists()

    # --- writing, under the lock -------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, purpose: str = "xmoe train") -> Iterator[RunDir]:
        """Hold the run's lock; clears temporaries that earlier (dead) writers left. Refuses a
        path that names a file: writing needs the run directory."""
        if self._checkpoint_file is not None:
            raise ValueError(
                f"{self._checkpoint_file} ends in .safetensors: it names a checkpoint file, not "
                "a directory; give the directory to write the run into (--out DIR)"
            )
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} is a file; give a directory to write the run into")
        self._lock.purpose = purpose
        with hold_for_writing(self._lock):
            yield self

    def _require_lock(self) -> None:
        if not self._lock.held:
            raise RuntimeError(f"{self} must be locked (RunDir.lock()) before writing")

    def save_checkpoint(self, checkpoint: Checkpoint) -> Path:
        self._require_lock()
        return save_checkpoint(self.checkpoint_path, checkpoint)

    def write_config(self, config_dict: dict[str, Any]) -> None:
        self._require_lock()
        atomic_write_text(self.config_path, json.dumps(config_dict, indent=2) + "\n")

    def save_tokenizer(self, tokenizer) -> None:
        self._require_lock()
        atomic_write_text(self.tokenizer_path, tokenizer.to_str())

    def truncate_log(self, step: int) -> None:
        """Keep the log records of steps <= ``step`` (those the checkpoint we resume from had
        seen); the rest will be redone. A torn last line is dropped."""
        self._require_lock()
        if not self.log_path.exists():
            return
        kept = [r for r in read_log(self.log_path) if int(r["step"]) <= step]
        atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))

    def open_log(self) -> RunLog:
        self._require_lock()
        return RunLog(self.log_path)

    # --- reading -------------------------------------------------------------------------------

    def load_checkpoint(self, parts=ALL_PARTS, *, writer: bool = False) -> Checkpoint:
        """The verified latest checkpoint, or the previous one (with a warning) if the latest is
        missing or damaged; a checkpoint file named explicitly loads without fallback. Only the
        tensor groups in ``parts`` are read and verified. ``writer`` (resume, under the lock):
        a damaged latest checkpoint is moved aside and a damaged previous one is reported (see
        :func:`xmoe.training.checkpoint.load_checkpoint`)."""
        if writer:
            self._require_lock()
        if self._checkpoint_file is not None:
            explicit = self._checkpoint_file != self.checkpoint_path
            return load_checkpoint(self._checkpoint_file, fallback=not explicit, parts=parts)
        return load_checkpoint(self.checkpoint_path, parts=parts, writer=writer)

    def read_log(self) -> list[dict[str, Any]]:
        return read_log(self.log_path)

    def load_tokenizer(self):
        """The run's ``tokenizers.Tokenizer``, or None for runs without one (synthetic data)."""
        if not self.tokenizer_path.exists():
            return None
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as error:
            raise CheckpointError(
                f"{self.tokenizer_path} is not a readable tokenizer: {error}"
            ) from None

    def check_tokenizer(self, tokenizer, meta: dict[str, Any], vocab_size: int) -> None:
        """Refuse a tokenizer that is not the one the model was trained with: the digest of its
        file (or, for runs that recorded only that, of its vocabulary) must match the
        checkpoint's record, and its ids must fit the model's vocabulary. A missing tokenizer
        file of a run that recorded one is refused as missing."""
        recorded_file = meta.get("tokenizer_file_sha256")
        recorded_vocab = meta.get("tokenizer_sha256")
        if tokenizer is None:
            if recorded_file is not None or recorded_vocab is not None:
                raise CheckpointError(
                    f"{self.tokenizer_path} is missing: this run was trained with a tokenizer "
                    "(its checkpoint records it); restore the file"
                )
            return
        size = tokenizer.get_vocab_size()
        if size > vocab_size:
            raise CheckpointError(
                f"{self.tokenizer_path} has {size} tokens but the model has vocab_size="
                f"{vocab_size}: it is not this model's tokenizer"
            )
        if recorded_file is not None:
            actual, what = hashlib.sha256(self.tokenizer_path.read_bytes()).hexdigest(), "file"
            recorded = recorded_file
        else:
            actual, what = tokenizer_fingerprint(tokenizer), "vocabulary"
            recorded = recorded_vocab
        if recorded is not None and recorded != actual:
            raise CheckpointError(
                f"{self.tokenizer_path} is not the tokenizer this model was trained with "
                f"(its {what} digest differs from the checkpoint's record)"
            )

    def load_model(self):
        """``(TransformerLM in eval mode, TrainConfig, checkpoint meta)`` of the run."""
        from xmoe.models import TransformerLM
        from xmoe.training.config import TrainConfig

        state = self.load_checkpoint(parts=("model",))  # the optimizer state is not needed
        config = TrainConfig.from_dict(state.meta["train_config"])
        model = TransformerLM(config.model)
        model.load_state_dict(state.model_state)
        return model.eval(), config, state.meta
