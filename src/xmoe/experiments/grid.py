"""The run grid of `xmoe reproduce`: what it runs (:class:`ReproduceSettings`, the family and
the ``--quick`` settings), each run's training config, and training and evaluating the runs.

Each run lives in ``<out>/<preset>/seed<k>/`` with its checkpoint and a ``results.json``; a run
whose results exist is not retrained, and an interrupted run resumes from its checkpoint, so the
whole grid can be killed and restarted and continues with the runs it has not finished.
Runs go ``jobs`` at a time in worker processes (one torch thread each on the CPU).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from xmoe.data import TokenData
from xmoe.experiments.analysis import (
    experts_by_frequency,
    experts_by_kind,
    measure_adaptivity,
)
from xmoe.experiments.router_suite import available_rows, row_config
from xmoe.storage import atomic_write_text
from xmoe.training.config import TrainConfig, apply_overrides
from xmoe.training.evaluate import evaluate
from xmoe.training.presets import ABLATIONS, preset
from xmoe.training.rundir import RunDir
from xmoe.training.trainer import comparable_config, load_token_data, train

SUITES = ("lm", "routers")
FAMILY = ("dense", "switch", "top2", "xmoe-16", "xmoe-32", "xmoe-64")
SWEEP_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The thresholds every threshold model is evaluated at after training."""


