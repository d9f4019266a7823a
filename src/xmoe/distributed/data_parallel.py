"""Data parallelism next to expert parallelism: gradient sums, the global gradient norm, and
router statistics, each over the right process group (:mod:`xmoe.distributed.groups`).

Gradients are summed, not averaged: the trainer splits one optimizer step's micro-batches over
the ranks and scales each micro-batch loss by 1/(all micro-batches), so the summed gradient is
the single-process gradient of the same step. Non-expert parameters (replicated everywhere) are
all-reduced over the world; expert shards already hold the contributions of every token of
their expert-parallel group (the all-to-all backward brought them), and are all-reduced over
their replica group only when experts are replicated (world > expert-parallel size).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from xmoe.distributed.groups import ExpertParallelGroups
from xmoe.distributed.sharding import expert_parameter_names, moe_layers


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    expert_names = set(expert_parameter_names(model))
    dense, experts = [], []
    for name, param in model.named_parameters():
        (experts if name in expert_names else dense).append(param)
    return dense, experts


def _all_reduce_sum(grads: list[torch.Tensor], group) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
        grad.copy_(reduced)


def sync_gradients(model: nn.Module, groups: ExpertParallelGroups) -> None:
    """Sum the gradients of replicated parameters over the ranks that replicate them (a
    collective; a parameter without a gradient is skipped, which is the same on every rank)."""
    dense, experts = _split(model)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in dense:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for dtype in sorted(by_dtype, key=str):
        _all_reduce_sum(by_dtype[dtype], None)
    if groups.replica_group is not None:
        _all_reduce_sum([p.grad for p in experts if p.grad is not None], groups.replica_group)


def _squared_norm(params: list[nn.Parameter]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])
    return norms.square().sum().cpu()


def clip_grad_norm(model: nn.Module, groups: ExpertParallelGroups, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over the whole sharded model: the 2-norm of every
    gradient of the full model (each expert shard counted once) and the same scaling."""
    dense, experts = _split(model)
    expert_sq = _squared_norm(experts).to(_device(groups))
    dist.all_reduce(expert_sq, group=groups.ep_group)
    total = float(_squared_norm(dense) + expert_sq.cpu()) ** 0.5
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for param in (*dense, *experts):
            if param.grad is not None:
                param.grad.mul_(coef)
    return total


def _device(groups: ExpertParallelGroups) -> torch.device:
    """Where this rank's collectives run (NCCL needs CUDA tensors)."""
    if dist.get_backend(groups.ep_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_values(values: list[float]) -> list[float]:
    """Element-wise sums of per-rank float lists over the world (a collective)."""
    if not values:
        return []
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.tolist()


def sync_router_statistics(model: nn.Module) -> None:
    """Sum the routers' per-step accumulators over the world before they adapt (their
    non-persistent buffers, e.g. the threshold router's experts-wanted count), so replicated
    routers see every rank's tokens and stay identical."""
    buffers = []
    for layer in moe_layers(model).values():
        router = layer.router
        for name in sorted(router._non_persistent_buffers_set):
            buffer = getattr(router, name, None)
            if isinstance(buffer, torch.Tensor):
                buffers.append(buffer)
    for buffer in buffers:
        dist.all_reduce(buffer)
