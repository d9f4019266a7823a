"""The LM demo (`make demo`) on a stand-in corpus, and its seed table (xmoe.demos.seeds)."""

from __future__ import annotations

import json

import pytest

import xmoe.demos.lm as lm_demo
import xmoe.demos.seeds as seeds
from xmoe.data import synthetic_token_data
from xmoe.demos.lm import BASELINE, DEMO_VOCAB, XMOE, LMDemoSettings
from xmoe.training.evaluate import evaluate
from xmoe.training.trainer import load_model


def test_lm_demo_trains_both_models_and_reports_the_trade(monkeypatch, tmp_path, capsys):
    """Two steps of each preset on a synthetic stream of the demo's vocabulary: the table has
    top-2, XMoE at its trained threshold and at the threshold chosen for the FLOP budget (the
    largest of the grid within budget on training tokens), FLOP ratios measured against top-2,
    and the share of tokens by experts used sums to one."""
    data = synthetic_token_data(vocab_size=DEMO_VOCAB, num_tokens=60_000)
    monkeypatch.setattr(lm_demo, "load_token_data", lambda config: data)
    result = lm_demo.run_lm_demo(LMDemoSettings(steps=2, out=tmp_path, quiet=True))
    rows, chosen = result["rows"], result["threshold"]
    assert chosen < 0.9  # two steps in, tokens want many experts at t=0.9
    assert list(rows) == [BASELINE, f"{XMOE} t=0.9", f"{XMOE} t={chosen}"]
    assert rows[BASELINE]["flop_ratio"] == 1.0
    best = rows[f"{XMOE} t={chosen}"]
    assert best["moe_mflops"] < rows[f"{XMOE} t=0.9"]["moe_mflops"]
    assert best["flop_ratio"] == pytest.approx(best["moe_mflops"] / rows[BASELINE]["moe_mflops"])
    assert sum(result["experts_used_shares"].values()) == pytest.approx(1.0)
    shown = best["perplexity"] <= rows[BASELINE]["perplexity"] and (
        best["flop_ratio"] <= lm_demo.FLOP_TARGET
    )
    assert result["shown"] == shown
    printed = capsys.readouterr().out
    assert f"{XMOE} t={chosen}: perplexity" in printed
    assert "Reproduction (`make reproduce`" in printed

    # the chosen t: the first of the grid whose training-token FLOPs are within the budget
    model, config, _ = load_model(tmp_path / XMOE)
    budget = lm_demo.FLOP_BUDGET * rows[BASELINE]["moe_mflops"] * 1e6
    within = []
    for threshold in lm_demo.THRESHOLD_GRID:
        model.set_threshold(threshold)
        ev = evaluate(model, data.train, 16, config.seq_len, lm_demo.CALIBRATION_BATCHES)
        within.append(ev.moe_flops_per_token <= budget)
    assert chosen == lm_demo.THRESHOLD_GRID[within.index(True)]


def test_demo_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="steps=0"):
        LMDemoSettings(steps=0)
    with pytest.raises(ValueError, match="seed=-1"):
        LMDemoSettings(seed=-1)


def test_reproduction_headline_is_read_from_the_page(tmp_path):
    page = tmp_path / "lm.md"
    line = f"{XMOE} at t=0.5: perplexity 100.68 vs top-2 103.78 (+3.0%) at 0.51x top-2's MoE FLOPs"
    page.write_text(f"# x\n\n- xmoe-16 at t=0.5: perplexity 1 vs top-2 2\n- {line}; more\n")
    assert lm_demo.reproduction_headline(page) == line
    assert lm_demo.reproduction_headline(tmp_path / "missing.md") is None


def _fake_result(seed: int) -> dict:
    rows = {
        BASELINE: {
            "perplexity": 80.0,
            "moe_mflops": 0.5,
            "flop_ratio": 1.0,
            "experts_per_token": 2,
        },
        f"{XMOE} t=0.9": {
            "perplexity": 74.0,
            "moe_mflops": 0.7,
            "flop_ratio": 1.4,
            "experts_per_token": 5,
        },
        f"{XMOE} t=0.5": {
            "perplexity": 75.0 + 10 * seed,
            "moe_mflops": 0.25,
            "flop_ratio": 0.5,
            "experts_per_token": 2,
        },
    }
    return {
        "rows": rows,
        "threshold": 0.5,
        "shown": seed == 0,
        "wall_seconds": 300.0,
        "experts_used_shares": {},
    }


def test_seed_table_stores_each_seed_and_resumes(monkeypatch, tmp_path):
    """Each seed's numbers are stored; a rerun runs no seed again; the page has one row per
    seed, the target verdict of each, and the command."""
    calls = []

    def fake_demo(settings):
        calls.append(settings.seed)
        return _fake_result(settings.seed)

    monkeypatch.setattr(seeds, "run_lm_demo", fake_demo)
    report = tmp_path / "demo.md"
    argv = ["--seeds", "0", "1", "--steps", "7", "--out", str(tmp_path), "--report", str(report)]
    assert seeds.main(argv) == 0
    assert calls == [0, 1]
    assert json.loads((tmp_path / "seed1.json").read_text())["steps"] == 7
    assert seeds.main(argv) == 0
    assert calls == [0, 1]  # resumed: nothing rerun
    page = report.read_text()
    assert "python -m xmoe.demos.seeds --seeds 0 1 --steps 7" in page
    assert (
        "| 0 | 80.00 | 74.00 | 1.40 | 0.5 | 75.00 | 0.50 | -6.2% | 2.00 | met | 5.0 min |" in page
    )
    assert (
        "| 1 | 80.00 | 74.00 | 1.40 | 0.5 | 85.00 | 0.50 | +6.2% | 2.00 | missed | 5.0 min |"
        in page
    )
    assert "Target met in 1 of 2 seeds." in page
    seeds.main([*argv[:4], "9", *argv[5:]])  # another budget: the stored seeds run again
    assert calls == [0, 1, 0, 1]
