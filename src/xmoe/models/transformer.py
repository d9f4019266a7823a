"""A pre-norm decoder-only transformer LM whose FFN is an :class:`xmoe.MoELayer` in MoE blocks.

Shape legend: B batch, T new positions, K cached + new positions, D d_model, V vocab,
H heads, C head width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.config import ConfigError
from xmoe.layer import MoELayer
from xmoe.models.config import ModelConfig
from xmoe.routing import RoutingStats

_DENSE_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}

INPUT_ID_DTYPES = (torch.int64, torch.int32)
"""The index dtypes ``nn.Embedding`` takes."""


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a clear error for token ids the model cannot embed.

    TypeError: not a tensor, or not of an integer dtype in :data:`INPUT_ID_DTYPES`.
    ValueError: not (batch, seq_len), or (for CPU tensors only, so a GPU call never waits on a
    host sync) ids outside ``[0, vocab_size)``.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(
            f"input_ids={type(input_ids).__name__} is invalid: input_ids must be a torch.Tensor "
            "of token ids with shape (batch, seq_len)"
        )
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids.shape={tuple(input_ids.shape)} is invalid: input_ids must have shape "
            "(batch, seq_len)"
        )
    if input_ids.dtype not in INPUT_ID_DTYPES:
        raise TypeError(
            f"input_ids.dtype={input_ids.dtype} is invalid: input_ids must hold integer token ids "
            "(torch.int64 or torch.int32)"
        )
    if input_ids.device.type == "cpu" and input_ids.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids range [{low}, {high}] is invalid: input_ids must be token ids in "
                f"[0, vocab_size={vocab_size})"
            )


class KeyValueCache(Protocol):
    """What attention needs of a cache; transformers' ``Cache`` classes satisfy it."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


@dataclass
class LMOutput:
    """Output of :class:`TransformerLM`.

    Attributes:
        logits: (B, T, V).
        loss: mean next-token cross-entropy over targets != -100, or None without targets.
        aux_loss: scalar sum of the MoE layers' auxiliary losses (0 for dense models and in eval
            mode).
        routing: one :class:`~xmoe.RoutingStats` per MoE block, in block order.
        aux_losses: each named router loss (``balance``, ``entropy``, ...) summed over layers.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    routing: list[RoutingStats]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


def rotary_cos_sin(
    position_ids_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (B, 1, T, C) for ``rotate_half`` pairing."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids_BT.device, dtype=torch.float32) / head_dim
    )
    angles_BTc = position_ids_BT.to(torch.float32).unsqueeze(-1) * inv_freq
    angles_BTC = torch.cat((angles_BTc, angles_BTc), dim=-1).unsqueeze(1)
    return angles_BTC.cos().to(dtype), angles_BTC.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x_BHTC: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x_BHTC * cos + _rotate_half(x_BHTC) * sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with rotary positions via ``scaled_dot_product_attention``."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.d_model // config.num_heads
        self.layer_idx = layer_idx
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask_B1TK: torch.Tensor | None,
        cache: KeyValueCache | None,
    ) -> torch.Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, 3, self.num_heads, self.head_dim)
        q_BHTC, k_BHTC, v_BHTC = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHTC = apply_rotary(q_BHTC, *cos_sin)
        k_BHTC = apply_rotary(k_BHTC, *cos_sin)
        if cache is not None:
            k_BHTC, v_BHTC = cache.update(k_BHTC, v_BHTC, self.layer_idx)
        out_BHTC = F.scaled_dot_product_attention(
            q_BHTC,
            k_BHTC,
            v_BHTC,
            attn_mask=mask_B1TK,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask_B1TK is None,
        )
        return self.proj(out_BHTC.transpose(1, 2).reshape(B, T, D))


class DenseFFN(nn.Module):
    """``act(x·W1 + b1)·W2 + b2``: the FFN of dense blocks."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff)
        self.proj = nn.Linear(config.d_ff, config.d_model)
        self.activation = _DENSE_ACTIVATIONS[config.dense_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.activation(self.fc(x)))


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

    def forward(self, x_BTD, cos_sin, mask_B1TK, cache):
        x_BTD = x_BTD + self.dropout(self.attn(self.attn_norm(x_BTD), cos_sin, mask_B1TK, cache))
        h_BTD = self.ffn_norm(x_BTD)
        if self.is_moe:
            out = self.ffn(h_BTD)
            return x_BTD + self.dropout(out.hidden_states), out
        return x_BTD + self.dropout(self.ffn(h_BTD)), None


