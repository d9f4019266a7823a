"""DispatchPlan: the only thing passed from routing to expert compute.

The segment operations (bias adds, bias gradients) have two implementations: a loop over the
host-known segments, one fused pass per (cache-resident) segment, and a tensor-only one that
gathers the (E, D) table per row. On CPU the loop was several times faster at the layer
benchmark's training size (T=4096, d=512, 64 experts), and reading the counts costs no sync
there; elsewhere the tensor-only path runs, so the plan never reads its counts on the host
(:mod:`xmoe.device`).

Shape legend: S tokens, N kept (token, expert) pairs sorted by expert, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from xmoe.device import host_reads_cheap


@dataclass(frozen=True, eq=False)
class DispatchPlan:
    """Kept pairs grouped by expert: which token row feeds which expert segment.

    Attributes:
        token_idx_N: (N,) int64 source token of each grouped row.
        expert_idx_N: (N,) int64 expert of each grouped row, non-decreasing.
        counts_E: (E,) int64 rows per expert.
        num_tokens: S, the number of token rows the combine writes.
        sorted_by_expert: False for a plan whose rows are in any order (``expert_idx_N`` not
            sorted): only engines that gather weights per row (``batched``) can run it; its
            segment operations are the tensor-only ones.
    """

    token_idx_N: torch.Tensor
    expert_idx_N: torch.Tensor
    counts_E: torch.Tensor
    num_tokens: int
    sorted_by_expert: bool = True

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
    def host_segments(self) -> bool:
        """Whether segment operations loop over :attr:`segments` (host counts) and large plans
        run in chunks; False keeps the plan on the device (tensor-only, no host sync)."""
        return self.sorted_by_expert and host_reads_cheap(self.counts_E.device)

    @cached_property
    def segments(self) -> list[tuple[int, int, int]]:
        """``(expert, start, end)`` of every non-empty segment, on the host (one sync)."""
        ends = self.counts_E.cumsum(0).tolist()
        counts = self.counts_E.tolist()
        return [(e, end - n, end) for e, (n, end) in enumerate(zip(counts, ends, strict=True)) if n]

    def chunks(self, max_rows: int) -> list[tuple[DispatchPlan, slice, slice]]:
        """Split into consecutive expert ranges of about ``max_rows`` rows each.

        Returns ``(sub_plan, rows, experts)`` triples covering all rows and all E experts in
        order; a sub-plan's expert ids are relative to ``experts.start``. One chunk (this plan,
        no host sync) when the plan is small enough or off :attr:`host_segments` (the cuts need
        the counts on the host). An expert with more rows than ``max_rows`` is a chunk of its
        own.
        """
        if self.num_pairs <= max_rows or not self.host_segments:
            return [(self, slice(0, self.num_pairs), slice(0, self.num_experts))]
        cuts, total = [0], 0  # expert index where each chunk starts
        counts = self.counts_E.tolist()
        for expert, count in enumerate(counts[:-1]):
            total += count
            if total >= max_rows:
                cuts.append(expert + 1)
                total = 0
        ends = self.counts_E.cumsum(0).tolist()
        if len(cuts) > 1 and ends[-1] == ends[cuts[-1] - 1]:
            cuts.pop()  # only empty experts after the last cut: fold them into the chunk before
        result = []
        for first, last in zip(cuts, [*cuts[1:], len(counts)], strict=True):
            rows = slice(ends[first - 1] if first else 0, ends[last - 1])
            experts = slice(first, last)
            sub = DispatchPlan(
                self.token_idx_N[rows],
                self.expert_idx_N[rows] - first,
                self.counts_E[experts],
                self.num_tokens,
            )
            result.append((sub, rows, experts))
        return result

    def gather(self, x_SD: torch.Tensor) -> torch.Tensor:
        """(S, D) token rows -> (N, D) grouped rows."""
        return x_SD.index_select(0, self.token_idx_N)

    def scatter_add(self, y_ND: torch.Tensor, out_SD: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) grouped rows -> (S, D) token rows, summing the rows of each token (into
        ``out_SD`` when given, else into zeros)."""
        if out_SD is None:
            out_SD = y_ND.new_zeros(self.num_tokens, y_ND.shape[1])
        return out_SD.index_add_(0, self.token_idx_N, y_ND)

    def expert_sum(self, y_ND: torch.Tensor) -> torch.Tensor:
        """(N, D) grouped rows -> (E, D) per-expert sums (bias gradients)."""
        out_ED = y_ND.new_zeros(self.num_experts, y_ND.shape[1])
        return out_ED.index_add_(0, self.expert_idx_N, y_ND)

    def add_expert_rows_(
        self, y_ND: torch.Tensor, table_ED: torch.Tensor, scale_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        """In place: ``y[n] += table[expert(n)]`` (times ``scale[n]`` when given).

        With :attr:`host_segments`, one fused pass per segment instead of materialising an
        (N, D) gather of the table.
        """
        if not self.host_segments:
            rows_ND = table_ED.index_select(0, self.expert_idx_N)
            if scale_N is None:
                return y_ND.add_(rows_ND)
            return y_ND.addcmul_(rows_ND, scale_N.unsqueeze(1))
        for expert, start, end in self.segments:
            if scale_N is None:
                y_ND[start:end].add_(table_ED[expert])
            else:
                y_ND[start:end].addr_(scale_N[start:end], table_ED[expert])
        return y_ND

    def expert_rowdot_and_weighted_sum(
        self, y_ND: torch.Tensor, table_ED: torch.Tensor, scale_N: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(<y[n], table[expert(n)]>, Σ_{n in e} scale[n] · y[n])``: the routing-weight and bias
        gradients of a scaled bias, read in one pass over each (cache-resident) segment.

        Returns ((N,) in ``scale_N``'s dtype, (E, D) in ``y_ND``'s dtype).
        """
        scale = scale_N.to(y_ND.dtype)
        if not self.host_segments:
            dot_N = torch.linalg.vecdot(y_ND, table_ED.index_select(0, self.expert_idx_N))
            return dot_N.to(scale_N.dtype), self.expert_sum(y_ND * scale.unsqueeze(1))
        dot_N = scale_N.new_zeros(y_ND.shape[0])
        sum_ED = y_ND.new_zeros(self.num_experts, y_ND.shape[1])
        for expert, start, end in self.segments:
            segment = y_ND[start:end]
            dot_N[start:end] = torch.mv(segment, table_ED[expert]).to(dot_N.dtype)
            torch.mv(segment.t(), scale[start:end], out=sum_ED[expert])
        return dot_N, sum_ED
