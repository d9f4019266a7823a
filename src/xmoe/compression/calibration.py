"""The calibration windows of a trained run's corpus, as ``xmoe compress`` and ``xmoe
compress-grid`` hand them to :func:`~xmoe.compression.compress`.

The training tokens are laid out one domain after another (e.g. every KJV book, then
Shakespeare), so the first N tokens are one domain's alone. The mixed calibration (merge,
quantize, prune, ...) takes an equal share of windows from every training domain's span, and
the per-domain calibration (a pass's ``domain`` option, ``reduce``) takes one domain's windows
alone; in both, a domain's windows are spread evenly over its span (not only its first book).

Shape legend: B windows, T tokens per window (seq_len).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xmoe.compression.base import CompressionError

CALIBRATION_SCHEME = "domain-shares-spread"
"""How :func:`corpus_calibration` picks windows; ``xmoe compress-grid`` records it with each cell,
so that a cell calibrated otherwise (on the first tokens, as before) is measured again."""


@dataclass(frozen=True)
class CorpusCalibration:
    """Attributes:
    mixed: (B, T) int64 windows, an equal share from every training domain.
    domains: domain -> (B, T) int64 windows of that domain alone (``compress(domains=...)``).
    """

    mixed: torch.Tensor
    domains: dict[str, torch.Tensor]


def corpus_calibration(
    train: np.ndarray, spans: dict[str, tuple[int, int]] | None, tokens: int, seq_len: int
) -> CorpusCalibration:
    """The calibration of about ``tokens`` training tokens (at least one window per domain) in
    windows of ``seq_len``, from the token stream ``train`` whose domains lie at ``spans``
    (domain -> (start, end); None: one domain, ``"all"``). A domain shorter than one window
    has no windows.

    Raises:
        CompressionError: no domain holds a whole window.
    """
    parts = {name: p for name, p in domain_parts(train, spans).items() if len(p) >= seq_len}
    if not parts:
        raise CompressionError(
            f"calibration: no training domain holds a window of seq_len={seq_len} tokens "
            f"(the training data has {len(train)})"
        )
    rows = max(1, tokens // seq_len)
    share = max(1, rows // len(parts))  # equal shares: the remainder is left out
    mixed = torch.cat([spread_windows(part, share, seq_len) for part in parts.values()])
    domains = {name: spread_windows(part, rows, seq_len) for name, part in parts.items()}
    return CorpusCalibration(mixed, domains)


def domain_parts(
    tokens: np.ndarray, spans: dict[str, tuple[int, int]] | None
) -> dict[str, np.ndarray]:
    """One corpus domain's tokens per domain (all of ``tokens`` as ``"all"`` without spans)."""
    return {name: tokens[start:end] for name, (start, end) in (spans or {}).items()} or {
        "all": tokens
    }


def spread_windows(tokens: np.ndarray, rows: int, seq_len: int) -> torch.Tensor:
    """(B, T) int64: ``rows`` of the whole windows ``tokens`` splits into, spread evenly from its
    first to its last (all of them if it has fewer)."""
    available = len(tokens) // seq_len
    take = min(rows, available)
    starts = (np.arange(take) * (available - 1) // max(1, take - 1)) * seq_len  # first to last
    stacked = np.stack([tokens[start : start + seq_len] for start in starts])
    return torch.from_numpy(stacked.astype(np.int64))
