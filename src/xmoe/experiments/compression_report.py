"""The report of `xmoe compress-grid`: ``compression.md`` (the issue's targets with verdicts,
one table per model, the skipped rows) and ``compression.png`` (perplexity against measured
expert bytes, one line per method per model), from the grid's cell records; and
:func:`compression_table`, the command's work: the grid, then the report.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from xmoe.experiments.compression_grid import REFERENCE, CompressionGridSettings, run_grid
from xmoe.experiments.compression_methods import METHODS
from xmoe.storage import atomic_write_text

FINE, COARSE = "xmoe-64", "top2"
"""The fine-grained model of the moonshot and the coarse one it is compared with."""

MOONSHOT_BYTES, MOONSHOT_LOSS = 0.25, 0.03
"""The moonshot: the fine-grained model at 25% of its expert bytes within 3% of its perplexity."""

EQUAL_BYTES = 1.02
"""A method is compared with its baseline when it holds at most 2% more expert bytes."""

Record = dict[str, Any]


def _ppl(record: Record) -> float:
    return record["eval"]["all"]["perplexity"]


def reference(records: list[Record], model: str) -> Record | None:
    """The uncompressed cell of ``model``."""
    return next((r for r in records if r["model"] == model and r["method"] == REFERENCE), None)


def _at(records: list[Record], model: str, method: str, fraction: float) -> Record | None:
    return next(
        (
            r
            for r in records
            if r["model"] == model and r["method"] == method and fraction in r["fractions"]
        ),
        None,
    )


def _share(record: Record, ref: Record) -> float:
    return record["expert_bytes"] / ref["expert_bytes"]


def target_domain(record: Record) -> str | None:
    """The domain a cell's passes compress for (UNCURL's ``reduce``), or None."""
    domains = {options["domain"] for _, options in record["passes"] if "domain" in options}
    return domains.pop() if len(domains) == 1 else None


def _ppl_on(record: Record, domain: str | None) -> float:
    return _ppl(record) if domain is None else record["eval"][domain]["perplexity"]


def baseline_lines(records: list[Record], fractions: tuple[float, ...]) -> list[str]:
    """Per model, method and naive baseline both measured: at how many fractions the method's
    perplexity is below the baseline's at equal bytes (met when at all of them). A method that
    compresses for one domain (``reduce``) is compared on that domain's perplexity, the claim
    it makes (the line says so)."""
    lines = []
    models = dict.fromkeys(r["model"] for r in records)
    for model in models:
        for baseline in METHODS:
            for method in baseline.baseline_of:
                pairs = [
                    (f, _at(records, model, method, f), _at(records, model, baseline.name, f))
                    for f in fractions
                ]
                pairs = [(f, m, b) for f, m, b in pairs if m and b]
                if not pairs:
                    continue
                parts, wins = [], 0
                domain = target_domain(pairs[0][1])
                for fraction, ours, theirs in pairs:
                    equal = ours["expert_bytes"] <= EQUAL_BYTES * theirs["expert_bytes"]
                    mine, other = _ppl_on(ours, domain), _ppl_on(theirs, domain)
                    wins += equal and mine < other
                    more = "" if equal else ", more bytes"
                    parts.append(f"{fraction:.0%}: {mine:.2f} vs {other:.2f}{more}")
                verdict = "met" if wins == len(pairs) else "missed"
                on = "" if domain is None else f" on {domain} (the domain it reduces for)"
                lines.append(
                    f"{model}: {method} beats {baseline.name}{on} at equal bytes at {wins} of "
                    f"{len(pairs)} targets ({'; '.join(parts)}): **{verdict}**."
                )
    return lines


def moonshot_line(records: list[Record]) -> str:
    """Whether a cell of the fine-grained model at <= 25% of its expert bytes is within 3% of
    its uncompressed perplexity."""
    ref = reference(records, FINE)
    if ref is None:
        return f"moonshot: no {FINE} model in this run."
    within = [
        r
        for r in records
        if r["model"] == FINE and r is not ref and _share(r, ref) <= MOONSHOT_BYTES
    ]
    if not within:
        return f"moonshot: no {FINE} cell at ≤ {MOONSHOT_BYTES:.0%} of its expert bytes: missed."
    best = min(within, key=_ppl)
    loss = _ppl(best) / _ppl(ref) - 1
    verdict = "met" if loss <= MOONSHOT_LOSS else "missed"
    return (
        f"moonshot ({FINE} at ≤ {MOONSHOT_BYTES:.0%} of its expert bytes within "
        f"{MOONSHOT_LOSS:.0%} of its perplexity): best {best['method']} at "
        f"{_share(best, ref):.1%} of the bytes, perplexity {_ppl(best):.2f} vs "
        f"{_ppl(ref):.2f} ({loss:+.1%}): **{verdict}**."
    )


def fine_grained_line(records: list[Record], fractions: tuple[float, ...]) -> str:
    """Whether the fine-grained model loses less perplexity (relative to its own uncompressed
    perplexity) than the coarse one, method by method at equal shares of their expert bytes."""
    fine, coarse = reference(records, FINE), reference(records, COARSE)
    if fine is None or coarse is None:
        return f"fine-grained vs coarse: needs both {FINE} and {COARSE}."
    pairs = []
    for method in dict.fromkeys(r["method"] for r in records if r["method"] != REFERENCE):
        for fraction in fractions:
            ours = _at(records, FINE, method, fraction)
            theirs = _at(records, COARSE, method, fraction)
            if ours and theirs:
                pairs.append(_ppl(ours) / _ppl(fine) < _ppl(theirs) / _ppl(coarse))
    if not pairs:
        return "fine-grained vs coarse: no method measured on both models."
    answer = "yes" if sum(pairs) > len(pairs) / 2 else "no"
    return (
        f"does {FINE} compress better than {COARSE} at equal bytes? {FINE} loses less "
        f"perplexity (relative to its own) in {sum(pairs)} of {len(pairs)} (method, target) "
        f"pairs: **{answer}**."
    )


def target_lines(records: list[Record], fractions: tuple[float, ...]) -> list[str]:
    """The issue's targets, each with its numbers and a verdict."""
    return [
        *baseline_lines(records, fractions),
        moonshot_line(records),
        fine_grained_line(records, fractions),
    ]


