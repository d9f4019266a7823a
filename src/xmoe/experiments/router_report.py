"""The report of `xmoe reproduce --suite routers`: ``routers.md``, one table of every router at
its paper's default, the threshold rows' t sweeps, which routers dominate at which FLOP budget,
the issue's targets with verdicts, and the perplexity-vs-FLOPs plot.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from xmoe.data import TokenData
from xmoe.experiments.grid import ReproduceSettings
from xmoe.experiments.report import HEADLINE_THRESHOLD, _fmt, _mean_std, _opt, summarize
from xmoe.experiments.router_suite import COMBINATIONS, available_rows
from xmoe.storage import atomic_write_text

TOLERANCE = 0.03
"""Every router at its paper's default: within this fraction of top-2's perplexity."""
MOONSHOT_GAIN = 0.01
"""A combination beats xmoe-32 at t=0.5 by this fraction of perplexity at <= its FLOPs."""


def load_imbalance(record: dict) -> float:
    """The busiest routed expert's share of kept pairs over the mean share (1 = balanced),
    averaged over MoE layers."""
    load_LE = np.asarray(record["adaptivity"]["expert_load"], dtype=np.float64)
    return float((load_LE.max(axis=1) * load_LE.shape[1]).mean())


def router_table(records: list[dict]) -> dict[str, dict]:
    """:func:`~xmoe.experiments.report.summarize` plus each row's router and load imbalance."""
    table = summarize(records)
    for name, row in table.items():
        runs = [r for r in records if r["preset"] == name]
        row["router"] = runs[0]["train_config"]["model"]["moe"]["router"]
        row["load_imbalance"] = _mean_std([load_imbalance(r) for r in runs])
    return table


def points(records: list[dict], table: dict) -> list[tuple[float, float, str]]:
    """(MoE MFLOP/token, perplexity, label) of every row at its trained setting and every
    point of the threshold rows' t sweeps, means over seeds."""
    result = [(row["moe_mflops"][0], row["perplexity"][0], name) for name, row in table.items()]
    for name in table:
        runs = [r for r in records if r["preset"] == name and r["sweep"]]
        for i, point in enumerate(runs[0]["sweep"] if runs else ()):
            mflops = np.mean([r["sweep"][i]["moe_flops_per_token"] / 1e6 for r in runs])
            ppl = np.mean([r["sweep"][i]["perplexity"] for r in runs])
            result.append((float(mflops), float(ppl), f"{name} t={point['threshold']}"))
    return result


