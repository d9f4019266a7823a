"""The decode path (a handful of tokens at inference, experts used in place) against the
float64 reference, and the conditions under which the layer takes it."""

from __future__ import annotations

import pytest
import torch

from xmoe import MoEConfig
from xmoe.experts import decode

from helpers import make_layer, use_host_reads
from reference import layer_params, reference_forward

CASES = [
    # (router, num_tokens, extra config)
    ("threshold", 1, {}),
    ("threshold", 8, {}),
    ("threshold", 5, {"threshold": 0.5, "renormalize": True}),
    ("threshold", 4, {"threshold": 1.0}),
    ("topk", 1, {"top_k": 1}),
    ("topk", 7, {"top_k": 3}),
    ("topk", 6, {"top_k": 2, "renormalize": True}),
]


def _decode_calls(monkeypatch, max_tokens: int | None = 64) -> list[int]:
    """Records the token count of every call that takes the decode path, taken up to
    ``max_tokens`` tokens (None: the library's own limit)."""
    if max_tokens is not None:
        monkeypatch.setattr(decode, "DECODE_MAX_TOKENS", max_tokens)
    calls = []
    real = decode.decode_ffn

    def record(x_SD, *args):
        calls.append(x_SD.shape[0])
        return real(x_SD, *args)

    monkeypatch.setattr(decode, "decode_ffn", record)
    return calls


@pytest.mark.parametrize("router,num_tokens,extra", CASES)
@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu", False), ("swiglu", True)])
def test_matches_reference_float64(monkeypatch, router, num_tokens, extra, activation, bias):
    calls = _decode_calls(monkeypatch)
    config = MoEConfig(
        d_model=12, num_experts=10, d_expert=6, router=router, activation=activation,
        bias=bias, **extra,
    )  # fmt: skip
    layer = make_layer(config, seed=num_tokens).eval()
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    ref = reference_forward(config, layer_params(layer), x)
    with torch.no_grad():
        out = layer(x)
    assert calls == [num_tokens]
    torch.testing.assert_close(
        out.hidden_states, ref.hidden_states.detach(), rtol=1e-10, atol=1e-12
    )
    assert out.routing.wanted_per_token.tolist() == [len(w) for w in ref.wanted]
    assert out.routing.kept_per_token.tolist() == [len(w) for w in ref.wanted]
    load = [sum(e in w for w in ref.wanted) for e in range(config.num_experts)]
    assert out.routing.expert_load.tolist() == load
    assert float(out.routing.flops_per_token) == pytest.approx(ref.flops_per_token)
    assert float(out.aux_loss) == 0.0


def test_tied_probabilities_and_shared_experts():
    """Experts with identical router rows tie; tokens that share experts take the grouped
    branch (several rows per expert)."""
    config = MoEConfig(d_model=8, num_experts=6, d_expert=4, router="topk", top_k=3)
    layer = make_layer(config, seed=3).eval()
    with torch.no_grad():
        layer.router.weight[1] = layer.router.weight[4]
        layer.router.weight[2] = layer.router.weight[4]
    x = torch.randn(1, 8, dtype=torch.float64).repeat(6, 1)  # six identical tokens
    ref = reference_forward(config, layer_params(layer), x)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(
        out.hidden_states, ref.hidden_states.detach(), rtol=1e-10, atol=1e-12
    )
    assert out.routing.expert_load.max().item() == 6


def test_equals_the_plan_path_in_fp32(monkeypatch):
    calls = _decode_calls(monkeypatch)
    config = MoEConfig(d_model=32, num_experts=16, d_expert=16, activation="swiglu")
    layer = make_layer(config, dtype=torch.float32, router_std=0.3).eval()
    x = torch.randn(8, 32)
    with torch.no_grad():
        fast = layer(x).hidden_states
    planned = layer(x.requires_grad_(True)).hidden_states  # gradients wanted: the plan path
    assert calls == [8]
    torch.testing.assert_close(fast, planned.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "setting,taken",
    [
        ({}, True),
        ({"num_tokens": decode.DECODE_MAX_TOKENS + 1}, False),
        ({"num_tokens": 0}, False),
        ({"backend": "grouped"}, False),
        ({"grad": True}, False),
        ({"capacity_at_eval": True}, False),
        ({"host_reads": False}, False),
        ({"training": True}, False),
    ],
)
def test_taken_only_for_small_dropless_inference_calls(monkeypatch, setting, taken):
    calls = _decode_calls(monkeypatch, max_tokens=None)
    use_host_reads(monkeypatch, setting.get("host_reads", True))
    config = MoEConfig(
        d_model=16, num_experts=8, d_expert=16, backend=setting.get("backend", "auto"),
        capacity_factor=1.0, capacity_at_eval=setting.get("capacity_at_eval", False),
    )  # fmt: skip
    layer = make_layer(config, dtype=torch.float32).train(setting.get("training", False))
    x = torch.randn(setting.get("num_tokens", decode.DECODE_MAX_TOKENS), 16)
    with torch.set_grad_enabled(setting.get("grad", False)):
        layer(x)
    assert bool(calls) is taken


def test_bf16_autocast_runs_in_bf16(monkeypatch):
    calls = _decode_calls(monkeypatch)
    config = MoEConfig(d_model=16, num_experts=8, d_expert=16)
    layer = make_layer(config, dtype=torch.float32).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = layer(x).hidden_states
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x).hidden_states
    assert calls == [3, 3] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=5e-2, atol=5e-2)
