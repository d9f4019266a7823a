"""`xmoe reproduce --suite routers`: the rows (registered routers at equal expert weights), a
quick resumable run of two rows on the tiny model, and routers.md from synthetic records."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from xmoe.cli.main import main
from xmoe.experiments import grid, plots
from xmoe.experiments.reproduce import SWEEP_THRESHOLDS, ReproduceSettings, reproduce
from xmoe.experiments.router_report import finding_lines, router_table, write_routers_report
from xmoe.experiments.router_suite import ROWS, available_rows, row_config
from xmoe.models import TransformerLM
from xmoe.registry import ROUTERS

from helpers import register_for_test


def _expert_weights(name: str) -> int:
    model = TransformerLM(row_config(name, "tiny").model)
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith((".w1", ".w2")))


def test_rows_are_registered_routers_at_equal_expert_weights():
    names, notes = available_rows("tiny")
    assert {"top2", "xmoe-32", "deepseek", "threshold+shared"} <= set(names)
    noted = [note.split(":")[0] for note in notes]
    assert set(ROWS) <= set(names) | set(noted)  # every row runs or is noted
    for note in notes:  # a skipped row names its unregistered router
        name = note.split(":")[0]
        assert name in ROWS and name not in names and "is invalid" in note
    assert all(row_config(n, "tiny").model.moe.router in ROUTERS for n in names)
    assert {_expert_weights(n) for n in names} == {_expert_weights("top2")}
    shared = row_config("threshold+shared").model.moe
    assert (shared.router, shared.num_shared_experts, shared.num_experts) == (
        "deepseek_threshold",
        1,
        31,
    )
    defaults = ReproduceSettings(suite="routers", base_preset="tiny")
    assert (defaults.presets, defaults.ablations) == (tuple(names), ())
    assert ReproduceSettings().ablations  # the lm suite keeps its ablation rows
    with pytest.raises(ValueError, match="presets \\['nope'\\] are invalid"):
        ReproduceSettings(suite="routers", presets=("nope",), ablations=())
    with pytest.raises(ValueError, match="suite='nope' is invalid"):
        ReproduceSettings(suite="nope")


def test_the_moepp_row_is_the_papers_setting():
    """MoE++ renormalises each token's top-k weights (a zero expert's share goes to the
    token's other experts) beside top-2's 16 FFN experts and the 7B model's 4 cheap ones."""
    moe = row_config("moepp", "tiny").model.moe
    assert (moe.router, moe.experts, moe.top_k, moe.renormalize) == ("moepp", "moepp", 2, True)
    roles = moe.expert_options.roles(moe.num_experts)
    assert roles.count("ffn") == 16 and roles[16:] == ("constant", "constant", "copy", "zero")


def test_a_registered_router_without_a_row_gets_one(monkeypatch):
    class Newcomer(ROUTERS["topk"]):
        """A router no row of the suite knows."""

    register_for_test(monkeypatch, ROUTERS, "newcomer", Newcomer)
    names, _ = available_rows("tiny")
    assert "newcomer" in names and "newcomer" not in ROWS
    moe = row_config("newcomer", "tiny").model.moe
    assert (moe.router, moe.num_experts, moe.top_k) == ("newcomer", 16, 2)  # top-2's shape


