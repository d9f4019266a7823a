"""The neurons mode of ``sparsify`` (xmoe.conversion.neuron_mlp, neuron_thresholds): per-channel
and per-neuron thresholds (TEAL, WINA, CHESS gate-first) on tiny random Llamas."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from tests.conversion.test_sparsify import (
    FFN,
    HIDDEN,
    dense_directory,
    logits,
    tiny_llama,
    token_ids,
)
from xmoe.cli.main import main
from xmoe.config import ConfigError
from xmoe.conversion import (
    NeuronMLP,
    SparsifyConfig,
    ffn_flops_fraction,
    load_sparsified,
    neuron_mlps,
    register,
    sparsify,
)
from xmoe.conversion.calibration import collect_mlp_inputs
from xmoe.conversion.neuron_thresholds import convert_layer, quantile_threshold, set_scales
from xmoe.conversion.pipeline import calibration_windows
from xmoe.storage import DamagedFileError

SITE_CHOICES = [("gate_up", "down"), ("gate_up", "gate"), ("gate",), ("down",), ("gate_up",)]


def neurons(model, ids: torch.Tensor, **settings):
    """``model`` sparsified in the neurons mode, calibrated on ``ids``."""
    return sparsify(model, calibration=ids, mode="neurons", **settings)


def calibration_loss(model, dense, ids: torch.Tensor) -> float:
    """Mean KL(dense || model) of the next-token distributions on ``ids``: what recovery
    distils, and a quality measure on a random model, whose cross-entropy against random
    tokens is not (a sparse one can score below the dense one)."""
    log_p, log_q = (torch.log_softmax(logits(m, ids), dim=-1) for m in (dense, model))
    return float((log_p.exp() * (log_p - log_q)).sum(dim=-1).mean())


@pytest.mark.parametrize("sites", SITE_CHOICES)
@pytest.mark.parametrize(("scoring", "allocation"), [("wina", "greedy"), ("teal", "uniform")])
def test_full_target_is_exactly_the_dense_model(sites, scoring, allocation):
    dense = tiny_llama()  # float64
    ids = token_ids()
    sparse = neurons(
        dense, token_ids(seed=2), target_flops=1.0, sites=sites, scoring=scoring,
        allocation=allocation,
    )  # fmt: skip
    assert type(sparse).__name__ == "SparseLlamaForCausalLM"
    assert len(neuron_mlps(sparse)) == 2
    torch.testing.assert_close(logits(sparse, ids), logits(dense, ids), rtol=0, atol=1e-12)
    assert ffn_flops_fraction(sparse) == 1.0


@pytest.mark.parametrize("sites", SITE_CHOICES)
@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_measured_flops_fraction_is_the_target(sites, allocation):
    """Layer 0 is calibrated on exactly the inputs it gets, so its measured fraction is F up to
    a few calibration entries (one is ≤ 2/(3·4096) here; the model's batched matmuls may round a
    score at a threshold the other way than the calibration's): 1e-3. Layer 1 is calibrated on
    the dense model's inputs but gets those of a model whose layer 0 is sparse, so its scores
    move across its thresholds (by up to 0.005 of the FLOPs on these cases): the model-wide
    fraction is held to 0.01. On 128 held-out tokens the fraction also carries the sampling
    noise of the calibration quantiles and of the sample (up to 0.02 per layer here): 0.03."""
    target = 0.8 if sites == ("down",) else 0.55  # down alone cannot go below 2/3
    ids = token_ids(8, 16, seed=2)  # 128 calibration tokens
    dense = tiny_llama(initializer_range=0.2)  # MLPs large enough to shift the next layer
    sparse = neurons(dense, ids, target_flops=target, sites=sites, allocation=allocation)
    logits(sparse, ids)
    first = float(neuron_mlps(sparse)[0].flops_fraction.mean())
    assert first == pytest.approx(target, abs=1e-3)
    assert ffn_flops_fraction(sparse) == pytest.approx(target, abs=0.01)
    logits(sparse, token_ids(8, 16, seed=7))
    assert ffn_flops_fraction(sparse) == pytest.approx(target, abs=0.03)


@pytest.mark.parametrize("sites", [("gate_up", "down"), ("gate_up", "gate")])
def test_greedy_meets_the_target_and_is_no_worse_than_uniform(sites):
    """Same seeded model, calibration and F: greedy (per layer, the site with the least output
    error per FLOP saved) reaches F with another split of the sites than uniform, and its
    calibration loss is not higher (here it is 35-75% lower)."""
    dense = tiny_llama(initializer_range=0.2)  # MLPs that matter to the logits
    ids = token_ids(8, 16, seed=2)
    models = {
        allocation: neurons(dense, ids, target_flops=0.5, sites=sites, allocation=allocation)
        for allocation in ("uniform", "greedy")
    }
    dense_mlp_inputs = collect_mlp_inputs(dense, [m.mlp for m in dense.model.layers], ids)
    splits = {}
    for allocation, model in models.items():
        for mlp, x_SD in zip(neuron_mlps(model), dense_mlp_inputs, strict=True):
            mlp(x_SD)  # on the inputs it was calibrated on
            assert float(mlp.flops_fraction.mean()) == pytest.approx(0.5, abs=1e-3)
            assert float(mlp.flops_fraction.mean()) <= 0.5 + 1e-9
        splits[allocation] = [float(m.threshold_gate_up) for m in neuron_mlps(model)]
    assert splits["greedy"] != splits["uniform"]
    losses = {a: calibration_loss(model, dense, ids) for a, model in models.items()}
    assert 0 < losses["greedy"] <= losses["uniform"]


def _reference_forward(mlp: NeuronMLP, x_SD: torch.Tensor, sites: tuple[str, ...]):
    """The module's output, one token and one entry at a time (float64)."""
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    out = torch.zeros_like(x_SD)
    for s in range(x_SD.shape[0]):
        x = x_SD[s].clone()
        if "gate_up" in sites:
            for j in range(x.shape[0]):
                if abs(x[j]) * mlp.scale_gate_up[j] < mlp.threshold_gate_up:
                    x[j] = 0
        for i in range(gate.shape[0]):
            a = F.silu(gate[i] @ x)
            h = a * (up[i] @ x)
            if "gate" in sites and abs(a) * mlp.scale_gate[i] < mlp.threshold_gate:
                continue
            if "down" in sites and abs(h) * mlp.scale_down[i] < mlp.threshold_down:
                continue
            out[s] += h * down[:, i]
    return out


@pytest.mark.parametrize("sites", [("gate_up", "down"), ("gate_up", "gate")])
def test_wina_scores_and_masked_forward_match_a_hand_computed_reference(sites):
    torch.manual_seed(0)
    settings = SparsifyConfig(mode="neurons", sites=sites)
    mlp = NeuronMLP(6, 10, settings).double().requires_grad_(False)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()
    x_SD = torch.randn(12, 6, dtype=torch.float64)
    set_scales(mlp, x_SD, "wina")
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    for j in range(6):  # |x_j| times the norm of column j of the stacked gate and up
        norm = math.sqrt(sum(float(gate[i, j]) ** 2 + float(up[i, j]) ** 2 for i in range(10)))
        assert float(mlp.scale_gate_up[j]) == pytest.approx(norm, rel=1e-12)
        assert float(mlp.score("gate_up", x_SD)[3, j]) == pytest.approx(
            abs(float(x_SD[3, j])) * norm, rel=1e-12
        )
    for i in range(10):  # |h_i| times the norm of column i of down; gate: |silu(g_i)|·E|u_i|·that
        norm = math.sqrt(sum(float(down[d, i]) ** 2 for d in range(6)))
        mean_up = sum(abs(float(up[i] @ x_SD[s])) for s in range(12)) / 12
        assert float(mlp.scale_down[i]) == pytest.approx(norm, rel=1e-12)
        assert float(mlp.scale_gate[i]) == pytest.approx(mean_up * norm, rel=1e-12)
    with torch.no_grad():
        mlp.threshold_gate_up.fill_(float(mlp.score("gate_up", x_SD).median()))
        mlp.threshold_down.fill_(0.5)
        mlp.threshold_gate.fill_(0.5)
        out = mlp(x_SD)
    torch.testing.assert_close(out, _reference_forward(mlp, x_SD, sites), rtol=1e-12, atol=1e-12)
    set_scales(mlp, x_SD, "teal")  # |x| alone; gate-first keeps CHESS's E|u_i|
    assert bool((mlp.scale_gate_up == 1).all()) and bool((mlp.scale_down == 1).all())


def _straight_through_reference(mlp: NeuronMLP, x_SD: torch.Tensor) -> torch.Tensor:
    """The masked MLP written with the classic straight-through trick ``v + (mask(v) - v)
    .detach()``: the masked value forward, the identity backward (Q-Sparse)."""

    def through(value: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return value + (torch.where(keep, value, 0) - value).detach()

    x = through(x_SD, mlp.keep("gate_up", x_SD.detach()))
    h = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    return through(h, mlp.keep("down", h.detach())) @ mlp.down_proj.weight.T


def test_training_forward_keeps_the_masks_and_passes_gradients_straight_through():
    """With autograd on, the output is still the masked computation (bit for bit), while the
    backward treats each mask as the identity: skipped inputs and the gate/up rows of skipped
    neurons get gradients (a constant mask would give them none); the thresholds stay."""
    torch.manual_seed(0)
    mlp = NeuronMLP(6, 10, SparsifyConfig(mode="neurons")).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()
        mlp.threshold_gate_up.fill_(0.7)
        mlp.threshold_down.fill_(0.5)
    x_SD = torch.randn(12, 6, dtype=torch.float64)
    buffers = {name: b.clone() for name, b in mlp.named_buffers()}
    with torch.no_grad():
        expected = mlp(x_SD)
    assert 0 < float(mlp.keep("gate_up", x_SD).double().mean()) < 1

    x = x_SD.clone().requires_grad_(True)
    out = mlp(x)
    assert torch.equal(out, expected)
    torch.testing.assert_close(out, _reference_forward(mlp, x_SD, ("gate_up", "down")),
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    weight_SD = torch.randn_like(out)
    (out * weight_SD).sum().backward()
    grads = [x.grad, *(p.grad for p in mlp.parameters())]

    mlp.zero_grad()
    x_ref = x_SD.clone().requires_grad_(True)
    (_straight_through_reference(mlp, x_ref) * weight_SD).sum().backward()
    for got, want in zip(grads, [x_ref.grad, *(p.grad for p in mlp.parameters())], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    skipped = ~mlp.keep("gate_up", x_SD)
    assert bool((x.grad[skipped] != 0).all())  # a constant mask would leave these 0
    for name, value in mlp.named_buffers():
        assert torch.equal(value, buffers[name]), name


def test_thresholds_are_quantiles_of_the_scores():
    scores = torch.tensor([[5.0, 1.0, 7.0, 3.0], [0.0, 6.0, 2.0, 4.0]])
    assert float(quantile_threshold(scores, 0.0)) == 0.0  # keeps every score, zeros too
    assert float(quantile_threshold(scores, 0.25)) == 2.0  # 0 and 1 fall below it
    assert float(quantile_threshold(scores, 0.5)) == 4.0
    assert quantile_threshold(scores, 1.0) == math.inf
    torch.manual_seed(0)
    mlp = NeuronMLP(HIDDEN, FFN, SparsifyConfig(mode="neurons", target_flops=0.6)).double()
    x_SD = torch.randn(50, HIDDEN, dtype=torch.float64)
    dense = tuple(torch.randn(shape, dtype=torch.float64) for shape in
                  ((FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN)))  # fmt: skip
    levels = convert_layer(mlp, dense, x_SD, mlp.settings)
    kept = mlp.keep("gate_up", x_SD).double().mean()
    assert float(kept) == pytest.approx(1 - levels["gate_up"], abs=1 / x_SD.numel())


def test_bad_options_raise_named_errors():
    dense = tiny_llama()
    ids = token_ids()
    for value in (0, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ConfigError, match=rf"target_flops={value!r} is invalid.*\(0, 1\]"):
            neurons(dense, ids, target_flops=value)
    for sites in (("up",), (), ("down", "down"), "down"):
        with pytest.raises(ConfigError, match=r"sites=.* is invalid: sites must be one or more"):
            neurons(dense, ids, sites=sites)
    with pytest.raises(ConfigError, match="give 'down' or 'gate', not both"):
        neurons(dense, ids, sites=("gate", "down"))
    with pytest.raises(ConfigError, match=r"target_flops=0.5 is unreachable .*'down'.* 0.6667"):
        neurons(dense, ids, sites=("down",))
    with pytest.raises(ConfigError, match=r"scoring='cats' is invalid.*\('teal', 'wina'\)"):
        neurons(dense, ids, scoring="cats")
    with pytest.raises(ConfigError, match=r"allocation='best' is invalid"):
        neurons(dense, ids, allocation="best")
    with pytest.raises(ConfigError, match=r"mode='blocks' is invalid"):
        sparsify(dense, calibration=ids, mode="blocks")
    with pytest.raises(ConfigError, match=r"expert_size=8 is invalid with mode='neurons'"):
        sparsify(dense, 8, calibration=ids, mode="neurons")
    with pytest.raises(ConfigError, match=r"active_fraction=0.5 is invalid with mode='neurons'"):
        neurons(dense, ids, active_fraction=0.5)
    with pytest.raises(ValueError, match=r"mode='neurons' needs calibration token ids"):
        sparsify(dense, mode="neurons")
    with pytest.raises(ConfigError, match=r"expert_size is required with mode='experts'"):
        sparsify(dense, router="oracle")  # the experts mode still needs its size


def test_cli_names_bad_neuron_options(tmp_path, capsys):
    model_dir, _ = dense_directory(tmp_path)
    capsys.readouterr()  # saving the model printed a progress bar
    argv = ["sparsify", str(model_dir), "--out", str(tmp_path / "o"), "--mode", "neurons"]
    assert main([*argv, "--target-flops", "1.5"]) == 1
    assert capsys.readouterr().err == (
        "xmoe: error: target_flops=1.5 is invalid: target_flops must be a number in (0, 1]\n"
    )
    assert main([*argv, "--expert-size", "8"]) == 1
    assert "xmoe: error: expert_size=8 is invalid with mode='neurons'" in capsys.readouterr().err
    assert main(argv[:4]) == 1  # the experts mode (the default) without --expert-size
    assert "xmoe: error: expert_size is required with mode='experts'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # a site that is not a choice: argparse's usage
        main([*argv, "--sites", "gate_up", "up"])
    assert exited.value.code == 2
    assert "argument --sites: invalid choice: 'up'" in capsys.readouterr().err


def test_cli_neurons_end_to_end(tmp_path, capsys):
    model_dir, text = dense_directory(tmp_path)
    out = tmp_path / "sparse"
    argv = ["sparsify", str(model_dir), "--out", str(out), "--mode", "neurons"]
    argv += ["--target-flops", "0.6", "--sites", "gate_up", "gate", "--scoring", "teal"]
    argv += ["--calibration-text", str(text), "--calibration-tokens", "256", "--seq-len", "32"]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 MLPs -> neuron thresholds at sites gate_up+gate (teal scoring, greedy" in printed
    loaded = load_sparsified(out)
    assert loaded.config.xmoe_sparsify["sites"] == ["gate_up", "gate"]
    assert float(neuron_mlps(loaded)[0].threshold_gate) > 0


def _mlp_weights(directory) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_sparsified(directory).state_dict().items() if ".mlp." in k}


def test_cli_recovery_resumes_an_interrupted_run_bit_for_bit(tmp_path, capsys, monkeypatch):
    """``--recovery-tokens`` recovers after the conversion; Ctrl-C at the third step leaves the
    step-2 checkpoint beside ``--out`` (and no output), a rerun resumes from it to the same
    weights as a straight run, and the checkpoint goes once the output is written."""
    import xmoe.conversion.recovery as recovery

    model_dir, text = dense_directory(tmp_path)
    argv = ["sparsify", str(model_dir), "--mode", "neurons", "--allocation", "uniform"]
    argv += ["--calibration-text", str(text), "--calibration-tokens", "256", "--seq-len", "32"]
    argv += ["--no-progress", "--target-flops", "0.6"]
    recovering = ["--recovery-tokens", "256", "--recovery-batch-size", "2"]
    recovering += ["--recovery-seq-len", "32", "--recovery-lr", "1e-3"]
    recovering += ["--recovery-checkpoint-every", "1"]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert main([*argv, *recovering, "--out", str(tmp_path / "straight")]) == 0
    printed = capsys.readouterr().out
    assert "recovered: 4 steps of 2×32 tokens" in printed
    assert "thresholds re-solved on the recovered weights" in printed
    assert not list(tmp_path.glob("*.recovery*"))  # the checkpoint removed after the write
    plain, straight = _mlp_weights(tmp_path / "plain"), _mlp_weights(tmp_path / "straight")
    for name, value in plain.items():  # the scales as calibrated; weights and thresholds moved
        unused = name.endswith("threshold_gate")  # not a site of the default sites: 0 in both
        assert torch.equal(value, straight[name]) == ("scale" in name or unused), name
    recovered = load_sparsified(tmp_path / "straight")  # on F on its calibration windows
    windows = calibration_windows(model_dir, 256, 32, text)
    inputs = collect_mlp_inputs(recovered, neuron_mlps(recovered), windows)
    for mlp, x_SD in zip(neuron_mlps(recovered), inputs, strict=True):
        mlp(x_SD)
        assert float(mlp.flops_fraction.mean()) == pytest.approx(0.6, abs=1e-3)

    real_step, calls = recovery.train_step, []

    def interrupted(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(None)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(recovery, "train_step", interrupted)
    out = tmp_path / "resumed"
    assert main([*argv, *recovering, "--out", str(out)]) == 130
    checkpoint = tmp_path / "resumed.recovery.safetensors"
    assert checkpoint.is_file() and not out.exists()
    monkeypatch.setattr(recovery, "train_step", real_step)
    other = [*argv, *recovering, "--target-flops", "0.7", "--out", str(tmp_path / "other")]
    assert main([*other, "--recovery-checkpoint", str(checkpoint)]) == 1
    assert "was written for another conversion" in capsys.readouterr().err
    assert main([*argv, *recovering, "--out", str(out)]) == 0
    resumed = _mlp_weights(out)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    assert not checkpoint.exists()


def test_cli_names_bad_recovery_options(tmp_path, capsys):
    argv = ["sparsify", str(tmp_path), "--out", str(tmp_path / "o"), "--mode", "neurons"]
    assert main([*argv, "--recovery-lr", "0.1"]) == 1
    assert capsys.readouterr().err == (
        "xmoe: error: --recovery-lr needs --recovery-tokens N, the recovery's token budget\n"
    )
    assert main([*argv, "--recovery-tokens", "100"]) == 1
    assert "xmoe: error: tokens=100 is invalid: tokens must be at least one step of " in (
        capsys.readouterr().err
    )


def test_save_load_same_logits_then_generate(tmp_path):
    dense = tiny_llama(torch.float32, tie_word_embeddings=True)
    ids = token_ids()
    sparse = neurons(dense, token_ids(seed=2), target_flops=0.6, sites=("gate_up", "gate"))
    expected = logits(sparse, ids)
    sparse.save_pretrained(tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())["xmoe_sparsify"]
    assert recorded["mode"] == "neurons" and recorded["target_flops"] == 0.6
    loaded = load_sparsified(tmp_path)
    assert [float(m.threshold_gate_up) for m in neuron_mlps(loaded)] == [
        float(m.threshold_gate_up) for m in neuron_mlps(sparse)
    ]  # the thresholds are buffers in the weight file
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)

    from transformers import AutoModelForCausalLM

    register()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(auto, ids), expected, rtol=0, atol=0)
    out = loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 10)
    uncached = loaded.generate(
        ids[:1, :4], max_new_tokens=6, do_sample=False, eos_token_id=None, use_cache=False
    )
    assert torch.equal(out, uncached)  # per-token masks: the cached decode picks the same

    recorded["target_flops"] = 0.3  # the thresholds were calibrated for 0.6
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"xmoe_sparsify": recorded}))
    with pytest.raises(DamagedFileError, match=r"xmoe_sparsify.target_flops=0.3"):
        load_sparsified(tmp_path)
