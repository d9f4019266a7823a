"""Text in and out of trained runs: prompts to ids, generation, per-token expert counts."""

from __future__ import annotations

import math
import os
import time

import torch

from xmoe.config import _require_seed
from xmoe.models import TransformerLM
from xmoe.models.generation import scale_logits
from xmoe.models.usage import ExpertUsage
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


class _StableTemperature:
    """A transformers logits processor dividing by the temperature with :func:`scale_logits`,
    in place of transformers' own, which gives inf/nan probabilities at 1e-45 or 1e300."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scale_logits(scores, self.temperature)


def _require_utf8(name: str, text: str) -> None:
    """Refuse text that is not UTF-8: bytes of argv that do not decode reach Python as lone
    surrogates (U+DC80..U+DCFF for byte 0x80..0xFF), on which the tokenizer fails unnamed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise ValueError(
            f"{name} is not valid UTF-8: {what} at character {error.start}; give UTF-8 text"
        ) from None


def generate_text(
    path: str | os.PathLike,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    threshold: float | None = None,
) -> tuple[str, dict[str, float]]:
    """Sample a continuation of ``prompt`` through the transformers model and its
    ``generate()`` (KV cache); returns the text and speed / expert statistics.
    ``temperature=0`` is greedy; any finite temperature > 0 samples (a tiny one as greedy)."""
    from xmoe.hf.export import hf_model_from_lm

    if not (isinstance(temperature, int | float) and math.isfinite(temperature)) or temperature < 0:
        raise ValueError(
            f"temperature={temperature} is invalid: must be a finite number >= 0 (0 = greedy)"
        )
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} is invalid: must be >= 0 (0 = no top-k filter)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    _require_seed("seed", seed)
    _require_utf8("prompt", prompt)
    run = RunDir(path)
    lm, train_config, meta = run.load_model()
    codec = TextCodec(run, train_config.model.vocab_size, meta)
    model = hf_model_from_lm(lm)
    if threshold is not None:
        model.set_threshold(threshold)
    ids = codec.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty after tokenization: give at least one token")
    limit = model.config.max_seq_len
    if len(ids) + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({len(ids)} tokens) + max_new_tokens={max_new_tokens} exceeds "
            f"max_seq_len={limit}"
        )
    sampling = {"do_sample": False}
    if temperature > 0:
        temper = [_StableTemperature(temperature)]
        sampling = {"do_sample": True, "top_k": top_k or 0, "logits_processor": temper}
    torch.manual_seed(seed)
    started = time.perf_counter()
    with ExpertUsage(model) as usage:
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=model.config.pad_token_id,
            **sampling,
        )
    seconds = time.perf_counter() - started
    new_tokens = out.shape[1] - len(ids)
    stats = {
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else float("inf"),
        "experts_per_token": usage.experts_per_token,
    }
    return codec.decode(out[0].tolist()), stats


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
