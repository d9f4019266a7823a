"""`xmoe reproduce`: train the paper's family and the router ablations at one token budget, sweep
the threshold at evaluation, and write ``docs/results/lm.md`` with its plots.

Each run lives in ``<out>/<preset>/seed<k>/`` with its checkpoint and a ``results.json``; a run
whose results exist is not retrained, and an interrupted run resumes from its checkpoint, so the
whole command can be killed and restarted and continues with the runs it has not finished.
Runs go ``jobs`` at a time in worker processes (one torch thread each on the CPU).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
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
from xmoe.registry import ROUTERS
from xmoe.storage import atomic_write_text
from xmoe.training.config import TrainConfig, apply_overrides
from xmoe.training.evaluate import evaluate
from xmoe.training.presets import ABLATIONS, preset
from xmoe.training.rundir import RunDir
from xmoe.training.trainer import load_token_data, train

FAMILY = ("dense", "switch", "top2", "xmoe-16", "xmoe-32", "xmoe-64")
SWEEP_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
HEADLINE_THRESHOLD = 0.5
"""The one evaluation threshold of the headline row, chosen before the runs (the scratch runs
of issue 12 pointed at it); every other t is in the sweep table."""


@dataclass
class ReproduceSettings:
    """What `xmoe reproduce` runs.

    Args:
        presets: main rows, trained with ``seeds`` seeds each. ablations: one-change rows,
            trained with ``ablation_seeds`` seeds. tokens: training tokens per run.
        eval_batches: validation batches per evaluation (spread over the whole split).
        jobs: runs trained at once (worker processes). device: ``auto``, ``cpu`` or ``cuda``.
        out: run directories. docs: where lm.md and the plots go.
        command: the command line recorded in the report.
    """

    presets: tuple[str, ...] = FAMILY
    ablations: tuple[str, ...] = tuple(ABLATIONS)
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

    def __post_init__(self) -> None:
        for name in ("seeds", "ablation_seeds", "tokens", "eval_batches", "jobs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: must be an integer >= 1")
        known = (*FAMILY, *ABLATIONS)
        unknown = [n for n in (*self.presets, *self.ablations) if n not in known]
        if unknown:
            raise ValueError(f"presets {unknown} are invalid: choose from {known}")

    def runs(self) -> list[tuple[str, int]]:
        main = [(n, s) for n in self.presets for s in range(self.seeds)]
        return main + [(n, s) for n in self.ablations for s in range(self.ablation_seeds)]


QUICK = {"tokens": 30_000, "seeds": 1, "eval_batches": 2, "ablations": ("xmoe-32-target",)}
"""``--quick``: the whole pipeline in a few minutes, for checking it (numbers mean nothing)."""


def run_config(name: str, seed: int, settings: ReproduceSettings) -> TrainConfig:
    base = preset(name)
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
        if cached["train_config"] == config.to_dict():
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
    if moe is not None and ROUTERS[moe.router].uses_threshold:
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


def _worker_init(threads: int) -> None:
    global _WORKER_DATA
    torch.set_num_threads(threads)
    _WORKER_DATA = load_token_data(preset("dense"), progress=False)


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
            settings.jobs, mp_context=context, initializer=_worker_init, initargs=(threads,)
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _sweep_point(run: dict, threshold: float) -> dict | None:
    return next((p for p in run["sweep"] if p["threshold"] == threshold), None)


def summarize(records: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per preset: mean and sample std over seeds of the reported metrics."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for name in dict.fromkeys(r["preset"] for r in records):
        runs = [r for r in records if r["preset"] == name]
        row = {
            "perplexity": _mean_std([r["eval"]["perplexity"] for r in runs]),
            "moe_mflops": _mean_std([r["eval"]["moe_flops_per_token"] / 1e6 for r in runs]),
            "perplexity_capacity": _mean_std([r["eval_capacity"]["perplexity"] for r in runs]),
            "experts_per_token": _mean_std([r["eval"]["experts_per_token"] for r in runs]),
            "train_drop_fraction": _mean_std([r["train_drop_fraction"] for r in runs]),
            "tokens_per_second": _mean_std([r["train_tokens_per_second"] for r in runs]),
            "parameters": (float(runs[0]["parameters"]), 0.0),
            "seeds": (float(len(runs)), 0.0),
        }
        if runs[0]["adaptivity"]:
            for q in ("p10", "p90"):
                row[q] = _mean_std([r["adaptivity"][q] for r in runs])
        headline = [_sweep_point(r, HEADLINE_THRESHOLD) for r in runs]
        if all(headline):
            row["headline_perplexity"] = _mean_std([p["perplexity"] for p in headline])
            row["headline_mflops"] = _mean_std([p["moe_flops_per_token"] / 1e6 for p in headline])
            row["headline_experts"] = _mean_std([p["experts_per_token"] for p in headline])
        table[name] = row
    return table


def target_lines(table: dict, records: list[dict]) -> list[str]:
    """The issue's targets, each with its measured numbers and a verdict."""
    if "top2" not in table:
        return ["no top-2 row: the targets compare against top-2"]
    top2_ppl, top2_flops = table["top2"]["perplexity"][0], table["top2"]["moe_mflops"][0]
    lines = []
    adaptive = [n for n, row in table.items() if "headline_perplexity" in row]
    for name in adaptive:
        row = table[name]
        ppl, flops = row["headline_perplexity"][0], row["headline_mflops"][0]
        ratio, gain = flops / top2_flops, 1 - ppl / top2_ppl
        verdict = "met" if ppl <= top2_ppl and ratio <= 0.5 else "missed"
        moon = "met" if gain >= 0.03 and ratio <= 0.4 else "missed"
        lines.append(
            f"{name} at t={HEADLINE_THRESHOLD}: perplexity {ppl:.2f} vs top-2 {top2_ppl:.2f} "
            f"({gain:+.1%}) at {ratio:.2f}x top-2's MoE FLOPs; headline (≤ top-2 at ≤ 0.5x) "
            f"**{verdict}**; moonshot (3% better at ≤ 0.4x) {moon}."
        )
        ppl9, flops9 = row["perplexity"][0], row["moe_mflops"][0]
        verdict9 = "met" if ppl9 <= top2_ppl and flops9 <= top2_flops else "missed"
        lines.append(
            f"{name} at t=0.9: {ppl9:.2f} at {flops9 / top2_flops:.2f}x top-2's FLOPs "
            f"(≤ top-2 at ≤ 1x: {verdict9})."
        )
        if "p10" in row:
            spread = row["p90"][0] - row["p10"][0]
            lines.append(
                f"{name}: experts per token p10 {row['p10'][0]:.1f}, p90 {row['p90'][0]:.1f} "
                f"(spread {spread:.1f}; target ≥ 3: {'met' if spread >= 3 else 'missed'})."
            )
    for name in adaptive:
        below = _curve_below(name, records, table)
        lines.append(f"{name}: t-sweep curve below top-2's and Switch's points: {below}.")
    return lines


