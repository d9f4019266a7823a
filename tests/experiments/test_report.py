"""`xmoe reproduce`'s report (experiments/report.py) from synthetic run records: the summary
over seeds, the target verdicts and the markdown tables, with no training."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from xmoe.experiments import plots, reproduce
from xmoe.experiments.reproduce import (
    SWEEP_THRESHOLDS,
    ReproduceSettings,
    summarize,
    target_lines,
    write_report,
)

ADAPTIVITY = {
    "p10": 1.0,
    "p50": 2.0,
    "p90": 5.0,
    "by_frequency": [["1-10", 3.0, 100], ["11-100", 2.0, 50]],
    "expert_load": [[0.5, 0.5]],
    "by_kind": {"newline": [1.5, 10], "word start": [3.0, 20]},
}


def _record(preset: str, seed: int, ppl: float, mflops: float, experts: float) -> dict:
    """One run's results.json: dense has no adaptivity, top-2 no sweep, XMoE both. XMoE's
    t-sweep: perplexity 25 - 10t at t MFLOP/token and 4t experts/token."""
    sweep = [
        {
            "threshold": t,
            "perplexity": 25 - 10 * t,
            "moe_flops_per_token": t * 1e6,
            "experts_per_token": 4 * t,
        }
        for t in (SWEEP_THRESHOLDS if preset.startswith("xmoe") else ())
    ]
    return {
        "preset": preset,
        "seed": seed,
        "train_config": {
            "max_steps": 10,
            "batch_size": 4,
            "seq_len": 16,
            "lr": 0.001,
            "model": {"d_model": 32, "num_layers": 4, "vocab_size": 512},
        },
        "parameters": 1_500_000,
        "eval": {
            "perplexity": ppl,
            "moe_flops_per_token": mflops * 1e6,
            "experts_per_token": experts,
        },
        "eval_capacity": {"perplexity": ppl + 1},
        "sweep": sweep,
        "adaptivity": None if preset == "dense" else ADAPTIVITY,
        "device": "cpu",
        "wall_seconds": 60.0,
        "train_drop_fraction": 0.01,
        "train_tokens_per_second": 1000.0,
        "train_curve": [[1, 3.0], [2, 2.5]],
        "train_loss": 3.0,
    }


RECORDS = [
    _record("dense", 0, 30.0, 2.0, 0.0),
    _record("dense", 1, 30.0, 2.0, 0.0),
    _record("top2", 0, 20.0, 1.0, 2.0),
    _record("top2", 1, 22.0, 1.0, 2.0),
    _record("xmoe-32", 0, 20.0, 0.9, 3.6),
    _record("xmoe-32", 1, 20.0, 0.9, 3.6),
]


def test_summary_is_mean_and_sample_std_over_seeds():
    table = summarize(RECORDS)
    assert list(table) == ["dense", "top2", "xmoe-32"]
    assert table["top2"]["perplexity"] == (21.0, pytest.approx(math.sqrt(2)))
    assert table["top2"]["seeds"] == (2.0, 0.0)
    assert "p10" not in table["dense"] and "headline_perplexity" not in table["top2"]
    assert table["xmoe-32"]["headline_perplexity"] == (20.0, 0.0)
    assert table["xmoe-32"]["headline_mflops"] == (0.5, 0.0)


def test_target_lines_give_numbers_and_verdicts():
    lines = target_lines(summarize(RECORDS), RECORDS)
    assert lines == [
        "xmoe-32 at t=0.5: perplexity 20.00 vs top-2 21.00 (+4.8%) at 0.50x top-2's MoE FLOPs; "
        "headline (≤ top-2 at ≤ 0.5x) **met**; moonshot (3% better at ≤ 0.4x) missed.",
        "xmoe-32 at t=0.9: 20.00 at 0.90x top-2's FLOPs (≤ top-2 at ≤ 1x: met).",
        "xmoe-32: experts per token p10 1.0, p90 5.0 (spread 4.0; target ≥ 3: met).",
        "xmoe-32: t-sweep curve below top-2's and Switch's points: top2 yes.",
    ]
    no_top2 = [r for r in RECORDS if r["preset"] != "top2"]
    assert target_lines(summarize(no_top2), no_top2) == [
        "no top-2 row: the targets compare against top-2"
    ]


def test_report_tables_from_records(tmp_path, monkeypatch):
    plotted = []
    monkeypatch.setattr(plots, "plot_ppl_vs_flops", lambda r, t, path: plotted.append(path))
    monkeypatch.setattr(plots, "plot_experts_over_training", lambda r, path: plotted.append(path))
    settings = ReproduceSettings(
        presets=("dense", "top2", "xmoe-32"), ablations=(), seeds=2, tokens=640, docs=tmp_path
    )
    data = SimpleNamespace(val=np.zeros(12_345, dtype=np.uint16))
    path = write_report(RECORDS, settings, data, elapsed_s=90.0)

    assert path == tmp_path / "lm.md"
    assert plotted == [tmp_path / "lm_ppl_vs_flops.png", tmp_path / "lm_experts_over_training.png"]
    text = path.read_text()
    lines = text.splitlines()
    assert "Every run: 640 training tokens (10 steps of 4x16), d_model 32, 4 layers" in text
    assert "(12,345 tokens in the split" in text
    targets = [line[2:] for line in lines if line.startswith("- ")]
    assert targets == target_lines(summarize(RECORDS), RECORDS)
    for row in (
        "| dense | 2 | 1.50M | 30.00 ± 0.00 | 2.000 ± 0.000 | – | – | – | 31.00 ± 0.00 | – "
        "| 1000 ± 0 |",
        "| top2 | 2 | 1.50M | 21.00 ± 1.41 | 1.000 ± 0.000 | 2.00 ± 0.00 | 1.0 ± 0.0 "
        "| 5.0 ± 0.0 | 22.00 ± 1.41 | 0.010 ± 0.000 | 1000 ± 0 |",
        "| xmoe-32 | 20.00 ± 0.00 | 0.500 ± 0.000 | 0.50 | 2.00 ± 0.00 |",  # headline, t=0.5
        "| xmoe-32 | 0.3 | 22.00 ± 0.00 | 0.300 ± 0.000 | 1.20 ± 0.00 |",  # the sweep
        "| preset | newline | word start |",
        "| xmoe-32 | 1.50 | 3.00 |",
        "| preset | rank 1-10 | rank 11-100 |",
        "| xmoe-32 | 3.00 | 2.00 |",
    ):
        assert row in lines
    sweep = [line for line in lines if line.startswith("| xmoe-32 | 0.")]
    assert [line.split(" | ")[1] for line in sweep] == [str(t) for t in SWEEP_THRESHOLDS]
    assert not any(line.startswith(("| dense | 0.", "| top2 | 0.")) for line in lines)
    assert reproduce.HEADLINE_THRESHOLD == 0.5  # the headline rows above are read at t=0.5
