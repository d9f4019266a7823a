"""Causal self-attention: rotary positions, the attention mask built for the post-cache key
length, the eager (probability-returning) kernel, and the attention module itself.

Shape legend: B batch, T new positions, K cached + new positions, D d_model, H heads,
C head width.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from xmoe.models.config import ModelConfig

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
"""How attention is computed: ``scaled_dot_product_attention``, or explicit softmax(QKᵀ)V that
can return the attention probabilities."""


class KeyValueCache(Protocol):
    """What attention needs of a cache; transformers' ``Cache`` classes satisfy it."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


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
