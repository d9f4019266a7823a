"""Where a trained model spends its experts: per-expert load and experts per token by token kind."""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass

import numpy as np
import torch

from xmoe.data import eval_batches
from xmoe.models import TransformerLM
from xmoe.routing import RoutingStats

TOKEN_KINDS = ("newline", "punctuation", "word start", "word piece", "other")
"""How a BPE token reads: it holds a newline; only punctuation; starts a word (a leading space);
continues a word (letters with no leading space); anything else (digits, mixed)."""

_PUNCTUATION = set(string.punctuation) | {"’", "‘", "“", "”", "—", "–"}


def token_kind(text: str) -> str:
    """The :data:`TOKEN_KINDS` entry of one decoded token."""
    if "\n" in text:
        return "newline"
    stripped = text.strip()
    if stripped and all(ch in _PUNCTUATION for ch in stripped):
        return "punctuation"
    if stripped.isalpha():
        return "word start" if text[:1].isspace() else "word piece"
    return "other"


@dataclass
class Adaptivity:
    """Per-token expert counts of one model over validation windows.

    Attributes:
        token_ids: (M,) predicted-position input ids. experts: (M,) experts per token (mean over
        MoE layers). expert_load: (L, E) share of kept pairs per expert per MoE layer.
    """

    token_ids: np.ndarray
    experts: np.ndarray
    expert_load: np.ndarray


@torch.no_grad()
def measure_adaptivity(
    model: TransformerLM, tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int
) -> Adaptivity:
    """Run ``model`` (eval mode) over validation windows, keeping per-token expert counts."""
    model.eval()
    device = next(model.parameters()).device
    ids, experts, loads = [], [], []
    for x_BT, _ in eval_batches(tokens, batch_size, seq_len, max_batches):
        out = model.run_backbone(x_BT.to(device))  # routing only: no output projection
        if not out.routing:
            raise ValueError("measure_adaptivity needs a model with MoE layers")
        ids.append(x_BT.reshape(-1).numpy())
        kept = RoutingStats.mean(out.routing).kept_per_token
        experts.append(kept.cpu().numpy())
        loads.append(torch.stack([s.expert_load.float() for s in out.routing]).cpu().numpy())
    load = np.sum(loads, axis=0)
    return Adaptivity(
        np.concatenate(ids), np.concatenate(experts), load / load.sum(axis=1, keepdims=True)
    )


def experts_by_kind(adaptivity: Adaptivity, decode) -> dict[str, tuple[float, int]]:
    """Mean experts per token and token count for each :data:`TOKEN_KINDS` entry.

    ``decode`` maps one token id to its text.
    """
    kinds = {}
    result = {}
    kind_of = np.array(
        [kinds.setdefault(t, token_kind(decode(int(t)))) for t in adaptivity.token_ids]
    )
    for kind in TOKEN_KINDS:
        mask = kind_of == kind
        if mask.any():
            result[kind] = (float(adaptivity.experts[mask].mean()), int(mask.sum()))
    return result


def experts_by_frequency(
    adaptivity: Adaptivity, train_tokens: np.ndarray, vocab_size: int, buckets: int = 6
) -> list[tuple[str, float, int]]:
    """Mean experts per token by the token's training-set frequency (log-spaced rank buckets,
    most frequent first): ``(label, mean experts, count)``."""
    counts = np.bincount(train_tokens, minlength=vocab_size)
    rank = np.empty(vocab_size, dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(vocab_size)
    edges = np.unique(np.geomspace(1, vocab_size, buckets + 1).round().astype(np.int64))
    edges[0] = 0
    token_rank = rank[adaptivity.token_ids]
    rows = []
    for low, high in itertools.pairwise(edges):
        mask = (token_rank >= low) & (token_rank < high)
        if mask.any():
            rows.append(
                (f"{low + 1}-{high}", float(adaptivity.experts[mask].mean()), int(mask.sum()))
            )
    return rows