def frontier(all_points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats at no more FLOPs (the Pareto front), by FLOPs."""
    front, best = [], float("inf")
    for mflops, ppl, label in sorted(all_points, key=lambda p: (p[0], p[1])):
        if ppl < best:
            front.append((mflops, ppl, label))
            best = ppl
    return front


def finding_lines(records: list[dict], table: dict) -> list[str]:
    """Which routers dominate at which FLOP budget, which lose (and to what), and the targets."""
    if "top2" not in table:
        return ["no top-2 row: the comparison is against top-2"]
    top2_ppl, top2_flops = table["top2"]["perplexity"][0], table["top2"]["moe_mflops"][0]
    all_points = points(records, table)
    front = frontier(all_points)
    lines = ["Dominating (no point has lower perplexity at no more MoE FLOPs):"]
    lines += [
        f"  - at {mflops:.3f} MFLOP/token ({mflops / top2_flops:.2f}x top-2): {label}, "
        f"perplexity {ppl:.2f}"
        for mflops, ppl, label in front
    ]
    for name, row in table.items():
        ppl, mflops = row["perplexity"][0], row["moe_mflops"][0]
        gap = ppl / top2_ppl - 1
        verdict = "within 3%" if gap <= TOLERANCE else "**more than 3% worse**"
        line = (
            f"{name} ({row['router']}): perplexity {ppl:.2f} ({gap:+.1%} vs top-2, {verdict}) "
            f"at {mflops / top2_flops:.2f}x top-2's MoE FLOPs"
        )
        beaters = [p for p in all_points if p[0] <= mflops and p[1] < ppl and p[2] != name]
        if beaters:
            best = min(beaters, key=lambda p: p[1])
            line += f"; dominated by {best[2]} ({best[1]:.2f} at {best[0] / top2_flops:.2f}x)"
        if gap > TOLERANCE:  # the numbers a reason would come from, beside top-2's
            line += "; " + _against_top2(row, table["top2"])
        lines.append(line + ".")
    lines += moonshot_lines(records, table, all_points)
    return lines


def _against_top2(row: dict, top2: dict) -> str:
    """A losing row's training drop rate, load imbalance and experts per token beside top-2's."""
    parts = [
        ("train drop rate", "train_drop_fraction", 3),
        ("load max/mean", "load_imbalance", 2),
        ("experts/token", "experts_per_token", 2),
    ]
    return ", ".join(
        f"{label} {row[key][0]:.{digits}f} (top-2 {top2[key][0]:.{digits}f})"
        for label, key, digits in parts
    )


def moonshot_lines(records: list[dict], table: dict, all_points: list) -> list[str]:
    """The moonshot: a combination beats xmoe-32 at t=0.5 by >= 1% perplexity at <= its FLOPs
    (means over >= 2 seeds)."""
    reference = table.get("xmoe-32", {})
    if "headline_perplexity" not in reference:
        return ["moonshot: no xmoe-32 row with a t=0.5 point to compare with"]
    ref_ppl, ref_flops = reference["headline_perplexity"][0], reference["headline_mflops"][0]
    lines = []
    for name in (n for n in COMBINATIONS if n in table):
        mine = [p for p in all_points if p[2].split(" t=")[0] == name and p[0] <= ref_flops]
        if not mine:
            lines.append(f"moonshot, {name}: no point at ≤ xmoe-32's t=0.5 FLOPs; missed.")
            continue
        mflops, ppl, label = min(mine, key=lambda p: p[1])
        gain, seeds = 1 - ppl / ref_ppl, table[name]["seeds"][0]
        met = gain >= MOONSHOT_GAIN and seeds >= 2
        lines.append(
            f"moonshot, {label}: {ppl:.2f} vs xmoe-32 at t={HEADLINE_THRESHOLD} {ref_ppl:.2f} "
            f"({gain:+.1%}) at {mflops:.3f} ≤ {ref_flops:.3f} MFLOP/token, {seeds:.0f} seed(s): "
            f"**{'met' if met else 'missed'}**."
        )
    return lines


def _speed(speeds: dict[str, float], name: str) -> str:
    if name not in speeds:
        return "n/a"
    ratio = f" ({speeds[name] / speeds['top2']:.2f}x)" if "top2" in speeds else ""
    return f"{speeds[name]:.0f}{ratio}"


def write_routers_report(
    records: list[dict],
    settings: ReproduceSettings,
    data: TokenData,
    elapsed_s: float,
    speeds: dict[str, float],
) -> Path:
    """Write ``routers.md`` and its plot into ``settings.docs``; returns the markdown path.
    ``speeds`` is each row's training tokens/s timed side by side
    (:func:`~xmoe.experiments.train_speed.training_speeds`)."""
    from xmoe.experiments.plots import plot_ppl_vs_flops

    settings.docs.mkdir(parents=True, exist_ok=True)
    table = router_table(records)
    first = records[0]["train_config"]
    skipped = available_rows(settings.base_preset)[1]
    lines = [
        "# Every router on one table: perplexity against MoE FLOPs",
        "",
        f"Made by `{settings.command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"devices {sorted({r['device'] for r in records})}, {settings.jobs} runs at a time, "
        f"{elapsed_s / 60:.1f} min of wall time in this invocation (runs finished earlier "
        "are read back, not retrained; an interrupted run resumes from its checkpoint).",
        "",
        f"Every run: {settings.tokens:,} training tokens ({first['max_steps']} steps of "
        f"{first['batch_size']}x{first['seq_len']}), the model, corpus, trainer and validation "
        f"of `docs/results/lm.md` (d_model {first['model']['d_model']}, "
        f"{first['model']['num_layers']} layers, {len(data.val):,} validation tokens, "
        f"{settings.eval_batches} batches), seeds 0..{settings.seeds - 1}. Equal total expert "
        "weights in every row (`xmoe/experiments/router_suite.py`); each router at its paper's "
        "default (`docs/routing.md`); top-2 and xmoe-32 are rerun here as the reference rows. "
        "Evaluation is dropless; 'MoE MFLOP' counts what was computed (kept pairs at their "
        "experts' costs, shared experts, routers); experts/token counts routed experts (a row "
        "with K_s shared experts computes K_s more). Load: the busiest expert's share over the "
        "mean (1 = balanced). Training tokens/s: every row's trained seed-0 model taking the same "
        "optimizer steps on the same batches, rows interleaved in one process, median of rounds "
        "(`xmoe/experiments/train_speed.py`; a run's own log says how busy the machine was).",
        "",
        "## Findings and targets",
        "",
        *[
            f"- {line}" if not line.startswith(" ") else line
            for line in finding_lines(records, table)
        ],
        *[f"- {note}" for note in skipped],
        "",
        "## All rows (each at its trained setting)",
        "",
        "| row | router | seeds | params | val perplexity | MoE MFLOP/token | experts/token "
        "| p10 | p90 | train drop rate | load (max/mean) | train tokens/s (vs top-2) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| {name} | {row['router']} | {row['seeds'][0]:.0f} "
            f"| {row['parameters'][0] / 1e6:.2f}M | {_fmt(row['perplexity'])} "
            f"| {_fmt(row['moe_mflops'], 3)} | {_fmt(row['experts_per_token'])} "
            f"| {_opt(row, 'p10', 1)} | {_opt(row, 'p90', 1)} "
            f"| {_fmt(row['train_drop_fraction'], 3)} | {_fmt(row['load_imbalance'])} "
            f"| {_speed(speeds, name)} |"
        )
    lines += [
        "",
        "## Perplexity against MoE FLOPs (threshold rows: t swept at evaluation)",
        "",
        "![perplexity vs FLOPs](routers_ppl_vs_flops.png)",
        "",
        "| point | val perplexity | MoE MFLOP/token |",
        "|---|---|---|",
        *[
            f"| {label} | {ppl:.2f} | {mflops:.3f} |"
            for mflops, ppl, label in points(records, table)
        ],
    ]
    plot_ppl_vs_flops(records, table, settings.docs / "routers_ppl_vs_flops.png")
    path = settings.docs / "routers.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
