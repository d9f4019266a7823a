"""Expert-parallel language-model training: the trainer's hooks for N ranks, and the entry point
that ``xmoe train --nproc N`` calls.

The trainer (:func:`xmoe.training.train`) runs the same loop on every rank, with these rules:

- **Steps equal the single-process steps.** A step's ``grad_accum_steps`` micro-batches are
  drawn on every rank from the same generator, in the same order, and split into contiguous
  runs, one per rank (``grad_accum_steps`` must be a multiple of the number of ranks); each
  micro-batch is processed exactly as one process would process it (its own balance loss, its
  own capacity), and the summed gradients equal the single-process ones. So losses, checkpoints
  and resume are those of a single-process run with the same config, to float rounding.
- **Experts are sharded** over the expert-parallel group (all ranks by default); everything else
  is replicated and its gradients all-reduced (:mod:`xmoe.distributed.data_parallel`).
- **Rank 0 writes**: it holds the run's lock and writes the log, the config, the tokenizer and
  the checkpoint, which it gathers into the single-process format
  (:mod:`xmoe.distributed.checkpoint`); every rank reads the checkpoint to resume.
- **Evaluation** runs on every rank over the same batches (so every rank computes the same
  numbers and the MoE layers' collectives line up).
- Failures that can differ between ranks (the lock, a file) are agreed, so every rank raises.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xmoe.config import ConfigError
from xmoe.distributed import checkpoint as sharded
from xmoe.distributed import data_parallel
from xmoe.distributed.groups import ExpertParallelGroups, agree, agree_values
from xmoe.distributed.sharding import expert_parallel


class ExpertParallelTraining:
    """The trainer's parallel hooks for one rank (see the module docstring); the
    single-process hooks are :class:`xmoe.training.trainer.SingleProcess`."""

    def __init__(self, groups: ExpertParallelGroups) -> None:
        self.groups = groups

    @property
    def is_main(self) -> bool:
        return self.groups.is_main

    @property
    def world_size(self) -> int:
        return self.groups.world_size

    def agree(self, step, what: str = "setup"):
        return agree(step, what)

    def check_config(self, config) -> None:
        agree_values("the train config", config.to_dict())
        world = self.groups.world_size
        if config.grad_accum_steps % world:
            raise ConfigError(
                f"grad_accum_steps={config.grad_accum_steps} is invalid with {world} processes: "
                f"grad_accum_steps must be a multiple of {world} (each rank computes whole "
                f"micro-batches of a step); set grad_accum_steps={world * config.grad_accum_steps}"
                " (and divide batch_size to keep the tokens per step)"
            )

    def prepare(self, model) -> None:
        expert_parallel(model, self.groups)

    def owns_micro_batch(self, index: int, total: int) -> bool:
        per_rank = total // self.groups.world_size
        return index // per_rank == self.groups.rank

    def load_model_state(self, model, state) -> None:
        sharded.load_sharded_model_state(model, state, self.groups)

    def load_optimizer_state(self, optimizer, model, state) -> None:
        sharded.load_sharded_optimizer_state(optimizer, model, state, self.groups)

    def reduce_gradients(self, model) -> None:
        data_parallel.sync_gradients(model, self.groups)

    def clip_grad_norm(self, model, max_norm: float) -> float:
        return data_parallel.clip_grad_norm(model, self.groups, max_norm)

    def sum_values(self, values: list[float]) -> list[float]:
        return data_parallel.sum_values(values)

    def from_last_micro_batch(self, value: Any, total: int) -> Any:
        """``value`` as computed by the rank that ran the step's last micro-batch."""
        owner = self.groups.world_size - 1
        values: list[Any] = [None] * self.groups.world_size
        dist.all_gather_object(values, value)
        return values[owner]

    def nonfinite_parameters(self, model) -> list[str]:
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        everyone: list[list[str]] = [[] for _ in range(self.groups.world_size)]
        dist.all_gather_object(everyone, bad)
        return sorted({name for names in everyone for name in names})

    def full_state(self, model, optimizer):
        return (
            sharded.full_model_state(model, self.groups),
            sharded.full_optimizer_state(optimizer, model, self.groups),
        )

    def end_training_step(self, model) -> None:
        data_parallel.sync_router_statistics(model)
        model.end_training_step()


def _train_rank(config_dict, out_dir, options, expert_parallel_size):
    """One rank of :func:`train_distributed` (runs in a spawned process)."""
    from xmoe.training.config import TrainConfig
    from xmoe.training.trainer import train

    groups = ExpertParallelGroups.create(expert_parallel_size)
    config = TrainConfig.from_dict(config_dict)
    if not groups.is_main:
        options = {**options, "progress": False}
    return train(config, out_dir, parallel=ExpertParallelTraining(groups), **options)


def train_distributed(
    config,
    out_dir: str | os.PathLike,
    nproc: int,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    fresh_optimizer: bool = False,
    expert_parallel_size: int | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
    deadline_s: float | None = None,
):
    """Train ``config`` into ``out_dir`` on ``nproc`` local processes with expert parallelism
    (gloo on CPU, NCCL with CUDA); returns rank 0's :class:`~xmoe.training.TrainResult`.

    Errors on any rank are raised here as :class:`~xmoe.distributed.DistributedError` naming the
    rank. ``timeout_s``: the collectives' timeout (default 30 min); ``deadline_s``: a limit on
    the whole run (default none); see :func:`xmoe.distributed.launch`. Under torchrun, call
    :func:`xmoe.training.train` with
    ``parallel=ExpertParallelTraining(ExpertParallelGroups.create())`` on every rank instead.
    """
    from xmoe.distributed.launcher import DEFAULT_TIMEOUT_S, launch

    options = {"resume": resume, "progress": progress, "stop_after": stop_after}
    options["fresh_optimizer"] = fresh_optimizer  # see xmoe.training.train
    results = launch(
        _train_rank,
        nproc,
        config.to_dict(),
        str(Path(out_dir)),
        options,
        expert_parallel_size,
        backend=backend,
        timeout_s=timeout_s or DEFAULT_TIMEOUT_S,
        deadline_s=deadline_s,
    )
    return results[0]
