"""Write a :class:`~xmoe.models.TransformerLM` as a transformers model directory.

This package sits below ``training``, so it knows nothing of run directories: the caller loads
the model (``RunDir.load_model()``) and hands it here (:func:`xmoe.cli.export.export_run`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from safetensors import SafetensorError

from xmoe.data import EOT_TOKEN
from xmoe.hf.configuration import XMoEConfig
from xmoe.hf.modeling import XMoEForCausalLM
from xmoe.models import TransformerLM
from xmoe.storage.model_dirs import check_model_target, staged_model_directory

HF_TOKENIZER_NAME = "tokenizer.json"
"""The file transformers' fast tokenizer writes, the same name as a run's own tokenizer file."""


def hf_model_from_lm(lm: TransformerLM) -> XMoEForCausalLM:
    """The :class:`XMoEForCausalLM` (eval mode) holding a copy of a :class:`TransformerLM`,
    configured from what ``lm`` holds now (:meth:`~xmoe.models.TransformerLM.live_config`), in
    the model's dtype. The copy keeps ``lm``'s modules as they are, so a compressed lm (merged
    or quantised experts, wrapped routers) generates too, where its weights would not fit the
    layers a config builds."""
    model = XMoEForCausalLM(XMoEConfig.from_model_config(lm.live_config()))
    model.model.lm = copy.deepcopy(lm).to(model.dtype)
    return model.eval()


def save_hf_tokenizer(tokenizer_file: Path, out_dir: Path) -> None:
    """A BPE tokenizer file (``tokenizers`` JSON) as transformers tokenizer files
    (``AutoTokenizer``)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        eos_token=EOT_TOKEN,
        bos_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        unk_token=None,
    )
    tokenizer.save_pretrained(out_dir)


def export_model(
    lm: TransformerLM,
    out: str | os.PathLike,
    *,
    tokenizer_file: Path | None = None,
    force: bool = False,
    own: bool = False,
) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``generation_config.json`` and (given
    ``tokenizer_file``) the tokenizer files of ``lm`` into ``out``, loadable with
    ``AutoModelForCausalLM`` and ``AutoTokenizer``; returns ``out``.

    Refuses a file as ``out``, and a non-empty directory unless ``force`` or ``own`` (``out`` is
    the run the model comes from: its own ``tokenizer.json``, whose digest the run's checkpoint
    records, stays as it is). The files are written into a staging folder, then put in place
    (:func:`~xmoe.storage.model_dirs.staged_model_directory`).
    """
    out = Path(out)
    check_model_target(out, force=force, own=own)
    model = hf_model_from_lm(lm)
    try:
        with staged_model_directory(out, "xmoe export") as staging:
            model.save_pretrained(staging)
            if tokenizer_file is not None:
                save_hf_tokenizer(tokenizer_file, staging)
                if own:
                    (staging / HF_TOKENIZER_NAME).unlink()
    except SafetensorError as error:  # how safetensors reports a full disk
        raise OSError(f"could not write the export into {out}: {error}") from None
    return out
