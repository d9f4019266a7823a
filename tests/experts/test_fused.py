"""The fused expert-FFN seam (``xmoe.registry.EXPERT_FFN``): every registered implementation
matches the float64 reference through the layer, and a new one is one class plus one registry
entry, chosen by name in the config."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from xmoe import MoEConfig
from xmoe.experts import ExpertFFN
from xmoe.experts.fused import choose_expert_ffn
from xmoe.kernels import ffn as kernel_ffn
from xmoe.registry import EXPERT_FFN

from helpers import assert_close_grads, make_layer, register_for_test, run_both


def check_expert_ffn(impl: str, activation: str, bias: bool) -> None:
    """Forward and every gradient of a float64 layer computing its experts with ``impl``, against
    ``tests/reference.py``, with capacity drops and tokens wanting different numbers of experts.
    Skipped for an implementation that does not run float64 on the CPU here (``"triton"``
    without triton's interpreter: ``tests/kernels`` turns it on)."""
    if not EXPERT_FFN[impl].supports(torch.float64, torch.device("cpu"), 1, 12, 6):
        pytest.skip(f"expert_ffn={impl!r} does not run here: {EXPERT_FFN[impl].requirement}")
    config = MoEConfig(
        d_model=12,
        num_experts=6,
        d_expert=6,
        capacity_factor=1.0,
        activation=activation,
        bias=bias,
        expert_ffn=impl,
    )
    x = torch.randn(20, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out, ref, layer_grads, ref_grads = run_both(make_layer(config), x)
    torch.testing.assert_close(out.hidden_states, ref.hidden_states, rtol=1e-10, atol=1e-12)
    assert_close_grads(layer_grads, ref_grads, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("impl", sorted(EXPERT_FFN))
def test_every_registered_expert_ffn_matches_the_reference(impl, activation, bias):
    """Registering an expert FFN puts it under this test."""
    check_expert_ffn(impl, activation, bias)


def _activation(name: str, h_F: torch.Tensor) -> torch.Tensor:
    if name == "swiglu":
        gate_H, up_H = h_F.chunk(2, dim=-1)
        return F.silu(gate_H) * up_H
    return getattr(F, name)(h_F)


class _PairLoopFFN(ExpertFFN):
    """A toy expert FFN, one file's worth: one pair at a time in plain autograd ops, float64
    only. Counts its calls."""

    requirement = "the pair loop runs float64 only"
    calls: ClassVar[int] = 0

    @classmethod
    def supports(cls, dtype, device, num_pairs, d_model, d_expert) -> bool:
        return dtype == torch.float64

    @classmethod
    def forward(cls, x_SD, weights, plan, weight_N, backend):
        cls.calls += 1
        rows = []
        pairs = zip(plan.token_idx_N.tolist(), plan.expert_idx_N.tolist(), strict=True)
        for n, (token, expert) in enumerate(pairs):
            h_F = x_SD[token] @ weights.w1[expert]
            if weights.b1 is not None:
                h_F = h_F + weights.b1[expert]
            y_D = _activation(weights.activation, h_F) @ weights.w2[expert]
            if weights.b2 is not None:
                y_D = y_D + weights.b2[expert]
            rows.append(weight_N[n] * y_D)
        out_SD = x_SD.new_zeros(plan.num_tokens, x_SD.shape[1])
        return out_SD.index_add(0, plan.token_idx_N, torch.stack(rows)) if rows else out_SD


def test_a_registered_expert_ffn_is_chosen_by_name_used_and_under_test(monkeypatch):
    """One class plus one registry entry: a valid ``expert_ffn``, run by the layer (decode-sized
    inference calls included: a named implementation runs every call), matching the reference;
    operands it does not support raise instead of silently running another."""
    register_for_test(monkeypatch, EXPERT_FFN, "pairloop", _PairLoopFFN)
    _PairLoopFFN.calls = 0
    check_expert_ffn("pairloop", "swiglu", bias=True)
    assert _PairLoopFFN.calls == 1
    config = MoEConfig(d_model=12, num_experts=6, d_expert=6, expert_ffn="pairloop")
    layer = make_layer(config).eval()
    with torch.no_grad():
        layer(torch.randn(1, 12, dtype=torch.float64))
    assert _PairLoopFFN.calls == 2
    with pytest.raises(ValueError, match=r"expert_ffn='pairloop' cannot run dtype=torch.float32"):
        layer.float()(torch.randn(3, 12))


def test_an_unknown_expert_ffn_is_refused_by_name():
    with pytest.raises(
        ValueError, match=r"expert_ffn.*'nope'.*one of \('auto', 'triton', 'xmoe'\)"
    ):
        MoEConfig(d_model=12, num_experts=6, d_expert=6, expert_ffn="nope")


def test_auto_takes_the_triton_kernels_on_cuda_where_triton_is_installed(monkeypatch):
    """The selection rule with a faked device and availability (no GPU, no triton needed):
    CUDA with triton and a dtype the kernels run; the plain path for any other call, the CPU
    included even where the interpreter would run the kernels."""
    cuda, cpu, sizes = torch.device("cuda"), torch.device("cpu"), (8, 24, 10)
    monkeypatch.setattr(kernel_ffn, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_expert_ffn(torch.bfloat16, cuda, *sizes) == "triton"
    assert choose_expert_ffn(torch.float32, cuda, *sizes) == "triton"
    assert choose_expert_ffn(torch.float64, cuda, *sizes) == "xmoe"  # not a kernel dtype
    assert choose_expert_ffn(torch.float64, cpu, *sizes) == "xmoe"
    monkeypatch.setattr(kernel_ffn, "triton_available", lambda: False)
    assert choose_expert_ffn(torch.bfloat16, cuda, *sizes) == "xmoe"


class _AutoPairLoopFFN(_PairLoopFFN):
    """The toy pair loop, preferred by ``"auto"`` on the CPU."""

    auto_devices: ClassVar[frozenset[str]] = frozenset({"cpu"})


def test_the_layer_runs_what_auto_chooses_unless_a_name_overrides_it(monkeypatch):
    """``"auto"`` is the default: the layer runs an implementation preferred on its device when
    it supports the call (float64 here), else ``"xmoe"`` (float32); ``expert_ffn="xmoe"``, or
    an engine named in ``backend``, runs the plain path even where another is preferred."""
    register_for_test(monkeypatch, EXPERT_FFN, "pairloop", _AutoPairLoopFFN)
    _AutoPairLoopFFN.calls = 0
    config = MoEConfig(d_model=12, num_experts=6, d_expert=6)
    assert config.expert_ffn == "auto"
    x = torch.randn(5, 12, dtype=torch.float64)
    make_layer(config)(x)
    assert _AutoPairLoopFFN.calls == 1
    make_layer(config).float()(x.float())
    make_layer(dataclasses.replace(config, expert_ffn="xmoe"))(x)
    make_layer(dataclasses.replace(config, backend="loop"))(x)
    assert _AutoPairLoopFFN.calls == 1
