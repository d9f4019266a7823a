"""A pre-norm decoder-only transformer LM whose FFN is an :class:`xmoe.MoELayer` in MoE blocks.

Shape legend: B batch, T new positions, K cached + new positions, D d_model, V vocab,
H heads, C head width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.config import ConfigError
from xmoe.layer import MoELayer, MoEOutput
from xmoe.models.config import ModelConfig
from xmoe.routing import RoutingStats

_DENSE_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}

INPUT_ID_DTYPES = (torch.int64, torch.int32)
"""The index dtypes ``nn.Embedding`` takes."""

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
"""How attention is computed: ``scaled_dot_product_attention``, or explicit softmax(QKᵀ)V that
can return the attention probabilities."""


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


class AttentionMask:
    """Which keys each new query may see, built for a key length known only after the cache update.

    A dynamic cache returns cached + new keys (K = past + T), a static cache all of its slots
    (K = its capacity, the unwritten ones past every query), so the (B|1, 1, T, K) mask is made
    by the first attention layer that sees K and reused by the others.

    Args:
        attention_mask: None; a (B, L) padding mask, 1 = real token, 0 = padding, over the cached
            and new positions (``L = past + T``; a static cache may be given up to K); or a
            prepared 4-D (B|1, 1|H, T, K) mask, bool (True = attend) or float (added to the
            scores: 0 = attend, a large negative number = masked), used as given.
        num_new: T, the new (query) positions.
        past_len: positions already cached: an int, or a 0-d tensor (static caches count on the
            device, so that compiled decoding need not sync).
        batch_size: B. num_heads: H (a 4-D mask may hold one mask per head).
    """

    def __init__(
        self,
        attention_mask: torch.Tensor | None,
        num_new: int,
        past_len: int | torch.Tensor,
        batch_size: int,
        num_heads: int,
    ) -> None:
        if attention_mask is not None:
            check_padding_mask(attention_mask, num_new, past_len)
            check_mask_values(attention_mask)
        self.attention_mask = attention_mask
        self.num_new = num_new
        self.past_len = past_len
        self.batch_size = batch_size
        self.num_heads = num_heads
        self._built: dict[int, torch.Tensor | None] = {}

    def for_keys(self, num_keys: int, device: torch.device) -> torch.Tensor | None:
        """The mask for K = ``num_keys`` keys: None for plain causal attention (no padding, no
        cache offset; keys from 0), else (B|1, 1|H, T, K), bool or additive float."""
        if num_keys not in self._built:
            self._built[num_keys] = self._build(num_keys, device)
        return self._built[num_keys]

    def _build(self, num_keys: int, device: torch.device) -> torch.Tensor | None:
        mask = self.attention_mask
        T = self.num_new
        if mask is not None and mask.dim() == 4:
            expected = (self.batch_size, self.num_heads, T, num_keys)
            if (
                mask.shape[0] not in (1, self.batch_size)
                or mask.shape[1] not in (1, self.num_heads)
                or tuple(mask.shape[2:]) != expected[2:]
            ):
                raise ValueError(
                    f"attention_mask.shape={tuple(mask.shape)} is invalid: a 4-D mask must have "
                    f"shape (batch={self.batch_size} or 1, 1 or num_heads={self.num_heads}, "
                    f"new tokens={T}, keys={num_keys})"
                )
            # integer 0/1 masks mean attend/ignore like the 2-D ones; float masks are additive
            return mask.to(device) if mask.is_floating_point() else mask.to(device, torch.bool)
        if mask is None and isinstance(self.past_len, int) and self.past_len == 0:
            return None  # keys start at position 0: SDPA's is_causal (top-left aligned) suffices
        key_pos_K = torch.arange(num_keys, device=device)
        query_pos_T = torch.arange(T, device=device) + self.past_len
        mask_TK = key_pos_K[None, :] <= query_pos_T[:, None]
        if mask is None:
            return mask_TK[None, None]
        if mask.shape[-1] > num_keys:
            raise ValueError(
                f"attention_mask has {mask.shape[-1]} positions; the cache holds only {num_keys}"
            )
        padding_BK = F.pad(mask.to(device, torch.bool), (0, num_keys - mask.shape[-1]))
        mask_BTK = mask_TK[None] & padding_BK[:, None, :]
        # a left-padding query would see no key at all (NaN softmax): let it see itself
        mask_BTK |= key_pos_K[None, None, :] == query_pos_T[None, :, None]
        return mask_BTK.unsqueeze(1)


def check_padding_mask(
    attention_mask: torch.Tensor, num_new: int, past_len: int | torch.Tensor
) -> None:
    """Raise a ValueError for a mask that is neither 2-D nor 4-D, or a 2-D mask whose length is
    not cached + new (checked when ``past_len`` is an int: a static cache's count lives on the
    device, and its mask may also cover the slots to come)."""
    if attention_mask.dim() not in (2, 4):
        raise ValueError(
            f"attention_mask.shape={tuple(attention_mask.shape)} is invalid: expected a (batch, "
            "cached + new) padding mask or a 4-D (batch, 1, new tokens, keys) mask"
        )
    if attention_mask.dim() == 2 and isinstance(past_len, int):
        total = past_len + num_new
        if attention_mask.shape[-1] != total:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[-1]} positions; expected cached + new "
                f"= {past_len} + {num_new} = {total}"
            )


def check_mask_values(attention_mask: torch.Tensor) -> None:
    """Raise a ValueError naming ``attention_mask`` when a padding mask (2-D, or 4-D of
    integers) holds a value other than 0 and 1, or a 2-D mask has a row without a real token
    (a 4-D float mask is additive: any value). Costs one host sync per forward; skipped while
    compiling, where a sync would break the graph."""
    mask = attention_mask
    if torch.compiler.is_compiling() or (mask.dim() == 4 and mask.is_floating_point()):
        return
    odd_BL = (mask != 0) & (mask != 1)
    checks = [odd_BL.any()]
    if mask.dim() == 2:
        checks.append((mask == 0).all(dim=-1).any())
    odd, *empty = torch.stack(checks).tolist()
    if odd:
        raise ValueError(
            f"attention_mask holds {mask[odd_BL][0].item()!r}: a padding mask may hold only "
            "1 (a real token) and 0 (padding)"
        )
    if any(empty):
        row = int((mask == 0).all(dim=-1).nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} is all 0: each sequence needs at least one real token (1)"
        )


def eager_attention(
    q_BHTC: torch.Tensor,
    k_BHKC: torch.Tensor,
    v_BHKC: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(QKᵀ/√C + mask)·V`` written out: the (B, H, T, C) output and the (B, H, T, K)
    attention probabilities (after dropout, as transformers' eager attention returns them).

    ``mask`` as :meth:`AttentionMask.for_keys` gives it; None is causal with keys from 0, as
    ``scaled_dot_product_attention(is_causal=True)``.
    """
    T, K = q_BHTC.shape[-2], k_BHKC.shape[-2]
    scores_BHTK = q_BHTC @ k_BHKC.transpose(-1, -2) * q_BHTC.shape[-1] ** -0.5
    if mask is None:
        mask = torch.ones(T, K, dtype=torch.bool, device=q_BHTC.device).tril()
    if mask.dtype == torch.bool:
        # the dtype's minimum, not -inf: a row masked everywhere stays finite (uniform), not NaN
        scores_BHTK = scores_BHTK.masked_fill(~mask, torch.finfo(scores_BHTK.dtype).min)
    else:
        scores_BHTK = scores_BHTK + mask.to(scores_BHTK.dtype)
    # softmax in fp32 or wider, as SDPA accumulates
    probs_BHTK = scores_BHTK.softmax(-1, dtype=torch.promote_types(q_BHTC.dtype, torch.float32))
    probs_BHTK = F.dropout(probs_BHTK.to(q_BHTC.dtype), dropout_p, training=dropout_p > 0)
    return probs_BHTK @ v_BHKC, probs_BHTK


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with rotary positions: ``scaled_dot_product_attention``, or
    :func:`eager_attention` where the attention probabilities are wanted."""

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
        mask: AttentionMask | torch.Tensor | None,
        cache: KeyValueCache | None,
        *,
        attn_implementation: str = "sdpa",
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) output and, with ``output_attentions`` (computed eagerly then, whatever
        ``attn_implementation``), the (B, H, T, K) attention probabilities, else None."""
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, 3, self.num_heads, self.head_dim)
        q_BHTC, k_BHTC, v_BHTC = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q_BHTC = apply_rotary(q_BHTC, *cos_sin)
        k_BHTC = apply_rotary(k_BHTC, *cos_sin)
        if cache is not None:
            k_BHTC, v_BHTC = cache.update(k_BHTC, v_BHTC, self.layer_idx)
        if isinstance(mask, AttentionMask):
            mask = mask.for_keys(k_BHTC.shape[-2], x_BTD.device)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if output_attentions or attn_implementation == "eager":
            out_BHTC, weights = eager_attention(q_BHTC, k_BHTC, v_BHTC, mask, dropout_p)
        else:
            if mask is not None and mask.is_floating_point():
                mask = mask.to(q_BHTC.dtype)  # SDPA takes an additive mask in the query's dtype
            out_BHTC = F.scaled_dot_product_attention(
                q_BHTC,
                k_BHTC,
                v_BHTC,
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=mask is None,
            )
        out_BTD = self.proj(out_BHTC.transpose(1, 2).reshape(B, T, D))
        return out_BTD, weights if output_attentions else None


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
    """

    hidden_states: torch.Tensor
    moe: MoEOutput | None
    attentions: torch.Tensor | None
    router_logits: torch.Tensor | None


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
    ) -> BlockOutput:
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
            return BlockOutput(x_BTD + self.dropout(self.ffn(h_BTD)), None, attentions, None)
        out = self.ffn(h_BTD)
        router_logits = None
        if output_router_logits:
            # the layer keeps only probabilities; the logits are one (S, D)·(D, E) product again,
            # through the router's own logits() (which may normalise them), on the same input
            router_logits = self.ffn.router.logits(h_BTD.reshape(-1, h_BTD.shape[-1]))
        return BlockOutput(x_BTD + self.dropout(out.hidden_states), out, attentions, router_logits)


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
        moe = dataclasses.replace(self.config.moe, **held[0])
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
            )
            x_BTD = out.hidden_states
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
        out = self.run_backbone(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache
        )
        logits_BTV = F.linear(out.last_hidden_state, self.output_weight())
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
