"""THOR's stochastic experts: random experts per batch in training and per token (or the
ensemble) at inference, against a per-token reference; no router and no router FLOPs; the
two-pass symmetric-KL consistency loss of the training step, and that it makes the random passes
agree; an empty call stays on the autograd graph."""

from __future__ import annotations

import pytest
import torch

from xmoe import ConfigError, MoEConfig
from xmoe.dispatch import ENGINES
from xmoe.models import TransformerLM
from xmoe.models.loss import symmetric_kl_per_position
from xmoe.training.presets import preset
from xmoe.training.step import lm_step_loss

from helpers import assert_close_grads, make_layer, train_tiny_lm, use_host_reads
from reference import _expert, layer_params


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor):
    """The reference: ``½ [KL(p_a ‖ p_b) + KL(p_b ‖ p_a)]`` of the softmaxes of (..., V)
    logits, in fp32, averaged over the positions where ``mask`` is True."""
    log_a, log_b = logits_a.float().log_softmax(-1), logits_b.float().log_softmax(-1)
    per_position = symmetric_kl_per_position(log_a, log_b)
    return per_position[mask].sum() / mask.sum().clamp_min(1)


def _config(**fields) -> MoEConfig:
    return MoEConfig(d_model=16, num_experts=6, d_expert=8, router="thor", **fields)


