"""The all-to-all dispatcher: expert parallelism over a torch.distributed process group.

Each of the P ranks of the group holds L = E/P consecutive experts (rank p: ``[p·L, (p+1)·L)``).
One layer call on every rank:

1. **counts**: the (E,) kept pairs per expert go to the experts' ranks (one all-to-all of P·L
   integers); each rank learns how many rows each other rank will send to each of its experts,
   and reads the split sizes on the host (the one sync of the step).
2. **rows**: the kept pairs' token rows, already grouped by expert and so by destination rank,
   go to their experts' ranks with uneven splits, and so do their routing weights (both through
   a differentiable ``dist.all_to_all_single``, so gradients flow back).
3. **expert compute**: the received rows are this rank's "tokens": a local plan groups them by
   local expert (a stable sort of the per-source segments) and the same fused expert FFN as
   the local path computes ``weight · FFN_e(row)`` for each.
4. **combine**: the weighted rows go back to the tokens' ranks (the reverse all-to-all) and are
   summed into their tokens there, in the plan's order.

Routing (and so capacity, the balance loss and the routing statistics) happens on the token's
rank, over that rank's tokens: capacity is **per rank** (``C`` from the rank's own token count),
exactly the single-process layer applied to each rank's tokens. Every rank must call the layer,
also with zero tokens (it may still receive rows for its experts).

Shape legend: S tokens here, N kept pairs here, R rows received, P ranks, L local experts,
E experts, D d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from xmoe.dispatch import DispatchPlan
from xmoe.dispatch.dispatcher import Dispatcher


@dataclass
class Traffic:
    """Forward all-to-all volume of one dispatcher since the last :meth:`reset`: bytes this rank
    sent (counts, token rows, routing weights, returned expert rows), and the part of them that
    went to other ranks (``remote_bytes``; a rank's rows for its own experts stay in memory).
    The backward sends the same volume again, rows and weights in reverse."""

    calls: int = 0
    count_bytes: int = 0
    row_bytes: int = 0
    weight_bytes: int = 0
    return_bytes: int = 0
    remote_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.count_bytes + self.row_bytes + self.weight_bytes + self.return_bytes

    def reset(self) -> None:
        self.calls = self.count_bytes = self.row_bytes = self.weight_bytes = 0
        self.return_bytes = self.remote_bytes = 0


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` along dim 0 with uneven splits; its backward is the reverse
    all-to-all of the gradient. (The same as ``torch.distributed.nn.functional``'s, which is
    deprecated; the functional-collectives one imports torch._dynamo on first use, seconds per
    process.)"""

    @staticmethod
    def forward(ctx, rows, out_rows, out_splits, in_splits, group):
        ctx.shape, ctx.splits, ctx.group = rows.shape, (out_splits, in_splits), group
        out = rows.new_empty(out_rows, *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        rows = _AllToAll.apply(grad.contiguous(), ctx.shape[0], in_splits, out_splits, ctx.group)
        return rows, None, None, None, None


def _exchange(rows: torch.Tensor, out_rows: int, out_splits, in_splits, group) -> torch.Tensor:
    """Uneven differentiable all-to-all along dim 0."""
    return _AllToAll.apply(rows, out_rows, out_splits, in_splits, group)


class AllToAllDispatcher(Dispatcher):
    """Sends each kept pair's row to the rank owning its expert and the result back.

    Args:
        group: the expert-parallel process group (None = the world).
        group_size: P. group_rank: this rank's index in the group.
        num_experts: E (divisible by P). The ``experts`` module passed in at call time holds
            this rank's L = E/P experts (see :func:`xmoe.distributed.expert_parallel`).
    """

    name = "all_to_all"

    def __init__(self, group, group_size: int, group_rank: int, num_experts: int) -> None:
        if num_experts % group_size:
            raise ValueError(
                f"num_experts={num_experts} is invalid with {group_size} expert-parallel ranks: "
                "num_experts must be divisible by the expert-parallel size"
            )
        self.group = group
        self.group_size = group_size
        self.group_rank = group_rank
        self.num_experts = num_experts
        self.num_local_experts = num_experts // group_size
        self.traffic = Traffic()

    def __repr__(self) -> str:
        return (
            f"AllToAllDispatcher(rank {self.group_rank} of {self.group_size}, experts "
            f"{self.local_experts.start}..{self.local_experts.stop - 1} of {self.num_experts})"
        )

    @property
    def local_experts(self) -> range:
        first = self.group_rank * self.num_local_experts
        return range(first, first + self.num_local_experts)

    def __call__(self, experts, x_SD, pairs):
        plan, weight_N = pairs.plan, pairs.weight_N
        P, L, D = self.group_size, self.num_local_experts, x_SD.shape[1]
        if plan.num_experts != self.num_experts:
            raise ValueError(
                f"the plan has {plan.num_experts} experts, the dispatcher {self.num_experts}"
            )
        token_N = plan.token_idx_N
        if not plan.sorted_by_expert:  # rows must be grouped by destination rank
            order_N = torch.sort(plan.expert_idx_N, stable=True).indices
            token_N, weight_N = token_N.index_select(0, order_N), weight_N.index_select(0, order_N)

        # 1. counts: recv_counts_PL[p, l] = rows rank p sends to my local expert l
        send_counts_PL = plan.counts_E.reshape(P, L)
        recv_counts_PL = torch.empty_like(send_counts_PL)
        dist.all_to_all_single(recv_counts_PL, send_counts_PL, group=self.group)
        send_splits = send_counts_PL.sum(1).tolist()
        recv_splits = recv_counts_PL.sum(1).tolist()
        num_received = sum(recv_splits)

        # 2. rows and weights to the experts' ranks
        rows_ND = x_SD.index_select(0, token_N)
        recv_RD = _exchange(rows_ND, num_received, recv_splits, send_splits, self.group)
        recv_weight_R = _exchange(weight_N, num_received, recv_splits, send_splits, self.group)

        # 3. local expert compute: received rows are the tokens of a local plan
        local_expert_R = torch.repeat_interleave(
            torch.arange(L, device=x_SD.device).repeat(P), recv_counts_PL.reshape(-1)
        )
        order_R = torch.sort(local_expert_R, stable=True).indices
        local_plan = DispatchPlan(
            order_R, local_expert_R.index_select(0, order_R), recv_counts_PL.sum(0), num_received
        )
        y_RD = experts(recv_RD, local_plan, recv_weight_R.index_select(0, order_R))

        # 4. back to the tokens' ranks, summed into tokens in the plan's order
        back_ND = _exchange(y_RD, token_N.shape[0], send_splits, recv_splits, self.group)
        out_SD = x_SD.new_zeros(plan.num_tokens, D).index_add(0, token_N, back_ND)

        traffic, row_bytes = self.traffic, D * x_SD.element_size()
        sent_pairs, me = token_N.shape[0], self.group_rank
        traffic.calls += 1
        traffic.count_bytes += send_counts_PL.numel() * send_counts_PL.element_size()
        traffic.row_bytes += sent_pairs * row_bytes
        traffic.weight_bytes += sent_pairs * weight_N.element_size()
        traffic.return_bytes += num_received * row_bytes
        traffic.remote_bytes += (
            (sent_pairs - send_splits[me]) * (row_bytes + weight_N.element_size())
            + (num_received - recv_splits[me]) * row_bytes
            + (P - 1) * L * send_counts_PL.element_size()
        )
        return out_SD
