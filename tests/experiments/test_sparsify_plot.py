"""The sparsify grid's figure (experiments/sparsify_plot.py) from made-up cells: which cells
become which line, the recovered cells as single points in budget order, and a PNG written."""

from __future__ import annotations

import pytest

from xmoe.experiments.sparsify_plot import plot_series, write_plot


def _cell(kind, router, share, ppl_s, ppl_k, **extra):
    cell = {"kind": kind, "router": router, "partition": "clustered", "expert_size": 16,
            "ffn_flops_share": share, "ppl": {"shakespeare": ppl_s, "kjv": ppl_k}}  # fmt: skip
    return cell | extra


DENSE = _cell("dense", "dense", 1.0, 10.0, 4.0)
CELLS = [
    DENSE,
    _cell("sparse", "trained", 0.75, 12.0, 5.0),
    _cell("sparse", "trained", 0.5, 20.0, 8.0),
    _cell("sparse", "oracle", 0.5, 15.0, 6.0),
    _cell("neurons", "gate-first", 0.5, 13.0, 4.4, method="gate-first"),
    _cell(
        "neurons", "recovered", 0.501, 10.5, 4.2, method="gate-first", recovery={"tokens": 10**6}
    ),
    _cell(
        "neurons", "recovered", 0.5, 11.0, 4.4, method="gate-first", recovery={"tokens": 250_000}
    ),
    _cell("oracle", "oracle", 0.5, 10.4, 4.1, partition="neuron", expert_size=1),
]


def test_lines_per_selection_sorted_by_flops_and_recovered_cells_as_points():
    lines, recovered = plot_series(CELLS, DENSE)
    assert list(lines) == [
        "clustered H=16 oracle",
        "clustered H=16 trained",
        "neuron H=1 oracle",
        "neurons gate-first (CHESS) + WINA + greedy",
    ]
    assert lines["clustered H=16 trained"] == [
        (0.5, {"shakespeare": 2.0, "kjv": 2.0}),
        (0.75, {"shakespeare": 1.2, "kjv": 1.25}),
    ]
    assert [name for name, _ in recovered] == ["0.25M", "1M"]  # budget order, not cell order
    assert recovered[1][1] == (0.501, {"shakespeare": 1.05, "kjv": pytest.approx(1.05)})


def test_the_figure_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sparsify.png"
    assert write_plot(CELLS, DENSE, path, (1.05, 1.15))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
