"""`xmoe reproduce`: train the paper's family and the router ablations at one token budget, sweep
the threshold at evaluation, and write ``docs/results/lm.md`` with its plots; with
``suite="routers"``, every registered router at its paper's default (rows in
:mod:`xmoe.experiments.router_suite`, report in :mod:`xmoe.experiments.router_report`:
``docs/results/routers.md``), through the same grid.

The runs are in :mod:`xmoe.experiments.grid` (resumable, ``jobs`` at a time), the summary and
the markdown in :mod:`xmoe.experiments.report`; this module joins them and is where the CLI, the
demo and the tests find the command's public names.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from xmoe.experiments.grid import FAMILY, QUICK, SWEEP_THRESHOLDS, ReproduceSettings, run_all
from xmoe.experiments.report import HEADLINE_THRESHOLD, summarize, target_lines, write_report
from xmoe.experiments.router_report import write_routers_report
from xmoe.experiments.train_speed import training_speeds
from xmoe.training.presets import preset
from xmoe.training.trainer import load_token_data

__all__ = [
    "FAMILY",
    "HEADLINE_THRESHOLD",
    "QUICK",
    "SWEEP_THRESHOLDS",
    "ReproduceSettings",
    "reproduce",
    "summarize",
    "target_lines",
    "write_report",
    "write_routers_report",
]


def reproduce(settings: ReproduceSettings) -> Path:
    """Train and evaluate every (preset, seed), then write the report (lm.md, or routers.md
    for the routers suite); returns its path."""
    started = time.perf_counter()
    data = load_token_data(preset(settings.base_preset), progress=settings.progress)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are processes
    records = run_all(settings, data)
    if settings.suite == "lm":
        return write_report(records, settings, data, time.perf_counter() - started)
    speeds = training_speeds(list(dict.fromkeys(r["preset"] for r in records)), settings.out, data)
    return write_routers_report(records, settings, data, time.perf_counter() - started, speeds)
