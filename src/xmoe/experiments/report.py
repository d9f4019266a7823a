"""The report of `xmoe reproduce`: the summary over seeds of the runs' results records, the
issue's targets with verdicts, and ``lm.md`` with its plots.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

from xmoe.data import TokenData
from xmoe.experiments.grid import SWEEP_THRESHOLDS, ReproduceSettings
from xmoe.storage import atomic_write_text

HEADLINE_THRESHOLD = 0.5
"""The one evaluation threshold of the headline row, chosen before the runs (the scratch runs
of issue 12 pointed at it); every other t is in the sweep table."""


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
