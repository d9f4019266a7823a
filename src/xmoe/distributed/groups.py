"""Process groups for expert parallelism, and agreement checks that fail on every rank.

``world = expert_parallel_size x data_parallel_size``. Ranks ``[i·P, (i+1)·P)`` form expert-
parallel group ``i`` (P = expert-parallel size): between them they hold all E experts, E/P each,
and tokens travel only inside the group. Ranks with the same position in their expert-parallel
group hold the same experts: their expert gradients are summed over that *expert replica* group.
Everything that is not an expert is replicated on every rank and its gradients are summed over
the whole world. With the default ``P = world`` there is one expert-parallel group and no expert
replicas.

A collective that one rank never reaches hangs the others, so every check here that could differ
between ranks is *agreed*: each rank reports, all gather the reports, and all raise (the failing
rank its own error, the others :class:`DistributedError` naming it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from xmoe.config import ConfigError

T = TypeVar("T")


class DistributedError(RuntimeError):
    """A distributed setup or run that cannot go on; raised on every rank."""


@dataclass(frozen=True, eq=False)
class ExpertParallelGroups:
    """This rank's place in the world and its process groups (see the module docstring).

    Attributes:
        rank, world_size: in the default (world) group.
        expert_parallel_size: P, ranks that share one copy of all experts.
        ep_group: this rank's expert-parallel group (None = the world, when P = world).
        ep_rank: this rank's index in it, in [0, P): it holds experts ``[ep_rank·E/P, ...)``.
        replica_group: ranks holding the same experts (None when there are no replicas).
    """

    rank: int
    world_size: int
    expert_parallel_size: int
    ep_group: Any
    ep_rank: int
    replica_group: Any

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.expert_parallel_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def create(cls, expert_parallel_size: int | None = None) -> ExpertParallelGroups:
        """The groups of the initialised default process group (a collective: every rank calls
        it with the same size). ``None`` means P = world size."""
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group "
                "(or use xmoe.distributed.launch / xmoe train --nproc) first"
            )
        rank, world = dist.get_rank(), dist.get_world_size()
        size = world if expert_parallel_size is None else expert_parallel_size
        agree_values("expert_parallel_size", size)
        if not (isinstance(size, int) and 1 <= size <= world and world % size == 0):
            raise ConfigError(
                f"expert_parallel_size={size!r} is invalid: expert_parallel_size must be a "
                f"divisor of the world size {world}"
            )
        ep_group = replica_group = None
        # every rank creates every group, in the same order (new_group is a collective)
        if size < world:
            for start in range(0, world, size):
                group = dist.new_group(list(range(start, start + size)))
                if start <= rank < start + size:
                    ep_group = group
            for position in range(size):
                group = dist.new_group(list(range(position, world, size)))
                if rank % size == position:
                    replica_group = group
        return cls(rank, world, size, ep_group, rank % size, replica_group)


def agree(step: Callable[[], T], what: str = "setup") -> T:
    """Run ``step`` on every rank and make its failure everyone's: returns its result when it
    succeeded everywhere; otherwise the failing rank re-raises its error and the others raise
    :class:`DistributedError` naming that rank and error. Without an initialised process group
    it just runs ``step``."""
    if not (dist.is_available() and dist.is_initialized()):
        return step()
    error: BaseException | None = None
    result = None
    try:
        result = step()
    except Exception as caught:  # reported to every rank below
        error = caught
        report = f"{type(caught).__name__}: {caught}" if str(caught) else type(caught).__name__
    reports: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if error is None else report)
    if error is not None:
        raise error
    failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
    if failed:
        rank, text = failed[0]
        raise DistributedError(f"{what} failed on rank {rank}: {text}")
    return result  # type: ignore[return-value]


def agree_values(name: str, value: Any, group: Any = None) -> None:
    """Raise :class:`DistributedError` on every rank of ``group`` unless all ranks pass the same
    ``value`` (a config dict, a size); the message names ``name`` and, for dicts, the first
    differing keys."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    values: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    for rank, other in enumerate(values):
        if other != values[0]:  # the same message on every rank
            detail = _difference(values[0], other)
            raise DistributedError(
                f"{name}: rank 0 and rank {rank} disagree{detail}; every rank must be started "
                "with the same settings"
            )


def _difference(first: Any, other: Any, prefix: str = "") -> str:
    if isinstance(first, dict) and isinstance(other, dict):
        for key in sorted(set(first) | set(other), key=str):
            if first.get(key) != other.get(key):
                inner = _difference(first.get(key), other.get(key), f"{prefix}{key}.")
                return inner or f" on {prefix}{key} ({first.get(key)!r} vs {other.get(key)!r})"
        return ""
    return f" ({first!r} vs {other!r})" if not prefix else ""
