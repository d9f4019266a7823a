"""A pre-norm decoder-only transformer LM whose FFN is an :class:`xmoe.MoELayer` in MoE blocks.

Shape legend: B batch, T new positions, K cached + new positions, D d_model, V vocab,
H heads, C head width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.config import ConfigError
from xmoe.layer import MoELayer
from xmoe.models.attention import (
    ATTENTION_IMPLEMENTATIONS,
    AttentionMask,
    KeyValueCache,
    rotary_cos_sin,
)
from xmoe.models.blocks import Block
from xmoe.models.config import ModelConfig
from xmoe.models.loss import fused_supported, linear_cross_entropy
from xmoe.routing import RoutingStats

INPUT_ID_DTYPES = (torch.int64, torch.int32)
"""The index dtypes ``nn.Embedding`` takes."""


def check_input_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a clear error for token ids the model cannot embed.

    TypeError: not a tensor, or not of an integer dtype in :data:`INPUT_ID_DTYPES`.
    ValueError: not (batch, seq_len), or (for CPU tensors only, so a GPU call never waits on a
    host sync) ids outside ``[0, vocab_size)``. The range is not checked while ``torch.compile``
    or ``torch.export`` traces (it reads the ids' values, which a traced graph cannot).
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
    tracing = torch.compiler.is_compiling()
    if input_ids.device.type == "cpu" and input_ids.numel() > 0 and not tracing:
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"input_ids range [{low}, {high}] is invalid: input_ids must be token ids in "
                f"[0, vocab_size={vocab_size})"
            )


@dataclass
class LMOutput:
    """Output of :class:`TransformerLM`.

    Attributes:
        logits: (B, T, V), or None when the call asked for the loss alone
            (``return_logits=False``).
        loss: mean next-token cross-entropy over targets != -100, or None without targets.
        aux_loss: scalar sum of the MoE layers' auxiliary losses (0 for dense models and in eval
            mode).
        routing: one :class:`~xmoe.RoutingStats` per MoE block, in block order.
        aux_losses: each named router loss (``balance``, ``entropy``, ...) summed over layers.
    """

    logits: torch.Tensor | None
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    routing: list[RoutingStats]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class BackboneOutput:
    """What :meth:`TransformerLM.run_backbone` returns.

    Attributes:
        last_hidden_state: (B, T, D) after the final norm.
        aux_loss: scalar sum of the MoE layers' auxiliary losses.
        routing: one :class:`~xmoe.RoutingStats` per MoE block.
        aux_losses: each named aux loss summed over blocks.
        hidden_states: when asked for, the (B, T, D) input of every block then the last
            block's output after the final norm (``num_layers + 1`` tensors, as transformers'
            models return them), else None.
        attentions: when asked for, one (B, H, T, K) attention-probability tensor per block.
        router_logits: when asked for, one (B·T, E) router-logit tensor per MoE block.
    """

    last_hidden_state: torch.Tensor
    aux_loss: torch.Tensor
    routing: list[RoutingStats]
    aux_losses: dict[str, torch.Tensor]
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None


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

    def set_threshold(self, threshold: float) -> None:
        """Change t of every threshold-routed MoE layer (an inference-time knob).

        Raises:
            ConfigError: no layer is threshold-routed, or t is not in (0, 1] (nothing changes).
        """
        routers = [layer.router for layer in self.moe_layers if layer.router.uses_threshold]
        if not routers:
            raise ConfigError("set_threshold needs a model with threshold-routed MoE layers")
        for router in routers:  # the first one validates t, before any router changes
            router.set_threshold(threshold)

    def set_capacity_at_eval(self, enabled: bool) -> None:
        """Apply the training capacity in eval mode too (as the XMoE reference code evaluates);
        off by default, which keeps inference dropless and batch-independent."""
        for layer in self.moe_layers:
            layer.set_capacity_at_eval(enabled)

    def live_config(self) -> ModelConfig:
        """``config`` (the recipe this model was built from) with the MoE tunables its layers
        hold now: what a saved config must record to rebuild the model as it runs.

        Raises:
            ConfigError: the MoE layers hold different values (one ``moe`` entry cannot
                record them).
        """
        held = [layer.tunables() for layer in self.moe_layers]
        if not held:
            return self.config
        differing = sorted(k for k in held[0] if any(h[k] != held[0][k] for h in held))
        if differing:
            raise ConfigError(
                f"the MoE layers hold different {differing}: one config records a single value "
                "(set them model-wide, e.g. with set_threshold, before saving)"
            )
        moe = self.config.moe.with_tunables(held[0])
        return dataclasses.replace(self.config, moe=moe)

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """:func:`check_input_ids` against this model's vocabulary."""
        check_input_ids(input_ids, self.config.vocab_size)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def _embed(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, T, D) block input from exactly one of token ids or embeddings."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            self.check_input_ids(input_ids)
            return self.dropout(self.embed(input_ids))
        d_model = self.config.d_model
        if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
            raise TypeError(
                f"inputs_embeds={type(inputs_embeds).__name__} is invalid: inputs_embeds must be a "
                f"floating-point torch.Tensor of shape (batch, seq_len, d_model={d_model})"
            )
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d_model:
            raise ValueError(
                f"inputs_embeds.shape={tuple(inputs_embeds.shape)} is invalid: inputs_embeds must "
                f"have shape (batch, seq_len, d_model={d_model})"
            )
        return self.dropout(inputs_embeds)  # the same dropout the token embeddings get

    def run_backbone(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KeyValueCache | None = None,
        attn_implementation: str = "sdpa",
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        output_router_logits: bool = False,
    ) -> BackboneOutput:
        """The blocks and the final norm, with the per-layer outputs transformers asks for.

        Args:
            input_ids: (B, T) token ids, or None with ``inputs_embeds`` (exactly one of them).
            inputs_embeds: (B, T, D) embeddings used in place of ``embed(input_ids)``.
            position_ids: (B, T) rotary positions; default ``past + arange(T)``.
            attention_mask: None, a (B, past + T) padding mask (1 = real token), or a 4-D mask;
                see :class:`AttentionMask`.
            cache: a :class:`KeyValueCache` to read and extend (a dynamic or a static one), or
                None.
            attn_implementation: one of :data:`ATTENTION_IMPLEMENTATIONS`.
            output_hidden_states / output_attentions / output_router_logits: also return
                those (see :class:`BackboneOutput`).
        """
        if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attn_implementation={attn_implementation!r} is not supported: use one of "
                f"{ATTENTION_IMPLEMENTATIONS}"
            )
        x_BTD = self._embed(input_ids, inputs_embeds)
        B, T, _ = x_BTD.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if isinstance(past_len, torch.Tensor):
            # a static cache's own counter, which its update() advances in place: keep the
            # count from before this call for the masks built after the first update
            past_len = past_len.clone()
        # a static cache counts on the device: comparing would sync, and stop a traced graph
        device_count = isinstance(past_len, torch.Tensor) and torch.compiler.is_compiling()
        if not device_count and past_len + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {past_len + T} exceeds max_seq_len={self.config.max_seq_len}"
            )
        if position_ids is None:
            position_ids = torch.arange(T, device=x_BTD.device) + past_len
            position_ids = position_ids.expand(B, T)
        head_dim = self.config.d_model // self.config.num_heads
        cos_sin = rotary_cos_sin(position_ids, head_dim, self.config.rope_theta, x_BTD.dtype)
        mask = AttentionMask(attention_mask, T, past_len, B, self.config.num_heads)

        aux_loss = x_BTD.new_zeros((), dtype=torch.float32)
        aux_losses: dict[str, torch.Tensor] = {}
        routing: list[RoutingStats] = []
        hidden_states: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        router_logits: list[torch.Tensor] = []
        routing_state = None  # carried over depth from one MoE block's router to the next
        for block in self.blocks:
            if output_hidden_states:
                hidden_states.append(x_BTD)
            out = block(
                x_BTD,
                cos_sin,
                mask,
                cache,
                attn_implementation=attn_implementation,
                output_attentions=output_attentions,
                output_router_logits=output_router_logits,
                routing_state=routing_state,
            )
            x_BTD, routing_state = out.hidden_states, out.routing_state
            if out.attentions is not None:
                attentions.append(out.attentions)
            if out.router_logits is not None:
                router_logits.append(out.router_logits)
            if out.moe is not None:
                aux_loss = aux_loss + out.moe.aux_loss
                for name, value in out.moe.aux_losses.items():
                    aux_losses[name] = aux_losses.get(name, 0.0) + value
                routing.append(out.moe.routing)
        x_BTD = self.norm(x_BTD)
        if output_hidden_states:
            hidden_states.append(x_BTD)  # the last one after the final norm, as Llama's
        return BackboneOutput(
            x_BTD,
            aux_loss,
            routing,
            aux_losses,
            tuple(hidden_states) if output_hidden_states else None,
            tuple(attentions) if output_attentions else None,
            tuple(router_logits) if output_router_logits else None,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KeyValueCache | None = None,
        return_logits: bool = True,
    ) -> LMOutput:
        """Args:
        input_ids: (B, T) token ids (int64 or int32) in [0, vocab_size); other shapes or dtypes
            raise a ValueError or TypeError naming ``input_ids`` (the range is checked for CPU
            tensors only, to keep GPU calls free of host syncs).
        targets: (B, T) next-token ids, -100 where ignored; None skips the loss.
        position_ids: (B, T) rotary positions; default ``past + arange(T)``.
        attention_mask: (B, past + T) 1 for real tokens, 0 for padding, or None.
        cache: a :class:`KeyValueCache` to read and extend, or None.
        return_logits: False (with ``targets``) leaves ``LMOutput.logits`` None and takes the
            loss chunk by chunk without the (B, T, V) logits
            (:func:`xmoe.models.loss.linear_cross_entropy`; the same loss up to the order of
            its sums), where the operands allow; training steps that read only the loss.
        """
        out = self.run_backbone(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache
        )
        h_BTD, weight_VD = out.last_hidden_state, self.output_weight()
        if not return_logits and targets is not None and fused_supported(h_BTD, weight_VD):
            h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])
            loss = linear_cross_entropy(h_ND, weight_VD, targets.reshape(-1))
            return LMOutput(None, loss, out.aux_loss, out.routing, out.aux_losses)
        logits_BTV = F.linear(h_BTD, weight_VD)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits_BTV.float().view(-1, logits_BTV.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
            )
        return LMOutput(logits_BTV, loss, out.aux_loss, out.routing, out.aux_losses)

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
