"""Turn an `xmoe train` run directory into a transformers model directory."""

from __future__ import annotations

import os
from pathlib import Path

from xmoe.data import EOT_TOKEN
from xmoe.hf.configuration import XMoEConfig
from xmoe.hf.modeling import XMoEForCausalLM
from xmoe.training.checkpoint import resolve_checkpoint_path
from xmoe.training.trainer import TOKENIZER_NAME, load_model


def hf_model_from_run(run: str | os.PathLike) -> XMoEForCausalLM:
    """The :class:`XMoEForCausalLM` (eval mode) holding a trained run's weights."""
    lm, train_config, _ = load_model(resolve_checkpoint_path(run))
    model = XMoEForCausalLM(XMoEConfig.from_model_config(train_config.model))
    model.model.lm.load_state_dict(lm.state_dict())
    return model.eval()


def export_run(run: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``generation_config.json`` and (for corpus
    runs) the tokenizer files of a trained run, loadable with ``AutoModelForCausalLM`` and
    ``AutoTokenizer``. ``out_dir`` defaults to the run directory itself."""
    checkpoint = resolve_checkpoint_path(run)
    out_dir = Path(out_dir) if out_dir is not None else checkpoint.parent
    hf_model_from_run(checkpoint).save_pretrained(out_dir)
    tokenizer_file = checkpoint.parent / TOKENIZER_NAME
    if tokenizer_file.exists():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(tokenizer_file),
            eos_token=EOT_TOKEN,
            bos_token=EOT_TOKEN,
            pad_token=EOT_TOKEN,
            unk_token=None,
        )
        tokenizer.save_pretrained(out_dir)
    return out_dir
