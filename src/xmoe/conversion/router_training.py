"""Fit a layer's linear router to MoEfication's targets on calibration hidden states.

Target: each expert's share of the token's total expert-output L2 norm (the quantity the
oracle ranks by). Loss: soft-label cross-entropy between that share and the router's softmax,
``mean_s -Σ_e share[s, e] · log softmax(W x_s)[e]``. Matching the whole distribution (rather
than a top-set BCE) makes one router serve every knob: its ranking drives top-k, and its
probability mass approximates the norm mass the threshold rule accumulates.

Shape legend: S tokens, D hidden size, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def router_loss(router: nn.Module, x_SD: torch.Tensor, target_SE: torch.Tensor) -> torch.Tensor:
    """Soft-label cross-entropy of the softmax of ``router``'s bias-free linear map (its
    ``weight``, (E, D): a SparseMLP's router, or an ``nn.Linear`` without bias) against the norm
    shares (a scalar)."""
    log_probs_SE = F.log_softmax(F.linear(x_SD, router.weight).float(), dim=-1)
    return -(target_SE.float() * log_probs_SE).sum(dim=-1).mean()


def train_router(
    router: nn.Module,
    x_SD: torch.Tensor,
    target_SE: torch.Tensor,
    steps: int,
    lr: float,
    progress: bool = False,
    desc: str = "router",
) -> list[float]:
    """Full-batch Adam on :func:`router_loss` (the calibration set is small and the router is a
    single (E, D) matrix, so every step sees all tokens).

    Args:
        router: the layer's router, trained in place.
        x_SD: (S, D) calibration MLP inputs. target_SE: (S, E) norm shares (rows sum to 1).
        steps, lr: Adam steps and learning rate.

    Returns:
        the loss before each step and after the last (``steps + 1`` floats).
    """
    x_SD = x_SD.detach().to(router.weight.dtype)
    target_SE = target_SE.detach()
    optimizer = torch.optim.Adam(router.parameters(), lr=lr)
    losses = []
    with torch.enable_grad():
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            optimizer.zero_grad(set_to_none=True)
            loss = router_loss(router, x_SD, target_SE)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    with torch.no_grad():
        losses.append(float(router_loss(router, x_SD, target_SE)))
    return losses
