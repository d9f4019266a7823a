"""Validation: perplexity and what the MoE layers computed, on fixed windows."""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from xmoe.data import eval_batches
from xmoe.models import TransformerLM
from xmoe.routing import RoutingStats


@dataclass
class EvalResult:
    """Token-weighted validation metrics.

    Attributes:
        loss: mean next-token cross-entropy (nats). perplexity: ``exp(loss)``.
        tokens: predicted tokens evaluated.
        experts_per_token: experts computed per token, mean over MoE layers (0 when dense).
        moe_flops_per_token: forward FLOPs per token of the FFNs at MoE positions (all of those
            layers together; the dense FFNs of those blocks for a dense model).
        drop_fraction: share of wanted (token, expert) pairs dropped by capacity.
    """

    loss: float
    perplexity: float
    tokens: int
    experts_per_token: float
    moe_flops_per_token: float
    drop_fraction: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def perplexity(loss: float) -> float:
    """``exp(loss)``; ``inf`` where that overflows a float (a diverged or untrained model)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast for ``precision="bf16"``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: TransformerLM,
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    precision: str = "fp32",
) -> EvalResult:
    """Evaluate ``model`` on non-overlapping windows from the start of ``tokens`` (1-D ids).

    ``max_batches`` None or 0 uses every full window. The model runs in eval mode (dropless MoE
    layers unless their config says otherwise) and is put back in its previous mode.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss = total_tokens = 0.0
    experts = flops = drops = 0.0
    for x_BT, y_BT in eval_batches(tokens, batch_size, seq_len, max_batches or None):
        x_BT, y_BT = x_BT.to(device), y_BT.to(device)
        with autocast_context(precision, device):
            out = model(x_BT, y_BT, return_logits=False)  # the loss alone: no (B, T, V) logits
        count = y_BT.numel()
        total_loss += float(out.loss) * count
        total_tokens += count
        flops += model.moe_flops_per_token(out.routing) * count
        if out.routing:
            layers = RoutingStats.mean(out.routing)
            experts += count * layers.experts_per_token
            drops += count * layers.drop_fraction
    model.train(was_training)
    if total_tokens == 0:
        raise ValueError(
            f"no validation window of seq_len={seq_len}: the split has {len(tokens)} tokens"
        )
    loss = total_loss / total_tokens
    return EvalResult(
        loss=loss,
        perplexity=perplexity(loss),
        tokens=int(total_tokens),
        experts_per_token=experts / total_tokens,
        moe_flops_per_token=flops / total_tokens,
        drop_fraction=drops / total_tokens,
    )


@torch.no_grad()
def experts_per_token(model: TransformerLM, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) experts computed for each token, averaged over the MoE layers (eval mode)."""
    was_training = model.training
    model.eval()
    out = model(input_ids_BT)
    model.train(was_training)
    if not out.routing:
        return torch.zeros(input_ids_BT.shape)
    return RoutingStats.mean(out.routing).kept_per_token.reshape(input_ids_BT.shape)