def _curve_below(name: str, records: list[dict], table: dict) -> str:
    """Whether some point of the model's mean t-sweep beats each baseline in both perplexity
    and FLOPs (lies below-left of it)."""
    runs = [r for r in records if r["preset"] == name]
    points = []
    for i in range(len(runs[0]["sweep"])):
        points.append(
            (
                np.mean([r["sweep"][i]["moe_flops_per_token"] / 1e6 for r in runs]),
                np.mean([r["sweep"][i]["perplexity"] for r in runs]),
            )
        )
    parts = []
    for baseline in ("top2", "switch"):
        if baseline in table:
            bx, by = table[baseline]["moe_mflops"][0], table[baseline]["perplexity"][0]
            ok = any(x <= bx and y <= by for x, y in points)
            parts.append(f"{baseline} {'yes' if ok else 'no'}")
    return ", ".join(parts)


def _fmt(pair: tuple[float, float], digits: int = 2) -> str:
    mean, std = pair
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _opt(row: dict, key: str, digits: int = 2) -> str:
    return _fmt(row[key], digits) if key in row else "–"


def write_report(
    records: list[dict],
    settings: ReproduceSettings,
    data: TokenData,
    elapsed_s: float,
) -> Path:
    """Write ``lm.md`` and its plots into ``settings.docs``; returns the markdown path."""
    from xmoe.experiments.plots import plot_experts_over_training, plot_ppl_vs_flops

    settings.docs.mkdir(parents=True, exist_ok=True)
    table = summarize(records)
    first = records[0]["train_config"]
    compute_s = sum(r["wall_seconds"] for r in records)
    devices = sorted({r["device"] for r in records})
    machine = f"{platform.machine()}, torch {torch.__version__}, fp32, devices {devices}"
    if "cuda" in " ".join(devices) and torch.cuda.is_available():
        machine += f" ({torch.cuda.get_device_name()})"
    lines = [
        "# Language models on Shakespeare + KJV: dense, Switch, top-2, XMoE and router ablations",
        "",
        f"Made by `{settings.command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Machine: {machine}; {settings.jobs} runs at a time. Wall time of this invocation "
        f"{elapsed_s / 60:.1f} min; the runs' own train+eval time adds up to "
        f"{compute_s / 60:.1f} min (runs finished by earlier, interrupted invocations count "
        "with the time they took).",
        "",
        f"Every run: {settings.tokens:,} training tokens ({first['max_steps']} steps of "
        f"{first['batch_size']}x{first['seq_len']}), d_model {first['model']['d_model']}, "
        f"{first['model']['num_layers']} layers (MoE in blocks 2 and 4), vocab "
        f"{first['model']['vocab_size']} BPE, AdamW lr {first['lr']} with warmup and cosine, no "
        f"weight decay on routers. Main rows: seeds 0..{settings.seeds - 1}; ablation rows: "
        f"{settings.ablation_seeds} seed(s). Validation: {settings.eval_batches} batches of "
        f"{first['batch_size']}x{first['seq_len']} windows spread over the held-out works and "
        f"books ({len(data.val):,} tokens in the split; `docs/data.md`). MoE layers are dropless "
        "at evaluation; capacity (γ from the preset) applies in training only. 'MoE MFLOP' counts "
        "the forward FLOPs of the FFNs at MoE positions actually computed (kept pairs plus "
        "routers; the dense FFNs of those blocks for the dense model). Presets and router options "
        "are described in `docs/routing.md`. Training tokens/s are rough (shared machine, "
        f"{settings.jobs} runs at once); `make bench` is where speed is measured.",
        "",
        "## Targets",
        "",
        *[f"- {line}" for line in target_lines(table, records)],
        "",
        "## All rows (dropless evaluation at the trained threshold, t=0.9; top-p: p=0.4)",
        "",
        "| preset | seeds | params | val perplexity | MoE MFLOP/token | experts/token (mean) "
        "| p10 | p90 | perplexity, capacity at eval | train drop rate | train tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['seeds'][0]:.0f} | {row['parameters'][0] / 1e6:.2f}M "
            f"| {_fmt(row['perplexity'])} | {_fmt(row['moe_mflops'], 3)} "
            f"| {'–' if name == 'dense' else _fmt(row['experts_per_token'])} "
            f"| {_opt(row, 'p10', 1)} | {_opt(row, 'p90', 1)} "
            f"| {_fmt(row['perplexity_capacity'])} "
            f"| {'–' if name == 'dense' else _fmt(row['train_drop_fraction'], 3)} "
            f"| {_fmt(row['tokens_per_second'], 0)} |"
        )
    lines += [
        "",
        f"## Headline: threshold models evaluated at t={HEADLINE_THRESHOLD}",
        "",
        "| preset | val perplexity | MoE MFLOP/token | x top-2 FLOPs | experts/token |",
        "|---|---|---|---|---|",
    ]
    top2_flops = table.get("top2", {}).get("moe_mflops", (float("nan"), 0))[0]
    for name, row in table.items():
        if "headline_perplexity" in row:
            lines.append(
                f"| {name} | {_fmt(row['headline_perplexity'])} "
                f"| {_fmt(row['headline_mflops'], 3)} "
                f"| {row['headline_mflops'][0] / top2_flops:.2f} "
                f"| {_fmt(row['headline_experts'])} |"
            )
    lines += [
        "",
        "## Perplexity against MoE FLOPs (t swept at evaluation)",
        "",
        "![perplexity vs FLOPs](lm_ppl_vs_flops.png)",
        "",
        "| preset | t | val perplexity | MoE MFLOP/token | experts/token |",
        "|---|---|---|---|---|",
    ]
    for name in table:
        runs = [r for r in records if r["preset"] == name and r["sweep"]]
        for i, threshold in enumerate(SWEEP_THRESHOLDS if runs else ()):
            points = [r["sweep"][i] for r in runs]
            lines.append(
                f"| {name} | {threshold} | {_fmt(_mean_std([p['perplexity'] for p in points]))} "
                f"| {_fmt(_mean_std([p['moe_flops_per_token'] / 1e6 for p in points]), 3)} "
                f"| {_fmt(_mean_std([p['experts_per_token'] for p in points]))} |"
            )
    lines += [
        "",
        "## Experts per token over training (wanted, before capacity; seed 0)",
        "",
        "![experts over training](lm_experts_over_training.png)",
        "",
        "## Adaptivity: experts per token (t=0.9, dropless, seed 0) by token kind and frequency",
        "",
    ]
    adaptive = [r for r in records if r["seed"] == 0 and r["adaptivity"] and r["sweep"]]
    if adaptive and "by_kind" in adaptive[0]["adaptivity"]:
        kinds = list(adaptive[0]["adaptivity"]["by_kind"])
        lines += [
            "| preset | " + " | ".join(kinds) + " |",
            "|---|" + "---|" * len(kinds),
            *[
                f"| {r['preset']} | "
                + " | ".join(f"{r['adaptivity']['by_kind'][k][0]:.2f}" for k in kinds)
                + " |"
                for r in adaptive
            ],
            "",
        ]
    if adaptive:
        ranks = [label for label, _, _ in adaptive[0]["adaptivity"]["by_frequency"]]
        lines += [
            "| preset | " + " | ".join(f"rank {b}" for b in ranks) + " |",
            "|---|" + "---|" * len(ranks),
            *[
                f"| {r['preset']} | "
                + " | ".join(f"{m:.2f}" for _, m, _ in r["adaptivity"]["by_frequency"])
                + " |"
                for r in adaptive
            ],
        ]
    plot_ppl_vs_flops(records, table, settings.docs / "lm_ppl_vs_flops.png")
    plot_experts_over_training(records, settings.docs / "lm_experts_over_training.png")
    path = settings.docs / "lm.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def reproduce(settings: ReproduceSettings) -> Path:
    """Train and evaluate every (preset, seed), then write the report; returns lm.md's path."""
    started = time.perf_counter()
    data = load_token_data(preset("dense"), progress=settings.progress)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are processes
    records = run_all(settings, data)
    return write_report(records, settings, data, time.perf_counter() - started)
