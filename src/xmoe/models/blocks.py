"""The transformer block: pre-norm attention then an FFN that is dense or an MoE layer.

Shape legend: B batch, T new positions, K cached + new positions, D d_model, H heads,
E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.layer import MoELayer, MoEOutput
from xmoe.models.attention import AttentionMask, CausalSelfAttention, KeyValueCache
from xmoe.models.config import ModelConfig

_DENSE_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class DenseFFN(nn.Module):
    """``act(x·W1 + b1)·W2 + b2``: the FFN of dense blocks."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff)
        self.proj = nn.Linear(config.d_ff, config.d_model)
        self.activation = _DENSE_ACTIVATIONS[config.dense_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


class BlockOutput(NamedTuple):
    """What a :class:`Block` returns.

    hidden_states: (B, T, D). moe: the MoE layer's output, None in dense blocks. attentions:
    (B, H, T, K) attention probabilities, or None unless asked for. router_logits: (B·T, E)
    router logits of an MoE block, or None unless asked for (or in a dense block).
    routing_state: the routing state for the next MoE block (an MoE block's router's, a dense
    block's input one passed on), or None.
    """

    hidden_states: torch.Tensor
    moe: MoEOutput | None
    attentions: torch.Tensor | None
    router_logits: torch.Tensor | None
    routing_state: torch.Tensor | None = None


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ffn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        if config.is_moe_block(layer_idx):
            # configs are frozen, so layers may share one; a change installs a replaced copy
            self.ffn: nn.Module = MoELayer(config.moe)
        else:
            self.ffn = DenseFFN(config)
        self.dropout = nn.Dropout(config.dropout)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoELayer)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask | torch.Tensor | None,
        cache: KeyValueCache | None,
        *,
        attn_implementation: str = "sdpa",
        output_attentions: bool = False,
        output_router_logits: bool = False,
        routing_state: torch.Tensor | None = None,
    ) -> BlockOutput:
        """``routing_state``: the previous MoE block's (``BlockOutput.routing_state``), or None;
        states flow over depth, one row per token (B·T)."""
        attn_BTD, attentions = self.attn(
            self.attn_norm(x_BTD),
            cos_sin,
            mask,
            cache,
            attn_implementation=attn_implementation,
            output_attentions=output_attentions,
        )
        x_BTD = x_BTD + self.dropout(attn_BTD)
        h_BTD = self.ffn_norm(x_BTD)
        if not self.is_moe:
            x_BTD = x_BTD + self.dropout(self.ffn(h_BTD))
            return BlockOutput(x_BTD, None, attentions, None, routing_state)
        out = self.ffn(h_BTD, routing_state)
        router_logits = None
        if output_router_logits:
            # the layer keeps only probabilities; the logits are one (S, D)·(D, E) product again,
            # through the router's own logits (which may normalise them), on the same input
            h_SD = h_BTD.reshape(-1, h_BTD.shape[-1])
            router_logits = self.ffn.router.logits_and_state(h_SD, routing_state)[0]
        x_BTD = x_BTD + self.dropout(out.hidden_states)
        return BlockOutput(x_BTD, out, attentions, router_logits, out.state)