def _passes(record: Record) -> str:
    """``merge:groups=8 → quantize:bits=4`` (options in name order, as a cell's JSON has them)."""
    texts = []
    for name, options in record["passes"]:
        values = ",".join(f"{key}={value}" for key, value in sorted(options.items()))
        texts.append(f"{name}:{values}" if values else name)
    return " → ".join(texts) or "–"


def model_table(records: list[Record], model: str) -> list[str]:
    """The markdown table of ``model``'s cells, reference first."""
    ref = reference(records, model)
    cells = [r for r in records if r["model"] == model]
    domains = [d for d in ref["eval"] if d != "all"]
    head = [
        "method", "targets", "passes", *(f"ppl {d}" for d in domains), "ppl (Δ)",
        "expert bytes", "resident MB", "disk MB", "MoE MFLOP/token",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in cells:
        targets = ", ".join(f"{f:.0%}" for f in r["fractions"]) or "–"
        ppl = _ppl(r)
        row = [
            r["method"], targets, _passes(r),
            *(f"{r['eval'][d]['perplexity']:.2f}" for d in domains),
            f"{ppl:.2f} ({ppl / _ppl(ref) - 1:+.1%})",
            f"{r['expert_bytes']:,} ({_share(r, ref):.1%})",
            f"{r['resident_bytes'] / 1e6:.2f}", f"{r['disk_bytes'] / 1e6:.2f}",
            f"{r['eval']['all']['moe_flops_per_token'] / 1e6:.3f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return lines


def plot_compression(records: list[Record], path: Path) -> None:
    """Perplexity against measured expert bytes (share of the uncompressed model's): one line
    per method per model (color: method; line and marker: model), the uncompressed perplexity
    dotted."""
    from xmoe.experiments.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != REFERENCE))
    styles = ("o-", "s--", "^:", "d-.")
    for index, model in enumerate(dict.fromkeys(r["model"] for r in records)):
        ref = reference(records, model)
        ax.axhline(_ppl(ref), color="k", lw=0.8, ls=":", alpha=0.6)
        for m, method in enumerate(methods):
            points = sorted(
                (100 * _share(r, ref), _ppl(r))
                for r in records
                if r["model"] == model and r["method"] == method
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, styles[index % len(styles)], color=plt.cm.tab10(m % 10),
                        label=f"{model} {method}", markersize=4)  # fmt: skip
    ax.set_xlabel("expert bytes, measured (% of the uncompressed model's)")
    ax.set_ylabel("validation perplexity (both domains)")
    ax.set_yscale("log")
    ax.set_title("Compressed experts: perplexity vs bytes (dotted: uncompressed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_compression_report(
    records: list[Record],
    notes: list[str],
    configs: dict[str, dict],
    settings: CompressionGridSettings,
    elapsed_s: float,
) -> Path:
    """Write ``compression.md`` and ``compression.png`` into ``settings.docs``; returns the
    markdown path."""
    settings.docs.mkdir(parents=True, exist_ok=True)
    first = next(iter(configs.values()))
    compute_s = sum(r["seconds"] for r in records)
    machine = f"{platform.machine()}, torch {torch.__version__}, fp32"
    models = ", ".join(
        f"{name} ({c['max_steps'] * c['batch_size'] * c['seq_len']:,} training tokens, seed "
        f"{c['seed']})"
        for name, c in configs.items()
    )
    lines = [
        "# Compressed experts: merge, reduce, residual, quantize and prune against naive baselines",
        "",
        f"Made by `{settings.command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"Machine: {machine}. Wall time of this invocation {elapsed_s / 60:.1f} min; the cells' "
        f"own time adds up to {compute_s / 60:.1f} min (cells measured by earlier, interrupted "
        "invocations count with the time they took).",
        "",
        f"Models: {models}. Every cell compresses the trained model afresh with one pass "
        f"(`xmoe.registry.PASSES`), calibrated on about {settings.calibration_tokens:,} "
        f"training tokens in equal shares from each training domain (`reduce` on its "
        f"domain's share), and is evaluated on {settings.eval_batches} validation batches of "
        f"{first['batch_size']}x{first['seq_len']} windows per domain. Targets are shares of "
        "the model's expert bytes; 'expert bytes' is what the compressed experts hold, "
        "measured (`xmoe.compression.model_size`: packed codes, scales, factors, maps), "
        "'resident' all of the model's tensors, 'disk' the saved directory. 'MoE MFLOP/token' "
        "counts the forward FLOPs of the routed experts actually computed plus the routers, "
        "from the routing statistics of the evaluation. 'ppl' is over both domains "
        "(token-weighted); Δ against the uncompressed model. Method rows and their options are "
        "in `docs/compression.md`.",
        "",
        "## Targets",
        "",
        *[f"- {line}" for line in target_lines(records, settings.fractions)],
        "",
    ]
    for model in configs:
        lines += [f"## {model}", "", *model_table(records, model), ""]
    lines += [
        "## Perplexity against measured bytes",
        "",
        "![perplexity vs expert bytes](compression.png)",
        "",
    ]
    if notes:
        lines += ["## Skipped", "", *[f"- {note}" for note in notes], ""]
    plot_compression(records, settings.docs / "compression.png")
    path = settings.docs / "compression.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def compression_table(settings: CompressionGridSettings) -> Path:
    """Measure the grid (resuming) and write ``compression.md``; returns its path."""
    started = time.perf_counter()
    records, notes, configs = run_grid(settings)
    return write_compression_report(
        records, notes, configs, settings, time.perf_counter() - started
    )