@dataclass
class ReproduceSettings:
    """What `xmoe reproduce` runs.

    Args:
        presets: main rows, trained with ``seeds`` seeds each (None: the suite's rows).
            ablations: one-change rows, trained with ``ablation_seeds`` seeds (None: the lm
            suite's :data:`~xmoe.training.presets.ABLATIONS`, none in the routers suite).
            tokens: training tokens per run.
        eval_batches: validation batches per evaluation (spread over the whole split).
        jobs: runs trained at once (worker processes). device: ``auto``, ``cpu`` or ``cuda``.
        out: run directories. docs: where lm.md and the plots go.
        command: the command line recorded in the report.
        suite: ``lm`` (the paper's family and the router ablations, lm.md) or ``routers``
            (every registered router at its paper's default, routers.md): what ``presets``
            name (:data:`xmoe.experiments.router_suite.ROWS` for ``routers``).
        base_preset: the preset whose data the runs train on and, in the ``routers`` suite,
            whose model size and training every row takes (``tiny`` in tests).
    """

    presets: tuple[str, ...] | None = None
    ablations: tuple[str, ...] | None = None
    seeds: int = 3
    ablation_seeds: int = 1
    tokens: int = 2_000_000
    eval_batches: int = 16
    jobs: int = 2
    device: str = "auto"
    out: Path = Path("runs/reproduce")
    docs: Path = Path("docs/results")
    progress: bool = True
    command: str = field(default="xmoe reproduce")
    suite: str = "lm"
    base_preset: str = "top2"

    def __post_init__(self) -> None:
        for name in ("seeds", "ablation_seeds", "tokens", "eval_batches", "jobs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
        if self.suite not in SUITES:
            raise ValueError(f"suite={self.suite!r} is invalid: choose from {SUITES}")
        lm = self.suite == "lm"
        rows = FAMILY if lm else tuple(available_rows(self.base_preset)[0])
        if self.presets is None:
            self.presets = rows
        if self.ablations is None:
            self.ablations = tuple(ABLATIONS) if lm else ()
        known = (*rows, *ABLATIONS) if lm else rows
        unknown = [n for n in (*self.presets, *self.ablations) if n not in known]
        if unknown:
            raise ValueError(f"presets {unknown} are invalid: choose from {known}")

    def runs(self) -> list[tuple[str, int]]:
        main = [(n, s) for n in self.presets for s in range(self.seeds)]
        return main + [(n, s) for n in self.ablations for s in range(self.ablation_seeds)]


QUICK = {"tokens": 30_000, "seeds": 1, "eval_batches": 2, "ablations": ("xmoe-32-target",)}
"""``--quick``: the whole pipeline in a few minutes, for checking it (numbers mean nothing)."""


def run_config(name: str, seed: int, settings: ReproduceSettings) -> TrainConfig:
    base = preset(name) if settings.suite == "lm" else row_config(name, settings.base_preset)
    steps = math.ceil(settings.tokens / base.tokens_per_step)
    return apply_overrides(
        base,
        [
            f"seed={seed}",
            f"max_steps={steps}",
            f"eval_interval={steps}",
            f"eval_batches={settings.eval_batches}",
            f"checkpoint_interval={max(1, steps // 8)}",
            f"log_interval={max(1, steps // 50)}",
            f"device={settings.device}",
        ],
    )


def _train_log_summary(run: RunDir) -> dict:
    train_lines = [x for x in run.read_log() if "loss" in x]
    tail = train_lines[len(train_lines) // 2 :]  # second half: routers have settled somewhat
    return {
        "train_loss": train_lines[-1]["loss"],
        "train_tokens_per_second": float(np.mean([x["tokens_per_second"] for x in tail])),
        "train_drop_fraction": float(np.mean([x.get("drop_fraction", 0.0) for x in tail])),
        "train_experts_per_token": float(np.mean([x.get("experts_per_token", 0.0) for x in tail])),
        "train_curve": [
            (x["step"], x["experts_wanted_per_token"])
            for x in train_lines
            if "experts_wanted_per_token" in x
        ],
    }


def _adaptivity_record(model, config: TrainConfig, data: TokenData, batches: int) -> dict:
    adaptivity = measure_adaptivity(model, data.val, config.batch_size, config.seq_len, batches)
    counts = adaptivity.experts
    record = {
        "p10": float(np.percentile(counts, 10)),
        "p50": float(np.percentile(counts, 50)),
        "p90": float(np.percentile(counts, 90)),
        "by_frequency": experts_by_frequency(adaptivity, data.train, data.vocab_size),
        "expert_load": adaptivity.expert_load.tolist(),
    }
    if data.tokenizer is not None:
        record["by_kind"] = experts_by_kind(adaptivity, lambda i: data.tokenizer.decode([i]))
    return record


def run_one(name: str, seed: int, settings: ReproduceSettings, data: TokenData) -> dict:
    """Train (or resume, or reuse) one run and evaluate it; returns its results record."""
    config = run_config(name, seed, settings)
    run = RunDir(settings.out / name / f"seed{seed}")
    results_path = run.path / "results.json"
    if results_path.exists():
        cached = json.loads(results_path.read_text())
        if comparable_config(cached["train_config"]) == comparable_config(config.to_dict()):
            return cached
    started = time.perf_counter()
    progress = settings.progress and settings.jobs == 1
    train(config, run.path, resume=run.has_checkpoint, data=data, progress=progress)
    model, _, _ = run.load_model()
    model.to(config.resolve_device())
    batch, seq, batches = config.batch_size, config.seq_len, settings.eval_batches
    final = evaluate(model, data.val, batch, seq, batches)
    model.set_capacity_at_eval(True)
    with_capacity = evaluate(model, data.val, batch, seq, batches)
    model.set_capacity_at_eval(False)
    moe = config.model.moe
    sweep, adaptivity = [], None
    if moe is not None:
        adaptivity = _adaptivity_record(model, config, data, batches)
    if any(layer.router.threshold_decides() for layer in model.moe_layers):
        for threshold in SWEEP_THRESHOLDS:
            model.set_threshold(threshold)
            point = evaluate(model, data.val, batch, seq, batches)
            sweep.append({"threshold": threshold, **point.to_dict()})
    record = {
        "preset": name,
        "seed": seed,
        "train_config": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "eval": final.to_dict(),
        "eval_capacity": with_capacity.to_dict(),
        "sweep": sweep,
        "adaptivity": adaptivity,
        "device": str(config.resolve_device()),
        "wall_seconds": time.perf_counter() - started,
        **_train_log_summary(run),
    }
    atomic_write_text(results_path, json.dumps(record, indent=2))
    return record


_WORKER_DATA: TokenData | None = None


def _worker_init(threads: int, base_preset: str) -> None:
    global _WORKER_DATA
    torch.set_num_threads(threads)
    _WORKER_DATA = load_token_data(preset(base_preset), progress=False)


def _worker_run(name: str, seed: int, settings: ReproduceSettings) -> dict:
    return run_one(name, seed, settings, _WORKER_DATA)


def run_all(settings: ReproduceSettings, data: TokenData) -> list[dict]:
    """Every (preset, seed) of ``settings``, ``jobs`` at a time, in the order of
    :meth:`ReproduceSettings.runs`."""
    runs = settings.runs()
    bar = tqdm(total=len(runs), desc="reproduce runs", disable=not settings.progress)
    results: dict[tuple[str, int], dict] = {}
    if settings.jobs == 1:
        for name, seed in runs:
            results[name, seed] = run_one(name, seed, settings, data)
            bar.update(1)
    else:
        threads = max(1, torch.get_num_threads() // settings.jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            settings.jobs,
            mp_context=context,
            initializer=_worker_init,
            initargs=(threads, settings.base_preset),
        ) as pool:
            futures = {pool.submit(_worker_run, n, s, settings): (n, s) for n, s in runs}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                name, seed = futures[future]
                ppl = results[name, seed]["eval"]["perplexity"]
                bar.set_postfix_str(f"{name} seed {seed}: ppl {ppl:.1f}")
                bar.update(1)
    bar.close()
    return [results[key] for key in runs]
