"""The tile schedule of one plan: which rows each program of the grouped GEMM computes, and
where each pair's row goes in token-major order, built with tensor ops only (no host sync, so
the launch grid depends on sizes alone and nothing recompiles per batch).

Shape legend: S tokens, N pairs (sorted by expert), E experts, T row tiles (an upper bound:
``ceil(N / block_m) + min(E, N)``; tiles past the real ones have expert -1 and do nothing).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from xmoe.dispatch.plan import DispatchPlan


class Schedule(NamedTuple):
    """What the kernels read of a plan.

    Attributes:
        token_N: (N,) int64 source token of each grouped row (the gather index).
        expert_N: (N,) int64 expert of each grouped row.
        bounds_E1: (E + 1,) int64 segment boundaries: expert e owns rows
            ``bounds_E1[e]:bounds_E1[e + 1]``.
        tile_expert_T: (T,) int64 expert of each row tile, -1 for a tile past the last.
        tile_row_T: (T,) int64 first grouped row of each tile.
        slot_N: (N,) int64 position of each pair in token-major order (the scatter index).
        rowptr_S1: (S + 1,) int64 token s owns token-major slots ``rowptr_S1[s]:rowptr_S1[s+1]``.
        block_m: the rows per tile the schedule was built for.
    """

    token_N: torch.Tensor
    expert_N: torch.Tensor
    bounds_E1: torch.Tensor
    tile_expert_T: torch.Tensor
    tile_row_T: torch.Tensor
    slot_N: torch.Tensor
    rowptr_S1: torch.Tensor
    block_m: int

    @property
    def num_pairs(self) -> int:
        return self.token_N.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.rowptr_S1.shape[0] - 1


def build_schedule(plan: DispatchPlan, block_m: int) -> Schedule:
    """The schedule of a plan sorted by expert, for tiles of ``block_m`` rows."""
    counts_E = plan.counts_E
    num_experts, num_pairs, device = plan.num_experts, plan.num_pairs, counts_E.device
    bounds_E1 = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts_E, 0, out=bounds_E1[1:])
    tiles_E = (counts_E + block_m - 1) // block_m
    tile_end_E = tiles_E.cumsum(0)
    num_tiles = -(-num_pairs // block_m) + min(num_experts, num_pairs)
    tile_T = torch.arange(num_tiles, device=device)
    expert_T = torch.searchsorted(tile_end_E, tile_T, right=True)
    valid_T = expert_T < num_experts
    clamped_T = expert_T.clamp_max(num_experts - 1)
    first_tile_T = tile_end_E[clamped_T] - tiles_E[clamped_T]
    tile_row_T = bounds_E1[clamped_T] + (tile_T - first_tile_T) * block_m
    tile_expert_T = torch.where(valid_T, expert_T, -1)

    token_N = plan.token_idx_N
    by_token_N = torch.sort(token_N, stable=True)
    slot_N = torch.empty_like(by_token_N.indices)
    slot_N[by_token_N.indices] = torch.arange(num_pairs, device=device)
    tokens_S1 = torch.arange(plan.num_tokens + 1, device=device)
    rowptr_S1 = torch.searchsorted(by_token_N.values, tokens_S1)
    tiles_T = (tile_expert_T, tile_row_T)
    return Schedule(token_N, plan.expert_idx_N, bounds_E1, *tiles_T, slot_N, rowptr_S1, block_m)
