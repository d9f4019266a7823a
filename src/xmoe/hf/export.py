"""Turn an `xmoe train` run directory into a transformers model directory."""

from __future__ import annotations

import os
from pathlib import Path

from xmoe.data import EOT_TOKEN
from xmoe.hf.configuration import XMoEConfig
from xmoe.hf.modeling import XMoEForCausalLM
from xmoe.models import ModelConfig, TransformerLM
from xmoe.training.rundir import RunDir


def hf_model_from_lm(lm: TransformerLM, config: ModelConfig) -> XMoEForCausalLM:
    """The :class:`XMoEForCausalLM` (eval mode) holding a :class:`TransformerLM`'s weights."""
    model = XMoEForCausalLM(XMoEConfig.from_model_config(config))
    model.model.lm.load_state_dict(lm.state_dict())
    return model.eval()


def hf_model_from_run(run: str | os.PathLike | RunDir) -> XMoEForCausalLM:
    """The :class:`XMoEForCausalLM` (eval mode) holding a trained run's verified weights."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    lm, train_config, _ = run.load_model()
    return hf_model_from_lm(lm, train_config.model)


def save_hf_tokenizer(tokenizer_file: Path, out_dir: Path) -> None:
    """The run's BPE tokenizer as transformers tokenizer files (``AutoTokenizer``)."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        eos_token=EOT_TOKEN,
        bos_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
        unk_token=None,
    )
    tokenizer.save_pretrained(out_dir)


def export_run(
    run: str | os.PathLike, out_dir: str | os.PathLike | None = None, force: bool = False
) -> Path:
    """Write ``config.json``, ``model.safetensors``, ``generation_config.json`` and (for corpus
    runs) the tokenizer files of a trained run, loadable with ``AutoModelForCausalLM`` and
    ``AutoTokenizer``. ``out_dir`` defaults to the run directory itself; see
    :meth:`RunDir.export` for what is refused without ``force``."""
    return RunDir(run).export(out_dir, force=force)
