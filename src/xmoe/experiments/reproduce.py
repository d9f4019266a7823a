"""`xmoe reproduce`: train the paper's family and the router ablations at one token budget, sweep
the threshold at evaluation, and write ``docs/results/lm.md`` with its plots.

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
]


def reproduce(settings: ReproduceSettings) -> Path:
    """Train and evaluate every (preset, seed), then write the report; returns lm.md's path."""
    started = time.perf_counter()
    data = load_token_data(preset("dense"), progress=settings.progress)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are processes
    records = run_all(settings, data)
    return write_report(records, settings, data, time.perf_counter() - started)
