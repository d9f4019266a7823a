"""Training speed of the routers suite's rows, timed side by side in one process.

A run's own tokens/s (its training log) says how busy the machine was while it trained: the
suite's runs train hours apart, two at a time, and resume across sessions, so those numbers
compare machines, not routers. Here every row's trained model (seed 0) takes the same optimizer
steps on the same batches, the rows interleaved round by round, in this process with its
threads; the median round is the row's speed. Cached in ``<out>/train_speed.json`` under the
settings that made it (rows and their configs, device, threads, steps, rounds), so a rerun of
a finished suite reuses it.
"""

from __future__ import annotations

import json
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from xmoe.data import TokenData, random_batch
from xmoe.storage import atomic_write_text
from xmoe.training.rundir import RunDir
from xmoe.training.step import train_step
from xmoe.training.trainer import build_optimizer, training_loss


def training_speeds(
    rows: list[str], out: Path, data: TokenData, *, steps: int = 2, rounds: int = 3
) -> dict[str, float]:
    """Training tokens/s of each row in ``rows``: seed 0's trained model from ``out/<row>/seed0``
    with a fresh AdamW, gradient clip and precision (the run's own settings), stepping on
    batches shared by every row.

    Each round times ``steps`` optimizer steps of every row in turn, after a first untimed
    round of one warm-up step each. Returns ``{row: tokens/s}`` (the median over ``rounds``).
    """
    if not rows:
        raise ValueError("rows=[] is invalid: give at least one row to time")
    for name, value in (("steps", steps), ("rounds", rounds)):
        if value < 1:
            raise ValueError(f"{name}={value} is invalid: it must be >= 1")
    path = out / "train_speed.json"
    runs = {row: RunDir(out / row / "seed0").load_model() for row in rows}
    configs = {row: config for row, (_, config, _) in runs.items()}
    shapes = {(c.batch_size, c.seq_len) for c in configs.values()}
    if len(shapes) > 1:
        raise ValueError(f"rows={rows} train on different batch shapes {sorted(shapes)}: "
                         "their tokens/s would not compare")  # fmt: skip
    device = next(iter(configs.values())).resolve_device()
    key = {
        "rows": {row: config.to_dict() for row, config in configs.items()},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "rounds": rounds,
    }
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["settings"] == key:
            return cached["tokens_per_second"]
    states = {}
    for row, (model, config, _) in runs.items():
        model.to(device).train()
        states[row] = (model, build_optimizer(model, config), config)
    generator = torch.Generator().manual_seed(0)
    first = next(iter(configs.values()))
    batches = [
        tuple(
            t.to(device)
            for t in random_batch(data.train, first.batch_size, first.seq_len, generator)
        )
        for _ in range(steps)
    ]
    seconds: dict[str, list[float]] = {row: [] for row in rows}
    for round_index in range(rounds + 1):  # round 0 warms every row up, untimed
        for row, (model, optimizer, config) in states.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            for batch in batches[: 1 if round_index == 0 else None]:
                train_step(
                    model, optimizer, [batch], partial(training_loss, model, config, device),
                    max_norm=config.clip_norm,
                )  # fmt: skip
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index:
                seconds[row].append(time.perf_counter() - started)
    tokens = steps * first.batch_size * first.seq_len
    result = {row: tokens / statistics.median(times) for row, times in seconds.items()}
    atomic_write_text(path, json.dumps({"settings": key, "tokens_per_second": result}, indent=2))
    return result


__all__ = ["training_speeds"]
