"""Checkpoints of expert-parallel training in the single-process format.

A sharded model is saved by **gathering** every expert tensor (parameters and their optimizer
moments) to rank 0 along the expert dimension, which then writes the ordinary one-file
checkpoint (:mod:`xmoe.training.checkpoint`: verified, atomic, previous one kept). The file is
exactly what a single process would write, so it loads on one process (``xmoe eval``,
``load_model``, transformers) and on any number M of ranks with E % M == 0: every rank reads
the file and keeps its slice (:func:`load_sharded_model_state`,
:func:`load_sharded_optimizer_state`). Gathering costs rank 0 memory for one full copy of the
model and optimizer state, the price of a format that needs no conversion step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from xmoe.distributed.groups import ExpertParallelGroups
from xmoe.distributed.sharding import expert_parameter_names, expert_slice, shard_state_dict


def _gather_experts(tensor: torch.Tensor, groups: ExpertParallelGroups) -> torch.Tensor | None:
    """The full (E, ...) tensor on rank 0 from its expert-parallel group's shards; None on the
    other ranks (ranks outside rank 0's group do not take part)."""
    if groups.rank >= groups.expert_parallel_size:
        return None
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(groups.expert_parallel_size)]
    dist.gather(tensor, parts if groups.is_main else None, dst=0, group=groups.ep_group)
    return torch.cat(parts, 0) if groups.is_main else None


def full_model_state(model: nn.Module, groups: ExpertParallelGroups) -> dict | None:
    """The single-process ``state_dict`` on rank 0 (None elsewhere); a collective."""
    state = model.state_dict()
    expert_names = set(expert_parameter_names(model))
    full = {}
    for name in state:  # state_dict order: the same on every rank
        if name in expert_names:
            full[name] = _gather_experts(state[name], groups)
        else:
            full[name] = state[name]
    return full if groups.is_main else None


def _expert_indices(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, nn.Parameter]:
    """Optimizer state indices (as ``state_dict`` numbers them) of the expert parameters."""
    expert = {id(p) for n, p in model.named_parameters() if n in set(expert_parameter_names(model))}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {index: p for index, p in enumerate(params) if id(p) in expert}


def full_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, groups: ExpertParallelGroups
) -> dict | None:
    """The single-process optimizer ``state_dict`` on rank 0 (None elsewhere); a collective."""
    state = optimizer.state_dict()
    experts = _expert_indices(optimizer, model)
    full_state: dict[int, dict[str, Any]] = {}
    for index in sorted(state["state"]):
        entries = dict(state["state"][index])
        if index in experts:
            param = experts[index]
            for key in sorted(entries):
                value = entries[key]
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    entries[key] = _gather_experts(value, groups)
        full_state[index] = entries
    if not groups.is_main:
        return None
    return {"state": full_state, "param_groups": state["param_groups"]}


def load_sharded_model_state(
    model: nn.Module, full_state: dict[str, torch.Tensor], groups: ExpertParallelGroups
) -> None:
    """Load a single-process state dict into this rank's sharded model."""
    model.load_state_dict(shard_state_dict(model, full_state, groups))


def load_sharded_optimizer_state(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    full_state: dict[str, Any],
    groups: ExpertParallelGroups,
) -> None:
    """Load a single-process optimizer state dict, keeping this rank's slice of expert moments."""
    experts = _expert_indices(optimizer, model)
    size, rank = groups.expert_parallel_size, groups.ep_rank
    state = {}
    for index, entries in full_state["state"].items():
        entries = dict(entries)
        param = experts.get(int(index))
        if param is not None:
            full_shape = (param.shape[0] * size, *param.shape[1:])
            for key, value in entries.items():
                if isinstance(value, torch.Tensor) and tuple(value.shape) == full_shape:
                    entries[key] = value[expert_slice(full_shape[0], size, rank)]
        state[index] = entries
    optimizer.load_state_dict({"state": state, "param_groups": full_state["param_groups"]})
