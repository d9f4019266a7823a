"""``xmoe sparsify-grid``: SmolLM2-135M made sparse, quality against compute.

A grid of expert size × partition × router × active fraction, and of the neurons mode (the
per-neuron oracle, TEAL / WINA / greedy / gate-first thresholds at FFN-FLOP targets F, and the
best of them at one F recovered with several token budgets), each cell measured on held-out
Shakespeare and KJV windows (the LM corpus's fixed held-out works and books): perplexity, experts
per token, FFN FLOPs per token, and (for deployable routers) the FFN wall time and end-to-end
forward tokens/s against the dense model, timed side by side in this process. Plus the dense row
and the XMoE route (weighted combine trained at t=1, t lowered at inference).

The run is resumable: every finished cell is a JSON file under ``<out>/cells/``, every converted
model a verified safetensors file under ``<out>/models/``, every recovery fine-tune a checkpoint;
all written atomically. A rerun skips what is done and rewrites the report
(``<docs>/sparsify.md`` and ``sparsify.png``) after every cell, so an interrupted run still
leaves a report of what finished.

The pieces: :mod:`~xmoe.experiments.sparsify_settings` (what is measured),
:mod:`~xmoe.experiments.sparsify_data` (the token windows),
:mod:`~xmoe.experiments.sparsify_metrics` (quality and timing of one model),
:mod:`~xmoe.experiments.sparsify_runner` (the cached cells and models); this module plans the
grid and runs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from xmoe.conversion.recovery import recover
from xmoe.conversion.sparsify import (
    _reconfigure,
    set_active_fraction,
    set_target_flops,
    set_threshold,
    sparse_mlps,
)
from xmoe.experiments.neuron_oracle import neuron_oracle_model, set_oracle_fraction
from xmoe.experiments.sparsify_data import DOMAINS, spaced_windows
from xmoe.experiments.sparsify_metrics import measure_quality
from xmoe.experiments.sparsify_report import worst_ratio, write_report
from xmoe.experiments.sparsify_runner import Runner, cached_cells
from xmoe.experiments.sparsify_settings import EvalSettings


def cell_name(partition: str, size: int, router: str, fraction: float) -> str:
    return f"{partition}-H{size}-{router}-f{fraction:g}"


def neuron_cell_name(method: str, target_flops: float) -> str:
    return f"neurons-{method}-F{target_flops:g}"


def recovered_cell_name(budget: int) -> str:
    return f"neurons-recovered-T{budget}"


Job = tuple[list[str], Callable[[Runner], None]]


def plan(settings: EvalSettings) -> list[Job]:
    """The cells in the order they run, of the modes in ``settings.modes``: dense; the neurons
    mode's training-free cells; the expert mode's cells (:func:`expert_jobs`); last the neurons
    mode's recoveries, the only cells whose cost grows with a token budget (hours each on CPU,
    resumable), so that an interrupted CPU run has every cheap cell first. Each entry is
    ``(cell names, job)``; a job measures one conversion's cells, skipping cached ones."""
    jobs: list[Job] = []

    def dense_job(runner: Runner) -> None:
        if runner.cached("dense") is None:
            meta = {"kind": "dense", "router": "dense", "partition": None, "expert_size": None,
                    "fraction": 1.0}  # fmt: skip
            runner.measure("dense", runner.dense, meta, timed=False)

    jobs.append((["dense"], dense_job))
    neurons = "neurons" in settings.modes
    jobs += neuron_jobs(settings) if neurons else []
    if "experts" in settings.modes:
        jobs += expert_jobs(settings)
    jobs += neuron_recovery_jobs(settings) if neurons else []
    return jobs


