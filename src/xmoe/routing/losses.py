"""Auxiliary routing losses."""

from __future__ import annotations

import torch

from xmoe.routing.pairs import expert_counts


def switch_balance_loss(probs_SE: torch.Tensor, top1_expert_S: torch.Tensor) -> torch.Tensor:
    """Switch Transformer balance loss on the top-1 choice (before capacity drops).

    ``E · Σ_e mean_s p[s, e] · mean_s 1[top1(s) = e]``; equals 1 when both are uniform.

    Args:
        probs_SE: (S, E) router probabilities (gradients flow through these only).
        top1_expert_S: (S,) int64 each token's most probable expert.

    Returns:
        A scalar tensor in the dtype of ``probs_SE``.
    """
    num_tokens, num_experts = probs_SE.shape
    top1_fraction_E = expert_counts(top1_expert_S, num_experts).to(probs_SE.dtype)
    top1_fraction_E = top1_fraction_E / num_tokens
    return num_experts * (probs_SE.mean(dim=0) * top1_fraction_E).sum()


def entropy_loss(probs_SE: torch.Tensor) -> torch.Tensor:
    """Mean router entropy ``mean_s -Σ_e p[s, e] log p[s, e]`` (nats; 0·log 0 = 0).

    Minimising it sharpens each token's distribution, so a mass threshold keeps fewer experts
    (Dynamic-MoE's "dynamic loss").
    """
    return torch.special.entr(probs_SE).sum(dim=-1).mean()


def z_loss(logits_SE: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss ``mean_s logsumexp(z_s)²``: it penalises large logits, whose
    exponentials lose precision in the softmax, without preferring any expert."""
    return torch.logsumexp(logits_SE, dim=-1).pow(2).mean()
