"""A tiny float64 MoE LM and calibration ids for the compression tests."""

from __future__ import annotations

import torch

import xmoe
from xmoe.models import ModelConfig, TransformerLM


def tiny_lm(seed: int = 0, **moe) -> TransformerLM:
    """Two MoE blocks of 8 top-2 experts (d=16), float64, eval mode; router weights scaled up so
    that routing is decisive."""
    torch.manual_seed(seed)
    fields = {"d_model": 16, "num_experts": 8, "d_expert": 8, "router": "topk", "top_k": 2}
    config = ModelConfig(
        vocab_size=32, d_model=16, num_layers=2, num_heads=2, max_seq_len=32, d_ff=32,
        moe=xmoe.MoEConfig(**(fields | moe)), moe_every=1,
    )  # fmt: skip
    model = TransformerLM(config).double().eval()
    with torch.no_grad():
        for layer in model.moe_layers:
            layer.router.weight.mul_(50.0)
            layer.experts.w1.normal_(0.0, 0.3)
            layer.experts.w2.normal_(0.0, 0.3)
    return model


def ids(batch: int = 4, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model: TransformerLM, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def greedy(model: TransformerLM, prompt: list[int], steps: int = 5) -> list[int]:
    """``prompt`` extended by ``steps`` greedy tokens (full forward per token, no cache)."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(logits_of(model, torch.tensor([tokens]))[0, -1].argmax()))
    return tokens
