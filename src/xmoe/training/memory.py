"""The memory a run needs at least, checked before anything is allocated: sizes that cannot fit
are refused with the estimate and the fields behind it, instead of failing inside an allocator
(or in torch's integer conversion) with a message that names neither."""

from __future__ import annotations

import os

import torch

from xmoe.config import ConfigError
from xmoe.training.config import TrainConfig

INDEX_BYTES = 8
"""Token ids are int64."""


def run_memory_bytes(config: TrainConfig, world_size: int = 1) -> int:
    """A lower bound of the bytes one process of the run allocates.

    Weight matrices only (:attr:`ModelConfig.matrix_params`), in fp32 (the master weights stay
    fp32 under bf16 autocast) with their gradients and both AdamW moments: 16 bytes each; with
    expert parallelism (``world_size > 1``) 4, as every rank builds the whole model before
    keeping its experts. Plus one micro-batch: its (batch_size, seq_len + 1) int64 windows and
    its logits over the vocabulary.
    """
    bytes_per_param = 16 if world_size == 1 else 4
    tokens = config.batch_size * config.seq_len
    logit_bytes = 2 if config.precision == "bf16" else 4
    batch = config.batch_size * (config.seq_len + 1) * INDEX_BYTES
    logits = tokens * config.model.vocab_size * logit_bytes
    return config.model.matrix_params * bytes_per_param + batch + logits


def device_memory_bytes(device: torch.device) -> int | None:
    """The total memory of ``device`` (the RAM for the CPU), None where it cannot be told.
    Total rather than free: a run that could fit once other programs end is not refused."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf, or no such name here
        return None


def _gib(count: int) -> str:
    if count.bit_length() > 1000:  # past a float: hundreds of digits were typed into a size
        return "inf GiB"
    return f"{count / 2**30:.3g} GiB"


def check_run_memory(config: TrainConfig, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` when the run cannot fit in its device's memory, naming the
    sizes that decide it."""
    device = config.resolve_device()
    have = device_memory_bytes(device)
    need = run_memory_bytes(config, world_size)
    if have is None or need <= have:
        return
    model = config.model
    sizes = [
        f"model.{name}={getattr(model, name)}"
        for name in ("vocab_size", "d_model", "num_layers", "d_ff")
    ]
    if model.moe is not None:
        sizes += [f"moe.num_experts={model.moe.num_experts}", f"moe.d_expert={model.moe.d_expert}"]
    raise ConfigError(
        f"the run needs at least {_gib(need)} but the {device.type} memory is {_gib(have)}: "
        f"{model.matrix_params:,} parameters ({', '.join(sizes)}) and micro-batches of "
        f"batch_size={config.batch_size} x seq_len={config.seq_len} tokens; make them smaller"
    )