def expert_jobs(settings: EvalSettings) -> list[Job]:
    """The expert mode's cells: the first partition's expert sizes, each followed by the
    recoveries (and the XMoE route) that start from it, then the other partitions."""
    jobs: list[Job] = []

    def group(size: int, partition: str, full: bool) -> Job:
        names = []
        cells = []
        for router in settings.routers:
            for fraction in settings.fractions:
                if fraction == 1.0 and (router == "oracle" or not full):
                    continue  # every expert: the same model under any router
                names.append(cell_name(partition, size, router, fraction))
                cells.append((router, fraction))

        def job(runner: Runner) -> None:
            todo = [(n, c) for n, c in zip(names, cells, strict=True) if runner.cached(n) is None]
            if not todo:
                return
            model = runner.converted(size, partition)
            for name, (router, fraction) in todo:
                _reconfigure(model, router="learned" if router == "trained" else "oracle")
                set_active_fraction(model, fraction)
                meta = {"kind": "sparse", "router": router, "partition": partition,
                        "expert_size": size, "num_experts": sparse_mlps(model)[0].num_experts,
                        "fraction": fraction}  # fmt: skip
                runner.measure(name, model, meta, timed=router == "trained")

        return names, job

    first, *rest = settings.partitions
    extra: list[tuple[tuple[int, str], Job]] = []  # (the conversion it starts from, job)
    for size, partition, trained_at in settings.recover:
        names = [cell_name(partition, size, "recovered", f) for f in settings.fractions if f < 1]

        def recovery_job(runner: Runner, size=size, partition=partition, at=trained_at,
                         names=names) -> None:  # fmt: skip
            fractions = [f for f in settings.fractions if f < 1]
            if all(runner.cached(n) is not None for n in names):
                return
            model = runner.recovered(size, partition, at)
            for name, fraction in zip(names, fractions, strict=True):
                if runner.cached(name) is not None:
                    continue
                set_active_fraction(model, fraction)
                meta = {"kind": "sparse", "router": "recovered", "partition": partition,
                        "expert_size": size, "num_experts": sparse_mlps(model)[0].num_experts,
                        "fraction": fraction, "recovered_at": at,
                        "recovery": settings.recovery.to_dict()}  # fmt: skip
                runner.measure(name, model, meta, timed=True)

        extra.append(((size, partition), (names, recovery_job)))

    if settings.xmoe_route:
        size = settings.xmoe_route
        names = [f"xmoe-H{size}-t{t:g}" for t in settings.xmoe_thresholds]

        def xmoe_job(runner: Runner, size=size, names=names) -> None:
            if all(runner.cached(n) is not None for n in names):
                return
            model = runner.xmoe_model(size)
            for name, threshold in zip(names, settings.xmoe_thresholds, strict=True):
                if runner.cached(name) is not None:
                    continue
                set_threshold(model, threshold)
                meta = {"kind": "xmoe", "router": "xmoe", "partition": "clustered",
                        "expert_size": size, "num_experts": sparse_mlps(model)[0].num_experts,
                        "fraction": None, "threshold": threshold,
                        "router_scale": settings.xmoe_router_scale,
                        "recovery": settings.recovery.to_dict()}  # fmt: skip
                runner.measure(name, model, meta, timed=True)

        extra.append(((size, "clustered"), (names, xmoe_job)))

    # each recovery / XMoE job right after the measurements of the conversion it starts from
    for size in settings.expert_sizes:
        jobs.append(group(size, first, full=True))
        jobs.extend(job for source, job in extra if source == (size, first))
    jobs.extend(
        job for source, job in extra if source not in {(s, first) for s in settings.expert_sizes}
    )
    for partition in rest:
        for size in settings.expert_sizes:
            jobs.append(group(size, partition, full=False))
    return jobs


def neuron_jobs(settings: EvalSettings) -> list[Job]:
    """The neurons mode's training-free cells: the per-neuron oracle, each method at each F."""
    jobs: list[Job] = []
    if settings.neuron_oracle:
        names = [cell_name("neuron", 1, "oracle", f) for f in settings.neuron_oracle]

        def oracle_job(runner: Runner) -> None:
            todo = [(n, f) for n, f in zip(names, settings.neuron_oracle, strict=True)
                    if runner.cached(n) is None]  # fmt: skip
            if not todo:
                return
            model = neuron_oracle_model(runner.dense, todo[0][1])
            for name, fraction in todo:
                set_oracle_fraction(model, fraction)
                meta = {"kind": "sparse", "router": "oracle", "partition": "neuron",
                        "expert_size": 1, "num_experts": model.config.intermediate_size,
                        "fraction": fraction}  # fmt: skip
                runner.measure(name, model, meta, timed=False)

        jobs.append((names, oracle_job))
    for method in settings.neuron_methods:
        for target in settings.target_flops:
            name = neuron_cell_name(method, target)

            def method_job(runner: Runner, method=method, target=target, name=name) -> None:
                if runner.cached(name) is None:
                    meta = {"kind": "neurons", "router": method, "method": method,
                            "partition": "neuron", "expert_size": 1, "num_experts": None,
                            "fraction": target}  # fmt: skip
                    runner.measure(name, runner.neuron_model(method, target), meta, timed=False)

            jobs.append(([name], method_job))
    return jobs


