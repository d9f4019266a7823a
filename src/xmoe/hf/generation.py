"""The one generation path: an xmoe language model sampled through transformers' ``generate()``
(KV cache), with a temperature that stays finite at any finite value. ``xmoe generate`` and the
demos use it."""

from __future__ import annotations

import math
import time
from typing import Protocol

import torch

from xmoe.config import _require_seed
from xmoe.hf.export import hf_model_from_lm
from xmoe.models import TransformerLM
from xmoe.models.usage import ExpertUsage


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, finite for every finite ``temperature > 0``: the maximum is
    subtracted and the division done in float64, so a tiny temperature keeps only the largest
    logits (greedy) instead of overflowing to inf, and a huge one gives near-uniform weights
    instead of the nan of ``-inf / inf`` (1e300 is inf in float32). Same dtype as ``logits``."""
    wide = logits.double()
    wide = (wide - wide.amax(dim=-1, keepdim=True)) / temperature
    return wide.to(logits.dtype)


class _StableTemperature:
    """A transformers logits processor dividing by the temperature with :func:`scale_logits`,
    in place of transformers' own, which gives inf/nan probabilities at 1e-45 or 1e300."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scale_logits(scores, self.temperature)


def require_utf8(name: str, text: str) -> None:
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


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, seed: int) -> None:
    """Refuse sampling settings :func:`sample` cannot use, naming the setting and its range
    (before any model is loaded)."""
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)) or temperature < 0:
        raise ValueError(
            f"temperature={temperature} is invalid: must be a finite number >= 0 (0 = greedy)"
        )
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} is invalid: must be >= 0 (0 = no top-k filter)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    _require_seed("seed", seed)


def sample(
    lm: TransformerLM,
    ids: list[int],
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    threshold: float | None = None,
) -> tuple[list[int], dict[str, float]]:
    """Extend the prompt ``ids`` by ``max_new_tokens`` tokens sampled from ``lm`` (as its
    transformers model); returns all the ids and speed / expert statistics. ``temperature=0``
    is greedy; any finite temperature > 0 samples (a tiny one as greedy); ``top_k`` 0 or None
    keeps every token; ``threshold`` sets the routers' threshold first."""
    check_sampling(max_new_tokens, temperature, top_k, seed)
    model = hf_model_from_lm(lm)
    if threshold is not None:
        model.set_threshold(threshold)
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
    return out[0].tolist(), stats


class Codec(Protocol):
    """Text to token ids and back (:class:`xmoe.training.text.TextCodec`)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def generate_text(
    lm: TransformerLM, codec: Codec, prompt: str, **settings
) -> tuple[str, dict[str, float]]:
    """Sample a continuation of ``prompt`` (encoded and decoded by ``codec``) with :func:`sample`
    and its ``settings``; returns the text and the statistics."""
    require_utf8("prompt", prompt)
    ids, stats = sample(lm, codec.encode(prompt), **settings)
    return codec.decode(ids), stats
