"""The figure of ``xmoe sparsify-grid``: ``sparsify.png``, perplexity against FFN FLOPs.

Two rows, one column per held-out domain. The top row holds every cell, on a log scale: the
expert grid spans four orders of magnitude. The bottom row zooms in on the region the issue's
targets live in, which is the per-neuron (H=1) cells near dense. It uses a linear scale and
draws the quality targets. Recovered neurons-mode cells are single stars, labelled with
their token budgets in the zoom: they share F, so a line through them would draw nothing.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from xmoe.experiments.sparsify_settings import DOMAIN_NAMES, METHOD_LABELS
from xmoe.storage import atomic_write

ZOOM_FLOPS = (33.0, 80.0)
"""The zoomed row's FFN FLOPs range (% of dense): the neurons mode's F from 35% to 75%."""
ZOOM_RATIO = (0.97, 1.5)
"""The zoomed row's perplexity range (multiple of dense): within 50% of dense."""

Point = tuple[float, dict[str, float]]


def _token_budget(tokens: int) -> str:
    return f"{tokens / 1e6:g}M"


def plot_series(
    cells: list[dict[str, Any]], dense: dict[str, Any]
) -> tuple[dict[str, list[Point]], list[tuple[str, Point]]]:
    """The figure's data: lines as {label: [(FFN FLOPs share, {domain: ppl / dense ppl})]}
    sorted by FLOPs, one per (partition, expert size, router), XMoE route or neurons-mode
    method; and the recovered neurons-mode cells as (token budget, point), in budget order."""
    series: dict[str, list[Point]] = {}
    recovered: list[tuple[int, str, Point]] = []
    for cell in cells:
        if cell["kind"] == "dense":
            continue
        point = (cell["ffn_flops_share"],
                 {d: cell["ppl"][d] / dense["ppl"][d] for d in DOMAIN_NAMES})  # fmt: skip
        if cell["kind"] == "neurons" and cell["router"] == "recovered":
            tokens = cell["recovery"]["tokens"]
            recovered.append((tokens, _token_budget(tokens), point))
            continue
        if cell["kind"] == "xmoe":
            label = f"XMoE route H={cell['expert_size']}"
        elif cell["kind"] == "neurons":
            label = f"neurons {METHOD_LABELS[cell['method']]}"
        else:
            label = f"{cell['partition']} H={cell['expert_size']} {cell['router']}"
        series.setdefault(label, []).append(point)
    lines = {label: sorted(points, key=lambda p: p[0]) for label, points in series.items()}
    return dict(sorted(lines.items())), [(name, p) for _, name, p in sorted(recovered)]


def _style(label: str) -> str:
    """Dotted: an oracle (a bound); solid: the per-neuron thresholds; dashed: recovered expert
    cells; dash-dot: trained routers and the XMoE route."""
    if label.endswith("oracle"):
        return ":"
    if label.startswith("neurons"):
        return "-"
    return "--" if label.endswith("recovered") else "-."


def write_plot(
    cells: list[dict[str, Any]], dense: dict[str, Any], path: Path, targets: tuple[float, ...]
) -> bool:
    """Draw :func:`plot_series` to ``path`` (PNG, written atomically), with the quality
    ``targets`` (perplexity over dense's) as lines in the zoomed row. False when matplotlib is
    missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lines, recovered = plot_series(cells, dense)
    colors = {label: plt.cm.tab20(index % 20) for index, label in enumerate(lines)}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex="row")
    for column, (domain, title) in enumerate(DOMAIN_NAMES.items()):
        for row, zoomed in enumerate((False, True)):
            axis = axes[row][column]
            for label, points in lines.items():
                if zoomed and not (label.startswith("neurons") or label.endswith("H=1 oracle")):
                    continue  # the zoom shows the per-neuron cells only
                axis.plot([p[0] * 100 for p in points], [p[1][domain] for p in points],
                          _style(label), color=colors[label], marker="o", markersize=3,
                          label=label if (row, column) == (0, 0) else None)  # fmt: skip
            for index, (name, (share, ratios)) in enumerate(recovered):
                first = (row, column, index) == (0, 0, 0)
                axis.plot(share * 100, ratios[domain], "*", color="black", markersize=9,
                          label="neurons, recovered" if first else None)  # fmt: skip
                if zoomed:  # budgets on alternate sides: they share F, and may share a ratio
                    side = 1 if index % 2 == 0 else -1
                    axis.annotate(f"{name} tokens", (share * 100, ratios[domain]), fontsize=7,
                                  xytext=(7 * side, 6 * (index // 2) - 3),
                                  textcoords="offset points",
                                  ha="left" if side > 0 else "right")  # fmt: skip
            axis.axhline(1.0, color="black", linewidth=0.8)
            axis.grid(alpha=0.3)
            axis.set_xlabel("FFN FLOPs per token (% of dense)")
            if zoomed:
                for limit in targets:
                    axis.axhline(limit, color="grey", linewidth=0.8, linestyle="--")
                    axis.annotate(f"+{(limit - 1) * 100:.0f}%", (ZOOM_FLOPS[0], limit),
                                  fontsize=7, color="grey", xytext=(2, 2),
                                  textcoords="offset points")  # fmt: skip
                axis.set_xlim(*ZOOM_FLOPS)
                axis.set_ylim(*ZOOM_RATIO)
                axis.set_title(f"{title}, per-neuron cells near dense (linear)")
            else:
                axis.set_yscale("log")
                axis.set_title(f"held-out {title} (dense ppl {dense['ppl'][domain]:.2f})")
        axes[0][column].set_ylabel("perplexity / dense perplexity")
        axes[1][column].set_ylabel("perplexity / dense perplexity")
    if lines:
        fig.legend(loc="center left", bbox_to_anchor=(0.79, 0.5), fontsize=7, frameon=False)
    fig.suptitle("SmolLM2-135M made sparse: quality against FFN compute")
    fig.tight_layout(rect=(0, 0, 0.79, 0.97))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return True
