"""Shared test helpers: build layers with peaked routers and compare them to the reference."""

from __future__ import annotations

import torch

from xmoe import MoEConfig, MoELayer

from reference import layer_params, reference_forward


def use_host_reads(monkeypatch, host_reads: bool) -> None:
    """Run the CPU path (host reads allowed) or, with False, the sync-free path that devices
    other than the CPU take (tensor-only plan, segment operations and threshold ranking)."""
    from xmoe import device

    if not host_reads:
        monkeypatch.setattr(device, "HOST_READ_DEVICES", frozenset())


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
