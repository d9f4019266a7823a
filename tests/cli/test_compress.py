"""``xmoe compress`` end to end on a one-step tiny run."""

from __future__ import annotations

import pytest
import torch

from tests.training.test_rundir import tiny_config
from xmoe.cli.main import main
from xmoe.compression import load_compressed
from xmoe.training.trainer import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train(tiny_config(max_steps=1), path, progress=False)
    return path


def _compress(run, out, *passes: str, options: tuple[str, ...] = ()) -> int:
    command = ["compress", str(run), "--out", str(out), "--no-progress"]
    command += ["--calibration-tokens", "256", *options]
    return main([*command, *(arg for p in passes for arg in ("--pass", p))])


def test_compress_writes_a_loadable_smaller_model(run, tmp_path, capsys):
    out = tmp_path / "small"
    passes = ("merge:groups=4", "quantize:bits=3,group_size=32", "dynamic-prune:beta=0.9")
    assert _compress(run, out, *passes, options=("--eval-batches", "1")) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: expert bytes" in printed and "bytes on disk" in printed
    before, after = (line for line in printed.splitlines() if "validation perplexity" in line)
    assert "before" in before and "after" in after
    experts = [float(line.split("experts/token ")[1].split(",")[0]) for line in (before, after)]
    assert experts[1] < experts[0]  # dynamic pruning computes fewer experts per token
    model, recorded = load_compressed(out)
    assert [name for name, _ in recorded] == ["merge", "quantize", "dynamic-prune"]
    assert model.moe_layers[0].experts.inner.num_experts == 4


def test_bad_passes_and_targets_are_one_line_errors(run, tmp_path, capsys):
    out = tmp_path / "small"
    assert _compress(run, out, "merge:groups=9") == 1
    err = capsys.readouterr().err
    assert "xmoe: error: merge: groups=9 is more than MoE layer 0's num_experts=8" in err
    assert not out.exists()  # a failed pass leaves no output directory
    assert _compress(run, out, "quantize:bits=one") == 1
    assert "bits='one' is invalid: it must be a float" in capsys.readouterr().err
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _compress(run, out, "dynamic-prune:beta=0.3") == 1
    assert f"compress target {out} is not empty" in capsys.readouterr().err


def test_eval_and_generate_read_the_compressed_run(run, tmp_path, capsys):
    from xmoe.compression import compress
    from xmoe.hf.generation import sample
    from xmoe.training.rundir import RunDir

    out = tmp_path / "small"
    # neither pass depends on the calibration tokens: the same passes in memory are the same model
    passes = ("quantize:bits=4,group_size=32,allocation=uniform", "dynamic-prune:beta=0.9")
    assert _compress(run, out, *passes) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--batches", "1", "--no-progress"]) == 0
    assert "perplexity" in capsys.readouterr().out
    prompt = ["--prompt", "1 2 3", "--max-new-tokens", "5", "--temperature", "0"]
    assert main(["generate", str(out), *prompt]) == 0
    printed = capsys.readouterr().out.split()
    lm = RunDir(run).load_model()[0]
    specs = [("quantize", {"bits": 4, "group_size": 32, "allocation": "uniform"})]
    lm = compress(lm, [*specs, ("dynamic-prune", {"beta": 0.9})], torch.zeros(1, 2).long())
    expected, _ = sample(lm, [1, 2, 3], max_new_tokens=5, temperature=0.0)
    assert printed == [str(i) for i in expected]


def test_export_refuses_a_compressed_run_and_names_the_compressed_transformers_path(
    run, tmp_path, capsys
):
    out = tmp_path / "small"
    assert _compress(run, out, "dynamic-prune:beta=0.9") == 0
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert f"xmoe: error: {out} is xmoe compress's output: an XMoE config cannot describe" in err
    assert "xmoe export RUN --out DIR, then xmoe compress DIR" in err
    assert not (tmp_path / "hf").exists()