def test_cli_names_a_row_that_is_not_in_the_suite(tmp_path, capsys):
    assert (
        main(["reproduce", "--suite", "routers", "--presets", "nope", "--out", str(tmp_path)]) == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("xmoe: error: presets ['nope'] are invalid: choose from ('top2', ")
    assert len(err.splitlines()) == 1


def test_quick_suite_runs_two_routers_and_resumes(tmp_path, monkeypatch):
    """Two rows on the tiny model with a few steps: routers.md has both rows and the threshold
    row's sweep; a second invocation reuses the finished runs instead of training them."""
    monkeypatch.setattr(plots, "plot_ppl_vs_flops", lambda r, t, path: path.write_text("png"))
    settings = ReproduceSettings(
        suite="routers",
        base_preset="tiny",
        presets=("top2", "threshold+shared"),
        ablations=(),
        seeds=1,
        tokens=512,
        eval_batches=1,
        jobs=1,
        out=tmp_path / "runs",
        docs=tmp_path / "docs",
        progress=False,
    )
    path = reproduce(settings)
    assert path == tmp_path / "docs" / "routers.md"
    text = path.read_text()
    assert "| top2 | topk | 1 |" in text and "| threshold+shared | deepseek_threshold | 1 |" in text
    assert "| threshold+shared t=0.5 |" in text and "top2 t=" not in text
    assert (tmp_path / "docs" / "routers_ppl_vs_flops.png").exists()
    record = json.loads(
        (tmp_path / "runs" / "threshold+shared" / "seed0" / "results.json").read_text()
    )
    assert record["train_config"]["model"]["moe"]["num_shared_experts"] == 1
    assert [p["threshold"] for p in record["sweep"]] == list(SWEEP_THRESHOLDS)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(grid, "train", no_training)
    assert reproduce(settings) == path


def _record(name: str, router: str, seed: int, ppl: float, mflops: float, sweep=()) -> dict:
    return {
        "preset": name,
        "seed": seed,
        "train_config": {
            "max_steps": 10,
            "batch_size": 4,
            "seq_len": 16,
            "model": {"d_model": 32, "num_layers": 4, "moe": {"router": router}},
        },
        "parameters": 3_700_000,
        "eval": {"perplexity": ppl, "moe_flops_per_token": mflops * 1e6, "experts_per_token": 2},
        "eval_capacity": {"perplexity": ppl},
        "sweep": [
            {
                "threshold": t,
                "perplexity": p,
                "moe_flops_per_token": f * 1e6,
                "experts_per_token": 1,
            }
            for t, p, f in sweep
        ],
        "adaptivity": {"p10": 1.0, "p90": 3.0, "expert_load": [[0.5, 0.25, 0.25, 0.0]]},
        "device": "cpu",
        "wall_seconds": 1.0,
        "train_drop_fraction": 0.1,
        "train_tokens_per_second": 1000.0,
    }


def _sweep(ppl_at_half: float, mflops_at_half: float) -> list[tuple[float, float, float]]:
    """A t sweep whose t=0.5 point is given; other t cost more and gain a little."""
    return [(t, ppl_at_half - (t - 0.5), mflops_at_half * (1 + t - 0.5)) for t in SWEEP_THRESHOLDS]


RECORDS = [
    record
    for seed in (0, 1)
    for record in (
        _record("top2", "topk", seed, 100.0, 0.5),
        _record("xmoe-32", "threshold", seed, 98.0, 0.8, _sweep(99.0, 0.25)),
        _record("deepseek", "deepseek", seed, 104.0 + seed, 0.5),
        _record("threshold+shared", "deepseek_threshold", seed, 97.0, 0.8, _sweep(97.5, 0.25)),
    )
]


def test_findings_name_the_front_the_losers_and_the_moonshot():
    table = router_table(RECORDS)
    assert table["top2"]["load_imbalance"] == (2.0, 0.0)  # 0.5 of the load on 1 of 4 experts
    lines = finding_lines(RECORDS, table)
    front = [line for line in lines if line.startswith("  - ")]
    assert front[0] == (
        "  - at 0.200 MFLOP/token (0.40x top-2): threshold+shared t=0.3, perplexity 97.70"
    )
    assert all("xmoe-32" not in line for line in front)  # threshold+shared beats it everywhere
    assert (
        "deepseek (deepseek): perplexity 104.50 (+4.5% vs top-2, **more than 3% worse**) at "
        "1.00x top-2's MoE FLOPs; dominated by threshold+shared t=0.9 (97.10 at 0.70x); "
        "train drop rate 0.100 (top-2 0.100), load max/mean 2.00 (top-2 2.00), experts/token "
        "2.00 (top-2 2.00)."
    ) in lines
    assert lines[-1] == (
        "moonshot, threshold+shared t=0.5: 97.50 vs xmoe-32 at t=0.5 99.00 (+1.5%) at "
        "0.250 ≤ 0.250 MFLOP/token, 2 seed(s): **met**."
    )


def test_report_tables_from_records(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "plot_ppl_vs_flops", lambda r, t, path: None)
    settings = ReproduceSettings(
        suite="routers", presets=("top2",), ablations=(), seeds=2, tokens=640, docs=tmp_path
    )
    data = SimpleNamespace(val=np.zeros(12_345, dtype=np.uint16))
    speeds = {"top2": 1000.0, "xmoe-32": 1500.0}  # deepseek, threshold+shared: not timed
    text = write_routers_report(RECORDS, settings, data, 60.0, speeds).read_text()
    lines = text.splitlines()
    assert (
        "| top2 | topk | 2 | 3.70M | 100.00 ± 0.00 | 0.500 ± 0.000 | 2.00 ± 0.00 | 1.0 ± 0.0 "
        "| 3.0 ± 0.0 | 0.100 ± 0.000 | 2.00 ± 0.00 | 1000 (1.00x) |"
    ) in lines
    assert lines[[line.startswith("| xmoe-32 |") for line in lines].index(True)].endswith(
        "| 1500 (1.50x) |"
    )
    assert lines[[line.startswith("| deepseek |") for line in lines].index(True)].endswith(
        "| n/a |"
    )
    assert "| threshold+shared t=0.9 | 97.10 | 0.350 |" in lines
    assert "Every run: 640 training tokens (10 steps of 4x16)" in text
    for note in available_rows()[1]:  # each row whose router is not registered is named
        assert f"- {note}" in lines