def attention_mask_B1TK(
    attention_mask_BK: torch.Tensor | None, num_new: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask (True = attend) for queries at positions ``past_len .. past_len+T-1``.

    None (plain causal attention) when there is neither padding nor a cache offset. A query that
    would see no key (a left-padding position) is allowed to see itself, so no row is empty.
    """
    if attention_mask_BK is None and past_len == 0:
        return None
    total = past_len + num_new
    key_pos_K = torch.arange(total, device=device)
    query_pos_T = torch.arange(past_len, total, device=device)
    mask_TK = key_pos_K[None, :] <= query_pos_T[:, None]
    if attention_mask_BK is None:
        return mask_TK[None, None]
    if attention_mask_BK.shape[-1] != total:
        raise ValueError(
            f"attention_mask has {attention_mask_BK.shape[-1]} positions; expected cached + new "
            f"= {past_len} + {num_new} = {total}"
        )
    mask_BTK = mask_TK[None] & attention_mask_BK.bool()[:, None, :]
    mask_BTK |= key_pos_K[None, None, :] == query_pos_T[None, :, None]
    return mask_BTK.unsqueeze(1)


class TransformerLM(nn.Module):
    """Decoder-only language model; see :class:`~xmoe.models.ModelConfig`.

    ``forward(input_ids (B, T), targets (B, T) | None, ...) -> LMOutput``. Parameters: ``embed``
    (V, D), ``blocks.i.*``, ``norm``, and ``lm_head`` (D -> V) only when embeddings are untied.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = (
            None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, False)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, MoELayer):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                is_residual_out = name.endswith(("attn.proj", "ffn.proj"))
                nn.init.normal_(module.weight, 0.0, residual_std if is_residual_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [block.ffn for block in self.blocks if block.is_moe]

    def _update_moe_configs(self, layers: list[MoELayer], **changes) -> None:
        # configs are frozen: build (and so validate) every new one before installing any, so a
        # bad value raises ConfigError and leaves the model as it was
        model_config = dataclasses.replace(
            self.config, moe=dataclasses.replace(self.config.moe, **changes)
        )
        layer_configs = [dataclasses.replace(layer.config, **changes) for layer in layers]
        for layer, layer_config in zip(layers, layer_configs, strict=True):
            layer.config = layer_config
            layer.router.config = layer_config
            layer.experts.config = layer_config
        self.config = model_config

    def set_threshold(self, threshold: float) -> None:
        """Change t of every threshold-routed MoE layer (an inference-time knob)."""
        layers = [layer for layer in self.moe_layers if layer.router.uses_threshold]
        if not layers:
            raise ConfigError("set_threshold needs a model with threshold-routed MoE layers")
        self._update_moe_configs(layers, threshold=threshold)

    def set_capacity_at_eval(self, enabled: bool) -> None:
        """Apply the training capacity in eval mode too (as the XMoE reference code evaluates);
        off by default, which keeps inference dropless and batch-independent."""
        if self.moe_layers:
            self._update_moe_configs(self.moe_layers, capacity_at_eval=enabled)

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """:func:`check_input_ids` against this model's vocabulary."""
        check_input_ids(input_ids, self.config.vocab_size)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def backbone(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KeyValueCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[RoutingStats], dict[str, torch.Tensor]]:
        """The blocks and the final norm: (B, T, D) hidden states, summed aux loss, routing
        statistics per MoE block, and each named aux loss summed over blocks. Arguments as in
        :meth:`forward`."""
        self.check_input_ids(input_ids)
        B, T = input_ids.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if past_len + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {past_len + T} exceeds max_seq_len={self.config.max_seq_len}"
            )
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=input_ids.device)
            position_ids = position_ids.expand(B, T)
        x_BTD = self.dropout(self.embed(input_ids))
        head_dim = self.config.d_model // self.config.num_heads
        cos_sin = rotary_cos_sin(position_ids, head_dim, self.config.rope_theta, x_BTD.dtype)
        mask = attention_mask_B1TK(attention_mask, T, past_len, input_ids.device)

        aux_loss = x_BTD.new_zeros((), dtype=torch.float32)
        aux_losses: dict[str, torch.Tensor] = {}
        routing: list[RoutingStats] = []
        for block in self.blocks:
            x_BTD, moe_out = block(x_BTD, cos_sin, mask, cache)
            if moe_out is not None:
                aux_loss = aux_loss + moe_out.aux_loss
                for name, value in moe_out.aux_losses.items():
                    aux_losses[name] = aux_losses.get(name, 0.0) + value
                routing.append(moe_out.routing)
        return self.norm(x_BTD), aux_loss, routing, aux_losses

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KeyValueCache | None = None,
    ) -> LMOutput:
        """Args:
        input_ids: (B, T) token ids (int64 or int32) in [0, vocab_size); other shapes or dtypes
            raise a ValueError or TypeError naming ``input_ids`` (the range is checked for CPU
            tensors only, to keep GPU calls free of host syncs).
        targets: (B, T) next-token ids, -100 where ignored; None skips the loss.
        position_ids: (B, T) rotary positions; default ``past + arange(T)``.
        attention_mask: (B, past + T) 1 for real tokens, 0 for padding, or None.
        cache: a :class:`KeyValueCache` to read and extend, or None.
        """
        hidden_BTD, aux_loss, routing, aux_losses = self.backbone(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache
        )
        logits_BTV = F.linear(hidden_BTD, self.output_weight())
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits_BTV.float().view(-1, logits_BTV.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
            )
        return LMOutput(logits_BTV, loss, aux_loss, routing, aux_losses)

    def moe_flops_per_token(self, routing: list[RoutingStats]) -> float:
        """Forward FLOPs per token of the FFNs at MoE positions, as computed in that call:
        kept pairs (plus routers) for MoE models, the dense FFNs of those blocks otherwise."""
        if self.config.moe is None:
            return float(self.config.num_moe_blocks * self.config.dense_ffn_flops)
        return float(sum(float(stats.flops_per_token) for stats in routing))

    def end_training_step(self) -> None:
        """Let the routers adapt between optimizer steps (call after ``optimizer.step()``)."""
        for layer in self.moe_layers:
            layer.router.end_step()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
