"""The ``xmoe sparsify`` pipeline: a model directory in, a sparsified (and optionally
recovered) model directory out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from xmoe.conversion.config import SparsifyConfig
from xmoe.conversion.real_model import INSTALL_HINT as REAL_MODEL_HINT
from xmoe.conversion.real_model import real_model_available
from xmoe.conversion.recovery import RecoveryConfig
from xmoe.storage.model_dirs import check_model_target, staged_model_directory
from xmoe.training.rundir import RunDir

__all__ = ["REAL_MODEL_HINT", "calibration_windows", "real_model_available", "sparsify_directory"]


def has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` holds a saved transformers tokenizer."""
    return any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))


def calibration_windows(
    source: Path, tokens: int, seq_len: int, text_file: str | os.PathLike[str] | None
) -> torch.Tensor:
    """(B, T) int64 calibration windows: ``text_file`` (else the project's training documents,
    half the windows from the Shakespeare works and half from the KJV books, so the calibration
    sees both domains) tokenised with the tokenizer saved in ``source``, cut into
    ``tokens // seq_len`` windows of ``seq_len`` consecutive tokens.

    Raises:
        ValueError: no tokenizer in ``source``, or too little text for one window.
    """
    from transformers import AutoTokenizer

    if not has_tokenizer(source):
        raise ValueError(
            f"calibration needs the tokenizer of {source}, and it holds none; save it next to "
            "the model, or convert without calibration (--partition contiguous --router oracle)"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    if text_file is not None:
        texts = [Path(text_file).read_text(encoding="utf-8")]
    else:
        from xmoe.data.corpus import DOMAINS, load_documents, split_documents

        train_docs, _ = split_documents(load_documents())
        texts = [
            "\n\n".join(doc.text for doc in train_docs if doc.domain == domain)
            for domain in DOMAINS
        ]
    windows = max(1, tokens // seq_len)
    counts = [windows // len(texts) + (i < windows % len(texts)) for i in range(len(texts))]
    parts = [_windows(tokenizer, t, n, seq_len) for t, n in zip(texts, counts, strict=True) if n]
    return torch.cat(parts)


def _windows(tokenizer, text: str, count: int, seq_len: int) -> torch.Tensor:
    """Up to ``count`` windows of ``seq_len`` consecutive tokens from the start of ``text``."""
    # tokenise only what the windows need (about 4 characters per token, with a margin)
    ids = tokenizer(text[: count * seq_len * 8], add_special_tokens=False)["input_ids"]
    if len(ids) < seq_len:
        raise ValueError(
            f"the calibration text has {len(ids)} tokens, fewer than one window of {seq_len}"
        )
    count = min(count, len(ids) // seq_len)
    return torch.tensor(ids[: count * seq_len], dtype=torch.int64).view(count, seq_len)


def sparsify_directory(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    expert_size: int | None,
    calibration_tokens: int = 16384,
    seq_len: int = 256,
    calibration_text: str | os.PathLike[str] | None = None,
    progress: bool = True,
    force: bool = False,
    recovery: RecoveryConfig | None = None,
    recovery_checkpoint: str | os.PathLike[str] | None = None,
    **settings: Any,
):
    """Load the causal LM in ``source`` (fp32), :func:`~xmoe.conversion.sparsify` it, with
    ``recovery`` fine-tune it (:func:`~xmoe.conversion.recovery.recover`, distilled from the
    loaded dense model on windows of the calibration text), and write it (and the tokenizer,
    when there is one) to ``out``. A neurons-mode model's thresholds are re-solved after the
    recovery (:func:`~xmoe.conversion.sparsify.set_target_flops`, on the calibration windows):
    the fine-tune moves the scores across them, which would change its FLOPs.

    ``out`` is written as ``xmoe export`` writes
    (:func:`~xmoe.storage.model_dirs.staged_model_directory`): staged, put in place only when
    complete, the weights carrying digests and the config they were saved with, checked on load.

    Args:
        force: write into a non-empty ``out`` (replacing the model files there).
        expert_size: neurons per expert (experts mode; None in the neurons mode).
        recovery: the recovery fine-tune's settings (token budget, ...); None: no recovery.
        recovery_checkpoint: the recovery's checkpoint file (default
            ``<out>.recovery.safetensors`` beside ``out``): a rerun of the same conversion
            resumes from it, another conversion's is refused; removed once ``out`` is written.
        settings: ``partition``, ``router``, ``active_fraction``, ``threshold``, ``mode``, and
            the other :class:`~xmoe.conversion.SparsifyConfig` fields.

    Returns:
        the sparsified model.

    Raises:
        ValueError: ``source`` is not a model directory, ``out`` is an xmoe run directory, or a
            bad setting.
        FileExistsError: ``out`` is a file, or a non-empty directory without ``force``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xmoe.conversion.recovery import recover
    from xmoe.conversion.sparsify import set_target_flops, sparsify
    from xmoe.training.checkpoint import previous_path

    source = Path(source)
    if not (source / "config.json").is_file():
        raise ValueError(
            f"{source} is not a directory with a transformers causal LM (no config.json)"
        )
    _check_output(Path(out), force)
    if calibration_tokens < 1 or seq_len < 1:
        raise ValueError(
            f"calibration_tokens={calibration_tokens} and seq_len={seq_len} must be >= 1"
        )
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    config = SparsifyConfig(expert_size=expert_size, **settings)
    calibration = (
        calibration_windows(source, calibration_tokens, seq_len, calibration_text)
        if config.needs_calibration
        else None
    )
    sparse = sparsify(model, expert_size, calibration=calibration, progress=progress, **settings)
    checkpoint = None
    if recovery is not None:
        checkpoint = Path(recovery_checkpoint or f"{out}.recovery.safetensors")
        key = _recovery_key(source, config, calibration_tokens, seq_len, calibration_text)
        windows = calibration_windows(source, recovery.tokens, recovery.seq_len, calibration_text)
        recover(sparse, windows, recovery, model, checkpoint, progress=progress, key=key)
        if config.mode == "neurons":  # recovery moved the scores across the fixed thresholds
            set_target_flops(sparse, config.target_flops, calibration, progress=progress)
    with staged_model_directory(Path(out), "xmoe sparsify") as staging:
        sparse.save_pretrained(staging)
        if has_tokenizer(source):  # a model directory without a tokenizer stays without one
            AutoTokenizer.from_pretrained(source).save_pretrained(staging)
    if checkpoint is not None:  # its result is in out now
        for path in (checkpoint, previous_path(checkpoint)):
            path.unlink(missing_ok=True)
    return sparse


def _recovery_key(
    source: Path,
    config: SparsifyConfig,
    tokens: int,
    seq_len: int,
    text: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """What a recovery checkpoint's weights were trained from: the source directory, the
    conversion settings and the calibration (tokens, window length, text file)."""
    calibration = [tokens, seq_len, None if text is None else str(text)]
    return {
        "source": str(source.resolve()),
        "sparsify": config.to_dict(),
        "calibration": calibration,
    }


def _check_output(out: Path, force: bool) -> None:
    """Refuse ``out`` before any work: a file, a non-empty directory without ``force``, and an
    xmoe run directory even with it (its ``tokenizer.json`` and export would be replaced by an
    unrelated model's)."""
    run = RunDir(out)
    if out.is_dir() and (run.has_checkpoint or run.config_path.exists()):
        raise ValueError(
            f"sparsify output {out} is an xmoe run directory; write the sparsified model to a "
            "directory of its own"
        )
    check_model_target(out, force=force, what="sparsify output")
