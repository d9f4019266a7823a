"""Model directories whose weights and config are checked when they load.

:class:`VerifiedWeightsMixin` gives a transformers model class a ``save_pretrained`` that
records, in each weight file's digest-covered metadata (:func:`xmoe.storage.save_verified`), a
CRC-32 of every tensor and the ``config.json`` written beside it; and a ``from_pretrained`` that
checks both before transformers reads the files:

* a damaged weight file is refused, naming the tensor; one without digests loads with a warning;
* a ``config.json`` that differs from the one recorded with the weights is refused when a
  differing field decides how the weights are read (the class's ``weight_config_fields``: sizes,
  layer counts, activations, the expert layout) and loads with a warning naming the field
  otherwise (settings a user may mean to change, such as the routing threshold); with
  transformers' opt-outs (``ignore_mismatched_sizes``, ``output_loading_info``) every
  difference only warns;
* missing, unexpected or mis-shaped weights are refused rather than initialised at random, and
  experts saved in the pre-0.1.0 layout (a separate up tensor) with an error saying so.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from xmoe.experts.ffn import separate_up_error
from xmoe.storage import DamagedFileError, read_verified, save_verified
from xmoe.storage.model_dirs import is_weight_file

CONFIG_KEY = "xmoe.config"
"""Weight-file metadata key holding the text of the ``config.json`` saved with the weights."""

CONFIG_NAME = "config.json"

_MISSING = object()


def weight_files(directory: Path) -> list[Path]:
    """The safetensors weight files transformers reads from a model directory."""
    return sorted(
        p for p in directory.iterdir() if is_weight_file(p.name) and p.suffix == ".safetensors"
    )


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"moe": {"threshold": 0.9}}`` -> ``{"moe.threshold": 0.9}`` (one entry per leaf)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(written: str, current: str) -> dict[str, tuple[Any, Any]]:
    """``{field: (value recorded, value now)}`` of two ``config.json`` texts, nested fields as
    dotted names; an absent field's value is reported as ``<absent>``."""
    recorded, now = _flatten(json.loads(written)), _flatten(json.loads(current))
    differences = {}
    for name in sorted(recorded.keys() | now.keys()):
        before, after = recorded.get(name, _MISSING), now.get(name, _MISSING)
        if before != after:
            differences[name] = tuple("<absent>" if v is _MISSING else v for v in (before, after))
    return differences


def _is_weight_field(name: str, weight_fields: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[: i + 1]) in weight_fields for i in range(len(parts)))


def check_config_record(
    weights: Path, recorded: str, config_path: Path, weight_fields: frozenset[str], strict: bool
) -> None:
    """Compare ``config_path`` with the config text recorded in ``weights``: with ``strict``,
    raise :class:`~xmoe.storage.DamagedFileError` naming the differing fields that decide how
    the weights are read; warn naming the others (all of them without ``strict``)."""
    try:
        differences = config_differences(recorded, config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedFileError(f"{config_path} is not valid JSON: {error}") from None
    refused = {
        n: d for n, d in differences.items() if strict and _is_weight_field(n, weight_fields)
    }
    if refused:
        raise DamagedFileError(
            f"config mismatch: {config_path} does not describe the weights in {weights.name}: "
            f"{_listed(refused)}; it was edited or damaged since the weights were saved with it: "
            "restore it (or pass ignore_mismatched_sizes=True to load it as it is)"
        )
    if differences:
        warnings.warn(
            f"{config_path} differs from the config saved with {weights.name}: "
            f"{_listed(differences)}; loading with the values in the file (if the change is "
            "intended, save_pretrained records it)",
            stacklevel=2,
        )


def _listed(differences: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(
        f"{name}={now!r} (saved with {before!r})" for name, (before, now) in differences.items()
    )


def opted_out(kwargs: dict[str, Any]) -> bool:
    """Whether ``from_pretrained`` was asked to load what does not match (transformers'
    ``ignore_mismatched_sizes`` or ``output_loading_info``): config mismatches then warn."""
    return bool(kwargs.get("ignore_mismatched_sizes") or kwargs.get("output_loading_info"))


class VerifiedWeightsMixin:
    """Put before the transformers model class in the bases (``class M(VerifiedWeightsMixin,
    LlamaForCausalLM)``); see the module docstring for what is recorded and checked."""

    weight_config_fields: ClassVar[frozenset[str]] = frozenset()
    """``config.json`` fields (dotted for nested ones; a prefix covers its children) whose
    change makes the saved weights mean something else: a difference refuses the load."""

    separate_up_key: ClassVar[str | None] = None
    """How the name of an up projection stored apart from its gate ends (the pre-0.1.0 layout of
    gated experts; see :func:`~xmoe.experts.ffn.separate_up_error`): such a directory is
    refused."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, then each weight file rewritten (atomically) with
        a CRC-32 of every tensor and the ``config.json`` text in its metadata."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        directory = Path(save_directory)
        config_path = directory / CONFIG_NAME
        record = (
            {CONFIG_KEY: config_path.read_text(encoding="utf-8")} if config_path.is_file() else {}
        )
        for path in weight_files(directory):
            tensors, metadata, _ = read_verified(path, require_digests=False)
            save_verified(path, tensors, {**metadata, **record})
        return result

    @classmethod
    def verify_directory(cls, directory: Path, strict: bool = True) -> set[str]:
        """Verify the weight files of a local model directory and its ``config.json`` against
        their record (see :func:`check_config_record` for ``strict``); returns the names of the
        tensors they hold."""
        names: set[str] = set()
        config_path = directory / CONFIG_NAME
        config_checked = not config_path.is_file()  # transformers says so when it is missing
        for path in weight_files(directory):
            tensors, metadata, verified = read_verified(path, require_digests=False)
            names |= tensors.keys()
            del tensors  # not held while transformers loads the files itself
            if not verified:
                warnings.warn(f"{path} carries no digests: loaded unverified", stacklevel=2)
            elif CONFIG_KEY in metadata and not config_checked:  # shards hold the same record
                fields = cls.weight_config_fields
                check_config_record(path, metadata[CONFIG_KEY], config_path, fields, strict)
                config_checked = True
        if cls.separate_up_key is not None:
            error = separate_up_error(names, directory, cls.separate_up_key)
            if error is not None:
                raise ValueError(error)
        return names

    @classmethod
    def prepare_local_load(
        cls, directory: Path, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """Check a local directory before transformers loads it; returns the (possibly changed)
        ``from_pretrained`` arguments."""
        cls.verify_directory(directory, strict=not opted_out(kwargs))
        return args, kwargs

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """``PreTrainedModel.from_pretrained`` that first verifies a local directory (see the
        module docstring) and refuses, rather than randomly initialises, a checkpoint with
        missing, unexpected or mis-shaped weights.

        The transformers opt-outs hold: ``output_loading_info=True`` returns ``(model, info)``
        and raises for none of these (the caller inspects ``info``);
        ``ignore_mismatched_sizes=True`` lets mis-shaped weights be initialised afresh.
        """
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if source is not None and Path(source).is_dir():
            args, kwargs = cls.prepare_local_load(Path(source), args, kwargs)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if want_info:
            return model, info
        checked = ["missing_keys", "unexpected_keys"]
        if not kwargs.get("ignore_mismatched_sizes", False):
            checked.append("mismatched_keys")
        problems = {key: sorted(info.get(key) or []) for key in checked if info.get(key)}
        if problems:
            raise ValueError(f"checkpoint does not match {cls.__name__}: {problems}")
        return model
