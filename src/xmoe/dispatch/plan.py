"""DispatchPlan: the only thing passed from routing to expert compute.

Shape legend: S tokens, N kept (token, expert) pairs sorted by expert, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """Kept pairs grouped by expert: which token row feeds which expert segment.

    Attributes:
        token_idx_N: (N,) int64 source token of each grouped row.
        expert_idx_N: (N,) int64 expert of each grouped row, non-decreasing.
        counts_E: (E,) int64 rows per expert.
        num_tokens: S, the number of token rows the combine writes.
    """

    token_idx_N: torch.Tensor
    expert_idx_N: torch.Tensor
    counts_E: torch.Tensor
    num_tokens: int

    @property
    def num_pairs(self) -> int:
        return self.token_idx_N.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]

    @cached_property
    def offsets_E(self) -> torch.Tensor:
        """(E,) int32 exclusive end of each expert's segment (the ``offs`` of ``grouped_mm``)."""
        return self.counts_E.cumsum(0).to(torch.int32)

    @cached_property
    def segments(self) -> list[tuple[int, int, int]]:
        """``(expert, start, end)`` of every non-empty segment, on the host (one sync)."""
        ends = self.counts_E.cumsum(0).tolist()
        counts = self.counts_E.tolist()
        return [(e, end - n, end) for e, (n, end) in enumerate(zip(counts, ends, strict=True)) if n]

    def gather(self, x_SD: torch.Tensor) -> torch.Tensor:
        """(S, D) token rows -> (N, D) grouped rows."""
        return x_SD.index_select(0, self.token_idx_N)

    def scatter_add(self, y_ND: torch.Tensor) -> torch.Tensor:
        """(N, D) grouped rows -> (S, D) token rows, summing the rows of each token."""
        out_SD = y_ND.new_zeros(self.num_tokens, y_ND.shape[1])
        return out_SD.index_add_(0, self.token_idx_N, y_ND)

    def expert_sum(self, y_ND: torch.Tensor) -> torch.Tensor:
        """(N, D) grouped rows -> (E, D) per-expert sums (bias gradients)."""
        out_ED = y_ND.new_zeros(self.num_experts, y_ND.shape[1])
        return out_ED.index_add_(0, self.expert_idx_N, y_ND)

    def expert_rows(self, table_ED: torch.Tensor) -> torch.Tensor:
        """(E, D) per-expert rows -> (N, D), one per grouped row (bias broadcast)."""
        return table_ED.index_select(0, self.expert_idx_N)
