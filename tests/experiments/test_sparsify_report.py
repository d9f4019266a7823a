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


def _neurons(name, router, share, ppl_s, ppl_k, **extra):
    """A neurons-mode cell (``router`` the method, or ``recovered`` with ``method`` given)."""
    neurons = {"kind": "neurons", "method": router, "partition": "neuron", "expert_size": 1,
               "num_experts": None, "experts_per_token": None}  # fmt: skip
    return _cell(name, router, share, ppl_s, ppl_k) | neurons | extra


def test_report_gives_each_issue_target_and_the_granularity_curve(tmp_path):
    recovery, big = {"tokens": 1_000_000}, {"tokens": 4_000_000}
    cells = [
        _cell("dense", "dense", 1.0, 10.0, 5.0),
        _cell("n-oracle", "oracle", 0.5, 10.2, 5.05, partition="neuron", expert_size=1),
        _neurons("n-teal", "teal", 0.61, 10.4, 5.1),  # +4%: within 5% at <= 67%
        _neurons("n-wina", "wina", 0.5, 13.0, 6.0),
        _neurons(
            "n-rec",
            "recovered",
            0.524,
            11.0,
            5.25,
            method="wina",
            recovery=recovery,
            fraction=0.5,
            ffn_flops_share_by_domain={"shakespeare": 0.5512, "kjv": 0.4968},
        ),
        # over the 2M budget: no target counts it
        _neurons("n-big", "recovered", 0.5, 10.1, 5.0, method="wina", recovery=big),
        _cell("e-16", "trained", 0.52, 20.0, 9.0),
    ]
    settings = EvalSettings(docs=tmp_path, out=tmp_path / "run", expert_sizes=(16,),
                            partitions=("clustered",), recover=(), xmoe_route=0)  # fmt: skip
    text = write_report(cells, settings, iter_names(settings)).read_text()
    assert (
        "- Training-free: ≤ +5% perplexity at ≤ 67% of FFN FLOPs: **met**; best: neurons mode, "
        "TEAL uniform, F=61%: 61.0% FFN FLOPs, ppl Shakespeare 10.40 (+4.0%), KJV 5.10 (+2.0%)."
    ) in text
    assert (
        "- After ≤ 2M tokens of recovery: ≤ +15% at 50% of FFN FLOPs: **met**; best: neurons "
        "mode, TEAL + WINA + recovery (1000000 tokens), F=50%: 52.4% FFN FLOPs (per domain: "
        "Shakespeare 55.1%, KJV 49.7%), ppl"
    ) in text
    assert "KJV 5.25 (+5.0%). Its FFN FLOPs are 2.4 points over the budget, within the " in text
    assert "(+2.0%).\n" in text  # the training-free best, under its budget: no such sentence
    assert "- Moonshot, its quality: ≤ +5% at 50% after ≤ 2M tokens: **missed**; best:" in text
    # a miss quotes the per-neuron oracle within its budget; a target met does not
    oracle = "For comparison, the per-neuron oracle within this budget, training-free"
    assert text.count(oracle) == 1
    assert "dense FFN's outputs): 50.0% FFN FLOPs, ppl Shakespeare 10.20 (+2.0%), KJV" in text
    assert "| 1 | oracle (a bound: ranks on the dense FFN) | - | +2.0% | +2.0% |" in text
    assert "| 1 | training-free | - | +30.0% | +4.0% | +4.0% | +4.0% |" in text  # 61% + slack
    assert "| 1 | after recovery | - | +1.0% |" in text  # the best recovered, whatever budget
    assert "| 16 | training-free | - | +100.0% |" in text
    assert "| neuron | 1 (no router) | TEAL uniform | F=61% | - |" in text