def _check_against_reference(layer, x, expected_experts):
    """The layer's output and gradients equal Σ_e FFN_e(x_s) / k over each token's experts
    ``expected_experts[s]``, one token at a time in float64."""
    params = layer_params(layer)
    x_ref = x.detach().double().requires_grad_(True)
    rows = [
        sum(_expert(params, layer.config, e, x_ref[s]) for e in experts) / len(experts)
        for s, experts in enumerate(expected_experts)
    ]
    x_layer = x.detach().clone().requires_grad_(True)
    routed = layer.route(x_layer)
    got = routed.pairs.selection.expert_idx_SK.tolist()
    assert [sorted(g) for g in got] == [sorted(e) for e in expected_experts]
    out = layer.compute(x_layer, routed)
    cotangent = torch.randn(out.shape, dtype=torch.float64)
    (torch.stack(rows) * cotangent).sum().backward()
    (out.double() * cotangent).sum().backward()
    tol = (
        {"rtol": 1e-9, "atol": 1e-11} if x.dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    )
    torch.testing.assert_close(out.double(), torch.stack(rows).detach(), **tol)
    layer_grads = {"x": x_layer.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    assert_close_grads(
        layer_grads, {"x": x_ref.grad, **{n: p.grad for n, p in params.items()}}, **tol
    )


@pytest.mark.parametrize("path", ["auto", "sync_free", *sorted(ENGINES)])
@pytest.mark.parametrize("num_tokens", [1, 20])
def test_training_sends_the_whole_batch_to_one_random_expert(monkeypatch, path, num_tokens):
    use_host_reads(monkeypatch, path != "sync_free")
    backend = "auto" if path in ("auto", "sync_free") else path
    dtype = torch.float64 if path in ("auto", "sync_free", "loop") else torch.float32
    layer = make_layer(_config(backend=backend), dtype=dtype, seed=num_tokens)
    x = torch.randn(num_tokens, 16, dtype=dtype)
    torch.manual_seed(3)
    expert = int(torch.randint(6, (1, 1)))  # the draw the router will make
    torch.manual_seed(3)
    _check_against_reference(layer, x, [[expert]] * num_tokens)


def test_training_draws_cover_every_expert_and_cost_no_router():
    layer = make_layer(_config())
    x = torch.randn(8, 16, dtype=torch.float64)
    chosen = set()
    for _ in range(40):
        out = layer(x)
        assert out.routing.expert_load.tolist().count(8) == 1  # one expert takes all tokens
        chosen.add(int(out.routing.expert_load.argmax()))
        assert out.aux_losses == {} and float(out.aux_loss) == 0.0
    assert chosen == set(range(6))
    assert float(out.routing.flops_per_token) == layer.config.expert_flops  # router: 0 FLOPs
    assert layer.config.router_flops == 0
    assert not any(name.startswith("router") for name, _ in layer.named_parameters())


@pytest.mark.parametrize("path", ["decode", "auto", "sync_free", "loop"])
def test_random_inference_picks_one_expert_per_token(monkeypatch, path):
    use_host_reads(monkeypatch, path != "sync_free")
    layer = make_layer(_config(backend="loop" if path == "loop" else "auto"), seed=2).eval()
    num_tokens = 1 if path == "decode" else 30
    x = torch.randn(num_tokens, 16, dtype=torch.float64)
    torch.manual_seed(4)
    draws = torch.randint(6, (num_tokens, 1)).tolist()
    torch.manual_seed(4)
    _check_against_reference(layer, x, draws)
    if num_tokens > 1:
        assert len({d[0] for d in draws}) > 3  # per token, not per batch


@pytest.mark.parametrize("path", ["decode", "auto", *sorted(ENGINES)])
def test_ensemble_inference_averages_every_expert(monkeypatch, path):
    use_host_reads(monkeypatch, True)
    backend = "auto" if path in ("decode", "auto") else path
    dtype = torch.float64 if path in ("decode", "auto", "loop") else torch.float32
    config = _config(backend=backend, router_options={"inference": "ensemble"})
    layer = make_layer(config, dtype=dtype, seed=5).eval()
    num_tokens = 1 if path == "decode" else 9
    x = torch.randn(num_tokens, 16, dtype=dtype)
    _check_against_reference(layer, x, [list(range(6))] * num_tokens)
    with torch.no_grad():
        flops = float(layer(x).routing.flops_per_token)
    assert flops == 6 * config.expert_flops


@pytest.mark.parametrize("train", [True, False])
def test_an_empty_call_stays_on_the_autograd_graph(train):
    """No token reaches the layer: its empty output and zero aux loss still hang on the input's
    graph (as a learned router's do), so a backward through them alone runs."""
    layer = make_layer(_config(), seed=1).train(train)
    x = torch.randn(0, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.hidden_states.shape == (0, 16) and out.aux_loss.requires_grad
    (out.hidden_states.sum() + out.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == (0, 16)


def test_symmetric_kl_matches_the_formula():
    a, b = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    p, q = a.softmax(-1), b.softmax(-1)
    kl_pq = (p * (p.log() - q.log())).sum(-1)
    kl_qp = (q * (q.log() - p.log())).sum(-1)
    expected = (0.5 * (kl_pq + kl_qp))[mask].mean()
    torch.testing.assert_close(symmetric_kl(a, b, mask), expected)
    assert float(symmetric_kl(a, a, mask)) == pytest.approx(0.0, abs=1e-7)


def _tiny_lm(**router_options) -> TransformerLM:
    config = preset("tiny").model
    fields = {"router": "thor", "router_options": router_options, "capacity_factor": None}
    moe = config.moe.__class__(**config.moe.to_dict() | fields)
    torch.manual_seed(0)
    return TransformerLM(config.__class__(**{**config.to_dict(), "moe": moe}))


def test_the_step_runs_two_passes_and_adds_the_consistency_loss():
    model = _tiny_lm(consistency_coef=2.0).train()
    x = torch.randint(64, (2, 16))
    y = torch.randint(64, (2, 16))
    y[0, :4] = -100  # ignored positions are left out of the consistency loss too
    torch.manual_seed(9)
    first, second = model(x, y), model(x, y)
    torch.manual_seed(9)
    parts = lm_step_loss(model, x, y)
    expected = 0.5 * 2.0 * symmetric_kl(first.logits, second.logits, y != -100)
    assert float(expected.detach()) > 0  # the two passes drew different experts
    torch.testing.assert_close(parts.loss, (first.loss + second.loss) / 2)
    torch.testing.assert_close(parts.aux_losses["consistency"], expected)
    torch.testing.assert_close(parts.aux_loss, expected)


def test_each_pass_takes_one_log_softmax_for_its_loss_and_the_consistency():
    model = _tiny_lm(consistency_coef=2.0).train()
    x = torch.randint(64, (2, 16))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        lm_step_loss(model, x, x)
    log_softmaxes = [event for event in profile.events() if event.name == "aten::_log_softmax"]
    assert len(log_softmaxes) == 2  # not one for the cross-entropy and one for the KL each


def test_without_the_consistency_loss_the_step_is_one_pass():
    model = _tiny_lm(consistency_coef=0.0).train()
    x = torch.randint(64, (2, 16))
    torch.manual_seed(9)
    once = model(x, x)
    torch.manual_seed(9)
    parts = lm_step_loss(model, x, x)
    torch.testing.assert_close(parts.loss, once.loss)
    assert parts.aux_losses == {}


def _disagreement(model, data, draws: int = 16) -> tuple[float, float]:
    """Over ``draws`` training-mode passes on validation tokens (each draws its experts):
    the mean symmetric KL between pairs of passes, and the spread (std) of their losses."""
    x = torch.as_tensor(data.val[: 8 * 17].astype("int64")).view(8, 17)
    model.train()
    torch.manual_seed(123)
    with torch.no_grad():
        outs = [model(x[:, :-1], x[:, 1:]) for _ in range(draws)]
    everywhere = torch.ones(8, 16, dtype=torch.bool)
    pairs = zip(outs[::2], outs[1::2], strict=True)
    kls = [symmetric_kl(a.logits, b.logits, everywhere) for a, b in pairs]
    return float(torch.stack(kls).mean()), float(torch.stack([o.loss for o in outs]).std())


def test_the_consistency_loss_shrinks_the_disagreement_between_random_passes():
    """THOR's defining property (spec §11: the consistency term makes the random experts agree;
    the val loss varies less across expert choices than with α = 0): the same model, batches
    and steps with α = 5 (THOR's) against α = 0. Measured at 15 steps over seeds 0-5: the
    pairs' KL falls 7-27x and the loss spread 1.6-15x; asserted with margin on seed 0."""
    runs = {}
    for coef in (0.0, 5.0):
        model, _, data = train_tiny_lm(
            15, **{"model.num_layers": 1, "model.moe_every": 1, "moe.num_experts": 4,
                   "batch_size": 4, "seq_len": 16, "lr": 2e-2, "moe.router": "thor",
                   "moe.capacity_factor": "none", "moe.router_options.consistency_coef": coef},
        )  # fmt: skip
        runs[coef] = _disagreement(model, data)
    (kl_free, spread_free), (kl_thor, spread_thor) = runs[0.0], runs[5.0]
    assert kl_thor < kl_free / 4
    assert spread_thor < spread_free


def test_trains_in_the_language_model():
    model, _, data = train_tiny_lm(3, **{"moe.router": "thor", "moe.capacity_factor": "none"})
    x = torch.as_tensor(data.val[:33].astype("int64")).view(1, -1)
    parts = lm_step_loss(model.train(), x[:, :-1], x[:, 1:])
    assert torch.isfinite(parts.loss) and set(parts.aux_losses) == {"consistency"}


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"consistency_coef": -1}, "router_options.consistency_coef=-1 is invalid"),
        ({"consistency_coef": float("inf")}, "router_options.consistency_coef=inf is invalid"),
        ({"inference": "sentence"}, "router_options.inference='sentence' is invalid"),
        ({"entropy_coef": 0.1}, "router_options.entropy_coef=0.1 is invalid"),
    ],
)
def test_bad_options_are_named(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _config(router_options=options)


def test_capacity_is_refused():
    """A training batch goes to one expert, so any capacity would drop most of it."""
    with pytest.raises(ConfigError, match=r"capacity_factor=1.0 is invalid.*router='thor'"):
        _config(capacity_factor=1.0)