def test_a_compressed_model_without_its_run_record_is_no_run(tmp_path, capsys):
    from tests.compression.lm import tiny_lm
    from xmoe.compression import save_compressed

    out = save_compressed(tiny_lm(), tmp_path / "bare", passes=[])
    assert main(["eval", str(out), "--no-progress"]) == 1
    assert "compressed without its run's record" in capsys.readouterr().err


def _word_tokenizer():
    """A 32-word whitespace tokenizer made here (no download), as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0} | {f"w{i}": i + 1 for i in range(31)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def test_compress_takes_a_transformers_directory_and_writes_one(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.compression.test_families import tiny

    source, out, text = tmp_path / "mixtral", tmp_path / "small", tmp_path / "text.txt"
    tiny("mixtral").save_pretrained(source)
    _word_tokenizer().save_pretrained(source)
    text.write_text(" ".join(f"w{(7 * i) % 31}" for i in range(400)))
    command = ["compress", str(source), "--out", str(out), "--no-progress", "--seq-len", "16"]
    command += ["--calibration-tokens", "64", "--calibration-text", str(text)]
    passes = ["--pass", "prune:experts=2,method=magnitude", "--pass", "merge:groups=3"]
    assert main([*command, *passes, "--eval-batches", "1"]) == 1
    assert "--eval-batches needs a run directory" in capsys.readouterr().err
    assert main([*command, *passes]) == 0
    assert f"wrote {out}: expert bytes" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "CompressedMixtralForCausalLM"
    prompt = AutoTokenizer.from_pretrained(out)("w1 w2 w3", return_tensors="pt").input_ids
    assert model.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_reduce_calibrates_on_the_named_domain_of_the_run_data(run, tmp_path, capsys):
    out = tmp_path / "reduced"
    assert _compress(run, out, "reduce:groups=2,domain=synthetic") == 0
    model, recorded = load_compressed(out)
    assert recorded == [["reduce", {"groups": "2", "domain": "synthetic"}]]
    assert model.moe_layers[0].experts.inner.num_experts == 2
    assert _compress(run, tmp_path / "bad", "reduce:groups=2,domain=kjv") == 1
    err = capsys.readouterr().err
    assert "xmoe: error: reduce: domain='kjv' is invalid: the calibration data has domains" in err
    assert "['synthetic']" in err and not (tmp_path / "bad").exists()


def test_compress_grid_measures_a_given_run_and_writes_the_report(tmp_path, capsys, monkeypatch):
    from xmoe.experiments import compression_report

    run = tmp_path / "top2"
    train(tiny_config(max_steps=1, preset="top2"), run, progress=False)  # reused as top-2
    monkeypatch.setattr(compression_report, "plot_compression", lambda records, path: None)
    out = tmp_path / "grid"
    command = ["compress-grid", "--quick", "--runs", str(run), "--models", "top2", "--methods",
               "merge", "--fractions", "0.5", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(command) == 0
    assert f"wrote {out / 'docs' / 'compression.md'}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "cells" / "top2").iterdir()) == [
        "merge-groups4.json",
        "uncompressed.json",
    ]
    assert main([*command, "--models", "xmoe-64"]) == 1
    assert f"xmoe: error: runs: {run} is a run of 'top2', not one of models=('xmoe-64',)" in (
        capsys.readouterr().err
    )
    unfinished = tmp_path / "unfinished"
    train(tiny_config(max_steps=2, preset="top2"), unfinished, progress=False, stop_after=1)
    assert main([*command[:3], str(unfinished), *command[4:]]) == 1
    assert f"runs: {unfinished} is at step 1 of 2: finish its training first" in (
        capsys.readouterr().err
    )


def test_compress_grid_names_a_bad_option(capsys):
    assert main(["compress-grid", "--fractions", "0.5", "1.5"]) == 1
    assert "xmoe: error: fractions=(0.5, 1.5) is invalid: give numbers in (0, 1)" in (
        capsys.readouterr().err
    )
