"""The benchmarks run end to end at tiny sizes and write their tables (and plot)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks.layer import main

QUICK = ["--quick", "--rounds", "1", "--warmup", "0"]


def run_quick(main_fn, args: list[str], monkeypatch) -> None:
    """Run a benchmark's ``main`` with the harness's malloc settings already in the environment
    (so it does not re-exec itself), restoring the thread count it may change."""
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(1 << 40))
    threads = torch.get_num_threads()
    try:
        main_fn(args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_layer_benchmark_quick(tmp_path, monkeypatch):
    run_quick(main, [*QUICK, "--device", "cpu", "--no-memory", "--out", str(tmp_path)], monkeypatch)
    table = (tmp_path / "layer_cpu-quick.md").read_text()
    assert "### Targets" in table and "HF grouped_mm" in table and "capacity padding" in table
    assert "HF Mixtral block, grouped_mm" in table and "one layer with routing, T=1" in table
    assert (tmp_path / "layer_sweep_cpu-quick.png").stat().st_size > 1000


def test_hf_experts_benchmark_quick(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from benchmarks.hf_experts import main as hf_experts_main

    run_quick(hf_experts_main, [*QUICK, "--threads", "1", "--out", str(tmp_path)], monkeypatch)
    table = (tmp_path / "hf_experts_quick.md").read_text()
    assert "python -m benchmarks.hf_experts --quick" in table
    assert "### Mixtral" in table and "### Qwen3-MoE" in table and "| xmoe t=0.5 |" in table


def test_lm_train_benchmark_quick(tmp_path, monkeypatch):
    from benchmarks.lm_train import main as lm_train_main

    run_quick(lm_train_main, [*QUICK, "--out", str(tmp_path)], monkeypatch)
    table = (tmp_path / "lm_train_cpu_quick.md").read_text()
    assert "python -m benchmarks.lm_train --quick" in table
    assert "### Target" in table and "| dense, same active FLOPs |" in table


def test_import_time_benchmark_runs(capsys):
    from benchmarks.import_time import main as import_time_main

    import_time_main(["--runs", "1"])
    out = capsys.readouterr().out
    assert "transformers imported: False" in out and "import xmoe adds" in out


@pytest.mark.slow
def test_tuning_benchmark_quick(tmp_path, monkeypatch):
    from benchmarks.tuning import main as tuning_main

    run_quick(tuning_main, [*QUICK, "--out", str(tmp_path)], monkeypatch)
    table = (tmp_path / "tuning_cpu-quick.md").read_text()
    assert "python -m benchmarks.tuning --quick" in table
    assert "### Chunk size" in table and "### Decode path crossover" in table
    assert "failed" not in table  # every memory probe ran


def test_sparse_decode_benchmark_quick(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from benchmarks.sparse_decode import main as sparse_decode_main

    run_quick(sparse_decode_main, [*QUICK, "--out", str(tmp_path)], monkeypatch)
    table = (tmp_path / "sparse_decode_cpu_quick.md").read_text()
    assert "python -m benchmarks.sparse_decode --quick" in table
    assert "### 2 MLPs" in table and "| dense, row-major layout | 100% |" in table
    assert "| sparse, kept 0.35 | 35% |" in table and "- 2 MLPs: sparse: " in table


def test_sparse_decode_benchmark_reads_a_models_hidden_states():
    """The real-model section's stack, on a tiny random Llama: each layer's token is what that
    MLP sees at the last position, and the thresholds keep the asked fraction."""
    pytest.importorskip("transformers")
    from tests.conversion.test_sparsify import tiny_llama, token_ids

    from benchmarks.sparse_decode import model_stack

    model = tiny_llama(torch.float32)
    seen = []
    hook = model.model.layers[1].mlp.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0][0, -1:])
    )
    stack = model_stack(model, token_ids(1), [0.5])
    hook.remove()
    assert len(stack.sparse) == len(stack.tokens) == 2
    torch.testing.assert_close(stack.tokens[1], seen[0])
    x_threshold, _ = stack.thresholds[0.5][1]
    assert (stack.tokens[1].abs() > x_threshold).sum() == model.config.hidden_size // 2


def test_sparsify_decode_benchmark_quick(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    from benchmarks.sparsify_decode import main as sparsify_decode_main

    args = [*QUICK, "--threads", "1", "--decode", "2", "--flops", "0.5"]
    args += ["--methods", "teal", "gate-first"]
    run_quick(sparsify_decode_main, [*args, "--out", str(tmp_path)], monkeypatch)
    table = (tmp_path / "sparsify_decode_quick.md").read_text()
    assert "python -m benchmarks.sparsify_decode --quick" in table
    assert "| dense, row-major layout | 100% |" in table and "| teal, F = 50% | " in table
    assert "| gate-first, F = 50% | " in table
    assert "| teal, F = 50%, embedding_bag | " in table  # the native kernel's fallback
    assert "- MLPs, gate-first: " in table and "- whole model, teal: " in table


def test_sparsify_decode_benchmark_skips_without_the_model(tmp_path, monkeypatch, capsys):
    from benchmarks.sparsify_decode import main as sparsify_decode_main

    monkeypatch.setattr("xmoe.conversion.real_model.real_model_available", lambda: False)
    monkeypatch.setattr("xmoe.conversion.real_model.cached_model_dir", lambda: tmp_path / "none")
    run_quick(sparsify_decode_main, ["--out", str(tmp_path)], monkeypatch)
    assert "skipped: SmolLM2-135M is not available" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_sparsify_decode_replays_the_mlp_inputs_of_one_decode():
    """The MLPs-alone measure replays what each MLP saw at each decode step, every round."""
    pytest.importorskip("transformers")
    from tests.conversion.test_sparsify import HIDDEN, tiny_llama, token_ids

    from benchmarks.sparsify_decode import Data, Variant

    ids = token_ids(1, 12)
    variant = Variant(tiny_llama(), Data("test", ids, ids[:, :8], ids[:, 8:11], ids))
    with torch.no_grad():
        variant.decode(record=True)
        variant.decode()
    assert [mlp for mlp, _ in variant.mlp_inputs] == variant.mlps * 3
    assert all(x.shape == (1, 1, HIDDEN) for _, x in variant.mlp_inputs)


def test_sparsify_decode_row_major_baseline_is_the_dense_model():
    pytest.importorskip("transformers")
    from tests.conversion.test_sparsify import logits, tiny_llama, token_ids

    from benchmarks.sparsify_decode import row_major_model

    model = tiny_llama()
    ids = token_ids(2)
    torch.testing.assert_close(
        logits(row_major_model(model), ids), logits(model, ids), rtol=0, atol=1e-12
    )


def test_layer_call_benchmark_quick(monkeypatch):
    from benchmarks.layer_call import main as layer_call_main

    threads = torch.get_num_threads()
    try:
        line = layer_call_main(["--label", "x", "--tokens", "1", "--batches", "1", "--calls", "2"])
    finally:
        torch.set_num_threads(threads)
    assert line.startswith("x T=1: ") and line.endswith("us")


def test_compare_logs_finds_equal_and_different_runs(tmp_path, capsys):
    from benchmarks.compare_logs import main as compare_main

    for name, loss in (("a", 1.5), ("b", 1.5), ("c", 1.25)):
        (tmp_path / name).mkdir()
        row = {"step": 5, "loss": loss, "tokens_per_second": hash(name) % 1000}
        (tmp_path / name / "log.jsonl").write_text(json.dumps(row) + "\n")
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1
    assert "differ" in capsys.readouterr().out


def test_gpu_session_script_lists_its_steps(tmp_path):
    """``benchmarks/gpu_session.sh --dry-run`` parses and names its steps, running none (its
    ``--cpu-smoke`` runs the benchmarks' quick modes, the kernels under the interpreter: about
    a minute, so not a test)."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_session.sh"
    env = {**os.environ, "OUT": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, check=True
    )
    steps = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("== ")]
    assert steps == ["env", "test-gpu", "test", "kernels", "layer"]


def test_neuron_decode_call_benchmark_quick():
    """Times this checkout's NeuronMLP against a baseline file (here the same one) and the
    kept-row sums alone, at a tiny shape keeping about half."""
    from benchmarks.neuron_decode_call import main as neuron_decode_call_main

    baseline = Path(__file__).parents[1] / "src/xmoe/conversion/neuron_mlp.py"
    args = ["--hidden", "16", "--ffn", "32", "--rounds", "1", "--calls", "2"]
    threads = torch.get_num_threads()
    try:
        best = neuron_decode_call_main([*args, "--baseline", str(baseline)])
    finally:
        torch.set_num_threads(threads)
    assert list(best) == ["this checkout", "baseline", "kept-row sums alone", "dense, row-major"]
    assert all(micros > 0 for micros in best.values())


def test_expert_norms_benchmark_quick(monkeypatch, capsys):
    """The Gram form against the materialised outputs, side by side at tiny sizes: one table
    row per expert size, each with both timings and their agreement."""
    from benchmarks.expert_norms import main as expert_norms_main

    run_quick(expert_norms_main, QUICK, monkeypatch)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| H (E) | outputs ms | Gram ms | speed-up |")
    assert len(rows) >= 3  # header, rule, at least one size
