"""Figures of `xmoe reproduce` (matplotlib, the ``plot`` extra; Agg backend, files only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_flops(records: list[dict], table: dict, path: Path) -> None:
    """Validation perplexity against MoE FLOPs per token: one point per preset at its trained
    threshold (mean ± std over seeds), and the threshold models' evaluation-time t sweeps
    (dropless) as dashed lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (name, row) in enumerate(table.items()):
        (ppl, ppl_sd), (flops, flops_sd) = row["perplexity"], row["moe_mflops"]
        color = plt.cm.tab20(index % 20)
        ax.errorbar(
            flops, ppl, xerr=flops_sd, yerr=ppl_sd, fmt="o", capsize=3, label=name, color=color
        )
        runs = [r for r in records if r["preset"] == name and r["sweep"]]
        if runs:
            xs = np.mean([[p["moe_flops_per_token"] / 1e6 for p in r["sweep"]] for r in runs], 0)
            ys = np.mean([[p["perplexity"] for p in r["sweep"]] for r in runs], 0)
            ax.plot(xs, ys, "--", color=color, alpha=0.6)
            for point, x, y in zip(runs[0]["sweep"], xs, ys, strict=True):
                ax.annotate(f"t={point['threshold']}", (x, y), fontsize=6, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("MoE-position FFN MFLOP per token (forward, computed)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Perplexity vs MoE compute (dashed: t swept at evaluation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_experts_over_training(records: list[dict], path: Path) -> None:
    """Experts each token wanted (mean over tokens and MoE layers, before capacity) against the
    training step, one line per adaptive preset (seed 0)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for index, record in enumerate(records):
        if record["seed"] != 0 or not record["train_curve"] or not record["sweep"]:
            continue
        steps, experts = zip(*record["train_curve"], strict=True)
        ax.plot(steps, experts, label=record["preset"], color=plt.cm.tab20(index % 20))
    ax.axhline(2.0, color="k", lw=0.8, ls=":", label="top-2")
    ax.set_xlabel("training step")
    ax.set_ylabel("experts wanted per token (mean)")
    ax.set_yscale("log")
    ax.set_title("How sparse the routers become during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
