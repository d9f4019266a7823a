"""A trained run as a transformers model directory (``xmoe export``, and ``xmoe train``'s export).

It composes the run's verified model and tokenizer (:class:`~xmoe.training.RunDir`) with the
writer of :mod:`xmoe.hf.export`; neither of those packages imports the other.
"""

from __future__ import annotations

import os
from pathlib import Path

from xmoe.compression.saving import is_compressed_run
from xmoe.hf.export import export_model
from xmoe.storage.model_dirs import check_model_target
from xmoe.training.rundir import RunDir


def export_run(
    run: str | os.PathLike, out_dir: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``generation_config.json`` and (for corpus
    runs) the tokenizer files of a trained run, loadable with ``AutoModelForCausalLM`` and
    ``AutoTokenizer``; returns the directory written.

    ``out_dir`` defaults to the run directory itself. Refuses a file as target, a non-empty
    directory other than the run's own unless ``force`` (:func:`~xmoe.hf.export.export_model`),
    and a tokenizer that is not the one the checkpoint records (never exported without it),
    and a compressed run (``xmoe compress``'s output: the compressed transformers directory is
    ``xmoe compress`` of the export).
    """
    if is_compressed_run(run):
        raise ValueError(
            f"{run} is xmoe compress's output: an XMoE config cannot describe its compressed "
            "layers, so it is not exported; for a compressed transformers directory, compress "
            "the export instead: xmoe export RUN --out DIR, then xmoe compress DIR --pass ... "
            "--out OUT (OUT loads with AutoModelForCausalLM)"
        )
    run = RunDir(run)
    out = run.path if out_dir is None else Path(out_dir)
    own = out.resolve() == run.path.resolve()
    check_model_target(out, force=force, own=own)  # before the checkpoint loads: fail fast
    lm, config, meta = run.load_model()
    tokenizer = run.load_tokenizer()
    run.check_tokenizer(tokenizer, meta, config.model.vocab_size)
    tokenizer_file = None if tokenizer is None else run.tokenizer_path
    return export_model(lm, out, tokenizer_file=tokenizer_file, force=force, own=own)
