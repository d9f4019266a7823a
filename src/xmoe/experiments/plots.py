"""Figures of `xmoe reproduce` (matplotlib, the ``plot`` extra; Agg backend, files only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xmoe.experiments.analysis import Adaptivity


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_flops(records: list[dict], table: dict, path: Path) -> None:
    """Validation perplexity against MoE FLOPs per token: one point per preset (mean ± std over
    seeds; hollow: with the training capacity applied at evaluation), and the XMoE models'
    evaluation-time t sweeps (dropless) as dashed lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, row in table.items():
        (ppl, ppl_sd), (flops, flops_sd) = row["perplexity"], row["moe_mflops"]
        bar = ax.errorbar(flops, ppl, xerr=flops_sd, yerr=ppl_sd, fmt="o", capsize=3, label=name)
        color = bar.lines[0].get_color()
        if name != "dense":
            (cap_ppl, _), (cap_flops, _) = row["perplexity_capacity"], row["moe_mflops_capacity"]
            ax.plot(cap_flops, cap_ppl, "o", mfc="none", color=color, ms=9)
        runs = [r for r in records if r["preset"] == name and r["sweep"]]
        if runs:
            xs = np.mean([[p["moe_flops_per_token"] / 1e6 for p in r["sweep"]] for r in runs], 0)
            ys = np.mean([[p["perplexity"] for p in r["sweep"]] for r in runs], 0)
            ax.plot(xs, ys, "--", color=color, alpha=0.6)
            for point, x, y in zip(runs[0]["sweep"], xs, ys, strict=True):
                ax.annotate(f"t={point['threshold']}", (x, y), fontsize=6, alpha=0.7)
    ax.set_xlabel("MoE-position FFN MFLOP per token (forward, computed)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Perplexity vs MoE compute (hollow: capacity at eval; dashed: t sweep)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_adaptivity(
    adaptivity: Adaptivity,
    kinds: dict[str, tuple[float, int]],
    frequency: list[tuple[str, float, int]],
    name: str,
    path: Path,
) -> None:
    """Three panels: per-expert load per MoE layer, experts per token by token kind, and by
    the token's training-frequency rank."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    load = adaptivity.expert_load
    width = 0.8 / load.shape[0]
    for layer in range(load.shape[0]):
        axes[0].bar(
            np.arange(load.shape[1]) + layer * width, load[layer], width, label=f"MoE layer {layer}"
        )
    axes[0].axhline(1.0 / load.shape[1], color="k", lw=0.8, ls=":", label="uniform")
    axes[0].set_xlabel("expert")
    axes[0].set_ylabel("share of computed pairs")
    axes[0].set_title(f"{name}: per-expert load")
    axes[0].legend(fontsize=7)
    labels = list(kinds)
    axes[1].bar(labels, [kinds[k][0] for k in labels], color="tab:orange")
    axes[1].set_ylabel("experts per token")
    axes[1].set_title("by token kind")
    axes[1].tick_params(axis="x", rotation=20)
    axes[2].bar([f[0] for f in frequency], [f[1] for f in frequency], color="tab:green")
    axes[2].set_xlabel("training-frequency rank of the token")
    axes[2].set_ylabel("experts per token")
    axes[2].set_title("by token frequency")
    axes[2].tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
