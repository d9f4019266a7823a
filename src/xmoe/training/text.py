"""Text in and out of a trained run: its prompts to ids and back (its tokenizer, or token ids
for synthetic runs), and the experts each token used."""

from __future__ import annotations

import os

import torch

from xmoe.models import TransformerLM
from xmoe.training.evaluate import experts_per_token
from xmoe.training.rundir import RunDir


class TextCodec:
    """Encodes and decodes text for a run: its BPE tokenizer, or space-separated ids for runs on
    synthetic data (which have no tokenizer)."""

    def __init__(self, run: RunDir, vocab_size: int, meta: dict | None = None) -> None:
        """The run's tokenizer, checked against the model (:meth:`RunDir.check_tokenizer`)
        when the checkpoint ``meta`` is given."""
        self.vocab_size = vocab_size
        self.tokenizer = run.load_tokenizer()
        if meta is not None:
            run.check_tokenizer(self.tokenizer, meta, vocab_size)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is not None:
            ids = self.tokenizer.encode(text).ids
            if any(not 0 <= i < self.vocab_size for i in ids):
                raise ValueError(
                    f"the tokenizer gave ids outside the model's vocabulary [0, {self.vocab_size})"
                )
            return ids
        try:
            ids = [int(part) for part in text.split()]
        except ValueError:
            raise ValueError(
                "this run has no tokenizer (synthetic data): give the prompt as space-separated "
                f"token ids in [0, {self.vocab_size})"
            ) from None
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise ValueError(f"prompt ids must be in [0, {self.vocab_size})")
        return ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids)
        return " ".join(str(i) for i in ids)

    def pieces(self, ids: list[int]) -> list[str]:
        """The text of each token on its own."""
        return [self.decode([i]) for i in ids]


def load_text_model(path: str | os.PathLike) -> tuple[TransformerLM, TextCodec]:
    """A run's model (eval mode) and the codec of its text, checked against each other."""
    run = RunDir(path)
    lm, train_config, meta = run.load_model()
    return lm, TextCodec(run, train_config.model.vocab_size, meta)


def expert_count_lines(model: TransformerLM, codec: TextCodec, text: str, width: int = 100):
    """Lines showing each token of ``text`` with the experts it used (mean over MoE layers)
    underneath, wrapped at ``width`` characters."""
    ids = codec.encode(text)
    counts = experts_per_token(model, torch.tensor([ids]))[0].tolist()
    lines, top, bottom = [], "", ""
    for piece, count in zip(codec.pieces(ids), counts, strict=True):
        label = piece.replace("\n", "⏎")
        cell = max(len(label), len(f"{count:.1f}")) + 1
        if len(top) + cell > width and top:
            lines += [top, bottom, ""]
            top = bottom = ""
        top += label.ljust(cell)
        bottom += f"{count:.1f}".ljust(cell)
    return [*lines, top, bottom]
