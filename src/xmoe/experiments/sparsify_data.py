"""The token windows of ``xmoe sparsify-grid``: evenly spaced windows over the project's corpus
split (calibration, recovery fine-tune and held-out evaluation per domain), cached in a verified
safetensors file.

Shape legend: T tokens per window.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from xmoe.experiments.sparsify_settings import DOMAINS, EvalSettings
from xmoe.storage import read_verified, save_verified


def spaced_windows(ids: list[int], tokens: int, seq_len: int) -> torch.Tensor:
    """(tokens // seq_len, seq_len) int64 windows evenly spaced over ``ids`` (the first at the
    start, the last at the end), so a few thousand tokens sample a whole held-out split."""
    count = max(1, tokens // seq_len)
    if len(ids) < seq_len:
        raise ValueError(f"{len(ids)} tokens are fewer than one window of {seq_len}")
    starts = torch.linspace(0, len(ids) - seq_len, count).round().long().tolist()
    flat = torch.tensor(ids, dtype=torch.int64)
    return torch.stack([flat[s : s + seq_len] for s in starts])


def corpus_data(tokenizer, settings: EvalSettings) -> dict[str, torch.Tensor]:
    """Token windows, from the project's corpus and its fixed split (:mod:`xmoe.data.corpus`):
    ``calibration`` (both training splits, windows alternating between the domains:
    quantile thresholds calibrated on one domain over-prune the other), ``recovery`` (the same,
    ``settings.recovery.tokens`` of them), ``recovery_budgets``
    (the same for the largest recovery budget) and ``eval_<domain>`` (the held-out works /
    books)."""
    from xmoe.data.corpus import load_documents, split_documents

    train, val = split_documents(load_documents(settings.cache_dir))

    def ids(docs, domain: str) -> list[int]:
        text = "\n\n".join(doc.text for doc in docs if doc.domain == domain)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    data = {}
    for domain in DOMAINS:
        held_out = ids(val, domain)
        data[f"eval_{domain}"] = spaced_windows(held_out, settings.eval_tokens, settings.seq_len)
    train_ids = {domain: ids(train, domain) for domain in DOMAINS}
    data["calibration"] = alternating_windows(
        train_ids, settings.calibration_tokens, settings.seq_len
    )
    seq_len = settings.recovery.seq_len
    data["recovery"] = alternating_windows(train_ids, settings.recovery.tokens, seq_len)
    data["recovery_budgets"] = alternating_windows(train_ids, settings.recovery_tokens(), seq_len)
    return data


def alternating_windows(ids: dict[str, list[int]], tokens: int, seq_len: int) -> torch.Tensor:
    """(N, seq_len) windows evenly spaced over each domain's ``ids``, ``tokens`` in all,
    alternating between the domains."""
    per_domain = math.ceil(tokens / len(DOMAINS))
    parts = [spaced_windows(ids[d], per_domain, seq_len) for d in DOMAINS]
    count = min(p.shape[0] for p in parts)
    return torch.stack([p[:count] for p in parts], dim=1).reshape(-1, seq_len)


def random_data(settings: EvalSettings, vocab_size: int) -> dict[str, torch.Tensor]:
    """The windows of :func:`corpus_data`, of random token ids (the quick mode: no corpus)."""
    generator = torch.Generator().manual_seed(0)

    def windows(tokens: int, seq_len: int) -> torch.Tensor:
        return torch.randint(0, vocab_size, (max(1, tokens // seq_len), seq_len),
                             generator=generator)  # fmt: skip

    data = {f"eval_{d}": windows(settings.eval_tokens, settings.seq_len) for d in DOMAINS}
    data["calibration"] = windows(settings.calibration_tokens, settings.seq_len)
    data["recovery"] = windows(settings.recovery.tokens, settings.recovery.seq_len)
    data["recovery_budgets"] = windows(settings.recovery_tokens(), settings.recovery.seq_len)
    return data


def load_or_build_data(tokenizer, settings: EvalSettings, path: Path) -> dict[str, torch.Tensor]:
    """:func:`corpus_data`, cached in ``path`` (verified safetensors) for its settings."""
    recovery = settings.recovery.to_dict()
    key = settings.measurement_key() | {"recovery": recovery, "tokens": settings.recovery_tokens()}
    key = json.dumps(key, sort_keys=True)
    if path.is_file():
        tensors, meta, _ = read_verified(path)
        if meta.get("key") == key:
            return tensors
    data = corpus_data(tokenizer, settings)
    save_verified(path, data, {"key": key})
    return data


__all__ = ["DOMAINS", "corpus_data", "load_or_build_data", "random_data", "spaced_windows"]
