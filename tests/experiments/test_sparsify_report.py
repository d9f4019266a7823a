"""The sparsify grid's report (experiments/sparsify_report.py) from made-up cells: the best
point per budget, the target verdicts and the markdown."""

from __future__ import annotations

from xmoe.experiments.sparsify_grid import EvalSettings, iter_names
from xmoe.experiments.sparsify_report import best_points, write_report


def _cell(name, router, share, ppl_s, ppl_k, ffn=None, e2e=None, **extra):
    timing = None if ffn is None else {"ffn_time_ratio": ffn, "tokens_per_s_ratio": e2e,
                                       "dense_tokens_per_s": 100.0}  # fmt: skip
    kind = "dense" if router == "dense" else "sparse"
    cell = {"name": name, "kind": kind, "router": router, "partition": "clustered",
            "expert_size": 16, "num_experts": 96, "fraction": share, "ffn_flops": share * 1e8,
            "ffn_flops_share": share, "experts_per_token": 96 * share, "active_share": share,
            "ppl": {"shakespeare": ppl_s, "kjv": ppl_k}, "timing": timing}  # fmt: skip
    return cell | extra


def test_report_from_cells(tmp_path):
    cells = [
        _cell("dense", "dense", 1.0, 10.0, 5.0),
        _cell("a", "oracle", 0.5, 10.1, 5.1),
        _cell("b", "trained", 0.5, 10.4, 5.2, ffn=0.5, e2e=1.3),
        _cell("c", "trained", 0.25, 20.0, 9.0, ffn=0.3, e2e=1.5),
    ]
    settings = EvalSettings(docs=tmp_path, out=tmp_path / "run", expert_sizes=(16,),
                            partitions=("clustered",), recover=(), xmoe_route=0)  # fmt: skip
    points = dict(best_points(cells[1:], cells[0]))
    assert points[0.5]["name"] == "b" and points[0.25]["name"] == "c"  # the oracle is no router
    text = write_report(cells, settings, iter_names(settings)).read_text()
    assert settings.command in text
    assert "within 5% of dense on both domains: met by 1 cell(s)" in text
    assert "0.50×" in text and "1.30×" in text and "+4.0%" in text
    assert "Not measured yet" in text
