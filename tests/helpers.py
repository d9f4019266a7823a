"""Shared test helpers: build layers with peaked routers and compare them to the reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from xmoe import MoEConfig, MoELayer

from reference import layer_params, reference_forward


def use_host_reads(monkeypatch, host_reads: bool) -> None:
    """Run the CPU path (host reads allowed) or, with False, the sync-free path that devices
    other than the CPU take (tensor-only plan, segment operations and threshold ranking)."""
    from xmoe import device

    if not host_reads:
        monkeypatch.setattr(device, "HOST_READ_DEVICES", frozenset())


def decode_calls_of(monkeypatch) -> list[int]:
    """A list that gets a 1 for each call of the decode path's ``decode_ffn`` (host reads
    allowed, as on the CPU)."""
    from xmoe.experts import decode

    use_host_reads(monkeypatch, True)
    calls: list[int] = []
    real_decode_ffn = decode.decode_ffn
    monkeypatch.setattr(decode, "decode_ffn", lambda *a: calls.append(1) or real_decode_ffn(*a))
    return calls


def register_for_test(monkeypatch, registry, name: str, entry) -> None:
    """``registry.register(name)(entry)`` until the test ends (the built-ins imported first, so
    that restoring the entries loses none of them)."""
    for known in registry:
        registry[known]
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    registry.register(name)(entry)


def make_layer(config: MoEConfig, dtype=torch.float64, router_std: float = 1.0, seed: int = 0):
    """A layer whose router is peaked enough that tokens want different numbers of experts."""
    torch.manual_seed(seed)
    layer = MoELayer(config)
    with torch.no_grad():
        if layer.router.has_weight:  # THOR has no router
            layer.router.weight.normal_(0.0, router_std)
        for name, p in layer.experts.named_parameters():
            p.normal_(0.0, 0.3 if name.startswith("w") else 0.1)
    return layer.to(dtype)


def run_both(layer: MoELayer, x: torch.Tensor, aux_weight: float = 3.0, seed: int = 1):
    """Forward+backward through the layer and the reference on the same x and cotangent.

    Returns (layer output, reference output, layer grads, reference grads); grads are dicts
    keyed by parameter name plus ``"x"``.
    """
    params = layer_params(layer)
    x_ref = x.detach().to(torch.float64).requires_grad_(True)
    ref = reference_forward(layer.config, params, x_ref)

    x_layer = x.detach().to(layer.experts.w1.dtype).requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = layer(x_layer)

    generator = torch.Generator().manual_seed(seed)
    cotangent = torch.randn(ref.hidden_states.shape, generator=generator, dtype=torch.float64)
    (ref.hidden_states * cotangent).sum().add(aux_weight * ref.aux_loss).backward()
    hidden = out.hidden_states.reshape(-1, layer.config.d_model)
    (hidden.double() * cotangent).sum().add(aux_weight * out.aux_loss.double()).backward()

    ref_grads = {"x": x_ref.grad, **{n: p.grad for n, p in params.items()}}
    layer_grads = {"x": x_layer.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    return out, ref, layer_grads, ref_grads


def assert_close_grads(layer_grads, ref_grads, rtol, atol):
    assert layer_grads.keys() == ref_grads.keys()
    for name, ref_grad in ref_grads.items():
        got = layer_grads[name]
        if ref_grad is None:
            assert got is None or torch.count_nonzero(got) == 0, name
            continue
        assert got is not None, f"no gradient for {name}"
        torch.testing.assert_close(got.double(), ref_grad, rtol=rtol, atol=atol, msg=name)


def check_against_reference(layer, x, rtol, atol):
    """:func:`run_both`, then the layer's output, aux loss, statistics, FLOPs and gradients
    against the reference's; returns the layer's output."""
    out, ref, layer_grads, ref_grads = run_both(layer, x)
    torch.testing.assert_close(out.hidden_states.double(), ref.hidden_states, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.aux_loss.double(), ref.aux_loss, rtol=rtol, atol=atol)
    assert out.routing.wanted_per_token.tolist() == [len(w) for w in ref.wanted]
    assert out.routing.kept_per_token.tolist() == [len(k) for k in ref.kept]
    load = [sum(e in k for k in ref.kept) for e in range(layer.config.num_experts)]
    assert out.routing.expert_load.tolist() == load
    assert float(out.routing.flops_per_token) == pytest.approx(ref.flops_per_token)
    assert_close_grads(layer_grads, ref_grads, rtol=rtol * 10, atol=atol * 10)
    return out


def train_then_round_trip(save_dir, moe_overrides: dict) -> None:
    """Three training steps of the ``tiny`` preset's model with ``moe.<field>`` overrides
    (loss falls, routers adapt), then the model through the transformers classes: saved and
    loaded it gives the same logits, and generating with the KV cache (one-token MoE calls)
    equals generating without it."""
    from transformers import AutoModelForCausalLM

    from xmoe.hf.export import hf_model_from_lm
    from xmoe.models import TransformerLM
    from xmoe.training.config import apply_overrides
    from xmoe.training.presets import preset

    overrides = [f"moe.{key}={value}" for key, value in moe_overrides.items()]
    config = apply_overrides(preset("tiny"), overrides).model
    torch.manual_seed(0)
    lm = TransformerLM(config)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    ids = torch.randint(1, config.vocab_size, (4, 17))
    losses = []
    for _ in range(3):
        out = lm(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        (out.loss + out.aux_loss).backward()
        optimizer.step()
        lm.end_training_step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    hf_model_from_lm(lm.eval()).save_pretrained(save_dir)
    model = AutoModelForCausalLM.from_pretrained(save_dir).eval()
    assert torch.equal(model(ids).logits, lm(ids).logits)
    common = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    prompt, mask = ids[:2, :6], torch.ones(2, 6, dtype=torch.long)
    cached = model.generate(prompt, attention_mask=mask, use_cache=True, **common)
    assert torch.equal(
        cached, model.generate(prompt, attention_mask=mask, use_cache=False, **common)
    )


def train_tiny_lm(steps: int, seed: int = 0, **overrides):
    """A ``tiny``-preset TransformerLM with ``overrides`` (``tiny_config`` keys) after ``steps``
    steps of the trainer's own step on the synthetic stream; returns (model, config, data).
    Quicker than ``train`` (no run folder, no evaluation), same step and router hooks."""
    from xmoe.data import synthetic_token_data
    from xmoe.data.tokens import random_batch
    from xmoe.models import TransformerLM
    from xmoe.training.config import apply_overrides
    from xmoe.training.presets import preset
    from xmoe.training.step import lm_step_loss, train_step
    from xmoe.training.trainer import build_optimizer

    config = apply_overrides(preset("tiny"), [f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(seed)
    model = TransformerLM(config.model)
    data = synthetic_token_data(vocab_size=config.model.vocab_size, num_tokens=6000, seed=seed)
    optimizer = build_optimizer(model, config)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = random_batch(data.train, config.batch_size, config.seq_len, generator)
        train_step(model, optimizer, [batch], lambda b: lm_step_loss(model, *b))
        model.end_training_step()
    return model, config, data


def compare_with_reference(layer: MoELayer, x: torch.Tensor, state: torch.Tensor | None):
    """The layer and the per-token reference on the same input, routing state and cotangents:
    outputs (with and without autograd), aux losses, next states, FLOPs and every gradient (the
    state's included), in float64. Returns (layer output, reference output)."""
    layer.zero_grad(set_to_none=True)
    params = layer_params(layer)
    x_ref = x.clone().requires_grad_(True)
    state_ref = None if state is None else state.clone().requires_grad_(True)
    ref = reference_forward(layer.config, params, x_ref, state_ref)
    x_got = x.clone().requires_grad_(True)
    state_got = None if state is None else state.clone().requires_grad_(True)
    out = layer(x_got, state_got)

    torch.testing.assert_close(out.hidden_states, ref.hidden_states, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, rtol=1e-10, atol=1e-12)
    if ref.state is None:
        assert out.state is None
    else:
        torch.testing.assert_close(out.state, ref.state, rtol=1e-10, atol=1e-12)
    assert float(out.routing.flops_per_token) == pytest.approx(ref.flops_per_token)
    with torch.no_grad():  # inference: a handful of tokens may take the decode path
        inference = layer(x, state)
    expected = ref.hidden_states.detach()
    torch.testing.assert_close(inference.hidden_states, expected, rtol=1e-10, atol=1e-12)

    cotangent = torch.randn_like(ref.hidden_states)
    next_cotangent = None if ref.state is None else torch.randn_like(ref.state)
    for result in (ref, out):
        total = (result.hidden_states * cotangent).sum() + 3.0 * result.aux_loss
        if next_cotangent is not None:
            total = total + (result.state * next_cotangent).sum()
        total.backward()
    ref_grads = {"x": x_ref.grad, "state": None if state is None else state_ref.grad}
    ref_grads |= {n: p.grad for n, p in params.items()}
    got_grads = {"x": x_got.grad, "state": None if state is None else state_got.grad}
    got_grads |= {n: p.grad for n, p in layer.named_parameters()}
    assert_close_grads(got_grads, ref_grads, rtol=1e-9, atol=1e-11)
    return out, ref


def assert_engines_agree(config: MoEConfig, state_width: int | None) -> None:
    """Every registered engine gives the loop engine's outputs and gradients (float32, with a
    routing state of ``state_width`` columns when given; widths grouped_mm takes: multiples
    of 4)."""
    from xmoe.registry import ENGINES

    x = torch.randn(40, config.d_model)
    state = None if state_width is None else torch.randn(40, state_width)
    results = {}
    for backend in sorted(ENGINES):
        layer = make_layer(dataclasses.replace(config, backend=backend), torch.float32, seed=5)
        out = layer(x, state)
        (out.hidden_states.square().sum() + out.aux_loss).backward()
        results[backend] = [out.hidden_states] + [p.grad for p in layer.parameters()]
    for backend, tensors in results.items():
        for got, want in zip(tensors, results["loop"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=backend)


def hf_tiny_round_trip(save_dir, moe: dict, router_std: float) -> None:
    """A 2-layer ``XMoEForCausalLM`` with MoE layer ``moe`` (routers re-drawn with
    ``router_std``, peaked so the choice matters): saved and loaded it gives the same logits,
    and generation with the KV cache equals generation without it."""
    from xmoe.hf import XMoEConfig, XMoEForCausalLM

    config = XMoEConfig(
        vocab_size=40, d_model=16, num_layers=2, num_heads=2, max_seq_len=32, d_ff=32,
        moe=moe, moe_every=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = XMoEForCausalLM(config).eval()
    for layer in model.model.lm.moe_layers:
        torch.nn.init.normal_(layer.router.weight, std=router_std)
    model.save_pretrained(save_dir)
    loaded = XMoEForCausalLM.from_pretrained(save_dir).eval()
    ids = torch.randint(0, 40, (2, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    common = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = loaded.generate(ids, use_cache=True, **common)
    assert torch.equal(cached, loaded.generate(ids, use_cache=False, **common))


def pre_fusion_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sparsified model's state in the layout before 0.1.0: each fused gate-and-up tensor
    (``mlp.experts.w1``, or ``mlp.w_gate_up`` before SparseMLP was an MoELayer) split back into
    separate ``mlp.w_gate`` and ``mlp.w_up`` tensors, and the down projection named
    ``mlp.w_down``."""
    old = {}
    for key, value in tensors.items():
        fused = next((f for f in ("mlp.experts.w1", "mlp.w_gate_up") if key.endswith(f)), None)
        if fused is not None:
            prefix = key[: -len(fused)] + "mlp."
            old[prefix + "w_gate"], old[prefix + "w_up"] = (
                t.contiguous() for t in value.chunk(2, dim=-1)
            )
        else:
            old[key.replace("mlp.experts.w2", "mlp.w_down")] = value
    return old
