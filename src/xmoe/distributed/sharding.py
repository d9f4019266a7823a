"""Shard a model's experts over an expert-parallel group and install all-to-all dispatchers.

:func:`expert_parallel` takes an :class:`~xmoe.MoELayer` or any module holding them (a
:class:`~xmoe.models.TransformerLM`), built identically on every rank (same config, same seed),
and keeps on each rank only its E/P experts of every layer: each stacked expert parameter (the
expert kind's ``sharded_parameters()``; for FFN experts ``experts.w1``, ``b1``, ``w2``, ``b2``,
all (E, ...)) becomes its slice ``[p·L, (p+1)·L)`` along the expert dimension, under the same
name. Shared experts stay whole on every rank. The model's parameters keep their names and
order, so optimizers, state dicts and checkpoints line up with the single-process model; only
expert shapes differ (:func:`shard_state_dict` / :mod:`xmoe.distributed.checkpoint` convert).
"""

from __future__ import annotations

import torch
from torch import nn

from xmoe.config import ConfigError
from xmoe.distributed.all_to_all import AllToAllDispatcher
from xmoe.distributed.groups import ExpertParallelGroups, agree_values
from xmoe.layer import MoELayer


def moe_layers(module: nn.Module) -> dict[str, MoELayer]:
    """The MoE layers of ``module`` (itself included) by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, MoELayer)}


def expert_parameter_names(module: nn.Module) -> list[str]:
    """Qualified names of the stacked expert parameters (sharded along dim 0)."""
    names = []
    for prefix, layer in moe_layers(module).items():
        for name in layer.experts.sharded_parameters():
            names.append(".".join(filter(None, (prefix, "experts", name))))
    return names


def check_divisible(module: nn.Module, size: int) -> None:
    """:class:`~xmoe.ConfigError` naming the layer's ``num_experts`` unless E % size == 0."""
    for prefix, layer in moe_layers(module).items():
        experts = layer.config.num_experts
        if experts % size:
            where = f"{prefix}.config.num_experts" if prefix else "config.num_experts"
            raise ConfigError(
                f"num_experts={experts} is invalid for expert parallelism over {size} ranks "
                f"({where}): num_experts must be divisible by the expert-parallel size {size}"
            )


def expert_slice(num_experts: int, size: int, rank: int) -> slice:
    local = num_experts // size
    return slice(rank * local, (rank + 1) * local)


def expert_parallel(module: nn.Module, groups: ExpertParallelGroups | None = None) -> nn.Module:
    """Shard ``module``'s experts in place over ``groups`` (default: all ranks) and return it.

    Every rank must call it with a module built from the same config; a different config on
    some rank, or E not divisible by the expert-parallel size, raises on every rank (a
    :class:`~xmoe.distributed.DistributedError` / :class:`~xmoe.ConfigError` naming the field).
    """
    groups = groups if groups is not None else ExpertParallelGroups.create()
    layers = moe_layers(module)
    configs = {name or "layer": m.config.to_dict() for name, m in layers.items()}
    agree_values("the MoE layer configs", configs)
    size = groups.expert_parallel_size
    check_divisible(module, size)
    for layer in layers.values():
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            raise ValueError("expert_parallel: the module's experts are already sharded")
        num_experts = layer.config.num_experts
        part = expert_slice(num_experts, size, groups.ep_rank)
        for name in layer.experts.sharded_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = layer.experts.get_submodule(owner_name)
            param = getattr(owner, leaf)
            shard = nn.Parameter(param.detach()[part].clone(), requires_grad=param.requires_grad)
            setattr(owner, leaf, shard)
        layer.dispatcher = AllToAllDispatcher(groups.ep_group, size, groups.ep_rank, num_experts)
    module.expert_parallel_groups = groups  # type: ignore[attr-defined]
    return module


def shard_state_dict(
    module: nn.Module, full_state: dict[str, torch.Tensor], groups: ExpertParallelGroups
) -> dict[str, torch.Tensor]:
    """This rank's part of a single-process state dict (expert tensors sliced)."""
    size, rank = groups.expert_parallel_size, groups.ep_rank
    result = dict(full_state)
    for name in expert_parameter_names(module):
        if name in result:
            tensor = result[name]
            result[name] = tensor[expert_slice(tensor.shape[0], size, rank)]
    return result


def traffic(module: nn.Module) -> list:
    """The :class:`~xmoe.distributed.all_to_all.Traffic` counters of every sharded layer."""
    return [
        layer.dispatcher.traffic
        for layer in moe_layers(module).values()
        if isinstance(layer.dispatcher, AllToAllDispatcher)
    ]
