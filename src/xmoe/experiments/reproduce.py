"""`xmoe reproduce`: train the paper's family at one token budget over several seeds, sweep t at
evaluation, and write ``docs/results/lm.md`` with its plots.

Each run lives in ``<out>/<preset>/seed<k>/`` with its checkpoint and a ``results.json``; a run
whose results exist is not retrained, and an interrupted run resumes from its checkpoint, so the
whole command can be stopped and restarted.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from xmoe.data import TokenData
from xmoe.experiments.analysis import (
    Adaptivity,
    experts_by_frequency,
    experts_by_kind,
    measure_adaptivity,
)
from xmoe.storage import atomic_write_text
from xmoe.training.config import TrainConfig, apply_overrides
from xmoe.training.evaluate import evaluate
from xmoe.training.presets import preset
from xmoe.training.rundir import RunDir
from xmoe.training.trainer import load_model, load_token_data, train

FAMILY = ("dense", "switch", "top2", "xmoe-16", "xmoe-32", "xmoe-64")
SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class ReproduceSettings:
    """What `xmoe reproduce` runs.

    Args:
        presets: preset names to train. seeds: seeds per preset (0 .. seeds-1).
        tokens: training tokens per run (steps = ceil(tokens / tokens per step)).
        eval_batches: validation batches per evaluation (spread over the whole split).
        out: run directories. docs: where lm.md and the plots go.
        command: the command line recorded in the report.
    """

    presets: tuple[str, ...] = FAMILY
    seeds: int = 3
    tokens: int = 400_000
    eval_batches: int = 12
    out: Path = Path("runs/reproduce")
    docs: Path = Path("docs/results")
    progress: bool = True
    command: str = field(default="xmoe reproduce")

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds={self.seeds} is invalid: must be >= 1")
        if self.tokens < 1:
            raise ValueError(f"tokens={self.tokens} is invalid: must be >= 1")
        if self.eval_batches < 1:
            raise ValueError(f"eval_batches={self.eval_batches} is invalid: must be >= 1")
        unknown = [name for name in self.presets if name not in FAMILY]
        if unknown:
            raise ValueError(f"presets {unknown} are invalid: choose from {FAMILY}")


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
            f"checkpoint_interval={max(1, steps // 4)}",
        ],
    )


def _train_log_summary(run_dir: Path) -> dict[str, float]:
    lines = RunDir(run_dir).read_log()
    train_lines = [x for x in lines if "loss" in x]
    tail = train_lines[len(train_lines) // 2 :]  # second half: routers have settled somewhat
    return {
        "train_loss": train_lines[-1]["loss"],
        "train_tokens_per_second": train_lines[-1]["tokens_per_second"],
        "train_drop_fraction": float(np.mean([x.get("drop_fraction", 0.0) for x in tail])),
        "train_experts_per_token": float(np.mean([x.get("experts_per_token", 0.0) for x in tail])),
    }


def run_one(name: str, seed: int, settings: ReproduceSettings, data: TokenData) -> dict:
    """Train (or resume, or reuse) one run and evaluate it; returns its results record."""
    config = run_config(name, seed, settings)
    run_dir = settings.out / name / f"seed{seed}"
    results_path = run_dir / "results.json"
    if results_path.exists():
        cached = json.loads(results_path.read_text())
        if cached["train_config"] == config.to_dict():
            return cached
    train(
        config,
        run_dir,
        resume=RunDir(run_dir).has_checkpoint,
        data=data,
        progress=settings.progress,
    )
    model, _, _ = load_model(run_dir)
    batch, seq = config.batch_size, config.seq_len
    final = evaluate(model, data.val, batch, seq, settings.eval_batches)
    model.set_capacity_at_eval(True)
    with_capacity = evaluate(model, data.val, batch, seq, settings.eval_batches)
    model.set_capacity_at_eval(False)
    sweep = []
    if config.model.moe is not None and config.model.moe.router == "threshold":
        for threshold in SWEEP_THRESHOLDS:
            model.set_threshold(threshold)
            point = evaluate(model, data.val, batch, seq, settings.eval_batches)
            sweep.append({"threshold": threshold, **point.to_dict()})
    record = {
        "preset": name,
        "seed": seed,
        "train_config": config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "eval": final.to_dict(),
        "eval_capacity": with_capacity.to_dict(),
        "sweep": sweep,
        **_train_log_summary(run_dir),
    }
    atomic_write_text(results_path, json.dumps(record, indent=2))
    return record


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def summarize(records: list[dict]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per preset: mean and sample std over seeds of the reported metrics."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for name in dict.fromkeys(r["preset"] for r in records):
        runs = [r for r in records if r["preset"] == name]
        table[name] = {
            "perplexity": _mean_std([r["eval"]["perplexity"] for r in runs]),
            "moe_mflops": _mean_std([r["eval"]["moe_flops_per_token"] / 1e6 for r in runs]),
            "perplexity_capacity": _mean_std([r["eval_capacity"]["perplexity"] for r in runs]),
            "moe_mflops_capacity": _mean_std(
                [r["eval_capacity"]["moe_flops_per_token"] / 1e6 for r in runs]
            ),
            "experts_per_token": _mean_std([r["eval"]["experts_per_token"] for r in runs]),
            "train_experts_per_token": _mean_std([r["train_experts_per_token"] for r in runs]),
            "train_drop_fraction": _mean_std([r["train_drop_fraction"] for r in runs]),
            "tokens_per_second": _mean_std([r["train_tokens_per_second"] for r in runs]),
            "parameters": (float(runs[0]["parameters"]), 0.0),
            "seeds": (float(len(runs)), 0.0),
        }
    return table


def ordering_verdict(table: dict) -> list[str]:
    """Plain sentences on whether the paper's ordering holds, with the numbers: dropless
    evaluation first, then with the training capacity applied (the reference code's protocol)."""
    lines = []
    for metric, flops_key, protocol in (
        ("perplexity", "moe_mflops", "dropless eval"),
        ("perplexity_capacity", "moe_mflops_capacity", "capacity at eval"),
    ):
        ppl = {name: row[metric] for name, row in table.items()}
        flops = {name: row[flops_key][0] for name, row in table.items()}
        if "switch" in ppl and "top2" in ppl:
            (s, s_sd), (t, t_sd) = ppl["switch"], ppl["top2"]
            holds = "holds" if t <= s else "does not hold"
            lines.append(
                f"{protocol}: top-2 ≤ Switch {holds}: top-2 {t:.2f} ± {t_sd:.2f} vs Switch "
                f"{s:.2f} ± {s_sd:.2f}."
            )
        for name in (n for n in ppl if n.startswith("xmoe") and "top2" in ppl):
            (x, x_sd), (t, t_sd) = ppl[name], ppl["top2"]
            holds = "holds" if x <= t else "does not hold"
            within = " (within one std)" if abs(x - t) <= max(x_sd, t_sd) else ""
            lines.append(
                f"{protocol}: {name} ≤ top-2 {holds}{within}: {x:.2f} ± {x_sd:.2f} vs "
                f"{t:.2f} ± {t_sd:.2f}, at {flops[name] / flops['top2']:.2f}x top-2's MoE FLOPs "
                f"per token ({flops[name]:.3f} vs {flops['top2']:.3f} MFLOP)."
            )
    return lines


def router_reading(records: list[dict]) -> list[str]:
    """How peaked the XMoE routers are after training: the share of experts t=0.9 keeps."""
    lines = []
    for name in dict.fromkeys(r["preset"] for r in records if r["sweep"]):
        runs = [r for r in records if r["preset"] == name]
        experts = runs[0]["train_config"]["model"]["moe"]["num_experts"]
        kept = float(np.mean([r["eval"]["experts_per_token"] for r in runs]))
        lines.append(
            f"{name}: at t=0.9 a token keeps {kept:.1f} of {experts} experts "
            f"({kept / experts:.0%}) when dropless; near 90% means the router is still close to "
            "uniform, so the threshold buys no sparsity yet and capacity decides the compute."
        )
    return lines


def _fmt(pair: tuple[float, float], digits: int = 2) -> str:
    mean, std = pair
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _experts(name: str, pair: tuple[float, float], digits: int = 2) -> str:
    return "–" if name == "dense" else _fmt(pair, digits)


def write_report(
    records: list[dict],
    settings: ReproduceSettings,
    data: TokenData,
    adaptivity: Adaptivity | None,
    adaptivity_name: str,
    elapsed_s: float,
) -> Path:
    """Write ``lm.md`` and its plots into ``settings.docs``; returns the markdown path."""
    from xmoe.experiments.plots import plot_adaptivity, plot_ppl_vs_flops

    settings.docs.mkdir(parents=True, exist_ok=True)
    table = summarize(records)
    first = records[0]["train_config"]
    lines = [
        "# Language models on Shakespeare + KJV: dense, Switch, top-2 and XMoE",
        "",
        f"Made by `{settings.command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"in {elapsed_s / 60:.0f} min. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, fp32.",
        "",
        f"Every run: {settings.tokens:,} training tokens ({first['max_steps']} steps of "
        f"{first['batch_size']}x{first['seq_len']}), d_model {first['model']['d_model']}, "
        f"{first['model']['num_layers']} layers (MoE in blocks 2 and 4), vocab "
        f"{first['model']['vocab_size']} BPE, AdamW lr {first['lr']} with warmup and cosine. "
        f"Seeds 0..{settings.seeds - 1}. Validation: {settings.eval_batches} batches of "
        f"{first['batch_size']}x{first['seq_len']} windows spread over the held-out works and "
        "books "
        f"({len(data.val):,} tokens in the split; see `docs/data.md`). MoE layers are dropless at "
        "evaluation; capacity (γ from the preset) applies in training only. 'MoE MFLOP/token' "
        "counts the forward FLOPs of the FFNs at MoE positions actually computed (kept pairs plus "
        "routers; the dense FFNs of those blocks for the dense model). The 'capacity at eval' "
        "columns evaluate with the training capacity applied, as the XMoE reference code does "
        "(batch-dependent routing, padded worst case bounded by γ). Training tokens/s are the "
        "wall-clock rates of this run's steps, on a machine shared with other work; `make bench` "
        "is where speed is measured.",
        "",
        "| preset | params | val perplexity | MoE MFLOP/token (eval) | experts/token (eval) "
        "| val perplexity, capacity at eval | MoE MFLOP/token, capacity at eval "
        "| experts/token (train, after capacity) | train drop rate | train tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['parameters'][0] / 1e6:.2f}M | {_fmt(row['perplexity'])} "
            f"| {_fmt(row['moe_mflops'], 3)} | {_experts(name, row['experts_per_token'])} "
            f"| {_fmt(row['perplexity_capacity'])} | {_fmt(row['moe_mflops_capacity'], 3)} "
            f"| {_experts(name, row['train_experts_per_token'])} "
            f"| {_experts(name, row['train_drop_fraction'], 3)} "
            f"| {_fmt(row['tokens_per_second'], 0)} |"
        )
    lines += ["", "## Does the paper's ordering hold here?", ""]
    lines += [f"- {line}" for line in ordering_verdict(table)]
    lines += ["", "How peaked the routers became:", ""]
    lines += [f"- {line}" for line in router_reading(records)]
    lines += [
        "",
        "## Perplexity against MoE FLOPs (t swept at evaluation for the XMoE models)",
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
    plot_ppl_vs_flops(records, table, settings.docs / "lm_ppl_vs_flops.png")
    if adaptivity is not None:
        tokenizer = data.tokenizer
        kinds = experts_by_kind(adaptivity, lambda i: tokenizer.decode([i]))
        freq = experts_by_frequency(adaptivity, data.train, data.vocab_size)
        plot_adaptivity(
            adaptivity, kinds, freq, adaptivity_name, settings.docs / "lm_adaptivity.png"
        )
        lines += [
            "",
            f"## Adaptivity: {adaptivity_name} at t=0.9 on validation text",
            "",
            "![adaptivity](lm_adaptivity.png)",
            "",
            "| token kind | experts/token | tokens |",
            "|---|---|---|",
            *[f"| {kind} | {mean:.2f} | {count:,} |" for kind, (mean, count) in kinds.items()],
            "",
            "| training-frequency rank | experts/token | tokens |",
            "|---|---|---|",
            *[f"| {label} | {mean:.2f} | {count:,} |" for label, mean, count in freq],
        ]
    path = settings.docs / "lm.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def reproduce(settings: ReproduceSettings) -> Path:
    """Train and evaluate every (preset, seed), then write the report; returns lm.md's path."""
    started = time.perf_counter()
    data = load_token_data(preset("dense"), progress=settings.progress)
    records = []
    for name in settings.presets:
        for seed in range(settings.seeds):
            records.append(run_one(name, seed, settings, data))
            print(
                f"{name} seed {seed}: val ppl {records[-1]['eval']['perplexity']:.2f}",
                file=sys.stderr,
            )
    adaptive = [n for n in settings.presets if n.startswith("xmoe")]
    adaptivity = None
    if adaptive:
        model, config, _ = load_model(settings.out / adaptive[-1] / "seed0")
        adaptivity = measure_adaptivity(
            model, data.val, config.batch_size, config.seq_len, settings.eval_batches
        )
    name = f"{adaptive[-1]} (seed 0)" if adaptive else ""
    return write_report(records, settings, data, adaptivity, name, time.perf_counter() - started)
