"""`xmoe compress-grid` (experiments/compression_grid.py and compression_report.py) on a tiny
top-2 model: the cells planned from the registry, resuming (a done
cell is never measured again, a crash mid-cell loses that cell alone) and the report's targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xmoe.data import TokenData
from xmoe.experiments import compression_grid, compression_report
from xmoe.experiments.compression_grid import (
    CompressionGrid,
    CompressionGridSettings,
    model_config,
    plan_cells,
    run_grid,
    trained_model,
)
from xmoe.experiments.compression_methods import METHODS, Experts, Method
from xmoe.experiments.compression_report import (
    compression_table,
    target_lines,
    write_compression_report,
)
from xmoe.storage import read_verified_json
from xmoe.training.config import apply_overrides
from xmoe.training.trainer import load_token_data

EXPERTS = Experts(
    num_experts=64, layers=2, weights=2 * 128 * 64, rank_cost=2 * (128 + 64), element_bits=32,
    domain="kjv",
)  # fmt: skip


def _settings(out: Path, **fields) -> CompressionGridSettings:
    values = {"models": ("top2",), "fractions": (0.5,), "calibration_tokens": 64,
              "eval_batches": 1, "quick": True, "out": out, "docs": out / "docs",
              "progress": False}  # fmt: skip
    return CompressionGridSettings(**(values | fields))


def _two_steps(name, settings):
    """The quick model config, trained for one step (the test's budget)."""
    config = model_config(name, settings)
    overrides = ["max_steps=1", "eval_interval=1", "checkpoint_interval=1", "eval_batches=1"]
    return apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def top2_run(tmp_path_factory) -> Path:
    """A tiny top-2 model trained here by the grid's own machinery (one step)."""
    settings = _settings(tmp_path_factory.mktemp("grid"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compression_grid, "model_config", _two_steps)
        data = load_token_data(_two_steps("top2", settings), progress=False)
        _, config, path = trained_model("top2", settings, data)
    assert config.max_steps == 1 and config.preset == "top2"
    return path


def test_a_model_trained_here_is_not_trained_again(top2_run, monkeypatch):
    settings = _settings(top2_run.parent.parent.parent)
    monkeypatch.setattr(compression_grid, "model_config", _two_steps)
    monkeypatch.setattr(compression_grid, "train", lambda *a, **k: pytest.fail("trained again"))
    data = load_token_data(_two_steps("top2", settings), progress=False)
    assert trained_model("top2", settings, data)[2] == top2_run


def test_cells_come_from_the_registry_with_a_note_for_each_skipped_row(monkeypatch):
    extra = (
        Method("fold", "fold", lambda e, f: {}),
        Method("merge-coloured", "merge", lambda e, f: {"groups": 2, "colour": "red"}),
    )
    monkeypatch.setattr(compression_grid, "METHODS", METHODS + extra)
    settings = CompressionGridSettings(fractions=(0.75, 0.5, 0.25))
    cells, notes = plan_cells("xmoe-64", EXPERTS, settings)
    by_method = {}
    for cell in cells:
        by_method.setdefault(cell.method, []).append(cell)
    assert by_method["uncompressed"][0].passes == []
    assert [c.passes for c in by_method["merge"]] == [
        [("merge", {"groups": g})] for g in (48, 32, 16)
    ]
    # 8 bits is the widest width: the 75% and 50% targets are one cell, measured once
    assert [c.fractions for c in by_method["quantize"]] == [[0.75, 0.5], [0.25]]
    assert [c.fractions for c in by_method["dynamic-prune"]] == [[]]
    assert "fold: skipped (pass 'fold' is not registered)" in notes
    coloured = [n for n in notes if n.startswith("xmoe-64 merge-coloured at 75%: skipped")]
    assert len(coloured) == 1 and "colour" in coloured[0]
    assert len({c.name for c in cells}) == len(cells)


def test_a_crash_mid_cell_loses_that_cell_alone_and_done_cells_are_not_measured_again(
    top2_run, tmp_path, monkeypatch
):
    settings = _settings(tmp_path, runs=(top2_run,), methods=("merge", "uniform-averaging"))
    measured = []
    real = CompressionGrid.compressed

    def counting(self, cell):
        measured.append(cell.method)
        return real(self, cell)

    real_size, sized = compression_grid.model_size, []

    def crash_on_second(*args):
        sized.append(args)
        if len(sized) == 2:
            raise KeyboardInterrupt  # killed while the second cell measures its saved bytes
        return real_size(*args)

    monkeypatch.setattr(CompressionGrid, "compressed", counting)
    monkeypatch.setattr(compression_grid, "model_size", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_grid(settings)
    cells = tmp_path / "cells" / "top2"
    assert [p.name for p in cells.iterdir()] == ["uncompressed.json"]
    assert measured == ["uncompressed", "merge"]
    assert not (tmp_path / "scratch" / "top2" / "merge-groups8").exists()  # its save is gone
    monkeypatch.setattr(compression_grid, "model_size", real_size)

    measured.clear()
    leftover = tmp_path / "scratch" / "top2" / "merge-groups8"  # what a SIGKILL would leave
    leftover.mkdir(parents=True)
    records, _, _ = run_grid(settings)
    assert measured == ["merge", "uniform-averaging"]  # the reference is not measured again
    assert [r["method"] for r in records] == ["uncompressed", "merge", "uniform-averaging"]
    assert not leftover.exists()
    reference = read_verified_json(cells / "uncompressed.json")
    assert reference["expert_bytes"] > records[1]["expert_bytes"] == records[2]["expert_bytes"]
    assert set(reference["eval"]) == {"synthetic", "all"}

    # a damaged cell is measured again; the others are read
    damaged = cells / "merge-groups8.json"
    stored = json.loads(damaged.read_text())
    damaged.write_text(json.dumps(stored | {"record": stored["record"].replace("1", "2", 1)}))
    measured.clear()
    plotted = []  # (matplotlib takes seconds to import; the figure is the report's)
    monkeypatch.setattr(compression_report, "plot_compression", lambda r, p: plotted.append(p))
    path = compression_table(settings)
    assert measured == ["merge"]
    text = path.read_text()
    assert "## Targets" in text and "merge beats uniform-averaging at equal bytes" in text
    assert plotted == [settings.docs / "compression.png"]


def _record(
    model: str, method: str, fractions, ppl: float, expert_bytes: int, kjv: float | None = None
) -> dict:
    options = {"domain": "kjv"} if method == "reduce" else {}
    passes = [] if method == "uncompressed" else [[method, options]]
    return {
        "model": model, "method": method, "passes": passes, "fractions": list(fractions),
        "eval": {"kjv": {"perplexity": ppl if kjv is None else kjv},
                 "all": {"perplexity": ppl, "moe_flops_per_token": 1e6}},
        "expert_bytes": expert_bytes, "resident_bytes": 2 * expert_bytes,
        "disk_bytes": 2 * expert_bytes, "seconds": 1.0,
    }  # fmt: skip


RECORDS = [
    _record("xmoe-64", "uncompressed", (), 20.0, 1000),
    _record("xmoe-64", "merge", (0.5,), 20.4, 500),
    _record("xmoe-64", "uniform-averaging", (0.5,), 21.0, 500),
    _record("xmoe-64", "random-grouping", (0.5,), 20.2, 500, kjv=19.0),
    _record("xmoe-64", "reduce", (0.5,), 20.9, 500, kjv=18.5),  # worse overall, better on kjv
    _record("xmoe-64", "quantize", (0.25,), 20.5, 240),
    _record("xmoe-64", "uniform-bits", (0.25,), 20.6, 200),  # fewer bytes: not equal
    _record("top2", "uncompressed", (), 22.0, 1000),
    _record("top2", "merge", (0.5,), 23.0, 500),
    _record("top2", "quantize", (0.25,), 22.1, 240),
]


def test_the_grid_calibrates_on_every_training_domain_and_reduce_on_its_own(tmp_path):
    # token i at position i; the training tokens lie domain after domain, as the corpus's do
    spans = {"kjv": (0, 3000), "shakespeare": (3000, 4096)}
    tokens = np.arange(4096, dtype=np.uint16)
    data = TokenData(tokens, tokens, 4096, val_domains=spans, train_domains=spans)
    settings = _settings(tmp_path)
    grid = CompressionGrid(None, model_config("top2", settings), data, settings)
    starts = grid.calibration[:, 0]
    assert bool((starts < 3000).any()) and bool((starts >= 3000).any())  # not kjv alone
    assert int(grid.domains["kjv"].max()) < 3000 <= int(grid.domains["shakespeare"].min())


def test_the_report_states_each_target_with_its_numbers_and_verdict(tmp_path, monkeypatch):
    lines = target_lines(RECORDS, (0.5, 0.25))
    assert lines == [
        "xmoe-64: merge beats uniform-averaging at equal bytes at 1 of 1 targets "
        "(50%: 20.40 vs 21.00): **met**.",
        "xmoe-64: merge beats random-grouping at equal bytes at 0 of 1 targets "
        "(50%: 20.40 vs 20.20): **missed**.",
        "xmoe-64: reduce beats random-grouping on kjv (the domain it reduces for) at equal bytes "
        "at 1 of 1 targets (50%: 18.50 vs 19.00): **met**.",
        "xmoe-64: quantize beats uniform-bits at equal bytes at 0 of 1 targets "
        "(25%: 20.50 vs 20.60, more bytes): **missed**.",
        "moonshot (xmoe-64 at ≤ 25% of its expert bytes within 3% of its perplexity): best "
        "quantize at 24.0% of the bytes, perplexity 20.50 vs 20.00 (+2.5%): **met**.",
        "does xmoe-64 compress better than top2 at equal bytes? xmoe-64 loses less perplexity "
        "(relative to its own) in 1 of 2 (method, target) pairs: **no**.",
    ]
    plotted = []
    monkeypatch.setattr(compression_report, "plot_compression", lambda r, p: plotted.append(p))
    settings = CompressionGridSettings(fractions=(0.5, 0.25), docs=tmp_path, command="xmoe x")
    config = {"max_steps": 10, "batch_size": 4, "seq_len": 8, "seed": 0}
    configs = {"xmoe-64": config, "top2": config}
    notes = ["reduce: skipped (pass 'reduce' is not registered)"]
    text = write_compression_report(RECORDS, notes, configs, settings, 60.0).read_text()
    assert plotted == [tmp_path / "compression.png"]
    assert [line[2:] for line in text.splitlines() if line.startswith("- ")] == [*lines, *notes]
    row = "| merge | 50% | merge | 20.40 | 20.40 (+2.0%) | 500 (50.0%) | 0.00 | 0.00 | 1.000 |"
    assert row in text.splitlines()
    assert "xmoe-64 (320 training tokens, seed 0)" in text