def neuron_recovery_jobs(settings: EvalSettings) -> list[Job]:
    """The recoveries of the best neurons-mode method at ``recovery_flops``, one per budget
    (they choose among the training-free cells, so they run after them)."""
    if not settings.neuron_methods:
        return []
    names = [recovered_cell_name(budget) for budget in settings.recovery_budgets]
    return [([name], partial(recovery_job, name=name, budget=budget))
            for name, budget in zip(names, settings.recovery_budgets, strict=True)]  # fmt: skip


RECOVERED_RECORD = {"thresholds": "re-solved after recovery", "flops_by_domain": "measured"}
"""What a recovered neurons-mode cell's record says: its thresholds were re-solved and its FFN
FLOPs measured per domain. A cell measured before (at the thresholds the recovery trained
under, or without the per-domain shares) is measured again from its checkpoint."""


def recovery_job(runner: Runner, name: str, budget: int) -> None:
    """Recover the best neurons-mode cell at ``recovery_flops`` (lowest worst-domain perplexity
    ratio) with ``budget`` tokens of distillation, and measure it. Nothing to start from yet
    (no dense, or a method's cell at ``recovery_flops`` not measured): the cell stays
    unmeasured. The run continues the largest smaller budget's checkpoint when there is one.
    Then the thresholds are re-solved for the target on the recovered weights, on the
    calibration windows (``set_target_flops``): the recovery trains under fixed thresholds, but
    moves the scores across them. A recovery that refuses the model
    (``conversion.recovery.recover`` raising ValueError, as it does for a model without
    SparseMLPs) is stored as skipped with its message."""
    settings = runner.settings
    if runner.cached(name, RECOVERED_RECORD) is not None:
        return
    cells = [c for c in runner.all_cells() if "skipped" not in c]
    dense = next((c for c in cells if c["kind"] == "dense"), None)
    sources = [c for c in cells if c["kind"] == "neurons" and c["router"] != "recovered"
               and c["fraction"] == settings.recovery_flops]  # fmt: skip
    if dense is None or set(settings.neuron_methods) - {c["method"] for c in sources}:
        return  # every budget recovers the best of all the methods, so the same one
    source = min(sources, key=lambda c: worst_ratio(c, dense))
    method, target = source["method"], source["fraction"]
    config = dataclasses.replace(settings.recovery, tokens=budget)

    def checkpoint(tokens: int) -> Path:
        return runner.out / "models" / f"neurons-{method}-F{target:g}-T{tokens}.ckpt"

    # a shorter budget's run is the first steps of this one (conversion.recovery.recover)
    shorter = [b for b in settings.recovery_budgets if b < budget and checkpoint(b).is_file()]
    meta = {"kind": "neurons", "router": "recovered", "method": method, "partition": "neuron",
            "expert_size": 1, "num_experts": None, "fraction": target,
            "recovered_from": source["name"], "recovery": config.to_dict(),
            **RECOVERED_RECORD}  # fmt: skip
    model = runner.neuron_model(method, target)
    try:
        recover(
            model,
            runner.data["recovery_budgets"],
            config,
            teacher=runner.dense,
            checkpoint=checkpoint(budget),
            extends=checkpoint(max(shorter)) if shorter else None,
            progress=settings.progress,
            desc=f"recovery {method} F={target:g} {budget} tokens",
        )
    except ValueError as error:
        runner.skip(name, meta, f"conversion.recovery.recover refused it: {error}")
        return
    set_target_flops(
        model, target, runner.data["calibration"], settings.eval_batch, settings.progress
    )
    runner.measure(name, model, meta, timed=False)


def run_eval(settings: EvalSettings) -> Path:
    """Run (or resume) the grid and write the report; returns the report's path. With
    ``settings.report_only``, only write the report from the cached cells."""
    expected = list(iter_names(settings))
    if settings.report_only:
        return write_report(cached_cells(settings), settings, expected)
    runner = Runner(settings)
    jobs = plan(settings)
    runner.after_cell = lambda: write_report(runner.all_cells(), settings, expected)
    bar = tqdm(total=len(expected), desc="sparsify eval cells", disable=not settings.progress)
    report = write_report(runner.all_cells(), settings, expected)
    for names, job in jobs:
        job(runner)
        bar.update(len(names))
    bar.close()
    report = write_report(runner.all_cells(), settings, expected)
    return report


def iter_names(settings: EvalSettings) -> Iterator[str]:
    """Every cell name the grid holds, in run order."""
    for names, _ in plan(settings):
        yield from names


__all__ = [
    "DOMAINS",
    "EvalSettings",
    "iter_names",
    "measure_quality",
    "plan",
    "run_eval",
    "spaced_windows",
]
